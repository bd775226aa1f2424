//! Storage: resumable verified downloads, content-addressed blobs, safe extraction,
//! operator push, and serving blobs to peers.
//!
//! Layout under the data directory:
//!   blobs/sha256/<hex>   verified files, shared by every model that lists them
//!   partial/             downloads and pushes in flight (resumable after a restart)
//!   staging/             archives being unpacked; renamed into models/ when complete
//!   models/<id>/         unpacked archive models

pub mod blobs;
pub mod extract;
mod fetch;
pub mod progress;
mod push;
pub mod source;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use modeld_engine_core::ArchiveFormat;
use tokio::sync::{Semaphore, watch};

use self::blobs::{BlobStore, unix_ms};
use self::fetch::{FetchJob, Outcome, PartialFile};
use self::progress::{FileProgress, Stage, TransferProgress};
use self::source::SourceContext;
use crate::error::{Error, Result};
use crate::lifecycle::{Change, Lifecycle, ModelState, Stage as LifecycleStage};
use crate::registry::ModelSpec;
use crate::store::{
    Store, StoredFileRecord, StoredModelRecord, TransferFileRecord, TransferRecord,
};

pub use push::PushHeader;

/// Storage settings from the agent's configuration.
#[derive(Debug, Clone)]
pub struct StorageSettings {
    pub max_concurrent_downloads: usize,
    /// Attempts per source before moving to the next mirror.
    pub retries: usize,
    pub retry_delay: Duration,
    pub quota: Option<u64>,
    pub extract: extract::Limits,
}

/// What a running transfer is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Run,
    Pause,
    Cancel,
}

/// A transfer in this process: its progress channel and its control channel.
pub struct TransferHandle {
    pub id: String,
    pub model_id: String,
    pub progress: watch::Sender<TransferProgress>,
    control: watch::Sender<Control>,
}

pub struct Inner {
    store: Store,
    lifecycle: Lifecycle,
    blobs: BlobStore,
    partial_dir: PathBuf,
    staging_dir: PathBuf,
    models_dir: PathBuf,
    data_dir: PathBuf,
    ctx: SourceContext,
    settings: StorageSettings,
    queue: Arc<Semaphore>,
    transfers: Mutex<HashMap<String, Arc<TransferHandle>>>,
}

