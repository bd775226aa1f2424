//! llama.cpp engine (GGUF), through llama-cpp-2.
//!
//! Everything here blocks: the agent calls it from worker threads it owns. One
//! context lives as long as the model serves, with one KV sequence per parallel slot:
//! requests join and leave the running batch between decode steps (continuous
//! batching), so several clients share each forward pass instead of queueing.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use modeld_engine_core::sampler::{self, Sampler};
use modeld_engine_core::{
    Accelerator, ChatMessage, CpuVariant, Engine, EngineError, FinishReason, FlashAttention, Flow,
    GenerateOutcome, GenerateRequest, GenerateStats, JobSource, KvCacheType, LoadOptions,
    LoadedModel, MemoryEstimate, ModelFormat, ModelInfo, ModelProbe, Runtime, SpecialTokens,
    StopMatcher, StopOutcome, Token, Tokenizer, Utf8Stream, gguf,
};
use prompt_cache::{ATTENTION_TILE, Slots, chunk_end};

/// Sequences decoded together when the load options do not say.
pub const DEFAULT_PARALLEL: u32 = 4;
const DEFAULT_BATCH: u32 = 512;

pub mod cpu;
mod prompt_cache;

/// llama.cpp's backend, with the CPU kernels it chose, is process-wide and may be
/// initialized once.
struct Backend {
    llama: LlamaBackend,
    cpu: CpuVariant,
}

fn backend(variants_dir: Option<&Path>) -> Result<&'static Backend, EngineError> {
    static BACKEND: OnceLock<Result<Backend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| init_backend(variants_dir).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| EngineError::Load(format!("llama.cpp backend: {e}")))
}

fn init_backend(variants_dir: Option<&Path>) -> Result<Backend, EngineError> {
    #[cfg(feature = "cpu-variants")]
    let dir = {
        let dir = cpu::variants_dir(variants_dir)?;
        // ggml dlopens every module in the directory, asks each for its score on this
        // CPU, and registers the best one.
        llama_cpp_2::llama_backend::load_backends_from_path(&dir);
        Some(dir)
    };
    #[cfg(not(feature = "cpu-variants"))]
    let dir: Option<std::path::PathBuf> = {
        let _ = variants_dir;
        None
    };
    let mut llama = LlamaBackend::init().map_err(|e| EngineError::Load(e.to_string()))?;
    llama.void_logs();
    let maps = std::fs::read_to_string("/proc/self/maps").ok();
    let cpu = cpu::describe(dir.as_deref(), &system_info(), maps.as_deref());
    Ok(Backend { llama, cpu })
}

/// llama.cpp's description of the CPU features its registered backend uses.
#[allow(unsafe_code)]
fn system_info() -> String {
    // SAFETY: llama_print_system_info returns a NUL-terminated string in a static
    // buffer that stays valid until the next call; it is called once, under the
    // backend's OnceLock, and copied before returning.
    let info = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    info.to_string_lossy().into_owned()
}

/// The version of llama-cpp-2 (and the llama.cpp it vendors) compiled in.
pub const VERSION: &str = "llama-cpp-2 0.1.160";

#[derive(Debug, Default, Clone)]
pub struct LlamaEngine {
    /// Where llama.cpp's CPU variants are; `None` searches the packaged and built ones.
    pub cpu_variants_dir: Option<std::path::PathBuf>,
}

impl Engine for LlamaEngine {
    fn runtime(&self) -> Runtime {
        Runtime::LlamaCpp
    }

    fn version(&self) -> String {
        VERSION.to_owned()
    }

    fn runtime_paths(&self) -> Vec<std::path::PathBuf> {
        // ggml opens its CPU variant module when the backend starts, after the
        // engine process is confined.
        #[cfg(feature = "cpu-variants")]
        return cpu::variants_dir(self.cpu_variants_dir.as_deref())
            .map(|d| vec![d])
            .unwrap_or_default();
        #[cfg(not(feature = "cpu-variants"))]
        Vec::new()
    }

    fn formats(&self) -> &[ModelFormat] {
        &[ModelFormat::Gguf]
    }

    fn quantizations(&self) -> &[&'static str] {
        &[
            "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S",
            "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS",
        ]
    }

