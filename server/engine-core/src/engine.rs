//! The engine boundary: what the agent asks of a runtime, in plain synchronous Rust.
//! The agent owns the threads; an engine never spawns onto an async runtime.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::format::ModelFormat;
use crate::runtime::{Accelerator, Runtime};

/// How to load a model. Zero means "the engine's default".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Tokens each sequence may hold.
    pub context_length: u32,
    /// Sequences decoded together (continuous batching); each gets its own context.
    pub parallel: u32,
    /// Inference threads; 0 = every core this process may use. The agent resolves 0
    /// to the device's physical cores before a load, so engines see it only when used
    /// on their own.
    pub threads: u32,
    pub batch_size: u32,
    /// Layers to offload to an accelerator; 0 = none, u32::MAX = all.
    pub gpu_layers: u32,
    pub use_mmap: bool,
    pub use_mlock: bool,
    /// Execution providers to try, best first ("cpu", "coreml", "cuda"...); empty =
    /// the engine's choice for this platform. Engines without providers ignore it.
    pub execution_providers: Vec<String>,
    /// Graph optimization: 0 = off, 1 = basic, 2 = extended, 3 = all; `None` = all.
    pub optimization_level: Option<u8>,
    /// Private memory the model may take, in bytes; 0 = no limit. The agent sets it
    /// from what the memory manager admitted. An engine in its own process is held to
    /// it by the operating system; an engine inside the agent cannot be.
    pub memory_limit_bytes: u64,
    /// Element type of the KV cache (llama.cpp only; the others keep theirs).
    #[serde(default)]
    pub kv_cache_type: KvCacheType,
    /// Flash attention (llama.cpp only).
    #[serde(default)]
    pub flash_attention: FlashAttention,
    /// A directory the engine may write while the model is loaded (a runtime's cache
    /// of packed weights), for engines whose [`Engine::writes_scratch`] says so. Set by
    /// the engine process, never by a request; `None` = the engine makes its own.
    #[serde(default)]
    pub scratch_dir: Option<PathBuf>,
}

/// For engines without a choice of KV cache type or attention kernel: asking for one
/// is an error, not a silent default.
pub fn refuse_llama_only_options(options: &LoadOptions) -> Result<(), EngineError> {
    if options.kv_cache_type != KvCacheType::F16 || options.flash_attention == FlashAttention::On {
        return Err(EngineError::InvalidRequest(format!(
            "kv_cache_type {} and flash_attention {} are llama.cpp options; load a GGUF with \
             the llama.cpp runtime to use them",
            options.kv_cache_type.as_str(),
            options.flash_attention.as_str()
        )));
    }
    Ok(())
}

/// What the KV cache stores each value as: f16 is llama.cpp's default; q8_0 halves
/// the cache at little cost in quality, q4_0 quarters it at more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum KvCacheType {
    #[default]
    F16,
    Q8_0,
    Q4_0,
}

impl KvCacheType {
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheType::F16 => "f16",
            KvCacheType::Q8_0 => "q8_0",
            KvCacheType::Q4_0 => "q4_0",
        }
    }

    /// Bytes of `values` cached values: ggml's q8_0 and q4_0 store blocks of 32
    /// values in 34 and 18 bytes.
    pub fn bytes_for(self, values: u64) -> u64 {
        match self {
            KvCacheType::F16 => values.saturating_mul(2),
            KvCacheType::Q8_0 => values.div_ceil(32).saturating_mul(34),
            KvCacheType::Q4_0 => values.div_ceil(32).saturating_mul(18),
        }
    }
}

impl std::str::FromStr for KvCacheType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(KvCacheType::F16),
            "q8_0" => Ok(KvCacheType::Q8_0),
            "q4_0" => Ok(KvCacheType::Q4_0),
            other => Err(format!(
                "{other:?} is not a KV cache type (f16, q8_0, q4_0)"
            )),
        }
    }
}

/// Whether attention runs as one fused kernel: `Auto` lets llama.cpp decide for the
/// device; a quantized KV cache needs it on (or auto).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum FlashAttention {
    #[default]
    Auto,
    On,
    Off,
}

