//! Archive inspection and extraction (zip and tar.gz). Whatever the bytes, extraction
//! either fails and leaves nothing behind, or writes only regular files and directories
//! inside its staging directory, within the byte and entry limits.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use modeld_engine_core::ArchiveFormat;
use modeld_node::formats::archive;
use modeld_node::storage::extract::{self, Limits};

/// Small limits, so that a bomb is found quickly rather than filling the disk.
const LIMITS: Limits = Limits {
    max_bytes: 8 * 1024 * 1024,
    max_entries: 256,
    max_ratio: 200,
};

fn workdir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
        .path()
}

/// Counts regular files and bytes under `dir`, failing on anything else (links, devices).
fn walk(dir: &Path, files: &mut usize, bytes: &mut u64) {
    for entry in std::fs::read_dir(dir).expect("reading the staging directory") {
        let entry = entry.expect("a directory entry");
        let kind = entry.file_type().expect("a file type");
        if kind.is_dir() {
            walk(&entry.path(), files, bytes);
        } else {
            assert!(
                kind.is_file(),
                "{} is not a regular file",
                entry.path().display()
            );
            *files += 1;
            *bytes += entry.metadata().expect("metadata").len();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = workdir();
    let input = dir.join("input");
    std::fs::write(&input, data).expect("writing the archive");
    for format in [ArchiveFormat::Zip, ArchiveFormat::TarGz] {
        let _ = archive::inspect(&input, format);
        let staging = dir.join("staging");
        match extract::extract_all(&input, format, &staging, LIMITS) {
            Ok(written) => {
                let (mut files, mut bytes) = (0, 0);
                walk(&staging, &mut files, &mut bytes);
                assert!(files <= LIMITS.max_entries);
                assert!(bytes <= LIMITS.max_bytes);
                assert_eq!(bytes, written, "extraction reported a different size");
                std::fs::remove_dir_all(&staging).expect("removing the staging directory");
            }
            Err(_) => assert!(!staging.exists(), "a failed extraction left files behind"),
        }
    }
});
