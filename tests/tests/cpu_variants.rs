//! One binary for every CPU: llama.cpp's CPU kernels are chosen at startup from the
//! variants the build compiled, the choice is reported in capabilities, and the variant
//! whose kernels fault on this llama.cpp (AMX) is withheld.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use modeld_e2e::{Agent, AgentOptions, Assets, gguf_spec, pb};
use tokio_stream::StreamExt;

fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn has_flag(flag: &str) -> bool {
    cpu_flags().iter().any(|f| f == flag)
}

fn llama(caps: &pb::GetCapabilitiesResponse) -> &pb::RuntimeInfo {
    caps.runtimes
        .iter()
        .find(|r| r.runtime() == pb::Runtime::LlamaCpp)
        .expect("llama.cpp is in this build")
}

/// Registers the test GGUF as "smol", stores it and loads it; any failure (the agent
/// may die on the way) is returned as its message.
async fn register_and_load_smol(client: &modeld_e2e::Client) -> Result<(), String> {
    let url = format!("file://{}", Assets::get().gguf.display());
    client
        .register_model(gguf_spec("smol", &url))
        .await
        .map_err(|e| e.to_string())?;
    client
        .pull_to_end("smol")
        .await
        .map_err(|e| e.to_string())?;
    client
        .load_to_end("smol", None)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn capabilities_report_the_cpu_kernels_each_runtime_chose() {
    let agent = Agent::start().await;
    let caps = agent.client().await.capabilities().await.unwrap();

    let llama = llama(&caps);
    assert!(llama.unavailable_reason.is_empty(), "{llama:?}");
    let v = llama
        .cpu_variant
        .as_ref()
        .expect("llama.cpp reports its kernels");
    assert_eq!(v.dispatch(), pb::CpuDispatch::Runtime, "{v:?}");
    assert_ne!(v.name, "sapphirerapids", "the AMX variant is withheld");
    assert_ne!(v.name, "unknown", "{v:?}");
    let module = PathBuf::from(&v.module_path);
    assert!(module.is_file(), "{v:?}");
    assert_eq!(
        modeld_engine_llama::cpu::variant_of(module.file_name().unwrap().to_str().unwrap()),
        Some(v.name.as_str())
    );
    assert!(
        v.withheld.iter().any(|w| w.starts_with("sapphirerapids: ")),
        "{v:?}"
    );
    // The best kernels for this CPU, not the lowest common denominator: whatever
    // this CPU can run, the chosen variant uses.
    #[cfg(target_arch = "x86_64")]
    {
        let has = |f: &str| v.features.iter().any(|x| x == f);
        assert_eq!(has("avx2"), has_flag("avx2"), "{v:?}");
        assert_eq!(has("avx512"), has_flag("avx512f"), "{v:?}");
        assert!(!has("amx_int8"), "{v:?}");
    }

    if cfg!(feature = "candle") {
        let candle = caps
            .runtimes
            .iter()
            .find(|r| r.runtime() == pb::Runtime::Candle)
            .unwrap();
        let v = candle.cpu_variant.as_ref().unwrap();
        assert_eq!(v.dispatch(), pb::CpuDispatch::BuildTime);
        assert_eq!(v.name, modeld_engine_core::cpu::build_level());
    }
    if cfg!(feature = "onnx") {
        let onnx = caps
            .runtimes
            .iter()
            .find(|r| r.runtime() == pb::Runtime::OnnxRuntime)
            .unwrap();
        // This agent was given no ONNX Runtime library: the runtime is listed, and
        // says why it cannot run here (tests/runtimes.rs gives it one).
        assert!(onnx.cpu_variant.is_none(), "{onnx:?}");
        assert!(
            onnx.unavailable_reason.contains("--onnxruntime-library"),
            "{onnx:?}"
        );
    }
}

/// `scripts/run` compiles llama.cpp for one variant only, the one `scripts/llama-host-cpu`
/// names: it must be the variant ggml picks at startup on this CPU, with the same
/// instruction sets, or the main command would run other kernels than a portable build.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[tokio::test]
async fn the_run_scripts_one_variant_is_the_one_the_portable_build_picks_here() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/llama-host-cpu");
    let out = std::process::Command::new(&script).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let settings: Vec<(&str, &str)> = stdout.lines().filter_map(|l| l.split_once('=')).collect();
    let variant = settings
        .iter()
        .find(|(k, _)| *k == "MODELD_LLAMA_HOST_VARIANT")
        .map(|(_, v)| *v);
    let Some(variant) = variant else {
        panic!(
            "no variant for this CPU: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let compiled: std::collections::BTreeSet<String> = settings
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("GGML_")?, *v)))
        .inspect(|(_, v)| assert_eq!(*v, "ON", "{stdout}"))
        .map(|(k, _)| k.to_ascii_lowercase())
        .collect();

    let agent = Agent::start().await;
    let caps = agent.client().await.capabilities().await.unwrap();
    let v = llama(&caps).cpu_variant.clone().unwrap();
    assert_eq!(variant, v.name, "{stdout}");
    // llama.cpp reports these of the instruction sets a variant is compiled with (not
    // SSE4.2): the picked module's and the one-variant build's must agree on each.
    for set in [
        "avx",
        "f16c",
        "fma",
        "avx2",
        "bmi2",
        "avx_vnni",
        "avx512",
        "avx512_vbmi",
        "avx512_vnni",
        "avx512_bf16",
    ] {
        assert_eq!(
            compiled.contains(set),
            v.features.iter().any(|f| f == set),
            "{set}: compiled {compiled:?}, picked {v:?}"
        );
    }
    assert!(!compiled.iter().any(|f| f.starts_with("amx")), "{stdout}");
}

