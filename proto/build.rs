//! Compiles `modeld/v1/*.proto` and `modeld/fleet/v1/*.proto` with protox (pure Rust),
//! so the build needs neither protoc nor a network. It also writes the descriptor sets
//! that server reflection serves, and
//! serde impls (pbjson) that follow the canonical proto3 JSON mapping, so `--output json`
//! prints what grpcurl would.

use std::path::PathBuf;

use prost::Message;

const AGENT_PROTOS: &[&str] = &[
    "modeld/v1/model.proto",
    "modeld/v1/registry.proto",
    "modeld/v1/storage.proto",
    "modeld/v1/lifecycle.proto",
    "modeld/v1/generate.proto",
    "modeld/v1/node.proto",
];

const FLEET_PROTOS: &[&str] = &["modeld/fleet/v1/fleet.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let all: Vec<&str> = AGENT_PROTOS.iter().chain(FLEET_PROTOS).copied().collect();
    for proto in &all {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(&all, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_bytes = fds.encode_to_vec();
    // Reflection on each binary lists only the services it serves: the agent's set
    // holds modeld.v1, the controller's modeld.fleet.v1 and the files it imports.
    let agent = protox::compile(AGENT_PROTOS, ["."])?;
    std::fs::write(out_dir.join("modeld_descriptor.bin"), agent.encode_to_vec())?;
    let fleet = protox::compile(FLEET_PROTOS, ["."])?;
    std::fs::write(out_dir.join("fleet_descriptor.bin"), fleet.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".modeld.v1", ".modeld.fleet.v1"])?;
    Ok(())
}
