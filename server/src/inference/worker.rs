//! One loaded model on one thread. Requests arrive through a bounded queue; a full
//! queue is an immediate RESOURCE_EXHAUSTED, never an unbounded wait. A panic in the
//! engine fails the request and marks the model failed; the agent keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use modeld_engine_core::{
    Engine, EngineError, FinishReason, Flow, GenerateRequest, GenerateStats, LoadOptions,
    LoadedModel, ModelInfo, Token, Tokenizer,
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

enum Job {
    Generate {
        request: GenerateRequest,
        events: mpsc::Sender<Event>,
    },
}

pub struct ModelWorker {
    pub model_id: String,
    pub info: ModelInfo,
    tokenizer: Arc<dyn Tokenizer>,
    jobs: std::sync::mpsc::SyncSender<(Job, OwnedSemaphorePermit)>,
    capacity: Arc<Semaphore>,
    max_requests: usize,
    failed: Arc<AtomicBool>,
}

impl std::fmt::Debug for ModelWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelWorker")
            .field("model_id", &self.model_id)
            .finish()
    }
}

fn engine_error(e: EngineError) -> Error {
    Error::Engine(e)
}

impl ModelWorker {
    /// Starts the worker thread and loads the model on it.
    pub async fn spawn(
        model_id: String,
        engine: Arc<dyn Engine>,
        path: PathBuf,
        options: LoadOptions,
        max_requests: usize,
    ) -> Result<ModelWorker> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<(Job, OwnedSemaphorePermit)>(max_requests);
        let (ready, loaded) = oneshot::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let thread_failed = failed.clone();
        std::thread::Builder::new()
            .name(format!("modeld-model-{model_id}"))
            .spawn(move || {
                let model = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine.load(&path, &options)
                }));
                let mut model = match model {
                    Ok(Ok(m)) => {
                        let _ = ready.send(Ok((m.info().clone(), m.tokenizer())));
                        m
                    }
                    Ok(Err(e)) => {
                        let _ = ready.send(Err(engine_error(e)));
                        return;
                    }
                    Err(_) => {
                        let _ = ready.send(Err(Error::EnginePanicked("while loading".into())));
                        return;
                    }
                };
                while let Ok((job, _permit)) = rx.recv() {
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run(model.as_mut(), job)
                    }));
                    if outcome.is_err() {
                        tracing::error!("the engine panicked; the model is marked failed");
                        thread_failed.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            })
            .map_err(|e| Error::TaskFailed(format!("cannot start a worker thread: {e}")))?;
        let (info, tokenizer) = loaded
            .await
            .map_err(|_| Error::EnginePanicked("the worker thread ended while loading".into()))??;
        Ok(ModelWorker {
            model_id,
            info,
            tokenizer,
            jobs,
            capacity: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            failed,
        })
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    fn submit(&self, job: Job) -> Result<()> {
        if self.failed() {
            return Err(Error::EnginePanicked(format!(
                "model {:?} failed earlier",
                self.model_id
            )));
        }
        let permit = self
            .capacity
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded {
                id: self.model_id.clone(),
                limit: self.capacity_limit(),
            })?;
        self.jobs
            .try_send((job, permit))
            .map_err(|_| Error::Overloaded {
                id: self.model_id.clone(),
                limit: self.capacity_limit(),
            })
    }

    fn capacity_limit(&self) -> usize {
        self.max_requests
    }

    pub fn generate(&self, request: GenerateRequest) -> Result<mpsc::Receiver<Event>> {
        let (events, rx) = mpsc::channel(32);
        self.submit(Job::Generate { request, events })?;
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
            .map_err(engine_error)
    }

    pub async fn tokenize(
        &self,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        self.with_tokenizer(move |t| t.tokenize(&text, add_special, parse_special))
            .await
    }

    pub async fn detokenize(&self, tokens: Vec<u32>, skip_special: bool) -> Result<String> {
        self.with_tokenizer(move |t| t.detokenize(&tokens, skip_special))
            .await
    }

    /// The text of each token, for Tokenize's `pieces`.
    pub async fn pieces(&self, tokens: Vec<u32>) -> Result<Vec<String>> {
        self.with_tokenizer(move |t| {
            tokens
                .iter()
                .map(|id| t.detokenize(&[*id], false))
                .collect()
        })
        .await
    }

    pub async fn render_chat(&self, messages: Vec<(String, String)>) -> Result<String> {
        self.with_tokenizer(move |t| t.render_chat(&messages)).await
    }
}

fn run(model: &mut dyn LoadedModel, job: Job) {
    match job {
        // A client that left while its request waited costs nothing.
        Job::Generate { events, .. } if events.is_closed() => {}
        Job::Generate { request, events } => {
            // The client went away (or its deadline passed) when the channel closes:
            // the sink answers Stop and generation ends within this token.
            let mut sink = |token: Token| {
                if events.blocking_send(Event::Token(token)).is_err() {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            };
            let result = model.generate(&request, &mut sink);
            let _ = events.blocking_send(match result {
                Ok((finish, stats)) => Event::Done(finish, stats),
                Err(e) => Event::Failed(engine_error(e)),
            });
        }
    }
}
