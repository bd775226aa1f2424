//! modeld-node: the node's domain. The registry, storage, the lifecycle and its Load,
//! inference and the memory manager, the store, and what the node knows of its
//! hardware, wired together by [`node::Node`]. Nothing here knows gRPC or the
//! command line: the `modeld` binary converts requests into calls on these modules
//! and their results and errors back into messages and statuses.
//!
//! Modules import downward only, in this order from the top:
//! `fleet` → `load` → `node` → `inference` → `performance` → `storage` → `registry` → `lifecycle` → `store`,
//! with `engines`, `memory`, `hardware`, `formats`, `page`, `model`, `metrics` and `error`
//! below.

pub mod access;
pub mod engines;
pub mod error;
pub mod fleet;
pub mod formats;
pub mod hardware;
pub mod http_client;
pub mod inference;
pub mod lifecycle;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod node;
pub mod page;
pub mod performance;
pub mod registry;
pub mod storage;
pub mod store;
pub mod supervise;
pub use modeld_tokenizer as tokenizer;

pub use error::{Error, ErrorKind, Result};
pub use node::Node;
