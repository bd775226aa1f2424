//! TFLite decoders through LiteRT: the test model as a `.tflite` with a KV cache
//! (scripts/derive-models.py), run by the litert engine over libLiteRt from the
//! ai-edge-litert wheel, behind the same lifecycle as the other runtimes, and held to
//! LiteRT's own Python interpreter on the same file (scripts/litert-reference.py).
//! Hostile `.tflite` files (scripts/gen-fixtures.py) are refused before LiteRT sees them.

#![cfg(feature = "litert")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use modeld_e2e::{
    Agent, AgentOptions, Assets, COMPARISON_PROMPTS, Client, Reference, argmax, assert_loads_with,
    gguf_spec, greedy, largest_difference, pb, reason, reference_run, run_reference_script,
    scan_for, tokenize,
};
use modeld_engine_core::generation::Forward;
use modeld_engine_core::tflite as tflite_file;
use modeld_engine_core::{Engine, EngineError, LoadOptions};
use modeld_engine_litert::LiteRtEngine;
use tokio_stream::StreamExt;
use tonic::Code;

const PROMPTS: [(&str, bool); 5] = COMPARISON_PROMPTS;
const GREEDY_TOKENS: u32 = 16;

fn litert_args(lib: &Path) -> Vec<String> {
    vec!["--litert-library".into(), lib.display().to_string()]
}

fn litert_reference(assets: &Assets) -> Vec<Reference> {
    reference_run(
        assets,
        "litert-reference.py",
        &assets.tflite_dir,
        &PROMPTS,
        GREEDY_TOKENS,
    )
}

