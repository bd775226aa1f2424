//! One network in three formats through three runtimes: the real SmolLM2 GGUF through
//! llama.cpp, and the same weights (dequantized by scripts/derive-models.py) as an ONNX
//! export through ONNX Runtime and as a safetensors directory through candle. The
//! same Generate, Tokenize and lifecycle calls serve all three, and their outputs are
//! compared with each other: the strongest check available without a network.

#![cfg(all(feature = "onnx", feature = "candle"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use modeld_e2e::{
    Agent, AgentOptions, Assets, COMPARISON_PROMPTS, Client, SMOLLM2_SIZE, argmax,
    assert_candle_refuses, gguf_spec, greedy, pb, reason,
};
use modeld_engine_candle::CandleEngine;
use modeld_engine_core::generation::Forward;
use modeld_engine_core::{Engine, EngineError, LoadOptions};
use modeld_engine_onnx::OnnxEngine;
use tonic::Code;

/// Five fixed prompts: chat turns and raw continuations. On four of them llama.cpp's
/// Q4_1 and the float export pick the same 8 greedy tokens; the fifth (a near tie
/// in the float model) is the kind quantization can flip, which the ≥4/5 rule allows.
const PROMPTS: [(&str, bool); 5] = COMPARISON_PROMPTS;

fn ort_args(lib: &Path) -> Vec<String> {
    vec!["--onnxruntime-library".into(), lib.display().to_string()]
}

/// An agent with the GGUF registered and stored as "smol", and the derived ONNX and
/// safetensors directories scanned in; returns the ids of (onnx, safetensors).
async fn agent_with_three_formats(args: Vec<String>) -> (Agent, Client, String, String) {
    let assets = Assets::get();
    let agent = Agent::start_with(AgentOptions {
        args,
        ..AgentOptions::default()
    })
    .await;
    let client = agent.client().await;
    let url = format!("file://{}", assets.gguf.display());
    client
        .register_model(gguf_spec("smol", &url))
        .await
        .unwrap();
    client.pull_to_end("smol").await.unwrap();
    let scan = client
        .scan(vec![
            assets.onnx_dir.display().to_string(),
            assets.hf_dir.display().to_string(),
        ])
        .await
        .unwrap();
    let id_of = |format: pb::ModelFormat| {
        scan.models
            .iter()
            .map(|m| m.spec.as_ref().unwrap())
            .find(|s| s.format() == format)
            .unwrap_or_else(|| panic!("no {format:?} model in {:?}", scan.models))
            .id
            .clone()
    };
    let onnx = id_of(pb::ModelFormat::Onnx);
    let hf = id_of(pb::ModelFormat::Safetensors);
    (agent, client, onnx, hf)
}

fn load_options(runtime: pb::Runtime) -> Option<pb::LoadOptions> {
    Some(pb::LoadOptions {
        runtime: runtime as i32,
        context_length: 1024,
        ..Default::default()
    })
}

