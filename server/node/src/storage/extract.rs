//! Taking models out of zip and tar.gz archives, safely.
//!
//! Everything is written under a fresh staging directory by our own path joins — never
//! by the archive crates' own unpackers — and only after each entry's path was checked.
//! Links of any kind, absolute paths and `..` reject the whole archive, as do archives
//! over the byte, entry or compression-ratio caps, which are enforced on the bytes
//! actually written, not on what the archive claims.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use modeld_engine_core::ArchiveFormat;
use sha2::{Digest, Sha256};

use crate::error::Error;

/// Caps on what one archive may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: usize,
    /// Uncompressed bytes per compressed byte, over the whole archive.
    pub max_ratio: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 * 1024 * 1024 * 1024,
            max_entries: 10_000,
            max_ratio: 200,
        }
    }
}

fn unreadable(e: impl std::fmt::Display) -> Error {
    Error::ArchiveRejected(format!("it cannot be read: {e}"))
}

fn write_err(e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: PathBuf::from("<extraction>"),
        source: io::Error::other(e.to_string()),
    }
}

/// A member path, checked to stay inside the extraction root.
fn safe_relative(name: &str) -> Result<PathBuf, Error> {
    let p = Path::new(name);
    if name.is_empty() || name.contains('\\') || p.is_absolute() || name.starts_with('/') {
        return Err(Error::ArchiveRejected(format!(
            "entry {name:?} has an absolute or unsafe path"
        )));
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => {
                return Err(Error::ArchiveRejected(format!(
                    "entry {name:?} escapes the target directory"
                )));
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(Error::ArchiveRejected(format!(
            "entry {name:?} has an empty path"
        )));
    }
    Ok(out)
}

/// Counts bytes written against the caps while copying.
struct Budget {
    limits: Limits,
    compressed: u64,
    written: u64,
}

impl Budget {
    fn charge(&mut self, n: u64) -> Result<(), Error> {
        self.written += n;
        if self.written > self.limits.max_bytes {
            return Err(Error::ArchiveRejected(format!(
                "it unpacks to more than {} bytes",
                self.limits.max_bytes
            )));
        }
        // Small archives get slack so a tiny compressed file of zeros in an otherwise
        // normal archive is not refused; past 1 MiB the ratio rules.
        if self.written > 1 << 20
            && self.written > self.compressed.saturating_mul(self.limits.max_ratio)
        {
            return Err(Error::ArchiveRejected(format!(
                "compression ratio exceeds {}:1 (a decompression bomb?)",
                self.limits.max_ratio
            )));
        }
        Ok(())
    }
}

fn copy_capped<R: Read, W: Write>(
    mut from: R,
    to: &mut W,
    budget: &mut Budget,
    mut hasher: Option<&mut Sha256>,
) -> Result<u64, Error> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).map_err(unreadable)?;
        if n == 0 {
            return Ok(total);
        }
        budget.charge(n as u64)?;
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&buf[..n]);
        }
        to.write_all(&buf[..n]).map_err(write_err)?;
        total += n as u64;
    }
}

/// Streams one member of `archive` into `out` (created fresh), hashing it on the way.
/// Returns (size, sha256).
pub fn extract_member(
    archive: &Path,
    kind: ArchiveFormat,
    member: &str,
    out: &Path,
    limits: Limits,
) -> Result<(u64, String), Error> {
    let wanted = safe_relative(member)?;
    let compressed = fs::metadata(archive).map_err(unreadable)?.len();
    let mut budget = Budget {
        limits,
        compressed,
        written: 0,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(write_err)?;
    let mut hasher = Sha256::new();
    let found = match kind {
        ArchiveFormat::Zip => {
            let mut zip = zip::ZipArchive::new(File::open(archive).map_err(unreadable)?)
                .map_err(unreadable)?;
            let mut hit = None;
            for i in 0..zip.len().min(limits.max_entries + 1) {
                let entry = zip.by_index_raw(i).map_err(unreadable)?;
                if entry
                    .name()
                    .ok()
                    .and_then(|n| safe_relative(&n).ok())
                    .as_ref()
                    == Some(&wanted)
                {
                    hit = Some(i);
                    break;
                }
            }
            match hit {
                None => false,
                Some(i) => {
                    let entry = zip.by_index(i).map_err(unreadable)?;
                    if entry.is_symlink() || entry.is_dir() {
                        return Err(Error::ArchiveRejected(format!(
                            "member {member:?} is not a regular file"
                        )));
                    }
                    copy_capped(entry, &mut file, &mut budget, Some(&mut hasher))?;
                    true
                }
            }
        }
        ArchiveFormat::TarGz => {
            let mut tar =
                tar::Archive::new(GzDecoder::new(File::open(archive).map_err(unreadable)?));
            let mut hit = false;
            for (i, entry) in tar.entries().map_err(unreadable)?.enumerate() {
                if i >= limits.max_entries {
                    break;
                }
                let entry = entry.map_err(unreadable)?;
                let path = entry
                    .path()
                    .map_err(unreadable)?
                    .to_string_lossy()
                    .into_owned();
                if safe_relative(&path).ok().as_ref() == Some(&wanted) {
                    if !entry.header().entry_type().is_file() {
                        return Err(Error::ArchiveRejected(format!(
                            "member {member:?} is not a regular file"
                        )));
                    }
                    copy_capped(entry, &mut file, &mut budget, Some(&mut hasher))?;
                    hit = true;
                    break;
                }
            }
            hit
        }
    };
    if !found {
        drop(file);
        let _ = fs::remove_file(out);
        return Err(Error::ArchiveMemberNotFound {
            member: member.to_owned(),
        });
    }
    file.sync_all().map_err(write_err)?;
    Ok((budget.written, hex::encode(hasher.finalize())))
}

/// Unpacks a whole archive into `staging`, which must not exist yet. On any error the
/// staging directory is removed, so nothing is left behind.
pub fn extract_all(
    archive: &Path,
    kind: ArchiveFormat,
    staging: &Path,
    limits: Limits,
) -> Result<u64, Error> {
    fs::create_dir_all(staging.parent().unwrap_or(staging)).map_err(write_err)?;
    fs::create_dir(staging).map_err(|e| write_err(format!("{}: {e}", staging.display())))?;
    let result = unpack(archive, kind, staging, limits);
    if result.is_err() {
        let _ = fs::remove_dir_all(staging);
    }
    result
}

fn create_file(staging: &Path, rel: &Path) -> Result<File, Error> {
    let dest = staging.join(rel);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(write_err)?;
    }
    // create_new: a second entry with the same name is refused rather than overwriting.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&dest)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => {
                Error::ArchiveRejected(format!("entry {} appears twice", rel.display()))
            }
            _ => write_err(format!("{}: {e}", dest.display())),
        })
}

