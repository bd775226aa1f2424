//! Engines in their own processes: a model's engine process dies (kill -9 from
//! outside, or an abort inside the runtime) and the agent ends that model's requests
//! with ENGINE_CRASHED naming the signal, records FAILED, tells watchers, and serves
//! everything else; a pinned model comes back by itself until the crash-loop limit;
//! the engine process reads nothing but what it needs; and in-process engines, kept
//! for platforms that cannot start processes, give the same tokens.
//!
//! The abort comes from a test hook compiled only into test builds
//! (`engine-test-hooks`): no real model makes llama.cpp abort on demand.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use modeld_e2e::{Agent, AgentOptions, Assets, Client, gguf_spec, pb, reason};
use tokio_stream::StreamExt;
use tonic::Code;

async fn register(client: &Client, id: &str) {
    let url = format!("file://{}", Assets::get().gguf.display());
    client.register_model(gguf_spec(id, &url)).await.unwrap();
    client.pull_to_end(id).await.unwrap();
}

fn greedy(id: &str, prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model_id: id.into(),
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        max_tokens,
        ignore_eos: true,
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How a generation failed: a status before the stream started, or the summary's
/// error fields once it had.
#[derive(Debug)]
struct Failed {
    code: Code,
    reason: String,
    message: String,
}

impl From<tonic::Status> for Failed {
    fn from(s: tonic::Status) -> Failed {
        Failed {
            code: s.code(),
            reason: reason(&s),
            message: s.message().to_owned(),
        }
    }
}

/// Reads a generation to its end: the text, or how it failed.
async fn finish(mut stream: tonic::Streaming<pb::GenerateResponse>) -> Result<String, Failed> {
    let mut text = String::new();
    while let Some(msg) = stream.next().await {
        match msg?.event {
            Some(pb::generate_response::Event::Token(t)) => text.push_str(&t.text),
            Some(pb::generate_response::Event::Summary(s))
                if s.finish_reason() == pb::FinishReason::Error =>
            {
                return Err(Failed {
                    code: Code::from(s.error_code),
                    reason: s.error_reason,
                    message: s.error,
                });
            }
            _ => {}
        }
    }
    Ok(text)
}

async fn generate(client: &Client, request: pb::GenerateRequest) -> Result<String, Failed> {
    let stream = client.generate().generate(request).await?.into_inner();
    finish(stream).await
}

async fn loaded(client: &Client, id: &str) -> pb::LoadedModel {
    client
        .list_loaded()
        .await
        .unwrap()
        .models
        .into_iter()
        .find(|m| m.model_id == id)
        .unwrap_or_else(|| panic!("{id} is not loaded"))
}

async fn failure(client: &Client, id: &str) -> pb::FailureInfo {
    let state = client.state(id, 0).await.unwrap();
    assert_eq!(state.state(), pb::ModelState::Failed, "{state:?}");
    state.failure.unwrap()
}

async fn watch(client: &Client, id: &str) -> tonic::Streaming<pb::WatchResponse> {
    let since = client
        .state(id, 0)
        .await
        .unwrap()
        .history
        .last()
        .unwrap()
        .revision;
    client
        .lifecycle()
        .watch(pb::WatchRequest {
            model_id: id.into(),
            since_revision: since,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next watch event that enters `state`.
async fn next_entering(
    events: &mut tonic::Streaming<pb::WatchResponse>,
    state: pb::ModelState,
) -> pb::StateTransition {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("an event within a minute")
            .unwrap()
            .unwrap();
        let t = event.transition.unwrap();
        if t.to_state() == state {
            return t;
        }
    }
}

#[tokio::test]
async fn kill_9_of_an_engine_process_mid_stream_ends_only_its_model() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    register(&client, "victim").await;
    register(&client, "bystander").await;
    client.load_to_end("victim", None).await.unwrap();
    client.load_to_end("bystander", None).await.unwrap();

    // Each model in its own process, measured rather than estimated.
    let victim = loaded(&client, "victim").await;
    let bystander = loaded(&client, "bystander").await;
    let pid = victim.engine_process_id;
    assert!(pid != 0 && pid != agent.pid() && pid != bystander.engine_process_id);
    assert!(victim.memory_measured);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb = modeld_e2e::rss_bytes(pid) / 1024;
    // The same process, read a moment apart: within a quarter of each other.
    let reported = victim.actual_memory_bytes / 1024;
    assert!(
        reported.abs_diff(rss_kb) < rss_kb / 4,
        "ListLoaded says {reported} kB, /proc says {rss_kb} kB"
    );
    assert!(victim.proportional_memory_bytes > 0);
    assert!(victim.proportional_memory_bytes <= victim.actual_memory_bytes);
    assert!(
        status.lines().any(|l| l == "NoNewPrivs:\t1"),
        "the engine process runs with no_new_privs:\n{status}"
    );

    let mut events = watch(&client, "victim").await;
    let mut stream = client
        .generate()
        .generate(greedy("victim", "Tell me a long story.", 2000))
        .await
        .unwrap()
        .into_inner();
    // Tokens flow; then the process is killed under the stream.
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(pb::generate_response::Event::Token(_))
    ));
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let ended = finish(stream).await.unwrap_err();
    assert_eq!(ended.code, Code::Unavailable, "{ended:?}");
    assert_eq!(ended.reason, "ENGINE_CRASHED");
    assert!(ended.message.contains("SIGKILL"), "{}", ended.message);
    assert!(ended.message.contains("\"victim\""), "{}", ended.message);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the stream ended at once"
    );

    // Watchers hear it, with the stage and reason recorded.
    let failed = next_entering(&mut events, pb::ModelState::Failed).await;
    let info = failed.failure.unwrap();
    assert_eq!(info.stage(), pb::LifecycleStage::Serve);
    assert_eq!(info.reason, "ENGINE_CRASHED");
    assert_eq!(failure(&client, "victim").await.reason, "ENGINE_CRASHED");
    let refused = generate(&client, greedy("victim", "Hi", 2))
        .await
        .unwrap_err();
    assert_eq!(refused.code, Code::FailedPrecondition, "{refused:?}");

    // Everything else serves on.
    assert!(client.is_serving().await.unwrap());
    let answer = generate(&client, greedy("bystander", "The capital of France is", 4)).await;
    assert!(!answer.unwrap().is_empty());
    assert!(
        client
            .list_loaded()
            .await
            .unwrap()
            .models
            .iter()
            .all(|m| m.model_id != "victim")
    );

    // The next Load starts a fresh process.
    client.load_to_end("victim", None).await.unwrap();
    let again = loaded(&client, "victim").await;
    assert!(again.engine_process_id != 0 && again.engine_process_id != pid);
    assert!(
        !generate(&client, greedy("victim", "Hello", 4))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn an_engine_that_aborts_fails_its_model_with_the_signal_and_the_agent_serves_on() {
    let agent = Agent::start_with(AgentOptions {
        env: vec![("MODELD_ENGINE_TEST_HOOK".into(), "abort-on-generate".into())],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    register(&client, "smol").await;
    client.load_to_end("smol", None).await.unwrap();

    let ended = generate(&client, greedy("smol", "Hi", 8))
        .await
        .unwrap_err();
    assert_eq!(ended.code, Code::Unavailable, "{ended:?}");
    assert_eq!(ended.reason, "ENGINE_CRASHED");
    assert!(ended.message.contains("SIGABRT"), "{}", ended.message);

    let failed = failure(&client, "smol").await;
    assert_eq!(failed.reason, "ENGINE_CRASHED");
    assert!(failed.message.contains("SIGABRT"), "{}", failed.message);
    assert!(client.is_serving().await.unwrap());
    assert!(client.capabilities().await.is_ok());
    // Not pinned: it waits for an operator, and a Load brings it back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(failure(&client, "smol").await.reason, "ENGINE_CRASHED");
    client.load_to_end("smol", None).await.unwrap();
}

#[tokio::test]
async fn an_engine_that_dies_while_loading_fails_the_load_and_nothing_else() {
    let agent = Agent::start_with(AgentOptions {
        env: vec![("MODELD_ENGINE_TEST_HOOK".into(), "abort-on-load".into())],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    register(&client, "smol").await;
    let refused = client.load_to_end("smol", None).await.unwrap_err();
    let status = refused.status().unwrap();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(status), "ENGINE_CRASHED");
    assert!(status.message().contains("SIGABRT") && status.message().contains("while loading"));
    let failed = failure(&client, "smol").await;
    assert_eq!(failed.stage(), pb::LifecycleStage::Load);
    assert_eq!(failed.reason, "ENGINE_CRASHED");
    assert!(client.is_serving().await.unwrap());
    assert!(client.list_loaded().await.unwrap().models.is_empty());
}

#[tokio::test]
async fn a_pinned_model_restarts_after_crashes_until_the_crash_loop_limit() {
    // Each engine process aborts 300 ms after its model loads.
    let agent = Agent::start_with(AgentOptions {
        env: vec![("MODELD_ENGINE_TEST_HOOK".into(), "abort-after-load".into())],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    register(&client, "smol").await;
    let mut events = watch(&client, "smol").await;
    client
        .load_to_end(
            "smol",
            Some(pb::LoadOptions {
                pin: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();

    // Crash, restart (1 s), crash, restart (2 s), crash: the third crash within the
    // window stops the restarts.
    // Every FAILED and READY from here on, in order.
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("FAILED ENGINE_CRASH_LOOP") {
        let event = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("an event within a minute")
            .unwrap()
            .unwrap();
        let t = event.transition.unwrap();
        match t.to_state() {
            pb::ModelState::Ready => seen.push("READY".to_owned()),
            pb::ModelState::Failed => seen.push(format!("FAILED {}", t.failure.unwrap().reason)),
            _ => continue,
        }
        assert!(seen.len() < 20, "restarts never stopped: {seen:?}");
    }
    assert_eq!(
        seen,
        [
            "READY",
            "FAILED ENGINE_CRASHED",
            "READY",
            "FAILED ENGINE_CRASHED",
            "READY",
            "FAILED ENGINE_CRASHED",
            "FAILED ENGINE_CRASH_LOOP"
        ]
    );
    let restarts = seen.iter().filter(|s| *s == "READY").count() - 1;
    assert_eq!(
        restarts, 2,
        "limit 3 crashes: two restarts, then it stays FAILED"
    );
    let info = failure(&client, "smol").await;
    assert_eq!(info.reason, "ENGINE_CRASH_LOOP");
    assert!(info.message.contains("load it again"), "{}", info.message);

    // It stays down: no restart after the longest backoff there would be.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(failure(&client, "smol").await.reason, "ENGINE_CRASH_LOOP");
    assert!(client.list_loaded().await.unwrap().models.is_empty());
    assert!(client.is_serving().await.unwrap());

    // An operator's Load is the action it waits for.
    client.load_to_end("smol", None).await.unwrap();
}

#[tokio::test]
async fn the_engine_process_cannot_read_outside_its_model() {
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "the agent's tokens").unwrap();
    let agent = Agent::start_with(AgentOptions {
        env: vec![(
            "MODELD_ENGINE_TEST_HOOK".into(),
            format!("read-on-generate:{}", secret.path().display()),
        )],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    register(&client, "smol").await;
    client.load_to_end("smol", None).await.unwrap();
    // The hook reads the file from inside the engine process, after it confined
    // itself, and fails the generation with what it got.
    let refused = generate(&client, greedy("smol", "Hi", 2))
        .await
        .unwrap_err();
    let log = agent.log();
    if log.contains("this kernel has no Landlock") {
        eprintln!("SKIPPED: this kernel has no Landlock");
        return;
    }
    assert_eq!(refused.reason, "INFERENCE_FAILED", "{refused:?}");
    assert!(
        refused.message.contains("PermissionDenied"),
        "{}\n{log}",
        refused.message
    );
    // The agent itself reads it fine: the restriction is the engine's alone.
    assert!(std::fs::read(secret.path()).is_ok());
    assert!(log.contains("landlock, read-only to"), "{log}");
    // And the model is still whole: the next request (same hook) is refused the
    // same way, not crashed.
    let again = generate(&client, greedy("smol", "Hi", 2))
        .await
        .unwrap_err();
    assert_eq!(again.reason, refused.reason);
}

#[tokio::test]
async fn in_process_engines_give_the_same_tokens_as_engine_processes() {
    let isolated = Agent::start().await;
    let inside = Agent::start_with(AgentOptions {
        args: vec!["--engine-isolation".into(), "in-process".into()],
        ..Default::default()
    })
    .await;
    let mut texts = Vec::new();
    for agent in [&isolated, &inside] {
        let client = agent.client().await;
        register(&client, "smol").await;
        client.load_to_end("smol", None).await.unwrap();
        texts.push(
            generate(&client, greedy("smol", "The capital of France is", 16))
                .await
                .unwrap(),
        );
        let tokens = client
            .generate()
            .tokenize(pb::TokenizeRequest {
                model_id: "smol".into(),
                text: "<|im_start|>user\nHi<|im_end|>".into(),
                parse_special: true,
                add_special_tokens: true,
            })
            .await
            .unwrap()
            .into_inner();
        texts.push(format!("{:?} {:?}", tokens.token_ids, tokens.pieces));
    }
    assert_eq!(texts[0], texts[2], "greedy text, process vs in-process");
    assert_eq!(texts[1], texts[3], "tokenizer, process vs in-process");
    assert!(!texts[0].is_empty());

    let inside_client = inside.client().await;
    let m = loaded(&inside_client, "smol").await;
    assert_eq!(m.engine_process_id, 0, "in-process: no engine process");
    assert!(!m.memory_measured);
    // Inside the agent, unloading gives the agent's own memory back.
    let before = modeld_e2e::rss_bytes(inside.pid());
    inside_client.unload("smol", None).await.unwrap();
    let after = modeld_e2e::rss_bytes(inside.pid());
    assert!(
        after + 64 * 1024 * 1024 < before,
        "RSS {before} before unload, {after} after"
    );
}
