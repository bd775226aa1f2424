//! The llama.cpp engine's probe and memory estimate on the real SmolLM2 GGUF, and a
//! malformed file stopped before llama.cpp sees it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use modeld_e2e::Assets;
use modeld_engine_core::{Engine, EngineError, LoadOptions};
use modeld_engine_llama::LlamaEngine;

#[test]
fn probe_reads_the_geometry_and_the_estimate_follows_it() {
    let assets = Assets::get();
    let probe = LlamaEngine::default().probe(&assets.gguf).unwrap();
    assert_eq!(probe.architecture, "llama");
    assert_eq!(
        (
            probe.layers,
            probe.kv_heads,
            probe.head_dim,
            probe.embedding_length
        ),
        (30, 3, 64, 576)
    );
    assert_eq!((probe.vocab_size, probe.context_length), (49_152, 8192));
    assert_eq!(probe.quantization.as_deref(), Some("Q4_1"));
    assert!(probe.weights_bytes > 90_000_000 && probe.weights_bytes < 98_362_432);

    let estimate = LlamaEngine::default().estimate_memory(
        &probe,
        &LoadOptions {
            context_length: 4096,
            parallel: 4,
            ..LoadOptions::default()
        },
    );
    // K and V, 30 layers, 3 KV heads of 64, 4 sequences of 4096 tokens, F16.
    assert_eq!(estimate.kv_cache, 2 * 30 * 3 * 64 * 4096 * 4 * 2);
    assert_eq!(estimate.weights, probe.weights_bytes);
    let halved = LlamaEngine::default().estimate_memory(
        &probe,
        &LoadOptions {
            context_length: 2048,
            parallel: 4,
            ..LoadOptions::default()
        },
    );
    assert_eq!(halved.kv_cache * 2, estimate.kv_cache);
    // A context longer than the model was trained for is capped at the training length.
    let capped = LlamaEngine::default().estimate_memory(
        &probe,
        &LoadOptions {
            context_length: 1 << 20,
            parallel: 1,
            ..LoadOptions::default()
        },
    );
    assert_eq!(capped.kv_cache, 2 * 30 * 3 * 64 * 8192 * 2);

    // The loaded model reports what it holds, within the estimate's reach.
    let model = LlamaEngine::default()
        .load(
            &assets.gguf,
            &LoadOptions {
                context_length: 4096,
                parallel: 4,
                use_mmap: true,
                ..LoadOptions::default()
            },
        )
        .unwrap();
    let actual = model.memory_bytes();
    assert!(
        actual >= estimate.weights + estimate.kv_cache,
        "{actual} vs {estimate:?}"
    );
    assert!(actual <= estimate.total(), "{actual} vs {estimate:?}");
}

#[test]
fn a_malformed_gguf_fails_the_probe_not_the_process() {
    let fixtures = Assets::get().fixtures;
    // A header that promises more than the file holds, and a file that is no GGUF.
    for name in ["truncated.gguf", "tiny.onnx"] {
        let err = LlamaEngine::default()
            .probe(&fixtures.join(name))
            .unwrap_err();
        assert!(matches!(err, EngineError::InvalidModel(_)), "{name}: {err}");
    }
}