    fn accelerators(&self) -> Vec<Accelerator> {
        vec![Accelerator::Cpu]
    }

    fn cpu_variant(&self) -> Result<CpuVariant, EngineError> {
        Ok(backend(self.cpu_variants_dir.as_deref())?.cpu.clone())
    }

    /// Reads the GGUF header with the bounds-checked reader: llama.cpp asserts (and
    /// aborts the process) on files this rejects.
    fn probe(&self, path: &Path) -> Result<ModelProbe, EngineError> {
        let invalid = |e: String| EngineError::InvalidModel(format!("{}: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| invalid(e.to_string()))?;
        let size = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
        let header = gguf::read_header(std::io::BufReader::new(file), size)
            .map_err(|e| invalid(e.to_string()))?;
        header.probe().map_err(invalid)
    }

    fn estimate_memory(&self, probe: &ModelProbe, options: &LoadOptions) -> MemoryEstimate {
        let context = u64::from(options.context_for(probe.context_length));
        let parallel = u64::from(parallel_for(options.parallel));
        let batch = u64::from(if options.batch_size == 0 {
            DEFAULT_BATCH
        } else {
            options.batch_size
        });
        let kv_cache = options
            .kv_cache_type
            .bytes_for(probe.kv_values(context * parallel));
        // llama.cpp's compute buffer holds one batch's activations (a few dozen f32
        // vectors of the embedding width per token) and the logits of every output.
        let compute = batch * u64::from(probe.embedding_length) * 4 * COMPUTE_VECTORS
            + parallel.max(1) * u64::from(probe.vocab_size) * 4;
        MemoryEstimate {
            weights: probe.weights_bytes,
            kv_cache,
            compute,
        }
    }

    fn load(
        &self,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<Box<dyn LoadedModel>, EngineError> {
        let backend = &backend(self.cpu_variants_dir.as_deref())?.llama;
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(options.gpu_layers)
            .with_use_mmap(options.use_mmap)
            .with_use_mlock(options.use_mlock);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| EngineError::Load(e.to_string()))?;
        let context_length = options.context_for(model.n_ctx_train());
        let parallel = parallel_for(options.parallel);
        let threads = options.threads_or_all_cores();
        let info = ModelInfo {
            architecture: model
                .meta_val_str("general.architecture")
                .unwrap_or_default(),
            parameter_count: model.n_params(),
            context_length,
            vocab_size: u32::try_from(model.vocab().n_tokens()).unwrap_or(0),
            chat_template: model
                .chat_template(None)
                .ok()
                .and_then(|t| t.to_string().ok()),
            memory_bytes: model.size()
                + kv_cache_bytes(
                    &model,
                    u64::from(context_length) * u64::from(parallel),
                    options.kv_cache_type,
                ),
            // This build registers llama.cpp's CPU backends only.
            accelerator: Accelerator::Cpu,
            kv_cache_type: options.kv_cache_type,
            flash_attention: options.flash_attention,
            threads,
        };
        let model = Arc::new(model);
        Ok(Box::new(LlamaLoaded {
            tokenizer: Arc::new(LlamaTokenizer::new(model.clone(), context_length)),
            model,
            info,
            threads,
            batch: if options.batch_size == 0 {
                DEFAULT_BATCH
            } else {
                options.batch_size
            },
            parallel,
        }))
    }
}

fn kv_type(kv: KvCacheType) -> llama_cpp_2::context::params::KvCacheType {
    use llama_cpp_2::context::params::KvCacheType as Ggml;
    match kv {
        KvCacheType::F16 => Ggml::F16,
        KvCacheType::Q8_0 => Ggml::Q8_0,
        KvCacheType::Q4_0 => Ggml::Q4_0,
    }
}

/// Per-token f32 vectors of the embedding width in llama.cpp's compute buffer.
const COMPUTE_VECTORS: u64 = 24;

/// The context a load gets: what it asked for, within what the model was trained on.
fn parallel_for(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PARALLEL,
        n => n,
    }
}

/// KV cache for `tokens` positions: K and V, per layer, per KV head.
fn kv_cache_bytes(model: &LlamaModel, tokens: u64, kv: KvCacheType) -> u64 {
    let n_head = u64::from(model.n_head().max(1));
    let head_dim = u64::try_from(model.n_embd()).unwrap_or(0) / n_head;
    let kv_dim = head_dim * u64::from(model.n_head_kv());
    kv.bytes_for(2 * u64::from(model.n_layer()) * kv_dim * tokens)
}

/// Provider (c): the model's own tokenizer in llama.cpp, usable from any thread
/// (the vocabulary is read-only once loaded).
pub struct LlamaTokenizer {
    model: Arc<LlamaModel>,
    vocab_size: u32,
    special: SpecialTokens,
    max_length: u32,
}

impl LlamaTokenizer {
    fn new(model: Arc<LlamaModel>, max_length: u32) -> LlamaTokenizer {
        let vocab = model.vocab();
        let id = |t: LlamaToken| u32::try_from(t.0).ok();
        let special = SpecialTokens {
            bos: id(vocab.bos()),
            eos: id(vocab.eos()),
            pad: id(vocab.pad()),
            add_bos: vocab.should_add_bos(),
            add_eos: vocab.should_add_eos(),
            end_of_generation: vocab
                .tokens()
                .filter(|t| vocab.is_eog(*t))
                .filter_map(id)
                .collect(),
        };
        let vocab_size = u32::try_from(vocab.n_tokens()).unwrap_or(0);
        LlamaTokenizer {
            model,
            vocab_size,
            special,
            max_length,
        }
    }

