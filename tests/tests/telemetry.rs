//! Traces and metrics over OTLP to a real receiver, Prometheus text read by a real
//! parser, and progress for every watcher: from a real agent that downloads, loads
//! and runs the real model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use modeld_e2e::otlp::{ReceivedSpan, Receiver};
use modeld_e2e::{Agent, AgentOptions, Assets, gguf_spec, model_server};
use modeld_proto::v1 as pb;
use tokio_stream::StreamExt as _;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const LOAD_PARENT: &str = "00f067aa0ba902b7";
const GENERATE_PARENT: &str = "00f067aa0ba902b8";

fn traced<T>(message: T, parent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{parent}-01").parse().unwrap(),
    );
    request
}

/// Generates greedily from "The capital of France is" through the raw stub, in the
/// trace of `parent` when given; returns the usage the summary reported.
async fn generate(
    channel: tonic::transport::Channel,
    max_tokens: u32,
    parent: Option<&str>,
) -> pb::Usage {
    let message = pb::GenerateRequest {
        model_id: "smol".into(),
        input: Some(pb::generate_request::Input::Prompt(
            "The capital of France is".into(),
        )),
        max_tokens,
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let request = match parent {
        Some(p) => traced(message, p),
        None => tonic::Request::new(message),
    };
    let mut stream = pb::generate_client::GenerateClient::new(channel)
        .generate(request)
        .await
        .unwrap()
        .into_inner();
    let mut usage = None;
    while let Some(message) = stream.next().await {
        if let Some(pb::generate_response::Event::Summary(s)) = message.unwrap().event {
            usage = s.usage;
        }
    }
    let usage = usage.expect("a summary with usage");
    assert!(usage.generated_tokens > 0);
    usage
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// Every span between `span` and the root, `span` first.
fn ancestry<'a>(spans: &'a [ReceivedSpan], span: &'a ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut out = vec![span];
    let mut at = span;
    while let Some(parent) = by_id.get(at.parent_span_id.as_str()) {
        out.push(parent);
        at = parent;
    }
    out
}

fn sum(points: &[modeld_e2e::otlp::Point], want: &[(&str, &str)]) -> f64 {
    points
        .iter()
        .filter(|p| {
            want.iter()
                .all(|(k, v)| p.attributes.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|p| p.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_and_a_generate_export_spans_in_the_callers_trace_and_metrics_over_otlp() {
    let assets = Assets::get();
    let size = std::fs::metadata(&assets.gguf).unwrap().len();
    let (_files, server) = model_server(&assets).await;
    let receiver = Receiver::start().await;
    let agent = Agent::start_with(AgentOptions {
        args: vec![
            "--otlp-endpoint".into(),
            receiver.url(),
            "--otlp-export-interval-ms".into(),
            "300".into(),
            "--otlp-header".into(),
            "x-collector-key=sekrit-value".into(),
            "--resource-attribute".into(),
            "deployment.environment=e2e".into(),
            "--site".into(),
            "lab".into(),
        ],
        // The standard variable the batch span processor reads.
        env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())],
        ..AgentOptions::default()
    })
    .await;
    let channel = tonic::transport::Channel::from_shared(agent.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let node_id = pb::node_client::NodeClient::new(channel.clone())
        .get_capabilities(pb::GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .node_id;
    pb::model_registry_client::ModelRegistryClient::new(channel.clone())
        .register_model(pb::RegisterModelRequest {
            spec: Some(gguf_spec("smol", &server.url("smol.gguf"))),
        })
        .await
        .unwrap();

    let mut load = pb::lifecycle_client::LifecycleClient::new(channel.clone())
        .load(traced(
            pb::LoadRequest {
                model_id: "smol".into(),
                options: None,
            },
            LOAD_PARENT,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut loaded = false;
    while let Some(message) = load.next().await {
        loaded |= message.unwrap().loaded.is_some();
    }
    assert!(loaded, "the Load ended without its model");

    let usage = generate(channel.clone(), 6, Some(GENERATE_PARENT)).await;

    // --- Traces -------------------------------------------------------------------
    let spans = receiver
        .wait_for("decode span", Duration::from_secs(20), |r| {
            let spans = r.spans();
            let done = ["modeld.v1.Lifecycle/Load", "load_model", "load", "decode"]
                .iter()
                .all(|n| spans.iter().any(|s| s.name == *n));
            done.then_some(spans)
        })
        .await;
    let rpc = |method: &str| {
        spans
            .iter()
            .find(|s| s.name == format!("modeld.v1.{method}"))
            .unwrap_or_else(|| panic!("no span for {method}: {spans:#?}"))
    };
    let load_rpc = rpc("Lifecycle/Load");
    assert_eq!(load_rpc.trace_id, TRACE_ID, "the caller's trace continues");
    assert_eq!(load_rpc.parent_span_id, LOAD_PARENT);
    assert_eq!(load_rpc.attributes["rpc.system"], "grpc");
    assert_eq!(load_rpc.attributes["rpc.service"], "modeld.v1.Lifecycle");
    assert_eq!(load_rpc.attributes["rpc.method"], "Load");
    assert_eq!(load_rpc.attributes["rpc.grpc.status_code"], "0");
    assert!(!load_rpc.attributes["request_id"].is_empty());
    assert_eq!(load_rpc.resource["service.name"], "modeld");
    assert_eq!(load_rpc.resource["service.instance.id"], node_id);
    assert_eq!(load_rpc.resource["deployment.environment"], "e2e");
    assert_eq!(load_rpc.resource["modeld.site"], "lab");
    assert!(load_rpc.resource.contains_key("modeld.device.class"));

    // Each stage of the Load is a span inside the Load RPC's.
    for stage in [
        "load_model",
        "transfer",
        "download",
        "validate",
        "initialize",
        "load",
    ] {
        let found = named(&spans, stage);
        assert_eq!(found.len(), 1, "one {stage} span: {spans:#?}");
        let chain = ancestry(&spans, found[0]);
        assert!(
            chain.iter().any(|s| s.span_id == load_rpc.span_id),
            "{stage} runs inside the Load RPC: {chain:#?}"
        );
        assert_eq!(found[0].trace_id, TRACE_ID);
        assert!(found[0].end_unix_nano >= found[0].start_unix_nano);
    }
    let download = named(&spans, "download")[0];
    assert_eq!(download.attributes["bytes"], size.to_string());
    assert_eq!(download.attributes["source_kind"], "origin");
    assert_eq!(download.attributes["source"], server.url("smol.gguf"));
    assert_eq!(download.attributes["file"], "model.gguf");

    let generate_rpc = rpc("Generate/Generate");
    assert_eq!(generate_rpc.trace_id, TRACE_ID);
    assert_eq!(generate_rpc.parent_span_id, GENERATE_PARENT);
    // The RPC's span lasts until the stream's end: it holds the whole generation.
    let generation = spans
        .iter()
        .find(|s| s.name == "generate smol")
        .expect("a generate span");
    assert_eq!(generation.parent_span_id, generate_rpc.span_id);
    assert!(generate_rpc.end_unix_nano >= generation.end_unix_nano);
    assert_eq!(
        generation.attributes["gen_ai.usage.output_tokens"],
        usage.generated_tokens.to_string()
    );
    assert_eq!(
        generation.attributes["gen_ai.usage.input_tokens"],
        usage.prompt_tokens.to_string()
    );
    assert_eq!(generation.attributes["gen_ai.request.model"], "smol");
    assert_eq!(
        generation.attributes["gen_ai.response.finish_reasons"],
        "length"
    );
    let phase = |name: &str| {
        let found = named(&spans, name);
        assert_eq!(found.len(), 1, "one {name} span");
        assert_eq!(
            found[0].parent_span_id, generation.span_id,
            "{name} is a phase of the generation"
        );
        found[0].clone()
    };
    let (queue, prefill, decode) = (phase("queue"), phase("prefill"), phase("decode"));
    assert!(queue.end_unix_nano <= prefill.start_unix_nano + 1);
    assert!(prefill.end_unix_nano <= decode.start_unix_nano + 1);
    assert!(decode.end_unix_nano >= decode.start_unix_nano);
    assert_eq!(
        decode.attributes["gen_ai.usage.output_tokens"],
        usage.generated_tokens.to_string()
    );
    assert_eq!(
        prefill.attributes["gen_ai.usage.input_tokens"],
        usage.prompt_tokens.to_string()
    );

    // Log lines name the trace.
    assert!(
        agent.log().contains(TRACE_ID),
        "log lines inside the RPC carry its trace id"
    );

    // --- Metrics ------------------------------------------------------------------
    let model = ("gen_ai.request.model", "smol");
    let tokens = receiver
        .wait_for("token counts", Duration::from_secs(20), |r| {
            let points = r.metric("modeld.generate.tokens");
            (sum(&points, &[model, ("gen_ai.token.type", "output")]) > 0.0).then_some(points)
        })
        .await;
    assert_eq!(
        sum(&tokens, &[model, ("gen_ai.token.type", "output")]),
        f64::from(usage.generated_tokens)
    );
    assert_eq!(
        sum(&tokens, &[model, ("gen_ai.token.type", "input")]),
        f64::from(usage.prompt_tokens)
    );
    assert_eq!(tokens[0].resource["service.instance.id"], node_id);
    let downloaded = receiver.metric("modeld.download.received");
    assert_eq!(
        sum(&downloaded, &[("modeld.source.kind", "origin")]),
        size as f64,
        "bytes downloaded equal the file's size"
    );
    assert_eq!(downloaded[0].unit, "By");
    let loads = receiver.metric("modeld.loads");
    assert_eq!(
        sum(
            &loads,
            &[
                model,
                ("modeld.load.result", "ok"),
                ("modeld.runtime", "llama.cpp")
            ]
        ),
        1.0
    );
    let stages = receiver.metric("modeld.load.stage.duration");
    for stage in ["download", "validate", "initialize", "load"] {
        let point = stages
            .iter()
            .find(|p| p.attributes.get("modeld.load.stage").map(String::as_str) == Some(stage))
            .unwrap_or_else(|| panic!("no {stage} duration: {stages:#?}"));
        assert_eq!(point.count, 1);
        assert_eq!(point.unit, "s");
    }
    let ttft = receiver.metric("gen_ai.server.time_to_first_token");
    assert_eq!(ttft.iter().map(|p| p.count).sum::<u64>(), 1);
    assert!((ttft[0].value - usage.time_to_first_token_seconds).abs() < 1e-9);
    let requests = receiver.metric("modeld.generate.requests");
    assert_eq!(
        sum(
            &requests,
            &[model, ("gen_ai.response.finish_reason", "length")]
        ),
        1.0
    );
    let loaded = receiver.metric("modeld.models.loaded");
    assert_eq!(loaded[0].value, 1.0);
    let budget = receiver.metric("modeld.memory.budget");
    assert!(budget[0].value > 0.0);
    let rss = receiver.metric("process.memory.usage");
    assert!(rss[0].value > 0.0);
    let bandwidth = receiver
        .wait_for("memory bandwidth", Duration::from_secs(20), |r| {
            let p = r.metric("modeld.memory.bandwidth");
            (!p.is_empty()).then_some(p)
        })
        .await;
    assert!(bandwidth[0].value > 1e8, "{bandwidth:?}");
    let decode_rate = receiver.metric("modeld.decode.bandwidth");
    if usage.generated_tokens > 1 {
        let expected = usage.generation_tokens_per_second;
        assert!(
            decode_rate[0].value > 0.0 && expected > 0.0,
            "{decode_rate:?}"
        );
    }
    // Every export carried the configured header.
    let headers = receiver.headers();
    assert!(!headers.is_empty());
    assert!(
        headers
            .iter()
            .all(|h| h.get("x-collector-key").map(String::as_str) == Some("sekrit-value"))
    );
    assert!(
        !agent.log().contains("sekrit-value"),
        "header values are never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopping_agent_flushes_what_it_buffered() {
    let receiver = Receiver::start().await;
    let mut agent = Agent::start_with(AgentOptions {
        // The standard variables alone turn export on; the defaults (a 5 s batch
        // delay, a 60 s metric interval) would hold everything past this test.
        env: vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.url())],
        ..AgentOptions::default()
    })
    .await;
    let client = agent.client().await;
    client.get_model("no-such-model").await.unwrap_err();
    let status = agent.terminate();
    assert!(status.success(), "{status:?}");
    let spans = receiver.spans();
    let refused = spans
        .iter()
        .find(|s| s.name == "modeld.v1.ModelRegistry/GetModel")
        .unwrap_or_else(|| panic!("the GetModel span was flushed at shutdown: {spans:#?}"));
    assert_eq!(refused.attributes["rpc.grpc.status_code"], "5");
    let durations = receiver.metric("rpc.server.call.duration");
    assert!(
        durations
            .iter()
            .any(|p| p.attributes.get("rpc.method").map(String::as_str) == Some("GetModel")),
        "{durations:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_sees_progress_of_a_load_another_client_started() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    // About 3 s for the file: long enough for several reports.
    let size = std::fs::metadata(&assets.gguf).unwrap().len();
    server.throttle("smol.gguf", size / 3);
    let agent = Agent::start().await;
    let client = agent.client().await;
    client
        .register_model(gguf_spec("smol", &server.url("smol.gguf")))
        .await
        .unwrap();
    let channel = tonic::transport::Channel::from_shared(agent.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut lifecycle = pb::lifecycle_client::LifecycleClient::new(channel);
    let mut watch = lifecycle
        .watch(pb::WatchRequest {
            model_id: "smol".into(),
            since_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let loader = tokio::spawn(async move { client.load_to_end("smol", None).await });
    let mut progress = Vec::new();
    let mut ready = false;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(60), watch.next()).await {
        let event = event.unwrap();
        let t = event.transition.clone().unwrap();
        if event.kind == pb::WatchEventKind::Progress as i32 {
            assert_eq!(t.from_state, t.to_state, "progress stays within a state");
            assert_eq!(t.to_state, pb::ModelState::Downloading as i32);
            let time = t.time.unwrap();
            let millis = time.seconds * 1000 + i64::from(time.nanos) / 1_000_000;
            progress.push((t.progress, millis, event.revision));
        }
        if t.to_state == pb::ModelState::Ready as i32 {
            ready = true;
            break;
        }
    }
    assert!(ready, "the watcher saw the model become ready");
    loader.await.unwrap().unwrap();
    assert!(
        progress.len() >= 3,
        "several progress reports: {progress:?}"
    );
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress only grows: {progress:?}"
    );
    assert_eq!(
        progress.last().unwrap().0,
        1.0,
        "the last report closes the download"
    );
    // At most a few per second: reports at least 1/4 s apart, except the closing one.
    for w in progress[..progress.len() - 1].windows(2) {
        assert!(w[1].1 - w[0].1 >= 240, "rate-limited: {progress:?}");
    }
    // Progress is not history: a replay from the start holds none.
    let mut lifecycle = pb::lifecycle_client::LifecycleClient::new(
        tonic::transport::Channel::from_shared(agent.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let mut replay = lifecycle
        .watch(pb::WatchRequest {
            model_id: "smol".into(),
            since_revision: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut replayed = Vec::new();
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(500), replay.next()).await
    {
        replayed.push(event.unwrap().kind);
    }
    assert!(!replayed.is_empty());
    assert!(
        !replayed.contains(&(pb::WatchEventKind::Progress as i32)),
        "{replayed:?}"
    );
}

/// A free loopback port.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_text_parses_with_the_reference_parser_and_matches_the_rpcs() {
    let assets = Assets::get();
    let size = std::fs::metadata(&assets.gguf).unwrap().len();
    let (_files, server) = model_server(&assets).await;
    let metrics = free_port();
    let agent = Agent::start_with(AgentOptions {
        args: vec!["--metrics-listen".into(), metrics.to_string()],
        ..AgentOptions::default()
    })
    .await;
    let client = agent.client().await;
    client
        .register_model(gguf_spec("smol", &server.url("smol.gguf")))
        .await
        .unwrap();
    client.load_to_end("smol", None).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(agent.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let usage = generate(channel, 4, None).await;
    let (generated, prompt) = (usage.generated_tokens, usage.prompt_tokens);

    // The reference parser (prometheus_client) reads the page; the script prints the
    // samples it found as JSON.
    let script = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode()
out = {}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        key = s.name + json.dumps(dict(sorted(s.labels.items())), sort_keys=True)
        out[key] = s.value
    out["type:" + family.name] = family.type
print(json.dumps(out))
"#;
    let run = std::process::Command::new(&assets.python)
        .args(["-c", script, &metrics.to_string()])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let samples: HashMap<String, serde_json::Value> = serde_json::from_slice(&run.stdout).unwrap();
    let find = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{name}{{")))
            .filter(|(k, _)| {
                labels
                    .iter()
                    .all(|(lk, lv)| k.contains(&format!("\"{lk}\": \"{lv}\"")))
            })
            .map(|(_, v)| v.as_f64().unwrap())
            .sum()
    };
    let model = ("gen_ai_request_model", "smol");
    assert_eq!(
        find(
            "modeld_generate_tokens_total",
            &[model, ("gen_ai_token_type", "output")]
        ),
        f64::from(generated)
    );
    assert_eq!(
        find(
            "modeld_generate_tokens_total",
            &[model, ("gen_ai_token_type", "input")]
        ),
        f64::from(prompt)
    );
    assert_eq!(
        find(
            "modeld_download_received_bytes_total",
            &[("modeld_source_kind", "origin")]
        ),
        size as f64
    );
    assert_eq!(
        find("modeld_loads_total", &[model, ("modeld_load_result", "ok")]),
        1.0
    );
    assert_eq!(find("modeld_models_loaded", &[]), 1.0);
    assert_eq!(
        find("gen_ai_server_time_to_first_token_seconds_count", &[model]),
        1.0
    );
    assert!(find("modeld_memory_models_bytes", &[model]) > 0.0);
    assert!(find("modeld_memory_models_estimated_bytes", &[model]) > 0.0);
    assert!(find("process_memory_usage_bytes", &[]) > 0.0);
    assert_eq!(
        find("modeld_generate_in_flight", &[model]),
        0.0,
        "nothing runs after the request"
    );
    assert_eq!(
        samples["type:gen_ai_server_time_to_first_token_seconds"],
        "histogram"
    );
    assert_eq!(samples["type:modeld_download_received_bytes"], "counter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eviction_is_a_span_with_its_reason_and_is_counted() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    let receiver = Receiver::start().await;
    let agent = Agent::start_with(AgentOptions {
        args: vec![
            "--otlp-endpoint".into(),
            receiver.url(),
            "--otlp-export-interval-ms".into(),
            "300".into(),
        ],
        env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())],
        ..AgentOptions::default()
    })
    .await;
    let client = agent.client().await;
    client
        .register_model(gguf_spec("smol", &server.url("smol.gguf")))
        .await
        .unwrap();
    client
        .load_to_end(
            "smol",
            Some(pb::LoadOptions {
                keep_alive: Some(modeld_proto::pbjson_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    // The keep-alive runs out: the reaper evicts the idle model.
    let evictions = receiver
        .wait_for("eviction count", Duration::from_secs(20), |r| {
            let p = r.metric("modeld.evictions");
            (!p.is_empty()).then_some(p)
        })
        .await;
    assert_eq!(
        sum(
            &evictions,
            &[
                ("gen_ai.request.model", "smol"),
                ("modeld.eviction.reason", "idle")
            ]
        ),
        1.0
    );
    let evict = receiver
        .wait_for("evict span", Duration::from_secs(30), |r| {
            r.spans().into_iter().find(|s| s.name == "evict")
        })
        .await;
    assert_eq!(evict.attributes["model"], "smol");
    assert_eq!(evict.attributes["reason"], "idle");
    assert!(
        evict.attributes["detail"].contains("keep-alive"),
        "{evict:?}"
    );
    assert!(client.list_loaded().await.unwrap().models.is_empty());
}
