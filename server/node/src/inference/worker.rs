//! One loaded model on one thread the agent owns. Requests arrive through a bounded
//! queue; the engine takes them between decode steps, up to its parallel slots
//! (continuous batching). A full queue is an immediate RESOURCE_EXHAUSTED, never an
//! unbounded wait. A panic in the engine, or the end of the engine process the model
//! runs in, ends every request it held, marks the model failed, and leaves the agent
//! and other models serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use modeld_engine_core::{
    ChatMessage, Engine, EngineError, FinishReason, Flow, GenerateRequest, GenerateStats, Job,
    JobSource, LoadOptions, LoadedModel, ModelInfo, Runtime, Token, Tokenizer,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::error::{Error, Result};

/// What a generation streams back.
#[derive(Debug)]
pub enum Event {
    Token(Token),
    Done(FinishReason, GenerateStats),
    Failed(Error),
}

/// A request on its way to the engine. The permit travels with it and is released
/// when the request ends, however it ends.
struct Queued {
    request: GenerateRequest,
    events: mpsc::Sender<Event>,
    deadline: Option<Instant>,
    permit: OwnedSemaphorePermit,
}

/// Hands queued requests to the engine, skipping those whose client already left.
struct Queue {
    jobs: std::sync::mpsc::Receiver<Queued>,
    last_used: Arc<std::sync::atomic::AtomicU64>,
    /// Set when an unload's grace time ran out: every running request stops.
    cancel: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    name: ModelName,
    outcomes: Arc<Outcomes>,
}

/// The id a worker serves under. A fleet swap exchanges the ids of two loaded models,
/// so whatever names the model (an error, a crash report) reads it here when it runs.
#[derive(Debug, Clone)]
pub struct ModelName(Arc<std::sync::RwLock<Arc<str>>>);

impl ModelName {
    pub fn new(id: &str) -> ModelName {
        ModelName(Arc::new(std::sync::RwLock::new(Arc::from(id))))
    }

    pub fn get(&self) -> Arc<str> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn set(&self, id: &str) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::from(id);
    }
}

/// How the requests a worker ran ended, counted for a rollout's soak gate.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub finished: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
}

/// Sends `event`, waiting while the client's channel is full. Engines inside the agent
/// call this from their own thread; an engine process's frames are handed over on the
/// async runtime, where waiting must first leave the worker thread.
fn send_waiting(events: &mpsc::Sender<Event>, event: Event) -> std::result::Result<(), ()> {
    match events.try_send(event) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        Err(mpsc::error::TrySendError::Full(event)) => {
            match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                    tokio::task::block_in_place(|| events.blocking_send(event)).map_err(drop)
                }
                Err(_) => events.blocking_send(event).map_err(drop),
                // A single-threaded runtime cannot wait here without stopping itself:
                // the generation stops instead (the agent's runtime is multi-threaded).
                Ok(_) => Err(()),
            }
        }
    }
}

/// The agent's error for an engine's: a crashed engine process names the model.
fn engine_failure(model_id: &str, e: EngineError) -> Error {
    match e {
        EngineError::Crashed(how) => Error::EngineCrashed {
            id: model_id.to_owned(),
            how,
        },
        e => Error::Engine(e),
    }
}

/// Ends a request's event stream with its outcome. Dropped unsent while the engine
/// unwinds from a panic, it marks the model failed before the stream closes, so no
/// client sees its request end while the model still looks healthy.
struct Outcome {
    events: Option<mpsc::Sender<Event>>,
    failed: Arc<AtomicBool>,
    last_used: Arc<std::sync::atomic::AtomicU64>,
    _permit: OwnedSemaphorePermit,
}

