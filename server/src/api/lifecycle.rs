//! Lifecycle service, first stage: Load drives a stored model through validation
//! and loading to READY, Unload frees it, GetState and ListLoaded report. The full
//! state machine (pull from Load, history, Watch, memory budget) replaces this.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use modeld_engine_core::{LoadOptions, Runtime};
use modeld_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::api::convert::{state_to_pb, timestamp};
use crate::error::{Error, Result};
use crate::inference::{LoadRequest, ModelWorker};
use crate::lifecycle::load::{self, LoadUpdate};
use crate::lifecycle::{Compacted, EventKind, Failure, Lifecycle, ModelState, Stage, Transition};
use crate::memory::KeepAlive;
use crate::registry::spec;

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// History entries GetState returns when the request does not say, and at most.
const HISTORY_DEFAULT: usize = 100;
const HISTORY_MAX: usize = 10_000;
/// Events read from the store per page while a watcher catches up.
const WATCH_PAGE: usize = 512;

fn stage_to_pb(s: Stage) -> pb::LifecycleStage {
    match s {
        Stage::Download => pb::LifecycleStage::Download,
        Stage::Extract => pb::LifecycleStage::Extract,
        Stage::Validate => pb::LifecycleStage::Validate,
        Stage::Initialize => pb::LifecycleStage::Initialize,
        Stage::Load => pb::LifecycleStage::Load,
        Stage::Unload => pb::LifecycleStage::Unload,
    }
}

fn failure_to_pb(f: &Failure) -> pb::FailureInfo {
    pb::FailureInfo {
        stage: stage_to_pb(f.stage) as i32,
        code: f.code,
        message: f.message.clone(),
    }
}

fn transition_to_pb(t: &Transition) -> pb::StateTransition {
    let millis = u64::try_from(t.time_unix_ms).unwrap_or(0);
    pb::StateTransition {
        revision: t.revision,
        model_id: t.model_id.clone(),
        from_state: t.from.map_or(pb::ModelState::Unspecified, state_to_pb) as i32,
        to_state: t.to.map_or(pb::ModelState::Unspecified, state_to_pb) as i32,
        stage: t.stage.map_or(pb::LifecycleStage::Unspecified, stage_to_pb) as i32,
        time: Some(timestamp(
            std::time::UNIX_EPOCH + Duration::from_millis(millis),
        )),
        progress: t.progress,
        reason: t.reason.clone(),
        failure: t.failure.as_ref().map(failure_to_pb),
    }
}

fn watch_response(t: &Transition) -> pb::WatchResponse {
    let kind = match t.kind {
        EventKind::Transition => pb::WatchEventKind::Transition,
        EventKind::Registered => pb::WatchEventKind::Registered,
        EventKind::Deleted => pb::WatchEventKind::Deleted,
        EventKind::Evicted => pb::WatchEventKind::Evicted,
    };
    pb::WatchResponse {
        kind: kind as i32,
        transition: Some(transition_to_pb(t)),
        revision: t.revision,
    }
}

/// Sends every stored event after `*last` that matches `model`, page by page,
/// advancing `*last`. False when the watcher is gone or must resync.
async fn catch_up(
    lifecycle: &Lifecycle,
    model: Option<&str>,
    last: &mut u64,
    tx: &mpsc::Sender<Result<pb::WatchResponse, Status>>,
) -> bool {
    loop {
        let page = match lifecycle.events_after(*last, WATCH_PAGE) {
            Ok(Ok(page)) => page,
            Ok(Err(Compacted { requested, oldest })) => {
                let _ = tx
                    .send(Err(Error::WatchCompacted { requested, oldest }.into()))
                    .await;
                return false;
            }
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return false;
            }
        };
        let Some(newest) = page.last().map(|t| t.revision) else {
            return true;
        };
        for t in page
            .iter()
            .filter(|t| model.is_none_or(|m| t.model_id == m))
        {
            if tx.send(Ok(watch_response(t))).await.is_err() {
                return false;
            }
        }
        *last = newest;
    }
}

