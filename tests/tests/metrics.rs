//! Metrics in the Prometheus text format on `--metrics-listen`, from a real agent that
//! loads the real model and generates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};

use modeld_e2e::{Agent, AgentOptions, Assets, gguf_spec, model_server, modelctl, pb};

fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generation_shows_in_prometheus_metrics() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let agent = Agent::start_with(AgentOptions {
        args: vec!["--metrics-listen".into(), metrics.to_string()],
        ..AgentOptions::default()
    })
    .await;
    let before = scrape(metrics);
    assert_eq!(
        sample(&before, "modeld_models_loaded", &[]),
        Some(0.0),
        "{before}"
    );
    assert!(sample(&before, "modeld_memory_budget_bytes", &[]).unwrap() > 0.0);

    let client = agent.client().await;
    client
        .register_model(gguf_spec("smol", &server.url("smol.gguf")))
        .await
        .unwrap();
    client.load_to_end("smol", None).await.unwrap();
    for _ in 0..2 {
        let (ok, out, err) = modelctl(
            &agent,
            &[
                "generate",
                "smol",
                "The capital of France is",
                "--max-tokens",
                "5",
                "--temperature",
                "0",
            ],
        );
        assert!(ok, "{out}{err}");
    }

    let after = scrape(metrics);
    let model = "gen_ai_request_model=\"smol\"";
    assert_eq!(
        sample(&after, "modeld_models_loaded", &[]),
        Some(1.0),
        "{after}"
    );
    assert!(
        sample(&after, "modeld_memory_models_bytes", &[model]).unwrap() > 0.0,
        "{after}"
    );
    let requests = sample(&after, "modeld_generate_requests_total", &[model]).unwrap();
    assert_eq!(requests, 2.0, "{after}");
    let output = sample(
        &after,
        "modeld_generate_tokens_total",
        &[model, "gen_ai_token_type=\"output\""],
    );
    assert_eq!(output, Some(10.0), "two requests of 5 tokens: {after}");
    let input = sample(
        &after,
        "modeld_generate_tokens_total",
        &[model, "gen_ai_token_type=\"input\""],
    )
    .unwrap();
    assert!(input >= 2.0, "{after}");
    let ttft = sample(
        &after,
        "gen_ai_server_time_to_first_token_seconds_count",
        &[model],
    );
    assert_eq!(ttft, Some(2.0), "{after}");
    assert!(
        sample(
            &after,
            "gen_ai_server_time_to_first_token_seconds_sum",
            &[model]
        )
        .unwrap()
            > 0.0
    );
    assert!(
        after.contains("# TYPE gen_ai_server_time_per_output_token_seconds histogram"),
        "{after}"
    );

    // A client that leaves mid-stream: the generation is counted as cancelled, with
    // the tokens it got.
    let mut stream = client
        .generate()
        .generate(pb::GenerateRequest {
            model_id: "smol".into(),
            input: Some(pb::generate_request::Input::Prompt(
                "Count from one to one hundred:".into(),
            )),
            max_tokens: 200,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        stream.message().await.unwrap().unwrap();
    }
    drop(stream);
    let cancelled = [model, "gen_ai_response_finish_reason=\"cancelled\""];
    let waited = std::time::Instant::now();
    let left = loop {
        let text = scrape(metrics);
        if sample(&text, "modeld_generate_requests_total", &cancelled) == Some(1.0) {
            break text;
        }
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(20),
            "the cancelled generation was never counted: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        sample(
            &left,
            "modeld_generate_tokens_total",
            &[model, "gen_ai_token_type=\"output\""]
        )
        .unwrap()
            >= 12.0,
        "the two tokens it got count too: {left}"
    );

    // Every RPC is timed with its service, method and (for a refusal) status code.
    let generate = [
        "rpc_service=\"modeld.v1.Generate\"",
        "rpc_method=\"Generate\"",
    ];
    let count = sample(&after, "rpc_server_call_duration_seconds_count", &generate).unwrap();
    assert!(count >= 2.0, "{after}");
    client.get_model("no-such-model").await.unwrap_err();
    let refused = scrape(metrics);
    let not_found = ["rpc_method=\"GetModel\"", "rpc_grpc_status_code=\"5\""];
    assert_eq!(
        sample(
            &refused,
            "rpc_server_call_duration_seconds_count",
            &not_found
        ),
        Some(1.0),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_on_a_network_address_need_insecure() {
    let out = std::process::Command::new(modeld_e2e::binary("modeld"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "0.0.0.0:0"])
        .arg("--data-dir")
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to serve metrics"));
}
