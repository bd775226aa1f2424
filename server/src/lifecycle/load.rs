//! Load: the one call that drives a model to READY from wherever it is — pulling it
//! (or joining the pull already running), validating, initializing and loading — while
//! streaming one unified progress across the stages.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{ModelState, Stage};
use crate::agent::Agent;
use crate::error::{Error, Result};
use crate::inference::{LoadRequest, ModelWorker};
use crate::registry::ModelEntry;

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
            Stage::Load | Stage::Unload => after_download(0.2 + 0.8 * within),
        }
    }
}

/// Drives `entry` to READY, reporting progress on `updates` (dropped reports are
/// fine: a client that left does not stop a load another client may join).
pub async fn drive(
    agent: &Agent,
    entry: &ModelEntry,
    request: LoadRequest,
    updates: &mpsc::Sender<LoadUpdate>,
) -> Result<Arc<ModelWorker>> {
    let id = &entry.spec.id;
    if let Ok(worker) = agent.inference.ready(id) {
        return Ok(worker);
    }
    let stored = entry.local_path.is_some() || agent.storage.is_stored(&entry.spec)?;
    let plan = Plan {
        downloading: !stored,
    };
    if !stored {
        pull(agent, entry, &plan, updates).await?;
    }
    let _ = updates
        .send(LoadUpdate {
            state: ModelState::Validating,
            stage: Stage::Validate,
            stage_progress: 0.0,
            overall_progress: plan.overall(Stage::Validate, 0.0),
            message: "checking the model's files".into(),
            eta_seconds: agent.inference.load_eta(entry),
        })
        .await;
    // Forward the lifecycle's own transitions for this model as they happen.
    let mut events = agent.registry.lifecycle().subscribe();
    let forward = {
        let updates = updates.clone();
        let id = id.clone();
        let eta = agent.inference.load_eta(entry);
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
    let load = agent.inference.load(entry, &agent.storage, request);
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
    agent: &Agent,
    entry: &ModelEntry,
    plan: &Plan,
    updates: &mpsc::Sender<LoadUpdate>,
) -> Result<()> {
    let (mut rx, _started) = agent.storage.pull(&entry.spec).await?;
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