/// Longest grace an Unload may ask for.
const UNLOAD_GRACE_MAX: Duration = Duration::from_secs(600);
/// Grace when an Unload does not say.
const UNLOAD_GRACE_DEFAULT: Duration = Duration::from_secs(30);

pub struct LifecycleApi {
    agent: Arc<Agent>,
    /// Load calls waiting on each model: the last one to leave cancels the download.
    waiters: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl LifecycleApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        LifecycleApi {
            agent,
            waiters: Arc::default(),
        }
    }
}

/// Counts a Load waiting on a model; dropping it says whether it was the last.
struct Waiter {
    waiters: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    model_id: String,
    /// Already counted out by `leave`.
    left: bool,
}

impl Waiter {
    fn join(
        waiters: &Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
        model_id: &str,
    ) -> Waiter {
        let mut map = waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry(model_id.to_owned()).or_default() += 1;
        Waiter {
            waiters: waiters.clone(),
            model_id: model_id.to_owned(),
            left: false,
        }
    }

    /// Leaves; true when nobody else waits for this model.
    fn leave(mut self) -> bool {
        self.left = true;
        let mut map = self
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get_mut(&self.model_id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                map.remove(&self.model_id);
                true
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        let mut map = self
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.model_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.model_id);
            }
        }
    }
}

fn load_request(options: Option<pb::LoadOptions>) -> Result<LoadRequest> {
    let o = options.unwrap_or_default();
    let runtime = match pb::Runtime::try_from(o.runtime) {
        Ok(pb::Runtime::Unspecified) => None,
        Ok(r) => Some(
            Runtime::try_from(r)
                .map_err(|_| Error::invalid("options.runtime", "unknown runtime"))?,
        ),
        Err(_) => {
            return Err(Error::invalid(
                "options.runtime",
                format!("unknown enum value {}", o.runtime),
            ));
        }
    };
    let gpu_layers = match o.gpu_layers {
        -1 => u32::MAX,
        n if n < -1 => {
            return Err(Error::invalid(
                "options.gpu_layers",
                format!("{n}: use -1 for all layers, 0 for none"),
            ));
        }
        n => n.unsigned_abs(),
    };
    const PARALLEL_MAX: u32 = 64;
    if o.max_concurrent_requests > PARALLEL_MAX {
        return Err(Error::invalid(
            "options.max_concurrent_requests",
            format!("{}; the limit is {PARALLEL_MAX}", o.max_concurrent_requests),
        ));
    }
    let keep_alive = match o.keep_alive {
        None => None,
        Some(d) if d.seconds < 0 || d.nanos < 0 => Some(KeepAlive::Forever),
        Some(d) if d.seconds == 0 && d.nanos == 0 => Some(KeepAlive::UntilIdle),
        Some(d) => Some(KeepAlive::For(Duration::new(
            d.seconds.unsigned_abs(),
            d.nanos.unsigned_abs(),
        ))),
    };
    let optimization_level = match o.optimization_level {
        None => None,
        Some(level @ 0..=3) => Some(level as u8),
        Some(_) => {
            return Err(Error::invalid(
                "options.optimization_level",
                "must be 0 (off), 1 (basic), 2 (extended) or 3 (all)",
            ));
        }
    };
    Ok(LoadRequest {
        pin: o.pin,
        keep_alive,
        runtime,
        options: LoadOptions {
            context_length: o.context_length,
            parallel: o.max_concurrent_requests,
            threads: o.threads,
            batch_size: o.batch_size,
            gpu_layers,
            use_mmap: o.use_mmap.unwrap_or(true),
            use_mlock: o.use_mlock,
            execution_providers: o.execution_providers,
            optimization_level,
        },
    })
}

