//! Rollouts end to end: a real controller, three real agents, the real SmolLM2. A
//! revision that fails its smoke gate on the canary is rolled back with no other
//! device touched; a good one goes out in waves that never exceed `max_unavailable`;
//! and a client generating on a device throughout a swap never sees an error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use modeld_e2e::fleet::{Controller, model, phase, profile, wait_status};
use modeld_e2e::{Agent, AgentOptions, Assets, gguf_spec, model_server, pb};
use modeld_proto::fleet::v1 as fpb;
use tokio_stream::StreamExt as _;

const EDGE: &str =
    "device_class = \"edge-box\"\nos = \"linux\"\nmemory = \"8 GiB\"\nmemory_budget = \"2 GiB\"\n";
const CONVERGE: Duration = Duration::from_secs(180);

async fn device(controller: &Controller, profile: &Path, canary: bool) -> Agent {
    let mut args = vec![
        "--fleet".into(),
        controller.url(),
        "--site".into(),
        "lab".into(),
        "--label".into(),
        "tier=edge".into(),
        "--device-profile".into(),
        profile.display().to_string(),
    ];
    if canary {
        args.extend(["--label".into(), "ring=canary".into()]);
    }
    Agent::start_with(AgentOptions {
        args,
        ..AgentOptions::default()
    })
    .await
}