    fn to_token(&self, id: u32) -> Result<LlamaToken, EngineError> {
        let n = self.vocab_size;
        if id < n {
            i32::try_from(id)
                .map(LlamaToken::new)
                .map_err(|_| bad_token(id, n))
        } else {
            Err(bad_token(id, n))
        }
    }

    fn to_tokens(&self, ids: &[u32]) -> Result<Vec<LlamaToken>, EngineError> {
        ids.iter().map(|&id| self.to_token(id)).collect()
    }
}

impl Tokenizer for LlamaTokenizer {
    fn provider(&self) -> &str {
        "llama.cpp"
    }

    fn encode(
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

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        let tokens = self.to_tokens(ids)?;
        let bytes = self
            .model
            .vocab()
            .detokenize(&tokens, skip_special, !skip_special);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn token_bytes(&self, id: u32) -> Result<Vec<u8>, EngineError> {
        let token = self.to_token(id)?;
        Ok(self.model.vocab().token_to_piece(token, true, None))
    }

    fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    fn max_length(&self) -> u32 {
        self.max_length
    }

    /// llama.cpp's own renderer, which knows common templates by heuristics. The
    /// agent prefers rendering the model's template with minijinja.
    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self.model.chat_template(None).map_err(|e| {
            EngineError::InvalidRequest(format!("the model has no chat template: {e}"))
        })?;
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::InvalidRequest(format!("chat message: {e}")))?;
        self.model
            .apply_chat_template(&template, &chat, add_generation_prompt)
            .map_err(|e| EngineError::InvalidRequest(format!("chat template: {e}")))
    }
}

pub struct LlamaLoaded {
    model: Arc<LlamaModel>,
    tokenizer: Arc<LlamaTokenizer>,
    info: ModelInfo,
    threads: u32,
    batch: u32,
    parallel: u32,
}

fn token_id(t: LlamaToken) -> u32 {
    u32::try_from(t.0).unwrap_or(0)
}

fn bad_token(id: u32, n: u32) -> EngineError {
    EngineError::InvalidRequest(format!("token id {id} is outside the vocabulary (0..{n})"))
}

fn inference(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Inference(format!("{what}: {e}"))
}

/// How a sequence picks its tokens: the sampler every engine shares, or — for a
/// grammar, whose parse state lives inside llama.cpp's sampler chain — that chain.
enum Picker {
    Shared(Box<Sampler>),
    Grammar(LlamaSampler),
}

