//! The engine process's side: it reads one Load, confines itself, loads the model
//! with the real engine and serves it until the agent closes the socket.
//!
//! Threads: the main thread runs the engine's `serve` loop (the engine batches as it
//! would inside the agent); one reader thread takes frames off the socket, queues
//! generations, marks cancellations and answers tokenizer calls.

use std::collections::HashSet;
use std::io::BufReader;
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use modeld_engine_core::{
    Engine, EngineError, Flow, GenerateRequest, Job, JobSource, LoadOptions, LoadedModel, Runtime,
    Tokenizer,
};

use crate::confine::Confinement;
use crate::protocol::{self, CallId, Reply, ToAgent, ToEngine, TokenizerFacts};

/// The agent's end of the channel: the engine process gets its socket as stdin, so
/// stray writes to stdout by a runtime never corrupt a frame.
pub fn channel_from_stdin() -> std::io::Result<UnixStream> {
    Ok(UnixStream::from(
        std::io::stdin().as_fd().try_clone_to_owned()?,
    ))
}

/// Frames out, from the serve loop and the reader thread alike.
#[derive(Clone)]
struct Out(Arc<Mutex<UnixStream>>);

impl Out {
    fn send(&self, message: &ToAgent) -> std::io::Result<()> {
        let mut socket = self.0.lock().unwrap_or_else(|p| p.into_inner());
        protocol::write(&mut *socket, message)
    }
}

/// Serves one model over `channel` until the agent closes it. `engines` are the
/// runtimes compiled in; the Load names one. Returns when the model is unloaded, or
/// with what stopped it from loading (already reported to the agent).
pub fn serve(engines: &[Arc<dyn Engine>], channel: UnixStream) -> Result<(), String> {
    // Buffered: a frame is one read, not two.
    let mut input = BufReader::new(channel.try_clone().map_err(|e| e.to_string())?);
    let out = Out(Arc::new(Mutex::new(channel)));
    let Some(first) = protocol::read::<_, ToEngine>(&mut input).map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let ToEngine::Load {
        runtime,
        path,
        options,
    } = first
    else {
        return Err("the first message was not a Load".into());
    };
    let Loaded { model, confinement } = match load(engines, runtime, &path, &options) {
        Ok(loaded) => loaded,
        Err(e) => {
            let text = e.to_string();
            let _ = out.send(&ToAgent::LoadFailed(e));
            return Err(text);
        }
    };
    run(model, confinement, input, out)
}

/// A model loaded in this process, with what it was given.
struct Loaded {
    model: Box<dyn LoadedModel>,
    /// What the confinement applied, in words.
    confinement: String,
}

fn load(
    engines: &[Arc<dyn Engine>],
    runtime: Runtime,
    path: &Path,
    options: &LoadOptions,
) -> Result<Loaded, EngineError> {
    let engine = engines
        .iter()
        .find(|e| e.runtime() == runtime)
        .ok_or_else(|| {
            EngineError::Unavailable(format!(
                "this build of the engine process has no {} runtime",
                runtime.as_str()
            ))
        })?;
    let mut options = options.clone();
    if engine.writes_scratch(path) {
        let dir = crate::scratch::create_for_this_process()
            .map_err(|e| EngineError::Load(format!("cannot create a scratch directory: {e}")))?;
        options.scratch_dir = Some(dir);
    }
    let mut confinement =
        Confinement::for_model(path, &engine.runtime_paths(), options.memory_limit_bytes);
    confinement.writable.extend(options.scratch_dir.clone());
    let applied = confinement
        .apply()
        .map_err(|e| EngineError::Load(format!("cannot confine the engine process: {e}")))?;
    tracing::info!(model = %path.display(), confinement = %applied, "engine process confined");
    hooks::before_load();
    let model = engine.load(path, &options)?;
    hooks::after_load();
    Ok(Loaded {
        model,
        confinement: applied.to_string(),
    })
}

fn run(
    mut model: Box<dyn LoadedModel>,
    confinement: String,
    mut input: BufReader<UnixStream>,
    out: Out,
) -> Result<(), String> {
    let tokenizer = model.tokenizer();
    let facts = TokenizerFacts {
        provider: tokenizer.provider().to_owned(),
        special: tokenizer.special_tokens().clone(),
        max_length: tokenizer.max_length(),
        vocabulary: (0..tokenizer.vocab_size())
            .map(|id| tokenizer.token_bytes(id).unwrap_or_default())
            .collect(),
    };
    out.send(&ToAgent::Loaded {
        info: model.info().clone(),
        parallel: u32::try_from(model.parallel().max(1)).unwrap_or(u32::MAX),
        tokenizer: facts,
        confinement,
    })
    .map_err(|e| e.to_string())?;

    let cancelled: Arc<Mutex<HashSet<CallId>>> = Arc::default();
    let (queue, jobs) = mpsc::channel::<(CallId, GenerateRequest)>();
    let reader = {
        let (out, cancelled) = (out.clone(), cancelled.clone());
        std::thread::Builder::new()
            .name("modeld-engine-reader".into())
            .spawn(move || read_frames(&mut input, &queue, &cancelled, &out, tokenizer.as_ref()))
            .map_err(|e| e.to_string())?
    };
    model.serve(&mut Jobs {
        jobs,
        out,
        cancelled,
    });
    // Free the model before the agent hears the process is gone.
    drop(model);
    let _ = reader.join();
    Ok(())
}

