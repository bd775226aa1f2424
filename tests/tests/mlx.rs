//! MLX models: the derived safetensors directory quantized by MLX itself (mlx-lm's
//! converter, 4-bit affine groups), run by candle behind the same lifecycle and
//! held to mlx-lm running the same files (scripts/mlx-reference.py).

#![cfg(feature = "candle")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use modeld_e2e::{
    Agent, Assets, COMPARISON_PROMPTS, Client, Reference, argmax, assert_candle_refuses,
    assert_loads_with, gguf_spec, greedy, largest_difference, pb, reason, reference_run, scan_for,
    tokenize,
};
use modeld_engine_candle::CandleEngine;
use modeld_engine_core::LoadOptions;
use serde_json::Value;
use tonic::Code;

const PROMPTS: [(&str, bool); 5] = COMPARISON_PROMPTS;
const GREEDY_TOKENS: u32 = 16;

fn mlx_reference(assets: &Assets) -> Vec<Reference> {
    reference_run(
        assets,
        "mlx-reference.py",
        &assets.mlx_dir,
        &PROMPTS,
        GREEDY_TOKENS,
    )
}

/// An agent with the MLX directory scanned in (and the GGUF as "smol"); returns the
/// MLX model's id.
async fn agent_with_mlx(assets: &Assets) -> (Agent, Client, String) {
    let agent = Agent::start().await;
    let client = agent.client().await;
    let url = format!("file://{}", assets.gguf.display());
    client
        .register_model(gguf_spec("smol", &url))
        .await
        .unwrap();
    client.pull_to_end("smol").await.unwrap();
    let spec = scan_for(&client, &assets.mlx_dir, pb::ModelFormat::Mlx).await;
    (agent, client, spec.id)
}

/// Logits of MLX's arithmetic, computed by candle: what float32 summation order
/// leaves between two correct implementations.
const EXACT_TOLERANCE: f32 = 1e-3;
/// Logits of the quantized kernel against MLX's: 8-bit activations through 30
/// layers (the largest difference measured here was 1.44, of logits spread over 30).
const QUANTIZED_TOLERANCE: f32 = 3.0;

#[tokio::test]
async fn modeld_and_mlx_lm_run_the_same_mlx_model_alike() {
    let assets = Assets::get();
    let reference = mlx_reference(&assets);
    let options = LoadOptions {
        context_length: 256,
        ..LoadOptions::default()
    };

    // MLX's arithmetic: every projection dequantized, activations in f32. The same
    // logits and the same greedy tokens as mlx-lm, which proves the unpacking, the
    // scales and biases and the rotary rows' order.
    let mut exact = CandleEngine
        .open_mlx_forward(&assets.mlx_dir, &options, false)
        .unwrap();
    for ((prompt, _), r) in PROMPTS.iter().zip(&reference) {
        exact.truncate(0);
        let mut logits = exact.forward(&r.ids).unwrap();
        let diff = largest_difference(&logits, &r.logits);
        assert!(
            diff < EXACT_TOLERANCE,
            "{prompt:?}: logits differ by {diff}"
        );
        let mut ids = Vec::new();
        while ids.len() < r.greedy.len() {
            let next = argmax(&logits);
            ids.push(next);
            logits = exact.forward(&[next]).unwrap();
        }
        assert_eq!(ids, r.greedy, "{prompt:?}");
    }

    // What modeld serves: 4-bit weights as Q4_1 in candle's quantized kernel, which
    // rounds the activations to 8 bits (Q8_1, as llama.cpp's kernels do) before each
    // product. The logits carry that rounding: the same best token, values within
    // QUANTIZED_TOLERANCE (a wrong weight or row would move them by tens).
    let (_, mut quantized, format) = CandleEngine
        .open_forward(&assets.mlx_dir, &options)
        .unwrap();
    assert_eq!(format, modeld_engine_core::ModelFormat::Mlx);
    for ((prompt, _), r) in PROMPTS.iter().zip(&reference) {
        quantized.truncate(0);
        let logits = quantized.forward(&r.ids).unwrap();
        let diff = largest_difference(&logits, &r.logits);
        eprintln!(
            "{prompt:?} ({} tokens): quantized kernel's logits within {diff:.4} of MLX's",
            r.ids.len()
        );
        assert_eq!(argmax(&logits), argmax(&r.logits), "{prompt:?}");
        assert!(
            diff < QUANTIZED_TOLERANCE,
            "{prompt:?}: logits differ by {diff}"
        );
    }
    drop(quantized);

    // Through the agent: tokenizer and greedy tokens against mlx-lm's.
    let (_agent, client, mlx) = agent_with_mlx(&assets).await;
    let loaded = client.load_to_end(&mlx, None).await.unwrap();
    assert_eq!(loaded.runtime(), pb::Runtime::Candle, "{loaded:?}");
    for ((prompt, chat), r) in PROMPTS.iter().zip(&reference) {
        if !chat {
            assert_eq!(
                tokenize(&client, &mlx, prompt, true).await,
                r.ids,
                "{prompt:?}"
            );
        }
    }
    let mut same = 0;
    for ((prompt, chat), r) in PROMPTS.iter().zip(&reference) {
        let (ids, text) = greedy(&client, &mlx, prompt, *chat, GREEDY_TOKENS).await;
        // mlx-lm's list ends with the end-of-turn token when it stopped early; the
        // stream ends there without sending it.
        let mut want = r.greedy.clone();
        if want.len() < GREEDY_TOKENS as usize {
            want.pop();
        }
        // The first token follows from the prompt, computed without rounding.
        assert_eq!(ids.first(), want.first(), "{prompt:?}: {text:?}");
        same += usize::from(ids == want);
        eprintln!("{prompt:?}: modeld {ids:?}, mlx-lm {want:?}");
    }
    eprintln!(
        "greedy tokens equal to mlx-lm's through the agent: {same}/{} prompts ({GREEDY_TOKENS} tokens each)",
        PROMPTS.len()
    );
}

