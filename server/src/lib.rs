//! modeld, the node agent's edge: configuration, the composition root that builds the
//! node ([`modeld_node`]) and serves it, and the gRPC services in [`api`]. The binary in
//! `main.rs` only parses configuration and calls [`serve::serve`].

pub mod allocator;
pub mod api;
pub mod config;
pub mod engine_host;
pub mod engines;
pub mod error;
pub mod fleet;
pub mod nfd;
pub mod openai;
pub mod serve;
pub mod telemetry;
pub mod tls;
pub use modeld_tokenizer as tokenizer;

pub use config::{Args, Config};
pub use error::{Error, Result};
