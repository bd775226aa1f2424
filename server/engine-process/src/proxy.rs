//! The agent's side: an [`Engine`] whose models each run in an engine process.
//!
//! Everything but `load` answers in the agent from the wrapped engine (probing reads
//! headers with the project's own bounds-checked readers). `load` starts the engine
//! process, and the [`LoadedModel`] it returns forwards generations and tokenizer
//! calls over the socket. When the process ends under it, every waiting call ends
//! with [`EngineError::Crashed`] naming how, and the crash handler hears it once.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use modeld_engine_core::{
    Accelerator, ChatMessage, CpuVariant, Engine, EngineError, Flow, GenerateOutcome,
    GenerateRequest, Job, JobSource, LoadOptions, LoadedModel, MemoryEstimate, ModelFormat,
    ModelInfo, ModelProbe, Runtime, SpecialTokens, Token, Tokenizer,
};

use crate::exit;
use crate::protocol::{self, CallId, Reply, ToAgent, ToEngine, TokenizerFacts};

/// How long an unloaded model's process gets to free its memory and exit before it
/// is killed.
pub const EXIT_GRACE: Duration = Duration::from_secs(10);

/// How to start an engine process: this binary, in its engine role.
#[derive(Debug, Clone)]
pub struct EngineCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// An engine whose loads each run in their own process.
pub struct ProcessEngine {
    inner: Arc<dyn Engine>,
    command: EngineCommand,
    /// The agent's async runtime: each model's socket is read and written there, so a
    /// token costs the wake-up of a runtime thread the client's stream needs anyway,
    /// not one more thread's.
    runtime: tokio::runtime::Handle,
}

impl ProcessEngine {
    pub fn new(
        inner: Arc<dyn Engine>,
        command: EngineCommand,
        runtime: tokio::runtime::Handle,
    ) -> ProcessEngine {
        ProcessEngine {
            inner,
            command,
            runtime,
        }
    }
}

