//! Every ModelRegistry RPC against a real agent, including bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use modeld_e2e::{Agent, AgentOptions, FileServer, SMOLLM2_SHA256, gguf_spec, pb, reason};
use tonic::Code;

fn list_all() -> pb::ListModelsRequest {
    pb::ListModelsRequest::default()
}

#[tokio::test]
async fn register_get_update_delete_round_trip() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let spec = gguf_spec("round-trip", "https://mirror.example/model.gguf");

    let created = client.register_model(spec.clone()).await.unwrap();
    assert!(created.created);
    let model = created.model.unwrap();
    assert_eq!(model.origin(), pb::ModelOrigin::Registered);
    assert_eq!(model.state(), pb::ModelState::Registered);
    assert_eq!(model.generation, 1);

    let got = client.get_model("round-trip").await.unwrap();
    let got_spec = got.spec.unwrap();
    assert_eq!(got_spec.files[0].sha256, SMOLLM2_SHA256);
    assert_eq!(got_spec.display_name, "round-trip display");
    assert!(got.runtimes.contains(&(pb::Runtime::LlamaCpp as i32)));

    // Only masked fields change.
    let mut patch = pb::ModelSpec {
        id: "round-trip".into(),
        display_name: "Renamed".into(),
        license: "MIT".into(),
        ..Default::default()
    };
    let updated = client
        .update_model(patch.clone(), vec!["display_name".into()])
        .await
        .unwrap();
    let us = updated.spec.unwrap();
    assert_eq!(us.display_name, "Renamed");
    assert_eq!(us.license, "", "license was not in the mask");
    assert_eq!(us.files.len(), 1, "files were not in the mask");
    assert_eq!(updated.generation, 2);

    // The same update again changes nothing, not even the generation.
    patch.license.clear();
    let again = client
        .update_model(patch, vec!["display_name".into()])
        .await
        .unwrap();
    assert_eq!(again.generation, 2);

    client.delete_model("round-trip").await.unwrap();
    let err = client.get_model("round-trip").await.unwrap_err();
    assert_eq!(err.status().unwrap().code(), Code::NotFound);
    assert_eq!(err.reason().as_deref(), Some("MODEL_NOT_FOUND"));
}

#[tokio::test]
async fn registering_the_same_spec_twice_is_a_no_op_and_a_different_one_conflicts() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let spec = gguf_spec("twice", "https://mirror.example/a.gguf");
    assert!(client.register_model(spec.clone()).await.unwrap().created);
    let second = client.register_model(spec.clone()).await.unwrap();
    assert!(!second.created);
    assert_eq!(second.model.unwrap().generation, 1);

    let mut different = spec;
    different.files[0].urls = vec!["https://other.example/a.gguf".into()];
    let err = client.register_model(different).await.unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(
        status.message().contains("UpdateModel"),
        "{}",
        status.message()
    );
}

fn check<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) {
    let status = result.expect_err("request should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} should mention {needle:?}",
        status.message()
    );
    assert!(
        !reason(&status).is_empty(),
        "ErrorInfo reason missing: {status:?}"
    );
}

