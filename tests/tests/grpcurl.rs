//! The real grpcurl, knowing nothing but what reflection tells it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use modeld_e2e::{Agent, Assets};

fn grpcurl(
    assets: &Assets,
    agent: &Agent,
    data: Option<&str>,
    args: &[&str],
) -> (bool, String, String) {
    let mut cmd = Command::new(&assets.grpcurl);
    cmd.arg("-plaintext");
    if let Some(d) = data {
        cmd.args(["-d", d]);
    }
    let out = cmd
        .arg(agent.addr.to_string())
        .args(args)
        .output()
        .expect("run grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_through_reflection_alone() {
    let assets = Assets::get();
    let agent = Agent::start().await;

    let (ok, list, err) = grpcurl(&assets, &agent, None, &["list"]);
    assert!(ok, "{err}");
    for service in [
        "modeld.v1.ModelRegistry",
        "modeld.v1.Storage",
        "modeld.v1.Lifecycle",
        "modeld.v1.Generate",
        "modeld.v1.Node",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            list.lines().any(|l| l == service),
            "{service} missing from:\n{list}"
        );
    }

    let (ok, methods, err) = grpcurl(&assets, &agent, None, &["list", "modeld.v1.ModelRegistry"]);
    assert!(ok, "{err}");
    for m in [
        "ListModels",
        "GetModel",
        "RegisterModel",
        "UpdateModel",
        "DeleteModel",
        "ImportCatalog",
        "ScanModels",
        "CheckCompatibility",
    ] {
        assert!(
            methods.contains(&format!("modeld.v1.ModelRegistry.{m}")),
            "{m} missing:\n{methods}"
        );
    }

    let (ok, described, err) = grpcurl(&assets, &agent, None, &["describe", "modeld.v1.ModelSpec"]);
    assert!(ok, "{err}");
    assert!(
        described.contains("repeated .modeld.v1.ModelFile files"),
        "{described}"
    );

    let (ok, health, err) = grpcurl(&assets, &agent, None, &["grpc.health.v1.Health/Check"]);
    assert!(ok, "{err}");
    assert!(health.contains("SERVING"), "{health}");

    let (ok, got, err) = grpcurl(
        &assets,
        &agent,
        Some(r#"{"id":"smollm2-135m-instruct"}"#),
        &["modeld.v1.ModelRegistry/GetModel"],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(v["model"]["spec"]["format"], "MODEL_FORMAT_GGUF");
    assert_eq!(v["model"]["spec"]["files"][0]["sizeBytes"], "98362432");

    let register = r#"{"spec":{"id":"from-grpcurl","format":"MODEL_FORMAT_ONNX","files":[{"name":"m.onnx","urls":["https://h.example/m.onnx"],"sha256":"5555555555555555555555555555555555555555555555555555555555555555","sizeBytes":"12"}]}}"#;
    let (ok, _, err) = grpcurl(
        &assets,
        &agent,
        Some(register),
        &["modeld.v1.ModelRegistry/RegisterModel"],
    );
    assert!(ok, "{err}");
    let (ok, listed, err) = grpcurl(
        &assets,
        &agent,
        Some(r#"{"format":"MODEL_FORMAT_ONNX"}"#),
        &["modeld.v1.ModelRegistry/ListModels"],
    );
    assert!(ok, "{err}");
    assert!(
        listed.contains("from-grpcurl") && !listed.contains("smollm2"),
        "{listed}"
    );

    // grpcurl 1.8's dynamic messages take a FieldMask as an object of paths.
    let (ok, updated, err) = grpcurl(
        &assets,
        &agent,
        Some(
            r#"{"spec":{"id":"from-grpcurl","displayName":"Set by grpcurl"},"updateMask":{"paths":["display_name"]}}"#,
        ),
        &["modeld.v1.ModelRegistry/UpdateModel"],
    );
    assert!(ok, "{err}");
    assert!(
        updated.contains("Set by grpcurl") && updated.contains("\"generation\": \"2\""),
        "{updated}"
    );

    let (ok, caps, err) = grpcurl(&assets, &agent, None, &["modeld.v1.Node/GetCapabilities"]);
    assert!(ok, "{err}");
    assert!(caps.contains("\"nodeId\""), "{caps}");

    // Errors come back as gRPC statuses grpcurl can show.
    let (ok, _, err) = grpcurl(
        &assets,
        &agent,
        Some(r#"{"id":"nope"}"#),
        &["modeld.v1.ModelRegistry/GetModel"],
    );
    assert!(!ok);
    assert!(err.contains("NotFound") && err.contains("nope"), "{err}");
    // Their details resolve through reflection too, so grpcurl prints the reason and
    // the field at fault as JSON rather than as opaque bytes.
    assert!(!err.contains("is not recognized"), "{err}");
    let compact = err.replace(' ', "");
    assert!(
        compact.contains("\"@type\":\"type.googleapis.com/google.rpc.ErrorInfo\"")
            && compact.contains("\"reason\":\"MODEL_NOT_FOUND\"")
            && compact.contains("\"domain\":\"modeld\""),
        "{err}"
    );
    let (ok, _, err) = grpcurl(
        &assets,
        &agent,
        Some(r#"{"spec":{"format":"MODEL_FORMAT_GGUF"}}"#),
        &["modeld.v1.ModelRegistry/RegisterModel"],
    );
    assert!(!ok);
    let compact = err.replace(' ', "");
    assert!(
        err.contains("InvalidArgument")
            && compact.contains("\"@type\":\"type.googleapis.com/google.rpc.BadRequest\"")
            && compact.contains("\"field\":\"spec.id\""),
        "{err}"
    );
    let (ok, _, err) = grpcurl(
        &assets,
        &agent,
        Some(r#"{"model_id":"x"}"#),
        &["modeld.v1.Lifecycle/Load"],
    );
    assert!(!ok);
    assert!(err.contains("NotFound") && err.contains("\"x\""), "{err}");
    // Watch replays from a revision, then follows live events until the client's
    // deadline ends the stream.
    let out = Command::new(&assets.grpcurl)
        .args([
            "-plaintext",
            "-max-time",
            "2",
            "-d",
            r#"{"since_revision":"1"}"#,
        ])
        .arg(agent.addr.to_string())
        .arg("modeld.v1.Lifecycle/Watch")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DeadlineExceeded"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        events.iter().all(|e| e["revision"].as_str().is_some()),
        "{stdout}"
    );
}

/// Registers the real SmolLM2 GGUF as "smol" and pulls it, with grpcurl alone.
fn register_and_pull_smol(assets: &Assets, agent: &Agent) {
    let spec = serde_json::json!({
        "spec": {
            "id": "smol",
            "format": "MODEL_FORMAT_GGUF",
            "files": [{
                "name": "smol.gguf",
                "urls": [format!("file://{}", assets.gguf.display())],
                "sha256": modeld_e2e::SMOLLM2_SHA256,
                "size_bytes": modeld_e2e::SMOLLM2_SIZE,
            }],
        }
    });
    let call = |data: &str, method: &str| grpcurl(assets, agent, Some(data), &[method]);
    let (ok, _, err) = call(&spec.to_string(), "modeld.v1.ModelRegistry/RegisterModel");
    assert!(ok, "{err}");
    let (ok, _, err) = call(r#"{"model_id":"smol"}"#, "modeld.v1.Storage/Pull");
    assert!(ok, "{err}");
}

/// The README's walk-through: register, pull, load and generate with nothing but
/// grpcurl and JSON, on the real SmolLM2 GGUF.
#[tokio::test]
async fn grpcurl_pulls_loads_and_streams_a_generation() {
    let assets = Assets::get();
    let agent = Agent::start().await;
    register_and_pull_smol(&assets, &agent);
    let call = |data: &str, method: &str| grpcurl(&assets, &agent, Some(data), &[method]);
    let (ok, out, err) = call(r#"{"model_id":"smol"}"#, "modeld.v1.Lifecycle/Load");
    assert!(ok, "{err}");
    assert!(
        out.contains("MODEL_STATE_READY") && out.contains("LLAMA_CPP"),
        "{out}"
    );

    let (ok, out, err) = call(
        r#"{"model_id":"smol","chat":{"messages":[{"role":"CHAT_ROLE_USER","content":"Tell me the capital of France."}]},"sampling":{"temperature":0},"max_tokens":16}"#,
        "modeld.v1.Generate/Generate",
    );
    assert!(ok, "{err}");
    // grpcurl prints one JSON object per streamed message.
    let messages: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    let text: String = messages
        .iter()
        .filter_map(|m| m["token"]["text"].as_str())
        .collect();
    assert!(text.contains("Paris"), "{text}");
    let summary = &messages.last().unwrap()["summary"];
    assert_eq!(summary["finishReason"], "FINISH_REASON_STOP", "{out}");
    assert!(summary["usage"]["generatedTokens"].as_u64().unwrap() > 1);

    let (ok, out, err) = call(r#"{"model_id":"smol"}"#, "modeld.v1.Lifecycle/Unload");
    assert!(ok, "{err}");
    assert!(out.contains("MODEL_STATE_DOWNLOADED"), "{out}");
}

/// Node.Benchmark with nothing but grpcurl: measure both runtimes that can run a
/// GGUF, and see CheckCompatibility pick the faster.
#[cfg(feature = "candle")]
#[tokio::test]
async fn grpcurl_benchmarks_runtimes_and_the_selector_follows() {
    let assets = Assets::get();
    let agent = Agent::start().await;
    register_and_pull_smol(&assets, &agent);
    let call = |data: &str, method: &str| grpcurl(&assets, &agent, Some(data), &[method]);
    let mut speeds = Vec::new();
    for runtime in ["RUNTIME_LLAMA_CPP", "RUNTIME_CANDLE"] {
        let request = format!(
            r#"{{"model_id":"smol","runtime":"{runtime}","prompt_tokens":32,"generated_tokens":16,"repetitions":1}}"#
        );
        let (ok, out, err) = call(&request, "modeld.v1.Node/Benchmark");
        assert!(ok, "{err}");
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["runtime"], runtime, "{out}");
        let tps = r["generationTokensPerSecond"].as_f64().unwrap();
        assert!(tps > 0.0, "{out}");
        speeds.push((tps, runtime));
    }
    speeds.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (ok, out, err) = call(
        r#"{"id":"smol"}"#,
        "modeld.v1.ModelRegistry/CheckCompatibility",
    );
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["settings"]["runtime"], speeds[0].1, "{out}");
    // And says how fast: the fastest runtime's own measurement.
    assert_eq!(
        r["performance"]["source"], "ESTIMATE_SOURCE_MEASURED",
        "{out}"
    );
    assert_eq!(r["performance"]["runtime"], speeds[0].1, "{out}");
    assert_eq!(
        r["performance"]["generationTokensPerSecond"].as_f64(),
        Some(speeds[0].0),
        "{out}"
    );
}

#[tokio::test]
async fn every_rpc_answers_with_its_request_id() {
    let assets = Assets::get();
    let agent = Agent::start().await;
    let call = |extra: &[&str]| {
        let out = Command::new(&assets.grpcurl)
            .args(["-plaintext", "-v"])
            .args(extra)
            .arg(agent.addr.to_string())
            .arg("modeld.v1.Node/GetCapabilities")
            .output()
            .expect("run grpcurl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = call(&["-H", "x-request-id: req-from-grpcurl-7"]);
    assert!(out.contains("x-request-id: req-from-grpcurl-7"), "{out}");
    // Without one, the agent makes one up and says which.
    let out = call(&[]);
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no request id in:\n{out}"));
    assert_eq!(id.len(), 36, "a UUID: {id}");
}
