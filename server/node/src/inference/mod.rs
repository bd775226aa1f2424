//! Inference: loaded models, each on a worker thread the agent owns.
//!
//! A model is loaded by Lifecycle.Load from its stored blob or its discovered file,
//! after its GGUF header passed the bounds-checked reader: a malformed file must
//! never reach llama.cpp, whose asserts abort the process. Generate finds the model
//! here or answers FAILED_PRECONDITION naming the model's state.

mod benchmark;
pub mod reaper;
mod worker;

/// Crashes of one model within [`CRASH_WINDOW`] after which it is no longer
/// restarted by itself: it stays FAILED until an operator loads it again.
pub const CRASH_LIMIT: usize = 3;
pub const CRASH_WINDOW: Duration = Duration::from_secs(600);

pub use benchmark::{BenchmarkPlan, MAX_GENERATED_TOKENS, MAX_PROMPT_TOKENS, MAX_REPETITIONS};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modeld_engine_core::{Engine, LoadOptions, ModelFormat, Runtime};
use tracing::Instrument as _;

pub use worker::{Event, ModelName, ModelWorker, WorkerSpec};

use crate::error::{Error, Result};
use crate::lifecycle::{Change, Lifecycle};
use crate::memory::{self, KeepAlive, Resident};
use crate::metrics::EvictionReason;
use crate::model::{ModelState, Stage};
use crate::registry::ModelEntry;
use crate::storage::Storage;
use crate::store::Store;

/// How models are served unless a Load says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceSettings {
    /// Requests each model decodes together (continuous batching).
    pub parallel: u32,
    /// Requests per model that may wait for a free slot; beyond them a request is
    /// answered RESOURCE_EXHAUSTED at once.
    pub max_queued: usize,
    /// Inference threads; 0 = the engine's default (all cores).
    pub threads: u32,
    /// Tokens per sequence; 0 = the model's own, capped at 4096.
    pub context_length: u32,
    /// Memory loaded models may hold together, in bytes.
    pub memory_budget: u64,
    /// How long an idle model stays loaded unless its Load says otherwise.
    pub keep_alive: KeepAlive,
}

impl Default for InferenceSettings {
    fn default() -> Self {
        InferenceSettings {
            parallel: 4,
            max_queued: 8,
            threads: 0,
            context_length: 0,
            memory_budget: u64::MAX,
            keep_alive: KeepAlive::For(Duration::from_secs(300)),
        }
    }
}

