//! llama.cpp engine (GGUF), through llama-cpp-2.
//!
//! Everything here blocks: the agent calls it from worker threads it owns. A context
//! (and its KV cache) is created per request for now; keeping it across requests and
//! batching several sequences through one context come with continuous batching.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use modeld_engine_core::{
    Accelerator, Engine, EngineError, FinishReason, Flow, GenerateRequest, GenerateStats,
    LoadOptions, LoadedModel, ModelFormat, ModelInfo, Runtime, StopMatcher, StopOutcome, Token,
    Tokenizer, Utf8Stream,
};

/// Context length used when neither the request nor the model's training length says.
pub const DEFAULT_CONTEXT: u32 = 4096;
const DEFAULT_BATCH: u32 = 512;

/// llama.cpp's backend is process-wide and may be initialized once.
fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            LlamaBackend::init()
                .map(|mut b| {
                    b.void_logs();
                    b
                })
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Load(format!("llama.cpp backend: {e}")))
}

/// The version of llama-cpp-2 (and the llama.cpp it vendors) compiled in.
pub const VERSION: &str = "llama-cpp-2 0.1.160";

#[derive(Debug, Default)]
pub struct LlamaEngine;

impl Engine for LlamaEngine {
    fn runtime(&self) -> Runtime {
        Runtime::LlamaCpp
    }

    fn formats(&self) -> &[ModelFormat] {
        &[ModelFormat::Gguf]
    }

    fn accelerators(&self) -> Vec<Accelerator> {
        vec![Accelerator::Cpu]
    }

    fn load(
        &self,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<Box<dyn LoadedModel>, EngineError> {
        let backend = backend()?;
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(options.gpu_layers)
            .with_use_mmap(options.use_mmap)
            .with_use_mlock(options.use_mlock);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| EngineError::Load(e.to_string()))?;
        let vocab = model.vocab();
        let trained = model.n_ctx_train();
        let context_length = match options.context_length {
            0 => trained.clamp(1, DEFAULT_CONTEXT),
            n => n.min(trained.max(1)),
        };
        let bos = vocab.bos();
        let eos = vocab.eos();
        let info = ModelInfo {
            architecture: model
                .meta_val_str("general.architecture")
                .unwrap_or_default(),
            parameter_count: model.n_params(),
            context_length,
            vocab_size: u32::try_from(vocab.n_tokens()).unwrap_or(0),
            bos: u32::try_from(bos.0).ok(),
            eos: u32::try_from(eos.0).ok(),
            chat_template: model
                .chat_template(None)
                .ok()
                .and_then(|t| t.to_string().ok()),
            memory_bytes: model.size(),
        };
        let model = Arc::new(model);
        Ok(Box::new(LlamaLoaded {
            tokenizer: Arc::new(LlamaTokenizer {
                model: model.clone(),
                vocab_size: info.vocab_size,
            }),
            model,
            info,
            threads: options.threads,
            batch: if options.batch_size == 0 {
                DEFAULT_BATCH
            } else {
                options.batch_size
            },
        }))
    }
}

/// The model's own tokenizer, usable from any thread (llama.cpp's vocabulary is
/// read-only once loaded).
pub struct LlamaTokenizer {
    model: Arc<LlamaModel>,
    vocab_size: u32,
}

impl LlamaTokenizer {
    fn to_tokens(&self, ids: &[u32]) -> Result<Vec<LlamaToken>, EngineError> {
        let n = self.vocab_size;
        ids.iter()
            .map(|&id| {
                if id < n {
                    i32::try_from(id)
                        .map(LlamaToken::new)
                        .map_err(|_| bad_token(id, n))
                } else {
                    Err(bad_token(id, n))
                }
            })
            .collect()
    }
}

impl Tokenizer for LlamaTokenizer {
    fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError> {
        Ok(self
            .model
            .vocab()
            .tokenize(text.as_bytes(), add_special, parse_special)
            .into_iter()
            .map(token_id)
            .collect())
    }