impl Engine for ProcessEngine {
    fn runtime(&self) -> Runtime {
        self.inner.runtime()
    }
    fn version(&self) -> String {
        self.inner.version()
    }
    fn formats(&self) -> &[ModelFormat] {
        self.inner.formats()
    }
    fn quantizations(&self) -> &[&'static str] {
        self.inner.quantizations()
    }
    fn accelerators(&self) -> Vec<Accelerator> {
        self.inner.accelerators()
    }
    fn cpu_variant(&self) -> Result<CpuVariant, EngineError> {
        self.inner.cpu_variant()
    }
    fn runtime_paths(&self) -> Vec<PathBuf> {
        self.inner.runtime_paths()
    }
    fn writes_scratch(&self, path: &Path) -> bool {
        self.inner.writes_scratch(path)
    }
    fn probe(&self, path: &Path) -> Result<ModelProbe, EngineError> {
        self.inner.probe(path)
    }
    fn estimate_memory(&self, probe: &ModelProbe, options: &LoadOptions) -> MemoryEstimate {
        self.inner.estimate_memory(probe, options)
    }
    fn load(
        &self,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<Box<dyn LoadedModel>, EngineError> {
        RemoteModel::start(
            &self.command,
            &self.runtime,
            self.inner.runtime(),
            path,
            options,
        )
        .map(|m| Box::new(m) as Box<dyn LoadedModel>)
    }
}

type CrashHandler = Box<dyn FnOnce(EngineError) + Send>;

/// A call waiting for the engine process.
enum Waiting {
    Generation {
        sink: Box<dyn FnMut(Token) -> Flow + Send>,
        done: Box<dyn FnOnce(GenerateOutcome) + Send>,
        /// The sink said stop and a Cancel went out; later tokens are dropped.
        stopped: bool,
    },
    Call(mpsc::SyncSender<Result<Reply, EngineError>>),
}

#[derive(Default)]
struct Calls {
    next: CallId,
    waiting: HashMap<CallId, Waiting>,
    /// Generations sent and not yet done (a count: a generation leaves `waiting`
    /// while its sink runs).
    generating: usize,
    /// Set once the process is gone: why, for every later call.
    ended: Option<EngineError>,
}

/// The channel to one engine process, shared by the model, its tokenizer and the
/// reader thread.
struct Link {
    /// Frames to the engine process, written by a task on the runtime; `None` once the
    /// agent closed the channel.
    outgoing: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>>,
    calls: Mutex<Calls>,
    /// Signalled when a generation ends or the process does.
    generation_ended: Condvar,
    on_crash: Mutex<Option<CrashHandler>>,
    /// The agent is ending the process on purpose: its exit is not a crash.
    closing: AtomicBool,
    child: Mutex<Option<Child>>,
    pid: u32,
}

impl Link {
    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, message: &ToEngine) -> std::io::Result<()> {
        let frame = protocol::encode(message)?;
        let closed = || {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the engine process's channel is closed",
            )
        };
        let outgoing = self.outgoing.lock().unwrap_or_else(|p| p.into_inner());
        outgoing
            .as_ref()
            .ok_or_else(closed)?
            .send(frame)
            .map_err(|_| closed())
    }

    /// Ends the channel: the writer shuts the socket's sending side, which tells the
    /// engine process to finish and exit.
    fn close(&self) {
        self.outgoing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Registers a waiting call under a fresh id and sends what `message` builds,
    /// or answers at once with why the process is gone.
    fn submit(
        &self,
        waiting: Waiting,
        message: impl FnOnce(CallId) -> ToEngine,
    ) -> Result<(), (Waiting, EngineError)> {
        let id = {
            let mut calls = self.calls();
            if let Some(ended) = &calls.ended {
                return Err((waiting, ended.clone()));
            }
            calls.next += 1;
            let id = calls.next;
            if matches!(waiting, Waiting::Generation { .. }) {
                calls.generating += 1;
            }
            calls.waiting.insert(id, waiting);
            id
        };
        if let Err(e) = self.send(&message(id)) {
            // The reader thread reports the crash itself; this call ends here.
            let waiting = {
                let mut calls = self.calls();
                let waiting = calls.waiting.remove(&id);
                if matches!(waiting, Some(Waiting::Generation { .. })) {
                    calls.generating -= 1;
                }
                waiting
            };
            let error = EngineError::Crashed(format!("cannot be reached: {e}"));
            return match waiting {
                Some(w) => Err((w, error)),
                None => Ok(()),
            };
        }
        Ok(())
    }

    /// A tokenizer call: waits for its reply.
    fn call(&self, message: impl FnOnce(CallId) -> ToEngine) -> Result<Reply, EngineError> {
        let (tx, rx) = mpsc::sync_channel(1);
        if let Err((_, e)) = self.submit(Waiting::Call(tx), message) {
            return Err(e);
        }
        rx.recv().unwrap_or_else(|_| {
            Err(self
                .calls()
                .ended
                .clone()
                .unwrap_or_else(|| EngineError::Crashed("ended".into())))
        })
    }

    /// Handles frames until the process closes its end; then, off the runtime, reaps
    /// it and ends whatever still waits.
    async fn read_frames(self: Arc<Self>, input: tokio::net::unix::OwnedReadHalf) {
        let mut input = tokio::io::BufReader::new(input);
        loop {
            match protocol::read_async::<_, ToAgent>(&mut input).await {
                Ok(Some(frame)) => self.dispatch(frame),
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(pid = self.pid, error = %e, "bad frame from an engine process; ending it");
                    self.kill();
                    break;
                }
            }
        }
    }

    /// Reaps the process and ends every call still waiting. Blocking.
    fn finish(&self) {
        let status = self
            .child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .map(Child::wait);
        let how = match status {
            Some(Ok(status)) => exit::describe(status),
            Some(Err(e)) => format!("could not be waited for: {e}"),
            None => "ended".into(),
        };
        // A process killed outright left its scratch directory behind.
        crate::scratch::remove_left_by(self.pid);
        let on_purpose = self.closing.load(Ordering::SeqCst);
        let error = EngineError::Crashed(how.clone());
        let waiting = {
            let mut calls = self.calls();
            calls.ended = Some(error.clone());
            calls.generating = 0;
            std::mem::take(&mut calls.waiting)
        };
        self.generation_ended.notify_all();
        if on_purpose {
            tracing::debug!(pid = self.pid, how, "engine process ended");
        } else {
            tracing::error!(pid = self.pid, how, "engine process crashed");
        }
        // The model is marked failed before any client hears its request ended, so
        // none retries into a model that still looks healthy.
        if !on_purpose {
            let handler = self
                .on_crash
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(handler) = handler {
                handler(error.clone());
            }
        }
        for (_, w) in waiting {
            match w {
                Waiting::Generation { done, .. } => done(Err(error.clone())),
                Waiting::Call(tx) => {
                    let _ = tx.send(Err(error.clone()));
                }
            }
        }
    }

    fn dispatch(&self, frame: ToAgent) {
        match frame {
            ToAgent::Token { id, token } => {
                // Out of the map while the sink runs: a slow client must not hold
                // the lock new requests take.
                let Some(mut w) = self.calls().waiting.remove(&id) else {
                    return;
                };
                if let Waiting::Generation { sink, stopped, .. } = &mut w
                    && !*stopped
                    && sink(token) == Flow::Stop
                {
                    *stopped = true;
                    let _ = self.send(&ToEngine::Cancel { id });
                }
                self.calls().waiting.insert(id, w);
            }
            ToAgent::Done { id, outcome } => {
                let waiting = self.calls().waiting.remove(&id);
                if let Some(Waiting::Generation { done, .. }) = waiting {
                    done(outcome);
                    let mut calls = self.calls();
                    calls.generating = calls.generating.saturating_sub(1);
                    drop(calls);
                    self.generation_ended.notify_all();
                }
            }
            ToAgent::Reply { id, result } => {
                if let Some(Waiting::Call(tx)) = self.calls().waiting.remove(&id) {
                    let _ = tx.send(result);
                }
            }
            ToAgent::Loaded { .. } | ToAgent::LoadFailed(_) => {
                tracing::error!(pid = self.pid, "an engine process reported a second load");
            }
        }
    }

    fn kill(&self) {
        if let Some(child) = self
            .child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            let _ = child.kill();
        }
    }
}

