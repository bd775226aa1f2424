//! The inventory: what is stored, for which model, what it costs against the quota
//! and the disk, deleting it, and reading a blob back for a peer.

use std::path::{Path, PathBuf};

use super::Storage;
use crate::error::{Error, Result};
use crate::lifecycle::Change;
use crate::model::ModelState;
use crate::store::StoredModelRecord;

/// One model's stored files, for ListStored and Usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredModel {
    pub model_id: String,
    pub files: Vec<(String, String, u64)>,
    pub complete: bool,
    pub extracted_path: Option<PathBuf>,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Usage {
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub quota_bytes: Option<u64>,
    pub partial_bytes: u64,
    pub per_model: Vec<(String, u64)>,
}

/// Bytes of the files under `path`. Hard links (assembled directory models link to
/// their blobs) are not counted: the blob store counts those bytes once.
pub(super) fn dir_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e
                .metadata()
                .map_or(0, |m| if m.nlink() > 1 { 0 } else { m.len() }),
            _ => 0,
        })
        .sum()
}

impl Storage {
    /// Bytes the agent holds: blobs, partial files, unpacked models.
    pub fn used_bytes(&self) -> Result<u64> {
        Ok(self.inner.blobs.total_bytes()?
            + dir_size(&self.inner.partial_dir)
            + dir_size(&self.inner.models_dir)
            + dir_size(&self.inner.staging_dir))
    }

    /// Refuses a download of `needed` bytes that the disk or the quota cannot hold.
    pub fn check_space(&self, needed: u64) -> Result<()> {
        if let Some(quota) = self.inner.settings.quota {
            let used = self.used_bytes()?;
            let available = quota.saturating_sub(used);
            if needed > available {
                return Err(Error::QuotaExceeded {
                    needed,
                    available,
                    quota,
                    kept: String::new(),
                });
            }
        }
        let free = fs4::available_space(&self.inner.data_dir).unwrap_or(0);
        if needed > free {
            return Err(Error::DiskFull {
                needed,
                available: free,
                kept: String::new(),
            });
        }
        Ok(())
    }

    pub fn stored_models(&self) -> Result<Vec<StoredModel>> {
        self.inner
            .store
            .stored_models()?
            .into_iter()
            .map(|(id, r)| self.stored_from_record(id, r))
            .collect()
    }

    pub(super) fn stored_from_record(
        &self,
        model_id: String,
        r: StoredModelRecord,
    ) -> Result<StoredModel> {
        let mut complete = true;
        let mut files = Vec::new();
        let mut size_bytes = 0;
        for f in r.files {
            match self.inner.blobs.size(&f.sha256)? {
                Some(s) => size_bytes += s,
                None => complete = false,
            }
            files.push((f.name, f.sha256, f.size_bytes));
        }
        let extracted_path =
            (!r.extracted_path.is_empty()).then(|| PathBuf::from(&r.extracted_path));
        if let Some(p) = &extracted_path {
            size_bytes += dir_size(p);
        }
        Ok(StoredModel {
            model_id,
            files,
            complete,
            extracted_path,
            size_bytes,
        })
    }

    /// Deletes a model's stored files. A blob another stored model lists is kept.
    /// Returns the bytes freed.
    pub async fn delete_stored(&self, model_id: &str) -> Result<u64> {
        let freed = self.remove_stored(model_id).await?;
        self.inner.lifecycle.transition(
            model_id,
            ModelState::Registered,
            Change::because("stored files removed"),
        )?;
        self.inner.store.flush().await?;
        Ok(freed)
    }

    /// Removes what is stored for a model that left the registry, if anything.
    pub async fn forget(&self, model_id: &str) -> Result<u64> {
        match self.remove_stored(model_id).await {
            Err(Error::NothingStored { .. }) => Ok(0),
            other => other,
        }
    }

    /// Swaps the directories named after two models (unpacked archives, assembled
    /// multi-file models), for an exchange of their ids. Refused while either is
    /// downloading. Returns a guard that swaps them back unless it is kept.
    pub fn exchange_dirs(&self, a: &str, b: &str) -> Result<DirsExchanged> {
        for id in [a, b] {
            if self.running(id).is_some() {
                return Err(Error::ModelInUse {
                    id: id.to_owned(),
                    state: ModelState::Downloading,
                });
            }
        }
        let dir = self.inner.models_dir.clone();
        swap_dirs(&dir, a, b)?;
        Ok(DirsExchanged {
            dir,
            a: a.to_owned(),
            b: b.to_owned(),
            kept: false,
        })
    }