#[tokio::test]
async fn an_mlx_model_chats_tokenizes_and_unloads_like_the_other_formats() {
    let assets = Assets::get();
    let (_agent, client, mlx) = agent_with_mlx(&assets).await;

    let model = client.get_model(&mlx).await.unwrap();
    let spec = model.spec.as_ref().unwrap();
    assert_eq!(spec.format(), pb::ModelFormat::Mlx);
    assert_eq!(spec.quantization, "Q4");
    // Eight weights to a packed word, scales and biases not counted: the network's
    // own size, as its float form states it.
    let float = scan_for(&client, &assets.hf_dir, pb::ModelFormat::Safetensors).await;
    assert_eq!(spec.parameter_count, float.parameter_count);

    // Compatible here, with candle as the runtime that reads MLX.
    assert_loads_with(&client, &mlx, pb::Runtime::Candle).await;

    let (_, text) = greedy(&client, &mlx, "Tell me the capital of France.", true, 24).await;
    assert!(text.contains("Paris"), "{text:?}");

    // One tokenizer for the GGUF and its MLX form.
    client.load_to_end("smol", None).await.unwrap();
    let text = "Grüße, 東京! 12345 <|im_start|>user";
    assert_eq!(
        tokenize(&client, &mlx, text, true).await,
        tokenize(&client, "smol", text, true).await
    );

    client.unload(&mlx, None).await.unwrap();
    let listed = client.list_loaded().await.unwrap();
    assert!(
        listed.models.iter().all(|m| m.model_id != mlx),
        "{listed:?}"
    );
}

/// A change to a config.json.
type Edit = Box<dyn Fn(&mut Value)>;

/// A copy of the MLX directory (weights hard-linked, or copied across file systems)
/// whose config.json `edit` changes.
fn edited_copy(source: &Path, into: &Path, edit: impl Fn(&mut Value)) -> PathBuf {
    std::fs::create_dir_all(into).unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        let to = into.join(entry.file_name());
        if entry.file_name() == "config.json" {
            let mut config: Value =
                serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
            edit(&mut config);
            std::fs::write(&to, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        } else if std::fs::hard_link(entry.path(), &to).is_err() {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    into.to_path_buf()
}

#[tokio::test]
async fn mlx_quantization_that_does_not_match_the_weights_is_refused_with_a_reason() {
    let assets = Assets::get();
    let scratch = tempfile::tempdir().unwrap();
    let group = |c: &Value| c["quantization"]["group_size"].as_u64().unwrap();
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "wrong-bits",
            Box::new(|c| c["quantization"]["bits"] = 8.into()),
            "imply",
        ),
        (
            "unknown-bits",
            Box::new(|c| c["quantization"]["bits"] = 7.into()),
            "MLX packs",
        ),
        (
            "wrong-group",
            Box::new(move |c| c["quantization"]["group_size"] = (group(c) * 2).into()),
            "imply",
        ),
        (
            "zero-group",
            Box::new(|c| c["quantization"]["group_size"] = 0.into()),
            "group_size 0",
        ),
        (
            "other-mode",
            Box::new(|c| c["quantization"]["mode"] = "mxfp4".into()),
            "affine",
        ),
        (
            "layer-said-float",
            Box::new(|c| c["quantization"]["model.layers.3.mlp.up_proj"] = false.into()),
            "not quantized",
        ),
    ];
    let mut dirs = Vec::new();
    for (name, edit, says) in &cases {
        let dir = edited_copy(&assets.mlx_dir, &scratch.path().join(name), edit);
        assert_candle_refuses(&dir, says);
        dirs.push(dir);
    }

    // Through the agent: the scan registers it (its files are sound), the load is
    // INVALID_ARGUMENT naming the problem, and the agent serves on.
    let agent = Agent::start().await;
    let client = agent.client().await;
    let scan = client
        .scan(vec![dirs[0].display().to_string()])
        .await
        .unwrap();
    let id = scan.models[0].spec.as_ref().unwrap().id.clone();
    let err = client.load_to_end(&id, None).await.unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", reason(status));
    assert!(status.message().contains("imply"), "{}", status.message());
    assert!(client.is_serving().await.unwrap());
}