/// A model loaded in an engine process.
pub struct RemoteModel {
    link: Arc<Link>,
    info: ModelInfo,
    parallel: usize,
    tokenizer: Arc<RemoteTokenizer>,
    /// Resolves when the reader thread has reaped the process.
    reaped: mpsc::Receiver<()>,
}

impl RemoteModel {
    fn start(
        command: &EngineCommand,
        handle: &tokio::runtime::Handle,
        runtime: Runtime,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<RemoteModel, EngineError> {
        let unavailable = |what: &str, e: std::io::Error| {
            EngineError::Unavailable(format!("cannot start an engine process ({what}): {e}"))
        };
        let (agent_end, engine_end) = UnixStream::pair().map_err(|e| unavailable("socket", e))?;
        let log = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| unavailable("stderr", e))?;
        let mut child = Command::new(&command.program)
            .args(&command.args)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(engine_end)))
            // A runtime that prints to stdout lands in the log, never in a frame.
            .stdout(Stdio::from(log))
            .stderr(Stdio::inherit())
            // ggml would otherwise attach a debugger to print a backtrace on abort.
            .env("GGML_NO_BACKTRACE", "1")
            // Ctrl-C at the agent's terminal is the agent's to handle: it unloads.
            .process_group(0)
            .spawn()
            .map_err(|e| unavailable(&command.program.display().to_string(), e))?;
        let pid = child.id();
        // The load is a blocking exchange on this thread; the socket moves to the
        // runtime once the model is up.
        let mut input = &agent_end;
        let load = ToEngine::Load {
            runtime,
            path: path.to_path_buf(),
            options: options.clone(),
        };
        let first = protocol::write(&mut &agent_end, &load)
            .and_then(|()| protocol::read::<_, ToAgent>(&mut input));
        let (info, parallel, facts, confinement) = match first {
            Ok(Some(ToAgent::Loaded {
                info,
                parallel,
                tokenizer,
                confinement,
            })) => (info, parallel, tokenizer, confinement),
            Ok(Some(ToAgent::LoadFailed(e))) => {
                let _ = child.wait();
                crate::scratch::remove_left_by(pid);
                return Err(e);
            }
            other => {
                if let Err(e) = &other {
                    tracing::error!(pid, error = %e, "engine process broke off while loading");
                }
                let _ = child.kill();
                let how = child
                    .wait()
                    .map(exit::describe)
                    .unwrap_or_else(|e| format!("could not be waited for: {e}"));
                crate::scratch::remove_left_by(pid);
                return Err(EngineError::Crashed(format!(
                    "{how} while loading the model"
                )));
            }
        };
        tracing::info!(pid, model = %path.display(), %confinement, "model loaded in its engine process");
        let (outgoing, frames) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let link = Arc::new(Link {
            outgoing: Mutex::new(Some(outgoing)),
            calls: Mutex::default(),
            generation_ended: Condvar::new(),
            on_crash: Mutex::new(None),
            closing: AtomicBool::new(false),
            child: Mutex::new(Some(child)),
            pid,
        });
        let (reaped_tx, reaped) = mpsc::channel();
        let socket = {
            let _runtime = handle.enter();
            agent_end
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(agent_end))
        };
        let (read_half, write_half) = match socket {
            Ok(socket) => socket.into_split(),
            Err(e) => {
                link.kill();
                link.finish();
                return Err(unavailable("socket", e));
            }
        };
        handle.spawn(write_frames(frames, write_half));
        {
            let link = link.clone();
            handle.spawn(async move {
                link.clone().read_frames(read_half).await;
                // Waiting for the process and telling the worker block.
                let _ = tokio::task::spawn_blocking(move || {
                    link.finish();
                    let _ = reaped_tx.send(());
                })
                .await;
            });
        }
        Ok(RemoteModel {
            tokenizer: Arc::new(RemoteTokenizer {
                link: link.clone(),
                facts,
            }),
            link,
            info,
            parallel: parallel.max(1) as usize,
            reaped,
        })
    }
}