#[tokio::test]
async fn the_same_greedy_chat_through_llama_cpp_onnx_runtime_and_candle() {
    let assets = Assets::get();
    let (_agent, client, onnx, hf) = agent_with_three_formats(ort_args(&assets.ort_lib)).await;
    let loaded = [
        client
            .load_to_end("smol", load_options(pb::Runtime::LlamaCpp))
            .await
            .unwrap(),
        client
            .load_to_end(&onnx, load_options(pb::Runtime::Unspecified))
            .await
            .unwrap(),
        client
            .load_to_end(&hf, load_options(pb::Runtime::Unspecified))
            .await
            .unwrap(),
    ];
    let runtimes: Vec<pb::Runtime> = loaded.iter().map(|m| m.runtime()).collect();
    assert_eq!(
        runtimes,
        [
            pb::Runtime::LlamaCpp,
            pb::Runtime::OnnxRuntime,
            pb::Runtime::Candle
        ],
        "each format goes to the runtime that can run it"
    );

    // Fluent answers everywhere.
    for model in ["smol", onnx.as_str(), hf.as_str()] {
        let (_, text) = greedy(&client, model, "Tell me the capital of France.", true, 24).await;
        assert!(text.contains("Paris"), "{model}: {text:?}");
    }

    // The same tokenizer behind all three: one prompt, one set of ids.
    let tokenize = |model: String| {
        let client = client.clone();
        async move {
            client
                .generate()
                .tokenize(pb::TokenizeRequest {
                    model_id: model,
                    text: "Grüße, 東京! 12345 <|im_start|>user".into(),
                    add_special_tokens: true,
                    parse_special: true,
                })
                .await
                .unwrap()
                .into_inner()
                .token_ids
        }
    };
    let reference = tokenize("smol".into()).await;
    assert_eq!(tokenize(onnx.clone()).await, reference);
    assert_eq!(tokenize(hf.clone()).await, reference);

    // First 8 greedy tokens: float weights against llama.cpp's Q4_1.
    let mut onnx_same = 0;
    let mut candle_same = 0;
    for (prompt, chat) in PROMPTS {
        let (reference, _) = greedy(&client, "smol", prompt, chat, 8).await;
        let (from_onnx, _) = greedy(&client, &onnx, prompt, chat, 8).await;
        let (from_candle, _) = greedy(&client, &hf, prompt, chat, 8).await;
        // Up to 8 tokens: a short answer may end (end-of-turn) before that.
        assert!(!reference.is_empty(), "{prompt:?}");
        onnx_same += usize::from(from_onnx == reference);
        candle_same += usize::from(from_candle == reference);
        // Same float weights in both: these two must agree exactly.
        assert_eq!(from_onnx, from_candle, "{prompt:?}");
    }
    eprintln!(
        "first 8 greedy tokens equal to llama.cpp's: onnx {onnx_same}/5, candle {candle_same}/5"
    );
    assert!(
        onnx_same >= 4,
        "ONNX matched llama.cpp on {onnx_same}/5 prompts"
    );
    assert!(
        candle_same >= 4,
        "candle matched llama.cpp on {candle_same}/5 prompts"
    );
}

#[test]
fn onnx_runtime_and_candle_agree_on_the_first_step_logits() {
    let assets = Assets::get();
    let options = LoadOptions {
        context_length: 256,
        ..LoadOptions::default()
    };
    let mut onnx = OnnxEngine::new(Some(assets.ort_lib.clone()))
        .load(&assets.onnx_dir, &options)
        .unwrap();
    let mut candle = CandleEngine.load(&assets.hf_dir, &options).unwrap();
    let tokenizer = onnx.tokenizer();
    let prompt = tokenizer
        .encode("The lighthouse keeper climbed the stairs and", false, false)
        .unwrap();
    let a = onnx.logits(&prompt).unwrap();
    let b = candle.logits(&prompt).unwrap();
    assert_eq!(a.len(), 49_152);
    assert_eq!(a.len(), b.len());
    // Both run the same F32 weights; only the order of float operations differs
    // (ONNX Runtime's fused kernels against candle's gemm), which moves logits of
    // magnitude ~30 by ~1e-4. 1e-2 leaves room for that and nothing more: a wrong
    // rotary layout or mask moves them by whole units.
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    eprintln!("first-step logits, ONNX Runtime vs candle: max |Δ| = {max_diff:e}");
    assert!(max_diff < 1e-2, "max |Δlogit| = {max_diff}");
    let top = |l: &[f32]| {
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|i, j| l[*j].total_cmp(&l[*i]));
        idx.truncate(5);
        idx
    };
    assert_eq!(top(&a), top(&b));
}

