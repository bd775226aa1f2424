//! Lifecycle service: Load drives a model to READY from wherever it is (pulling it
//! first when needed) with one progress stream, Unload frees it, GetState and
//! ListLoaded report, Watch follows every transition and resumes by revision.

use std::sync::Arc;

use modeld_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::validate;
use super::{Agent, Boxed};
use crate::api::convert::{self, state_to_pb};
use modeld_node::error::{Error, Result};
use modeld_node::lifecycle::{Compacted, Lifecycle};
use modeld_node::load::LoadEvent;
use modeld_node::model::ModelState;
use modeld_node::registry::spec;

/// Events read from the store per page while a watcher catches up.
const WATCH_PAGE: usize = 512;

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
                    .send(Err(super::status::of(&Error::WatchCompacted {
                        requested,
                        oldest,
                    })))
                    .await;
                return false;
            }
            Err(e) => {
                let _ = tx.send(Err(super::status::of(&e))).await;
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
            if tx.send(Ok(convert::watch_response(t))).await.is_err() {
                return false;
            }
        }
        *last = newest;
    }
}

pub struct LifecycleApi {
    agent: Arc<Agent>,
}

impl LifecycleApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        LifecycleApi { agent }
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
        super::status::rpc(async move {
            let deadline = super::layers::deadline(&request);
            let r = request.into_inner();
            spec::validate_id("model_id", &r.model_id)?;
            let load = validate::load_request(r.options)?;
            let node = self.agent.node.clone();
            let events = self.agent.loads.start(node, &r.model_id, load, deadline)?;
            // The last message says READY with the loaded model; the lifecycle's own
            // READY update before it would say it twice.
            let stream = ReceiverStream::new(events)
                .filter(|event| {
                    !matches!(event, Ok(LoadEvent::Progress(u)) if u.state == ModelState::Ready)
                })
                .map(|event| match event {
                Ok(LoadEvent::Progress(u)) => Ok(convert::update_to_pb(&u)),
                Ok(LoadEvent::Loaded(worker)) => Ok(pb::LoadResponse {
                    progress: Some(pb::LoadProgress {
                        state: pb::ModelState::Ready as i32,
                        stage: pb::LifecycleStage::Load as i32,
                        stage_progress: 1.0,
                        overall_progress: 1.0,
                        message: "ready".into(),
                        eta_seconds: 0.0,
                    }),
                    loaded: Some(convert::loaded_to_pb(&worker)),
                }),
                Err(e) => Err(super::status::of(&e)),
            });
            Ok(Response::new(Box::pin(stream) as Boxed<_>))
        })
        .await
    }

    async fn unload(
        &self,
        request: Request<pb::UnloadRequest>,
    ) -> Result<Response<pb::UnloadResponse>, Status> {
        super::status::rpc(async move {
            let r = request.into_inner();
            spec::validate_id("model_id", &r.model_id)?;
            let grace = validate::unload_grace(r.grace)?;
            self.agent.node.registry.get(&r.model_id)?;
            let cancelled = self.agent.node.inference.unload(&r.model_id, grace).await?;
            Ok(Response::new(pb::UnloadResponse {
                state: state_to_pb(ModelState::Downloaded) as i32,
                cancelled_requests: u32::try_from(cancelled).unwrap_or(u32::MAX),
            }))
        })
        .await
    }

    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        super::status::rpc(async move {
            let r = request.into_inner();
            spec::validate_id("model_id", &r.model_id)?;
            self.agent.node.registry.get(&r.model_id)?;
            let limit = validate::history_limit(r.history_limit)?;
            let lifecycle = self.agent.node.registry.lifecycle();
            let current = lifecycle.current(&r.model_id)?;
            let history = lifecycle.history(&r.model_id, limit)?;
            let in_flight = self
                .agent
                .node
                .inference
                .ready(&r.model_id)
                .map_or(0, |w| w.in_flight());
            Ok(Response::new(pb::GetStateResponse {
                state: state_to_pb(current.state) as i32,
                failure: current.failure.as_ref().map(convert::failure_to_pb),
                history: history.iter().map(convert::transition_to_pb).collect(),
                in_flight_requests: u32::try_from(in_flight).unwrap_or(u32::MAX),
            }))
        })
        .await
    }

    async fn list_loaded(
        &self,
        _: Request<pb::ListLoadedRequest>,
    ) -> Result<Response<pb::ListLoadedResponse>, Status> {
        super::status::rpc(async move {
            let inference = self.agent.node.inference.clone();
            let metrics = self.agent.metrics.clone();
            // Reading each engine process's memory is file I/O.
            let models: Vec<pb::LoadedModel> = tokio::task::spawn_blocking(move || {
                inference
                    .loaded()
                    .iter()
                    .map(|w| {
                        let mut m = convert::loaded_to_pb(w);
                        m.recent = Some(convert::recent_to_pb(&metrics.recent(&w.model_id())));
                        m
                    })
                    .collect()
            })
            .await
            .map_err(|e| modeld_node::error::Error::TaskFailed(e.to_string()))?;
            let used = models
                .iter()
                .map(|m| {
                    if m.proportional_memory_bytes > 0 {
                        m.proportional_memory_bytes
                    } else {
                        m.actual_memory_bytes
                    }
                })
                .sum();
            Ok(Response::new(pb::ListLoadedResponse {
                models,
                memory_budget_bytes: self.agent.node.inference.budget(),
                memory_used_bytes: used,
            }))
        })
        .await
    }

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        super::status::rpc(async move {
            let r = request.into_inner();
            let model = if r.model_id.is_empty() {
                None
            } else {
                spec::validate_id("model_id", &r.model_id)?;
                Some(r.model_id)
            };
            let lifecycle = self.agent.node.registry.lifecycle().clone();
            // Subscribe before reading the store, so no event falls between the two.
            let mut live = lifecycle.subscribe();
            let mut progress = lifecycle.subscribe_progress();
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
                                    && tx.send(Ok(convert::watch_response(&t))).await.is_err()
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
                        // Progress is live only: one missed is replaced by the next.
                        report = progress.recv() => match report {
                            Ok(p) => {
                                if model.is_none_or(|m| p.model_id == m)
                                    && tx.send(Ok(convert::progress_response(&p))).await.is_err()
                                {
                                    return;
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        },
                        () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                            let _ = tx.send(Err(super::status::of(&Error::ShuttingDown))).await;
                            return;
                        }
                        () = tx.closed() => return,
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as Boxed<_>))
        })
        .await
    }
}
