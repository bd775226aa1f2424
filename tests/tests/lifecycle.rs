//! The lifecycle state machine on real agents and the real SmolLM2 GGUF: every step
//! of a load recorded in order with its revision, refused transitions naming the
//! state, and Watch resuming by revision across a kill -9 and restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use modeld_e2e::{Agent, Assets, Client, gguf_spec, pb, reason};
use tokio_stream::StreamExt;
use tonic::Code;

fn path(history: &[pb::StateTransition]) -> Vec<(pb::ModelState, pb::ModelState)> {
    history
        .iter()
        .map(|t| (t.from_state(), t.to_state()))
        .collect()
}

async fn smol(agent: &Agent) -> Client {
    let client = agent.client().await;
    let url = format!("file://{}", Assets::get().gguf.display());
    client
        .register_model(gguf_spec("smol", &url))
        .await
        .unwrap();
    client
}

#[tokio::test]
async fn a_load_walks_every_stage_in_order_and_the_history_keeps_it() {
    use pb::ModelState::{
        Downloaded, Downloading, Initializing, Loading, Ready, Registered, Unloading, Unspecified,
        Validating,
    };
    let agent = Agent::start().await;
    let client = smol(&agent).await;
    client.pull_to_end("smol").await.unwrap();
    client.load_to_end("smol", None).await.unwrap();
    client.unload("smol", None).await.unwrap();
    let s = client.state("smol", 0).await.unwrap();
    assert_eq!(s.state(), Downloaded);
    assert_eq!(
        path(&s.history),
        vec![
            (Unspecified, Registered),
            (Registered, Downloading),
            (Downloading, Downloaded),
            (Downloaded, Validating),
            (Validating, Initializing),
            (Initializing, Loading),
            (Loading, Ready),
            (Ready, Unloading),
            (Unloading, Downloaded),
        ]
    );
    // Revisions only grow, and each transition has its time, stage and reason.
    for w in s.history.windows(2) {
        assert!(w[1].revision > w[0].revision);
        let (a, b) = (w[0].time.unwrap(), w[1].time.unwrap());
        assert!((b.seconds, b.nanos) >= (a.seconds, a.nanos));
    }
    let validating = &s.history[3];
    assert_eq!(validating.stage(), pb::LifecycleStage::Validate);
    assert!(!validating.reason.is_empty());
    assert!(s.failure.is_none());
}

#[tokio::test]
async fn refused_transitions_name_the_state_and_failures_are_recorded() {
    let agent = Agent::start().await;
    let client = smol(&agent).await;
    // Not loaded: Unload names where the model is.
    let err = client.unload("smol", None).await.unwrap_err();
    let err = err.status().unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("registered"), "{err:?}");

    // A corrupt GGUF fails VALIDATING with INVALID_ARGUMENT; the failure names the
    // stage and the code, and the agent serves on.
    let broken = Assets::get().fixtures.join("truncated.gguf");
    let bytes = std::fs::read(&broken).unwrap();
    use sha2::Digest;
    let mut spec = gguf_spec("broken", &format!("file://{}", broken.display()));
    spec.files[0].sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    spec.files[0].size_bytes = bytes.len() as u64;
    client.register_model(spec).await.unwrap();
    client.pull_to_end("broken").await.unwrap();
    let err = client.load_to_end("broken", None).await.unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason(status), "MODEL_INVALID");
    let s = client.state("broken", 0).await.unwrap();
    assert_eq!(s.state(), pb::ModelState::Failed);
    let failure = s.failure.unwrap();
    assert_eq!(failure.stage(), pb::LifecycleStage::Validate);
    assert_eq!(failure.code, Code::InvalidArgument as i32);
    assert!(
        failure.message.contains("truncated at byte"),
        "{}",
        failure.message
    );
    // FAILED allows a retry: the same Load fails the same way, nothing half-done.
    let again = client.load_to_end("broken", None).await.unwrap_err();
    assert_eq!(reason(again.status().unwrap()), "MODEL_INVALID");
    assert!(client.is_serving().await.unwrap());
}

/// Collects watch events until `n` arrived.
async fn take(
    stream: &mut tonic::Streaming<pb::WatchResponse>,
    n: usize,
) -> Vec<pb::WatchResponse> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("an event within a minute");
        out.push(next.unwrap().unwrap());
    }
    out
}