#[test]
fn the_onnx_kv_cache_is_carried_from_step_to_step() {
    let assets = Assets::get();
    let engine = OnnxEngine::new(Some(assets.ort_lib.clone()));
    let (mut decoder, ..) = engine
        .open_decoder(&assets.onnx_dir, &LoadOptions::default())
        .unwrap();
    let prompt: Vec<u32> = vec![
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308,
    ];
    let p = prompt.len();
    let mut logits = decoder.forward(&prompt).unwrap();
    // Positions ONNX Runtime computed, as its inputs' shapes say.
    let mut computed = decoder.last_step().input_tokens;
    let mut fed = prompt.clone();
    for step in 0..64 {
        let next = argmax(&logits);
        logits = decoder.forward(&[next]).unwrap();
        fed.push(next);
        // One new token in, the whole history carried in the past inputs.
        let shape = decoder.last_step();
        assert_eq!(shape.input_tokens, 1);
        assert_eq!(shape.past_tokens, p + step);
        assert_eq!(shape.present_tokens, p + step + 1);
        computed += shape.input_tokens;
    }
    assert_eq!(decoder.steps(), 65);
    assert_eq!(decoder.cached(), p + 64);
    // With the cache each position was computed once; without it, every step would
    // have recomputed its whole prefix.
    assert_eq!(computed, p + 64);
    let without: usize = (0..=64).map(|i| p + i).sum();
    assert!(without > 20 * computed, "{without} vs {computed}");

    // And the cache is right: a fresh pass over the whole history gives the same
    // next-token logits as the last cached step.
    decoder.truncate(0);
    let fresh = decoder.forward(&fed).unwrap();
    let diff = fresh
        .iter()
        .zip(&logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-3, "cached and recomputed logits differ by {diff}");

    // A cut keeps a prefix: the same step again gives the same logits.
    decoder.truncate(p + 10);
    let again = decoder.forward(&fed[p + 10..p + 11]).unwrap();
    decoder.truncate(0);
    let reference = decoder.forward(&fed[..p + 11]).unwrap();
    let diff = again
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-3, "{diff}");
}

#[test]
fn candle_keeps_its_own_kv_cache_for_both_of_its_formats() {
    let assets = Assets::get();
    let options = LoadOptions {
        context_length: 256,
        ..LoadOptions::default()
    };
    for path in [&assets.hf_dir, &assets.gguf] {
        let (_, mut forward, format) = CandleEngine.open_forward(path, &options).unwrap();
        let prompt: Vec<u32> = vec![1, 9690, 198, 2683, 359, 253];
        let mut logits = forward.forward(&prompt).unwrap();
        let mut fed = prompt.clone();
        // 16 tokens in all: candle's quantized matmul quantizes activations to Q8 for
        // up to 16 rows and multiplies dequantized weights above that, so a fresh pass
        // longer than 16 tokens differs from the token-by-token path by quantization
        // error (~0.5 in a logit), not by how the cache is used. Within 16 rows both
        // paths run the same kernel and must agree.
        for _ in 0..10 {
            let next = argmax(&logits);
            // One token in per step; the cache grows by one.
            logits = forward.forward(&[next]).unwrap();
            fed.push(next);
            assert_eq!(forward.cached(), fed.len(), "{format}");
        }
        // What the cache held gives what a fresh pass over the whole history gives.
        assert_eq!(forward.truncate(0), 0);
        let fresh = forward.forward(&fed).unwrap();
        let diff = fresh
            .iter()
            .zip(&logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff < 1e-3,
            "{format}: cached and recomputed logits differ by {diff}"
        );
    }
}

#[tokio::test]
async fn a_missing_or_too_old_onnx_runtime_is_failed_precondition_and_the_agent_serves_on() {
    let assets = Assets::get();
    let missing = Path::new("/nonexistent/libonnxruntime.so.1.31.1");
    for (lib, says) in [
        (missing, "does not exist".to_owned()),
        (assets.ort_old_lib.as_path(), "1.20.1".to_owned()),
    ] {
        let (_agent, client, onnx, _) = agent_with_three_formats(ort_args(lib)).await;
        let caps = client.capabilities().await.unwrap();
        let runtime = caps
            .runtimes
            .iter()
            .find(|r| r.runtime() == pb::Runtime::OnnxRuntime)
            .unwrap();
        if lib == missing {
            assert!(runtime.cpu_variant.is_none());
            assert!(
                runtime.unavailable_reason.contains("does not exist"),
                "{runtime:?}"
            );
        } else {
            // A library that exists is only checked by a load.
            let v = runtime.cpu_variant.as_ref().unwrap();
            assert_eq!(v.dispatch(), pb::CpuDispatch::Library);
            assert_eq!(v.module_path, lib.display().to_string());
        }
        let err = client.load_to_end(&onnx, None).await.unwrap_err();
        let status = err.status().unwrap();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(status), "RUNTIME_UNAVAILABLE");
        assert!(status.message().contains(&says), "{}", status.message());
        assert!(status.message().contains("1.31"), "{}", status.message());
        // The agent serves on: the GGUF loads and answers.
        client.load_to_end("smol", None).await.unwrap();
        let (ids, _) = greedy(&client, "smol", "Water boils at", false, 4).await;
        assert_eq!(ids.len(), 4);
    }
}

