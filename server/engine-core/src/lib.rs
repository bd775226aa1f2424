//! The engine boundary of modeld.
//!
//! This crate names what the agent and every runtime agree on: model formats, runtimes
//! and accelerators. It depends on no async runtime, no gRPC and no engine crate, so an
//! engine can implement it without pulling in the agent.

pub mod cpu;
mod engine;
mod flatbuffer;
mod format;
pub mod generation;
pub mod gguf;
pub mod litertlm;
pub mod protobuf;
mod runtime;
pub mod safetensors;
pub mod sampler;
mod text;
pub mod tflite;

pub use cpu::{CpuDispatch, CpuVariant};
pub use engine::{
    ChatMessage, DEFAULT_CONTEXT, Engine, EngineError, FinishReason, FlashAttention, Flow,
    GenerateOutcome, GenerateRequest, GenerateStats, Job, JobSource, KvCacheType, LoadOptions,
    LoadedModel, MemoryEstimate, ModelInfo, ModelProbe, Sampling, SpecialTokens, Timings, Token,
    TokenDecoder, Tokenizer, Truncation, refuse_llama_only_options, signal_name,
};
pub use format::{ArchiveFormat, ModelFormat, ParseNameError};
pub use runtime::{Accelerator, Runtime};
pub use text::{StopMatcher, StopOutcome, Utf8Stream, error_chain};
