//! The memory manager on real agents: a budget too small refuses with the numbers,
//! idle models are evicted least recently used first, pinned and busy ones never,
//! and keep-alive unloads an idle model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use modeld_e2e::{Agent, AgentOptions, Assets, Client, gguf_spec, pb, reason};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

/// SmolLM2 with a 256-token context and one slot needs ~125 MB by the agent's
/// estimate (91 MB of weights, the KV cache, compute buffers): a 200 MB budget holds
/// one such model, not two.
async fn agent(budget: &str) -> (Agent, Client) {
    let agent = Agent::start_with(AgentOptions {
        args: [
            "--memory-budget",
            budget,
            "--context-length",
            "256",
            "--parallel",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        ..AgentOptions::default()
    })
    .await;
    let client = agent.client().await;
    let url = format!("file://{}", Assets::get().gguf.display());
    for id in ["a", "b"] {
        client.register_model(gguf_spec(id, &url)).await.unwrap();
        client.pull_to_end(id).await.unwrap();
    }
    (agent, client)
}

async fn loaded(client: &Client) -> Vec<String> {
    client
        .list_loaded()
        .await
        .unwrap()
        .models
        .into_iter()
        .map(|m| m.model_id)
        .collect()
}

fn pinned() -> Option<pb::LoadOptions> {
    Some(pb::LoadOptions {
        pin: true,
        ..Default::default()
    })
}

#[tokio::test]
async fn a_model_bigger_than_the_budget_is_refused_with_the_numbers() {
    let (_agent, client) = agent("50MB").await;
    let err = client.load_to_end("a", None).await.unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(status), "MEMORY_EXHAUSTED");
    let info = status.get_error_details().error_info().cloned().unwrap();
    let needed: u64 = info.metadata["needed_bytes"].parse().unwrap();
    let available: u64 = info.metadata["available_bytes"].parse().unwrap();
    assert!(needed > 90_000_000 && available == 50_000_000, "{info:?}");
    assert!(status.message().contains(&needed.to_string()));
    // Nothing is wrong with the model: it is back to downloaded, and the agent serves.
    let state = client.state("a", 0).await.unwrap();
    assert_eq!(state.state(), pb::ModelState::Downloaded);
    assert!(client.is_serving().await.unwrap());
}