pub fn loaded_to_pb(w: &ModelWorker) -> pb::LoadedModel {
    pb::LoadedModel {
        model_id: w.model_id.clone(),
        runtime: pb::Runtime::from(w.runtime) as i32,
        accelerator: pb::Accelerator::Cpu as i32,
        estimated_memory_bytes: w.estimate.total(),
        actual_memory_bytes: w.info.memory_bytes,
        in_flight_requests: u32::try_from(w.in_flight()).unwrap_or(u32::MAX),
        last_used_time: Some(timestamp(w.last_used())),
        expire_time: if w.pinned {
            None
        } else {
            w.keep_alive.expires(w.last_used()).map(timestamp)
        },
        pinned: w.pinned,
        context_length: w.info.context_length,
        load_time: Some(timestamp(w.loaded_at)),
    }
}

fn update_to_pb(u: &LoadUpdate) -> pb::LoadResponse {
    pb::LoadResponse {
        progress: Some(pb::LoadProgress {
            state: state_to_pb(u.state) as i32,
            stage: stage_to_pb(u.stage) as i32,
            stage_progress: u.stage_progress,
            overall_progress: u.overall_progress,
            message: u.message.clone(),
            eta_seconds: u.eta_seconds.unwrap_or(-1.0),
        }),
        loaded: None,
    }
}

#[tonic::async_trait]
impl pb::lifecycle_server::Lifecycle for LifecycleApi {
    type LoadStream = Boxed<pb::LoadResponse>;
    type WatchStream = Boxed<pb::WatchResponse>;