    fn detokenize(&self, tokens: &[u32], skip_special: bool) -> Result<String, EngineError> {
        let tokens = self.to_tokens(tokens)?;
        let bytes = self
            .model
            .vocab()
            .detokenize(&tokens, skip_special, !skip_special);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Renders chat messages with the model's own template (llama.cpp's renderer).
    fn render_chat(&self, messages: &[(String, String)]) -> Result<String, EngineError> {
        let template = self.model.chat_template(None).map_err(|e| {
            EngineError::InvalidRequest(format!("the model has no chat template: {e}"))
        })?;
        let chat = messages
            .iter()
            .map(|(role, content)| LlamaChatMessage::new(role.clone(), content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::InvalidRequest(format!("chat message: {e}")))?;
        self.model
            .apply_chat_template(&template, &chat, true)
            .map_err(|e| EngineError::InvalidRequest(format!("chat template: {e}")))
    }
}

pub struct LlamaLoaded {
    model: Arc<LlamaModel>,
    tokenizer: Arc<LlamaTokenizer>,
    info: ModelInfo,
    threads: u32,
    batch: u32,
}

fn token_id(t: LlamaToken) -> u32 {
    u32::try_from(t.0).unwrap_or(0)
}

impl LlamaLoaded {
    fn sampler(&self, request: &GenerateRequest) -> Result<LlamaSampler, EngineError> {
        let s = &request.sampling;
        let mut chain = Vec::new();
        if let Some(grammar) = &request.grammar {
            chain.push(
                LlamaSampler::grammar(&self.model, grammar, "root").map_err(|e| {
                    EngineError::InvalidRequest(format!(
                        "grammar: {e} (GBNF with a `root` rule expected)"
                    ))
                })?,
            );
        }
        let penalties = s.repeat_penalty.is_some()
            || s.frequency_penalty.is_some()
            || s.presence_penalty.is_some();
        if penalties {
            let last_n = if s.penalty_last_n == 0 {
                64
            } else {
                i32::try_from(s.penalty_last_n).unwrap_or(i32::MAX)
            };
            chain.push(LlamaSampler::penalties(
                i32::try_from(self.info.vocab_size).unwrap_or(i32::MAX),
                last_n,
                s.repeat_penalty.unwrap_or(1.0),
                s.frequency_penalty.unwrap_or(0.0),
                s.presence_penalty.unwrap_or(0.0),
            ));
        }
        let temperature = s.temperature.unwrap_or(0.8);
        if temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            chain.push(LlamaSampler::top_k(
                i32::try_from(s.top_k.unwrap_or(40)).unwrap_or(40),
            ));
            chain.push(LlamaSampler::top_p(s.top_p.unwrap_or(0.95), 1));
            chain.push(LlamaSampler::min_p(s.min_p.unwrap_or(0.05), 1));
            chain.push(LlamaSampler::temp(temperature));
            // llama.cpp seeds with 32 bits; fold the request's 64 bits into them.
            let seed = s.seed.map_or(0xFFFF_FFFF, |v| (v ^ (v >> 32)) as u32);
            chain.push(LlamaSampler::dist(seed));
        }
        Ok(LlamaSampler::chain_simple(chain))
    }
}

fn bad_token(id: u32, n: u32) -> EngineError {
    EngineError::InvalidRequest(format!("token id {id} is outside the vocabulary (0..{n})"))
}

