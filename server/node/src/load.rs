//! Load: the one call that drives a model to READY from wherever it is, read top to
//! bottom here.
//!
//! 1. `Loads::start`: a caller joins the waiters of the model and gets a stream of
//!    events; the load itself runs in a task of its own, to its end, whoever waits:
//!    dropping it half-way would leave a transition half-made.
//! 2. The caller's side ends when the load does, when the caller leaves, or when its
//!    deadline passes. The last waiter to leave cancels the download the load needed;
//!    a load already in the engine finishes (llama.cpp cannot be interrupted mid-load).
//! 3. `drive`: already READY is done; otherwise pull (or join the pull already
//!    running), then validate, admit into the memory budget, initialize and load
//!    through `Inference::load`, which records every transition; the lifecycle's own
//!    events are forwarded as progress, with one overall figure across the stages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::error::{Error, Result};
use crate::inference::{LoadRequest, ModelWorker};
use crate::model::{ModelState, Stage};
use crate::node::Node;
use crate::registry::ModelEntry;

/// What a caller of a Load sees: progress, then the loaded model (or an error).
#[derive(Debug)]
pub enum LoadEvent {
    Progress(LoadUpdate),
    Loaded(Arc<ModelWorker>),
}

/// The Loads in progress and who waits for each. Clones share the waiters, so every
/// caller (the API, the fleet reconciler) counts in the same place.
#[derive(Debug, Default, Clone)]
pub struct Loads {
    /// Callers waiting on each model: the last one to leave cancels the download.
    waiters: Arc<Mutex<HashMap<String, usize>>>,
}

impl Loads {
    /// Starts (or joins) the load of model `id` on `node`. Events end with
    /// `Loaded` or an error: the load's own, or `DeadlineExceeded` once `deadline`
    /// passes. Dropping the receiver leaves the load.
    pub fn start(
        &self,
        node: Arc<Node>,
        id: &str,
        request: LoadRequest,
        deadline: Option<Instant>,
    ) -> Result<mpsc::Receiver<Result<LoadEvent>>> {
        let entry = node.registry.get(id)?;
        // An operator's Load is the action a crash-looping model waits for.
        node.inference.clear_crashes(id);
        let (tx, rx) = mpsc::channel(16);
        let waiter = Waiter::join(&self.waiters, id);
        let model_id = id.to_owned();
        let (updates, mut reports) = mpsc::channel::<LoadUpdate>(16);
        let mut work = {
            let node = node.clone();
            // A child of the caller's span (the Load RPC, the fleet's reconcile pass):
            // the load runs to its end even when that caller leaves.
            let span =
                tracing::info_span!("load_model", model = %id, result = tracing::field::Empty);
            tokio::spawn(
                async move {
                    let result = drive(&node, &entry, request, &updates).await;
                    let outcome = match &result {
                        Ok(_) => "ready",
                        Err(e) => e.classify().1,
                    };
                    tracing::Span::current().record("result", outcome);
                    result
                }
                .instrument(span),
            )
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
                        let _ = tx.send(Ok(LoadEvent::Progress(u))).await;
                    }
                    () = &mut expired => {
                        let _ = tx.send(Err(Error::DeadlineExceeded("the Load's deadline passed"))).await;
                        break None;
                    }
                    () = tx.closed() => break None,
                }
            };
            let Some(outcome) = outcome else {
                if waiter.leave() {
                    for t in node.storage.list_transfers() {
                        if t.model_id == model_id && !t.stage.is_final() {
                            tracing::info!(model = %model_id, transfer = %t.id, "no Load waits any more: cancelling the download");
                            let _ = node.storage.cancel(&t.id).await;
                        }
                    }
                }
                return;
            };
            drop(waiter);
            while let Ok(u) = reports.try_recv() {
                let _ = tx.send(Ok(LoadEvent::Progress(u))).await;
            }
            let last = match outcome {
                Ok(Ok(worker)) => Ok(LoadEvent::Loaded(worker)),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(Error::from(e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(rx)
    }
}

/// Counts a caller waiting on a model; dropping it says whether it was the last.
struct Waiter {
    waiters: Arc<Mutex<HashMap<String, usize>>>,
    model_id: String,
    /// Already counted out by `leave`.
    left: bool,
}

impl Waiter {
    fn join(waiters: &Arc<Mutex<HashMap<String, usize>>>, model_id: &str) -> Waiter {
        let mut map = waiters.lock().unwrap_or_else(PoisonError::into_inner);
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
        let mut map = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
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
        let mut map = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.model_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.model_id);
            }
        }
    }
}

/// Shares of the overall progress, when a download is part of the load. Without one,
/// the remaining stages scale up to fill the whole.
const DOWNLOAD_SHARE: f64 = 0.8;

/// One progress report.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadUpdate {
    pub state: ModelState,
    pub stage: Stage,
    /// 0..1 within the stage.
    pub stage_progress: f64,
    /// 0..1 across all stages this load runs.
    pub overall_progress: f64,
    pub message: String,
    /// Seconds left, from measured rates; `None` when nothing was measured yet.
    pub eta_seconds: Option<f64>,
}

/// Where each stage sits in the overall progress.
#[derive(Debug, Clone, Copy)]
struct Plan {
    downloading: bool,
}