impl LoadedModel for RemoteModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> Arc<dyn Tokenizer> {
        self.tokenizer.clone()
    }

    fn parallel(&self) -> usize {
        self.parallel
    }

    fn process_id(&self) -> Option<u32> {
        Some(self.link.pid)
    }

    fn on_crash(&mut self, handler: Box<dyn FnOnce(EngineError) + Send>) {
        // Checked under the handler's lock: the reader thread records the end before
        // it takes the handler, so one of the two calls it.
        let mut slot = self.link.on_crash.lock().unwrap_or_else(|p| p.into_inner());
        let ended = self.link.calls().ended.clone();
        match ended {
            // It died between the load and now.
            Some(e) => {
                drop(slot);
                handler(e);
            }
            None => *slot = Some(handler),
        }
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn FnMut(Token) -> Flow,
    ) -> GenerateOutcome {
        // One request at a time through the batching path: the engine process
        // decides how generations share its slots.
        let (tx, rx) = mpsc::sync_channel::<Token>(64);
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let waiting = Waiting::Generation {
            sink: Box::new(move |t| {
                if tx.send(t).is_ok() {
                    Flow::Continue
                } else {
                    Flow::Stop
                }
            }),
            done: Box::new(move |o| {
                let _ = done_tx.send(o);
            }),
            stopped: false,
        };
        let request = request.clone();
        if let Err((_, e)) = self
            .link
            .submit(waiting, |id| ToEngine::Generate { id, request })
        {
            return Err(e);
        }
        for token in rx {
            if sink(token) == Flow::Stop {
                break;
            }
        }
        done_rx
            .recv()
            .unwrap_or_else(|_| Err(EngineError::Crashed("ended".into())))
    }

    fn serve(&mut self, jobs: &mut dyn JobSource) {
        while let Some(Job {
            request,
            sink,
            done,
        }) = jobs.wait()
        {
            let waiting = Waiting::Generation {
                sink,
                done,
                stopped: false,
            };
            if let Err((waiting, e)) = self
                .link
                .submit(waiting, |id| ToEngine::Generate { id, request })
                && let Waiting::Generation { done, .. } = waiting
            {
                done(Err(e));
            }
        }
        // Like an engine inside the agent, serve returns once its generations are
        // done: an unload's grace and cancel act on them until then.
        let mut calls = self.link.calls();
        while calls.ended.is_none() && calls.generating > 0 {
            calls = self
                .link
                .generation_ended
                .wait(calls)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Writes frames to the engine process until the agent closes the channel, then
/// shuts the socket's sending side: the engine process's signal to finish and exit.
async fn write_frames(
    mut frames: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    mut output: tokio::net::unix::OwnedWriteHalf,
) {
    use tokio::io::AsyncWriteExt as _;
    while let Some(frame) = frames.recv().await {
        if output.write_all(&frame).await.is_err() {
            // The process is gone; the reader reports how.
            return;
        }
    }
    let _ = output.shutdown().await;
}

impl Drop for RemoteModel {
    fn drop(&mut self) {
        self.link.closing.store(true, Ordering::SeqCst);
        self.link.close();
        if self.reaped.recv_timeout(EXIT_GRACE).is_err() {
            tracing::warn!(
                pid = self.link.pid,
                "engine process did not exit; killing it"
            );
            self.link.kill();
            let _ = self.reaped.recv();
        }
    }
}

/// The engine's own tokenizer, answered over the socket; the cheap questions are
/// answered from what the process sent at load.
struct RemoteTokenizer {
    link: Arc<Link>,
    facts: TokenizerFacts,
}

fn expect_ids(r: Reply) -> Result<Vec<u32>, EngineError> {
    match r {
        Reply::Ids(ids) => Ok(ids),
        Reply::Text(_) => Err(EngineError::Inference(
            "the engine process answered text where ids were due".into(),
        )),
    }
}

fn expect_text(r: Reply) -> Result<String, EngineError> {
    match r {
        Reply::Text(t) => Ok(t),
        Reply::Ids(_) => Err(EngineError::Inference(
            "the engine process answered ids where text was due".into(),
        )),
    }
}

impl Tokenizer for RemoteTokenizer {
    fn provider(&self) -> &str {
        &self.facts.provider
    }
    fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let text = text.to_owned();
        self.link
            .call(|id| ToEngine::Encode {
                id,
                text,
                add_special,
                parse_special,
            })
            .and_then(expect_ids)
    }
    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        let ids = ids.to_vec();
        self.link
            .call(|id| ToEngine::Decode {
                id,
                ids,
                skip_special,
            })
            .and_then(expect_text)
    }
    fn token_bytes(&self, id: u32) -> Result<Vec<u8>, EngineError> {
        self.facts
            .vocabulary
            .get(id as usize)
            .cloned()
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "token {id} is outside the vocabulary of {}",
                    self.facts.vocabulary.len()
                ))
            })
    }
    fn vocab_size(&self) -> u32 {
        u32::try_from(self.facts.vocabulary.len()).unwrap_or(u32::MAX)
    }
    fn special_tokens(&self) -> &SpecialTokens {
        &self.facts.special
    }
    fn max_length(&self) -> u32 {
        self.facts.max_length
    }
    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let messages = messages.to_vec();
        self.link
            .call(|id| ToEngine::RenderChat {
                id,
                messages,
                add_generation_prompt,
            })
            .and_then(expect_text)
    }
}
