//! Placement: where verified files go so a runtime finds them. Single files stay
//! blobs; archives are unpacked under models/<id>/; a multi-file model is assembled
//! there from its blobs by hard links.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use modeld_engine_core::ArchiveFormat;

use super::{Storage, extract};
use crate::error::{Error, Result};
use crate::lifecycle::Change;
use crate::model::Stage as LifecycleStage;
use crate::registry::ModelSpec;
use crate::store::{StoredFileRecord, StoredModelRecord, unix_ms};

impl Storage {
    /// Moves a completed download into the blob store (extracting a member, or
    /// unpacking a whole archive into models/<id>/).
    pub(super) async fn place(
        &self,
        model_id: &str,
        file: &crate::registry::ModelFile,
        partial: &Path,
    ) -> Result<()> {
        let limits = self.inner.settings.extract;
        match (&file.archive, &file.member) {
            (None, _) => {
                self.inner
                    .blobs
                    .insert(&file.sha256, partial, file.size_bytes)?;
            }
            (Some(kind), Some(member)) => {
                let out = partial.with_extension("member");
                let (archive, kind, member2, out2) =
                    (partial.to_path_buf(), *kind, member.clone(), out.clone());
                let extracted = tokio::task::spawn_blocking(move || {
                    extract::extract_member(&archive, kind, &member2, &out2, limits)
                })
                .await?;
                let _ = tokio::fs::remove_file(partial).await;
                let (size, digest) = match extracted {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&out).await;
                        return Err(e);
                    }
                };
                if digest != file.sha256 || size != file.size_bytes {
                    let _ = tokio::fs::remove_file(&out).await;
                    return Err(if digest != file.sha256 {
                        Error::DigestMismatch {
                            file: format!("{} (member {member})", file.name),
                            expected: file.sha256.clone(),
                            actual: digest,
                        }
                    } else {
                        Error::SizeMismatch {
                            file: file.name.clone(),
                            expected: file.size_bytes,
                            actual: size,
                        }
                    });
                }
                self.inner.blobs.insert(&file.sha256, &out, size)?;
            }
            (Some(kind), None) => {
                let blob = self
                    .inner
                    .blobs
                    .insert(&file.sha256, partial, file.size_bytes)?;
                self.unpack(model_id, &blob, *kind).await?;
            }
        }
        Ok(())
    }

    /// Whether `file` needs no download for `model_id`: its blob is stored and, for a
    /// whole archive, unpacked for this model (from the stored blob, when another
    /// model brought it).
    pub(super) async fn reuse_stored(
        &self,
        model_id: &str,
        file: &crate::registry::ModelFile,
    ) -> Result<bool> {
        if self.inner.blobs.size(&file.sha256)?.is_none() {
            return Ok(false);
        }
        if let (Some(kind), None) = (&file.archive, &file.member)
            && !self.inner.models_dir.join(model_id).is_dir()
        {
            self.inner.lifecycle.transition(
                model_id,
                crate::model::ModelState::Extracting,
                Change::because(format!("unpacking {} from the stored archive", file.name)),
            )?;
            let blob = self.inner.blobs.path(&file.sha256)?;
            self.unpack(model_id, &blob, *kind).await?;
        }
        Ok(true)
    }

    /// A directory holding every file of a multi-file model under the names its spec
    /// gives them (hard links to the verified blobs, copies where links fail), so a
    /// runtime that opens files beside each other finds them. Built in a staging
    /// directory and renamed into place, so it is either complete or absent.
    pub fn assemble(&self, spec: &ModelSpec) -> Result<PathBuf> {
        let target = self.inner.models_dir.join(&spec.id);
        let complete = |dir: &Path| {
            spec.files.iter().all(|f| {
                std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() == f.size_bytes)
            })
        };
        if target.is_dir() && complete(&target) {
            return Ok(target);
        }
        let staging = self
            .inner
            .staging_dir
            .join(format!("{}-{}", spec.id, uuid::Uuid::new_v4()));
        let built = (|| -> Result<()> {
            for f in &spec.files {
                let rel = Path::new(&f.name);
                if f.name.is_empty()
                    || !rel
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(Error::invalid(
                        "spec.files.name",
                        format!("{:?} is not a path inside the model's directory", f.name),
                    ));
                }
                if self.inner.blobs.size(&f.sha256)?.is_none() {
                    return Err(Error::ModelNotStored {
                        id: spec.id.clone(),
                    });
                }
                let blob = self.inner.blobs.path(&f.sha256)?;
                let dest = staging.join(rel);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                if std::fs::hard_link(&blob, &dest).is_err() {
                    std::fs::copy(&blob, &dest).map_err(|e| Error::io(&dest, e))?;
                }
            }
            if target.exists() {
                std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
            }
            std::fs::rename(&staging, &target).map_err(|e| Error::io(&target, e))
        })();
        if built.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        built.map(|()| target)
    }

    pub(super) async fn unpack(
        &self,
        model_id: &str,
        archive: &Path,
        kind: ArchiveFormat,
    ) -> Result<()> {
        let staging = self
            .inner
            .staging_dir
            .join(format!("{model_id}-{}", uuid::Uuid::new_v4()));
        let target = self.inner.models_dir.join(model_id);
        let limits = self.inner.settings.extract;
        let (a, s) = (archive.to_path_buf(), staging.clone());
        tokio::task::spawn_blocking(move || extract::extract_all(&a, kind, &s, limits)).await??;
        if target.exists() {
            tokio::fs::remove_dir_all(&target)
                .await
                .map_err(|e| Error::io(&target, e))?;
        }
        tokio::fs::rename(&staging, &target)
            .await
            .map_err(|e| Error::io(&target, e))?;
        Ok(())
    }

    pub(super) async fn record_stored(&self, spec: &ModelSpec) -> Result<()> {
        self.put_stored_record(spec)?;
        self.inner.store.flush().await
    }

    pub(super) fn put_stored_record(&self, spec: &ModelSpec) -> Result<()> {
        let archive_dir = spec
            .files
            .iter()
            .any(|f| f.archive.is_some() && f.member.is_none())
            .then(|| self.inner.models_dir.join(&spec.id));
        let record = StoredModelRecord {
            files: spec
                .files
                .iter()
                .map(|f| StoredFileRecord {
                    name: f.name.clone(),
                    sha256: f.sha256.clone(),
                    size_bytes: f.size_bytes,
                })
                .collect(),
            extracted_path: archive_dir
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            update_time_unix_ms: unix_ms(SystemTime::now()),
        };
        self.inner.store.put_stored_model(&spec.id, &record)?;
        self.inner
            .lifecycle
            .stored(
                &spec.id,
                Change {
                    stage: Some(LifecycleStage::Download),
                    progress: 1.0,
                    reason: "every file verified and stored".into(),
                },
            )
            .map(|_| ())
    }
}
