//! The `modeld.v1` contract shared by the agent and its clients.
//!
//! Everything here is generated from `proto/modeld/v1/*.proto`; edit the protos, not this.
//! Well-known types come from `pbjson_types`, so every message also has serde impls that
//! follow the proto3 JSON mapping.

pub use pbjson_types;

mod domain;

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs
)]
pub mod v1 {
    tonic::include_proto!("modeld.v1");
    include!(concat!(env!("OUT_DIR"), "/modeld.v1.serde.rs"));
}

/// Largest gRPC message the agent accepts or sends, and so the most its clients need
/// to accept. Pushes and blob reads stream in smaller chunks.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Encoded `FileDescriptorSet` of every modeld proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/modeld_descriptor.bin"));