impl FlashAttention {
    pub fn as_str(self) -> &'static str {
        match self {
            FlashAttention::Auto => "auto",
            FlashAttention::On => "on",
            FlashAttention::Off => "off",
        }
    }
}

impl std::str::FromStr for FlashAttention {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(FlashAttention::Auto),
            "on" => Ok(FlashAttention::On),
            "off" => Ok(FlashAttention::Off),
            other => Err(format!("{other:?} is not auto, on or off")),
        }
    }
}

/// The context a load gets when neither the request nor the model says: enough for
/// a chat, small enough for an edge device's KV cache.
pub const DEFAULT_CONTEXT: u32 = 4096;

impl LoadOptions {
    /// The context length a load gets: what was asked, within what the model was
    /// trained for (`trained` 0 = unknown).
    pub fn context_for(&self, trained: u32) -> u32 {
        match self.context_length {
            0 => trained.clamp(1, DEFAULT_CONTEXT),
            n if trained == 0 => n,
            n => n.min(trained),
        }
    }

    /// The threads a load runs on. Every engine resolves 0 here, not to its runtime's
    /// own default: llama.cpp's is 4 whatever the CPU, which on 2 cores ran four
    /// threads on two and generated at a quarter of the speed.
    pub fn threads_or_all_cores(&self) -> u32 {
        match self.threads {
            0 => crate::cpu::usable_cpus(),
            n => n,
        }
    }
}

/// Sampling settings, validated by the api layer. `None` takes the engine's default.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub penalty_last_n: u32,
    pub seed: Option<u64>,
}

/// One generation request, already tokenized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    /// 0 = until the context is full.
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub logprobs: bool,
    /// GBNF grammar the output must follow (rule `root`).
    pub grammar: Option<String>,
    /// Generate past end-of-generation tokens, up to `max_tokens` (benchmarks).
    pub ignore_eos: bool,
    /// May reuse the KV cache an earlier prompt left (its longest common prefix).
    /// Off, the whole prompt is computed again: for comparing, or for timing a
    /// prefill.
    #[serde(default = "cache_prompt_default")]
    pub cache_prompt: bool,
}

fn cache_prompt_default() -> bool {
    true
}

impl Default for GenerateRequest {
    fn default() -> GenerateRequest {
        GenerateRequest {
            prompt: Vec::new(),
            sampling: Sampling::default(),
            max_tokens: 0,
            stop: Vec::new(),
            logprobs: false,
            grammar: None,
            ignore_eos: false,
            cache_prompt: true,
        }
    }
}

/// One generated token as the engine hands it out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub id: u32,
    /// Text this token completes; empty while a UTF-8 character is still incomplete.
    pub text: String,
    pub logprob: Option<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
}

/// What the token sink tells the engine after each token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The client went away or its deadline passed: stop within this token.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GenerateStats {
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV came from the cache an earlier request left, not
    /// computed again.
    #[serde(default)]
    pub cached_prompt_tokens: u32,
    pub generated_tokens: u32,
    pub time_to_first_token_seconds: f64,
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
}

/// When a generation passed each point, for [`GenerateStats::timed`].
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub started: std::time::Instant,
    /// The prompt was computed.
    pub prompt_done: std::time::Instant,
    /// The first token was sampled; `None` if none was.
    pub first_token: Option<std::time::Instant>,
    pub end: std::time::Instant,
}

impl GenerateStats {
    /// Every engine's figures computed the same way: the prompt's rate counts the
    /// tokens computed (what the cache gave took no time), the first token's time
    /// belongs to the prompt, and generation rates the tokens after it.
    #[allow(clippy::cast_precision_loss)]
    pub fn timed(prompt: usize, cached: usize, generated: u32, t: Timings) -> GenerateStats {
        let prompt_secs = (t.prompt_done - t.started).as_secs_f64();
        let gen_secs = t.first_token.map_or(0.0, |f| (t.end - f).as_secs_f64());
        GenerateStats {
            prompt_tokens: u32::try_from(prompt).unwrap_or(u32::MAX),
            cached_prompt_tokens: u32::try_from(cached).unwrap_or(u32::MAX),
            generated_tokens: generated,
            time_to_first_token_seconds: t
                .first_token
                .map_or(0.0, |f| (f - t.started).as_secs_f64()),
            prompt_tokens_per_second: if prompt_secs > 0.0 {
                (prompt - cached) as f64 / prompt_secs
            } else {
                0.0
            },
            generation_tokens_per_second: if gen_secs > 0.0 && generated > 1 {
                f64::from(generated - 1) / gen_secs
            } else {
                0.0
            },
        }
    }
}