impl Outcome {
    fn send(mut self, event: Event) {
        self.last_used.store(now_ms(), Ordering::Relaxed);
        if let Some(events) = self.events.take() {
            let _ = send_waiting(&events, event);
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if self.events.is_some() && std::thread::panicking() {
            self.failed.store(true, Ordering::SeqCst);
        }
    }
}

impl Queue {
    fn job(&self, queued: Queued) -> Option<Job> {
        let Queued {
            request,
            events,
            deadline,
            permit,
        } = queued;
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        // A client that left (or timed out) while its request waited costs nothing.
        if events.is_closed() || expired {
            return None;
        }
        self.last_used.store(now_ms(), Ordering::Relaxed);
        let outcome = Outcome {
            events: Some(events.clone()),
            failed: self.failed.clone(),
            last_used: self.last_used.clone(),
            _permit: permit,
        };
        let cancel = self.cancel.clone();
        let name = self.name.clone();
        let outcomes = self.outcomes.clone();
        Some(Job {
            request,
            sink: Box::new(move |token| {
                // The client went away (the channel closed) or its deadline passed:
                // generation ends with this token.
                if deadline.is_some_and(|d| Instant::now() >= d)
                    || cancel.load(Ordering::Relaxed)
                    || send_waiting(&events, Event::Token(token)).is_err()
                {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            }),
            done: Box::new(move |result| {
                outcomes.finished.fetch_add(1, Ordering::Relaxed);
                if result.is_err() {
                    outcomes.failed.fetch_add(1, Ordering::Relaxed);
                }
                outcome.send(match result {
                    Ok((finish, stats)) => Event::Done(finish, stats),
                    Err(e) => Event::Failed(engine_failure(&name.get(), e)),
                });
            }),
        })
    }
}

impl JobSource for Queue {
    fn wait(&mut self) -> Option<Job> {
        loop {
            let queued = self.jobs.recv().ok()?;
            if let Some(job) = self.job(queued) {
                return Some(job);
            }
        }
    }