#[tokio::test]
async fn watch_resumes_by_revision_across_a_kill_and_restart() {
    let agent = Agent::start().await;
    let client = smol(&agent).await;
    client.pull_to_end("smol").await.unwrap();
    let before = client
        .state("smol", 0)
        .await
        .unwrap()
        .history
        .last()
        .unwrap()
        .revision;

    let mut watch = client
        .lifecycle()
        .watch(pb::WatchRequest {
            model_id: "smol".into(),
            since_revision: before,
        })
        .await
        .unwrap()
        .into_inner();
    client.load_to_end("smol", None).await.unwrap();
    let live = take(&mut watch, 4).await;
    assert_eq!(
        live.iter()
            .map(|e| e.transition.as_ref().unwrap().to_state())
            .collect::<Vec<_>>(),
        vec![
            pb::ModelState::Validating,
            pb::ModelState::Initializing,
            pb::ModelState::Loading,
            pb::ModelState::Ready
        ]
    );
    let seen = live.last().unwrap().revision;
    assert_eq!(seen, before + 4, "revisions are contiguous");

    // Events while nobody watches: an unload, then kill -9 with the model loaded
    // again; the restarted agent records that nothing is in memory any more.
    client.unload("smol", None).await.unwrap();
    client.load_to_end("smol", None).await.unwrap();
    drop(watch);
    let agent = agent.restart().await;
    let client = agent.client().await;
    let mut resumed = client
        .lifecycle()
        .watch(pb::WatchRequest {
            model_id: "smol".into(),
            since_revision: seen,
        })
        .await
        .unwrap()
        .into_inner();
    // Unloading, Downloaded, Validating, Initializing, Loading, Ready, then the
    // restart's Ready -> Downloaded.
    let missed = take(&mut resumed, 7).await;
    let revisions: Vec<u64> = missed.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, ((seen + 1)..=(seen + 7)).collect::<Vec<_>>());
    let last = missed.last().unwrap().transition.clone().unwrap();
    assert_eq!(
        (last.from_state(), last.to_state()),
        (pb::ModelState::Ready, pb::ModelState::Downloaded)
    );
    assert!(last.reason.contains("restarted"), "{last:?}");
    // Then live events follow on the same stream.
    client.load_to_end("smol", None).await.unwrap();
    let live = take(&mut resumed, 4).await;
    assert_eq!(live[0].revision, seen + 8);
    assert_eq!(
        live[3].transition.as_ref().unwrap().to_state(),
        pb::ModelState::Ready
    );

    // Asking for the future is a mistake, said plainly.
    let err = client
        .lifecycle()
        .watch(pb::WatchRequest {
            model_id: String::new(),
            since_revision: seen + 1_000_000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// `modelctl watch` follows events, and after the agent restarts it picks up from
/// the last revision it printed; `modelctl state` shows the history.
#[tokio::test]
async fn modelctl_watch_resumes_after_a_restart_and_state_shows_history() {
    let agent = Agent::start().await;
    let client = smol(&agent).await;
    client.pull_to_end("smol").await.unwrap();
    let since = client
        .state("smol", 0)
        .await
        .unwrap()
        .history
        .last()
        .unwrap()
        .revision;
    let child = std::process::Command::new(modeld_e2e::binary("modelctl"))
        .args(["--addr", &agent.url(), "watch", "smol", "--max-events", "5"])
        .args(["--since", &since.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    client.load_to_end("smol", None).await.unwrap();
    // Four events (validating .. ready) before the restart, the fifth after it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agent = agent.restart().await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}\n{stderr}");
    assert!(lines[3].contains("ready"), "{stdout}");
    assert!(lines[4].contains("ready -> downloaded"), "{stdout}");
    assert!(stderr.contains("resuming from revision"), "{stderr}");

    let (ok, out, err) = modeld_e2e::modelctl(&agent, &["state", "smol"]);
    assert!(ok, "{err}");
    for word in [
        "downloading",
        "validating",
        "initializing",
        "loading",
        "ready",
        "restarted",
    ] {
        assert!(out.contains(word), "{word} missing:\n{out}");
    }
}

/// Runs a Load to its end, returning every progress message and the loaded model.
async fn load_all(client: &Client, id: &str) -> (Vec<pb::LoadProgress>, pb::LoadedModel) {
    let mut stream = client
        .lifecycle()
        .load(pb::LoadRequest {
            model_id: id.into(),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut progress = Vec::new();
    let mut loaded = None;
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        progress.extend(msg.progress);
        if msg.loaded.is_some() {
            loaded = msg.loaded;
        }
    }
    (progress, loaded.unwrap())
}

/// From nothing to READY in one Load: it downloads over HTTP, then validates,
/// initializes and loads, with one progress that only grows; two Loads at once do
/// the work once.
#[tokio::test]
async fn one_load_takes_a_model_from_nothing_to_ready_and_concurrent_loads_share_it() {
    let assets = Assets::get();
    let (_dir, server) = modeld_e2e::model_server(&assets).await;
    server.throttle("smol.gguf", 60 * 1024 * 1024);
    let agent = Agent::start().await;
    let client = agent.client().await;
    client
        .register_model(gguf_spec("smol", &server.url("smol.gguf")))
        .await
        .unwrap();

    let (a, b) = tokio::join!(load_all(&client, "smol"), load_all(&client, "smol"));
    let ((progress, loaded), (_, loaded_b)) = (a, b);
    assert_eq!(loaded.model_id, "smol");
    assert_eq!(loaded_b.model_id, "smol");
    // One download for both.
    let gets = server.seen("smol.gguf");
    assert_eq!(gets.len(), 1, "{gets:?}");

    // Stages in order, progress never going back.
    let mut stages: Vec<pb::ModelState> = progress.iter().map(|p| p.state()).collect();
    stages.dedup();
    use pb::ModelState::{Downloading, Initializing, Loading, Ready, Validating};
    let order = [Downloading, Validating, Initializing, Loading, Ready];
    let positions: Vec<usize> = order
        .iter()
        .map(|s| {
            stages
                .iter()
                .position(|x| x == s)
                .unwrap_or_else(|| panic!("{s:?} missing from {stages:?}"))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{stages:?}");
    for w in progress.windows(2) {
        assert!(
            w[1].overall_progress >= w[0].overall_progress,
            "{} then {}",
            w[0].overall_progress,
            w[1].overall_progress
        );
    }
    assert!(
        progress
            .iter()
            .any(|p| p.state() == Downloading && p.eta_seconds >= 0.0)
    );
    assert_eq!(progress.last().unwrap().overall_progress, 1.0);

    // The history shows one pass through the stages, not two.
    let s = client.state("smol", 0).await.unwrap();
    let validations = s
        .history
        .iter()
        .filter(|t| t.to_state() == Validating)
        .count();
    assert_eq!(validations, 1);
}

/// Each corrupt GGUF (generated by scripts/gen-fixtures.py) is refused in VALIDATING
/// with INVALID_ARGUMENT, never reaching llama.cpp, and the agent serves on.
#[tokio::test]
async fn corrupt_ggufs_fail_validation_and_the_agent_keeps_serving() {
    use sha2::Digest;
    let agent = Agent::start().await;
    let client = agent.client().await;
    let dir = Assets::get().fixtures.join("corrupt");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "absurd-counts.gguf",
            "alignment-zero.gguf",
            "bad-magic.gguf",
            "offset-past-end.gguf",
            "truncated-data.gguf"
        ]
    );
    for name in &names {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap();
        let id = name.trim_end_matches(".gguf");
        let mut spec = gguf_spec(id, &format!("file://{}", path.display()));
        spec.files[0].sha256 = hex::encode(sha2::Sha256::digest(&bytes));
        spec.files[0].size_bytes = bytes.len() as u64;
        client.register_model(spec).await.unwrap();
        let err = client.load_to_end(id, None).await.unwrap_err();
        let status = err.status().unwrap();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert_eq!(reason(status), "MODEL_INVALID", "{name}");
        let s = client.state(id, 0).await.unwrap();
        assert_eq!(s.state(), pb::ModelState::Failed, "{name}");
        assert_eq!(
            s.failure.unwrap().stage(),
            pb::LifecycleStage::Validate,
            "{name}"
        );
    }
    // The real model still loads and answers: nothing leaked from the bad ones.
    let url = format!("file://{}", Assets::get().gguf.display());
    client
        .register_model(gguf_spec("smol", &url))
        .await
        .unwrap();
    client.load_to_end("smol", None).await.unwrap();
    assert!(client.is_serving().await.unwrap());
}

/// The state a model was in when the agent died: the `from` of the recovery
/// transition, or the last state if no recovery was needed.
fn state_at_kill(history: &[pb::StateTransition]) -> pb::ModelState {
    history
        .iter()
        .rev()
        .find(|t| t.reason.contains("restarted"))
        .map_or_else(|| history.last().unwrap().to_state(), |t| t.from_state())
}

/// kill -9 at any moment of a load leaves nothing stuck in a transient state, the
/// model loads again, and a pinned READY model is reloaded by the restart itself.
#[tokio::test]
async fn kill_9_in_any_stage_recovers_and_pinned_models_come_back() {
    use pb::ModelState::{Downloaded, Downloading, Initializing, Loading, Ready, Validating};
    let assets = Assets::get();
    let (_dir, server) = modeld_e2e::model_server(&assets).await;
    server.throttle("smol.gguf", 20 * 1024 * 1024);
    let mut agent = Agent::start().await;
    let client = agent.client().await;
    client
        .register_model(gguf_spec("smol", &server.url("smol.gguf")))
        .await
        .unwrap();

    // Killed while downloading: the transfer resumes after the restart.
    let loading = {
        let client = client.clone();
        tokio::spawn(async move { client.load_to_end("smol", None).await })
    };
    for _ in 0..200 {
        if client.state("smol", 0).await.unwrap().state() == Downloading {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.kill9();
    let _ = loading.await;
    agent = agent.restart().await;
    let client = agent.client().await;
    let mut stages_hit = vec![Downloading];
    let mut settled = false;
    for _ in 0..600 {
        if client.state("smol", 0).await.unwrap().state() == Downloaded {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        settled,
        "the download resumed and finished after the restart"
    );

    // Killed at moments spread over a load: never stuck, always loadable again.
    for delay_ms in [0u64, 3, 6, 10, 15, 25, 40, 60, 90, 130] {
        let loading = {
            let client = client.clone();
            tokio::spawn(async move { client.load_to_end("smol", None).await })
        };
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        agent.kill9();
        let _ = loading.await;
        agent = agent.restart().await;
        let c = agent.client().await;
        let s = c.state("smol", 0).await.unwrap();
        assert_eq!(
            s.state(),
            Downloaded,
            "after a kill at {delay_ms} ms: {s:?}"
        );
        stages_hit.push(state_at_kill(&s.history));
        c.load_to_end("smol", None).await.unwrap();
        c.unload("smol", None).await.unwrap();
    }
    stages_hit.dedup();
    eprintln!("killed during: {stages_hit:?}");
    assert!(
        stages_hit
            .iter()
            .any(|s| matches!(s, Validating | Initializing | Loading | Ready)),
        "some kill landed inside a load: {stages_hit:?}"
    );

    // Pinned and READY: the restart loads it again by itself.
    let c = agent.client().await;
    c.load_to_end(
        "smol",
        Some(pb::LoadOptions {
            pin: true,
            context_length: 512,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    agent.kill9();
    let agent = agent.restart().await;
    let c = agent.client().await;
    let mut back = None;
    for _ in 0..600 {
        let listed = c.list_loaded().await.unwrap();
        if let Some(m) = listed.models.into_iter().find(|m| m.model_id == "smol") {
            back = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = back.expect("the pinned model was reloaded after the restart");
    assert!(back.pinned);
    assert_eq!(
        back.context_length, 512,
        "with the options it was loaded with"
    );
    assert_eq!(c.state("smol", 0).await.unwrap().state(), Ready);
}

/// Unload while generating: a request that finishes within the grace time completes;
/// one that does not is cancelled when the grace runs out, and the model unloads.
#[tokio::test]
async fn unload_while_generating_lets_requests_finish_then_cancels_them() {
    let agent = Agent::start().await;
    let client = smol(&agent).await;
    client.load_to_end("smol", None).await.unwrap();
    let generate = |max_tokens: u32| {
        let client = client.clone();
        async move {
            let mut stream = client
                .generate()
                .generate(pb::GenerateRequest {
                    model_id: "smol".into(),
                    input: Some(pb::generate_request::Input::Prompt(
                        "Once upon a time".into(),
                    )),
                    max_tokens,
                    ignore_eos: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            // The first token: the request is running.
            stream.next().await.unwrap().unwrap();
            stream
        }
    };
    let finish = |mut stream: tonic::Streaming<pb::GenerateResponse>| async move {
        let mut summary = None;
        while let Some(Ok(msg)) = stream.next().await {
            if let Some(pb::generate_response::Event::Summary(s)) = msg.event {
                summary = Some(s);
            }
        }
        summary.unwrap()
    };

    // A short request and a generous grace: it completes, nothing is cancelled.
    let short = generate(8).await;
    let unload = client.unload("smol", Some(Duration::from_secs(60)));
    let (summary, unloaded) = tokio::join!(finish(short), unload);
    assert_eq!(summary.finish_reason(), pb::FinishReason::Length);
    assert_eq!(summary.usage.unwrap().generated_tokens, 8);
    let unloaded = unloaded.unwrap();
    assert_eq!(unloaded.cancelled_requests, 0);
    assert_eq!(unloaded.state(), pb::ModelState::Downloaded);

    // A long request and a short grace: it is cancelled, and the unload completes.
    client.load_to_end("smol", None).await.unwrap();
    let long = generate(3000).await;
    let unload = client.unload("smol", Some(Duration::from_millis(300)));
    let (summary, unloaded) = tokio::join!(finish(long), unload);
    assert_eq!(summary.finish_reason(), pb::FinishReason::Cancelled);
    assert_eq!(unloaded.unwrap().cancelled_requests, 1);
    assert_eq!(
        client.state("smol", 0).await.unwrap().state(),
        pb::ModelState::Downloaded
    );
}

/// A model inside an archive passes through EXTRACTING on its way to READY.
#[tokio::test]
async fn a_model_inside_an_archive_is_extracted_on_the_way_to_ready() {
    let assets = Assets::get();
    let agent = Agent::start().await;
    let client = agent.client().await;
    let mut spec = gguf_spec("wheel", &format!("file://{}", assets.wheel.display()));
    spec.files[0].archive = pb::ArchiveFormat::Zip as i32;
    spec.files[0].member = assets.wheel_member.clone();
    client.register_model(spec).await.unwrap();
    let (progress, loaded) = load_all(&client, "wheel").await;
    assert_eq!(loaded.model_id, "wheel");
    let s = client.state("wheel", 0).await.unwrap();
    let states: Vec<pb::ModelState> = s.history.iter().map(|t| t.to_state()).collect();
    let at = |x: pb::ModelState| states.iter().position(|s| *s == x).unwrap();
    assert!(
        at(pb::ModelState::Downloading) < at(pb::ModelState::Extracting)
            && at(pb::ModelState::Extracting) < at(pb::ModelState::Downloaded)
            && at(pb::ModelState::Downloaded) < at(pb::ModelState::Ready),
        "{states:?}"
    );
    assert_eq!(progress.last().unwrap().state(), pb::ModelState::Ready);
    assert_eq!(
        progress
            .iter()
            .filter(|p| p.state() == pb::ModelState::Ready)
            .count(),
        1,
        "READY is said once, by the last message: {progress:?}"
    );
}

/// A Load whose client leaves (here: its deadline passes) cancels the download it
/// started when no other Load waits for the model; while another waits, it goes on.
#[tokio::test]
async fn a_load_nobody_waits_for_stops_its_download() {
    let assets = Assets::get();
    let (_dir, server) = modeld_e2e::model_server(&assets).await;
    server.throttle("smol.gguf", 8 * 1024 * 1024);
    let agent = Agent::start().await;
    let client = agent.client().await;
    client
        .register_model(gguf_spec("smol", &server.url("smol.gguf")))
        .await
        .unwrap();
    let load = |timeout: Option<Duration>| {
        let mut request = tonic::Request::new(pb::LoadRequest {
            model_id: "smol".into(),
            options: None,
        });
        if let Some(t) = timeout {
            request.set_timeout(t);
        }
        let client = client.clone();
        async move {
            let mut stream = client.lifecycle().load(request).await?.into_inner();
            let mut loaded = None;
            while let Some(msg) = stream.message().await? {
                loaded = loaded.or(msg.loaded);
            }
            Ok::<_, tonic::Status>(loaded)
        }
    };

    let err = load(Some(Duration::from_secs(1))).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    let mut stopped = false;
    for _ in 0..100 {
        let s = client.state("smol", 0).await.unwrap();
        if s.state() == pb::ModelState::Registered {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stopped,
        "the download was cancelled and the model is registered again"
    );
    assert!(
        client
            .state("smol", 0)
            .await
            .unwrap()
            .history
            .iter()
            .any(|t| t.reason.contains("cancelled"))
    );

    // Two waiters: the impatient one leaves, the patient one gets READY.
    server.throttle("smol.gguf", 200 * 1024 * 1024);
    let (impatient, patient) = tokio::join!(load(Some(Duration::from_millis(300))), load(None));
    assert_eq!(impatient.unwrap_err().code(), Code::DeadlineExceeded);
    assert_eq!(patient.unwrap().unwrap().model_id, "smol");
}
