//! The safetensors header reader.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modeld_engine_core::safetensors;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    if let Ok(header) = safetensors::read_header(data, size) {
        assert_eq!(header.tensor_count, header.tensors.len());
    }
    let _ = modeld_node::formats::sniff_stream(data, size, "model.safetensors");
});