impl Picker {
    fn new(
        model: &LlamaModel,
        vocab_size: u32,
        request: &GenerateRequest,
    ) -> Result<Picker, EngineError> {
        let Some(grammar) = &request.grammar else {
            return Ok(Picker::Shared(Box::new(Sampler::new(&request.sampling))));
        };
        let s = &request.sampling;
        let mut chain = vec![LlamaSampler::grammar(model, grammar, "root").map_err(|e| {
            EngineError::InvalidRequest(format!("grammar: {e} (GBNF with a `root` rule expected)"))
        })?];
        if s.repeat_penalty.is_some()
            || s.frequency_penalty.is_some()
            || s.presence_penalty.is_some()
        {
            let last_n = match s.penalty_last_n {
                0 => sampler::DEFAULT_PENALTY_LAST_N,
                n => n,
            };
            chain.push(LlamaSampler::penalties(
                i32::try_from(vocab_size).unwrap_or(i32::MAX),
                i32::try_from(last_n).unwrap_or(i32::MAX),
                s.repeat_penalty.unwrap_or(1.0),
                s.frequency_penalty.unwrap_or(0.0),
                s.presence_penalty.unwrap_or(0.0),
            ));
        }
        let temperature = s.temperature.unwrap_or(sampler::DEFAULT_TEMPERATURE);
        if temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            chain.push(LlamaSampler::top_k(
                i32::try_from(s.top_k.unwrap_or(sampler::DEFAULT_TOP_K)).unwrap_or(i32::MAX),
            ));
            chain.push(LlamaSampler::top_p(
                s.top_p.unwrap_or(sampler::DEFAULT_TOP_P),
                1,
            ));
            chain.push(LlamaSampler::min_p(
                s.min_p.unwrap_or(sampler::DEFAULT_MIN_P),
                1,
            ));
            chain.push(LlamaSampler::temp(temperature));
            // llama.cpp seeds with 32 bits; fold the request's 64 bits into them.
            let seed = s.seed.map_or(0xFFFF_FFFF, |v| (v ^ (v >> 32)) as u32);
            chain.push(LlamaSampler::dist(seed));
        }
        Ok(Picker::Grammar(LlamaSampler::chain_simple(chain)))
    }

    /// The next token from the logits at `index` of the batch just decoded, and its
    /// log-probability when asked for.
    fn pick(
        &mut self,
        ctx: &LlamaContext<'_>,
        index: i32,
        logprobs: bool,
    ) -> Result<(LlamaToken, Option<f32>), EngineError> {
        match self {
            Picker::Shared(sampler) => {
                let mut logits = ctx.get_logits_ith(index).to_vec();
                let sampled = sampler.sample(&mut logits, logprobs)?;
                let id = i32::try_from(sampled.id).map_err(|_| {
                    EngineError::Inference(format!("sampled token id {} overflows", sampled.id))
                })?;
                Ok((LlamaToken::new(id), sampled.logprob))
            }
            Picker::Grammar(chain) => {
                // sample() also accepts the token into the chain (penalties, grammar).
                let token = chain.sample(ctx, index);
                let logprob =
                    logprobs.then(|| log_prob(ctx.get_logits_ith(index), token_id(token)));
                Ok((token, logprob))
            }
        }
    }
}

/// One request in the running batch.
struct Sequence<'s> {
    slot: u32,
    sink: Box<dyn FnMut(Token) -> Flow + 's>,
    done: Box<dyn FnOnce(GenerateOutcome) + 's>,
    logprobs: bool,
    ignore_eos: bool,
    picker: Picker,
    prompt: Vec<LlamaToken>,
    /// May reuse what an earlier prompt left in a slot.
    cache_prompt: bool,
    /// Prompt tokens already sent to a batch, or found in the slot's cache.
    fed: usize,
    /// Leading prompt tokens the slot's cache gave.
    cached: usize,
    /// Per prompt row fed: computed in a ubatch of at least one attention tile.
    tiled: Vec<bool>,
    /// The token sampled last, fed in the next step.
    next: Option<LlamaToken>,
    pos: i32,
    /// Where this sequence's logits are in the batch just decoded.
    logits_at: Option<i32>,
    utf8: Utf8Stream,
    stops: StopMatcher,
    generated: u32,
    max_tokens: u32,
    started: Instant,
    prompt_done: Option<Instant>,
    first_token_at: Option<Instant>,
    finish: Option<FinishReason>,
    /// Why the sequence ended in error, if it did.
    failed: Option<EngineError>,
}