    fn try_next(&mut self) -> Option<Job> {
        loop {
            let queued = self.jobs.try_recv().ok()?;
            if let Some(job) = self.job(queued) {
                return Some(job);
            }
        }
    }
}

pub struct ModelWorker {
    name: ModelName,
    outcomes: Arc<Outcomes>,
    pub pinned: bool,
    pub keep_alive: crate::memory::KeepAlive,
    /// When a request last started or ended (unix ms).
    last_used: Arc<std::sync::atomic::AtomicU64>,
    pub runtime: Runtime,
    pub estimate: modeld_engine_core::MemoryEstimate,
    pub info: ModelInfo,
    /// Requests decoded together.
    pub parallel: usize,
    tokenizer: Arc<dyn Tokenizer>,
    jobs: std::sync::mpsc::SyncSender<Queued>,
    capacity: Arc<Semaphore>,
    max_requests: usize,
    failed: Arc<AtomicBool>,
    cancel: Arc<AtomicBool>,
    /// Resolves when the worker thread has dropped the model.
    exited: std::sync::Mutex<Option<oneshot::Receiver<()>>>,
    pub loaded_at: std::time::SystemTime,
    /// The engine process the model runs in; `None` when it runs inside the agent.
    pub process_id: Option<u32>,
}

impl std::fmt::Debug for ModelWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelWorker")
            .field("model_id", &self.name.get())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    u64::try_from(crate::store::unix_ms(std::time::SystemTime::now())).unwrap_or(0)
}

/// Picks a loaded model's unified tokenizer, given the engine's own.
pub type PickTokenizer = Box<
    dyn FnOnce(&dyn LoadedModel) -> std::result::Result<Arc<dyn Tokenizer>, EngineError> + Send,
>;

/// Everything a worker needs to start.
pub struct WorkerSpec {
    pub name: ModelName,
    pub pinned: bool,
    pub keep_alive: crate::memory::KeepAlive,
    /// What the engine expected the load to take.
    pub estimate: modeld_engine_core::MemoryEstimate,
    pub engine: Arc<dyn Engine>,
    pub path: PathBuf,
    pub options: LoadOptions,
    /// Requests that may wait for a free slot.
    pub max_queued: usize,
    pub tokenizer: PickTokenizer,
    /// Records the model's failure (a panic in the engine, or its process ending);
    /// called at most once.
    pub on_failure: Box<dyn FnOnce(Error) + Send>,
}

/// What the worker thread reports once the model is loaded.
pub struct Loaded {
    pub info: ModelInfo,
    pub tokenizer: Arc<dyn Tokenizer>,
    pub parallel: usize,
    pub process_id: Option<u32>,
}

impl ModelWorker {
    /// Starts the worker thread and loads the model on it. `tokenizer` picks the
    /// model's unified tokenizer given the engine's own (on the worker thread, since
    /// building one may read the model file); `on_panic` records the failure.
    pub async fn spawn(spec: WorkerSpec) -> Result<ModelWorker> {
        let WorkerSpec {
            name: model_name,
            pinned,
            keep_alive,
            estimate,
            engine,
            path,
            options,
            max_queued,
            tokenizer: wrap_tokenizer,
            on_failure,
        } = spec;
        let model_id = model_name.get().to_string();
        let outcomes = Arc::new(Outcomes::default());
        // Whichever failure comes first reports; the other finds the handler gone.
        let on_failure = Arc::new(std::sync::Mutex::new(Some(on_failure)));
        let report = move |error: Error| {
            let handler = on_failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(handler) = handler {
                handler(error);
            }
        };
        let runtime = engine.runtime();
        // The semaphore below is the limit; the channel only needs room for it.
        let room = max_queued + options.parallel.max(1) as usize;
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Queued>(room);
        let (ready, loaded) = oneshot::channel::<Result<Loaded>>();
        let (exited_tx, exited) = oneshot::channel::<()>();
        let failed = Arc::new(AtomicBool::new(false));
        let cancel = Arc::new(AtomicBool::new(false));
        let thread_failed = failed.clone();
        let thread_cancel = cancel.clone();
        let last_used = Arc::new(std::sync::atomic::AtomicU64::new(now_ms()));
        let thread_last_used_handle = last_used.clone();
        let name = model_id.clone();
        let thread_name = model_name.clone();
        let thread_outcomes = outcomes.clone();
        std::thread::Builder::new()
            .name(format!("modeld-model-{model_id}"))
            .spawn(move || {
                let model = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let model = engine.load(&path, &options)?;
                    let tokenizer = wrap_tokenizer(model.as_ref())?;
                    Ok::<_, EngineError>((model, tokenizer))
                }));
                let mut model = match model {
                    Ok(Ok((mut model, tokenizer))) => {
                        let (failed, report, id) =
                            (thread_failed.clone(), report.clone(), thread_name.clone());
                        model.on_crash(Box::new(move |e| {
                            failed.store(true, Ordering::SeqCst);
                            report(engine_failure(&id.get(), e));
                        }));
                        let _ = ready.send(Ok(Loaded {
                            info: model.info().clone(),
                            tokenizer,
                            parallel: model.parallel().max(1),
                            process_id: model.process_id(),
                        }));
                        model
                    }
                    Ok(Err(e)) => {
                        let _ = ready.send(Err(engine_failure(&name, e)));
                        return;
                    }
                    Err(_) => {
                        let _ = ready.send(Err(Error::EnginePanicked {
                            id: name,
                            during: "loading",
                        }));
                        return;
                    }
                };
                let mut queue = Queue {
                    jobs: rx,
                    cancel: thread_cancel,
                    failed: thread_failed.clone(),
                    last_used,
                    name: thread_name.clone(),
                    outcomes: thread_outcomes,
                };
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    model.serve(&mut queue);
                }));
                if served.is_err() {
                    // Unwinding dropped every request the engine held, which ends
                    // their streams; queued ones go with the queue.
                    tracing::error!(model = %thread_name.get(), "the engine panicked; the model is marked failed");
                    thread_failed.store(true, Ordering::SeqCst);
                    report(Error::EnginePanicked {
                        id: thread_name.get().to_string(),
                        during: "generation",
                    });
                }
                // Free the model's memory before telling an unload it is done.
                drop(queue);
                drop(model);
                let _ = exited_tx.send(());
            })
            .map_err(|e| Error::TaskFailed(format!("cannot start a worker thread: {e}")))?;
        let loaded = loaded.await.map_err(|_| Error::EnginePanicked {
            id: model_id.clone(),
            during: "loading",
        })??;
        // Every slot plus the queue: beyond that a request is refused at once.
        let max_requests = loaded.parallel + max_queued;
        Ok(ModelWorker {
            name: model_name,
            outcomes,
            pinned,
            keep_alive,
            last_used: thread_last_used_handle,
            runtime,
            estimate,
            info: loaded.info,
            parallel: loaded.parallel,
            tokenizer: loaded.tokenizer,
            jobs,
            capacity: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            failed,
            cancel,
            exited: std::sync::Mutex::new(Some(exited)),
            loaded_at: std::time::SystemTime::now(),
            process_id: loaded.process_id,
        })
    }

    /// Stops taking requests once the last handle is dropped; waits up to `grace` for
    /// running ones to finish, then cancels them. Returns how many were cancelled.
    /// The caller must have removed its own handle from the loaded map first.
    pub async fn shut_down(self: Arc<Self>, grace: std::time::Duration) -> usize {
        let exited = self
            .exited
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let cancel = self.cancel.clone();
        let capacity = self.capacity.clone();
        let max_requests = self.max_requests;
        // Dropping this handle drops the queue's sender: the worker ends once the
        // engine has nothing left to run.
        drop(self);
        let Some(mut exited) = exited else { return 0 };
        if tokio::time::timeout(grace, &mut exited).await.is_ok() {
            return 0;
        }
        let in_flight = max_requests - capacity.available_permits();
        cancel.store(true, Ordering::SeqCst);
        let _ = exited.await;
        in_flight
    }

    /// Memory the model holds: measured from its engine process where it has one
    /// (resident, and proportional where the weights are shared), else what the
    /// engine reported at load.
    pub fn memory(&self) -> crate::memory::process::Measured {
        self.process_id
            .and_then(crate::memory::process::measure)
            .unwrap_or(crate::memory::process::Measured {
                resident_bytes: self.info.memory_bytes,
                proportional_bytes: None,
                measured: false,
            })
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The id the model serves under now.
    pub fn model_id(&self) -> String {
        self.name.get().to_string()
    }

    pub(super) fn name(&self) -> &ModelName {
        &self.name
    }

    /// Requests finished and failed since the model loaded.
    pub fn outcomes(&self) -> (u64, u64) {
        (
            self.outcomes.finished.load(Ordering::Relaxed),
            self.outcomes.failed.load(Ordering::Relaxed),
        )
    }

    /// When a request last started or ended.
    pub fn last_used(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(self.last_used.load(Ordering::Relaxed))
    }

    /// Requests running or waiting now.
    pub fn in_flight(&self) -> usize {
        self.max_requests - self.capacity.available_permits()
    }

    pub fn tokenizer(&self) -> &Arc<dyn Tokenizer> {
        &self.tokenizer
    }

    /// Queues a generation. Its events end with `Done` or `Failed`; a stream that
    /// ends without either means the engine failed under it.
    pub fn generate(
        &self,
        request: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<mpsc::Receiver<Event>> {
        if self.failed() {
            return Err(Error::EnginePanicked {
                id: self.model_id(),
                during: "an earlier request",
            });
        }
        let overloaded = || {
            crate::metrics::node().generate_rejected(&self.model_id());
            Error::Overloaded {
                id: self.model_id(),
                limit: self.max_requests,
            }
        };
        let permit = self
            .capacity
            .clone()
            .try_acquire_owned()
            .map_err(|_| overloaded())?;
        let (events, rx) = mpsc::channel(32);
        self.jobs
            .try_send(Queued {
                request,
                events,
                deadline,
                permit,
            })
            .map_err(|e| match e {
                std::sync::mpsc::TrySendError::Full(_) => overloaded(),
                std::sync::mpsc::TrySendError::Disconnected(_) => Error::EnginePanicked {
                    id: self.model_id(),
                    during: "an earlier request",
                },
            })?;
        Ok(rx)
    }

    /// Tokenizer calls run on a blocking thread, not behind the generation queue.
    async fn with_tokenizer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Tokenizer) -> std::result::Result<T, EngineError> + Send + 'static,
    ) -> Result<T> {
        let tokenizer = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || f(tokenizer.as_ref()))
            .await?
            .map_err(Error::Engine)
    }

    pub async fn encode(
        &self,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        self.with_tokenizer(move |t| t.encode(&text, add_special, parse_special))
            .await
    }

    /// Encodes a prompt so it fits the context with room for `reserve` tokens.
    pub async fn encode_prompt(
        &self,
        text: String,
        parse_special: bool,
        truncation: modeld_engine_core::Truncation,
        reserve: u32,
    ) -> Result<Vec<u32>> {
        let limit = self.info.context_length.saturating_sub(reserve.max(1)) as usize;
        self.with_tokenizer(move |t| t.encode_within(&text, true, parse_special, limit, truncation))
            .await
    }

    pub async fn decode(&self, tokens: Vec<u32>, skip_special: bool) -> Result<String> {
        self.with_tokenizer(move |t| t.decode(&tokens, skip_special))
            .await
    }

    /// The text of each token, for Tokenize's `pieces`.
    pub async fn pieces(&self, tokens: Vec<u32>) -> Result<Vec<String>> {
        self.with_tokenizer(move |t| {
            tokens
                .iter()
                .map(|id| {
                    t.token_bytes(*id)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                })
                .collect()
        })
        .await
    }

    pub async fn render_chat(&self, messages: Vec<ChatMessage>) -> Result<String> {
        self.with_tokenizer(move |t| t.render_chat(&messages, true))
            .await
    }
}