    async fn load(
        &self,
        request: Request<pb::LoadRequest>,
    ) -> Result<Response<Self::LoadStream>, Status> {
        let deadline = super::generate::deadline(&request);
        let r = request.into_inner();
        spec::validate_id("model_id", &r.model_id)?;
        let load = load_request(r.options)?;
        let entry = self.agent.registry.get(&r.model_id)?;
        let agent = self.agent.clone();
        let (tx, rx) = mpsc::channel(16);
        let waiter = Waiter::join(&self.waiters, &r.model_id);
        let model_id = r.model_id.clone();
        // The load itself runs in its own task to its end, whoever waits: dropping it
        // half-way would leave a transition half-made.
        let (updates, mut reports) = mpsc::channel::<LoadUpdate>(16);
        let mut work = {
            let agent = agent.clone();
            tokio::spawn(async move { load::drive(&agent, &entry, load, &updates).await })
        };
        tokio::spawn(async move {
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut work => break Some(outcome),
                    Some(u) = reports.recv() => {
                        let _ = tx.send(Ok(update_to_pb(&u))).await;
                    }
                    () = &mut expired => {
                        let _ = tx.send(Err(Status::deadline_exceeded(
                            "the Load's deadline passed",
                        ))).await;
                        break None;
                    }
                    () = tx.closed() => break None,
                }
            };
            let Some(outcome) = outcome else {
                // The client left or its deadline passed. When nobody else waits for
                // this model, stop the download it needed; a load already in the
                // engine finishes (llama.cpp cannot be interrupted mid-load).
                if waiter.leave() {
                    for t in agent.storage.list_transfers() {
                        if t.model_id == model_id && !t.stage.is_final() {
                            tracing::info!(model = %model_id, transfer = %t.id, "no Load waits any more: cancelling the download");
                            let _ = agent.storage.cancel(&t.id).await;
                        }
                    }
                }
                return;
            };
            drop(waiter);
            while let Ok(u) = reports.try_recv() {
                let _ = tx.send(Ok(update_to_pb(&u))).await;
            }
            let message = match outcome {
                Ok(Ok(worker)) => Ok(pb::LoadResponse {
                    progress: Some(pb::LoadProgress {
                        state: pb::ModelState::Ready as i32,
                        stage: pb::LifecycleStage::Load as i32,
                        stage_progress: 1.0,
                        overall_progress: 1.0,
                        message: "ready".into(),
                        eta_seconds: 0.0,
                    }),
                    loaded: Some(loaded_to_pb(&worker)),
                }),
                Ok(Err(e)) => Err(Status::from(e)),
                Err(e) => Err(Status::from(Error::from(e))),
            };
            let _ = tx.send(message).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn unload(
        &self,
        request: Request<pb::UnloadRequest>,
    ) -> Result<Response<pb::UnloadResponse>, Status> {
        let r = request.into_inner();
        spec::validate_id("model_id", &r.model_id)?;
        let grace = match r.grace {
            None => UNLOAD_GRACE_DEFAULT,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Error::invalid("grace", "must not be negative").into());
            }
            Some(d) => Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs())
                .min(UNLOAD_GRACE_MAX),
        };
        self.agent.registry.get(&r.model_id)?;
        let cancelled = self.agent.inference.unload(&r.model_id, grace).await?;
        Ok(Response::new(pb::UnloadResponse {
            state: state_to_pb(ModelState::Downloaded) as i32,
            cancelled_requests: u32::try_from(cancelled).unwrap_or(u32::MAX),
        }))
    }

    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        let r = request.into_inner();
        spec::validate_id("model_id", &r.model_id)?;
        self.agent.registry.get(&r.model_id)?;
        let limit = match r.history_limit {
            0 => HISTORY_DEFAULT,
            n if n < 0 => {
                return Err(Error::invalid("history_limit", "must not be negative").into());
            }
            n => usize::try_from(n).unwrap_or(HISTORY_MAX).min(HISTORY_MAX),
        };
        let lifecycle = self.agent.registry.lifecycle();
        let current = lifecycle.current(&r.model_id)?;
        let history = lifecycle.history(&r.model_id, limit)?;
        let in_flight = self
            .agent
            .inference
            .ready(&r.model_id)
            .map_or(0, |w| w.in_flight());
        Ok(Response::new(pb::GetStateResponse {
            state: state_to_pb(current.state) as i32,
            failure: current.failure.as_ref().map(failure_to_pb),
            history: history.iter().map(transition_to_pb).collect(),
            in_flight_requests: u32::try_from(in_flight).unwrap_or(u32::MAX),
        }))
    }

    async fn list_loaded(
        &self,
        _: Request<pb::ListLoadedRequest>,
    ) -> Result<Response<pb::ListLoadedResponse>, Status> {
        let models: Vec<pb::LoadedModel> = self
            .agent
            .inference
            .loaded()
            .iter()
            .map(|w| loaded_to_pb(w))
            .collect();
        let used = models.iter().map(|m| m.actual_memory_bytes).sum();
        Ok(Response::new(pb::ListLoadedResponse {
            models,
            memory_budget_bytes: self.agent.inference.budget(),
            memory_used_bytes: used,
        }))
    }

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = request.into_inner();
        let model = if r.model_id.is_empty() {
            None
        } else {
            spec::validate_id("model_id", &r.model_id)?;
            Some(r.model_id)
        };
        let lifecycle = self.agent.registry.lifecycle().clone();
        // Subscribe before reading the store, so no event falls between the two.
        let mut live = lifecycle.subscribe();
        let mut last = match r.since_revision {
            0 => lifecycle.last_revision()?,
            n => n,
        };
        let newest = lifecycle.last_revision()?;
        if last > newest {
            return Err(Error::invalid(
                "since_revision",
                format!("{last} is ahead of the newest revision {newest}"),
            )
            .into());
        }
        let mut shutdown = self.agent.shutdown.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let model = model.as_deref();
            if !catch_up(&lifecycle, model, &mut last, &tx).await {
                return;
            }
            loop {
                tokio::select! {
                    event = live.recv() => match event {
                        Ok(t) if t.revision <= last => {}
                        Ok(t) if t.revision == last + 1 => {
                            last = t.revision;
                            if model.is_none_or(|m| t.model_id == m)
                                && tx.send(Ok(watch_response(&t))).await.is_err()
                            {
                                return;
                            }
                        }
                        // A gap, or this watcher fell behind the live buffer: the store
                        // has every event it missed (or says it must resync).
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            if !catch_up(&lifecycle, model, &mut last, &tx).await {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                        let _ = tx.send(Err(Error::ShuttingDown.into())).await;
                        return;
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