impl Sequence<'_> {
    fn stats(&self) -> GenerateStats {
        let end = Instant::now();
        let prompt_secs = self
            .prompt_done
            .map_or(0.0, |t| (t - self.started).as_secs_f64());
        let gen_secs = self.first_token_at.map_or(0.0, |t| (end - t).as_secs_f64());
        // The rate of the rows computed: what the cache gave took no time.
        #[allow(clippy::cast_precision_loss)]
        let computed = (self.prompt.len() - self.cached) as f64;
        GenerateStats {
            prompt_tokens: u32::try_from(self.prompt.len()).unwrap_or(u32::MAX),
            cached_prompt_tokens: u32::try_from(self.cached).unwrap_or(u32::MAX),
            generated_tokens: self.generated,
            time_to_first_token_seconds: self
                .first_token_at
                .map_or(0.0, |t| (t - self.started).as_secs_f64()),
            prompt_tokens_per_second: if prompt_secs > 0.0 {
                computed / prompt_secs
            } else {
                0.0
            },
            // The first token's time belongs to the prompt; rate the rest.
            generation_tokens_per_second: if gen_secs > 0.0 && self.generated > 1 {
                f64::from(self.generated - 1) / gen_secs
            } else {
                0.0
            },
        }
    }
}

/// A job as the batch loop sees it: `'s` lets `generate` lend a borrowed sink.
struct Work<'s> {
    request: GenerateRequest,
    sink: Box<dyn FnMut(Token) -> Flow + 's>,
    done: Box<dyn FnOnce(GenerateOutcome) + 's>,
}

/// Hands out work: blocking when asked to (`true`), else only what is waiting.
type NextWork<'a, 's> = dyn FnMut(bool) -> Option<Work<'s>> + 'a;