#[cfg(test)]
mod tests {
    //! A test engine stands in for an engine bug: no real runtime panics on demand.

    use std::path::Path;

    use modeld_engine_core::{
        Accelerator, GenerateOutcome, MemoryEstimate, ModelFormat, ModelProbe, SpecialTokens,
    };

    use super::*;

    struct Bytes(SpecialTokens);

    impl Tokenizer for Bytes {
        fn provider(&self) -> &str {
            "bytes"
        }
        fn encode(
            &self,
            text: &str,
            _: bool,
            _: bool,
        ) -> std::result::Result<Vec<u32>, EngineError> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn decode(&self, ids: &[u32], _: bool) -> std::result::Result<String, EngineError> {
            Ok(ids.iter().filter_map(|i| char::from_u32(*i)).collect())
        }
        fn token_bytes(&self, id: u32) -> std::result::Result<Vec<u8>, EngineError> {
            Ok(vec![u8::try_from(id).unwrap_or(b'?')])
        }
        fn vocab_size(&self) -> u32 {
            256
        }
        fn special_tokens(&self) -> &SpecialTokens {
            &self.0
        }
        fn max_length(&self) -> u32 {
            64
        }
        fn render_chat(
            &self,
            _: &[ChatMessage],
            _: bool,
        ) -> std::result::Result<String, EngineError> {
            Ok(String::new())
        }
    }

