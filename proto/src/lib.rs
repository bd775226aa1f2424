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

/// Encoded `FileDescriptorSet` of every modeld proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/modeld_descriptor.bin"));
