//! Node capabilities, resource watching, configuration precedence, and the RPCs that
//! later stages fill in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use modeld_e2e::{Agent, AgentOptions, pb, reason};
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test]
async fn capabilities_describe_this_machine_and_this_build() {
    let agent = Agent::start_with(AgentOptions {
        args: vec![
            "--memory-budget".into(),
            "300MB".into(),
            "--disk-quota".into(),
            "2GB".into(),
        ],
        ..Default::default()
    })
    .await;
    let caps = agent.client().await.capabilities().await.unwrap();

    assert_eq!(caps.node_id.len(), 36, "a UUID");
    assert!(!caps.os.is_empty() && !caps.kernel_version.is_empty());
    let cpu = caps.cpu.unwrap();
    assert_eq!(cpu.architecture, std::env::consts::ARCH);
    let logical = std::thread::available_parallelism().unwrap().get() as u32;
    assert_eq!(cpu.logical_cores, logical);
    assert!(cpu.physical_cores >= 1 && cpu.physical_cores <= logical);
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        cpu.features.contains(&"avx2".to_owned()),
        std::arch::is_x86_feature_detected!("avx2")
    );
    let mem = caps.memory.unwrap();
    assert!(mem.total_bytes > 0 && mem.available_bytes <= mem.total_bytes);
    assert!(caps.disk_free_bytes > 0 && caps.disk_free_bytes <= caps.disk_total_bytes);
    assert_eq!(caps.memory_budget_bytes, 300_000_000);
    assert_eq!(caps.disk_quota_bytes, 2_000_000_000);
    assert_eq!(caps.agent_version, env!("CARGO_PKG_VERSION"));

    // This build's runtimes make their formats runnable; every other format is
    // recognized but not runnable, and a controller can tell the two apart.
    let mut expected = vec![pb::Runtime::LlamaCpp];
    let mut runnable = vec![pb::ModelFormat::Gguf];
    if cfg!(feature = "onnx") {
        expected.push(pb::Runtime::OnnxRuntime);
        runnable.push(pb::ModelFormat::Onnx);
    }
    if cfg!(feature = "candle") {
        expected.push(pb::Runtime::Candle);
        runnable.push(pb::ModelFormat::Safetensors);
        runnable.push(pb::ModelFormat::Mlx);
    }
    if cfg!(feature = "litert") {
        expected.push(pb::Runtime::Tflite);
        runnable.push(pb::ModelFormat::Tflite);
    }
    let runtimes: Vec<pb::Runtime> = caps.runtimes.iter().map(|r| r.runtime()).collect();
    assert_eq!(runtimes, expected);
    assert!(caps.runtimes[0].quantizations.contains(&"Q4_1".to_owned()));
    assert_eq!(caps.formats.len(), 9);
    for f in &caps.formats {
        assert!(f.recognized);
        assert_eq!(f.runnable, runnable.contains(&f.format()), "{f:?}");
    }

    // The rates speed predictions stand on, measured here, and every compiled
    // runtime's factors for each format it runs, built in until a benchmark runs.
    let performance = caps.performance.expect("the node's rates");
    assert!(
        performance.memory_read_bytes_per_second > 1e8,
        "{performance:?}"
    );
    assert!(
        performance.compute_flops_per_second > 1e8,
        "{performance:?}"
    );
    let pairs: usize = caps.runtimes.iter().map(|r| r.formats.len()).sum();
    assert_eq!(performance.runtimes.len(), pairs, "{performance:?}");
    for f in &performance.runtimes {
        assert_eq!(f.source(), pb::EstimateSource::Predicted, "{f:?}");
        assert!(
            f.decode > 0.0 && f.decode <= 1.0 && f.prefill > 0.0,
            "{f:?}"
        );
    }
    // Kept in the store: a restart reports the same figures without measuring again.
    let agent = agent.restart().await;
    let again = agent
        .client()
        .await
        .capabilities()
        .await
        .unwrap()
        .performance
        .unwrap();
    assert_eq!(
        (again.memory_read_bytes_per_second, again.measured_at),
        (
            performance.memory_read_bytes_per_second,
            performance.measured_at
        )
    );
}