    /// Echoes the prompt back token by token; a prompt starting with "!" panics.
    struct Echo {
        info: ModelInfo,
        tokenizer: Arc<dyn Tokenizer>,
    }

    impl LoadedModel for Echo {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn tokenizer(&self) -> Arc<dyn Tokenizer> {
            self.tokenizer.clone()
        }
        fn generate(
            &mut self,
            request: &GenerateRequest,
            sink: &mut dyn FnMut(Token) -> Flow,
        ) -> GenerateOutcome {
            for id in &request.prompt {
                if *id == u32::from(b'!') {
                    panic!("engine bug");
                }
                let token = Token {
                    id: *id,
                    text: char::from_u32(*id).map(String::from).unwrap_or_default(),
                    logprob: None,
                };
                if sink(token) == Flow::Stop {
                    return Ok((FinishReason::Cancelled, GenerateStats::default()));
                }
            }
            Ok((FinishReason::Stop, GenerateStats::default()))
        }
    }

    struct EchoEngine;

    impl Engine for EchoEngine {
        fn runtime(&self) -> Runtime {
            Runtime::Candle
        }
        fn version(&self) -> String {
            "echo".into()
        }
        fn formats(&self) -> &[ModelFormat] {
            &[ModelFormat::Safetensors]
        }
        fn quantizations(&self) -> &[&'static str] {
            &["F32"]
        }
        fn accelerators(&self) -> Vec<Accelerator> {
            vec![Accelerator::Cpu]
        }
        fn probe(&self, _: &Path) -> std::result::Result<ModelProbe, EngineError> {
            Ok(ModelProbe::default())
        }
        fn estimate_memory(&self, _: &ModelProbe, _: &LoadOptions) -> MemoryEstimate {
            MemoryEstimate::default()
        }
        fn load(
            &self,
            _: &Path,
            _: &LoadOptions,
        ) -> std::result::Result<Box<dyn LoadedModel>, EngineError> {
            Ok(Box::new(Echo {
                info: ModelInfo {
                    context_length: 64,
                    ..ModelInfo::default()
                },
                tokenizer: Arc::new(Bytes(SpecialTokens::default())),
            }))
        }
    }

