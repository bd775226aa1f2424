//! The fleet end to end: a real `modeld-fleet` controller, real agents dialing in with
//! device profiles (a Linux edge box, an iPhone-class phone, a Mac-class laptop), and
//! the real SmolLM2 model served over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use modeld_e2e::fleet::{Controller, model, phase, profile, wait_status};
use modeld_e2e::{
    Agent, AgentOptions, Assets, SMOLLM2_SIZE, gguf_spec, model_server, modelctl, pb,
};
use modeld_proto::fleet::v1 as fpb;
use tonic::Code;
use tonic_types::StatusExt as _;

const EDGE: &str =
    "device_class = \"edge-box\"\nos = \"linux\"\nmemory = \"8 GiB\"\nmemory_budget = \"1 GiB\"\n";
const PHONE: &str = "device_class = \"phone\"\nos = \"ios\"\nmemory = \"6 GiB\"\nmemory_budget = \"120 MiB\"\naccelerators = [\"metal\", \"ane\"]\n";
const MAC: &str = "device_class = \"laptop\"\nos = \"macos\"\nmemory = \"16 GiB\"\nmemory_budget = \"4 GiB\"\naccelerators = [\"metal\"]\n";
const CONVERGE: Duration = Duration::from_secs(120);

/// An agent reporting to `controller` as the device `profile` describes.
async fn device(controller: &Controller, profile: &Path, tier: &str) -> Agent {
    device_at(controller, profile, tier, "lab").await
}

/// An agent of `site`.
async fn device_at(controller: &Controller, profile: &Path, tier: &str, site: &str) -> Agent {
    device_with(controller, profile, tier, site, &[]).await
}

