//! Storage: resumable verified downloads, content-addressed blobs, safe extraction,
//! operator push, and serving blobs to peers.
//!
//! `transfers` schedules downloads (start or join, queue, pause, resume, cancel,
//! resume after a restart); `claims` keeps two transfers from fetching the same
//! blob at once; `fetch` moves one file's bytes from its sources;
//! `placement` puts verified files where runtimes find them (blobs, unpacked
//! archives, directory models assembled from blobs); `inventory` answers what is
//! stored and what it costs, and deletes.
//!
//! Layout under the data directory:
//!   blobs/sha256/<hex>   verified files, shared by every model that lists them
//!   partial/             downloads and pushes in flight (resumable after a restart)
//!   staging/             archives being unpacked; renamed into models/ when complete
//!   models/<id>/         unpacked archive models

pub mod bandwidth;
pub mod blobs;
mod claims;
mod eviction;
pub mod extract;
mod fetch;
mod inventory;
mod placement;
pub mod progress;
mod push;
pub mod source;
mod transfers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use self::blobs::BlobStore;
use self::source::SourceContext;
use crate::error::{Error, Result};
use crate::lifecycle::Lifecycle;
use crate::registry::ModelSpec;
use crate::store::Store;

pub use eviction::Evictability;
pub use inventory::{StoredModel, Usage};
pub use push::PushHeader;
pub use transfers::{Control, TransferHandle};

/// Storage settings from the agent's configuration.
#[derive(Debug, Clone)]
pub struct StorageSettings {
    pub max_concurrent_downloads: usize,
    /// Attempts per source before moving to the next mirror.
    pub retries: usize,
    pub retry_delay: Duration,
    pub quota: Option<u64>,
    pub extract: extract::Limits,
    /// Bytes per second this device serves to peers (ReadBlob), all readers together;
    /// `None` = no limit.
    pub serve_rate_limit: Option<u64>,
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
    claims: claims::BlobClaims,
    serve_limit: Option<bandwidth::Throttle>,
    /// Held while room is made, so two requests do not count the same free bytes.
    room: tokio::sync::Mutex<()>,
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
        let serve_limit = settings
            .serve_rate_limit
            .filter(|b| *b > 0)
            .map(bandwidth::Throttle::new);
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
                claims: claims::BlobClaims::default(),
                serve_limit,
                room: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The limit origin downloads share on this device.
    pub fn origin_limit(&self) -> &bandwidth::OriginLimit {
        &self.inner.ctx.origin_limit
    }

    /// Waits until `bytes` more may be served to peers.
    pub async fn serve_throttle(&self, bytes: u64) {
        if let Some(limit) = &self.inner.serve_limit {
            limit.take(bytes).await;
        }
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
}