    async fn worker(id: &str, panicked: Arc<AtomicBool>) -> ModelWorker {
        ModelWorker::spawn(WorkerSpec {
            name: ModelName::new(id),
            engine: Arc::new(EchoEngine),
            estimate: modeld_engine_core::MemoryEstimate::default(),
            pinned: false,
            keep_alive: crate::memory::KeepAlive::Forever,
            path: PathBuf::from("/nowhere"),
            options: LoadOptions::default(),
            max_queued: 2,
            tokenizer: Box::new(|m| Ok(m.tokenizer())),
            on_failure: Box::new(move |_| panicked.store(true, Ordering::SeqCst)),
        })
        .await
        .unwrap()
    }

    async fn run(w: &ModelWorker, text: &str) -> (String, Option<FinishReason>) {
        let request = GenerateRequest {
            prompt: text.bytes().map(u32::from).collect(),
            ..GenerateRequest::default()
        };
        let mut events = w.generate(request, None).unwrap();
        let mut out = String::new();
        let mut finish = None;
        while let Some(e) = events.recv().await {
            match e {
                Event::Token(t) => out.push_str(&t.text),
                Event::Done(f, _) => finish = Some(f),
                Event::Failed(e) => panic!("{e}"),
            }
        }
        (out, finish)
    }

    #[tokio::test]
    async fn a_panicking_engine_fails_its_model_and_nothing_else() {
        let flagged = Arc::new(AtomicBool::new(false));
        let broken = worker("broken", flagged.clone()).await;
        let healthy = worker("healthy", Arc::new(AtomicBool::new(false))).await;

        assert_eq!(
            run(&broken, "ok").await,
            ("ok".into(), Some(FinishReason::Stop))
        );
        // The stream ends without an outcome: the api turns that into ENGINE_PANICKED.
        let (text, finish) = run(&broken, "ab!cd").await;
        assert_eq!((text.as_str(), finish), ("ab", None));
        assert!(
            broken.failed(),
            "failed before the client saw its stream end"
        );
        // Recording the failure (the store, in the agent) follows on the worker thread.
        for _ in 0..500 {
            if flagged.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(flagged.load(Ordering::SeqCst), "the failure was recorded");
        let refused = broken
            .generate(GenerateRequest::default(), None)
            .unwrap_err();
        assert!(matches!(refused, Error::EnginePanicked { .. }), "{refused}");

        // The other model, and the process, serve on.
        assert_eq!(
            run(&healthy, "still here").await,
            ("still here".into(), Some(FinishReason::Stop))
        );
        assert!(!healthy.failed());
    }

    #[tokio::test]
    async fn a_passed_deadline_skips_a_waiting_request() {
        let w = worker("w", Arc::new(AtomicBool::new(false))).await;
        let request = GenerateRequest {
            prompt: vec![u32::from(b'x')],
            ..GenerateRequest::default()
        };
        let past = Instant::now();
        let mut events = w.generate(request, Some(past)).unwrap();
        assert!(events.recv().await.is_none(), "nothing ran for it");
        assert_eq!(run(&w, "next").await.0, "next");
    }
}
