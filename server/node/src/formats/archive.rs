//! Looking inside zip and tar.gz archives for model files, without extracting them.
//! Extraction proper (staging, caps, rejecting links) belongs to storage.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path};

use flate2::read::GzDecoder;
use modeld_engine_core::{ArchiveFormat, ModelFormat};
use sha2::{Digest, Sha256};

use super::{Metadata, Sniffed, sniff_stream};

/// Archives with more entries than this are not inspected.
pub const MAX_ENTRIES: usize = 10_000;

/// A model file found inside an archive.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMember {
    /// Path inside the archive.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub format: ModelFormat,
    pub metadata: Metadata,
}

/// What an archive holds: its model members, and members that were passed over with why.
#[derive(Debug, Default)]
pub struct Inspection {
    pub models: Vec<ModelMember>,
    pub skipped: Vec<(String, String)>,
}

/// True when a gzip stream decompresses to something with a tar header.
pub fn gzip_holds_tar<R: Read>(stream: R) -> bool {
    let mut block = [0u8; 512];
    let mut gz = GzDecoder::new(stream);
    let mut n = 0;
    while n < block.len() {
        match gz.read(&mut block[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n == 512 && (&block[257..262] == b"ustar" || tar_checksum_ok(&block))
}

fn tar_checksum_ok(block: &[u8; 512]) -> bool {
    let stored = std::str::from_utf8(&block[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    stored == Some(sum)
}

/// A member path that stays inside the archive root.
fn safe_member_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Sniffs one member and, when it is a model, hashes it in the same pass.
fn inspect_member<R: Read>(
    reader: R,
    path: &str,
    size: u64,
    out: &mut Inspection,
) -> io::Result<()> {
    let mut hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
        read: 0,
    };
    match sniff_stream(&mut hashing, size, path)? {
        Sniffed::Model { format, metadata } => {
            io::copy(&mut hashing, &mut io::sink())?;
            if hashing.read != size {
                out.skipped.push((
                    path.to_owned(),
                    format!("member declares {size} bytes but holds {}", hashing.read),
                ));
                return Ok(());
            }
            out.models.push(ModelMember {
                path: path.to_owned(),
                size,
                sha256: hex::encode(hashing.hasher.finalize()),
                format,
                metadata,
            });
        }
        Sniffed::Malformed { format, reason } => {
            out.skipped
                .push((path.to_owned(), format!("malformed {format}: {reason}")));
        }
        Sniffed::Archive(_) | Sniffed::Unknown => {}
    }
    Ok(())
}

/// Lists the model files inside the archive at `path`.
pub fn inspect(path: &Path, format: ArchiveFormat) -> io::Result<Inspection> {
    let mut out = Inspection::default();
    match format {
        ArchiveFormat::Zip => {
            let mut zip = zip::ZipArchive::new(File::open(path)?)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if zip.len() > MAX_ENTRIES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} entries exceed the limit of {MAX_ENTRIES}", zip.len()),
                ));
            }
            for i in 0..zip.len() {
                let entry = zip
                    .by_index(i)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let Ok(name) = entry.name().map(|n| n.into_owned()) else {
                    out.skipped.push((
                        format!("entry #{i}"),
                        "member name is not valid UTF-8".into(),
                    ));
                    continue;
                };
                if entry.is_dir() || entry.is_symlink() {
                    continue;
                }
                if !safe_member_path(&name) {
                    out.skipped
                        .push((name, "member path escapes the archive".into()));
                    continue;
                }
                let size = entry.size();
                inspect_member(entry, &name, size, &mut out)?;
            }
        }
        ArchiveFormat::TarGz => {
            let mut tar = tar::Archive::new(GzDecoder::new(File::open(path)?));
            for (i, entry) in tar.entries()?.enumerate() {
                if i >= MAX_ENTRIES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("more than {MAX_ENTRIES} entries"),
                    ));
                }
                let entry = entry?;
                let name = entry.path()?.to_string_lossy().into_owned();
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                if !safe_member_path(&name) {
                    out.skipped
                        .push((name, "member path escapes the archive".into()));
                    continue;
                }
                let size = entry.size();
                inspect_member(entry, &name, size, &mut out)?;
            }
        }
    }
    Ok(out)
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_member_paths_are_recognized() {
        assert!(safe_member_path("a/b.gguf"));
        for bad in ["../x", "/etc/passwd", "a/../../x", "a\\b", ""] {
            assert!(!safe_member_path(bad), "{bad}");
        }
    }
}
