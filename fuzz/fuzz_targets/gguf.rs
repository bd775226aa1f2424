//! The GGUF header reader, and the sniffer every downloaded file goes through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modeld_engine_core::gguf;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    if let Ok(header) = gguf::read_header(data, size) {
        // An accepted header promises that every tensor lies inside the file: the engines
        // mmap those ranges without checking again.
        for t in &header.tensors {
            let end = header
                .data_offset
                .checked_add(t.offset)
                .and_then(|start| start.checked_add(t.size_bytes));
            assert!(
                end.is_some_and(|end| end <= size),
                "tensor {} ends past the file",
                t.name
            );
        }
        let _ = header.architecture();
        let _ = header.context_length();
        let _ = header.parameter_count();
        let _ = header.quantization();
        let _ = header.chat_template();
        let _ = header.probe();
        let _ = modeld_node::formats::gguf_metadata(&header);
    }
    let _ = modeld_node::formats::sniff_stream(data, size, "model.gguf");
});