/// An agent that can run LiteRT, with the GGUF stored as "smol" and the TFLite
/// decoder scanned in; returns the decoder's id.
async fn agent_with_tflite(assets: &Assets) -> (Agent, Client, String) {
    let agent = Agent::start_with(AgentOptions {
        args: litert_args(&assets.litert_lib),
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
    let spec = scan_for(&client, &assets.tflite_dir, pb::ModelFormat::Tflite).await;
    (agent, client, spec.id)
}

/// The same graph and weights on the same library: what is left between modeld's
/// padded 32-token prefill and the reference's one-token steps is float32 summation
/// order (logits span about 40).
const LOGIT_TOLERANCE: f32 = 1e-2;

#[tokio::test]
async fn modeld_and_the_litert_interpreter_run_the_same_tflite_decoder_alike() {
    let assets = Assets::get();
    let reference = litert_reference(&assets);

    // The engine alone: a prompt through the padded prefill signature, then decode
    // steps, against the interpreter's decode-only run.
    let engine = LiteRtEngine::new(Some(assets.litert_lib.clone()), None);
    let (mut decoder, inspected) = engine
        .open_decoder(&assets.tflite_dir, &LoadOptions::default())
        .unwrap();
    assert_eq!(inspected.shape.prefill, 32);
    for ((prompt, _), r) in PROMPTS.iter().zip(&reference) {
        decoder.truncate(0);
        let mut logits = decoder.forward(&r.ids).unwrap();
        let diff = largest_difference(&logits, &r.logits);
        eprintln!(
            "{prompt:?} ({} tokens): logits within {diff:.2e} of LiteRT's interpreter",
            r.ids.len()
        );
        assert!(
            diff < LOGIT_TOLERANCE,
            "{prompt:?}: logits differ by {diff}"
        );
        let mut ids = Vec::new();
        while ids.len() < r.greedy.len() {
            let next = argmax(&logits);
            ids.push(next);
            logits = decoder.forward(&[next]).unwrap();
        }
        assert_eq!(ids, r.greedy, "{prompt:?}");
    }
    // A cut cache is forgotten, not kept: the same prompt after a truncation gives
    // the same logits as from empty.
    let ids = &reference[0].ids;
    decoder.truncate(0);
    let whole = decoder.forward(ids).unwrap();
    decoder.truncate(ids.len() / 2);
    let again = decoder.forward(&ids[ids.len() / 2..]).unwrap();
    assert!(largest_difference(&whole, &again) < LOGIT_TOLERANCE);
    drop(decoder);

    // Through the agent: its tokenizer and its greedy tokens against the reference.
    let (_agent, client, tflite) = agent_with_tflite(&assets).await;
    let loaded = client.load_to_end(&tflite, None).await.unwrap();
    assert_eq!(loaded.runtime(), pb::Runtime::Tflite, "{loaded:?}");
    for ((prompt, chat), r) in PROMPTS.iter().zip(&reference) {
        if !chat {
            assert_eq!(
                tokenize(&client, &tflite, prompt, true).await,
                r.ids,
                "{prompt:?}"
            );
        }
        let (ids, text) = greedy(&client, &tflite, prompt, *chat, GREEDY_TOKENS).await;
        // The reference's list ends with the end-of-turn token when it stopped
        // early; the stream ends there without sending it.
        let mut want = r.greedy.clone();
        if want.len() < GREEDY_TOKENS as usize {
            want.pop();
        }
        assert_eq!(ids, want, "{prompt:?}: {text:?}");
    }
}

/// The agent's capabilities for the TFLite runtime.
async fn tflite_runtime(client: &Client) -> pb::RuntimeInfo {
    let caps = client.capabilities().await.unwrap();
    caps.runtimes
        .into_iter()
        .find(|r| r.runtime() == pb::Runtime::Tflite)
        .unwrap()
}

/// A greedy chat turn on `model` answers what the capital of France is.
async fn assert_answers_paris(client: &Client, model: &str) {
    let (_, text) = greedy(client, model, "Tell me the capital of France.", true, 24).await;
    assert!(text.contains("Paris"), "{model}: {text:?}");
}

/// Loading `model` is FAILED_PRECONDITION / RUNTIME_UNAVAILABLE saying `says`, and the
/// agent serves on.
async fn assert_runtime_unavailable(client: &Client, model: &str, says: &str) {
    let err = client.load_to_end(model, None).await.unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(status), "RUNTIME_UNAVAILABLE");
    assert!(status.message().contains(says), "{}", status.message());
    assert!(client.is_serving().await.unwrap());
}

/// Starts a long generation on `model`, unloads it with a short grace, and checks
/// the generation ended cancelled and the model is gone.
async fn assert_an_unload_cancels(client: &Client, model: &str, prompt: &str, ignore_eos: bool) {
    let mut stream = client
        .generate()
        .generate(pb::GenerateRequest {
            model_id: model.into(),
            input: Some(pb::generate_request::Input::Prompt(prompt.into())),
            sampling: Some(pb::SamplingParams {
                temperature: Some(0.0),
                ..Default::default()
            }),
            max_tokens: 900,
            ignore_eos,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let unload = client.unload(model, Some(Duration::from_millis(300)));
    let finish = async {
        let mut summary = None;
        while let Some(Ok(msg)) = stream.next().await {
            if let Some(pb::generate_response::Event::Summary(s)) = msg.event {
                summary = Some(s);
            }
        }
        summary.unwrap()
    };
    let (summary, unloaded) = tokio::join!(finish, unload);
    assert_eq!(summary.finish_reason(), pb::FinishReason::Cancelled);
    assert!(summary.usage.unwrap().generated_tokens < 900);
    assert_eq!(unloaded.unwrap().cancelled_requests, 1);
    let listed = client.list_loaded().await.unwrap();
    assert!(
        listed.models.iter().all(|m| m.model_id != model),
        "{listed:?}"
    );
}

#[tokio::test]
async fn a_tflite_model_chats_tokenizes_benchmarks_cancels_and_unloads_like_the_other_formats() {
    let assets = Assets::get();
    let (_agent, client, tflite) = agent_with_tflite(&assets).await;

    let model = client.get_model(&tflite).await.unwrap();
    let spec = model.spec.as_ref().unwrap();
    assert_eq!(spec.format(), pb::ModelFormat::Tflite);
    assert_eq!(spec.quantization, "F32");
    // The float weights' count, plus the tables the graph keeps as float constants:
    // rotary cos and sin (2 × 1024 × 64), rotate-half (64 × 64) and a few scalars.
    // Integer constants (shapes, indices) are not parameters.
    let float = scan_for(&client, &assets.hf_dir, pb::ModelFormat::Safetensors).await;
    let tables = 2 * 1024 * 64 + 64 * 64;
    assert!(
        (float.parameter_count + tables..float.parameter_count + tables + 16)
            .contains(&spec.parameter_count),
        "{} against {} float weights",
        spec.parameter_count,
        float.parameter_count
    );

    let runtime = tflite_runtime(&client).await;
    assert!(runtime.unavailable_reason.is_empty(), "{runtime:?}");
    let variant = runtime.cpu_variant.as_ref().unwrap();
    assert_eq!(variant.dispatch(), pb::CpuDispatch::Library);
    assert_eq!(variant.module_path, assets.litert_lib.display().to_string());
    let caps = client.capabilities().await.unwrap();
    let format = caps
        .formats
        .iter()
        .find(|f| f.format() == pb::ModelFormat::Tflite)
        .unwrap();
    assert!(format.runnable, "{format:?}");

    let check = assert_loads_with(&client, &tflite, pb::Runtime::Tflite).await;
    assert_eq!(check.candidate_runtimes, [pb::Runtime::Tflite as i32]);
    assert_eq!(
        check.performance.as_ref().unwrap().source(),
        pb::EstimateSource::Predicted
    );

    assert_answers_paris(&client, &tflite).await;

    // One tokenizer for the GGUF and its TFLite form.
    client.load_to_end("smol", None).await.unwrap();
    let text = "Grüße, 東京! 12345 <|im_start|>user";
    assert_eq!(
        tokenize(&client, &tflite, text, true).await,
        tokenize(&client, "smol", text, true).await
    );

    // Node.Benchmark measures LiteRT, and the measurement replaces the prediction.
    let bench = client
        .node()
        .benchmark(pb::BenchmarkRequest {
            model_id: tflite.clone(),
            runtime: pb::Runtime::Tflite as i32,
            prompt_tokens: 32,
            generated_tokens: 16,
            repetitions: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bench.runtime(), pb::Runtime::Tflite);
    assert!(
        bench.prompt_tokens_per_second > 0.0 && bench.generation_tokens_per_second > 0.0,
        "{bench:?}"
    );
    // Measured in the engine process that held the model: at least its weights.
    assert!(bench.peak_memory_bytes > 500_000_000, "{bench:?}");
    let check = client
        .check_compatibility(pb::CheckCompatibilityRequest {
            model: Some(pb::check_compatibility_request::Model::Id(tflite.clone())),
            ..Default::default()
        })
        .await
        .unwrap();
    let measured = check.performance.unwrap();
    assert_eq!(measured.source(), pb::EstimateSource::Measured);
    assert_eq!(
        measured.generation_tokens_per_second,
        bench.generation_tokens_per_second
    );

    client.load_to_end(&tflite, None).await.unwrap();
    assert_an_unload_cancels(&client, &tflite, "Once upon a time", true).await;
}

fn hostile_fixtures(assets: &Assets) -> (PathBuf, BTreeMap<String, String>) {
    let dir = assets.fixtures.join("tflite/hostile");
    let expected: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    (dir, expected)
}

#[test]
fn tflite_files_are_checked_before_litert_sees_them() {
    let assets = Assets::get();
    // A valid model (LiteRT's interpreter runs it) passes, and what it holds is read.
    let add = assets.fixtures.join("tflite/add.tflite");
    let model = tflite_file::check(&add).unwrap();
    assert_eq!(model.subgraphs, 1);
    assert_eq!(model.operators, 1);
    assert_eq!(model.constant_elements, 4);
    assert_eq!(model.constant_bytes, 16);
    let sig = model.signature("serving_default").unwrap();
    assert_eq!(sig.inputs[0].name, "x");
    assert_eq!(sig.inputs[0].shape, [1, 4]);
    assert_eq!(sig.outputs[0].name, "y");
    // It is not a decoder: refused for what it lacks.
    match LiteRtEngine::new(None, None).probe(&add) {
        Err(EngineError::InvalidModel(m)) => assert!(m.contains("`decode` signature"), "{m}"),
        other => panic!("{other:?}"),
    }

    // One lie each: refused, naming it.
    let (dir, expected) = hostile_fixtures(&assets);
    for (lie, says) in &expected {
        let path = dir.join(format!("{lie}.tflite"));
        match tflite_file::check(&path) {
            Err(EngineError::InvalidModel(m)) => assert!(m.contains(says.as_str()), "{lie}: {m}"),
            other => panic!("{lie}: expected InvalidModel, got {other:?}"),
        }
    }

    // Every prefix and every single-byte change of the valid file: an answer, never
    // a panic, and no prefix passes that cuts a byte the structure uses (the writer
    // ends the file with a string's NUL and padding to 16 bytes, which nothing reads).
    let bytes = std::fs::read(&add).unwrap();
    let unread = bytes.iter().rev().take_while(|b| **b == 0).count();
    for len in 0..bytes.len() - unread {
        assert!(
            tflite_file::check_bytes(&bytes[..len]).is_err(),
            "prefix {len}"
        );
    }
    let mut accepted = 0;
    for at in 0..bytes.len() {
        for value in [0x00, 0xFF, 0x7F, bytes[at] ^ 0x01] {
            let mut changed = bytes.clone();
            changed[at] = value;
            accepted += usize::from(tflite_file::check_bytes(&changed).is_ok());
        }
    }
    eprintln!(
        "{accepted} of {} single-byte changes still read as a valid TFLite file",
        4 * bytes.len()
    );

    // The real decoder passes, with its shape read from its signatures.
    let inspected = modeld_engine_litert::inspect(&assets.tflite_dir).unwrap();
    assert_eq!(
        (
            inspected.shape.layers,
            inspected.shape.context,
            inspected.shape.vocab
        ),
        (30, 1024, 49152)
    );
}

#[tokio::test]
async fn hostile_tflite_files_are_refused_by_the_scan_and_the_load_and_the_agent_serves_on() {
    let assets = Assets::get();
    let (dir, expected) = hostile_fixtures(&assets);
    let agent = Agent::start_with(AgentOptions {
        args: litert_args(&assets.litert_lib),
        ..AgentOptions::default()
    })
    .await;
    let client = agent.client().await;

    // The scan checks every .tflite whole: each lie is skipped with its reason, and
    // none is registered.
    let scan = client.scan(vec![dir.display().to_string()]).await.unwrap();
    assert!(scan.models.is_empty(), "{:?}", scan.models);
    for (lie, says) in &expected {
        let file = format!("{lie}.tflite");
        let skipped = scan
            .skipped
            .iter()
            .find(|s| s.path.ends_with(&file))
            .unwrap_or_else(|| panic!("{file} not skipped: {:?}", scan.skipped));
        assert!(
            skipped.reason.contains("malformed tflite") && skipped.reason.contains(says.as_str()),
            "{lie}: {}",
            skipped.reason
        );
    }

    // A sound TFLite file that is not a decoder registers, and its load is
    // INVALID_ARGUMENT saying what it lacks.
    let scratch = tempfile::tempdir().unwrap();
    let not_decoder = scratch.path().join("adder");
    std::fs::create_dir(&not_decoder).unwrap();
    std::fs::copy(
        assets.fixtures.join("tflite/add.tflite"),
        not_decoder.join("model.tflite"),
    )
    .unwrap();
    std::fs::copy(
        assets.tflite_dir.join("tokenizer.json"),
        not_decoder.join("tokenizer.json"),
    )
    .unwrap();
    let spec = scan_for(&client, &not_decoder, pb::ModelFormat::Tflite).await;
    let err = client.load_to_end(&spec.id, None).await.unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", reason(status));
    assert!(
        status.message().contains("`decode` signature"),
        "{}",
        status.message()
    );

    // And the agent serves on: the real decoder loads and answers.
    assert!(client.is_serving().await.unwrap());
    let spec = scan_for(&client, &assets.tflite_dir, pb::ModelFormat::Tflite).await;
    client.load_to_end(&spec.id, None).await.unwrap();
    assert_answers_paris(&client, &spec.id).await;
}

#[tokio::test]
async fn a_missing_or_foreign_litert_library_is_runtime_unavailable_and_the_agent_serves_on() {
    let assets = Assets::get();
    let missing = PathBuf::from("/nonexistent/libLiteRt.so");
    // libonnxruntime is a real shared library, but not LiteRT's.
    for (lib, says) in [
        (missing.clone(), "does not exist"),
        (
            assets.ort_lib.clone(),
            "does not export LiteRtCreateEnvironment",
        ),
    ] {
        let agent = Agent::start_with(AgentOptions {
            args: litert_args(&lib),
            ..AgentOptions::default()
        })
        .await;
        let client = agent.client().await;
        let runtime = tflite_runtime(&client).await;
        if lib == missing {
            assert!(runtime.cpu_variant.is_none());
            assert!(
                runtime.unavailable_reason.contains("does not exist"),
                "{runtime:?}"
            );
        }
        let spec = scan_for(&client, &assets.tflite_dir, pb::ModelFormat::Tflite).await;
        assert_runtime_unavailable(&client, &spec.id, says).await;
    }
}

#[tokio::test]
async fn a_missing_or_foreign_litert_lm_library_is_runtime_unavailable_for_bundles_only() {
    let assets = Assets::get();
    for (lm_lib, says) in [
        (None, "LiteRT-LM library is not configured"),
        (
            Some(assets.ort_lib.clone()),
            "does not export litert_lm_set_min_log_level",
        ),
    ] {
        let mut args = litert_args(&assets.litert_lib);
        if let Some(lib) = &lm_lib {
            args.extend(["--litert-lm-library".into(), lib.display().to_string()]);
        }
        let agent = Agent::start_with(AgentOptions {
            args,
            ..AgentOptions::default()
        })
        .await;
        let client = agent.client().await;
        let bundle = scan_for(&client, &assets.litertlm_dir, pb::ModelFormat::Tflite).await;
        assert_runtime_unavailable(&client, &bundle.id, says).await;
        // The .tflite route needs LiteRT alone, and it is there.
        let tflite = scan_for(&client, &assets.tflite_dir, pb::ModelFormat::Tflite).await;
        client.load_to_end(&tflite.id, None).await.unwrap();
        assert_answers_paris(&client, &tflite.id).await;
    }
}

/// A node with LiteRT-LM and no LiteRT: TFLite is runnable (bundles load and answer),
/// and a .tflite decoder's load says which library it lacks.
#[tokio::test]
async fn litert_lm_alone_runs_bundles_and_says_what_a_tflite_decoder_lacks() {
    let assets = Assets::get();
    let agent = Agent::start_with(AgentOptions {
        args: vec![
            "--litert-lm-library".into(),
            assets.litert_lm_lib.display().to_string(),
        ],
        ..AgentOptions::default()
    })
    .await;
    let client = agent.client().await;
    let runtime = tflite_runtime(&client).await;
    assert!(runtime.unavailable_reason.is_empty(), "{runtime:?}");
    let variant = runtime.cpu_variant.as_ref().unwrap();
    assert_eq!(
        variant.module_path,
        assets.litert_lm_lib.display().to_string()
    );
    let bundle = scan_for(&client, &assets.litertlm_dir, pb::ModelFormat::Tflite).await;
    client.load_to_end(&bundle.id, None).await.unwrap();
    assert_answers_paris(&client, &bundle.id).await;
    let tflite = scan_for(&client, &assets.tflite_dir, pb::ModelFormat::Tflite).await;
    assert_runtime_unavailable(&client, &tflite.id, "--litert-library").await;
}

/// What LiteRT-LM's own runtime makes of one prompt on the derived bundle.
struct LiteRtLmRun {
    ids: Vec<u32>,
    text: String,
    time_to_first_token_s: f64,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: f64,
}

fn litertlm_reference(assets: &Assets) -> Vec<LiteRtLmRun> {
    let runs = run_reference_script(
        assets,
        "litertlm-reference.py",
        &assets.litertlm_dir,
        &PROMPTS,
        GREEDY_TOKENS,
    );
    runs.iter()
        .map(|r| LiteRtLmRun {
            ids: r["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect(),
            text: r["text"].as_str().unwrap().to_owned(),
            time_to_first_token_s: r["time_to_first_token_s"].as_f64().unwrap(),
            prefill_tokens_per_second: r["prefill_tokens_per_second"].as_f64().unwrap(),
            decode_tokens_per_second: r["decode_tokens_per_second"].as_f64().unwrap(),
        })
        .collect()
}

fn litert_lm_args(assets: &Assets) -> Vec<String> {
    let mut args = litert_args(&assets.litert_lib);
    args.extend([
        "--litert-lm-library".into(),
        assets.litert_lm_lib.display().to_string(),
    ]);
    args
}

/// The second TFLite route: the same decoder built into a LiteRT-LM bundle by the
/// derivation (litert-lm-builder, offline) runs in LiteRT-LM, both on its own and
/// behind modeld, and all three say what modeld's litert engine says on the .tflite:
/// the same prompt tokens from the bundle's template and tokenizer, the same greedy
/// tokens and text.
#[tokio::test]
async fn the_derived_litertlm_bundle_runs_in_litert_lm_as_modeld_runs_its_tflite() {
    let assets = Assets::get();
    let bundle = litertlm_reference(&assets);
    let interpreter = litert_reference(&assets);
    let agent = Agent::start_with(AgentOptions {
        args: litert_lm_args(&assets),
        ..AgentOptions::default()
    })
    .await;
    let client = agent.client().await;
    let tflite = scan_for(&client, &assets.tflite_dir, pb::ModelFormat::Tflite)
        .await
        .id;
    let lm = scan_for(&client, &assets.litertlm_dir, pb::ModelFormat::Tflite)
        .await
        .id;
    assert_ne!(tflite, lm);
    client.load_to_end(&tflite, None).await.unwrap();
    client.load_to_end(&lm, None).await.unwrap();
    for (((prompt, chat), reference), r) in PROMPTS.iter().zip(&bundle).zip(&interpreter) {
        assert_eq!(reference.ids, r.ids, "{prompt:?}: prompt tokens");
        let (ids, text) = greedy(&client, &tflite, prompt, *chat, GREEDY_TOKENS).await;
        assert_eq!(reference.text, text, "{prompt:?}");
        let (lm_ids, lm_text) = greedy(&client, &lm, prompt, *chat, GREEDY_TOKENS).await;
        assert_eq!(reference.text, lm_text, "{prompt:?}: through modeld");
        assert_eq!(ids, lm_ids, "{prompt:?}: token ids through modeld");
        eprintln!(
            "{prompt:?}: LiteRT-LM {:.0} ms to the first token, prefill {:.1} tokens/s, decode {:.1} tokens/s",
            reference.time_to_first_token_s * 1e3,
            reference.prefill_tokens_per_second,
            reference.decode_tokens_per_second
        );
    }
}

/// The LiteRT-LM engine process's scratch directory (its packed-weight cache).
fn scratch_of(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("modeld-engine-{pid}"))
}

async fn engine_pid(client: &Client, model: &str) -> u32 {
    let listed = client.list_loaded().await.unwrap();
    let loaded = listed
        .models
        .iter()
        .find(|m| m.model_id == model)
        .unwrap_or_else(|| panic!("{model} not loaded: {listed:?}"));
    assert_ne!(loaded.engine_process_id, 0);
    loaded.engine_process_id
}

async fn wait_gone(path: &Path) {
    for _ in 0..100 {
        if !path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} is still there", path.display());
}

#[tokio::test]
async fn a_litertlm_bundle_chats_tokenizes_cancels_and_unloads_and_its_scratch_goes_with_it() {
    let assets = Assets::get();
    let agent = Agent::start_with(AgentOptions {
        args: litert_lm_args(&assets),
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
    client.load_to_end("smol", None).await.unwrap();
    let spec = scan_for(&client, &assets.litertlm_dir, pb::ModelFormat::Tflite).await;
    assert_eq!(spec.quantization, "F32");
    let lm = spec.id;
    assert_loads_with(&client, &lm, pb::Runtime::Tflite).await;

    // LiteRT-LM keeps XNNPACK's packed weights in the engine process's own scratch
    // directory, which only that process may write.
    client.load_to_end(&lm, None).await.unwrap();
    let pid = engine_pid(&client, &lm).await;
    let scratch = scratch_of(pid);
    let cached: u64 = std::fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        cached > 500_000_000,
        "{cached} bytes in {}",
        scratch.display()
    );

    assert_answers_paris(&client, &lm).await;
    let text = "Grüße, 東京! 12345 <|im_start|>user";
    assert_eq!(
        tokenize(&client, &lm, text, true).await,
        tokenize(&client, "smol", text, true).await
    );

    // What LiteRT-LM cannot do is refused by name, and the model serves on.
    let mut refused = client
        .generate()
        .generate(pb::GenerateRequest {
            model_id: lm.clone(),
            input: Some(pb::generate_request::Input::Prompt("Hi".into())),
            grammar: "root ::= \"yes\"".into(),
            max_tokens: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match refused.next().await.unwrap().unwrap().event {
        Some(pb::generate_response::Event::Summary(s)) => {
            assert_eq!(s.error_reason, "INVALID_ARGUMENT", "{s:?}");
            assert!(
                s.error.contains("grammar") && s.error.contains("LiteRT-LM"),
                "{s:?}"
            );
        }
        other => panic!("a grammar on LiteRT-LM: {other:?}"),
    }

    // Greedy counting goes on past any stop token.
    assert_an_unload_cancels(&client, &lm, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", false).await;
    wait_gone(&scratch).await;

    // An engine process killed outright leaves nothing behind either.
    client.load_to_end(&lm, None).await.unwrap();
    let pid = engine_pid(&client, &lm).await;
    let scratch = scratch_of(pid);
    assert!(scratch.is_dir());
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_gone(&scratch).await;
    assert!(client.is_serving().await.unwrap());
    assert_answers_paris(&client, "smol").await;
}

/// A bundle that lies is refused before LiteRT-LM sees it: one cut short (its
/// sections run past the end) and one whose TFLite section is not a TFLite model.
#[tokio::test]
async fn hostile_litertlm_bundles_are_refused_by_the_scan_and_the_agent_serves_on() {
    let assets = Assets::get();
    let real = assets.litertlm_dir.join("model.litertlm");
    let bytes = std::fs::read(&real).unwrap();
    let root = tempfile::tempdir().unwrap();
    let header_end = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let tfl3 = header_end
        + bytes[header_end..]
            .windows(4)
            .position(|w| w == b"TFL3")
            .unwrap();
    let mut foreign = bytes.clone();
    foreign[tfl3..tfl3 + 4].copy_from_slice(b"XXXX");
    let cases = [
        (
            "short",
            bytes[..bytes.len() / 2].to_vec(),
            "outside the data",
        ),
        ("foreign", foreign, "not a TFLite model"),
    ];
    let engine = LiteRtEngine::new(None, None);
    for (name, data, says) in &cases {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("model.litertlm"), data).unwrap();
        std::fs::copy(
            assets.litertlm_dir.join("tokenizer.json"),
            dir.join("tokenizer.json"),
        )
        .unwrap();
        match engine.probe(&dir) {
            Err(EngineError::InvalidModel(what)) => assert!(what.contains(says), "{name}: {what}"),
            other => panic!("{name}: {other:?}"),
        }
        // The checker reads the header and the sections' own structures, never
        // trusting an offset: every cut of the header is refused, none panics.
        for cut in (0..header_end + 64).step_by(7) {
            assert!(
                modeld_engine_core::litertlm::check_bytes(&data[..cut.min(data.len())]).is_err()
            );
        }
    }
    let agent = Agent::start_with(AgentOptions {
        args: litert_lm_args(&assets),
        ..AgentOptions::default()
    })
    .await;
    let client = agent.client().await;
    let scan = client
        .scan(vec![root.path().display().to_string()])
        .await
        .unwrap();
    assert!(scan.models.is_empty(), "{:?}", scan.models);
    for (name, _, says) in &cases {
        let skipped = scan
            .skipped
            .iter()
            .find(|s| s.path.contains(&format!("/{name}")))
            .unwrap_or_else(|| panic!("{name} not skipped: {:?}", scan.skipped));
        assert!(skipped.reason.contains(says), "{name}: {}", skipped.reason);
    }
    assert!(client.is_serving().await.unwrap());
}