#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("data_dir", &self.inner.data_dir)
            .finish()
    }
}

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
fn dir_size(path: &Path) -> u64 {
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
    pub fn open(
        data_dir: &Path,
        store: Store,
        lifecycle: Lifecycle,
        ctx: SourceContext,
        settings: StorageSettings,
    ) -> Result<Storage> {
        let partial_dir = data_dir.join("partial");
        let staging_dir = data_dir.join("staging");
        let models_dir = data_dir.join("models");
        for d in [&partial_dir, &staging_dir, &models_dir] {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        // Unpacking that a crash interrupted is worthless: staging is rebuilt from the
        // verified archive blob when needed.
        if let Ok(entries) = std::fs::read_dir(&staging_dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let blobs = BlobStore::open(data_dir, store.clone())?;
        Ok(Storage {
            inner: Arc::new(Inner {
                queue: Arc::new(Semaphore::new(settings.max_concurrent_downloads.max(1))),
                store,
                lifecycle,
                blobs,
                partial_dir,
                staging_dir,
                models_dir,
                data_dir: data_dir.to_path_buf(),
                ctx,
                settings,
                transfers: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<TransferHandle>>> {
        // The map holds no invariant a panicking holder could break half-way.
        self.inner
            .transfers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the bytes of `file` are already stored (and, for whole archives,
    /// unpacked).
    fn file_stored(&self, model_id: &str, file: &crate::registry::ModelFile) -> Result<bool> {
        let blob = self.inner.blobs.size(&file.sha256)?.is_some();
        if file.archive.is_some() && file.member.is_none() {
            return Ok(blob && self.inner.models_dir.join(model_id).is_dir());
        }
        Ok(blob)
    }

    /// Whether every file of `spec` is stored, so using it needs no download.
    pub fn is_stored(&self, spec: &ModelSpec) -> Result<bool> {
        for f in &spec.files {
            if !self.file_stored(&spec.id, f)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

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
                });
            }
        }
        let free = fs4::available_space(&self.inner.data_dir).unwrap_or(0);
        if needed > free {
            return Err(Error::DiskFull {
                needed,
                available: free,
            });
        }
        Ok(())
    }

    /// Starts downloading every missing file of `spec`, or joins the transfer already
    /// running for it. Returns the progress channel and whether this call started it.
    pub async fn pull(
        &self,
        spec: &ModelSpec,
    ) -> Result<(watch::Receiver<TransferProgress>, bool)> {
        let (handle, record, started) = {
            let mut map = self.lock();
            if let Some(h) = map
                .values()
                .find(|h| h.model_id == spec.id && !h.progress.borrow().stage.is_final())
            {
                return Ok((h.progress.subscribe(), false));
            }
            let mut missing = Vec::new();
            for (i, f) in spec.files.iter().enumerate() {
                if !self.file_stored(&spec.id, f)? {
                    missing.push(i);
                }
            }
            let id = uuid::Uuid::new_v4().to_string();
            let record = TransferRecord {
                id: id.clone(),
                model_id: spec.id.clone(),
                state: "queued".into(),
                files: missing
                    .iter()
                    .map(|i| TransferFileRecord {
                        index: u32::try_from(*i).unwrap_or(u32::MAX),
                        ..Default::default()
                    })
                    .collect(),
                create_time_unix_ms: unix_ms(SystemTime::now()),
            };
            if missing.is_empty() {
                drop(map);
                return self.already_stored(record, spec);
            }
            let needed: u64 = missing.iter().map(|i| spec.files[*i].size_bytes).sum();
            self.check_space(needed)?;
            let handle = self.register_handle(&mut map, &record, spec, Control::Run);
            (handle, record, true)
        };
        self.inner.store.put_transfer(&record)?;
        self.inner.lifecycle.transition(
            &spec.id,
            ModelState::Downloading,
            Change::because("pull started"),
        )?;
        self.inner.store.flush().await?;
        let rx = handle.progress.subscribe();
        self.spawn(handle, record, spec.clone());
        Ok((rx, started))
    }

    /// Everything is stored: answer with a finished transfer, and make sure the stored
    /// record says so.
    fn already_stored(
        &self,
        record: TransferRecord,
        spec: &ModelSpec,
    ) -> Result<(watch::Receiver<TransferProgress>, bool)> {
        let progress = initial_progress(&record, spec, Stage::Done);
        let (tx, rx) = watch::channel(progress);
        drop(tx);
        if self.inner.store.stored_model(&spec.id)?.is_none() {
            let storage = self.clone();
            let spec = spec.clone();
            tokio::spawn(async move {
                if let Err(e) = storage.record_stored(&spec).await {
                    tracing::warn!(model = %spec.id, error = %e, "could not record stored model");
                }
            });
        }
        Ok((rx, true))
    }

    fn register_handle(
        &self,
        map: &mut HashMap<String, Arc<TransferHandle>>,
        record: &TransferRecord,
        spec: &ModelSpec,
        control: Control,
    ) -> Arc<TransferHandle> {
        let stage = if control == Control::Pause {
            Stage::Paused
        } else {
            Stage::Queued
        };
        let (progress, _) = watch::channel(initial_progress(record, spec, stage));
        let (control, _) = watch::channel(control);
        let handle = Arc::new(TransferHandle {
            id: record.id.clone(),
            model_id: record.model_id.clone(),
            progress,
            control,
        });
        map.insert(record.id.clone(), handle.clone());
        handle
    }

    fn spawn(&self, handle: Arc<TransferHandle>, record: TransferRecord, spec: ModelSpec) {
        let storage = self.clone();
        tokio::spawn(async move {
            let id = handle.id.clone();
            let result = storage.run(&handle, record, &spec).await;
            storage.finish(&handle, &spec, result).await;
            // Keep finished transfers listed briefly so late joiners see the outcome.
            tokio::time::sleep(Duration::from_secs(60)).await;
            storage.lock().remove(&id);
        });
    }

    /// Restarts the transfers a previous run left unfinished.
    pub async fn resume_unfinished(
        &self,
        lookup: impl Fn(&str) -> Option<ModelSpec>,
    ) -> Result<usize> {
        let mut resumed = 0;
        for (_, record) in self.inner.store.transfers()? {
            let Some(spec) = lookup(&record.model_id) else {
                self.discard(&record).await?;
                continue;
            };
            let control = if record.state == "paused" {
                Control::Pause
            } else {
                Control::Run
            };
            let handle = {
                let mut map = self.lock();
                self.register_handle(&mut map, &record, &spec, control)
            };
            tracing::info!(transfer = %record.id, model = %record.model_id, "resuming transfer");
            self.spawn(handle, record, spec);
            resumed += 1;
        }
        Ok(resumed)
    }

    fn partial_path(&self, transfer_id: &str, index: u32) -> PathBuf {
        self.inner
            .partial_dir
            .join(format!("{transfer_id}-{index}"))
    }

    async fn discard(&self, record: &TransferRecord) -> Result<()> {
        self.discard_unflushed(record).await?;
        self.inner.store.flush().await
    }

    async fn discard_unflushed(&self, record: &TransferRecord) -> Result<()> {
        for f in &record.files {
            let p = self.partial_path(&record.id, f.index);
            let _ = tokio::fs::remove_file(&p).await;
            let _ = tokio::fs::remove_file(p.with_extension("member")).await;
        }
        self.inner.store.delete_transfer(&record.id)
    }

    /// Runs a transfer to its end: Ok(true) done, Ok(false) cancelled.
    async fn run(
        &self,
        handle: &TransferHandle,
        mut record: TransferRecord,
        spec: &ModelSpec,
    ) -> Result<bool> {
        let mut control = handle.control.subscribe();
        self.inner.lifecycle.transition(
            &spec.id,
            ModelState::Downloading,
            Change::because("transfer running"),
        )?;
        'wait: loop {
            // Queue: wait for a slot, or for pause/cancel.
            let permit = loop {
                let wanted = *control.borrow_and_update();
                match wanted {
                    Control::Cancel => return Ok(false),
                    Control::Pause => {
                        self.set_stage(handle, Stage::Paused);
                        record.state = "paused".into();
                        self.inner.store.put_transfer(&record)?;
                        self.inner.store.flush().await?;
                        if control.changed().await.is_err() {
                            return Ok(false);
                        }
                        continue;
                    }
                    Control::Run => {}
                }
                self.set_stage(handle, Stage::Queued);
                tokio::select! {
                    p = self.inner.queue.clone().acquire_owned() => {
                        break p.map_err(|_| Error::ShuttingDown)?;
                    }
                    r = control.changed() => if r.is_err() { return Ok(false) },
                }
            };
            record.state = "queued".into();
            for slot in 0..record.files.len() {
                if record.files[slot].done {
                    continue;
                }
                let index = record.files[slot].index;
                let file = spec
                    .files
                    .get(index as usize)
                    .ok_or_else(|| {
                        Error::TaskFailed(format!(
                            "transfer names file #{index} the model does not have"
                        ))
                    })?
                    .clone();
                // Another model may have stored the same bytes meanwhile.
                if self.file_stored(&spec.id, &file)? {
                    record.files[slot].done = true;
                    self.mark_file_done(handle, slot, file.size_bytes);
                    continue;
                }
                let path = self.partial_path(&record.id, index);
                let mut partial = PartialFile::open(path, record.files[slot].offset).await?;
                let outcome = FetchJob {
                    inner: &self.inner,
                    handle,
                    record: &mut record,
                    slot,
                    file: &file,
                    partial: &mut partial,
                    control: &mut control,
                }
                .run()
                .await?;
                match outcome {
                    Outcome::Cancelled => return Ok(false),
                    Outcome::Paused => {
                        drop(permit);
                        continue 'wait;
                    }
                    Outcome::Complete => {
                        self.set_file_stage(handle, slot, Stage::Extracting);
                        let unpacking = file.member.is_some() || file.archive.is_some();
                        if unpacking {
                            self.inner.lifecycle.transition(
                                &spec.id,
                                ModelState::Extracting,
                                Change::because(format!("unpacking {}", file.name)),
                            )?;
                        }
                        self.place(&spec.id, &file, &partial.path).await?;
                        if unpacking && slot + 1 < record.files.len() {
                            self.inner.lifecycle.transition(
                                &spec.id,
                                ModelState::Downloading,
                                Change::because("next file"),
                            )?;
                        }
                        record.files[slot].done = true;
                        // Not flushed on its own: after a crash the resumed transfer
                        // finds the blob and skips the file anyway.
                        self.inner.store.put_transfer(&record)?;
                        self.mark_file_done(handle, slot, file.size_bytes);
                    }
                }
            }
            drop(permit);
            return Ok(true);
        }
    }

    /// Moves a completed download into the blob store (extracting a member, or
    /// unpacking a whole archive into models/<id>/).
    async fn place(
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

    async fn unpack(&self, model_id: &str, archive: &Path, kind: ArchiveFormat) -> Result<()> {
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

    async fn record_stored(&self, spec: &ModelSpec) -> Result<()> {
        self.put_stored_record(spec)?;
        self.inner.store.flush().await
    }

    fn put_stored_record(&self, spec: &ModelSpec) -> Result<()> {
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
            .transition(
                &spec.id,
                ModelState::Downloaded,
                Change {
                    stage: Some(LifecycleStage::Download),
                    progress: 1.0,
                    reason: "every file verified and stored".into(),
                },
            )
            .map(|_| ())
    }

    async fn finish(&self, handle: &TransferHandle, spec: &ModelSpec, result: Result<bool>) {
        let record = self.inner.store.transfer(&handle.id).ok().flatten();
        let mut outcome = match result {
            Ok(true) => self.put_stored_record(spec),
            Ok(false) => Err(Error::TransferCancelled {
                id: handle.id.clone(),
            }),
            Err(e) => Err(e),
        };
        if let Some(record) = &record
            && let Err(e) = self.discard_unflushed(record).await
        {
            tracing::error!(transfer = %handle.id, error = %e, "could not clean up the transfer");
        }
        // One flush makes the stored record and the transfer's removal durable together.
        if let Err(e) = self.inner.store.flush().await
            && outcome.is_ok()
        {
            outcome = Err(e);
        }
        match outcome {
            Ok(()) => {
                tracing::info!(transfer = %handle.id, model = %spec.id, "transfer done");
                handle.progress.send_modify(|p| {
                    p.stage = Stage::Done;
                    for f in &mut p.files {
                        f.stage = Stage::Done;
                        f.bytes_done = f.bytes_total;
                        f.eta_seconds = Some(0.0);
                        f.bytes_per_second = 0.0;
                    }
                });
            }
            Err(e) => {
                let cancelled = matches!(e, Error::TransferCancelled { .. });
                if cancelled {
                    tracing::info!(transfer = %handle.id, model = %spec.id, "transfer cancelled");
                } else {
                    tracing::warn!(transfer = %handle.id, model = %spec.id, error = %e, "transfer failed");
                }
                // A cancelled transfer leaves the model as it was before it; a failed
                // one records why.
                let recorded = if cancelled {
                    self.inner.lifecycle.transition(
                        &spec.id,
                        ModelState::Registered,
                        Change::because("transfer cancelled"),
                    )
                } else {
                    self.inner
                        .lifecycle
                        .fail(&spec.id, LifecycleStage::Download, &e)
                };
                if let Err(le) = recorded {
                    tracing::error!(model = %spec.id, error = %le, "could not record the transfer's end");
                }
                let _ = self.inner.store.flush().await;
                let message = e.to_string();
                let stage = if cancelled {
                    Stage::Cancelled
                } else {
                    Stage::Failed
                };
                handle.progress.send_modify(|p| {
                    p.stage = stage;
                    p.error = Some(Arc::new(e));
                    for f in &mut p.files {
                        if !f.stage.is_final() {
                            f.stage = stage;
                            f.error.clone_from(&message);
                            f.bytes_per_second = 0.0;
                        }
                    }
                });
            }
        }
    }

    fn set_stage(&self, handle: &TransferHandle, stage: Stage) {
        handle.progress.send_modify(|p| {
            p.stage = stage;
            for f in &mut p.files {
                if !f.stage.is_final() {
                    f.stage = stage;
                }
            }
        });
    }

    fn set_file_stage(&self, handle: &TransferHandle, slot: usize, stage: Stage) {
        handle.progress.send_modify(|p| {
            if let Some(f) = p.files.get_mut(slot) {
                f.stage = stage;
            }
            p.stage = stage;
        });
    }

    fn mark_file_done(&self, handle: &TransferHandle, slot: usize, size: u64) {
        handle.progress.send_modify(|p| {
            if let Some(f) = p.files.get_mut(slot) {
                f.stage = Stage::Done;
                f.bytes_done = size;
                f.bytes_total = size;
                f.bytes_per_second = 0.0;
                f.eta_seconds = Some(0.0);
            }
            p.stage = Stage::Downloading;
        });
    }

    fn handle(&self, id: &str) -> Result<Arc<TransferHandle>> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::TransferNotFound { id: id.to_owned() })
    }

    pub fn list_transfers(&self) -> Vec<TransferProgress> {
        let mut out: Vec<TransferProgress> = self
            .lock()
            .values()
            .map(|h| h.progress.borrow().clone())
            .collect();
        out.sort_by(|a, b| a.start_time.cmp(&b.start_time).then(a.id.cmp(&b.id)));
        out
    }

    pub fn transfer(&self, id: &str) -> Result<TransferProgress> {
        Ok(self.handle(id)?.progress.borrow().clone())
    }

    fn control(&self, id: &str, wanted: Control) -> Result<TransferProgress> {
        let h = self.handle(id)?;
        if h.progress.borrow().stage.is_final() {
            return Err(Error::TransferFinished {
                id: id.to_owned(),
                stage: format!("{:?}", h.progress.borrow().stage).to_lowercase(),
            });
        }
        h.control.send_replace(wanted);
        Ok(h.progress.borrow().clone())
    }

    pub fn pause(&self, id: &str) -> Result<TransferProgress> {
        self.control(id, Control::Pause)
    }

    pub fn resume(&self, id: &str) -> Result<TransferProgress> {
        self.control(id, Control::Run)
    }

    /// Cancels a transfer; its partial files are removed. Returns once it stopped.
    pub async fn cancel(&self, id: &str) -> Result<()> {
        let h = self.handle(id)?;
        let mut rx = h.progress.subscribe();
        self.control(id, Control::Cancel)?;
        let _ = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|p| p.stage.is_final()))
            .await;
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

    fn stored_from_record(&self, model_id: String, r: StoredModelRecord) -> Result<StoredModel> {
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

    async fn remove_stored(&self, model_id: &str) -> Result<u64> {
        let running = self
            .lock()
            .values()
            .any(|h| h.model_id == model_id && !h.progress.borrow().stage.is_final());
        if running {
            return Err(Error::ModelInUse {
                id: model_id.to_owned(),
                state: "downloading",
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
        blobs::check_digest("sha256", sha256)?;
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

fn initial_progress(record: &TransferRecord, spec: &ModelSpec, stage: Stage) -> TransferProgress {
    TransferProgress {
        id: record.id.clone(),
        model_id: record.model_id.clone(),
        stage,
        start_time: SystemTime::UNIX_EPOCH
            + Duration::from_millis(u64::try_from(record.create_time_unix_ms).unwrap_or(0)),
        error: None,
        files: record
            .files
            .iter()
            .filter_map(|f| spec.files.get(f.index as usize).map(|sf| (f, sf)))
            .map(|(f, sf)| FileProgress {
                name: sf.name.clone(),
                sha256: sf.sha256.clone(),
                stage,
                bytes_done: f.offset,
                bytes_total: sf.size_bytes,
                bytes_per_second: 0.0,
                eta_seconds: None,
                attempt: 0,
                source_url: f.source_url.clone(),
                error: String::new(),
            })
            .collect(),
    }
}
