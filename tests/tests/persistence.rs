//! What an RPC acknowledged survives kill -9.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use modeld_e2e::{Agent, gguf_spec, pb};

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let node_id = client.capabilities().await.unwrap().node_id;

    for i in 0..20 {
        client
            .register_model(gguf_spec(
                &format!("durable-{i:02}"),
                "https://h.example/a.gguf",
            ))
            .await
            .unwrap();
    }
    client
        .update_model(
            pb::ModelSpec {
                id: "durable-03".into(),
                display_name: "Updated before the crash".into(),
                ..Default::default()
            },
            vec!["display_name".into()],
        )
        .await
        .unwrap();
    client.delete_model("durable-07").await.unwrap();
    client.delete_model("smollm2-135m-instruct").await.unwrap();
    client
        .import_catalog(
            pb::import_catalog_request::Source::Content(
                "- {id: imported-last, format: tflite, files: [{name: m.tflite, urls: [\"https://h.example/m\"], sha256: \"4444444444444444444444444444444444444444444444444444444444444444\", size_bytes: 4}]}\n".into(),
            ),
            pb::CatalogFormat::Unspecified,
        )
        .await
        .unwrap();
    let before = client
        .list_all_models(pb::ListModelsRequest::default())
        .await
        .unwrap();

    // SIGKILL right after the last answer: no shutdown code gets to run.
    let mut agent = agent;
    agent.kill9();
    let agent = agent.restart().await;
    let client = agent.client().await;

    let after = client
        .list_all_models(pb::ListModelsRequest::default())
        .await
        .unwrap();
    assert_eq!(before, after, "the registry changed across kill -9");
    assert_eq!(
        client
            .get_model("durable-03")
            .await
            .unwrap()
            .spec
            .unwrap()
            .display_name,
        "Updated before the crash"
    );
    assert!(client.get_model("durable-07").await.is_err());
    assert!(client.get_model("imported-last").await.is_ok());
    // A deleted built-in model stays deleted after a restart.
    assert!(client.get_model("smollm2-135m-instruct").await.is_err());
    assert_eq!(
        client.capabilities().await.unwrap().node_id,
        node_id,
        "node id must be stable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_flushes_and_exits_cleanly() {
    use tokio_stream::StreamExt;

    let mut agent = Agent::start().await;
    let client = agent.client().await;
    client
        .register_model(gguf_spec("before-sigterm", "https://h.example/a.gguf"))
        .await
        .unwrap();
    let mut stream = client
        .node()
        .watch_resources(pb::WatchResourcesRequest {
            interval: Some(modeld_proto::pbjson_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.next().await.unwrap().is_ok());

    let status = tokio::task::block_in_place(|| agent.terminate());
    assert!(
        status.success(),
        "modeld exited with {status}; log:\n{}",
        agent.log()
    );
    // The open stream ends (it must not hang): with UNAVAILABLE when the agent said
    // goodbye in time, or with the connection closing.
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(item) = stream.next().await {
            if let Err(status) = item {
                return Some(status);
            }
        }
        None
    })
    .await
    .expect("the stream did not end after SIGTERM");
    if let Some(status) = end {
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ),
            "{status:?}"
        );
    }
    let log = agent.log();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("store flushed"), "{log}");

    let agent = agent.restart().await;
    assert!(
        agent
            .client()
            .await
            .get_model("before-sigterm")
            .await
            .is_ok()
    );
}
