//! Engines in their own processes.
//!
//! Each loaded model runs in an engine process: the agent's own binary started again
//! in its engine role, talking to the agent over a private Unix socket (its stdin),
//! with no TCP port. A fault in a runtime (a segfault, an abort, an out-of-memory
//! kill) ends that process and the requests it held, not the agent.
//!
//! - [`proxy`]: the agent's side, an [`Engine`](modeld_engine_core::Engine) that
//!   starts a process per load and forwards calls to it;
//! - [`host`]: the engine process's side, hosting the real engine;
//! - [`confine`]: what the engine process gives up before it opens a model;
//! - [`scratch`]: the one directory it may write, when its runtime needs one;
//! - [`protocol`]: the frames between them.

pub mod confine;
pub mod exit;
#[cfg(unix)]
pub mod host;
pub mod protocol;
#[cfg(unix)]
pub mod proxy;
pub mod scratch;

#[cfg(unix)]
pub use proxy::{EngineCommand, ProcessEngine};