/// Why an engine call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum EngineError {
    #[error("the model cannot be loaded: {0}")]
    Load(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the prompt of {prompt} tokens does not fit the {context}-token context")]
    ContextOverflow { prompt: usize, context: u32 },
    #[error("inference failed: {0}")]
    Inference(String),
    /// The model's files are malformed; nothing was handed to the runtime.
    #[error("the model file is not valid: {0}")]
    InvalidModel(String),
    /// The runtime itself cannot be used on this node (a missing or incompatible
    /// library, an execution provider not built for this platform).
    #[error("the runtime is not available: {0}")]
    Unavailable(String),
    /// The process the engine ran in ended under it (a signal, an abort, an
    /// out-of-memory kill): what it held is gone, the agent is not.
    #[error("the engine process {0}")]
    Crashed(String),
}

/// The signal's name ("SIGKILL") in a [`EngineError::Crashed`] description, for
/// the failure's machine-readable fields.
pub fn signal_name(description: &str) -> Option<&str> {
    let start = description.find("(SIG")? + 1;
    let rest = &description[start..];
    let end = rest.find([':', ')', ','])?;
    Some(&rest[..end])
}

/// Facts about a loaded model.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ModelInfo {
    pub architecture: String,
    pub parameter_count: u64,
    pub context_length: u32,
    pub vocab_size: u32,
    pub chat_template: Option<String>,
    /// Bytes of memory the loaded model holds (weights, KV cache, buffers).
    pub memory_bytes: u64,
    /// Where the model runs.
    pub accelerator: Accelerator,
    /// The KV cache type and flash attention the engine applied (f16 and auto for
    /// engines without the choice).
    #[serde(default)]
    pub kv_cache_type: KvCacheType,
    #[serde(default)]
    pub flash_attention: FlashAttention,
    /// Inference threads the runtime runs on.
    #[serde(default)]
    pub threads: u32,
}

/// What an engine learned from a model's files without loading them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelProbe {
    pub architecture: String,
    pub parameter_count: u64,
    /// Bytes of weights the runtime maps or reads.
    pub weights_bytes: u64,
    /// The context length the model was trained with (0 = unknown).
    pub context_length: u32,
    pub vocab_size: u32,
    /// KV-cache geometry: layers, KV heads and the width of one head.
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub embedding_length: u32,
    pub quantization: Option<String>,
}

impl ModelProbe {
    /// Bytes of K and V for `tokens` cached positions across every layer, at
    /// `element_bytes` per value (2 for F16 caches, 4 for F32).
    pub fn kv_cache_bytes(&self, tokens: u64, element_bytes: u64) -> u64 {
        self.kv_values(tokens).saturating_mul(element_bytes)
    }

    /// Values K and V hold for `tokens` cached positions across every layer.
    pub fn kv_values(&self, tokens: u64) -> u64 {
        2u64.saturating_mul(u64::from(self.layers))
            .saturating_mul(u64::from(self.kv_heads))
            .saturating_mul(u64::from(self.head_dim))
            .saturating_mul(tokens)
    }
}

/// Memory a load would take, by what takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub kv_cache: u64,
    /// Activations, logits and scratch buffers.
    pub compute: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.kv_cache)
            .saturating_add(self.compute)
    }
}

