//! The protobuf reader behind ONNX (and Core ML) sniffing, and the ONNX engine's check of
//! external-data references, which must never name a file outside the model's directory.
#![no_main]

use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use modeld_engine_core::protobuf;
use modeld_engine_onnx::external_data;

/// One directory for the whole run: a model file the input is written to, and a data
/// file next to it that references may legitimately name.
fn workdir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("model.onnx_data"), vec![0u8; 4096]).expect("the data file");
        dir
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let _ = modeld_node::formats::onnx::sniff(&mut Cursor::new(data), size);
    if let Ok(fields) = protobuf::fields(&mut Cursor::new(data), 0, size) {
        for f in fields {
            if let protobuf::WireValue::Len { start, len } = f.value {
                assert!(start.checked_add(len).is_some_and(|end| end <= size));
            }
        }
    }

    let dir = workdir();
    let model = dir.join("model.onnx");
    std::fs::write(&model, data).expect("writing the model file");
    if let Ok(files) = external_data::check(&model) {
        let root = dir.canonicalize().expect("the work directory");
        for (path, _) in files {
            let path = path.canonicalize().unwrap_or(path);
            assert!(
                path.starts_with(&root),
                "{} escapes the model's directory",
                path.display()
            );
        }
    }
});
