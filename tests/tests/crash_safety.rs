//! Crash safety at scale: a random mix of operations (register, pull, push, load,
//! generate, unload, delete) runs against an agent that is killed with SIGKILL at a
//! random moment, again and again on the same data directory. After every restart:
//! the store opens, nothing acknowledged is lost, no model is stuck in a transient
//! state, and every blob on disk is whole (its name is its digest).
//!
//! `MODELD_CRASH_ROUNDS` sets the rounds (10 here in CI; `bench/crash.sh` runs 100),
//! `MODELD_CRASH_SEED` the seed; a failure names both.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modeld_e2e::{Agent, AgentOptions, Assets, Client, gguf_spec, pb};
use sha2::Digest as _;

/// A small deterministic generator: a failing round replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the agent acknowledged, and what was in flight when it died.
#[derive(Debug, Default)]
struct Ledger {
    registered: BTreeSet<String>,
    stored: BTreeSet<String>,
    /// A delete was sent: whether it landed before the kill is unknown.
    deleting: BTreeSet<String>,
    /// Registered with this digest and size.
    files: BTreeMap<String, (String, u64)>,
    /// Acknowledged registrations and stores, over every round.
    acknowledged: usize,
}

fn small_model(dir: &Path, id: &str, rng: &mut Rng) -> (pb::ModelSpec, String, u64) {
    let len = 1024 + rng.below(64 * 1024) as usize;
    let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    let path = dir.join(format!("{id}.bin"));
    std::fs::write(&path, &bytes).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let spec = pb::ModelSpec {
        id: id.to_owned(),
        format: pb::ModelFormat::Gguf as i32,
        files: vec![pb::ModelFile {
            name: format!("{id}.gguf"),
            urls: vec![format!("file://{}", path.display())],
            sha256: sha.clone(),
            size_bytes: len as u64,
            ..Default::default()
        }],
        ..Default::default()
    };
    (spec, sha, len as u64)
}

/// One operation, chosen by `rng`; records what the agent acknowledged.
async fn operate(
    client: &Client,
    agent_url: &str,
    dir: &Path,
    ledger: &Mutex<Ledger>,
    rng: &mut Rng,
    serial: &mut u32,
) {
    match rng.below(7) {
        0 | 1 => {
            *serial += 1;
            let id = format!("m{}-{serial}", rng.below(1_000_000));
            let (spec, sha, size) = small_model(dir, &id, rng);
            if client.register_model(spec).await.is_ok() {
                let mut l = ledger.lock().unwrap();
                l.registered.insert(id.clone());
                l.files.insert(id.clone(), (sha, size));
                l.acknowledged += 1;
            }
            if client.pull_to_end(&id).await.is_ok() {
                let mut l = ledger.lock().unwrap();
                l.stored.insert(id);
                l.acknowledged += 1;
            }
        }
        2 => {
            // A push: registered with a source that cannot be reached, then uploaded.
            *serial += 1;
            let id = format!("p{}-{serial}", rng.below(1_000_000));
            let (mut spec, sha, size) = small_model(dir, &id, rng);
            let file = dir.join(format!("{id}.bin"));
            spec.files[0].urls = vec!["https://unreachable.invalid/x.gguf".into()];
            if client.register_model(spec).await.is_ok() {
                let mut l = ledger.lock().unwrap();
                l.registered.insert(id.clone());
                l.files.insert(id.clone(), (sha, size));
            }
            let pushed = tokio::process::Command::new(modeld_e2e::binary("modelctl"))
                .args(["--addr", agent_url, "push", &id])
                .arg(&file)
                .output()
                .await;
            if pushed.is_ok_and(|o| o.status.success()) {
                let mut l = ledger.lock().unwrap();
                l.stored.insert(id);
                l.acknowledged += 1;
            }
        }
        3 => {
            let _ = client.load_to_end("smol", None).await;
        }
        4 => {
            let request = pb::GenerateRequest {
                model_id: "smol".into(),
                input: Some(pb::generate_request::Input::Prompt("Once upon".into())),
                max_tokens: 4,
                ..Default::default()
            };
            if let Ok(s) = client.generate().generate(request).await {
                let mut s = s.into_inner();
                while let Some(Ok(_)) = s.message().await.transpose() {}
            }
        }
        5 => {
            let _ = client.unload("smol", None).await;
        }
        _ => {
            let victim = {
                let l = ledger.lock().unwrap();
                let ids: Vec<_> = l.registered.iter().cloned().collect();
                (!ids.is_empty()).then(|| ids[rng.below(ids.len() as u64) as usize].clone())
            };
            if let Some(id) = victim {
                ledger.lock().unwrap().deleting.insert(id.clone());
                if client.delete_model(&id).await.is_ok() {
                    let mut l = ledger.lock().unwrap();
                    l.registered.remove(&id);
                    l.stored.remove(&id);
                }
            }
        }
    }
}

