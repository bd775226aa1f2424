//! The engine boundary of modeld.
//!
//! This crate names what the agent and every runtime agree on: model formats, runtimes
//! and accelerators. It depends on no async runtime, no gRPC and no engine crate, so an
//! engine can implement it without pulling in the agent.

mod engine;
mod format;
mod runtime;
mod text;

pub use engine::{
    Engine, EngineError, FinishReason, Flow, GenerateRequest, GenerateStats, LoadOptions,
    LoadedModel, ModelInfo, Sampling, Token, Tokenizer,
};
pub use format::{ArchiveFormat, ModelFormat, ParseNameError};
pub use runtime::{Accelerator, Runtime};
pub use text::{StopMatcher, StopOutcome, Utf8Stream};
