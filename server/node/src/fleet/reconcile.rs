//! The reconcile loop. One task owns the decisions; each model's work (register, pull,
//! load, release) runs in a task of its own, at most one per model, so a slow download
//! never holds up a load of another model.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{Assignment, Assignments, ModelReport, Report, Wanted};
use crate::error::{Error, Result};
use crate::load::{LoadEvent, Loads};
use crate::model::ModelState;
use crate::node::Node;
use crate::registry::Origin;
use crate::store::FleetModelRecord;

/// Grace for requests in flight when the fleet unloads a model.
const UNLOAD_GRACE: Duration = Duration::from_secs(10);
/// How often a pass runs while work is in flight (download progress is reported at
/// this pace), and while idle.
const BUSY_TICK: Duration = Duration::from_secs(1);
const IDLE_TICK: Duration = Duration::from_secs(10);
/// Reason of a crash loop: only an operator's Load takes a model out of it, never the
/// fleet, which would otherwise restart a crashing engine forever.
const CRASH_LOOP: &str = "ENGINE_CRASH_LOOP";

/// The handle the edge holds: it hands over new assignments and reads reports.
#[derive(Debug, Clone)]
pub struct Reconciler {
    desired: watch::Sender<Assignments>,
    reports: watch::Receiver<Report>,
}

impl Reconciler {
    /// Replaces the assignments; the loop acts on them at once.
    pub fn assign(&self, assignments: Assignments) {
        self.desired.send_replace(assignments);
    }

    pub fn generation(&self) -> u64 {
        self.desired.borrow().generation
    }

    /// The node's report, updated whenever it changes.
    pub fn reports(&self) -> watch::Receiver<Report> {
        self.reports.clone()
    }
}

/// Why a model's last attempt failed, and when to try again.
struct Failure {
    error: String,
    retry_at: Instant,
    backoff: backon::ExponentialBackoff,
}

/// What one model's task set out to do.
enum Work {
    Converge,
    Release,
}

/// Starts the loop with the assignments the node kept; it runs until `shutdown`.
pub fn spawn(
    node: Arc<Node>,
    loads: Loads,
    initial: Assignments,
    shutdown: watch::Receiver<bool>,
) -> Reconciler {
    let (desired, desired_rx) = watch::channel(initial);
    let (report_tx, reports) = watch::channel(Report::default());
    tokio::spawn(run(node, loads, desired_rx, report_tx, shutdown));
    Reconciler { desired, reports }
}