impl LoadedModel for LlamaLoaded {
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
    ) -> Result<(FinishReason, GenerateStats), EngineError> {
        let backend = backend()?;
        let n_ctx = self.info.context_length;
        let prompt = self.tokenizer.to_tokens(&request.prompt)?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt.len() >= n_ctx as usize {
            return Err(EngineError::ContextOverflow {
                prompt: prompt.len(),
                context: n_ctx,
            });
        }
        let n_batch = self.batch.min(n_ctx).max(1);
        let mut params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_batch);
        if self.threads > 0 {
            let t = i32::try_from(self.threads).unwrap_or(i32::MAX);
            params = params.with_n_threads(t).with_n_threads_batch(t);
        }
        let mut ctx = self
            .model
            .new_context(backend, params)
            .map_err(|e| EngineError::Inference(format!("context: {e}")))?;
        let vocab = self.model.vocab();
        let started = Instant::now();

        // Prefill in chunks no larger than n_batch (a larger batch aborts llama.cpp).
        let mut batch = LlamaBatch::new(n_batch as usize, 1);
        let chunks: Vec<&[LlamaToken]> = prompt.chunks(n_batch as usize).collect();
        let mut pos = 0i32;
        for (ci, chunk) in chunks.iter().enumerate() {
            batch.clear();
            let last_chunk = ci + 1 == chunks.len();
            for (i, t) in chunk.iter().enumerate() {
                let logits = last_chunk && i + 1 == chunk.len();
                batch
                    .add(*t, pos, &[0], logits)
                    .map_err(|e| EngineError::Inference(format!("batch: {e}")))?;
                pos += 1;
            }
            ctx.decode(&mut batch)
                .map_err(|e| EngineError::Inference(format!("prompt decode: {e}")))?;
        }
        let prompt_done = Instant::now();
        let mut sampler = self.sampler(request)?;
        let mut utf8 = Utf8Stream::default();
        let mut stops = StopMatcher::new(&request.stop);
        let mut generated = 0u32;
        let mut first_token_at = None;
        let max_tokens = if request.max_tokens == 0 {
            u32::MAX
        } else {
            request.max_tokens
        };
        let mut logits_index = batch.n_tokens() - 1;
        let finish = loop {
            if generated >= max_tokens {
                break FinishReason::Length;
            }
            if pos as u32 >= n_ctx {
                break FinishReason::Length;
            }
            // sample() also accepts the token into the chain (penalties, grammar).
            let token = sampler.sample(&ctx, logits_index);
            first_token_at.get_or_insert_with(Instant::now);
            if vocab.is_eog(token) {
                break FinishReason::Stop;
            }
            generated += 1;
            let logprob = request
                .logprobs
                .then(|| log_prob(ctx.get_logits_ith(logits_index), token_id(token)));
            let bytes = vocab.token_to_piece(token, false, None);
            let text = utf8.push(&bytes);
            let (text, stopped) = match stops.push(&text) {
                StopOutcome::Emit(t) => (t, false),
                StopOutcome::Stopped(t) => (t, true),
            };
            if sink(Token {
                id: token_id(token),
                text,
                logprob,
            }) == Flow::Stop
            {
                break FinishReason::Cancelled;
            }
            if stopped {
                break FinishReason::Stop;
            }
            batch.clear();
            batch
                .add(token, pos, &[0], true)
                .map_err(|e| EngineError::Inference(format!("batch: {e}")))?;
            pos += 1;
            ctx.decode(&mut batch)
                .map_err(|e| EngineError::Inference(format!("decode: {e}")))?;
            logits_index = 0;
        };
        let end = Instant::now();
        let prompt_secs = (prompt_done - started).as_secs_f64();
        let gen_secs = first_token_at.map_or(0.0, |t| (end - t).as_secs_f64());
        #[allow(clippy::cast_precision_loss)]
        let stats = GenerateStats {
            prompt_tokens: u32::try_from(prompt.len()).unwrap_or(u32::MAX),
            generated_tokens: generated,
            time_to_first_token_seconds: first_token_at
                .map_or(0.0, |t| (t - started).as_secs_f64()),
            prompt_tokens_per_second: if prompt_secs > 0.0 {
                prompt.len() as f64 / prompt_secs
            } else {
                0.0
            },
            generation_tokens_per_second: if gen_secs > 0.0 && generated > 1 {
                f64::from(generated - 1) / gen_secs
            } else {
                0.0
            },
        };
        Ok((finish, stats))
    }
}

/// log softmax of `logits` at `id`.
fn log_prob(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |l| l - max - sum.ln())
}