/// An agent of `site` started with `extra` arguments too.
async fn device_with(
    controller: &Controller,
    profile: &Path,
    tier: &str,
    site: &str,
    extra: &[&str],
) -> Agent {
    let mut args = vec![
        "--fleet".into(),
        controller.url(),
        "--site".into(),
        site.into(),
        "--label".into(),
        format!("tier={tier}"),
        "--device-profile".into(),
        profile.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    Agent::start_with(AgentOptions {
        args,
        ..AgentOptions::default()
    })
    .await
}

/// Applies the deployment "prefetch": SmolLM2 from `url`, stored on every edge device.
async fn apply_prefetch(controller: &Controller, url: &str) {
    controller
        .client()
        .await
        .apply_deployment(fpb::ApplyDeploymentRequest {
            deployment: Some(deployment(
                "prefetch",
                tier("edge"),
                vec![model(gguf_spec("smol", url), fpb::WantedState::Stored)],
            )),
            dry_run: false,
        })
        .await
        .unwrap();
}

async fn node_id(agent: &Agent) -> String {
    agent.client().await.capabilities().await.unwrap().node_id
}

/// Waits until the controller lists `n` connected devices.
async fn wait_connected(controller: &Controller, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fleet = controller.client().await;
    loop {
        let devices = fleet
            .list_devices(fpb::ListDevicesRequest {})
            .await
            .unwrap()
            .into_inner()
            .devices;
        if devices.iter().filter(|d| d.connected).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} devices never connected: {devices:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn deployment(
    name: &str,
    selector: fpb::Selector,
    models: Vec<fpb::DeploymentModel>,
) -> fpb::Deployment {
    fpb::Deployment {
        name: name.into(),
        models,
        selector: Some(selector),
        prune: true,
        ..Default::default()
    }
}

/// A deployment of `spec` whose rollout runs `test`.
fn gated(name: &str, spec: &pb::ModelSpec, test: fpb::SmokeTest) -> fpb::Deployment {
    fpb::Deployment {
        rollout: Some(fpb::RolloutStrategy {
            gates: Some(fpb::Gates {
                smoke_tests: vec![test],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..deployment(
            name,
            tier("edge"),
            vec![model(spec.clone(), fpb::WantedState::Loaded)],
        )
    }
}

fn tier(value: &str) -> fpb::Selector {
    fpb::Selector {
        labels: [("tier".to_owned(), value.to_owned())].into(),
        ..Default::default()
    }
}

async fn loaded(agent: &Agent) -> Vec<String> {
    agent
        .client()
        .await
        .list_loaded()
        .await
        .unwrap()
        .models
        .into_iter()
        .map(|m| m.model_id)
        .collect()
}

/// Polls `agent` until `check` holds, or panics naming `what`.
async fn wait_agent<F, Fut>(agent: &Agent, what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + CONVERGE;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deployments_land_where_they_match_and_fit_and_follow_changes() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    let tmp = tempfile::tempdir().unwrap();
    let controller = Controller::start(&tmp.path().join("controller"), None);
    let edge_profile = profile(tmp.path(), "edge", EDGE);
    let edge = device(&controller, &edge_profile, "edge").await;
    let phone = device(&controller, &profile(tmp.path(), "phone", PHONE), "edge").await;
    let mac = device(&controller, &profile(tmp.path(), "mac", MAC), "desk").await;
    let (edge_id, phone_id, mac_id) = (
        node_id(&edge).await,
        node_id(&phone).await,
        node_id(&mac).await,
    );
    wait_connected(&controller, 3).await;
    let mut fleet = controller.client().await;

    // The devices say what the profiles make them.
    let devices = fleet
        .list_devices(fpb::ListDevicesRequest {})
        .await
        .unwrap()
        .into_inner()
        .devices;
    let phone_seen = devices.iter().find(|d| d.id == phone_id).unwrap();
    let caps = phone_seen.capabilities.clone().unwrap();
    assert_eq!(caps.device_class, pb::DeviceClass::Phone as i32);
    assert_eq!(caps.os, "ios");
    assert_eq!(caps.memory_budget_bytes, 120 << 20);
    assert_eq!(
        phone_seen.labels.get("tier").map(String::as_str),
        Some("edge")
    );

    // One model, loaded, on every edge-tier device that fits: the edge box. The phone
    // matches but its budget is too small; the laptop does not match.
    let smol = gguf_spec("smol", &server.url("smol.gguf"));
    let chat = deployment(
        "edge-chat",
        tier("edge"),
        vec![model(smol.clone(), fpb::WantedState::Loaded)],
    );
    let applied = fleet
        .apply_deployment(fpb::ApplyDeploymentRequest {
            deployment: Some(chat.clone()),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let placement = applied.placement.unwrap();
    assert_eq!(placement.device_ids, vec![edge_id.clone()]);
    assert_eq!(placement.matching_devices, 2);
    let refused = placement
        .unplaced
        .iter()
        .find(|u| u.device_id == phone_id)
        .expect("the phone is listed");
    assert!(
        refused.reason.contains("memory") && refused.reason.contains("left"),
        "{}",
        refused.reason
    );
    assert!(placement.unplaced.iter().all(|u| u.device_id != mac_id));

    let status = wait_status(
        &controller,
        "edge-chat",
        CONVERGE,
        "smol READY on the edge box",
        |s| phase(s, &edge_id, "smol") == Some(fpb::ModelPhase::Ready),
    )
    .await;
    assert!(status.converged, "{status:#?}");
    assert_eq!(loaded(&edge).await, vec!["smol".to_owned()]);
    assert!(loaded(&phone).await.is_empty());
    let err = phone.client().await.get_model("smol").await.unwrap_err();
    assert_eq!(
        err.status().unwrap().code(),
        Code::NotFound,
        "the phone got nothing"
    );

    // A second deployment that would overflow the edge box's budget goes to the laptop,
    // and the edge box is listed with the reason.
    let mut big = gguf_spec("smol-big", &server.url("smol.gguf"));
    big.estimated_memory_bytes = 900 << 20;
    let wide = fpb::Selector {
        device_classes: vec!["edge-box".into(), "laptop".into()],
        ..Default::default()
    };
    let big_deployment = deployment("big", wide, vec![model(big, fpb::WantedState::Loaded)]);
    let applied = fleet
        .apply_deployment(fpb::ApplyDeploymentRequest {
            deployment: Some(big_deployment),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let placement = applied.placement.unwrap();
    assert_eq!(placement.device_ids, vec![mac_id.clone()]);
    let edge_refusal = placement
        .unplaced
        .iter()
        .find(|u| u.device_id == edge_id)
        .unwrap();
    assert!(
        edge_refusal.reason.contains("needs 900.0 MiB of memory"),
        "{}",
        edge_refusal.reason
    );
    wait_status(
        &controller,
        "big",
        CONVERGE,
        "smol-big READY on the laptop",
        |s| phase(s, &mac_id, "smol-big") == Some(fpb::ModelPhase::Ready),
    )
    .await;

    // Replacing the deployment's model: the old one is unloaded and, with prune,
    // deleted; the new one is only stored.
    let disk_only = gguf_spec("smol-disk", &server.url("smol.gguf"));
    let changed = deployment(
        "edge-chat",
        tier("edge"),
        vec![model(disk_only, fpb::WantedState::Stored)],
    );
    fleet
        .apply_deployment(fpb::ApplyDeploymentRequest {
            deployment: Some(changed),
            dry_run: false,
        })
        .await
        .unwrap();
    wait_status(
        &controller,
        "edge-chat",
        CONVERGE,
        "smol-disk STORED on the edge box",
        |s| phase(s, &edge_id, "smol-disk") == Some(fpb::ModelPhase::Stored) && s.converged,
    )
    .await;
    let client = edge.client().await;
    wait_agent(&edge, "smol pruned from the edge box", || async {
        client.get_model("smol").await.is_err()
    })
    .await;
    // (The "big" deployment may take the memory smol left: it fits there now.)
    wait_agent(&edge, "smol unloaded from the edge box", || async {
        !loaded(&edge).await.contains(&"smol".to_owned())
    })
    .await;

    // A device that arrives after the apply gets the deployment too.
    let late = device(&controller, &edge_profile, "edge").await;
    let late_id = node_id(&late).await;
    wait_status(
        &controller,
        "edge-chat",
        CONVERGE,
        "smol-disk STORED on the late device",
        |s| phase(s, &late_id, "smol-disk") == Some(fpb::ModelPhase::Stored),
    )
    .await;

    // The operator's view through the CLI.
    let out = std::process::Command::new(modeld_e2e::binary("modelctl"))
        .args([
            "fleet",
            "--fleet-addr",
            &controller.url(),
            "status",
            "edge-chat",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("smol-disk") && text.contains("stored") && text.contains(&phone_id),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_and_agents_survive_each_others_outages() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    let tmp = tempfile::tempdir().unwrap();
    let controller = Controller::start(&tmp.path().join("controller"), None);
    let agent = device(&controller, &profile(tmp.path(), "edge", EDGE), "edge").await;
    let id = node_id(&agent).await;
    wait_connected(&controller, 1).await;
    // A model an operator put there by hand, which no deployment claims.
    let by_hand = gguf_spec("by-hand", &server.url("smol.gguf"));
    agent.client().await.register_model(by_hand).await.unwrap();
    let mut events = controller
        .client()
        .await
        .watch(fpb::WatchRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let smol = gguf_spec("smol", &server.url("smol.gguf"));
    controller
        .client()
        .await
        .apply_deployment(fpb::ApplyDeploymentRequest {
            deployment: Some(deployment(
                "keep",
                tier("edge"),
                vec![model(smol, fpb::WantedState::Loaded)],
            )),
            dry_run: false,
        })
        .await
        .unwrap();
    // The device confirms the assignments; watchers see it.
    loop {
        let event = events.message().await.unwrap().expect("the watch goes on");
        if event.kind == fpb::EventKind::AssignmentsApplied as i32 && event.device_id == id {
            assert!(event.generation >= 1);
            break;
        }
    }
    wait_status(&controller, "keep", CONVERGE, "smol READY", |s| {
        phase(s, &id, "smol") == Some(fpb::ModelPhase::Ready)
    })
    .await;

    // The controller dies. The agent keeps serving, and keeps converging to the
    // assignments it holds: an operator's unload is undone.
    let mut controller = controller;
    controller.kill9();
    let (ok, out, err) = modelctl(
        &agent,
        &[
            "generate",
            "smol",
            "The capital of France is",
            "--max-tokens",
            "4",
        ],
    );
    assert!(ok, "generation without the controller: {out}{err}");
    agent.client().await.unload("smol", None).await.unwrap();
    wait_agent(&agent, "smol loaded again by the reconciler", || async {
        loaded(&agent).await == vec!["smol".to_owned()]
    })
    .await;

    // The controller comes back with its deployments and devices; the agent
    // reconnects and its status catches up.
    let controller = controller.restart();
    let mut fleet = controller.client().await;
    let names: Vec<String> = fleet
        .list_deployments(fpb::ListDeploymentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .deployments
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, vec!["keep".to_owned()]);
    let device = fleet
        .get_device(fpb::GetDeviceRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .device
        .unwrap();
    assert_eq!(device.site, "lab", "the device survived the restart");
    wait_connected(&controller, 1).await;
    let status = wait_status(
        &controller,
        "keep",
        CONVERGE,
        "the agent's status after reconnecting",
        |s| s.converged,
    )
    .await;
    assert_eq!(phase(&status, &id, "smol"), Some(fpb::ModelPhase::Ready));

    // Deleting the deployment (it prunes) removes its model and leaves the one put
    // there by hand.
    fleet
        .delete_deployment(fpb::DeleteDeploymentRequest {
            name: "keep".into(),
        })
        .await
        .unwrap();
    let client = agent.client().await;
    wait_agent(&agent, "smol pruned", || async {
        client.get_model("smol").await.is_err()
    })
    .await;
    assert!(
        client.get_model("by-hand").await.is_ok(),
        "the hand-placed model stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_mid_download_resumes_and_reports_it() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    // Slow enough to be caught half-way.
    server.throttle("smol.gguf", 8 << 20);
    let tmp = tempfile::tempdir().unwrap();
    let controller = Controller::start(&tmp.path().join("controller"), None);
    let agent = device(&controller, &profile(tmp.path(), "edge", EDGE), "edge").await;
    let id = node_id(&agent).await;
    wait_connected(&controller, 1).await;
    apply_prefetch(&controller, &server.url("smol.gguf")).await;
    let downloading = wait_status(
        &controller,
        "prefetch",
        CONVERGE,
        "a download in progress",
        |s| {
            // Past 16 MiB at 8 MiB/s the download has run for two seconds, so the
            // agent has checkpointed its partial file (every second) and has
            // something to resume from.
            s.devices.iter().any(|d| {
                d.phase == fpb::ModelPhase::Downloading as i32
                    && d.bytes_done > 16 << 20
                    && d.bytes_total == SMOLLM2_SIZE
            })
        },
    )
    .await;
    assert!(!downloading.converged);
    let before = agent.log();
    let agent = agent.restart().await;
    server.throttle("smol.gguf", 0);
    let status = wait_status(
        &controller,
        "prefetch",
        CONVERGE,
        "STORED after the restart",
        |s| s.converged,
    )
    .await;
    assert_eq!(phase(&status, &id, "smol"), Some(fpb::ModelPhase::Stored));
    let resumed = server.seen("smol.gguf").iter().any(|s| {
        s.range
            .as_deref()
            .is_some_and(|r| !r.starts_with("bytes=0-"))
    });
    assert!(
        resumed,
        "the restarted agent resumed with a range request: {:?}\nits log before:\n{before}\nafter:\n{}",
        server.seen("smol.gguf"),
        agent.log()
    );
    drop(agent);
}

/// Where `agent` read smol's file from, by its finished transfer.
async fn smol_source(agent: &Agent) -> String {
    let transfers = agent
        .client()
        .await
        .storage()
        .list_transfers(pb::ListTransfersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .transfers;
    transfers
        .iter()
        .filter(|t| t.model_id == "smol")
        .flat_map(|t| &t.files)
        .map(|f| f.source_url.clone())
        .next()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_downloads_each_model_from_the_origin_once() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    // Each site's origin downloads share 32 MiB/s: slow enough that the second
    // device of a site would start its own download if it were not told to wait.
    let site_limit: u64 = 32 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let controller = Controller::start_with(
        &tmp.path().join("controller"),
        None,
        vec!["--site-origin-rate-limit".into(), "32MiB".into()],
    );
    let edge = profile(tmp.path(), "edge", EDGE);
    let north = [
        device_at(&controller, &edge, "edge", "north").await,
        device_at(&controller, &edge, "edge", "north").await,
    ];
    let south = device_at(&controller, &edge, "edge", "south").await;
    wait_connected(&controller, 3).await;
    let applied = Instant::now();
    apply_prefetch(&controller, &server.url("smol.gguf")).await;
    // While the site's seed downloads, its neighbour waits (PENDING), not downloading.
    let north_ids = [node_id(&north[0]).await, node_id(&north[1]).await];
    let saw_waiting = std::sync::atomic::AtomicBool::new(false);
    let status = wait_status(
        &controller,
        "prefetch",
        CONVERGE,
        "STORED everywhere",
        |s| {
            let phases: Vec<Option<fpb::ModelPhase>> =
                north_ids.iter().map(|id| phase(s, id, "smol")).collect();
            if phases.contains(&Some(fpb::ModelPhase::Downloading))
                && phases.contains(&Some(fpb::ModelPhase::Pending))
            {
                saw_waiting.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            s.converged
        },
    )
    .await;
    assert!(
        saw_waiting.load(std::sync::atomic::Ordering::SeqCst),
        "the neighbour waited while the seed downloaded"
    );
    // Each seed kept to its site's limit (a lower bound on the time: it cannot be
    // broken by a slow machine).
    #[allow(clippy::cast_precision_loss)]
    let floor = Duration::from_secs_f64(0.8 * SMOLLM2_SIZE as f64 / site_limit as f64);
    assert!(applied.elapsed() >= floor, "{:?}", applied.elapsed());
    assert_eq!(status.devices.len(), 3);
    let from_origin = server
        .seen("smol.gguf")
        .iter()
        .filter(|s| s.status / 100 == 2)
        .count();
    assert_eq!(
        from_origin,
        2,
        "one origin download per site: {:?}",
        server.seen("smol.gguf")
    );
    let sources = [smol_source(&north[0]).await, smol_source(&north[1]).await];
    let from_peer = sources
        .iter()
        .filter(|s| s.starts_with("modeld://"))
        .count();
    assert_eq!(
        from_peer, 1,
        "one north device read from its neighbour: {sources:?}"
    );
    let seed = usize::from(sources[1].starts_with("http"));
    let seed_port = north[seed].url().rsplit(':').next().unwrap().to_owned();
    assert!(
        sources[1 - seed].ends_with(&format!(":{seed_port}")),
        "the neighbour read from the seed: {sources:?}"
    );
    assert!(smol_source(&south).await.starts_with("http://"));
    // Both north copies are whole and verified: the stored blob is the origin's.
    for agent in north.iter().chain([&south]) {
        let stored = agent
            .client()
            .await
            .storage()
            .list_stored(pb::ListStoredRequest::default())
            .await
            .unwrap()
            .into_inner()
            .models;
        assert!(
            stored.iter().any(|m| m.model_id == "smol" && m.complete),
            "{stored:?}"
        );
    }
}

/// Waits until `agent` reads the smol model from a peer and has more than `bytes` of
/// it; returns the peer's URL and the bytes done.
async fn reading_from_a_peer_past(agent: &Agent, bytes: u64) -> (String, u64) {
    let client = agent.client().await;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let transfers = client
            .storage()
            .list_transfers(pb::ListTransfersRequest::default())
            .await
            .map(|r| r.into_inner().transfers)
            .unwrap_or_default();
        if let Some(f) = transfers
            .iter()
            .filter(|t| t.model_id == "smol")
            .flat_map(|t| &t.files)
            .find(|f| f.source_url.starts_with("modeld://") && f.bytes_done > bytes)
        {
            return (f.source_url.clone(), f.bytes_done);
        }
        assert!(
            Instant::now() < deadline,
            "never read past {bytes} bytes from a peer: {transfers:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_killed_mid_transfer_hands_over_at_the_same_offset() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    let tmp = tempfile::tempdir().unwrap();
    let controller = Controller::start(&tmp.path().join("controller"), None);
    let edge = profile(tmp.path(), "edge", EDGE);
    // The seed serves its site slowly, so the kill lands mid-transfer.
    let mut seed = device_with(
        &controller,
        &edge,
        "edge",
        "north",
        &["--serve-rate-limit", "8MiB"],
    )
    .await;
    wait_connected(&controller, 1).await;
    apply_prefetch(&controller, &server.url("smol.gguf")).await;
    wait_status(
        &controller,
        "prefetch",
        CONVERGE,
        "stored on the seed",
        |s| s.converged,
    )
    .await;
    assert_eq!(server.seen("smol.gguf").len(), 1);

    // The neighbour joins and reads from the seed.
    let joined = Instant::now();
    let mut neighbour = device_at(&controller, &edge, "edge", "north").await;
    let (peer, _) = reading_from_a_peer_past(&neighbour, 16 << 20).await;
    // Held to the seed's --serve-rate-limit (a lower bound, which a slow machine
    // cannot break: 16 MiB at 8 MiB/s, less the bucket's quarter-second burst).
    assert!(
        joined.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        joined.elapsed()
    );
    assert!(
        peer.ends_with(seed.url().rsplit(':').next().unwrap()),
        "{peer}"
    );
    // Killed and restarted, the neighbour goes on reading from the seed where it
    // stopped: the origin is not asked.
    neighbour.kill9();
    let neighbour = neighbour.restart().await;
    // Offsets are kept at least every second (8 MiB here): the first look after the
    // restart finds the transfer well past zero, not starting over.
    let (_, resumed_at) = reading_from_a_peer_past(&neighbour, 0).await;
    assert!(resumed_at >= 4 << 20, "restarted from {resumed_at}");
    let (_, killed_at) = reading_from_a_peer_past(&neighbour, 24 << 20).await;
    assert_eq!(
        server.seen("smol.gguf").len(),
        1,
        "the restart went to the origin; the neighbour's log:\n{}",
        neighbour.log()
    );
    // The seed dies under it: the origin sends the rest.
    seed.kill9();
    let neighbour_id = node_id(&neighbour).await;
    wait_status(
        &controller,
        "prefetch",
        CONVERGE,
        "stored on the neighbour",
        |s| phase(s, &neighbour_id, "smol") == Some(fpb::ModelPhase::Stored),
    )
    .await;

    // The origin sent the rest, from where the seed stopped, not the whole file again.
    let seen = server.seen("smol.gguf");
    assert_eq!(
        seen.len(),
        2,
        "{seen:?}\nthe neighbour's log:\n{}",
        neighbour.log()
    );
    let range = seen[1].range.clone().unwrap_or_default();
    let resumed_at: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap_or(0);
    assert!(
        resumed_at >= killed_at,
        "the origin was asked for {range:?}, after {killed_at} bytes from the peer"
    );
    assert_eq!(seen[1].status, 206);
    let stored = neighbour
        .client()
        .await
        .storage()
        .list_stored(pb::ListStoredRequest::default())
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(
        stored.iter().any(|m| m.model_id == "smol" && m.complete),
        "{stored:?}"
    );
}

fn field_of(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_deployments_are_refused_whole_with_the_field_named() {
    let tmp = tempfile::tempdir().unwrap();
    let controller = Controller::start(&tmp.path().join("controller"), None);
    let _agent = device(&controller, &profile(tmp.path(), "edge", EDGE), "edge").await;
    wait_connected(&controller, 1).await;
    let mut fleet = controller.client().await;
    let good = gguf_spec("smol", "http://127.0.0.1:9/smol.gguf");
    let apply = |d: fpb::Deployment| fpb::ApplyDeploymentRequest {
        deployment: Some(d),
        dry_run: false,
    };

    let mut bad_digest = good.clone();
    bad_digest.files[0].sha256 = "not-hex".into();
    let cases = [
        (
            deployment(
                "Bad_Name",
                tier("edge"),
                vec![model(good.clone(), fpb::WantedState::Stored)],
            ),
            "deployment.name",
        ),
        (
            deployment(
                "digest",
                tier("edge"),
                vec![model(bad_digest, fpb::WantedState::Stored)],
            ),
            "deployment.models[0].spec.files[0].sha256",
        ),
        (
            deployment(
                "no-state",
                tier("edge"),
                vec![model(good.clone(), fpb::WantedState::Unspecified)],
            ),
            "deployment.models[0].state",
        ),
        (
            deployment("empty", tier("edge"), vec![]),
            "deployment.models",
        ),
        (
            deployment(
                "twice",
                tier("edge"),
                vec![
                    model(good.clone(), fpb::WantedState::Stored),
                    model(good.clone(), fpb::WantedState::Loaded),
                ],
            ),
            "deployment.models[1].spec.id",
        ),
        (
            gated(
                "bad-regex",
                &good,
                fpb::SmokeTest {
                    prompt: "Say a number.".into(),
                    matches: "([0-9]+".into(),
                    ..Default::default()
                },
            ),
            "deployment.rollout.gates.smoke_tests[0].matches",
        ),
        (
            gated(
                "expects-nothing",
                &good,
                fpb::SmokeTest {
                    prompt: "Say a number.".into(),
                    ..Default::default()
                },
            ),
            "deployment.rollout.gates.smoke_tests[0].contains",
        ),
        (
            gated(
                "other-model",
                &good,
                fpb::SmokeTest {
                    model_id: "elsewhere".into(),
                    prompt: "Say a number.".into(),
                    json: true,
                    ..Default::default()
                },
            ),
            "deployment.rollout.gates.smoke_tests[0].model_id",
        ),
    ];
    for (d, field) in cases {
        let status = fleet.apply_deployment(apply(d.clone())).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{}: {status:?}",
            d.name
        );
        assert_eq!(field_of(&status), field, "{}: {}", d.name, status.message());
    }

    // A selector that matches nothing and a memory floor no device has: accepted
    // (devices may come), with a status that says why nothing lands. A watcher sees
    // the apply, and one resuming from before it sees it again.
    let mut live = fleet
        .watch(fpb::WatchRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let nowhere = deployment(
        "nowhere",
        tier("moon"),
        vec![model(good.clone(), fpb::WantedState::Stored)],
    );
    let placement = fleet
        .apply_deployment(apply(nowhere))
        .await
        .unwrap()
        .into_inner()
        .placement
        .unwrap();
    assert_eq!(placement.warning, "no device matches the selector");
    let event = live.message().await.unwrap().unwrap();
    assert_eq!(
        (event.kind, event.deployment.as_str()),
        (fpb::EventKind::DeploymentApplied as i32, "nowhere")
    );
    let mut resumed = fleet
        .watch(fpb::WatchRequest {
            since_revision: event.revision - 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.message().await.unwrap().unwrap(), event);
    let huge = fpb::Selector {
        min_memory_bytes: 1 << 50,
        ..Default::default()
    };
    let placement = fleet
        .apply_deployment(apply(deployment(
            "huge",
            huge,
            vec![model(good.clone(), fpb::WantedState::Stored)],
        )))
        .await
        .unwrap()
        .into_inner()
        .placement
        .unwrap();
    assert_eq!(placement.warning, "no device matches the selector");
    let status = wait_status(
        &controller,
        "huge",
        Duration::from_secs(5),
        "the status",
        |_| true,
    )
    .await;
    assert!(!status.converged && status.warning.contains("no device"));

    // Nothing of the refused ones was stored.
    let names: Vec<String> = fleet
        .list_deployments(fpb::ListDeploymentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .deployments
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, vec!["huge".to_owned(), "nowhere".to_owned()]);
    let missing = fleet
        .delete_deployment(fpb::DeleteDeploymentRequest {
            name: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(modeld_e2e::reason(&missing), "DEPLOYMENT_NOT_FOUND");

    // The CLI names an unknown field in a deployment file and applies nothing.
    let file = tmp.path().join("typo.yaml");
    std::fs::write(&file, "name: typo\nmodles: []\n").unwrap();
    let out = std::process::Command::new(modeld_e2e::binary("modelctl"))
        .args(["fleet", "--fleet-addr", &controller.url(), "apply"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("modles"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_and_operators_need_their_credentials() {
    use modeld_e2e::certs;
    use sha2::Digest as _;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = certs::ca("fleet test CA");
    let (cert, key) = certs::leaf(&ca, "controller", false);
    let ca_path = certs::write(dir, "ca.pem", &ca.pem);
    let hash = |t: &str| hex::encode(sha2::Sha256::digest(t.as_bytes()));
    let tokens = certs::write(
        dir,
        "tokens.toml",
        &format!(
            "[[tokens]]\nname = \"edge-7\"\nrole = \"device\"\nsha256 = \"{}\"\n\n\
             [[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            hash("device-secret"),
            hash("operator-secret")
        ),
    );
    let controller = Controller::start_with(
        &dir.join("controller"),
        None,
        vec![
            "--tls-cert".into(),
            certs::write(dir, "cert.pem", &cert).display().to_string(),
            "--tls-key".into(),
            certs::write(dir, "key.pem", &key).display().to_string(),
            "--tokens-file".into(),
            tokens.display().to_string(),
        ],
    );
    let url = format!("https://localhost:{}", controller.addr.port());
    let tls = modelctl::Tls {
        ca: Some(ca_path.clone()),
        ..Default::default()
    };
    let operator = |token: Option<&'static str>| {
        let (url, tls) = (url.clone(), tls.clone());
        async move {
            let client = modelctl::Client::connect_with_tls(&url, &tls)
                .await
                .unwrap();
            match token {
                Some(t) => client.with_token(t).unwrap().fleet(),
                None => client.fleet(),
            }
        }
    };
    let list = |mut fleet: fpb::fleet_service_client::FleetServiceClient<modelctl::Transport>| async move {
        fleet
            .list_devices(fpb::ListDevicesRequest {})
            .await
            .map(|r| r.into_inner().devices)
    };
    assert_eq!(
        list(operator(None).await).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        list(operator(Some("wrong")).await)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let device_as_operator = list(operator(Some("device-secret")).await)
        .await
        .unwrap_err();
    assert_eq!(device_as_operator.code(), Code::PermissionDenied);
    assert_eq!(modeld_e2e::reason(&device_as_operator), "ROLE_REQUIRED");
    assert!(
        list(operator(Some("operator-secret")).await)
            .await
            .unwrap()
            .is_empty()
    );

    // An agent with an operator's token is no device; one with the device token is.
    let agent_with = |token: &str| {
        let args = vec![
            "--fleet".to_owned(),
            url.clone(),
            "--fleet-tls-ca".into(),
            ca_path.display().to_string(),
            "--fleet-token".into(),
            token.to_owned(),
            "--label".into(),
            "tier=edge".into(),
        ];
        Agent::start_with(AgentOptions {
            args,
            ..AgentOptions::default()
        })
    };
    let impostor = agent_with("operator-secret").await;
    let device = agent_with("device-secret").await;
    let device_id = node_id(&device).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let devices = loop {
        let devices = list(operator(Some("operator-secret")).await).await.unwrap();
        if !devices.is_empty() || Instant::now() > deadline {
            break devices;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        devices.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        vec![device_id]
    );
    let refused = Instant::now() + Duration::from_secs(10);
    while !impostor.log().contains("PermissionDenied") {
        assert!(
            Instant::now() < refused,
            "the impostor was not refused; log:\n{}",
            impostor.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !impostor.log().contains("operator-secret"),
        "the token is never logged"
    );
}

/// Waits until the file at `path` holds `line` (or, with `line` empty, is gone).
async fn wait_file(path: &Path, line: &str) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let text = std::fs::read_to_string(path).ok();
        let done = match text.as_deref() {
            Some(t) => !line.is_empty() && t.lines().any(|l| l == line),
            None => line.is_empty(),
        };
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never showed {line:?}: {text:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_node_feature_discovery_file_follows_the_models() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    let tmp = tempfile::tempdir().unwrap();
    let features = tmp.path().join("modeld");
    let mut agent = Agent::start_with(AgentOptions {
        args: vec![
            "--nfd-features-file".into(),
            features.display().to_string(),
            "--device-profile".into(),
            profile(tmp.path(), "edge", EDGE).display().to_string(),
        ],
        ..AgentOptions::default()
    })
    .await;
    wait_file(&features, "modeld.io/agent=true").await;
    let text = std::fs::read_to_string(&features).unwrap();
    for line in [
        "modeld.io/runtime.llama-cpp=true",
        "modeld.io/device-class=edge-box",
        "modeld.io/memory-gib=8",
        "modeld.io/memory-budget-gib=1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
    }
    let client = agent.client().await;
    client
        .register_model(gguf_spec("smol", &server.url("smol.gguf")))
        .await
        .unwrap();
    client.load_to_end("smol", None).await.unwrap();
    wait_file(&features, "modeld.io/model.smol=ready").await;
    client.unload("smol", None).await.unwrap();
    wait_file(&features, "modeld.io/model.smol=stored").await;
    // A stopped agent advertises nothing.
    assert!(agent.terminate().success());
    wait_file(&features, "").await;
}

/// A deployment of `spec` to the edge tier that asks for `floor` tokens/s, applied as
/// a dry run: where it would go, and why not elsewhere.
async fn placement_with_floor(
    controller: &Controller,
    spec: &pb::ModelSpec,
    floor: f64,
) -> fpb::PlacementResult {
    let mut wanted = model(spec.clone(), fpb::WantedState::Loaded);
    wanted.min_generation_tokens_per_second = floor;
    controller
        .client()
        .await
        .apply_deployment(fpb::ApplyDeploymentRequest {
            deployment: Some(deployment("floored", tier("edge"), vec![wanted])),
            dry_run: true,
        })
        .await
        .unwrap()
        .into_inner()
        .placement
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_speed_floor_is_met_by_the_devices_prediction_before_any_benchmark() {
    let tmp = tempfile::tempdir().unwrap();
    let controller = Controller::start(&tmp.path().join("controller"), None);
    let agent = device(&controller, &profile(tmp.path(), "edge", EDGE), "edge").await;
    let id = node_id(&agent).await;
    wait_connected(&controller, 1).await;
    let spec = gguf_spec("smol", "http://models.invalid/smol.gguf");
    // What the device itself predicts for the model, never having run it.
    let predicted = agent
        .client()
        .await
        .check_compatibility(pb::CheckCompatibilityRequest {
            model: Some(pb::check_compatibility_request::Model::Spec(spec.clone())),
            ..Default::default()
        })
        .await
        .unwrap();
    let predicted = predicted
        .performance
        .clone()
        .unwrap_or_else(|| panic!("{predicted:?}\n{}", agent.log()));
    assert_eq!(predicted.source(), pb::EstimateSource::Predicted);
    let tps = predicted.generation_tokens_per_second;
    assert!(tps > 0.0, "{predicted:?}");

    // The controller predicts the same from the capabilities the device reported.
    let placement = placement_with_floor(&controller, &spec, tps * 0.5).await;
    assert_eq!(placement.device_ids, vec![id.clone()], "{placement:?}");
    let placement = placement_with_floor(&controller, &spec, tps * 2.0).await;
    assert!(placement.device_ids.is_empty(), "{placement:?}");
    let refusal = &placement.unplaced[0];
    assert_eq!(refusal.device_id, id);
    assert!(
        refusal
            .reason
            .contains(&format!("generates about {tps:.1} tokens/s")),
        "{}",
        refusal.reason
    );
}
