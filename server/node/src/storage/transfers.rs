//! The transfer scheduler: one transfer per model at a time (a second Pull joins it),
//! a bounded queue of running downloads, pause/resume/cancel, and transfers that
//! outlive a restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::Instrument as _;

use super::Storage;
use super::fetch::{FetchJob, Outcome, PartialFile};
use super::progress::{FileProgress, Stage, TransferProgress};
use crate::error::{Error, Result};
use crate::lifecycle::Change;
use crate::metrics::SourceKind;
use crate::model::{ModelState, Stage as LifecycleStage};
use crate::registry::ModelSpec;
use crate::store::{TransferFileRecord, TransferRecord, unix_ms};

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

/// The unfinished transfer of `model_id` in a locked transfer map.
pub(super) fn running_in<'m>(
    map: &'m HashMap<String, Arc<TransferHandle>>,
    model_id: &str,
) -> Option<&'m Arc<TransferHandle>> {
    map.values()
        .find(|h| h.model_id == model_id && !h.progress.borrow().stage.is_final())
}

/// What a transfer record keeps of its state across a restart: running transfers are
/// stored as queued and start again; paused ones wait for a Resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StoredState {
    Queued,
    Paused,
}

impl StoredState {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            StoredState::Queued => "queued",
            StoredState::Paused => "paused",
        }
    }
}

impl Storage {
    /// The progress of the transfer running for `model_id`, if one is.
    pub(super) fn running(&self, model_id: &str) -> Option<watch::Receiver<TransferProgress>> {
        running_in(&self.lock(), model_id).map(|h| h.progress.subscribe())
    }

