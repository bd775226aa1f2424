//! The engine boundary: what the agent asks of a runtime, in plain synchronous Rust.
//! The agent owns the threads; an engine never spawns onto an async runtime.

use std::path::Path;

use crate::format::ModelFormat;
use crate::runtime::{Accelerator, Runtime};

/// How to load a model. Zero means "the engine's default".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadOptions {
    pub context_length: u32,
    pub threads: u32,
    pub batch_size: u32,
    /// Layers to offload to an accelerator; 0 = none, u32::MAX = all.
    pub gpu_layers: u32,
    pub use_mmap: bool,
    pub use_mlock: bool,
}

/// Sampling settings, validated by the api layer. `None` takes the engine's default.
#[derive(Debug, Clone, PartialEq, Default)]
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
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    /// 0 = until the context is full.
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub logprobs: bool,
    /// GBNF grammar the output must follow (rule `root`).
    pub grammar: Option<String>,
}

/// One generated token as the engine hands it out.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: u32,
    /// Text this token completes; empty while a UTF-8 character is still incomplete.
    pub text: String,
    pub logprob: Option<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateStats {
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub time_to_first_token_seconds: f64,
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
}

/// Why an engine call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the model cannot be loaded: {0}")]
    Load(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the prompt of {prompt} tokens does not fit the {context}-token context")]
    ContextOverflow { prompt: usize, context: u32 },
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Facts about a loaded model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelInfo {
    pub architecture: String,
    pub parameter_count: u64,
    pub context_length: u32,
    pub vocab_size: u32,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub chat_template: Option<String>,
    /// Bytes of memory the loaded model holds (weights, KV cache, buffers).
    pub memory_bytes: u64,
}

/// A runtime that can load models.
pub trait Engine: Send + Sync {
    fn runtime(&self) -> Runtime;
    fn formats(&self) -> &[ModelFormat];
    fn accelerators(&self) -> Vec<Accelerator>;
    /// Loads the model at `path`. Blocking: call it on a thread the agent owns.
    fn load(&self, path: &Path, options: &LoadOptions)
    -> Result<Box<dyn LoadedModel>, EngineError>;
}

/// A model's tokenizer. Shared across threads, so tokenizing never waits behind a
/// generation running on the model's worker.
pub trait Tokenizer: Send + Sync {
    fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError>;
    fn detokenize(&self, tokens: &[u32], skip_special: bool) -> Result<String, EngineError>;
    /// Renders (role, content) messages with the model's chat template, ready to
    /// tokenize with special tokens parsed.
    fn render_chat(&self, messages: &[(String, String)]) -> Result<String, EngineError>;
}

/// A model in memory. Not `Sync`: one worker thread owns it.
pub trait LoadedModel: Send {
    fn info(&self) -> &ModelInfo;
    fn tokenizer(&self) -> std::sync::Arc<dyn Tokenizer>;
    /// Generates, handing each token to `sink` as soon as it is sampled.
    fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn FnMut(Token) -> Flow,
    ) -> Result<(FinishReason, GenerateStats), EngineError>;
}
