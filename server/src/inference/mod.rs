//! Inference: loaded models, each on a worker thread the agent owns.
//!
//! A model is loaded on first use (this stage has no Load RPC yet) from its stored
//! blob or its discovered file, after its GGUF header passed the bounds-checked reader:
//! a malformed file must never reach llama.cpp, whose asserts abort the process.

mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use modeld_engine_core::{Engine, LoadOptions, ModelFormat};

pub use worker::{Event, ModelWorker};

use crate::error::{Error, Result};
use crate::registry::ModelEntry;
use crate::storage::Storage;

/// Requests one model serves at once (in flight plus queued); beyond it a request is
/// answered RESOURCE_EXHAUSTED at once.
pub const DEFAULT_MAX_REQUESTS: usize = 4;

pub struct Inference {
    engines: Vec<Arc<dyn Engine>>,
    loaded: Mutex<HashMap<String, Arc<ModelWorker>>>,
    /// Serializes loads so two first requests do not load a model twice.
    loading: tokio::sync::Mutex<()>,
    max_requests: usize,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("engines", &self.engines.len())
            .finish()
    }
}

impl Inference {
    pub fn new(engines: Vec<Arc<dyn Engine>>, max_requests: usize) -> Inference {
        Inference {
            engines,
            loaded: Mutex::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(()),
            max_requests: max_requests.max(1),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ModelWorker>>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The model's worker, loading it first when needed.
    pub async fn worker(&self, entry: &ModelEntry, storage: &Storage) -> Result<Arc<ModelWorker>> {
        let id = &entry.spec.id;
        if let Some(w) = self.map().get(id).filter(|w| !w.failed()) {
            return Ok(w.clone());
        }
        let _guard = self.loading.lock().await;
        if let Some(w) = self.map().get(id).filter(|w| !w.failed()) {
            return Ok(w.clone());
        }
        let format = entry.spec.format_or_err()?;
        let engine = self
            .engines
            .iter()
            .find(|e| e.formats().contains(&format))
            .cloned()
            .ok_or_else(|| Error::NoRuntime {
                id: id.clone(),
                format: format.as_str(),
            })?;
        let path = model_path(entry, storage)?;
        if format == ModelFormat::Gguf {
            let p = path.clone();
            tokio::task::spawn_blocking(move || -> Result<()> {
                let file = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
                let size = file.metadata().map_err(|e| Error::io(&p, e))?.len();
                crate::formats::gguf::read_header(std::io::BufReader::new(file), size)
                    .map(|_| ())
                    .map_err(|e| Error::ModelInvalid {
                        path: p.clone(),
                        reason: e.to_string(),
                    })
            })
            .await??;
        }
        let options = LoadOptions {
            use_mmap: true,
            ..LoadOptions::default()
        };
        let worker =
            ModelWorker::spawn(id.clone(), engine, path, options, self.max_requests).await?;
        let worker = Arc::new(worker);
        self.map().insert(id.clone(), worker.clone());
        Ok(worker)
    }
}

/// Where a model's single weights file is on disk: its verified blob, or the file a
/// scan found.
fn model_path(entry: &ModelEntry, storage: &Storage) -> Result<PathBuf> {
    let file = entry
        .spec
        .files
        .first()
        .ok_or_else(|| Error::invalid("spec.files", "the model lists no file"))?;
    if storage.blobs().size(&file.sha256)?.is_some() {
        return storage.blobs().path(&file.sha256);
    }
    if file.member.is_none()
        && let Some(url) = file.urls.iter().find(|u| u.starts_with("file://"))
        && let Ok(p) = url::Url::parse(url)
            .and_then(|u| u.to_file_path().map_err(|()| url::ParseError::EmptyHost))
        && p.is_file()
        && entry.local_path.is_some()
    {
        return Ok(p);
    }
    Err(Error::ModelNotStored {
        id: entry.spec.id.clone(),
    })
}