#[tokio::test]
async fn external_data_outside_the_model_directory_is_refused_before_a_session() {
    let assets = Assets::get();
    let agent = Agent::start_with(AgentOptions {
        args: ort_args(&assets.ort_lib),
        ..AgentOptions::default()
    })
    .await;
    let client = agent.client().await;
    let dir = assets.fixtures.join("hostile-models/onnx-escape");
    let scan = client.scan(vec![dir.display().to_string()]).await.unwrap();
    let id = scan.models[0].spec.as_ref().unwrap().id.clone();
    let err = client.load_to_end(&id, None).await.unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason(status), "MODEL_INVALID");
    assert!(
        status.message().contains("../../etc/passwd"),
        "{}",
        status.message()
    );
    assert!(client.is_serving().await.unwrap());

    // A name that stays inside but is a symlink out of it is refused too.
    let tmp = tempfile::tempdir().unwrap();
    for name in ["model.onnx", "genai_config.json"] {
        std::os::unix::fs::symlink(assets.onnx_dir.join(name), tmp.path().join(name)).unwrap();
    }
    std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("model.onnx.data")).unwrap();
    match OnnxEngine::new(Some(assets.ort_lib.clone())).probe(tmp.path()) {
        Err(EngineError::InvalidModel(m)) => assert!(m.contains("outside"), "{m}"),
        other => panic!("expected InvalidModel, got {other:?}"),
    }
}

#[tokio::test]
async fn absurd_safetensors_shapes_and_configs_are_refused_without_a_panic() {
    let assets = Assets::get();
    let hostile = assets.fixtures.join("hostile-models");
    for (dir, says) in [
        ("absurd-shapes", "model.safetensors"),
        ("absurd-config", "num_hidden_layers"),
    ] {
        assert_candle_refuses(&hostile.join(dir), says);
    }
    // Through the agent: the scan registers the absurd-config directory (its header
    // is sound), and loading it is INVALID_ARGUMENT with the agent still serving.
    let agent = Agent::start().await;
    let client = agent.client().await;
    let scan = client
        .scan(vec![hostile.join("absurd-config").display().to_string()])
        .await
        .unwrap();
    let id = scan.models[0].spec.as_ref().unwrap().id.clone();
    let err = client.load_to_end(&id, None).await.unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("num_hidden_layers"),
        "{}",
        status.message()
    );
    assert!(client.is_serving().await.unwrap());
}

/// The node's rates: GetCapabilities waits for their measurement if needed.
async fn rates_of(client: &Client) -> pb::PerformanceBasis {
    let p = client
        .capabilities()
        .await
        .unwrap()
        .performance
        .expect("the node's rates");
    assert!(p.memory_read_bytes_per_second > 1e8, "{p:?}");
    assert!(p.compute_flops_per_second > 1e8, "{p:?}");
    p
}

