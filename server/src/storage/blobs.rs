//! The content-addressed blob store: `<data>/blobs/sha256/<hex>`. A blob lands there
//! only by an atomic rename after its digest and size were verified, so a file at a
//! blob path is always complete and correct.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::registry::spec::is_sha256_hex;
use crate::store::{BlobRecord, Store};

#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    store: Store,
}

/// Checks a digest before any path is built from it.
pub fn check_digest(field: &str, sha256: &str) -> Result<()> {
    if is_sha256_hex(sha256) {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{sha256:?} is not a lower-case 64-character hex sha256"),
        ))
    }
}

impl BlobStore {
    pub fn open(data_dir: &Path, store: Store) -> Result<BlobStore> {
        let root = data_dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        Ok(BlobStore { root, store })
    }

    /// Path of a blob; the digest must already be validated.
    pub fn path(&self, sha256: &str) -> Result<PathBuf> {
        check_digest("sha256", sha256)?;
        Ok(self.root.join(sha256))
    }

    /// Size of a stored blob, when it is present both in the index and on disk.
    pub fn size(&self, sha256: &str) -> Result<Option<u64>> {
        let Some(record) = self.store.blob(sha256)? else {
            return Ok(None);
        };
        match std::fs::metadata(self.path(sha256)?) {
            Ok(m) if m.len() == record.size_bytes => Ok(Some(record.size_bytes)),
            // Index says stored but the file is gone or wrong: forget it so it is
            // fetched again rather than served broken.
            _ => {
                self.store.delete_blob(sha256)?;
                Ok(None)
            }
        }
    }

    /// Moves a verified file into place. `verified` must be on the same filesystem.
    pub fn insert(&self, sha256: &str, verified: &Path, size: u64) -> Result<PathBuf> {
        let dest = self.path(sha256)?;
        std::fs::rename(verified, &dest).map_err(|e| Error::io(&dest, e))?;
        self.store.put_blob(
            sha256,
            &BlobRecord {
                size_bytes: size,
                create_time_unix_ms: unix_ms(SystemTime::now()),
            },
        )?;
        Ok(dest)
    }

    /// Removes a blob file and its index entry.
    pub fn remove(&self, sha256: &str) -> Result<u64> {
        let path = self.path(sha256)?;
        let size = self.store.blob(sha256)?.map_or(0, |b| b.size_bytes);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
        self.store.delete_blob(sha256)?;
        Ok(size)
    }

    /// Bytes held by all blobs.
    pub fn total_bytes(&self) -> Result<u64> {
        Ok(self.store.blobs()?.iter().map(|(_, b)| b.size_bytes).sum())
    }
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
