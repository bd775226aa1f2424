//! The catalog manifest parser (JSON and YAML), within the size limit the agent enforces
//! before parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modeld_node::registry::catalog::{self, CatalogFormat, MAX_MANIFEST_BYTES};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_MANIFEST_BYTES {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for format in [None, Some(CatalogFormat::Json), Some(CatalogFormat::Yaml)] {
        if let Ok(specs) = catalog::parse(text, format) {
            assert!(specs.len() <= catalog::MAX_MANIFEST_MODELS);
        }
    }
});
