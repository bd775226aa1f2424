//! The LiteRT-LM route: a `.litertlm` bundle (a TFLite decoder with its tokenizer and
//! metadata in one file) run by LiteRT-LM's own runtime, which samples and decodes
//! itself and speaks text, not logits. The agent's side stays the same: it tokenizes
//! and renders chats with the bundle's own tokenizer and template; a prompt goes to
//! LiteRT-LM as the text those ids stand for, and each decoded token comes back as text.

pub mod library;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use modeld_engine_core::generation::check_prompt;
use modeld_engine_core::litertlm::{self, Bundle};
use modeld_engine_core::{
    Accelerator, EngineError, FinishReason, Flow, GenerateOutcome, GenerateRequest, GenerateStats,
    LoadOptions, LoadedModel, ModelInfo, StopMatcher, StopOutcome, Timings, Token, Tokenizer,
};

use self::library::{Chunk, SessionConfig};
use crate::Inspected;

/// A bundle loaded in LiteRT-LM.
pub struct LmModel {
    engine: library::Engine,
    tokenizer: Arc<dyn Tokenizer>,
    info: ModelInfo,
    /// Where LiteRT-LM keeps the weights XNNPACK packed, when the model made it itself
    /// (inside the agent; an engine process is given one). Removed after the engine
    /// is gone: fields drop in order.
    _own_scratch: Option<tempfile::TempDir>,
}

/// The tokenizer a bundle's prompts are made with: the bundle's own (its Hugging Face
/// tokenizer, stop tokens and chat template), else a tokenizer.json beside it.
fn tokenizer_for(file: &Path, bundle: &Bundle) -> Result<Arc<dyn Tokenizer>, EngineError> {
    let metadata = litertlm::llm_metadata(file, bundle)?.unwrap_or_default();
    if let Some(json) = litertlm::hf_tokenizer_json(file, bundle)? {
        return Ok(modeld_tokenizer::json::from_bytes(
            "litertlm",
            &json,
            &metadata.stop_ids,
            &metadata.stop_texts,
            metadata.jinja_prompt_template.as_deref(),
            metadata.max_num_tokens,
        )?
        .into_shared());
    }
    let dir = file.parent().unwrap_or(Path::new("."));
    modeld_tokenizer::for_model(dir, modeld_engine_core::ModelFormat::Tflite, None, None).map_err(
        |e| {
            EngineError::Load(format!(
                "{}: the bundle carries no Hugging Face tokenizer (a SentencePiece one is \
                 not read here), and beside it: {e}",
                file.display()
            ))
        },
    )
}

pub fn load(
    library: Option<&Path>,
    inspected: &Inspected,
    bundle: &Bundle,
    options: &LoadOptions,
) -> Result<Box<dyn LoadedModel>, EngineError> {
    let tokenizer = tokenizer_for(&inspected.file, bundle)?;
    let lib = library::open(library)?;
    let (own_scratch, dir): (Option<tempfile::TempDir>, PathBuf) = match &options.scratch_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let own = tempfile::Builder::new()
                .prefix("modeld-litert-lm-")
                .tempdir()
                .map_err(|e| EngineError::Load(format!("no cache directory: {e}")))?;
            let path = own.path().to_path_buf();
            (Some(own), path)
        }
    };
    // The graph's cache is fixed at export: that is the context.
    let context = inspected.shape.context as u32;
    let engine = library::Engine::create(
        lib,
        &inspected.file,
        &dir,
        options.threads_or_all_cores(),
        context,
    )?;
    let probe = &inspected.probe;
    let info = ModelInfo {
        architecture: probe.architecture.clone(),
        parameter_count: probe.parameter_count,
        context_length: context,
        vocab_size: probe.vocab_size,
        chat_template: None,
        memory_bytes: crate::estimate(probe).total(),
        accelerator: Accelerator::Cpu,
        threads: options.threads_or_all_cores(),
        ..ModelInfo::default()
    };
    Ok(Box::new(LmModel {
        engine,
        tokenizer,
        info,
        _own_scratch: own_scratch,
    }))
}

