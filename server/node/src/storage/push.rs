//! Push: an operator uploads a model file over gRPC, for devices with no route to the
//! model's source. Verified like a download; resumable from the offset the agent holds.

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::Storage;
use super::fetch::PartialFile;
use crate::error::{Error, Result};
use crate::registry::ModelSpec;
use crate::store::PushRecord;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushHeader {
    pub file_name: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub offset: u64,
}

/// Largest chunk a push message may carry.
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;

fn key(model_id: &str, file_name: &str) -> String {
    format!("{model_id}/{file_name}")
}

impl Storage {
    fn push_file<'a>(
        &self,
        spec: &'a ModelSpec,
        file_name: &str,
    ) -> Result<(usize, &'a crate::registry::ModelFile)> {
        spec.files
            .iter()
            .enumerate()
            .find(|(_, f)| f.name == file_name)
            .ok_or_else(|| {
                Error::PushRejected(format!(
                    "model {:?} has no file named {file_name:?}; its files are: {}",
                    spec.id,
                    spec.files
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// Bytes of `file_name` the agent already holds from an interrupted push.
    pub async fn push_offset(&self, spec: &ModelSpec, file_name: &str) -> Result<u64> {
        let (index, _) = self.push_file(spec, file_name)?;
        let Some(record) = self.inner.store.push(&key(&spec.id, file_name))? else {
            return Ok(0);
        };
        let path = self.push_path(&spec.id, index);
        let on_disk = tokio::fs::metadata(&path)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(record.offset.min(on_disk))
    }

    fn push_path(&self, model_id: &str, index: usize) -> std::path::PathBuf {
        self.inner
            .partial_dir
            .join(format!("push-{model_id}-{index}"))
    }

    /// Receives one file. Returns (sha256, size, stored_new).
    pub async fn push(
        &self,
        spec: &ModelSpec,
        header: PushHeader,
        mut chunks: impl Stream<Item = Result<Bytes>> + Unpin,
    ) -> Result<(String, u64, bool)> {
        let (index, file) = self.push_file(spec, &header.file_name)?;
        let sha = header.sha256.trim().to_ascii_lowercase();
        if sha != file.sha256 || header.size_bytes != file.size_bytes {
            return Err(Error::PushRejected(format!(
                "{:?} is declared as {} bytes with sha256 {}, not {} bytes with sha256 {sha}",
                file.name, file.size_bytes, file.sha256, header.size_bytes
            )));
        }
        if self.file_stored(&spec.id, file)? {
            self.record_stored_if_complete(spec).await?;
            return Ok((sha, file.size_bytes, false));
        }
        let k = key(&spec.id, &file.name);
        let held = self.push_offset(spec, &file.name).await?;
        if header.offset != held {
            return Err(Error::OutOfRange {
                field: "header.offset".into(),
                message: format!(
                    "the agent holds {held} bytes of {:?}; resume from offset {held}",
                    file.name
                ),
            });
        }
        self.make_room(&spec.id, file.size_bytes - held).await?;
        let path = self.push_path(&spec.id, index);
        let mut partial = PartialFile::open(path.clone(), held).await?;
        let record = |offset| PushRecord {
            sha256: sha.clone(),
            size_bytes: file.size_bytes,
            offset,
        };
        self.inner.store.put_push(&k, &record(held))?;
        self.inner.store.flush().await?;

        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // The client went away: keep what arrived for a resume.
                    partial.sync().await?;
                    self.inner.store.put_push(&k, &record(partial.offset))?;
                    self.inner.store.flush().await?;
                    return Err(e);
                }
            };
            if chunk.len() > MAX_CHUNK {
                return Err(Error::invalid(
                    "chunk",
                    format!("{} bytes; the limit is {MAX_CHUNK}", chunk.len()),
                ));
            }
            if partial.offset + chunk.len() as u64 > file.size_bytes {
                drop(partial);
                let _ = tokio::fs::remove_file(&path).await;
                self.inner.store.delete_push(&k)?;
                self.inner.store.flush().await?;
                return Err(Error::PushRejected(format!(
                    "more bytes than the declared {} of {:?}; the upload was discarded",
                    file.size_bytes, file.name
                )));
            }
            partial.write(chunk).await?;
            if partial.checkpoint_due() {
                partial.sync().await?;
                self.inner.store.put_push(&k, &record(partial.offset))?;
                self.inner.store.flush().await?;
            }
        }
        if partial.offset < file.size_bytes {
            partial.sync().await?;
            self.inner.store.put_push(&k, &record(partial.offset))?;
            self.inner.store.flush().await?;
            return Err(Error::OutOfRange {
                field: "chunk".into(),
                message: format!(
                    "the stream ended at byte {} of {}; resume from offset {}",
                    partial.offset, file.size_bytes, partial.offset
                ),
            });
        }
        let actual = partial.finish().await?;
        self.inner.store.delete_push(&k)?;
        if actual != file.sha256 {
            let _ = tokio::fs::remove_file(&path).await;
            self.inner.store.flush().await?;
            return Err(Error::DigestMismatch {
                file: file.name.clone(),
                expected: file.sha256.clone(),
                actual,
            });
        }
        let blob = self
            .inner
            .blobs
            .insert(&file.sha256, &path, file.size_bytes)?;
        if let (Some(kind), None) = (file.archive, &file.member) {
            self.unpack(&spec.id, &blob, kind).await?;
        }
        self.record_stored_if_complete(spec).await?;
        Ok((sha, file.size_bytes, true))
    }

    async fn record_stored_if_complete(&self, spec: &ModelSpec) -> Result<()> {
        for f in &spec.files {
            if !self.file_stored(&spec.id, f)? {
                return self.inner.store.flush().await;
            }
        }
        self.record_stored(spec).await
    }
}