#[tokio::test]
async fn a_variants_directory_without_modules_is_a_clear_error_and_the_agent_keeps_serving() {
    let empty = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(AgentOptions {
        args: vec![
            "--llama-cpu-variants-dir".into(),
            empty.path().display().to_string(),
        ],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let caps = client.capabilities().await.unwrap();
    let reason = &llama(&caps).unavailable_reason;
    assert!(
        reason.contains(&empty.path().display().to_string()),
        "{reason}"
    );
    assert!(reason.contains("libggml-cpu"), "{reason}");

    let err = register_and_load_smol(&client).await.unwrap_err();
    assert!(err.contains("no llama.cpp CPU variant"), "{err}");
    assert!(client.is_serving().await.unwrap());
}

/// Upstream's AMX kernels fault on the first decode on Xeons with AMX (llama.cpp issue
/// 20824). This checks that the withheld variant still does, so the day a llama.cpp
/// upgrade fixes it, this test fails and says the variant can come back.
#[tokio::test]
async fn the_withheld_amx_variant_still_faults_where_the_cpu_has_amx() {
    if !(has_flag("amx_tile") && has_flag("amx_int8")) {
        eprintln!("skipped: this CPU has no AMX (amx_tile, amx_int8), so the fault cannot occur");
        return;
    }
    let all = Path::new(modeld_engine_llama::cpu::BUILD_ALL_VARIANTS_DIR.unwrap());
    let mut agent = Agent::start_with(AgentOptions {
        args: vec!["--llama-cpu-variants-dir".into(), all.display().to_string()],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let caps = client.capabilities().await.unwrap();
    let v = llama(&caps).cpu_variant.clone().unwrap();
    assert_eq!(
        v.name, "sapphirerapids",
        "offered every variant, an AMX CPU picks AMX"
    );
    assert!(v.withheld.is_empty());
    // Wherever the AMX kernels first run (the first decode here; a load elsewhere),
    // the engine process dies; the agent reports how and serves on.
    let outcome = async {
        register_and_load_smol(&client).await?;
        let request = pb::GenerateRequest {
            model_id: "smol".into(),
            input: Some(pb::generate_request::Input::Prompt(
                "The capital of France is".into(),
            )),
            max_tokens: 8,
            ..Default::default()
        };
        let mut stream = client
            .generate()
            .generate(request)
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        while let Some(msg) = stream.next().await {
            // Once tokens flowed, a failure comes in the summary.
            if let Some(pb::generate_response::Event::Summary(s)) =
                msg.map_err(|e| e.to_string())?.event
                && s.finish_reason() == pb::FinishReason::Error
            {
                return Err(format!("{} ({})", s.error, s.error_reason));
            }
        }
        Ok::<(), String>(())
    }
    .await;
    assert!(
        agent.wait_exit(Duration::from_secs(2)).is_none(),
        "the agent outlives its engine; log:\n{}",
        agent.log()
    );
    match outcome {
        // A native build faults with SIGSEGV in ggml_backend_amx_mul_mat; the
        // variant module, with SIGILL on the first AMX instruction.
        Err(message) => assert!(
            message.contains("SIGILL") || message.contains("SIGSEGV"),
            "expected SIGILL or SIGSEGV in the AMX kernels, got: {message}\nlog:\n{}",
            agent.log()
        ),
        Ok(()) => panic!(
            "the AMX variant decoded without faulting: this llama.cpp may have fixed \
             upstream issue 20824; re-check and drop sapphirerapids from \
             WITHHELD_VARIANTS (server/engines/llama/build.rs and src/cpu.rs)"
        ),
    }
    assert!(client.is_serving().await.unwrap());
    let state = client.state("smol", 0).await.unwrap();
    assert_eq!(state.failure.unwrap().reason, "ENGINE_CRASHED");
}

/// What ships to devices: scripts/package's directory runs on its own, with no path
/// into the build tree, and picks its CPU kernels from the variants it carries.
#[tokio::test]
async fn a_packaged_agent_runs_from_its_own_directory() {
    let built = modeld_e2e::binary("modeld");
    let dest = tempfile::tempdir().unwrap();
    let package = dest.path().join("modeld");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = std::process::Command::new(root.join("scripts/package"))
        .arg("--from")
        .arg(built.parent().unwrap())
        .arg(&package)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for lib in ["libllama.so.0", "libggml.so.0", "libggml-base.so.0"] {
        assert!(package.join(lib).is_file(), "{lib} is packaged");
    }
    assert!(
        !package
            .join("llama-cpu-variants/libggml-cpu-sapphirerapids.so")
            .exists()
    );

    let agent = Agent::start_with(AgentOptions {
        binary: Some(package.join("modeld")),
        env_remove: vec!["LD_LIBRARY_PATH".into()],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let caps = client.capabilities().await.unwrap();
    let v = llama(&caps).cpu_variant.clone().unwrap();
    assert!(
        Path::new(&v.module_path).starts_with(package.join("llama-cpu-variants")),
        "{v:?}"
    );
    // The build tree is still on the binary's rpath, after $ORIGIN: check the
    // libraries really came from the package.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", agent.pid())).unwrap();
    let llama_libs: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("libllama") || p.contains("libggml"))
        .collect();
    assert!(!llama_libs.is_empty());
    for lib in &llama_libs {
        assert!(
            Path::new(lib).starts_with(&package),
            "{lib} is outside the package"
        );
    }
    register_and_load_smol(&client).await.unwrap();
    // The engine process is the packaged binary too, with the packaged kernels.
    let loaded = client.list_loaded().await.unwrap().models;
    let engine_pid = loaded[0].engine_process_id;
    assert_ne!(engine_pid, 0);
    let exe = std::fs::read_link(format!("/proc/{engine_pid}/exe")).unwrap();
    assert_eq!(exe, package.join("modeld"));
    let maps = std::fs::read_to_string(format!("/proc/{engine_pid}/maps")).unwrap();
    assert!(
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .any(|p| p.contains("libggml-cpu-")
                && Path::new(p).starts_with(package.join("llama-cpu-variants"))),
        "the engine process chose a packaged CPU variant"
    );
    let request = pb::GenerateRequest {
        model_id: "smol".into(),
        input: Some(pb::generate_request::Input::Prompt(
            "The capital of France is".into(),
        )),
        max_tokens: 4,
        // Four tokens whatever the model would say: the count is what is checked.
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = client
        .generate()
        .generate(request)
        .await
        .unwrap()
        .into_inner();
    let mut summary = None;
    while let Some(msg) = stream.next().await {
        if let Some(pb::generate_response::Event::Summary(s)) = msg.unwrap().event {
            summary = Some(s);
        }
    }
    assert_eq!(summary.unwrap().usage.unwrap().generated_tokens, 4);
}