impl LlamaLoaded {
    fn new_context<'m>(
        &self,
        model: &'m LlamaModel,
        parallel: u32,
    ) -> Result<LlamaContext<'m>, EngineError> {
        let n_ctx = self.info.context_length.saturating_mul(parallel);
        let n_batch = self.batch.min(n_ctx).max(1);
        let mut params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch)
            .with_n_seq_max(parallel)
            // One KV stream per sequence: each request gets its full context length
            // and attends only to its own cache.
            .with_kv_unified(false)
            .with_type_k(kv_type(self.info.kv_cache_type))
            .with_type_v(kv_type(self.info.kv_cache_type))
            .with_flash_attention_policy(match self.info.flash_attention {
                FlashAttention::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
                FlashAttention::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
                FlashAttention::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            });
        let threads = i32::try_from(self.threads).unwrap_or(i32::MAX);
        params = params.with_n_threads(threads).with_n_threads_batch(threads);
        // A loaded model exists, so the backend was initialized by its load: the
        // directory argument is not consulted again.
        let backend = &backend(None)?.llama;
        model
            .new_context(backend, params)
            .map_err(|e| inference("context", e))
    }

    /// Turns a job into a sequence, not yet in a slot; a job that cannot run is
    /// answered with why, and `None` comes back.
    fn admit<'s>(&self, job: Work<'s>) -> Option<Sequence<'s>> {
        let n_ctx = self.info.context_length;
        let request = &job.request;
        let checked = self.tokenizer.to_tokens(&request.prompt).and_then(|p| {
            if p.is_empty() {
                Err(EngineError::InvalidRequest("the prompt is empty".into()))
            } else if p.len() >= n_ctx as usize {
                Err(EngineError::ContextOverflow {
                    prompt: p.len(),
                    context: n_ctx,
                })
            } else {
                Ok(p)
            }
        });
        let prepared = checked.and_then(|prompt| {
            Picker::new(&self.model, self.info.vocab_size, request).map(|p| (prompt, p))
        });
        let (prompt, picker) = match prepared {
            Ok(p) => p,
            Err(e) => {
                (job.done)(Err(e));
                return None;
            }
        };
        let stops = StopMatcher::new(&request.stop);
        let max_tokens = if request.max_tokens == 0 {
            u32::MAX
        } else {
            request.max_tokens
        };
        let logprobs = request.logprobs;
        let ignore_eos = request.ignore_eos;
        let cache_prompt = request.cache_prompt;
        Some(Sequence {
            slot: 0,
            sink: job.sink,
            done: job.done,
            logprobs,
            ignore_eos,
            picker,
            prompt,
            cache_prompt,
            fed: 0,
            cached: 0,
            tiled: Vec::new(),
            next: None,
            pos: 0,
            logits_at: None,
            utf8: Utf8Stream::default(),
            stops,
            generated: 0,
            max_tokens,
            started: Instant::now(),
            prompt_done: None,
            first_token_at: None,
            finish: None,
            failed: None,
        })
    }

    /// Samples the next token of a sequence whose logits are at `index`, hands it
    /// to the client, and records whether the sequence is finished.
    fn step(&self, ctx: &LlamaContext<'_>, seq: &mut Sequence<'_>, index: i32) {
        let now = Instant::now();
        seq.prompt_done.get_or_insert(now);
        let (token, logprob) = match seq.picker.pick(ctx, index, seq.logprobs) {
            Ok(picked) => picked,
            Err(e) => {
                seq.failed = Some(e);
                seq.finish = Some(FinishReason::Stop);
                return;
            }
        };
        seq.first_token_at.get_or_insert(now);
        let vocab = self.model.vocab();
        if !seq.ignore_eos && vocab.is_eog(token) {
            seq.finish = Some(FinishReason::Stop);
            return;
        }
        seq.generated += 1;
        let text = seq.utf8.push(&vocab.token_to_piece(token, true, None));
        let (text, stopped) = match seq.stops.push(&text) {
            StopOutcome::Emit(t) => (t, false),
            StopOutcome::Stopped(t) => (t, true),
        };
        let flow = (seq.sink)(Token {
            id: token_id(token),
            text,
            logprob,
        });
        seq.finish = if flow == Flow::Stop {
            Some(FinishReason::Cancelled)
        } else if stopped {
            Some(FinishReason::Stop)
        } else if seq.generated >= seq.max_tokens
            || u32::try_from(seq.pos).unwrap_or(u32::MAX) >= self.info.context_length
        {
            Some(FinishReason::Length)
        } else {
            seq.next = Some(token);
            None
        };
    }

    fn serve_with<'s>(&self, next: &mut NextWork<'_, 's>, parallel: u32) {
        let model = self.model.clone();
        let mut ctx = match self.new_context(&model, parallel) {
            Ok(ctx) => ctx,
            Err(e) => {
                // Without a context nothing can run: answer every job with why.
                while let Some(work) = next(true) {
                    (work.done)(Err(e.clone()));
                }
                return;
            }
        };
        let n_batch = self.batch.min(ctx.n_ctx()).max(1) as usize;
        let mut batch = LlamaBatch::new(n_batch, 1);
        let mut slots: Slots<LlamaToken> = Slots::new(parallel, n_batch);
        let mut active: Vec<Sequence<'s>> = Vec::new();
        loop {
            // Admit waiting jobs into free slots; block only when nothing runs.
            while slots.any_free() {
                let Some(job) = next(active.is_empty()) else {
                    break;
                };
                if let Some(mut seq) = self.admit(job) {
                    match seat(&mut ctx, &mut slots, &mut seq) {
                        Ok(()) => active.push(seq),
                        Err(e) => (seq.done)(Err(e)),
                    }
                }
            }
            if active.is_empty() {
                return;
            }

            // One batch: a token for every sequence already generating, then as
            // much pending prompt as still fits.
            batch.clear();
            let mut added = Ok(());
            for seq in &mut active {
                if let Some(token) = seq.next.take() {
                    added = added.and(batch.add(token, seq.pos, &[seq.slot as i32], true));
                    seq.logits_at = Some(batch.n_tokens() - 1);
                    seq.pos += 1;
                }
            }
            for seq in &mut active {
                let room = n_batch.saturating_sub(batch.n_tokens() as usize);
                if room == 0 {
                    break;
                }
                // A prompt's ubatches end on multiples of the batch, also after a
                // cache hit (see prompt_cache); a prompt alone in the batch is cut
                // there anyway.
                let take = room
                    .min(seq.prompt.len() - seq.fed)
                    .min(chunk_end(seq.fed, n_batch) - seq.fed);
                // The attention path these rows take (see prompt_cache).
                seq.tiled
                    .extend(std::iter::repeat_n(take >= ATTENTION_TILE, take));
                for i in seq.fed..seq.fed + take {
                    let last = i + 1 == seq.prompt.len();
                    added = added.and(batch.add(seq.prompt[i], seq.pos, &[seq.slot as i32], last));
                    if last {
                        seq.logits_at = Some(batch.n_tokens() - 1);
                    }
                    seq.pos += 1;
                }
                seq.fed += take;
            }
            let decoded = added
                .map_err(|e| inference("batch", e))
                .and_then(|()| ctx.decode(&mut batch).map_err(|e| inference("decode", e)));
            if let Err(e) = decoded {
                for seq in active.drain(..) {
                    let _ = ctx.clear_kv_cache_seq(Some(seq.slot), None, None);
                    slots.release(seq.slot, Vec::new(), Vec::new());
                    (seq.done)(Err(e.clone()));
                }
                continue;
            }

            for seq in &mut active {
                if let Some(index) = seq.logits_at.take() {
                    self.step(&ctx, seq, index);
                }
            }
            let mut i = 0;
            while i < active.len() {
                if let Some(finish) = active[i].finish {
                    let mut seq = active.swap_remove(i);
                    // The slot keeps the prompt rows for the next request; the
                    // generated rows go when it is taken again.
                    let stats = seq.stats();
                    seq.prompt.truncate(seq.tiled.len());
                    slots.release(
                        seq.slot,
                        std::mem::take(&mut seq.prompt),
                        std::mem::take(&mut seq.tiled),
                    );
                    let outcome = match seq.failed {
                        Some(e) => Err(e),
                        None => Ok((finish, stats)),
                    };
                    (seq.done)(outcome);
                } else {
                    i += 1;
                }
            }
        }
    }
}