/// A runtime that can load models.
pub trait Engine: Send + Sync {
    fn runtime(&self) -> Runtime;
    /// The runtime library and binding compiled in, e.g. "llama-cpp-2 0.1.160".
    fn version(&self) -> String;
    fn formats(&self) -> &[ModelFormat];
    /// Weight types (GGUF names: "Q4_1", "F16"...) this engine can run.
    fn quantizations(&self) -> &[&'static str];
    /// Accelerators this build of the engine can drive on this platform.
    fn accelerators(&self) -> Vec<Accelerator>;
    /// The CPU kernels this engine runs here and how they were chosen. The default is
    /// what the build compiled in, which is right for engines without runtime dispatch.
    /// May initialize the runtime (blocking).
    fn cpu_variant(&self) -> Result<crate::CpuVariant, EngineError> {
        Ok(crate::CpuVariant::build_target())
    }
    /// Reads what the engine needs to know from the model's files, checking them the
    /// way a load would, but without handing anything to the runtime. A file the
    /// runtime would choke on fails here (`InvalidModel`). Blocking.
    fn probe(&self, path: &Path) -> Result<ModelProbe, EngineError>;
    /// The memory loading `probe`'s model with `options` would take.
    fn estimate_memory(&self, probe: &ModelProbe, options: &LoadOptions) -> MemoryEstimate;
    /// Whether loading the model at `path` writes files (a compiled-weight cache): an
    /// engine process then gets a private directory it may write, removed with it.
    fn writes_scratch(&self, path: &Path) -> bool {
        let _ = path;
        false
    }
    /// Files and directories the runtime reads once a load has started, besides the
    /// model (libraries it opens at run time): what a confined engine process must
    /// still be allowed to read.
    fn runtime_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    /// Loads the model at `path`. Blocking: call it on a thread the agent owns.
    fn load(&self, path: &Path, options: &LoadOptions)
    -> Result<Box<dyn LoadedModel>, EngineError>;
}

/// Token ids with a special role. `end_of_generation` holds every id that ends a
/// turn (eos, eot, `<|im_end|>`...), which is more than `eos` alone for chat models.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub end_of_generation: Vec<u32>,
}

/// What to do with an input longer than the limit it must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Refuse the input (the default: silently dropping text surprises people).
    #[default]
    Refuse,
    /// Keep the first tokens.
    KeepStart,
    /// Keep the last tokens: the end of a conversation matters most for a reply.
    KeepEnd,
}

/// One chat message, as a chat template sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A model's tokenizer. Shared across threads, so tokenizing never waits behind a
/// generation running on the model's worker.
pub trait Tokenizer: Send + Sync {
    /// Which provider this is, for logs and diagnostics ("tokenizer.json", "gguf", ...).
    fn provider(&self) -> &str;
    /// Text to ids. `add_special` adds BOS/EOS as the model wants; `parse_special`
    /// turns text like `<|im_start|>` into its special token instead of plain text.
    fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError>;
    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError>;
    /// The bytes one token stands for. They may be part of a UTF-8 character, which
    /// is why streaming goes through [`TokenDecoder`] rather than `decode(&[id])`.
    fn token_bytes(&self, id: u32) -> Result<Vec<u8>, EngineError>;
    fn vocab_size(&self) -> u32;
    fn special_tokens(&self) -> &SpecialTokens;
    /// The most tokens one sequence may hold (the model's context length).
    fn max_length(&self) -> u32;
    /// Renders messages with the model's chat template, ready to encode with
    /// `parse_special`. `add_generation_prompt` opens the assistant's turn.
    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError>;
}

