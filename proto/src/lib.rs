//! The `modeld.v1` contract shared by the agent and its clients, and `modeld.fleet.v1`,
//! the fleet controller's.
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

/// `modeld.fleet.v1`: the fleet controller's operator and device services.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs
)]
pub mod fleet {
    pub mod v1 {
        tonic::include_proto!("modeld.fleet.v1");
        include!(concat!(env!("OUT_DIR"), "/modeld.fleet.v1.serde.rs"));
    }
}

/// Largest gRPC message the agent accepts or sends, and so the most its clients need
/// to accept. Pushes and blob reads stream in smaller chunks.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Encoded `FileDescriptorSet` of the agent's protos (`modeld.v1`), for its server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/modeld_descriptor.bin"));

/// Encoded `FileDescriptorSet` of the fleet controller's protos (`modeld.fleet.v1` and
/// the `modeld.v1` files it imports), for its server reflection.
pub const FLEET_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fleet_descriptor.bin"));