    /// Starts downloading every missing file of `spec`, or joins the transfer already
    /// running for it. Returns the progress channel and whether this call started it.
    pub async fn pull(
        &self,
        spec: &ModelSpec,
    ) -> Result<(watch::Receiver<TransferProgress>, bool)> {
        if let Some(rx) = self.running(&spec.id) {
            return Ok((rx, false));
        }
        // A transfer of this model a previous run left unfinished goes on from its
        // offset rather than a second one starting from zero: a Pull, or a fleet's
        // assignment, may arrive before the startup has resumed it.
        let unfinished = self.inner.store.transfers()?;
        if let Some((_, record)) = unfinished.into_iter().find(|(_, r)| r.model_id == spec.id) {
            match self.resume_record(record, spec.clone()).await? {
                Some(rx) => return Ok((rx, true)),
                None => {
                    if let Some(rx) = self.running(&spec.id) {
                        return Ok((rx, false));
                    }
                }
            }
        }
        // Which files are missing and whether they fit: both read the disk, so they
        // run on a blocking thread, and without the transfer map's lock held.
        let missing = {
            let storage = self.clone();
            let spec = spec.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<usize>> {
                let mut missing = Vec::new();
                for (i, f) in spec.files.iter().enumerate() {
                    if !storage.file_stored(&spec.id, f)? {
                        missing.push(i);
                    }
                }
                Ok(missing)
            })
            .await??
        };
        if !missing.is_empty() {
            let needed: u64 = missing.iter().map(|i| spec.files[*i].size_bytes).sum();
            self.make_room(&spec.id, needed).await?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let record = TransferRecord {
            id: id.clone(),
            model_id: spec.id.clone(),
            state: StoredState::Queued.as_str().into(),
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
            return self.already_stored(record, spec);
        }
        let handle = {
            let mut map = self.lock();
            // Another Pull of the model may have started while the disk was read.
            if let Some(h) = running_in(&map, &spec.id) {
                return Ok((h.progress.subscribe(), false));
            }
            self.register_handle(&mut map, &record, spec, Control::Run)
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
        Ok((rx, true))
    }

    /// Everything is stored: answer with a finished transfer, and make sure the stored
    /// record says so.
    pub(super) fn already_stored(
        &self,
        record: TransferRecord,
        spec: &ModelSpec,
    ) -> Result<(watch::Receiver<TransferProgress>, bool)> {
        let progress = initial_progress(&record, spec, Stage::Done);
        let (tx, rx) = watch::channel(progress);
        drop(tx);
        if self.inner.store.stored_model(&spec.id)?.is_none() {
            // Recorded before the answer, so that the files count as this model's at
            // once: another model's deletion keeps blobs a stored model lists.
            self.put_stored_record(spec)?;
            let store = self.inner.store.clone();
            let id = spec.id.clone();
            tokio::spawn(async move {
                if let Err(e) = store.flush().await {
                    tracing::warn!(model = %id, error = %e, "could not record stored model");
                }
            });
        }
        Ok((rx, true))
    }

    pub(super) fn register_handle(
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

    pub(super) fn spawn(
        &self,
        handle: Arc<TransferHandle>,
        record: TransferRecord,
        spec: ModelSpec,
    ) {
        let storage = self.clone();
        // A child of whatever started it (a Load, a Pull, the restart that resumed it).
        let span = tracing::info_span!("transfer", model = %spec.id, transfer = %handle.id);
        tokio::spawn(async move {
            let id = handle.id.clone();
            async {
                let result = storage.run(&handle, record, &spec).await;
                storage.finish(&handle, &spec, result).await;
            }
            .instrument(span)
            .await;
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
            if self.resume_record(record, spec).await?.is_some() {
                resumed += 1;
            }
        }
        Ok(resumed)
    }

    /// Runs an unfinished transfer `record` of a previous run again, from its
    /// checkpointed offsets. `None` when it already runs here (a Pull got to it
    /// first), or when another transfer of its model does, which leaves this
    /// record a duplicate to discard.
    async fn resume_record(
        &self,
        record: TransferRecord,
        mut spec: ModelSpec,
    ) -> Result<Option<watch::Receiver<TransferProgress>>> {
        // A peer of the site a fleet named is not in the registered spec: put the
        // one the partial bytes came from back in front, so the transfer goes on
        // reading from it rather than from the origin (which takes over at the
        // same offset if the peer is gone).
        for f in &record.files {
            if f.offset > 0
                && f.source_url.starts_with("modeld://")
                && let Some(file) = spec.files.get_mut(f.index as usize)
                && !file.urls.contains(&f.source_url)
            {
                file.urls.insert(0, f.source_url.clone());
            }
        }
        let control = if record.state == StoredState::Paused.as_str() {
            Control::Pause
        } else {
            Control::Run
        };
        let handle = {
            let mut map = self.lock();
            if map.contains_key(&record.id) {
                return Ok(None);
            }
            if running_in(&map, &record.model_id).is_some() {
                None
            } else {
                Some(self.register_handle(&mut map, &record, &spec, control))
            }
        };
        let Some(handle) = handle else {
            tracing::info!(transfer = %record.id, model = %record.model_id, "discarding a duplicate unfinished transfer");
            self.discard(&record).await?;
            return Ok(None);
        };
        tracing::info!(transfer = %record.id, model = %record.model_id, "resuming transfer");
        let rx = handle.progress.subscribe();
        self.spawn(handle, record, spec);
        Ok(Some(rx))
    }

    pub(super) fn partial_path(&self, transfer_id: &str, index: u32) -> PathBuf {
        self.inner
            .partial_dir
            .join(format!("{transfer_id}-{index}"))
    }

    pub(super) async fn discard(&self, record: &TransferRecord) -> Result<()> {
        self.discard_unflushed(record).await?;
        self.inner.store.flush().await
    }

    pub(super) async fn discard_unflushed(&self, record: &TransferRecord) -> Result<()> {
        for f in &record.files {
            let p = self.partial_path(&record.id, f.index);
            let _ = tokio::fs::remove_file(&p).await;
            let _ = tokio::fs::remove_file(p.with_extension("member")).await;
        }
        self.inner.store.delete_transfer(&record.id)
    }

    /// Runs a transfer to its end: Ok(true) done, Ok(false) cancelled.
    pub(super) async fn run(
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
                        record.state = StoredState::Paused.as_str().into();
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
            record.state = StoredState::Queued.as_str().into();
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
                // Another model may have stored the same bytes meanwhile, or be
                // fetching them now: then this transfer waits for that one instead of
                // downloading them a second time.
                let claim = loop {
                    if self.reuse_stored(&spec.id, &file).await? {
                        break None;
                    }
                    match self.inner.claims.claim(&file.sha256) {
                        Ok(claim) => break Some(claim),
                        Err(fetcher) => {
                            self.set_file_stage(handle, slot, Stage::Queued);
                            let interrupted = tokio::select! {
                                () = fetcher.released() => false,
                                r = control.changed() => {
                                    if r.is_err() {
                                        return Ok(false);
                                    }
                                    true
                                }
                            };
                            if interrupted {
                                // Pause, cancel or resume: the queue loop decides.
                                drop(permit);
                                continue 'wait;
                            }
                        }
                    }
                };
                let Some(_claim) = claim else {
                    record.files[slot].done = true;
                    self.mark_file_done(handle, slot, file.size_bytes);
                    continue;
                };
                let path = self.partial_path(&record.id, index);
                let mut partial = PartialFile::open(path, record.files[slot].offset).await?;
                let started = Instant::now();
                let download = tracing::info_span!(
                    "download",
                    model = %spec.id,
                    file = %file.name,
                    bytes = file.size_bytes,
                    resumed_at = partial.offset,
                    source = tracing::field::Empty,
                    source_kind = tracing::field::Empty,
                );
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
                .instrument(download.clone())
                .await?;
                let source = &record.files[slot].source_url;
                let index = file.urls.iter().position(|u| u == source).unwrap_or(0);
                download.record("source", super::source::shown(source).as_str());
                download.record("source_kind", SourceKind::of(&file.urls, index).as_str());
                drop(download);
                match outcome {
                    Outcome::Cancelled => return Ok(false),
                    Outcome::Paused => {
                        drop(permit);
                        continue 'wait;
                    }
                    Outcome::Complete => {
                        let metrics = crate::metrics::node();
                        metrics.load_stage(&spec.id, "download", started.elapsed());
                        self.set_file_stage(handle, slot, Stage::Extracting);
                        let unpacking = file.member.is_some() || file.archive.is_some();
                        if unpacking {
                            self.inner.lifecycle.transition(
                                &spec.id,
                                ModelState::Extracting,
                                Change::because(format!("unpacking {}", file.name)),
                            )?;
                        }
                        let started = Instant::now();
                        self.place(&spec.id, &file, &partial.path)
                            .instrument(tracing::info_span!(
                                "extract",
                                model = %spec.id,
                                file = %file.name,
                                unpacking
                            ))
                            .await?;
                        if unpacking {
                            metrics.load_stage(&spec.id, "extract", started.elapsed());
                        }
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

    pub(super) async fn finish(
        &self,
        handle: &TransferHandle,
        spec: &ModelSpec,
        result: Result<bool>,
    ) {
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

    pub(super) fn set_stage(&self, handle: &TransferHandle, stage: Stage) {
        handle.progress.send_modify(|p| {
            p.stage = stage;
            for f in &mut p.files {
                if !f.stage.is_final() {
                    f.stage = stage;
                }
            }
        });
    }

    pub(super) fn set_file_stage(&self, handle: &TransferHandle, slot: usize, stage: Stage) {
        handle.progress.send_modify(|p| {
            if let Some(f) = p.files.get_mut(slot) {
                f.stage = stage;
            }
            p.stage = stage;
        });
    }

    pub(super) fn mark_file_done(&self, handle: &TransferHandle, slot: usize, size: u64) {
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

    pub(super) fn handle(&self, id: &str) -> Result<Arc<TransferHandle>> {
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

    pub(super) fn control(&self, id: &str, wanted: Control) -> Result<TransferProgress> {
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
}

pub(super) fn initial_progress(
    record: &TransferRecord,
    spec: &ModelSpec,
    stage: Stage,
) -> TransferProgress {
    TransferProgress {
        id: record.id.clone(),
        model_id: record.model_id.clone(),
        stage,
        start_time: crate::store::from_unix_ms(record.create_time_unix_ms),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::registry::ModelFile;
    use crate::storage::source::SourceContext;
    use crate::storage::{StorageSettings, bandwidth, extract};
    use crate::store::Store;

    const SIZE: usize = 3 << 20;
    const CHECKPOINTED: usize = 1 << 20;

    /// A Pull (or a fleet's assignment) that reaches the agent before its startup has
    /// resumed what the last run left unfinished must go on with that transfer, not
    /// start a second one of the same model from byte 0.
    #[tokio::test]
    async fn a_pull_before_the_startup_resumed_continues_the_unfinished_transfer() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("model.bin");
        #[allow(clippy::cast_possible_truncation)]
        let bytes: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&source, &bytes).unwrap();
        let url = format!("file://{}", source.display());
        let data = dir.path().join("data");
        let store = Store::open(&data.join("db")).unwrap();
        let ctx = SourceContext {
            http: crate::http_client::build().unwrap(),
            headers: Default::default(),
            stall_timeout: Duration::from_secs(5),
            peers: None,
            roots: crate::access::LocalRoots::new([dir.path().to_path_buf()]),
            hosts: crate::http_client::HostPolicy::new(Vec::new(), Vec::new()),
            origin_limit: Arc::new(bandwidth::OriginLimit::new(None)),
        };
        let settings = StorageSettings {
            max_concurrent_downloads: 1,
            retries: 1,
            retry_delay: Duration::from_millis(10),
            quota: None,
            extract: extract::Limits::default(),
            serve_rate_limit: None,
        };
        let storage = Storage::open(
            &data,
            store.clone(),
            crate::lifecycle::Lifecycle::new(store.clone()),
            ctx,
            settings,
        )
        .unwrap();
        let spec = ModelSpec {
            id: "m".into(),
            files: vec![ModelFile {
                name: "model.bin".into(),
                urls: vec![url.clone()],
                sha256: hex::encode(Sha256::digest(&bytes)),
                size_bytes: SIZE as u64,
                member: None,
                archive: None,
            }],
            ..Default::default()
        };

        // What a run killed mid-download leaves: its record, checkpointed at 1 MiB,
        // and the partial file holding those bytes.
        let record = TransferRecord {
            id: "left-by-the-last-run".into(),
            model_id: "m".into(),
            state: StoredState::Queued.as_str().into(),
            files: vec![TransferFileRecord {
                index: 0,
                offset: CHECKPOINTED as u64,
                source_url: url,
                ..Default::default()
            }],
            create_time_unix_ms: 0,
        };
        store.put_transfer(&record).unwrap();
        store.flush().await.unwrap();
        std::fs::write(storage.partial_path(&record.id, 0), &bytes[..CHECKPOINTED]).unwrap();

        let (mut progress, started) = storage.pull(&spec).await.unwrap();
        assert!(started);
        {
            let first = progress.borrow_and_update();
            assert_eq!(first.id, record.id, "a second transfer was started");
            assert_eq!(first.files[0].bytes_done, CHECKPOINTED as u64);
        }
        // The startup's resume, coming later, finds it running and starts nothing.
        let lookup = |_: &str| Some(spec.clone());
        assert_eq!(storage.resume_unfinished(lookup).await.unwrap(), 0);

        while !progress.borrow_and_update().stage.is_final() {
            progress.changed().await.unwrap();
        }
        let last = progress.borrow().clone();
        assert!(last.error.is_none(), "{:?}", last.error);
        assert_eq!(last.stage, Stage::Done);
        assert!(store.transfers().unwrap().is_empty());
        assert!(storage.file_stored("m", &spec.files[0]).unwrap());
    }
}