pub struct Inference {
    engines: Vec<Arc<dyn Engine>>,
    /// What each of `engines` says of itself, in the same order.
    described: Vec<crate::engines::CompiledEngine>,
    store: Store,
    lifecycle: Lifecycle,
    loaded: Mutex<HashMap<String, Arc<ModelWorker>>>,
    /// Serializes loads so two Loads do not load a model twice.
    loading: tokio::sync::Mutex<()>,
    /// Held (shared) by every unload from its first step to its last, and (alone) by an
    /// exchange of two ids: an unload that drains requests while a rollout swaps its
    /// model's id with the standby's would end the wrong id's UNLOADING. Exchanges
    /// hold `loading` too, taken first.
    exchanges: tokio::sync::RwLock<()>,
    settings: InferenceSettings,
    /// Bytes per second the last load read, for load ETAs.
    load_rate: Mutex<Option<f64>>,
    /// When each model's engine last crashed, within the crash window.
    crashes: Arc<Mutex<HashMap<String, Vec<std::time::Instant>>>>,
    /// Models that failed while serving, for the supervisor.
    failures: tokio::sync::mpsc::UnboundedSender<String>,
    failures_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("engines", &self.engines.len())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What a Load asks for on top of the agent's settings; zero fields take them.
#[derive(Debug, Clone, Default)]
pub struct LoadRequest {
    pub runtime: Option<Runtime>,
    pub options: LoadOptions,
    /// Never evict this model for memory.
    pub pin: bool,
    /// `None` takes the agent's default.
    pub keep_alive: Option<KeepAlive>,
}

impl LoadRequest {
    /// The load a pinned model had, to repeat after a restart or a crash.
    pub fn pinned_again(record: &crate::store::PinnedLoadRecord) -> LoadRequest {
        LoadRequest {
            runtime: record.runtime.parse().ok(),
            options: LoadOptions {
                context_length: record.context_length,
                parallel: record.parallel,
                threads: record.threads,
                batch_size: record.batch_size,
                use_mmap: true,
                // Records from before these options were kept say nothing: the defaults.
                kv_cache_type: record.kv_cache_type.parse().unwrap_or_default(),
                flash_attention: record.flash_attention.parse().unwrap_or_default(),
                ..LoadOptions::default()
            },
            pin: true,
            keep_alive: None,
        }
    }
}

/// Private memory an engine process may take for a load admitted at `admitted`
/// bytes: room above the estimate for what estimates miss (runtime buffers, thread
/// stacks, allocator slack), so only a model far past its estimate is stopped.
pub fn engine_memory_limit(admitted: u64) -> u64 {
    const SLACK: u64 = 512 << 20;
    admitted.saturating_add(admitted / 2).saturating_add(SLACK)
}

impl Inference {
    pub fn new(
        engines: Vec<Arc<dyn Engine>>,
        store: Store,
        lifecycle: Lifecycle,
        settings: InferenceSettings,
    ) -> Inference {
        let (failures, failures_rx) = tokio::sync::mpsc::unbounded_channel();
        Inference {
            crashes: Arc::default(),
            failures,
            failures_rx: Mutex::new(Some(failures_rx)),
            described: engines
                .iter()
                .map(|e| crate::engines::CompiledEngine::describe(e.as_ref()))
                .collect(),
            engines,
            store,
            lifecycle,
            loaded: Mutex::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(()),
            exchanges: tokio::sync::RwLock::new(()),
            settings,
            load_rate: Mutex::new(None),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ModelWorker>>> {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The model's worker if it is ready; else FAILED_PRECONDITION naming its state.
    pub fn ready(&self, id: &str) -> Result<Arc<ModelWorker>> {
        let worker = self.map().get(id).cloned();
        match worker {
            Some(w) if !w.failed() => Ok(w),
            Some(_) => {
                self.map().remove(id);
                Err(Error::NotReady {
                    id: id.to_owned(),
                    state: ModelState::Failed,
                })
            }
            None => Err(Error::NotReady {
                id: id.to_owned(),
                state: self.lifecycle.state(id)?,
            }),
        }
    }

    /// Models that fail while serving, as they fail. One taker: the supervisor.
    pub fn take_failures(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        self.failures_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Drops a failed model's worker (its process is already gone).
    pub fn forget_failed(&self, id: &str) {
        let mut map = self.map();
        if map.get(id).is_some_and(|w| w.failed()) {
            map.remove(id);
        }
    }

    /// Records a crash of `id` now; returns how many fell within the crash window.
    pub fn record_crash(&self, id: &str) -> usize {
        let now = std::time::Instant::now();
        let mut crashes = self
            .crashes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let times = crashes.entry(id.to_owned()).or_default();
        times.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
        times.push(now);
        times.len()
    }

    /// An operator acted on the model: its crash history starts over.
    pub fn clear_crashes(&self, id: &str) {
        self.crashes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    /// Seconds a load of `entry` should take, from the rate the last load measured.
    pub fn load_eta(&self, entry: &ModelEntry) -> Option<f64> {
        let rate = (*self
            .load_rate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))?;
        #[allow(clippy::cast_precision_loss)]
        let bytes = entry.spec.total_size() as f64;
        Some(bytes / rate)
    }

    /// Loaded models, in id order.
    pub fn loaded(&self) -> Vec<Arc<ModelWorker>> {
        let mut all: Vec<_> = self
            .map()
            .values()
            .filter(|w| !w.failed())
            .cloned()
            .collect();
        all.sort_by_key(|w| w.model_id());
        all
    }

    /// Loads the model (validate, then load on a new worker) unless it is loaded.
    pub async fn load(
        &self,
        entry: &ModelEntry,
        storage: &Storage,
        request: LoadRequest,
    ) -> Result<Arc<ModelWorker>> {
        let id = &entry.spec.id;
        if let Ok(w) = self.ready(id) {
            return Ok(w);
        }
        let _guard = self.loading.lock().await;
        if let Ok(w) = self.ready(id) {
            return Ok(w);
        }
        let format = entry.spec.format_or_err()?;
        // The Load's choice, else the model's preference, else the best compiled in;
        // a KV cache type or flash attention setting is llama.cpp's alone.
        let llama_only = request.options.kv_cache_type != modeld_engine_core::KvCacheType::F16
            || request.options.flash_attention != modeld_engine_core::FlashAttention::Auto;
        let runtime = request
            .runtime
            .or(entry.spec.preferred_runtime)
            .or((llama_only && format == ModelFormat::Gguf).then_some(Runtime::LlamaCpp));
        let engine = self.engine_for(id, format, runtime)?;
        let path = model_path(entry, storage).await?;
        // Refused here, before any work, when the table does not allow a load from
        // where the model is.
        self.lifecycle.transition(
            id,
            ModelState::Validating,
            Change::because("load requested"),
        )?;
        let pin = PinIntent {
            pinned: request.pin,
            record: crate::store::PinnedLoadRecord {
                context_length: request.options.context_length,
                parallel: request.options.parallel,
                threads: request.options.threads,
                batch_size: request.options.batch_size,
                runtime: request
                    .runtime
                    .map(|r| r.as_str().to_owned())
                    .unwrap_or_default(),
                kv_cache_type: request.options.kv_cache_type.as_str().to_owned(),
                flash_attention: request.options.flash_attention.as_str().to_owned(),
            },
        };
        let started = std::time::Instant::now();
        let runtime = engine.runtime().as_str();
        let result = self
            .validate_and_spawn(id, format, engine, path, request)
            .await;
        crate::metrics::node().load_ended(
            id,
            runtime,
            match &result {
                Ok(_) => crate::metrics::LoadResult::Ok,
                Err(Error::MemoryExhausted { .. }) => crate::metrics::LoadResult::MemoryExhausted,
                Err(_) => crate::metrics::LoadResult::Error,
            },
        );
        if result.is_ok() {
            let seconds = started.elapsed().as_secs_f64();
            #[allow(clippy::cast_precision_loss)]
            let bytes = entry.spec.total_size() as f64;
            if seconds > 0.0 && bytes > 0.0 {
                *self
                    .load_rate
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(bytes / seconds);
            }
        }
        match &result {
            Ok(_) => {
                if pin.pinned {
                    self.store.put_pinned(id, &pin.record)?;
                } else {
                    self.store.delete_pinned(id)?;
                }
                self.lifecycle.transition(
                    id,
                    ModelState::Ready,
                    Change {
                        stage: Some(Stage::Load),
                        progress: 1.0,
                        reason: "loaded".into(),
                    },
                )?;
            }
            // Nothing is wrong with a model that does not fit now.
            Err(Error::MemoryExhausted { .. }) => {
                self.lifecycle.transition(
                    id,
                    ModelState::Downloaded,
                    Change::because("not enough memory to load it"),
                )?;
            }
            Err(e) => {
                let stage = Stage::of(self.lifecycle.state(id)?).unwrap_or(Stage::Load);
                self.lifecycle.fail(id, stage, e)?;
            }
        }
        self.store.flush().await?;
        let worker = Arc::new(result?);
        self.map().insert(id.clone(), worker.clone());
        Ok(worker)
    }

    /// The engines of this build, as they describe themselves, in build order.
    pub fn engines(&self) -> &[crate::engines::CompiledEngine] {
        &self.described
    }

    /// The CPU kernels each engine runs here. Blocking: it may start a runtime.
    pub fn cpu_variants(
        &self,
    ) -> Vec<(
        Runtime,
        std::result::Result<modeld_engine_core::CpuVariant, String>,
    )> {
        self.engines
            .iter()
            .map(|e| (e.runtime(), e.cpu_variant().map_err(|e| e.to_string())))
            .collect()
    }

    /// The engine for a model: the one named (the Load's choice or the model's
    /// preference), else the fastest measured here for the format (see
    /// `engines::ranked`).
    pub fn engine_for(
        &self,
        id: &str,
        format: ModelFormat,
        runtime: Option<Runtime>,
    ) -> Result<Arc<dyn Engine>> {
        let fits = || {
            self.engines
                .iter()
                .filter(|e| e.formats().contains(&format))
        };
        let found = match runtime {
            Some(r) => fits().find(|e| e.runtime() == r).cloned(),
            None => {
                let measured = self.store.benchmarks()?;
                let rates = crate::performance::known_rates();
                crate::performance::ranked(&self.described, format, &measured, rates.as_ref())
                    .into_iter()
                    .find_map(|r| fits().find(|e| e.runtime() == r).cloned())
                    .or_else(|| fits().next().cloned())
            }
        };
        found.ok_or_else(|| match runtime {
            Some(r) => Error::RuntimeUnavailable {
                id: id.to_owned(),
                runtime: r.as_str(),
                format: format.as_str(),
            },
            None => Error::NoRuntime {
                id: id.to_owned(),
                format: format.as_str(),
            },
        })
    }

    async fn validate_and_spawn(
        &self,
        id: &str,
        format: ModelFormat,
        engine: Arc<dyn Engine>,
        path: PathBuf,
        request: LoadRequest,
    ) -> Result<ModelWorker> {
        let metrics = crate::metrics::node();
        // The engine's probe checks the files with our own readers before the
        // runtime sees them.
        let stage = Instant::now();
        let probe = {
            let (engine, path) = (engine.clone(), path.clone());
            tokio::task::spawn_blocking(move || engine.probe(&path))
                .instrument(tracing::info_span!("validate", model = id))
                .await??
        };
        metrics.load_stage(id, "validate", stage.elapsed());
        let stage = Instant::now();
        let initialize = tracing::info_span!(
            "initialize",
            model = id,
            estimated_bytes = tracing::field::Empty
        );
        self.lifecycle.transition(
            id,
            ModelState::Initializing,
            Change::because("the file checked out; preparing the runtime"),
        )?;
        self.lifecycle.transition(
            id,
            ModelState::Loading,
            Change::because("loading the weights"),
        )?;
        let s = &self.settings;
        let o = request.options;
        let or = |v: u32, default: u32| if v == 0 { default } else { v };
        let mut options = LoadOptions {
            context_length: or(o.context_length, s.context_length),
            parallel: or(o.parallel, s.parallel),
            threads: or(o.threads, s.threads),
            ..o
        };
        let estimate = engine.estimate_memory(&probe, &options);
        initialize.record("estimated_bytes", estimate.total());
        self.admit(id, estimate.total())
            .instrument(initialize.clone())
            .await?;
        drop(initialize);
        metrics.load_stage(id, "initialize", stage.elapsed());
        options.memory_limit_bytes = engine_memory_limit(estimate.total());
        let stage = Instant::now();
        let runtime = engine.runtime().as_str();
        let tokenizer_path = path.clone();
        let store = self.store.clone();
        let lifecycle = self.lifecycle.clone();
        let name = ModelName::new(id);
        let failed_name = name.clone();
        let failures = self.failures.clone();
        let loaded = ModelWorker::spawn(WorkerSpec {
            estimate,
            pinned: request.pin,
            keep_alive: request.keep_alive.unwrap_or(s.keep_alive),
            name,
            engine,
            path,
            options,
            max_queued: s.max_queued,
            tokenizer: Box::new(move |model| {
                modeld_tokenizer::for_model(
                    &tokenizer_path,
                    format,
                    Some(model.tokenizer()),
                    model.info().chat_template.as_deref(),
                )
            }),
            on_failure: Box::new(move |error| {
                // Read now: a fleet swap may have given the model another id since.
                let failed_id = failed_name.get().to_string();
                tracing::error!(model = %failed_id, error = %error, "model failed while serving");
                if let Err(e) = lifecycle.fail(&failed_id, Stage::Serve, &error) {
                    tracing::warn!(model = %failed_id, error = %e, "the failure could not be recorded");
                }
                let _ = store.flush_blocking();
                let _ = failures.send(failed_id);
            }),
        })
        .instrument(tracing::info_span!("load", model = id, runtime))
        .await?;
        metrics.load_stage(id, "load", stage.elapsed());
        Ok(loaded)
    }

    /// What every loaded model holds, for the memory manager.
    pub fn resident(&self) -> Vec<Resident> {
        self.loaded()
            .iter()
            .map(|w| Resident {
                model_id: w.model_id(),
                bytes: w.memory().charged_bytes(),
                in_flight: w.in_flight(),
                pinned: w.pinned,
                last_used: w.last_used(),
            })
            .collect()
    }

    /// Memory loaded models may hold together.
    pub fn budget(&self) -> u64 {
        self.settings.memory_budget
    }

    /// Makes room for `needed` bytes within the budget by evicting idle models, least
    /// recently used first; RESOURCE_EXHAUSTED when even that is not enough.
    async fn admit(&self, id: &str, needed: u64) -> Result<()> {
        let evict = memory::make_room(needed, self.budget(), &self.resident()).map_err(|s| {
            Error::MemoryExhausted {
                id: id.to_owned(),
                needed: s.needed,
                available: s.available,
                budget: s.budget,
            }
        })?;
        for victim in evict {
            let reason = format!("evicted (least recently used) to make room for {id:?}");
            self.evict(&victim, EvictionReason::MakeRoom, &reason)
                .await?;
        }
        Ok(())
    }

    /// Unloads an idle model for memory or idleness, recording why.
    pub async fn evict(&self, id: &str, kind: EvictionReason, reason: &str) -> Result<usize> {
        let span =
            tracing::info_span!("evict", model = id, reason = kind.as_str(), detail = reason);
        async {
            tracing::info!(model = id, reason, "evicting");
            self.lifecycle.evicted(id, reason)?;
            let cancelled = self.unload(id, Duration::ZERO).await?;
            crate::metrics::node().evicted(id, kind);
            Ok(cancelled)
        }
        .instrument(span)
        .await
    }

    /// Unloads the model: running requests get `grace` to finish, then are
    /// cancelled. Returns how many were cancelled, or NotReady if it was not loaded.
    pub async fn unload(&self, id: &str, grace: Duration) -> Result<usize> {
        let _steady = self.exchanges.read().await;
        let worker = self.map().remove(id);
        let Some(worker) = worker else {
            return Err(Error::NotReady {
                id: id.to_owned(),
                state: self.lifecycle.state(id)?,
            });
        };
        self.lifecycle.transition(
            id,
            ModelState::Unloading,
            Change::because("unload requested"),
        )?;
        // Unloaded on purpose: a restart must not bring it back.
        self.store.delete_pinned(id)?;
        let cancelled = worker.shut_down(grace).await;
        self.lifecycle.transition(
            id,
            ModelState::Downloaded,
            Change {
                stage: Some(Stage::Unload),
                progress: 1.0,
                reason: format!("unloaded; {cancelled} requests cancelled"),
            },
        )?;
        self.store.flush().await?;
        Ok(cancelled)
    }

    /// Waits for running loads and unloads to end and holds new ones back, for as long
    /// as the guard lives: the ids of two models are exchanged under it. (A load holds
    /// `loading` and may unload to make room, so `loading` comes first here too.)
    pub async fn hold_loads_and_unloads(&self) -> Steady<'_> {
        let loads = self.loading.lock().await;
        let unloads = self.exchanges.write().await;
        Steady {
            _loads: loads,
            _unloads: unloads,
        }
    }

    /// Gives `a`'s loaded worker to `b` and `b`'s to `a`, at once: a request that
    /// looks either id up sees the old pairing or the new, never neither. Either may
    /// be unloaded. The caller swaps the stored records in the same step, holding
    /// [`Inference::hold_loads_and_unloads`].
    pub fn exchange(&self, a: &str, b: &str) {
        let mut map = self.map();
        let wa = map.remove(a);
        let wb = map.remove(b);
        if let Some(w) = wa {
            w.name().set(b);
            map.insert(b.to_owned(), w);
        }
        if let Some(w) = wb {
            w.name().set(a);
            map.insert(a.to_owned(), w);
        }
        let mut crashes = self
            .crashes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (ca, cb) = (crashes.remove(a), crashes.remove(b));
        if let Some(c) = ca {
            crashes.insert(b.to_owned(), c);
        }
        if let Some(c) = cb {
            crashes.insert(a.to_owned(), c);
        }
    }

    /// Unloads everything at shutdown.
    pub async fn unload_all(&self, grace: Duration) {
        let all: Vec<String> = self.map().keys().cloned().collect();
        for id in all {
            if let Err(e) = self.unload(&id, grace).await {
                tracing::warn!(model = %id, error = %e, "unload at shutdown failed");
            }
        }
    }
}

/// No load or unload runs while this lives (see [`Inference::hold_loads_and_unloads`]).
pub struct Steady<'a> {
    _loads: tokio::sync::MutexGuard<'a, ()>,
    _unloads: tokio::sync::RwLockWriteGuard<'a, ()>,
}

/// What a successful load records so a restart can repeat it.
struct PinIntent {
    pinned: bool,
    record: crate::store::PinnedLoadRecord,
}

/// Where a model is on disk for its engine (see `locate_model`), found on a blocking
/// thread: assembling a directory model links (or copies) its files.
async fn model_path(entry: &ModelEntry, storage: &Storage) -> Result<PathBuf> {
    let (entry, storage) = (entry.clone(), storage.clone());
    tokio::task::spawn_blocking(move || locate_model(&entry, &storage)).await?
}

/// The directory a scan found, the directory its stored files were assembled into
/// (several files, or an unpacked archive), its verified blob, or the single file a
/// scan found.
fn locate_model(entry: &ModelEntry, storage: &Storage) -> Result<PathBuf> {
    if let Some(dir) = entry.local_path.as_ref().filter(|p| p.is_dir()) {
        return Ok(dir.clone());
    }
    if entry.spec.files.len() > 1 {
        return storage.assemble(&entry.spec);
    }
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