/// CheckCompatibility's speed for `model` with `runtime`.
async fn speed_of(
    client: &Client,
    model: Option<pb::check_compatibility_request::Model>,
    runtime: pb::Runtime,
) -> pb::PerformanceEstimate {
    let compat = client
        .check_compatibility(pb::CheckCompatibilityRequest {
            model,
            runtime: runtime as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    let p = compat.performance.expect("a speed estimate");
    assert_eq!(p.runtime(), runtime);
    p
}

/// The efficiency factors GetCapabilities reports for `runtime` on GGUF.
async fn caps_factor(client: &Client, runtime: pb::Runtime) -> pb::RuntimeEfficiency {
    let caps = client.capabilities().await.unwrap();
    caps.performance
        .unwrap()
        .runtimes
        .into_iter()
        .find(|f| f.runtime() == runtime && f.format() == pb::ModelFormat::Gguf)
        .unwrap()
}

#[tokio::test]
async fn benchmarks_rank_the_runtimes_and_load_follows_the_ranking() {
    let assets = Assets::get();
    let (agent, client, onnx, _) = agent_with_three_formats(ort_args(&assets.ort_lib)).await;
    let smol_spec = || Some(pb::check_compatibility_request::Model::Id("smol".into()));
    // Before any benchmark, each runtime's speed is predicted from the node's rates
    // and the model's size.
    let rates = rates_of(&client).await;
    for runtime in [pb::Runtime::LlamaCpp, pb::Runtime::Candle] {
        let predicted = speed_of(&client, smol_spec(), runtime).await;
        assert_eq!(
            predicted.source(),
            pb::EstimateSource::Predicted,
            "{predicted:?}"
        );
        assert_eq!(predicted.bytes_per_token, SMOLLM2_SIZE);
        let ceiling = rates.memory_read_bytes_per_second / SMOLLM2_SIZE as f64;
        assert!(
            (predicted.generation_ceiling_tokens_per_second - ceiling).abs() < 1e-6 * ceiling,
            "{predicted:?}"
        );
        assert!(
            predicted.generation_tokens_per_second > 0.0
                && predicted.generation_tokens_per_second < ceiling
                && predicted.prompt_tokens_per_second > 0.0,
            "{predicted:?}"
        );
    }
    let mut measured = Vec::new();
    for runtime in [pb::Runtime::LlamaCpp, pb::Runtime::Candle] {
        let r = client
            .node()
            .benchmark(pb::BenchmarkRequest {
                model_id: "smol".into(),
                runtime: runtime as i32,
                prompt_tokens: 32,
                generated_tokens: 16,
                repetitions: 1,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.runtime(), runtime);
        assert!(
            r.prompt_tokens_per_second > 0.0 && r.generation_tokens_per_second > 0.0,
            "{r:?}"
        );
        // Measured in the engine process that held the model: at least its weights.
        assert!(r.peak_memory_bytes > 50_000_000, "{r:?}");
        measured.push((runtime, r.generation_tokens_per_second));
        // The measurement replaces the prediction for this model and runtime.
        let now = speed_of(&client, smol_spec(), runtime).await;
        assert_eq!(now.source(), pb::EstimateSource::Measured, "{now:?}");
        assert_eq!(
            (
                now.prompt_tokens_per_second,
                now.generation_tokens_per_second
            ),
            (r.prompt_tokens_per_second, r.generation_tokens_per_second)
        );
        // And calibrates the runtime for other models of the format: one twice the
        // size is predicted at half the measured rates.
        let mut twice = gguf_spec("twice", "http://models.invalid/twice.gguf");
        twice.files[0].size_bytes = 2 * SMOLLM2_SIZE;
        let factor = caps_factor(&client, runtime).await;
        assert_eq!(
            factor.source(),
            pb::EstimateSource::Calibrated,
            "{factor:?}"
        );
        assert_eq!(factor.calibrated_on, "smol");
        let other = speed_of(
            &client,
            Some(pb::check_compatibility_request::Model::Spec(twice)),
            runtime,
        )
        .await;
        assert_eq!(other.source(), pb::EstimateSource::Calibrated, "{other:?}");
        let half = r.generation_tokens_per_second / 2.0;
        assert!(
            (other.generation_tokens_per_second - half).abs() < 1e-6 * half,
            "{other:?} against {r:?}"
        );
    }
    measured.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (fastest, slowest) = (measured[0].0, measured[1].0);

    // The record outlives the agent.
    let agent = agent.restart().await;
    let client = agent.client().await;
    let caps = client.capabilities().await.unwrap();
    let gguf = caps
        .formats
        .iter()
        .find(|f| f.format() == pb::ModelFormat::Gguf)
        .unwrap();
    assert_eq!(gguf.runtimes[..2], [fastest as i32, slowest as i32]);
    let compat = client
        .check_compatibility(pb::CheckCompatibilityRequest {
            model: Some(pb::check_compatibility_request::Model::Id("smol".into())),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(compat.settings.unwrap().runtime(), fastest);
    let loaded = client.load_to_end("smol", None).await.unwrap();
    assert_eq!(loaded.runtime(), fastest);

    // Naming a runtime that cannot run the format is refused with the reason.
    let err = client
        .load_to_end(&onnx, load_options(pb::Runtime::LlamaCpp))
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("cannot run onnx"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn capabilities_tell_runnable_engines_from_recognized_formats() {
    let agent = Agent::start().await;
    let caps = agent.client().await.capabilities().await.unwrap();
    let runtimes: Vec<pb::Runtime> = caps.runtimes.iter().map(|r| r.runtime()).collect();
    let litert = cfg!(feature = "litert");
    let mut expected = vec![
        pb::Runtime::LlamaCpp,
        pb::Runtime::OnnxRuntime,
        pb::Runtime::Candle,
    ];
    if litert {
        expected.push(pb::Runtime::Tflite);
    }
    assert_eq!(runtimes, expected);
    let candle = &caps.runtimes[2];
    assert!(
        candle
            .formats
            .contains(&(pb::ModelFormat::Safetensors as i32))
    );
    assert!(candle.formats.contains(&(pb::ModelFormat::Gguf as i32)));
    assert!(candle.formats.contains(&(pb::ModelFormat::Mlx as i32)));
    assert!(candle.quantizations.iter().any(|q| q == "Q4_1"));
    for f in &caps.formats {
        let runnable = matches!(
            f.format(),
            pb::ModelFormat::Gguf
                | pb::ModelFormat::Onnx
                | pb::ModelFormat::Safetensors
                | pb::ModelFormat::Mlx
        ) || (litert && f.format() == pb::ModelFormat::Tflite);
        assert!(f.recognized, "{f:?}");
        assert_eq!(f.runnable, runnable, "{f:?}");
        assert_eq!(f.runtimes.is_empty(), !runnable, "{f:?}");
    }
    for f in [
        pb::ModelFormat::Coreml,
        pb::ModelFormat::Executorch,
        pb::ModelFormat::Mlc,
        pb::ModelFormat::Picollm,
    ] {
        assert!(
            caps.formats.iter().any(|s| s.format() == f && !s.runnable),
            "{f:?}"
        );
    }
}

#[tokio::test]
async fn a_pulled_directory_model_is_assembled_loads_and_is_removed_whole() {
    // The scan registers the safetensors directory in place; registering its spec
    // again under another id makes a model whose files must be pulled into the blob
    // store, then assembled into a directory the engine can open.
    let assets = Assets::get();
    let agent = Agent::start().await;
    let client = agent.client().await;
    let scan = client
        .scan(vec![assets.hf_dir.display().to_string()])
        .await
        .unwrap();
    let mut spec = scan.models[0].spec.clone().unwrap();
    assert!(spec.files.len() >= 4, "{:?}", spec.files);
    spec.id = "pulled-hf".into();
    client.register_model(spec).await.unwrap();
    client.pull_to_end("pulled-hf").await.unwrap();
    let loaded = client.load_to_end("pulled-hf", None).await.unwrap();
    assert_eq!(loaded.runtime(), pb::Runtime::Candle);
    let (_, text) = greedy(
        &client,
        "pulled-hf",
        "Tell me the capital of France.",
        true,
        16,
    )
    .await;
    assert!(text.contains("Paris"), "{text:?}");
    let assembled = agent.data_dir.join("models/pulled-hf");
    assert!(assembled.join("model.safetensors").is_file());
    assert!(assembled.join("tokenizer.json").is_file());

    client.unload("pulled-hf", None).await.unwrap();
    client
        .storage()
        .delete_stored(pb::DeleteStoredRequest {
            model_id: "pulled-hf".into(),
        })
        .await
        .unwrap();
    assert!(
        !assembled.exists(),
        "the assembled directory goes with the blobs"
    );
}
