//! modeld, the node agent: registry, storage, lifecycle and inference behind one gRPC
//! surface. The binary in `main.rs` only parses configuration and calls [`agent::serve`].

pub mod agent;
pub mod api;
pub mod config;
pub mod engines;
pub mod error;
pub mod formats;
pub mod hardware;
pub mod http_client;
pub mod inference;
pub mod lifecycle;
pub mod memory;
pub mod registry;
pub mod storage;
pub mod store;
pub mod telemetry;
pub use modeld_tokenizer as tokenizer;

pub use config::{Args, Config};
pub use error::{Error, Result};