fn unpack(
    archive: &Path,
    kind: ArchiveFormat,
    staging: &Path,
    limits: Limits,
) -> Result<u64, Error> {
    let compressed = fs::metadata(archive).map_err(unreadable)?.len();
    let mut budget = Budget {
        limits,
        compressed,
        written: 0,
    };
    match kind {
        ArchiveFormat::Zip => {
            let mut zip = zip::ZipArchive::new(File::open(archive).map_err(unreadable)?)
                .map_err(unreadable)?;
            if zip.len() > limits.max_entries {
                return Err(Error::ArchiveRejected(format!(
                    "{} entries exceed the limit of {}",
                    zip.len(),
                    limits.max_entries
                )));
            }
            // Check every entry before writing any, so a bad entry late in the archive
            // does not leave earlier ones extracted.
            let mut plan = Vec::with_capacity(zip.len());
            for i in 0..zip.len() {
                let entry = zip.by_index_raw(i).map_err(unreadable)?;
                let name = entry.name().map_err(unreadable)?.into_owned();
                if entry.is_symlink() {
                    return Err(Error::ArchiveRejected(format!(
                        "entry {name:?} is a symlink"
                    )));
                }
                let rel = safe_relative(&name)?;
                plan.push((i, rel, entry.is_dir()));
            }
            for (i, rel, is_dir) in plan {
                if is_dir {
                    fs::create_dir_all(staging.join(&rel)).map_err(write_err)?;
                    continue;
                }
                let entry = zip.by_index(i).map_err(unreadable)?;
                let mut out = create_file(staging, &rel)?;
                copy_capped(entry, &mut out, &mut budget, None)?;
            }
        }
        ArchiveFormat::TarGz => {
            // Pass 1 checks every header; pass 2 writes.
            for pass in 0..2 {
                let mut tar =
                    tar::Archive::new(GzDecoder::new(File::open(archive).map_err(unreadable)?));
                for (i, entry) in tar.entries().map_err(unreadable)?.enumerate() {
                    if i >= limits.max_entries {
                        return Err(Error::ArchiveRejected(format!(
                            "more than {} entries",
                            limits.max_entries
                        )));
                    }
                    let entry = entry.map_err(unreadable)?;
                    let name = entry
                        .path()
                        .map_err(unreadable)?
                        .to_string_lossy()
                        .into_owned();
                    let ty = entry.header().entry_type();
                    let rel = safe_relative(&name)?;
                    if ty.is_symlink() || ty.is_hard_link() {
                        return Err(Error::ArchiveRejected(format!("entry {name:?} is a link")));
                    }
                    if !(ty.is_file() || ty.is_dir()) {
                        // pax headers and the like carry metadata only; devices and fifos
                        // have no place in a model.
                        if ty.is_pax_global_extensions()
                            || ty.is_pax_local_extensions()
                            || ty.is_gnu_longname()
                        {
                            continue;
                        }
                        return Err(Error::ArchiveRejected(format!(
                            "entry {name:?} is not a file or directory"
                        )));
                    }
                    if pass == 0 {
                        continue;
                    }
                    if ty.is_dir() {
                        fs::create_dir_all(staging.join(&rel)).map_err(write_err)?;
                    } else {
                        let mut out = create_file(staging, &rel)?;
                        copy_capped(entry, &mut out, &mut budget, None)?;
                    }
                }
            }
        }
    }
    Ok(budget.written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_rejected() {
        for bad in ["../x", "/etc/passwd", "a/../../x", "a\\b", ""] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
        assert_eq!(
            safe_relative("./a/b.gguf").unwrap(),
            PathBuf::from("a/b.gguf")
        );
    }
}