/// What LiteRT-LM's session takes of a request; what it cannot honour is refused by
/// name rather than ignored.
fn session_config(request: &GenerateRequest, room: u32) -> Result<SessionConfig, EngineError> {
    use modeld_engine_core::sampler::{DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P};
    let refuse = |what: &str| {
        Err(EngineError::InvalidRequest(format!(
            "{what}: LiteRT-LM samples by itself and cannot honour it; run the model as a \
             .tflite decoder or a GGUF for that"
        )))
    };
    if request.grammar.is_some() {
        return refuse("a grammar");
    }
    if request.logprobs {
        return refuse("log-probabilities");
    }
    let s = &request.sampling;
    if s.repeat_penalty.is_some_and(|p| p != 1.0)
        || s.frequency_penalty.is_some_and(|p| p != 0.0)
        || s.presence_penalty.is_some_and(|p| p != 0.0)
    {
        return refuse("a repetition penalty");
    }
    if s.min_p.is_some_and(|p| p > 0.0) {
        return refuse("min_p");
    }
    let max_output_tokens = match request.max_tokens {
        0 => room,
        n => n.min(room),
    };
    let temperature = s.temperature.unwrap_or(DEFAULT_TEMPERATURE);
    // Greedy is top-p over the single best token.
    Ok(if temperature <= 0.0 {
        SessionConfig {
            top_k: 1,
            top_p: 1.0,
            temperature: 1.0,
            seed: 0,
            max_output_tokens,
        }
    } else {
        SessionConfig {
            top_k: s.top_k.filter(|k| *k > 0).unwrap_or(DEFAULT_TOP_K),
            top_p: s.top_p.unwrap_or(DEFAULT_TOP_P),
            temperature,
            // Unseeded requests get a fresh draw each time, as the shared sampler's do.
            seed: s.seed.map_or_else(rand::random, |v| v as u32),
            max_output_tokens,
        }
    })
}

impl LoadedModel for LmModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> Arc<dyn Tokenizer> {
        self.tokenizer.clone()
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn FnMut(Token) -> Flow,
    ) -> GenerateOutcome {
        let context = self.info.context_length;
        check_prompt(&request.prompt, context, self.tokenizer.vocab_size())?;
        let prompt_len = u32::try_from(request.prompt.len()).unwrap_or(u32::MAX);
        // `ignore_eos` cannot be honoured: LiteRT-LM stops at the bundle's stop tokens
        // whatever the session says. A benchmark reports the tokens it got.
        let config = session_config(request, context - prompt_len)?;
        // The ids stand for this text, special tokens included; LiteRT-LM tokenizes it
        // again with the same tokenizer.
        let text = self.tokenizer.decode(&request.prompt, false)?;
        let started = Instant::now();
        let mut session = self.engine.session(&config)?;
        session.prefill(&text)?;
        let chunks = session.decode()?;
        let mut stops = StopMatcher::new(&request.stop);
        let mut generated = 0u32;
        let mut first_token_at = None;
        let mut finish = None;
        let ended = loop {
            let Ok(chunk) = chunks.recv() else {
                break Some("LiteRT-LM's decoding thread ended without a word".to_owned());
            };
            let text = match chunk {
                Chunk::Text(t) => t,
                Chunk::End(why) => break why,
            };
            first_token_at.get_or_insert_with(Instant::now);
            if finish.is_some() {
                // Cancelled or stopped: drain until LiteRT-LM says it ended.
                continue;
            }
            generated += 1;
            let (text, stopped) = match stops.push(&text) {
                StopOutcome::Emit(t) => (t, false),
                StopOutcome::Stopped(t) => (t, true),
            };
            // LiteRT-LM gives text; the id is the token that text encodes to alone.
            let id = self
                .tokenizer
                .encode(&text, false, true)
                .ok()
                .filter(|ids| ids.len() == 1)
                .map_or(u32::MAX, |ids| ids[0]);
            let flow = sink(Token {
                id,
                text,
                logprob: None,
            });
            if flow == Flow::Stop || stopped {
                finish = Some(if stopped {
                    FinishReason::Stop
                } else {
                    FinishReason::Cancelled
                });
                session.cancel();
            }
        };
        let end = Instant::now();
        let finish = match (finish, ended) {
            (Some(f), _) => f,
            (None, None) if generated >= config.max_output_tokens => FinishReason::Length,
            (None, None) => FinishReason::Stop,
            (None, Some(why)) if why.contains("Max number of tokens") => FinishReason::Length,
            (None, Some(why)) => {
                return Err(EngineError::Inference(format!("LiteRT-LM: {why}")));
            }
        };
        // LiteRT-LM prefills and samples the first token in one go: the prompt is
        // done when the first token arrives.
        let timings = Timings {
            started,
            prompt_done: first_token_at.unwrap_or(end),
            first_token: first_token_at,
            end,
        };
        Ok((
            finish,
            GenerateStats::timed(request.prompt.len(), 0, generated, timings),
        ))
    }
}