impl dyn Tokenizer + '_ {
    /// A decoder that turns ids into text one at a time, never splitting a character.
    pub fn stream_decoder(&self) -> TokenDecoder<'_> {
        TokenDecoder {
            tokenizer: self,
            utf8: crate::Utf8Stream::default(),
        }
    }

    /// Encodes `text` and makes it fit `limit` tokens as `truncation` says.
    pub fn encode_within(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        limit: usize,
        truncation: Truncation,
    ) -> Result<Vec<u32>, EngineError> {
        let mut ids = self.encode(text, add_special, parse_special)?;
        if ids.len() <= limit {
            return Ok(ids);
        }
        match truncation {
            Truncation::Refuse => Err(EngineError::ContextOverflow {
                prompt: ids.len(),
                context: u32::try_from(limit).unwrap_or(u32::MAX),
            }),
            Truncation::KeepStart => {
                ids.truncate(limit);
                Ok(ids)
            }
            Truncation::KeepEnd => {
                // Keep BOS when the model wants one: without it the model sees a
                // sequence start it was never trained on.
                let bos = self
                    .special_tokens()
                    .bos
                    .filter(|b| add_special && ids.first() == Some(b));
                let keep = limit.saturating_sub(usize::from(bos.is_some()));
                let mut out: Vec<u32> = bos.into_iter().collect();
                out.extend_from_slice(&ids[ids.len() - keep..]);
                Ok(out)
            }
        }
    }
}

/// Streaming-safe decoding: text comes out only once its UTF-8 characters are whole.
pub struct TokenDecoder<'t> {
    tokenizer: &'t dyn Tokenizer,
    utf8: crate::Utf8Stream,
}

impl TokenDecoder<'_> {
    /// Adds one token; returns the text that is now complete (maybe empty).
    pub fn push(&mut self, id: u32) -> Result<String, EngineError> {
        Ok(self.utf8.push(&self.tokenizer.token_bytes(id)?))
    }

    /// What is left at the end (incomplete bytes, replaced).
    pub fn finish(&mut self) -> String {
        self.utf8.finish()
    }
}

/// The outcome of one generation.
pub type GenerateOutcome = Result<(FinishReason, GenerateStats), EngineError>;

/// A generation the agent hands to a model: the request, where its tokens go, and
/// who hears how it ended.
pub struct Job {
    pub request: GenerateRequest,
    /// Gets each token; answers `Flow::Stop` once the client left or its deadline
    /// passed.
    pub sink: Box<dyn FnMut(Token) -> Flow + Send>,
    /// Called once with the outcome.
    pub done: Box<dyn FnOnce(GenerateOutcome) + Send>,
}

/// Where a model takes its work from.
pub trait JobSource {
    /// Blocks for the next job; `None` once the model is being unloaded.
    fn wait(&mut self) -> Option<Job>;
    /// The next job if one is already waiting.
    fn try_next(&mut self) -> Option<Job>;
}

/// A model in memory. Not `Sync`: one worker thread owns it.
pub trait LoadedModel: Send {
    fn info(&self) -> &ModelInfo;
    fn tokenizer(&self) -> std::sync::Arc<dyn Tokenizer>;
    /// How many requests it decodes together.
    fn parallel(&self) -> usize {
        1
    }
    /// Bytes the loaded model holds now (weights, caches, buffers).
    fn memory_bytes(&self) -> u64 {
        self.info().memory_bytes
    }
    /// The operating-system process the model runs in, when it is not the agent's.
    fn process_id(&self) -> Option<u32> {
        None
    }
    /// Registers who hears, once, that the model died outside any call (its engine
    /// process ended). A model inside the agent cannot die alone, so the default
    /// drops the handler.
    fn on_crash(&mut self, handler: Box<dyn FnOnce(EngineError) + Send>) {
        drop(handler);
    }
    /// Generates one request, handing each token to `sink` as soon as it is sampled.
    fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn FnMut(Token) -> Flow,
    ) -> GenerateOutcome;
    /// Logits for the token that would follow `prompt`, from a fresh cache: for
    /// scoring and for comparing runtimes. Engines that cannot expose them say so.
    fn logits(&mut self, prompt: &[u32]) -> Result<Vec<f32>, EngineError> {
        let _ = prompt;
        Err(EngineError::InvalidRequest(
            "this runtime does not expose logits".into(),
        ))
    }
    /// Serves jobs until the source runs dry. Engines that batch several sequences
    /// override this; the default runs one job at a time.
    fn serve(&mut self, jobs: &mut dyn JobSource) {
        while let Some(job) = jobs.wait() {
            let Job {
                request,
                mut sink,
                done,
            } = job;
            done(self.generate(&request, &mut *sink));
        }
    }
}