/// Puts `seq` in a free slot, keeping what the slot holds of its prompt: those rows
/// count as fed.
fn seat(
    ctx: &mut LlamaContext<'_>,
    slots: &mut Slots<LlamaToken>,
    seq: &mut Sequence<'_>,
) -> Result<(), EngineError> {
    let (slot, mut kept) = slots
        .take(&seq.prompt, seq.cache_prompt)
        .ok_or_else(|| EngineError::Inference("no free slot for the request".into()))?;
    let from = u32::try_from(kept).unwrap_or(u32::MAX);
    if !matches!(
        ctx.clear_kv_cache_seq(Some(slot), Some(from), None),
        Ok(true)
    ) {
        // A cache that cannot drop a tail drops everything.
        let _ = ctx.clear_kv_cache_seq(Some(slot), None, None);
        kept = 0;
    }
    seq.slot = slot;
    seq.fed = kept;
    seq.cached = kept;
    seq.pos = i32::try_from(kept).unwrap_or(i32::MAX);
    seq.tiled = slots.held_paths(slot)[..kept].to_vec();
    Ok(())
}

impl LoadedModel for LlamaLoaded {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> Arc<dyn Tokenizer> {
        self.tokenizer.clone()
    }

    fn parallel(&self) -> usize {
        self.parallel as usize
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn FnMut(Token) -> Flow,
    ) -> GenerateOutcome {
        let mut outcome = None;
        {
            let mut work = Some(Work {
                request: request.clone(),
                sink: Box::new(sink),
                done: Box::new(|o| outcome = Some(o)),
            });
            self.serve_with(&mut |_| work.take(), 1);
        }
        outcome.unwrap_or_else(|| {
            Err(EngineError::Inference(
                "generation ended without an outcome".into(),
            ))
        })
    }

    fn serve(&mut self, jobs: &mut dyn JobSource) {
        let mut next = |block: bool| {
            let job = if block { jobs.wait() } else { jobs.try_next() };
            job.map(|j| Work {
                request: j.request,
                sink: j.sink,
                done: j.done,
            })
        };
        self.serve_with(&mut next, self.parallel);
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