fn transient(state: pb::ModelState) -> bool {
    matches!(
        state,
        pb::ModelState::Extracting
            | pb::ModelState::Validating
            | pb::ModelState::Initializing
            | pb::ModelState::Loading
            | pb::ModelState::Unloading
    )
}

/// Every blob's name is its digest: nothing half-written was kept.
fn check_blobs(data: &Path) {
    let dir = data.join("blobs/sha256");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let digest = hex::encode(sha2::Sha256::digest(&bytes));
        assert_eq!(
            path.file_name().unwrap().to_string_lossy(),
            digest,
            "blob {} is not whole",
            path.display()
        );
    }
}

#[tokio::test]
async fn random_operations_survive_kill_9_at_random_moments() {
    let rounds: u64 = std::env::var("MODELD_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("MODELD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe);
    let sources = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_with(AgentOptions::default()).await;
    let data = agent.data_dir.clone();
    let client = agent.client().await;
    let url = format!("file://{}", Assets::get().gguf.display());
    client
        .register_model(gguf_spec("smol", &url))
        .await
        .unwrap();
    client.pull_to_end("smol").await.unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    for round in 0..rounds {
        let mut rng = Rng(seed ^ (round + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let ops = {
            let (client, ledger) = (agent.client().await, ledger.clone());
            let (dir, url) = (sources.path().to_path_buf(), agent.url());
            let mut rng = Rng(rng.next() | 1);
            tokio::spawn(async move {
                let mut serial = 0;
                loop {
                    operate(&client, &url, &dir, &ledger, &mut rng, &mut serial).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(50 + rng.below(950))).await;
        agent.kill9();
        ops.abort();
        let _ = ops.await;

        let context = format!("round {round} of {rounds}, MODELD_CRASH_SEED={seed}");
        agent = agent.restart().await;
        let client = agent.client().await;
        // Interrupted transfers resume on their own; give them a moment to settle.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let models = loop {
            let models = client
                .list_all_models(pb::ListModelsRequest::default())
                .await
                .unwrap();
            let busy = models
                .iter()
                .any(|m| m.state() == pb::ModelState::Downloading);
            if !busy || std::time::Instant::now() > deadline {
                break models;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let states: BTreeMap<String, pb::ModelState> = models
            .iter()
            .map(|m| (m.spec.as_ref().unwrap().id.clone(), m.state()))
            .collect();
        for (id, state) in &states {
            assert!(
                !transient(*state) && *state != pb::ModelState::Downloading,
                "{context}: {id} is stuck in {state:?}"
            );
        }
        let stored: BTreeSet<String> = client
            .storage()
            .list_stored(pb::ListStoredRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .models
            .into_iter()
            .filter(|m| m.complete)
            .map(|m| m.model_id)
            .collect();
        {
            let mut l = ledger.lock().unwrap();
            let deleting = std::mem::take(&mut l.deleting);
            for id in &l.registered {
                if deleting.contains(id) {
                    continue;
                }
                assert!(
                    states.contains_key(id),
                    "{context}: registered {id} was lost"
                );
            }
            for id in &l.stored {
                if deleting.contains(id) {
                    continue;
                }
                assert!(stored.contains(id), "{context}: stored {id} was lost");
            }
            // An acknowledged store is a whole blob on disk, under the file's digest.
            for id in &l.stored {
                if deleting.contains(id) {
                    continue;
                }
                let (sha, size) = &l.files[id];
                let blob = data.join("blobs/sha256").join(sha);
                let on_disk = std::fs::metadata(&blob).map(|m| m.len());
                assert_eq!(on_disk.ok(), Some(*size), "{context}: {id}'s blob {sha}");
            }
            // What the delete in flight did is now known.
            l.registered.retain(|id| states.contains_key(id));
            l.stored.retain(|id| stored.contains(id));
        }
        assert!(states.contains_key("smol"), "{context}: smol was lost");
        check_blobs(&data);
    }
    let l = ledger.lock().unwrap();
    eprintln!(
        "{rounds} kills: {} acknowledgements checked; {} models and {} stored at the end",
        l.acknowledged,
        l.registered.len(),
        l.stored.len()
    );
    assert!(
        l.acknowledged > 0,
        "no operation completed between the kills"
    );
}
