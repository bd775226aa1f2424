//! Compiles `modeld/v1/*.proto` with protox (pure Rust), so the build needs neither protoc
//! nor a network. It also writes the descriptor set that server reflection serves, and
//! serde impls (pbjson) that follow the canonical proto3 JSON mapping, so `--output json`
//! prints what grpcurl would.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "modeld/v1/model.proto",
    "modeld/v1/registry.proto",
    "modeld/v1/storage.proto",
    "modeld/v1/lifecycle.proto",
    "modeld/v1/generate.proto",
    "modeld/v1/node.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_bytes = fds.encode_to_vec();
    std::fs::write(out_dir.join("modeld_descriptor.bin"), &descriptor_bytes)?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".modeld.v1"])?;
    Ok(())
}