impl Plan {
    fn overall(&self, stage: Stage, within: f64) -> f64 {
        let after_download = |share: f64| {
            if self.downloading {
                DOWNLOAD_SHARE + share * (1.0 - DOWNLOAD_SHARE)
            } else {
                share
            }
        };
        match stage {
            Stage::Download | Stage::Extract => within * DOWNLOAD_SHARE,
            Stage::Validate => after_download(0.1 * within),
            Stage::Initialize => after_download(0.1 + 0.1 * within),
            Stage::Load | Stage::Unload | Stage::Serve => after_download(0.2 + 0.8 * within),
        }
    }
}

/// Drives `entry` to READY when nobody watches (a pinned model coming back after a
/// restart or a crash). `drive` waits for room on its progress channel, so the
/// reports are read and dropped here: a channel nobody reads would hold the load
/// forever once full, and with it the model, which then could not be unloaded.
pub async fn drive_unwatched(
    node: &Node,
    entry: &ModelEntry,
    request: LoadRequest,
) -> Result<Arc<ModelWorker>> {
    let (updates, mut reports) = mpsc::channel::<LoadUpdate>(16);
    let drain = async move { while reports.recv().await.is_some() {} };
    let load = async move {
        let result = drive(node, entry, request, &updates).await;
        drop(updates);
        result
    };
    let (result, ()) = tokio::join!(load, drain);
    result
}

/// Drives `entry` to READY, reporting progress on `updates` (dropped reports are
/// fine: a client that left does not stop a load another client may join).
pub async fn drive(
    node: &Node,
    entry: &ModelEntry,
    request: LoadRequest,
    updates: &mpsc::Sender<LoadUpdate>,
) -> Result<Arc<ModelWorker>> {
    let id = &entry.spec.id;
    if let Ok(worker) = node.inference.ready(id) {
        return Ok(worker);
    }
    let stored = entry.local_path.is_some() || node.storage.is_stored(&entry.spec)?;
    let plan = Plan {
        downloading: !stored,
    };
    if !stored {
        pull(node, entry, &plan, updates).await?;
    }
    let _ = updates
        .send(LoadUpdate {
            state: ModelState::Validating,
            stage: Stage::Validate,
            stage_progress: 0.0,
            overall_progress: plan.overall(Stage::Validate, 0.0),
            message: "checking the model's files".into(),
            eta_seconds: node.inference.load_eta(entry),
        })
        .await;
    // Forward the lifecycle's own transitions for this model as they happen.
    let mut events = node.registry.lifecycle().subscribe();
    let forward = {
        let updates = updates.clone();
        let id = id.clone();
        let eta = node.inference.load_eta(entry);
        let started = Instant::now();
        async move {
            while let Ok(t) = events.recv().await {
                let (Some(to), true) = (t.to, t.model_id == id) else {
                    continue;
                };
                let Some(stage) = Stage::of(to) else { continue };
                let left = eta.map(|e| (e - started.elapsed().as_secs_f64()).max(0.0));
                let _ = updates
                    .send(LoadUpdate {
                        state: to,
                        stage,
                        stage_progress: 0.0,
                        overall_progress: plan.overall(stage, 0.0),
                        message: t.reason.clone(),
                        eta_seconds: left,
                    })
                    .await;
            }
        }
    };
    let load = node.inference.load(entry, &node.storage, request);
    tokio::pin!(load);
    tokio::pin!(forward);
    let worker = tokio::select! {
        result = &mut load => result?,
        () = &mut forward => load.await?,
    };
    let _ = updates
        .send(LoadUpdate {
            state: ModelState::Ready,
            stage: Stage::Load,
            stage_progress: 1.0,
            overall_progress: 1.0,
            message: "ready".into(),
            eta_seconds: Some(0.0),
        })
        .await;
    Ok(worker)
}

/// Pulls the model's files (joining a pull already running), reporting bytes.
async fn pull(
    node: &Node,
    entry: &ModelEntry,
    plan: &Plan,
    updates: &mpsc::Sender<LoadUpdate>,
) -> Result<()> {
    let (mut rx, _started) = node.storage.pull(&entry.spec).await?;
    loop {
        let progress = rx.borrow_and_update().clone();
        let total = progress.bytes_total().max(1);
        #[allow(clippy::cast_precision_loss)]
        let within = progress.bytes_done() as f64 / total as f64;
        let state = if matches!(progress.stage, crate::storage::progress::Stage::Extracting) {
            ModelState::Extracting
        } else {
            ModelState::Downloading
        };
        let stage = Stage::of(state).unwrap_or(Stage::Download);
        let _ = updates
            .send(LoadUpdate {
                state,
                stage,
                stage_progress: within,
                overall_progress: plan.overall(stage, within),
                message: format!(
                    "{} of {} bytes",
                    progress.bytes_done(),
                    progress.bytes_total()
                ),
                eta_seconds: progress.eta_seconds(),
            })
            .await;
        if progress.stage.is_final() {
            return match &progress.error {
                Some(error) => Err(Error::Shared(error.clone())),
                None => Ok(()),
            };
        }
        if rx.changed().await.is_err() {
            return Err(Error::TaskFailed(
                "the transfer ended without a final report".into(),
            ));
        }
        // Reports are coalesced: a client needs a few per second, not one per chunk.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