    pub(super) async fn remove_stored(&self, model_id: &str) -> Result<u64> {
        if self.running(model_id).is_some() {
            return Err(Error::ModelInUse {
                id: model_id.to_owned(),
                state: ModelState::Downloading,
            });
        }
        let Some(record) = self.inner.store.stored_model(model_id)? else {
            return Err(Error::NothingStored {
                id: model_id.to_owned(),
            });
        };
        let others: Vec<(String, StoredModelRecord)> = self
            .inner
            .store
            .stored_models()?
            .into_iter()
            .filter(|(id, _)| id != model_id)
            .collect();
        let mut freed = 0;
        for f in &record.files {
            let shared = others
                .iter()
                .any(|(_, o)| o.files.iter().any(|g| g.sha256 == f.sha256));
            if !shared {
                freed += self.inner.blobs.remove(&f.sha256)?;
            }
        }
        if !record.extracted_path.is_empty() {
            let p = PathBuf::from(&record.extracted_path);
            freed += dir_size(&p);
            let _ = tokio::fs::remove_dir_all(&p).await;
        }
        // A multi-file model's assembled directory holds links to the blobs just
        // removed: without it too, their bytes would stay on disk.
        let assembled = self.inner.models_dir.join(model_id);
        if assembled.is_dir() {
            let _ = tokio::fs::remove_dir_all(&assembled).await;
        }
        self.inner.store.delete_stored_model(model_id)?;
        self.inner.store.flush().await?;
        Ok(freed)
    }

    pub fn usage(&self) -> Result<Usage> {
        let per_model = self
            .stored_models()?
            .into_iter()
            .map(|m| (m.model_id, m.size_bytes))
            .collect();
        Ok(Usage {
            used_bytes: self.used_bytes()?,
            free_bytes: fs4::available_space(&self.inner.data_dir).unwrap_or(0),
            quota_bytes: self.inner.settings.quota,
            partial_bytes: dir_size(&self.inner.partial_dir),
            per_model,
        })
    }

    /// Opens a stored blob for reading from `offset`. Returns (file, size).
    pub async fn open_blob(&self, sha256: &str, offset: u64) -> Result<(tokio::fs::File, u64)> {
        super::blobs::check_digest("sha256", sha256)?;
        let size = self
            .inner
            .blobs
            .size(sha256)?
            .ok_or_else(|| Error::BlobNotFound {
                sha256: sha256.to_owned(),
            })?;
        if offset > size {
            return Err(Error::OutOfRange {
                field: "offset".into(),
                message: format!("{offset} is past the end of the {size}-byte blob"),
            });
        }
        let path = self.inner.blobs.path(sha256)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Error::io(&path, e))?;
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| Error::io(&path, e))?;
        Ok((file, size))
    }
}

/// Two model directories swapped by [`Storage::exchange_dirs`]; dropped without
/// [`DirsExchanged::keep`], it swaps them back.
#[derive(Debug)]
pub struct DirsExchanged {
    dir: PathBuf,
    a: String,
    b: String,
    kept: bool,
}

impl DirsExchanged {
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for DirsExchanged {
    fn drop(&mut self) {
        if !self.kept
            && let Err(e) = swap_dirs(&self.dir, &self.a, &self.b)
        {
            tracing::warn!(error = %e, "the model directories could not be swapped back");
        }
    }
}

fn swap_dirs(dir: &Path, a: &str, b: &str) -> Result<()> {
    let (pa, pb) = (dir.join(a), dir.join(b));
    let parked = dir.join(format!(".exchange-{}", uuid::Uuid::new_v4()));
    let rename = |from: &Path, to: &Path| std::fs::rename(from, to).map_err(|e| Error::io(from, e));
    let had_a = pa.exists();
    if had_a {
        rename(&pa, &parked)?;
    }
    if pb.exists() {
        rename(&pb, &pa)?;
    }
    if had_a {
        rename(&parked, &pb)?;
    }
    Ok(())
}