fn strategy() -> fpb::RolloutStrategy {
    fpb::RolloutStrategy {
        canary: Some(fpb::Canary {
            devices: 1,
            labels: [("ring".to_owned(), "canary".to_owned())].into(),
            ..Default::default()
        }),
        max_unavailable: 1,
        gates: Some(fpb::Gates {
            ready_within_seconds: 120,
            smoke_tests: vec![fpb::SmokeTest {
                prompt: "Tell me the capital of France.".into(),
                max_tokens: 24,
                contains: "Paris".into(),
                ..Default::default()
            }],
            soak_seconds: 2,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Revision `display` of the deployment: the same weights under new metadata (so the
/// device stages and swaps a new model without a download), at `context` tokens.
fn revision(url: &str, display: &str, context: u32) -> fpb::Deployment {
    let mut spec = gguf_spec("smol", url);
    spec.display_name = display.into();
    let mut m = model(spec, fpb::WantedState::Loaded);
    m.load_options.as_mut().unwrap().context_length = context;
    fpb::Deployment {
        name: "chat".into(),
        models: vec![m],
        selector: Some(fpb::Selector {
            labels: [("tier".to_owned(), "edge".to_owned())].into(),
            ..Default::default()
        }),
        prune: true,
        rollout: Some(strategy()),
        ..Default::default()
    }
}

async fn display_name(agent: &Agent) -> String {
    agent
        .client()
        .await
        .get_model("smol")
        .await
        .unwrap()
        .spec
        .unwrap()
        .display_name
}

/// Lifecycle transitions `smol` went through on `agent`.
async fn transitions(agent: &Agent) -> usize {
    agent
        .client()
        .await
        .state("smol", 100)
        .await
        .unwrap()
        .history
        .len()
}

/// Greedy chats on `agent`'s smol, one after another, until `stop`; counts answers
/// and panics on the first error.
fn keep_chatting(
    agent: &Agent,
    stop: Arc<AtomicBool>,
    answers: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    let url = agent.url();
    tokio::spawn(async move {
        let client = modelctl::Client::connect(&url).await.unwrap();
        while !stop.load(Ordering::SeqCst) {
            let request = pb::GenerateRequest {
                model_id: "smol".into(),
                input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                    messages: vec![pb::ChatMessage {
                        role: pb::ChatRole::User as i32,
                        content: "Name a colour.".into(),
                    }],
                })),
                sampling: Some(pb::SamplingParams {
                    temperature: Some(0.0),
                    ..Default::default()
                }),
                max_tokens: 8,
                ..Default::default()
            };
            let mut stream = client
                .generate()
                .generate(request)
                .await
                .unwrap_or_else(|s| panic!("Generate refused during the rollout: {s:?}"))
                .into_inner();
            let mut summary = false;
            while let Some(message) = stream.next().await {
                let message =
                    message.unwrap_or_else(|s| panic!("Generate failed during the rollout: {s:?}"));
                summary |= matches!(
                    message.event,
                    Some(pb::generate_response::Event::Summary(_))
                );
            }
            assert!(summary, "a generation ended without its summary");
            answers.fetch_add(1, Ordering::SeqCst);
        }
    })
}

async fn apply(
    fleet: &mut fpb::fleet_service_client::FleetServiceClient<modelctl::Transport>,
    d: fpb::Deployment,
) -> fpb::ApplyDeploymentResponse {
    fleet
        .apply_deployment(fpb::ApplyDeploymentRequest {
            deployment: Some(d),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls the rollout until `done` accepts it, checking `each` on every sample.
async fn follow(
    controller: &Controller,
    what: &str,
    mut each: impl FnMut(&fpb::Rollout),
    done: impl Fn(&fpb::Rollout) -> bool,
) -> fpb::Rollout {
    let mut fleet = controller.client().await;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let r = fleet
            .get_rollout(fpb::GetRolloutRequest {
                deployment: "chat".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .rollout
            .unwrap();
        each(&r);
        if done(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; rollout: {r:#?}\ncontroller log:\n{}",
            controller.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state(r: &fpb::Rollout) -> fpb::RolloutState {
    fpb::RolloutState::try_from(r.state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollouts_gate_on_the_canary_roll_back_and_go_out_in_waves_without_a_gap() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    let url = server.url("smol.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let controller = Controller::start(&tmp.path().join("controller"), None);
    let edge = profile(tmp.path(), "edge", EDGE);
    // The canary is started last: its label, not its order, makes it the canary.
    let a = device(&controller, &edge, false).await;
    let b = device(&controller, &edge, false).await;
    let canary = device(&controller, &edge, true).await;
    let mut ids = HashMap::new();
    for (name, agent) in [("a", &a), ("b", &b), ("canary", &canary)] {
        ids.insert(
            name,
            agent.client().await.capabilities().await.unwrap().node_id,
        );
    }
    let mut fleet = controller.client().await;
    // Revision 1 lands everywhere at once: there is nothing to roll out over.
    let v1 = revision(&url, "smol v1", 512);
    apply(&mut fleet, v1).await;
    wait_status(
        &controller,
        "chat",
        CONVERGE,
        "v1 READY on all three",
        |s| s.converged && s.devices.len() == 3,
    )
    .await;
    let not_found = fleet
        .get_rollout(fpb::GetRolloutRequest {
            deployment: "chat".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_found.code(), tonic::Code::NotFound);
    let before = [transitions(&a).await, transitions(&b).await];

    // Revision 2 is broken: its context cannot hold the smoke test's prompt. The
    // canary fails the gate, the rollout rolls back, and nobody else is touched. A
    // client chatting with the canary all along sees no error.
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicUsize::new(0));
    let chatter = keep_chatting(&canary, stop.clone(), answers.clone());
    apply(&mut fleet, revision(&url, "smol v2", 24)).await;
    let mut others_touched = false;
    let rolled_back = follow(
        &controller,
        "the broken revision rolled back",
        |r| {
            others_touched |= r.devices.iter().any(|d| {
                d.device_id != ids["canary"] && d.phase != fpb::DeviceRolloutPhase::Waiting as i32
            });
        },
        |r| state(r) == fpb::RolloutState::RolledBack,
    )
    .await;
    assert!(!others_touched, "only the canary may take a revision first");
    assert_eq!(rolled_back.failed_devices, 1);
    assert!(
        rolled_back.reason.contains(&ids["canary"]) && rolled_back.reason.contains("smoke"),
        "{}",
        rolled_back.reason
    );
    let canary_row = rolled_back
        .devices
        .iter()
        .find(|d| d.device_id == ids["canary"])
        .unwrap();
    assert_eq!(canary_row.wave, 0);
    assert_eq!(canary_row.phase, fpb::DeviceRolloutPhase::RolledBack as i32);
    let smoke = canary_row
        .gates
        .iter()
        .find(|g| g.gate == "smoke")
        .expect("the smoke gate is reported");
    assert!(!smoke.passed, "{smoke:?}");
    // The deployment is back on revision 1's content, under a new revision number.
    let current = fleet
        .get_deployment(fpb::GetDeploymentRequest {
            name: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .deployment
        .unwrap();
    assert_eq!(current.generation, 3);
    assert_eq!(
        current.models[0].spec.as_ref().unwrap().display_name,
        "smol v1"
    );
    wait_status(&controller, "chat", CONVERGE, "back to converged", |s| {
        s.converged
    })
    .await;
    for agent in [&a, &b, &canary] {
        assert_eq!(display_name(agent).await, "smol v1");
    }
    assert_eq!(
        [transitions(&a).await, transitions(&b).await],
        before,
        "devices outside the canary saw no lifecycle change"
    );
    stop.store(true, Ordering::SeqCst);
    chatter.await.unwrap();
    assert!(answers.load(Ordering::SeqCst) > 0);

    // Revision 4 is good: the canary, then one device per wave (max_unavailable 1),
    // each swapping the new model in while the old one answers.
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicUsize::new(0));
    let chatter = keep_chatting(&a, stop.clone(), answers.clone());
    let applied = apply(&mut fleet, revision(&url, "smol v4", 512)).await;
    assert_eq!(applied.deployment.unwrap().generation, 4);
    let mut most_updating = 0;
    let mut waves_seen = Vec::new();
    let done = follow(
        &controller,
        "the good revision rolled out",
        |r| {
            let updating = r
                .devices
                .iter()
                .filter(|d| d.phase == fpb::DeviceRolloutPhase::Updating as i32)
                .count();
            most_updating = most_updating.max(updating);
            if waves_seen.last() != Some(&r.wave) {
                waves_seen.push(r.wave);
            }
        },
        |r| state(r) == fpb::RolloutState::Completed,
    )
    .await;
    assert_eq!(most_updating, 1, "never more than max_unavailable at once");
    assert_eq!(done.waves, 3);
    assert_eq!(waves_seen, vec![0, 1, 2]);
    assert_eq!(done.failed_devices, 0);
    for d in &done.devices {
        assert_eq!(d.phase, fpb::DeviceRolloutPhase::Passed as i32, "{d:?}");
        for gate in ["ready", "smoke", "soak"] {
            assert!(
                d.gates.iter().any(|g| g.gate == gate && g.passed),
                "{gate} on {}: {:?}",
                d.device_id,
                d.gates
            );
        }
    }
    let status = wait_status(&controller, "chat", CONVERGE, "v4 converged", |s| {
        s.converged
    })
    .await;
    for agent in [&a, &b, &canary] {
        assert_eq!(display_name(agent).await, "smol v4");
        assert_eq!(
            phase(
                &status,
                &agent.client().await.capabilities().await.unwrap().node_id,
                "smol"
            ),
            Some(fpb::ModelPhase::Ready)
        );
    }
    stop.store(true, Ordering::SeqCst);
    chatter.await.unwrap();
    assert!(answers.load(Ordering::SeqCst) > 0);

    // Once the rollout completed, nothing retains revision 1: the standby copies go.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let left = a.client().await.get_model("smol.standby").await.is_ok();
        if !left {
            break;
        }
        assert!(Instant::now() < deadline, "smol.standby was never released");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Revision 5 changes only a load option: each device loads the model again with
    // it, the same way, without a download or a gap.
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicUsize::new(0));
    let chatter = keep_chatting(&b, stop.clone(), answers.clone());
    apply(&mut fleet, revision(&url, "smol v4", 256)).await;
    follow(
        &controller,
        "the load option rolled out",
        |_| {},
        |r| r.to_revision == 5 && state(r) == fpb::RolloutState::Completed,
    )
    .await;
    for agent in [&a, &b, &canary] {
        let loaded = agent.client().await.list_loaded().await.unwrap().models;
        let smol = loaded.iter().find(|m| m.model_id == "smol").unwrap();
        assert_eq!(smol.context_length, 256, "{smol:?}");
    }
    stop.store(true, Ordering::SeqCst);
    chatter.await.unwrap();
    assert!(answers.load(Ordering::SeqCst) > 0);

    // Revision 6: the canary is killed (SIGKILL) while it takes the revision. The
    // rollout waits for it (`device_lost: wait`); restarted, it picks the work up
    // where its store left it and passes, and the rollout goes on.
    let mut v6 = revision(&url, "smol v6", 256);
    v6.rollout
        .as_mut()
        .unwrap()
        .gates
        .as_mut()
        .unwrap()
        .soak_seconds = 4;
    apply(&mut fleet, v6).await;
    follow(
        &controller,
        "the canary updating revision 6",
        |_| {},
        |r| {
            r.to_revision == 6
                && r.devices.iter().any(|d| {
                    d.device_id == ids["canary"]
                        && d.phase == fpb::DeviceRolloutPhase::Updating as i32
                })
        },
    )
    .await;
    let mut canary = canary;
    canary.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = fleet
        .get_rollout(fpb::GetRolloutRequest {
            deployment: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .rollout
        .unwrap();
    assert_eq!(state(&held), fpb::RolloutState::Progressing);
    assert_eq!(held.wave, 0, "no wave starts while the canary is away");
    let canary = canary.restart().await;
    let resumed = follow(
        &controller,
        "revision 6 completed after the canary came back",
        |_| {},
        |r| r.to_revision == 6 && state(r) == fpb::RolloutState::Completed,
    )
    .await;
    assert_eq!(resumed.failed_devices, 0);
    assert_eq!(display_name(&canary).await, "smol v6");

    // Revision 7 adds the speed gate: the device measures the old and the new
    // revision the same way, side by side, and reports both. (The bound is generous:
    // the two are the same weights on a busy 2-core machine; the figures are the point.)
    let mut v7 = revision(&url, "smol v7", 256);
    v7.rollout
        .as_mut()
        .unwrap()
        .gates
        .as_mut()
        .unwrap()
        .max_slowdown = 4.0;
    apply(&mut fleet, v7).await;
    let measured = follow(
        &controller,
        "revision 7 with the speed gate",
        |_| {},
        |r| r.to_revision == 7 && state(r) == fpb::RolloutState::Completed,
    )
    .await;
    for d in &measured.devices {
        let speed = d
            .gates
            .iter()
            .find(|g| g.gate == "speed")
            .unwrap_or_else(|| panic!("no speed gate on {}: {:?}", d.device_id, d.gates));
        assert!(speed.passed, "{speed:?}");
        assert!(
            speed.detail.contains("tokens/s against") && speed.detail.contains("first token"),
            "{}",
            speed.detail
        );
    }

    // The operator's view.
    let out = std::process::Command::new(modeld_e2e::binary("modelctl"))
        .args([
            "fleet",
            "--fleet-addr",
            &controller.url(),
            "rollout",
            "status",
            "chat",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("revision 6 → 7, completed"), "{text}");
    assert!(text.contains("canary"), "{text}");
    let again = fleet
        .resume_rollout(fpb::ResumeRolloutRequest {
            deployment: "chat".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    assert!(again.message().contains("completed"), "{}", again.message());
}

/// A device whose memory budget holds one revision of the model, not two.
const TIGHT: &str = "device_class = \"edge-box\"\nos = \"linux\"\nmemory = \"1 GiB\"\nmemory_budget = \"250 MiB\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_that_cannot_hold_both_revisions_follows_the_swap_policy() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    let url = server.url("smol.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let controller = Controller::start(&tmp.path().join("controller"), None);
    let tight = profile(tmp.path(), "tight", TIGHT);
    let agent = device(&controller, &tight, true).await;
    let mut fleet = controller.client().await;
    let with_swap = |display: &str, swap: fpb::SwapPolicy| {
        let mut d = revision(&url, display, 512);
        if let Some(r) = d.rollout.as_mut() {
            r.swap = swap as i32;
            if let Some(g) = r.gates.as_mut() {
                g.soak_seconds = 0;
            }
        }
        d
    };
    apply(
        &mut fleet,
        with_swap("smol v1", fpb::SwapPolicy::SkipDevice),
    )
    .await;
    wait_status(&controller, "chat", CONVERGE, "v1 READY", |s| s.converged).await;

    // skip_device: the device says why and stays on v1, loaded and answering, also
    // once the rollout completed.
    apply(
        &mut fleet,
        with_swap("smol v2", fpb::SwapPolicy::SkipDevice),
    )
    .await;
    let skipped = follow(
        &controller,
        "the device skipped",
        |_| {},
        |r| state(r) == fpb::RolloutState::Completed,
    )
    .await;
    let row = &skipped.devices[0];
    assert_eq!(
        fpb::DeviceRolloutPhase::try_from(row.phase).unwrap(),
        fpb::DeviceRolloutPhase::Skipped,
        "{skipped:#?}"
    );
    assert!(
        row.gates
            .iter()
            .any(|g| g.gate == "memory" && !g.passed && g.detail.contains("memory budget")),
        "{row:#?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(display_name(&agent).await, "smol v1");
    let loaded = agent.client().await.list_loaded().await.unwrap();
    assert!(
        loaded.models.iter().any(|m| m.model_id == "smol"),
        "{loaded:?}"
    );
    assert!(
        !loaded.models.iter().any(|m| m.model_id == "smol.standby"),
        "{loaded:?}"
    );

    // allow_gap: the old revision is unloaded first, then the new one loads and passes.
    apply(&mut fleet, with_swap("smol v3", fpb::SwapPolicy::AllowGap)).await;
    let passed = follow(
        &controller,
        "v3 rolled out with a gap",
        |_| {},
        |r| state(r) == fpb::RolloutState::Completed,
    )
    .await;
    assert_eq!(
        fpb::DeviceRolloutPhase::try_from(passed.devices[0].phase).unwrap(),
        fpb::DeviceRolloutPhase::Passed,
        "{passed:#?}"
    );
    assert_eq!(display_name(&agent).await, "smol v3");
    wait_status(&controller, "chat", CONVERGE, "v3 READY", |s| s.converged).await;
}