/// Each bad request gets the right code and a message naming the problem, and the
/// agent keeps serving afterwards.
#[tokio::test]
async fn bad_input_is_refused_clearly_and_the_agent_keeps_serving() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let mut registry = client.registry();

    check(
        registry
            .get_model(pb::GetModelRequest { id: String::new() })
            .await,
        Code::InvalidArgument,
        "id: is required",
    );
    check(
        registry
            .get_model(pb::GetModelRequest {
                id: "No Such/Id".into(),
            })
            .await,
        Code::InvalidArgument,
        "not a valid model id",
    );
    check(
        registry
            .get_model(pb::GetModelRequest {
                id: "missing-model".into(),
            })
            .await,
        Code::NotFound,
        "missing-model",
    );
    check(
        registry
            .list_models(pb::ListModelsRequest {
                page_token: "garbage!!".into(),
                ..list_all()
            })
            .await,
        Code::InvalidArgument,
        "page_token",
    );
    check(
        registry
            .list_models(pb::ListModelsRequest {
                format: 42,
                ..list_all()
            })
            .await,
        Code::InvalidArgument,
        "format: unknown enum value 42",
    );

    let mut unknown_format = gguf_spec("bad-format", "https://h.example/a.gguf");
    unknown_format.format = 99;
    check(
        registry
            .register_model(pb::RegisterModelRequest {
                spec: Some(unknown_format),
            })
            .await,
        Code::InvalidArgument,
        "spec.format",
    );
    let mut no_format = gguf_spec("no-format", "https://h.example/a.gguf");
    no_format.format = 0;
    check(
        registry
            .register_model(pb::RegisterModelRequest {
                spec: Some(no_format),
            })
            .await,
        Code::InvalidArgument,
        "spec.format: is required",
    );
    let mut bad_sha = gguf_spec("bad-sha", "https://h.example/a.gguf");
    bad_sha.files[0].sha256 = "abc".into();
    check(
        registry
            .register_model(pb::RegisterModelRequest {
                spec: Some(bad_sha),
            })
            .await,
        Code::InvalidArgument,
        "spec.files[0].sha256",
    );
    let mut escape = gguf_spec("escape", "https://h.example/a.gguf");
    escape.files[0].name = "../../etc/passwd".into();
    check(
        registry
            .register_model(pb::RegisterModelRequest { spec: Some(escape) })
            .await,
        Code::InvalidArgument,
        "spec.files[0].name",
    );
    let mut bad_url = gguf_spec("bad-url", "ftp://h.example/a.gguf");
    bad_url.files[0].size_bytes = 1;
    check(
        registry
            .register_model(pb::RegisterModelRequest {
                spec: Some(bad_url),
            })
            .await,
        Code::InvalidArgument,
        "ftp",
    );
    check(
        registry
            .register_model(pb::RegisterModelRequest { spec: None })
            .await,
        Code::InvalidArgument,
        "spec: is required",
    );

    client
        .register_model(gguf_spec("target", "https://h.example/a.gguf"))
        .await
        .unwrap();
    check(
        registry
            .update_model(pb::UpdateModelRequest {
                spec: Some(pb::ModelSpec {
                    id: "target".into(),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await,
        Code::InvalidArgument,
        "update_mask",
    );
    check(
        registry
            .update_model(pb::UpdateModelRequest {
                spec: Some(pb::ModelSpec {
                    id: "target".into(),
                    ..Default::default()
                }),
                update_mask: Some(modeld_proto::pbjson_types::FieldMask {
                    paths: vec!["colour".into()],
                }),
            })
            .await,
        Code::InvalidArgument,
        "unknown field \"colour\"",
    );
    check(
        registry
            .update_model(pb::UpdateModelRequest {
                spec: Some(pb::ModelSpec {
                    id: "target".into(),
                    ..Default::default()
                }),
                update_mask: Some(modeld_proto::pbjson_types::FieldMask {
                    paths: vec!["files".into()],
                }),
            })
            .await,
        Code::InvalidArgument,
        "spec.files: needs at least one file",
    );
    check(
        registry
            .delete_model(pb::DeleteModelRequest {
                id: "never-registered".into(),
            })
            .await,
        Code::NotFound,
        "never-registered",
    );

    use pb::import_catalog_request::Source;
    for (manifest, needle) in [
        ("models: [ {id: x", "not valid YAML"),
        ("{\"models\": 3}", "top level"),
        (
            "[{\"id\": \"x\", \"format\": \"pickle\", \"files\": []}]",
            "pickle",
        ),
        (
            "[{\"id\": \"ok\", \"format\": \"gguf\", \"files\": [], \"colour\": 1}]",
            "colour",
        ),
        (
            "- id: y\n  format: gguf\n  files: []\n",
            "models[0].files: needs at least one file",
        ),
    ] {
        check(
            registry
                .import_catalog(pb::ImportCatalogRequest {
                    source: Some(Source::Content(manifest.into())),
                    format: 0,
                })
                .await,
            Code::InvalidArgument,
            needle,
        );
    }
    check(
        registry
            .import_catalog(pb::ImportCatalogRequest {
                source: None,
                format: 0,
            })
            .await,
        Code::InvalidArgument,
        "source",
    );
    check(
        registry
            .import_catalog(pb::ImportCatalogRequest {
                source: Some(Source::Path("relative/catalog.yaml".into())),
                format: 0,
            })
            .await,
        Code::InvalidArgument,
        "absolute",
    );
    check(
        registry
            .import_catalog(pb::ImportCatalogRequest {
                source: Some(Source::Path("/nonexistent/catalog.yaml".into())),
                format: 0,
            })
            .await,
        // Outside the allowed directories: refused without a word about the file.
        Code::PermissionDenied,
        "allows",
    );
    let inside = std::env::temp_dir().join("modeld-no-such-catalog.yaml");
    check(
        registry
            .import_catalog(pb::ImportCatalogRequest {
                source: Some(Source::Path(inside.display().to_string())),
                format: 0,
            })
            .await,
        Code::FailedPrecondition,
        "modeld-no-such-catalog.yaml",
    );
    check(
        registry
            .check_compatibility(pb::CheckCompatibilityRequest {
                model: None,
                runtime: 0,
                context_length: 0,
            })
            .await,
        Code::InvalidArgument,
        "model",
    );

    // Nothing half-written: only the one valid model and the built-in are registered.
    let models = client.list_all_models(list_all()).await.unwrap();
    let ids: Vec<_> = models
        .iter()
        .map(|m| m.spec.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(ids, ["smollm2-135m-instruct", "target"]);
    assert!(client.is_serving().await.unwrap());
}

#[tokio::test]
async fn list_filters_on_every_criterion() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let manifest = r#"
models:
  - id: phone-onnx
    family: phi
    format: onnx
    quantization: int8
    context_length: 2048
    tags: [vision]
    files: [{name: m.onnx, urls: ["https://h.example/m.onnx"], sha256: "1111111111111111111111111111111111111111111111111111111111111111", size_bytes: 1000}]
  - id: big-gguf
    display_name: Big Llama
    family: llama
    format: gguf
    quantization: Q4_K_M
    context_length: 131072
    files: [{name: m.gguf, urls: ["https://h.example/m.gguf"], sha256: "2222222222222222222222222222222222222222222222222222222222222222", size_bytes: 4000000000}]
  - id: apple-only
    family: whisper
    format: coreml
    files: [{name: m.mlmodel, urls: ["https://h.example/m.mlmodel"], sha256: "3333333333333333333333333333333333333333333333333333333333333333", size_bytes: 5000}]
"#;
    client
        .import_catalog(
            pb::import_catalog_request::Source::Content(manifest.into()),
            pb::CatalogFormat::Yaml,
        )
        .await
        .unwrap();
    let ids = |req: pb::ListModelsRequest| {
        let client = client.clone();
        async move {
            client
                .list_all_models(req)
                .await
                .unwrap()
                .into_iter()
                .map(|m| m.spec.unwrap().id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        ids(pb::ListModelsRequest {
            format: pb::ModelFormat::Onnx as i32,
            ..list_all()
        })
        .await,
        ["phone-onnx"]
    );
    assert_eq!(
        ids(pb::ListModelsRequest {
            runtime: pb::Runtime::LlamaCpp as i32,
            ..list_all()
        })
        .await,
        ["big-gguf", "smollm2-135m-instruct"]
    );
    assert_eq!(
        ids(pb::ListModelsRequest {
            quantization: "q4_k_m".into(),
            ..list_all()
        })
        .await,
        ["big-gguf"]
    );
    assert_eq!(
        ids(pb::ListModelsRequest {
            max_size_bytes: 200_000_000,
            ..list_all()
        })
        .await,
        ["apple-only", "phone-onnx", "smollm2-135m-instruct"]
    );
    assert_eq!(
        ids(pb::ListModelsRequest {
            min_context_length: 8192,
            ..list_all()
        })
        .await,
        ["big-gguf", "smollm2-135m-instruct"]
    );
    assert_eq!(
        ids(pb::ListModelsRequest {
            accelerator: pb::Accelerator::Ane as i32,
            ..list_all()
        })
        .await,
        ["apple-only", "phone-onnx"]
    );
    assert_eq!(
        ids(pb::ListModelsRequest {
            query: "VISION".into(),
            ..list_all()
        })
        .await,
        ["phone-onnx"]
    );
    assert_eq!(
        ids(pb::ListModelsRequest {
            query: "big llama".into(),
            ..list_all()
        })
        .await,
        ["big-gguf"]
    );
    assert_eq!(
        ids(pb::ListModelsRequest {
            query: "whisper".into(),
            ..list_all()
        })
        .await,
        ["apple-only"]
    );
    // Filters combine with AND.
    assert!(
        ids(pb::ListModelsRequest {
            format: pb::ModelFormat::Onnx as i32,
            query: "llama".into(),
            ..list_all()
        })
        .await
        .is_empty()
    );
}

#[tokio::test]
async fn list_paginates_with_opaque_tokens() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    for i in 0..7 {
        client
            .register_model(gguf_spec(&format!("page-{i}"), "https://h.example/a.gguf"))
            .await
            .unwrap();
    }
    let mut registry = client.registry();
    let filter = pb::ListModelsRequest {
        query: "page-".into(),
        page_size: 3,
        ..list_all()
    };
    let mut seen = Vec::new();
    let mut request = filter.clone();
    let mut pages = 0;
    loop {
        let page = registry
            .list_models(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_size, 7);
        assert!(page.models.len() <= 3);
        seen.extend(page.models.into_iter().map(|m| m.spec.unwrap().id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        // A token is bound to the filter it was issued for.
        let replay = registry
            .list_models(pb::ListModelsRequest {
                page_token: page.next_page_token.clone(),
                query: "other".into(),
                ..list_all()
            })
            .await
            .unwrap_err();
        assert_eq!(replay.code(), Code::InvalidArgument);
        assert_eq!(reason(&replay), "INVALID_PAGE_TOKEN");
        request.page_token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..7).map(|i| format!("page-{i}")).collect();
    assert_eq!(seen, expected);

    let negative = registry
        .list_models(pb::ListModelsRequest {
            page_size: -1,
            ..list_all()
        })
        .await
        .unwrap_err();
    assert_eq!(negative.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn import_catalog_from_inline_path_and_url_is_idempotent() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let json = r#"{"models": [
        {"id": "cat-a", "format": "gguf", "files": [{"name": "a.gguf", "urls": ["https://h.example/a.gguf", "https://mirror.example/a.gguf"], "sha256": "1111111111111111111111111111111111111111111111111111111111111111", "size": 10}]},
        {"id": "cat-b", "format": "tflite", "tags": ["vision"], "files": [{"name": "b.tflite", "urls": ["https://h.example/b.tflite"], "sha256": "2222222222222222222222222222222222222222222222222222222222222222", "size_bytes": 20}]}
    ]}"#;
    let yaml = "- id: cat-c\n  format: onnx\n  files:\n    - {name: c.onnx, urls: [\"https://h.example/c.onnx\"], sha256: \"3333333333333333333333333333333333333333333333333333333333333333\", size_bytes: 30}\n";
    std::fs::write(dir.path().join("catalog.json"), json).unwrap();
    std::fs::write(dir.path().join("catalog.yaml"), yaml).unwrap();
    let server = FileServer::serve(dir.path().to_path_buf()).await;

    use pb::import_catalog_request::Source;
    let inline = client
        .import_catalog(Source::Content(json.into()), pb::CatalogFormat::Unspecified)
        .await
        .unwrap();
    assert_eq!(inline.created_ids, ["cat-a", "cat-b"]);
    let path = dir.path().join("catalog.yaml").display().to_string();
    let from_path = client
        .import_catalog(Source::Path(path.clone()), pb::CatalogFormat::Unspecified)
        .await
        .unwrap();
    assert_eq!(from_path.created_ids, ["cat-c"]);

    let before = client.list_all_models(list_all()).await.unwrap();
    let from_url = client
        .import_catalog(
            Source::Url(server.url("catalog.json")),
            pb::CatalogFormat::Json,
        )
        .await
        .unwrap();
    assert!(from_url.created_ids.is_empty() && from_url.updated_ids.is_empty());
    assert_eq!(from_url.unchanged_ids, ["cat-a", "cat-b"]);
    let again = client
        .import_catalog(Source::Path(path), pb::CatalogFormat::Yaml)
        .await
        .unwrap();
    assert_eq!(again.unchanged_ids, ["cat-c"]);
    let after = client.list_all_models(list_all()).await.unwrap();
    assert_eq!(
        before, after,
        "re-importing the same manifests changed the registry"
    );

    // A changed manifest updates only the entry that changed.
    let changed = json.replace("\"tags\": [\"vision\"]", "\"tags\": [\"vision\", \"edge\"]");
    let update = client
        .import_catalog(Source::Content(changed), pb::CatalogFormat::Json)
        .await
        .unwrap();
    assert_eq!(update.updated_ids, ["cat-b"]);
    assert_eq!(update.unchanged_ids, ["cat-a"]);
    assert_eq!(client.get_model("cat-b").await.unwrap().generation, 2);

    // Bad URLs: a 404 is the caller's to fix; an unreachable host is retryable.
    let missing = client
        .import_catalog(
            Source::Url(server.url("missing.json")),
            pb::CatalogFormat::Unspecified,
        )
        .await
        .unwrap_err();
    assert_eq!(missing.status().unwrap().code(), Code::FailedPrecondition);
    assert!(missing.status().unwrap().message().contains("404"));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/catalog.json", closed.local_addr().unwrap());
    drop(closed);
    let unreachable = client
        .import_catalog(Source::Url(dead), pb::CatalogFormat::Unspecified)
        .await
        .unwrap_err();
    assert_eq!(unreachable.status().unwrap().code(), Code::Unavailable);
    assert_eq!(unreachable.reason().as_deref(), Some("CATALOG_UNAVAILABLE"));
}

#[tokio::test]
async fn builtin_catalog_holds_the_default_model() {
    let agent = Agent::start().await;
    let model = agent
        .client()
        .await
        .get_model("smollm2-135m-instruct")
        .await
        .unwrap();
    assert_eq!(model.origin(), pb::ModelOrigin::Builtin);
    let spec = model.spec.unwrap();
    assert_eq!(spec.format(), pb::ModelFormat::Gguf);
    assert_eq!(spec.quantization, "Q4_1");
    assert_eq!(spec.files[0].sha256, SMOLLM2_SHA256);
    assert_eq!(spec.files[0].size_bytes, 98_362_432);
    assert!(spec.files[0].urls[0].starts_with("https://huggingface.co/"));
}

#[tokio::test]
async fn check_compatibility_answers_before_download() {
    let agent = Agent::start_with(AgentOptions {
        args: vec![
            "--memory-budget".into(),
            "100MB".into(),
            "--disk-quota".into(),
            "50MB".into(),
        ],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let by_id = |id: &str| pb::CheckCompatibilityRequest {
        model: Some(pb::check_compatibility_request::Model::Id(id.into())),
        runtime: 0,
        context_length: 0,
    };
    let c = client
        .check_compatibility(by_id("smollm2-135m-instruct"))
        .await
        .unwrap();
    assert!(!c.compatible);
    assert!(c.runtime_available, "this build has llama.cpp");
    assert_eq!(
        c.settings.as_ref().unwrap().runtime(),
        pb::Runtime::LlamaCpp
    );
    assert!(!c.fits_memory && !c.fits_disk);
    assert_eq!(c.memory_available_bytes, 100_000_000);
    assert_eq!(c.disk_required_bytes, 98_362_432);
    assert!(c.disk_available_bytes <= 50_000_000);
    assert_eq!(c.reasons.len(), 2, "memory and disk: {:?}", c.reasons);
    assert!(
        c.reasons.iter().any(|r| r.contains("memory")),
        "{:?}",
        c.reasons
    );
    assert!(
        c.reasons.iter().any(|r| r.contains("quota")),
        "{:?}",
        c.reasons
    );
    assert_eq!(
        c.candidate_runtimes,
        [pb::Runtime::LlamaCpp as i32, pb::Runtime::Candle as i32]
    );

    let wrong_runtime = client
        .check_compatibility(pb::CheckCompatibilityRequest {
            runtime: pb::Runtime::OnnxRuntime as i32,
            ..by_id("smollm2-135m-instruct")
        })
        .await
        .unwrap();
    assert!(
        wrong_runtime
            .reasons
            .iter()
            .any(|r| r.contains("onnxruntime cannot run gguf")),
        "{:?}",
        wrong_runtime.reasons
    );

    // An unregistered spec can be checked too.
    let spec = pb::ModelSpec {
        estimated_memory_bytes: 10_000_000,
        ..gguf_spec("unregistered", "https://h.example/x.gguf")
    };
    let unregistered = client
        .check_compatibility(pb::CheckCompatibilityRequest {
            model: Some(pb::check_compatibility_request::Model::Spec(spec)),
            runtime: 0,
            context_length: 0,
        })
        .await
        .unwrap();
    assert!(unregistered.fits_memory);
    assert_eq!(unregistered.memory_required_bytes, 10_000_000);

    let missing = client.check_compatibility(by_id("nope")).await.unwrap_err();
    assert_eq!(missing.status().unwrap().code(), Code::NotFound);
}