/// Takes frames until the agent closes its end; closing `queue` then ends `serve`
/// once the running generations finish.
fn read_frames(
    input: &mut BufReader<UnixStream>,
    queue: &mpsc::Sender<(CallId, GenerateRequest)>,
    cancelled: &Mutex<HashSet<CallId>>,
    out: &Out,
    tokenizer: &dyn Tokenizer,
) {
    loop {
        let frame = match protocol::read::<_, ToEngine>(input) {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "the agent's channel broke; stopping");
                return;
            }
        };
        let reply = |id, result| {
            let _ = out.send(&ToAgent::Reply { id, result });
        };
        match frame {
            ToEngine::Generate { id, request } => {
                if queue.send((id, request)).is_err() {
                    return;
                }
            }
            ToEngine::Cancel { id } => {
                cancelled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
            }
            ToEngine::Encode {
                id,
                text,
                add_special,
                parse_special,
            } => reply(
                id,
                tokenizer
                    .encode(&text, add_special, parse_special)
                    .map(Reply::Ids),
            ),
            ToEngine::Decode {
                id,
                ids,
                skip_special,
            } => reply(id, tokenizer.decode(&ids, skip_special).map(Reply::Text)),
            ToEngine::RenderChat {
                id,
                messages,
                add_generation_prompt,
            } => reply(
                id,
                tokenizer
                    .render_chat(&messages, add_generation_prompt)
                    .map(Reply::Text),
            ),
            ToEngine::Load { .. } => {
                tracing::error!("a second Load on a loaded engine process; ignored");
            }
        }
    }
}

/// Generations as the engine's serve loop takes them.
struct Jobs {
    jobs: mpsc::Receiver<(CallId, GenerateRequest)>,
    out: Out,
    cancelled: Arc<Mutex<HashSet<CallId>>>,
}

impl Jobs {
    fn job(&self, (id, request): (CallId, GenerateRequest)) -> Job {
        hooks::on_generate();
        let (out, cancelled) = (self.out.clone(), self.cancelled.clone());
        let is_cancelled = move || {
            cancelled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
        };
        let done_out = self.out.clone();
        let done_cancelled = self.cancelled.clone();
        let refused = hooks::refuse_generate();
        Job {
            request,
            sink: Box::new(move |token| {
                if is_cancelled() || out.send(&ToAgent::Token { id, token }).is_err() {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            }),
            done: Box::new(move |outcome| {
                done_cancelled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let outcome = match refused {
                    Some(e) => Err(e),
                    None => outcome,
                };
                let _ = done_out.send(&ToAgent::Done { id, outcome });
            }),
        }
    }
}

impl JobSource for Jobs {
    fn wait(&mut self) -> Option<Job> {
        let next = self.jobs.recv().ok()?;
        Some(self.job(next))
    }

    fn try_next(&mut self) -> Option<Job> {
        let next = self.jobs.try_recv().ok()?;
        Some(self.job(next))
    }
}

/// Faults on request, for the tests that prove the agent outlives its engines:
/// `MODELD_ENGINE_TEST_HOOK` = `abort-on-load`, `abort-on-generate`,
/// `abort-after-load`, or `read-on-generate:PATH` (the generation fails with what
/// reading PATH gave).
#[cfg(feature = "test-hooks")]
mod hooks {
    use modeld_engine_core::EngineError;

    fn hook() -> String {
        std::env::var("MODELD_ENGINE_TEST_HOOK").unwrap_or_default()
    }

    pub fn before_load() {
        if hook() == "abort-on-load" {
            std::process::abort();
        }
    }

    pub fn after_load() {
        if hook() == "abort-after-load" {
            std::thread::spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(300));
                std::process::abort();
            });
        }
    }

    pub fn on_generate() {
        if hook() == "abort-on-generate" {
            std::process::abort();
        }
    }

    pub fn refuse_generate() -> Option<EngineError> {
        let hook = hook();
        let path = hook.strip_prefix("read-on-generate:")?;
        let result = match std::fs::read(path) {
            Ok(bytes) => format!("read {} bytes", bytes.len()),
            Err(e) => format!("{:?}", e.kind()),
        };
        Some(EngineError::Inference(format!(
            "test hook: reading {path}: {result}"
        )))
    }
}

#[cfg(not(feature = "test-hooks"))]
mod hooks {
    pub fn before_load() {}
    pub fn after_load() {}
    pub fn on_generate() {}
    pub fn refuse_generate() -> Option<modeld_engine_core::EngineError> {
        None
    }
}
