//! The content-addressed blob store: `<data>/blobs/sha256/<hex>`. A blob lands there
//! only by an atomic rename after its digest and size were verified, so a file at a
//! blob path is always complete and correct.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::registry::spec::is_sha256_hex;
use crate::store::{BlobRecord, Store, unix_ms};

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
    /// Opens the blob directory and drops index entries whose file is gone or has
    /// the wrong size (someone deleted or truncated it while the agent was down), so
    /// those blobs are fetched again rather than served broken. Blocking.
    pub fn open(data_dir: &Path, store: Store) -> Result<BlobStore> {
        let root = data_dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        let blobs = BlobStore { root, store };
        for (sha256, record) in blobs.store.blobs()? {
            if blobs.file_size(&sha256)? != Some(record.size_bytes) {
                tracing::warn!(%sha256, "blob file missing or damaged; it will be fetched again");
                blobs.store.delete_blob(&sha256)?;
            }
        }
        Ok(blobs)
    }

    fn file_size(&self, sha256: &str) -> Result<Option<u64>> {
        Ok(std::fs::metadata(self.path(sha256)?).ok().map(|m| m.len()))
    }

    /// Path of a blob; the digest must already be validated.
    pub fn path(&self, sha256: &str) -> Result<PathBuf> {
        check_digest("sha256", sha256)?;
        Ok(self.root.join(sha256))
    }

    /// Size of a stored blob, when it is present both in the index and on disk with
    /// the size the index recorded. A query: it changes nothing.
    pub fn size(&self, sha256: &str) -> Result<Option<u64>> {
        let Some(record) = self.store.blob(sha256)? else {
            return Ok(None);
        };
        Ok((self.file_size(sha256)? == Some(record.size_bytes)).then_some(record.size_bytes))
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