#[tokio::test]
async fn watch_resources_streams_at_the_requested_interval() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let mut stream = client
        .node()
        .watch_resources(pb::WatchResourcesRequest {
            interval: Some(modeld_proto::pbjson_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut times = Vec::new();
    for _ in 0..3 {
        let snap = stream.next().await.unwrap().unwrap();
        assert!(snap.memory.unwrap().total_bytes > 0);
        assert!(snap.agent_rss_bytes > 0);
        assert!(snap.disk_free_bytes > 0);
        let t = snap.time.unwrap();
        times.push(Duration::new(t.seconds as u64, t.nanos as u32));
    }
    assert!(times.windows(2).all(|w| w[1] > w[0]), "{times:?}");
    // /proc/pressure/memory exists on this kernel; elsewhere the field is -1.
    let psi = std::path::Path::new("/proc/pressure/memory").exists();
    let snap = stream.next().await.unwrap().unwrap();
    assert_eq!(snap.memory_pressure >= 0.0, psi);

    for bad in [
        modeld_proto::pbjson_types::Duration {
            seconds: 0,
            nanos: 1_000_000,
        },
        modeld_proto::pbjson_types::Duration {
            seconds: 7200,
            nanos: 0,
        },
        modeld_proto::pbjson_types::Duration {
            seconds: -1,
            nanos: 0,
        },
    ] {
        let err = client
            .node()
            .watch_resources(pb::WatchResourcesRequest {
                interval: Some(bad),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("interval"), "{}", err.message());
    }
}

#[tokio::test]
async fn benchmark_refuses_what_it_cannot_measure_with_the_reason() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let bench = |r: pb::BenchmarkRequest| {
        let client = client.clone();
        async move { client.node().benchmark(r).await.unwrap_err() }
    };
    let err = bench(pb::BenchmarkRequest::default()).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("model_id"), "{}", err.message());
    let err = bench(pb::BenchmarkRequest {
        model_id: "smollm2-135m-instruct".into(),
        prompt_tokens: 1_000_000,
        ..Default::default()
    })
    .await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("prompt_tokens"), "{}", err.message());
    let err = bench(pb::BenchmarkRequest {
        model_id: "no-such-model".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // Registered (the built-in catalog) but not stored: nothing to measure yet.
    let err = bench(pb::BenchmarkRequest {
        model_id: "smollm2-135m-instruct".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(reason(&err), "MODEL_NOT_STORED");
    assert!(client.is_serving().await.unwrap());
}

/// Flags win over environment variables, which win over the config file.
#[tokio::test]
async fn configuration_precedence_is_flag_then_env_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("modeld.toml");
    std::fs::write(
        &config,
        "memory_budget = \"100MB\"\ndisk_quota = \"1GB\"\nlog = \"info\"\n",
    )
    .unwrap();
    let config_arg = vec!["--config".to_owned(), config.display().to_string()];

    let file_only = Agent::start_with(AgentOptions {
        args: config_arg.clone(),
        ..Default::default()
    })
    .await;
    let caps = file_only.client().await.capabilities().await.unwrap();
    assert_eq!(
        (caps.memory_budget_bytes, caps.disk_quota_bytes),
        (100_000_000, 1_000_000_000)
    );

    let env_over_file = Agent::start_with(AgentOptions {
        args: config_arg.clone(),
        env: vec![("MODELD_MEMORY_BUDGET".into(), "200MB".into())],
        ..Default::default()
    })
    .await;
    let caps = env_over_file.client().await.capabilities().await.unwrap();
    assert_eq!(
        (caps.memory_budget_bytes, caps.disk_quota_bytes),
        (200_000_000, 1_000_000_000)
    );

    let mut args = config_arg;
    args.extend(["--memory-budget".to_owned(), "300MB".to_owned()]);
    let flag_over_env = Agent::start_with(AgentOptions {
        args,
        env: vec![("MODELD_MEMORY_BUDGET".into(), "200MB".into())],
        ..Default::default()
    })
    .await;
    let caps = flag_over_env.client().await.capabilities().await.unwrap();
    assert_eq!(caps.memory_budget_bytes, 300_000_000);
}

#[tokio::test]
async fn bad_configuration_stops_the_agent_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("modeld.toml");
    std::fs::write(&config, "memory_budjet = \"1GB\"\n").unwrap();
    let out = std::process::Command::new(modeld_e2e::binary("modeld"))
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("memory_budjet"), "{stderr}");

    let out = std::process::Command::new(modeld_e2e::binary("modeld"))
        .args(["--listen", "127.0.0.1:0", "--memory-budget", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lots"));
}