async fn run(
    node: Arc<Node>,
    loads: Loads,
    mut desired: watch::Receiver<Assignments>,
    reports: watch::Sender<Report>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut events = node.registry.lifecycle().subscribe();
    let mut tasks: JoinSet<(String, Work, Result<()>)> = JoinSet::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut failures: HashMap<String, Failure> = HashMap::new();
    loop {
        let wanted = desired.borrow_and_update().clone();
        pass(
            &node,
            &loads,
            &wanted,
            &mut tasks,
            &mut in_flight,
            &failures,
        );
        let report = report(&node, &wanted, &failures);
        reports.send_if_modified(|current| {
            let changed = *current != report;
            if changed {
                *current = report;
            }
            changed
        });
        let tick = if in_flight.is_empty() {
            IDLE_TICK
        } else {
            BUSY_TICK
        };
        tokio::select! {
            changed = desired.changed() => {
                if changed.is_err() {
                    return;
                }
                // New assignments deserve a fresh attempt at everything.
                failures.clear();
            }
            Some(joined) = tasks.join_next() => {
                let Ok((id, work, outcome)) = joined else { continue };
                in_flight.remove(&id);
                match outcome {
                    Ok(()) => {
                        failures.remove(&id);
                    }
                    Err(e) => {
                        let what = match work {
                            Work::Converge => "converging",
                            Work::Release => "releasing",
                        };
                        tracing::warn!(model = %id, error = %e, "fleet: {what} the model failed");
                        record_failure(&mut failures, &id, e.to_string());
                    }
                }
            }
            // Any transition may undo a converged model (an eviction, a crash, an
            // operator's unload): look again.
            _ = events.recv() => {}
            () = tokio::time::sleep(tick) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

fn record_failure(failures: &mut HashMap<String, Failure>, id: &str, error: String) {
    let entry = failures.entry(id.to_owned()).or_insert_with(|| Failure {
        error: String::new(),
        retry_at: Instant::now(),
        backoff: ExponentialBuilder::default()
            .with_min_delay(Duration::from_secs(1))
            .with_factor(2.0)
            .with_max_delay(Duration::from_secs(300))
            .without_max_times()
            .build(),
    });
    let delay = entry.backoff.next().unwrap_or(Duration::from_secs(300));
    entry.error = error;
    entry.retry_at = Instant::now() + delay;
}

/// Starts the work each model needs, skipping models already being worked on or
/// waiting out a failure.
fn pass(
    node: &Arc<Node>,
    loads: &Loads,
    wanted: &Assignments,
    tasks: &mut JoinSet<(String, Work, Result<()>)>,
    in_flight: &mut HashSet<String>,
    failures: &HashMap<String, Failure>,
) {
    // Read once per pass: every assignment and every release below consults it.
    let owned = match node.store.fleet_models() {
        Ok(owned) => owned,
        Err(e) => {
            tracing::warn!(error = %e, "fleet: the models placed by the fleet could not be read");
            return;
        }
    };
    let now = Instant::now();
    let waiting = |id: &str| failures.get(id).is_some_and(|f| f.retry_at > now);
    for a in &wanted.items {
        let id = a.spec.id.clone();
        let claimed = owned.iter().any(|(m, _)| *m == id);
        if in_flight.contains(&id)
            || waiting(&id)
            || (claimed && converged(node, a))
            || crash_looping(node, &id)
        {
            continue;
        }
        in_flight.insert(id.clone());
        let (node, loads, a) = (node.clone(), loads.clone(), a.clone());
        tasks.spawn(async move {
            let outcome = converge(&node, &loads, &a).await;
            (id, Work::Converge, outcome)
        });
    }
    for (id, record) in owned {
        let assigned = wanted.items.iter().any(|a| a.spec.id == id);
        if assigned || in_flight.contains(&id) || waiting(&id) {
            continue;
        }
        in_flight.insert(id.clone());
        let node = node.clone();
        tasks.spawn(async move {
            let outcome = release(&node, &id, &record).await;
            (id, Work::Release, outcome)
        });
    }
}

/// True when the node already holds the model, which the fleet claimed, as assigned.
fn converged(node: &Node, a: &Assignment) -> bool {
    let id = &a.spec.id;
    let Ok(entry) = node.registry.get(id) else {
        return false;
    };
    if entry.spec != a.spec {
        return false;
    }
    match a.wanted {
        Wanted::Stored => {
            entry.local_path.is_some() || node.storage.is_stored(&entry.spec).unwrap_or(false)
        }
        Wanted::Loaded => node.inference.ready(id).is_ok(),
        Wanted::Pinned => node
            .inference
            .resident()
            .iter()
            .any(|r| r.model_id == *id && r.pinned),
    }
}

fn crash_looping(node: &Node, id: &str) -> bool {
    node.registry
        .lifecycle()
        .current(id)
        .is_ok_and(|c| c.failure.is_some_and(|f| f.reason == CRASH_LOOP))
}

/// Takes the next steps towards `a`: the spec registered (replacing a different one),
/// the model claimed for the fleet, then stored or loaded as wanted.
async fn converge(node: &Arc<Node>, loads: &Loads, a: &Assignment) -> Result<()> {
    let id = &a.spec.id;
    let source = format!("fleet deployment {}", a.deployment);
    match node.registry.get(id) {
        Ok(entry) if entry.spec == a.spec => {}
        Ok(_) => {
            // A different model under this id (a new revision, or one put here by
            // hand that the deployment now claims): the deployment's spec wins.
            if node.inference.ready(id).is_ok() {
                node.inference.unload(id, UNLOAD_GRACE).await?;
            }
            cancel_transfers(node, id).await;
            node.delete_model(id).await?;
            node.registry
                .register(a.spec.clone(), Origin::Registered, &source)
                .await?;
        }
        Err(Error::ModelNotFound { .. }) => {
            node.registry
                .register(a.spec.clone(), Origin::Registered, &source)
                .await?;
        }
        Err(e) => return Err(e),
    }
    node.store.put_fleet_model(
        id,
        &FleetModelRecord {
            deployment: a.deployment.clone(),
            prune: a.prune,
        },
    )?;
    node.store.flush().await?;
    match a.wanted {
        Wanted::Stored => {
            let entry = node.registry.get(id)?;
            if entry.local_path.is_none() && !node.storage.is_stored(&entry.spec)? {
                let (progress, _started) = node.storage.pull(&entry.spec).await?;
                wait_for_transfer(progress).await?;
            }
            Ok(())
        }
        Wanted::Loaded | Wanted::Pinned => {
            let pin = a.wanted == Wanted::Pinned;
            if pin && node.inference.ready(id).is_ok() {
                // Loaded without the pin (by hand, or as LOADED before): load it again
                // pinned, so a restart brings it back too.
                node.inference.unload(id, UNLOAD_GRACE).await?;
            }
            let mut request = a.load.clone();
            request.pin = pin;
            // The fleet wants it loaded until the assignment changes: an idle timeout
            // would only unload it for the next pass to load it again.
            request
                .keep_alive
                .get_or_insert(crate::memory::KeepAlive::Forever);
            let mut events = loads.start(node.clone(), id, request, None)?;
            while let Some(event) = events.recv().await {
                match event? {
                    LoadEvent::Loaded(_) => return Ok(()),
                    LoadEvent::Progress(_) => {}
                }
            }
            Err(Error::TaskFailed(
                "the load ended without an outcome".into(),
            ))
        }
    }
}

async fn wait_for_transfer(
    mut progress: watch::Receiver<crate::storage::progress::TransferProgress>,
) -> Result<()> {
    loop {
        {
            let now = progress.borrow_and_update();
            if now.stage.is_final() {
                return match &now.error {
                    Some(error) => Err(Error::Shared(error.clone())),
                    None => Ok(()),
                };
            }
        }
        if progress.changed().await.is_err() {
            return Err(Error::TaskFailed(
                "the transfer ended without a final report".into(),
            ));
        }
    }
}

async fn cancel_transfers(node: &Node, id: &str) {
    for t in node.storage.list_transfers() {
        if t.model_id == id && !t.stage.is_final() {
            let _ = node.storage.cancel(&t.id).await;
        }
    }
}

/// A model the fleet placed and no assignment names any more: unloaded, and deleted
/// with its files when its deployment prunes. Either way the fleet lets go of it.
async fn release(node: &Node, id: &str, record: &FleetModelRecord) -> Result<()> {
    if node.inference.ready(id).is_ok() {
        node.inference.unload(id, UNLOAD_GRACE).await?;
    }
    if record.prune {
        cancel_transfers(node, id).await;
        match node.delete_model(id).await {
            Ok(()) | Err(Error::ModelNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    node.store.delete_fleet_model(id)?;
    node.store.flush().await?;
    tracing::info!(model = id, pruned = record.prune, "fleet: model released");
    Ok(())
}

/// What the node holds: every assigned or fleet-placed model, and every model that
/// is more than registered (stored, loading, loaded, failed).
fn report(node: &Node, wanted: &Assignments, failures: &HashMap<String, Failure>) -> Report {
    let owned: HashMap<String, FleetModelRecord> = node
        .store
        .fleet_models()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut ids: Vec<String> = wanted.items.iter().map(|a| a.spec.id.clone()).collect();
    ids.extend(owned.keys().cloned());
    let lifecycle = node.registry.lifecycle();
    if let Ok(all) = node.store.lifecycles() {
        ids.extend(
            all.into_iter()
                .filter(|(_, r)| r.state != ModelState::Registered.as_str())
                .map(|(id, _)| id),
        );
    }
    ids.sort();
    ids.dedup();
    let transfers = node.storage.list_transfers();
    let resident = node.inference.resident();
    let models = ids
        .into_iter()
        .map(|id| {
            let deployment = wanted
                .items
                .iter()
                .find(|a| a.spec.id == id)
                .map(|a| a.deployment.clone())
                .or_else(|| owned.get(&id).map(|r| r.deployment.clone()))
                .unwrap_or_default();
            let transfer = transfers
                .iter()
                .find(|t| t.model_id == id && !t.stage.is_final());
            let current = lifecycle.current(&id).ok();
            let error = failures
                .get(&id)
                .map(|f| f.error.clone())
                .or_else(|| {
                    current
                        .as_ref()
                        .and_then(|c| c.failure.as_ref())
                        .map(|f| f.message.clone())
                })
                .unwrap_or_default();
            ModelReport {
                state: current.map_or(ModelState::Registered, |c| c.state),
                deployment,
                bytes_done: transfer.map_or(0, |t| t.bytes_done()),
                bytes_total: transfer.map_or(0, |t| t.bytes_total()),
                error,
                memory_bytes: resident
                    .iter()
                    .find(|r| r.model_id == id)
                    .map_or(0, |r| r.bytes),
                model_id: id,
            }
        })
        .collect();
    Report {
        models,
        applied_generation: wanted.generation,
        disk_free_bytes: node.hardware.disk().free_bytes,
    }
}