#[tokio::test]
async fn idle_models_are_evicted_lru_first_but_pinned_and_busy_ones_stay() {
    let (_agent, client) = agent("200MB").await;
    client.load_to_end("a", None).await.unwrap();
    client.load_to_end("b", None).await.unwrap();
    assert_eq!(
        loaded(&client).await,
        vec!["b"],
        "a was evicted to make room"
    );
    let evicted = client.state("a", 0).await.unwrap().history;
    assert!(
        evicted
            .iter()
            .any(|t| t.to_state() == pb::ModelState::Unloading
                && t.reason.contains("least recently used")),
        "{evicted:?}"
    );

    // Pinned: loading it evicts b, and then nothing can evict it.
    client.load_to_end("a", pinned()).await.unwrap();
    assert_eq!(loaded(&client).await, vec!["a"]);
    let err = client.load_to_end("b", None).await.unwrap_err();
    assert_eq!(reason(err.status().unwrap()), "MEMORY_EXHAUSTED");
    assert_eq!(loaded(&client).await, vec!["a"]);
    client.unload("a", None).await.unwrap();

    // Busy: a model generating is never evicted.
    client.load_to_end("b", None).await.unwrap();
    let mut stream = client
        .generate()
        .generate(pb::GenerateRequest {
            model_id: "b".into(),
            input: Some(pb::generate_request::Input::Prompt(
                "Once upon a time".into(),
            )),
            max_tokens: 150,
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let err = client.load_to_end("a", None).await.unwrap_err();
    assert_eq!(reason(err.status().unwrap()), "MEMORY_EXHAUSTED");
    while stream.next().await.is_some() {}
    // Once it is idle again it can go.
    client.load_to_end("a", None).await.unwrap();
    assert_eq!(loaded(&client).await, vec!["a"]);
}

#[tokio::test]
async fn an_idle_model_unloads_when_its_keep_alive_expires() {
    let (_agent, client) = agent("1GB").await;
    client
        .load_to_end(
            "a",
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
    client
        .load_to_end(
            "b",
            Some(pb::LoadOptions {
                keep_alive: Some(modeld_proto::pbjson_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let listed = client.list_loaded().await.unwrap();
    let a = listed.models.iter().find(|m| m.model_id == "a").unwrap();
    let b = listed.models.iter().find(|m| m.model_id == "b").unwrap();
    assert!(
        a.expire_time.is_some() && b.expire_time.is_none(),
        "{listed:?}"
    );
    let mut gone = false;
    for _ in 0..200 {
        if loaded(&client).await == vec!["b"] {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "a should have unloaded after its 1 s keep-alive");
    assert!(
        client
            .state("a", 0)
            .await
            .unwrap()
            .history
            .iter()
            .any(|t| t.reason.contains("keep-alive expired"))
    );
    // The unload finishes: the model is back to DOWNLOADED, not stuck unloading.
    let mut state = pb::ModelState::Unspecified;
    for _ in 0..100 {
        state = client.state("a", 0).await.unwrap().state();
        if state == pb::ModelState::Downloaded {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, pb::ModelState::Downloaded);
}

/// A memory cgroup of this test's own under the one it runs in, limited to `limit`
/// bytes; `None` (and why) where no cgroup can be created here.
fn limited_cgroup(limit: u64) -> Result<std::path::PathBuf, String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    // v1: the memory controller's own hierarchy; v2: the unified one.
    let (base, own, file) = if let Some(path) = cgroups
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned()))
    {
        (
            std::path::PathBuf::from("/sys/fs/cgroup/memory"),
            path,
            "memory.limit_in_bytes",
        )
    } else if let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) {
        (
            std::path::PathBuf::from("/sys/fs/cgroup"),
            path.to_owned(),
            "memory.max",
        )
    } else {
        return Err("no memory cgroup in /proc/self/cgroup".into());
    };
    let dir = base
        .join(own.trim_start_matches('/'))
        .join(format!("modeld-e2e-{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Err(e) = std::fs::write(dir.join(file), limit.to_string()) {
        let _ = std::fs::remove_dir(&dir);
        return Err(format!("{}: {e}", dir.join(file).display()));
    }
    Ok(dir)
}

#[tokio::test]
async fn the_default_budget_follows_the_cgroup_memory_limit() {
    const LIMIT: u64 = 1 << 30;
    let cgroup = match limited_cgroup(LIMIT) {
        Ok(dir) => dir,
        Err(why) => {
            // The reading itself is covered by hardware::cgroup's tests on a fake
            // cgroup filesystem; this one needs a real cgroup to put the agent in.
            eprintln!("no cgroup can be created here ({why}): skipping the real-cgroup test");
            return;
        }
    };
    // The agent starts inside the cgroup: a wrapper moves itself in, then execs it.
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = tmp.path().join("modeld-in-cgroup");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho $$ > '{}/cgroup.procs' || exit 99\nexec '{}' \"$@\"\n",
            cgroup.display(),
            modeld_e2e::binary("modeld").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut agent = Agent::start_with(AgentOptions {
        binary: Some(wrapper),
        ..AgentOptions::default()
    })
    .await;
    let caps = agent.client().await.capabilities().await.unwrap();
    let memory = caps.memory.unwrap();
    assert_eq!(memory.cgroup_limit_bytes, LIMIT, "{memory:?}");
    assert!(
        memory.total_bytes > LIMIT,
        "the host has more than the cgroup allows"
    );
    assert_eq!(
        caps.memory_budget_bytes,
        LIMIT * 3 / 4,
        "the default budget is 75% of the cgroup's limit, not of the host's memory"
    );
    agent.terminate();
    drop(agent);
    // Empty now: the cgroup can go.
    for _ in 0..50 {
        if std::fs::remove_dir(&cgroup).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
