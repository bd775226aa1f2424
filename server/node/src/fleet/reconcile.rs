//! The reconcile loop. One task owns the decisions; each model's work (register, pull,
//! load, release) runs in a task of its own, at most one per model, so a slow download
//! never holds up a load of another model.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::gates::{self, Speed};
use super::{
    Assignment, Assignments, GateReport, GateResult, GateState, ModelReport, Report,
    STANDBY_SUFFIX, SwapPolicy, Wanted, load_key, standby_id,
};
use crate::error::{Error, Result};
use crate::load::{LoadEvent, Loads};
use crate::model::ModelState;
use crate::node::Node;
use crate::registry::Origin;
use crate::store::{FleetModelRecord, GateResultRecord};

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

/// Gates being evaluated now, per model, for reports while they run.
#[derive(Clone, Default)]
struct Board(Arc<Mutex<HashMap<String, GateReport>>>);

impl Board {
    fn set(&self, id: &str, report: GateReport) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), report);
    }

    fn push(&self, id: &str, result: GateResult) {
        if let Some(r) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(id)
        {
            r.results.push(result);
        }
    }

    fn take(&self, id: &str) -> Option<GateReport> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
    }

    fn get(&self, id: &str) -> Option<GateReport> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }
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
    let board = Board::default();
    loop {
        let wanted = desired.borrow_and_update().clone();
        node.storage
            .origin_limit()
            .set_site_share(wanted.origin_bytes_per_second);
        pass(
            &node,
            &loads,
            &wanted,
            &mut tasks,
            &mut in_flight,
            &failures,
            &board,
        );
        let report = report(&node, &wanted, &failures, &board);
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
    board: &Board,
) {
    // Read once per pass: every assignment and every release below consults it.
    let owned: HashMap<String, FleetModelRecord> = match node.store.fleet_models() {
        Ok(owned) => owned.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "fleet: the models placed by the fleet could not be read");
            return;
        }
    };
    let now = Instant::now();
    let waiting = |id: &str| failures.get(id).is_some_and(|f| f.retry_at > now);
    for a in &wanted.items {
        let id = a.spec.id.clone();
        let record = owned.get(&id);
        if in_flight.contains(&id)
            || waiting(&id)
            || a.wait_for_peer
            || record.is_some_and(|r| settled(node, a, r))
            || crash_looping(node, &id)
        {
            continue;
        }
        in_flight.insert(id.clone());
        let (node, loads, a, board) = (node.clone(), loads.clone(), a.clone(), board.clone());
        tasks.spawn(async move {
            let outcome = converge(&node, &loads, &a, &board).await;
            (id, Work::Converge, outcome)
        });
    }
    for (id, record) in owned {
        let assigned = wanted.items.iter().any(|a| a.spec.id == id);
        if assigned
            || in_flight.contains(&id)
            || waiting(&id)
            || kept_standby(node, wanted, &id, in_flight)
        {
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

/// True for a standby the fleet still needs: its model is being worked on (a new
/// revision is staged there), or it holds the previous revision a rollout keeps.
fn kept_standby(node: &Node, wanted: &Assignments, id: &str, in_flight: &HashSet<String>) -> bool {
    let Some(model) = id.strip_suffix(STANDBY_SUFFIX) else {
        return false;
    };
    let Some(a) = wanted.items.iter().find(|a| a.spec.id == model) else {
        return false;
    };
    if in_flight.contains(model) {
        return true;
    }
    let Some(retain) = &a.retain else {
        return false;
    };
    node.registry
        .get(id)
        .is_ok_and(|e| e.spec.files == retain.files && e.spec.format == retain.format)
}

/// True when nothing is left to do for `a`: the model converged and its gates (if
/// any) ran for this revision, or they failed or skipped it, which only the
/// controller resolves.
fn settled(node: &Node, a: &Assignment, record: &FleetModelRecord) -> bool {
    let gated = a.gates.is_none() || record.gate_revision == a.revision;
    let stopped = record.gate_revision == a.revision
        && matches!(
            GateState::parse(&record.gate_state),
            Some(GateState::Failed | GateState::Skipped)
        );
    stopped
        || (gated
            && record.revision == a.revision
            && !options_changed(a, record)
            && converged(node, a))
}

/// True when a loaded model was loaded with other options than `a` asks for.
fn options_changed(a: &Assignment, record: &FleetModelRecord) -> bool {
    a.wanted != Wanted::Stored
        && !record.load_key.is_empty()
        && record.load_key != load_key(&a.load)
}

/// True when the node already holds the model as assigned.
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

/// Where the new revision of a model came up.
enum Staged {
    /// Loaded (or stored) under the model's own id.
    InPlace { baseline: Option<Speed> },
    /// Loaded under the standby id, while the model's id still serves the old one.
    Standby,
    /// Left on the previous revision: the node cannot hold both and may not pause.
    Skipped(String),
}

/// Takes the next steps towards `a`, then runs its gates when it brings a revision
/// that has them: register (or stage a changed spec under the standby id), pull,
/// load, gates, swap, soak. A failed gate is reported, not retried: the controller
/// decides what happens next.
async fn converge(node: &Arc<Node>, loads: &Loads, a: &Assignment, board: &Board) -> Result<()> {
    let id = a.spec.id.as_str();
    let previous = node
        .store
        .fleet_models()?
        .into_iter()
        .find(|(m, _)| m == id)
        .map(|(_, r)| r);
    let gates = a.gates.as_ref().filter(|_| {
        previous
            .as_ref()
            .is_none_or(|r| r.gate_revision != a.revision)
    });
    let mut record = previous.unwrap_or_default();
    let reload = options_changed(a, &record);
    record.deployment.clone_from(&a.deployment);
    record.prune = a.prune;
    node.store.put_fleet_model(id, &record)?;
    node.store.flush().await?;
    let Some(gates) = gates else {
        bring_up(node, loads, a, false, reload).await?;
        record.revision = a.revision;
        record.load_key = load_key(&a.load);
        node.store.put_fleet_model(id, &record)?;
        return node.store.flush().await;
    };
    board.set(
        id,
        GateReport {
            revision: a.revision,
            state: GateState::Running,
            results: Vec::new(),
        },
    );
    let verdict = run_gates(node, loads, a, gates, board, reload).await;
    let report = board.take(id).unwrap_or(GateReport {
        revision: a.revision,
        state: GateState::Failed,
        results: Vec::new(),
    });
    let state = match verdict {
        Ok(state) => state,
        Err(e) => {
            // An error on the way (a download that failed, say) is retried like any
            // other; the gates start again with the next attempt.
            return Err(e);
        }
    };
    if state == GateState::Passed {
        record.revision = a.revision;
        record.load_key = load_key(&a.load);
    }
    record.gate_revision = a.revision;
    record.gate_state = state.as_str().to_owned();
    record.gate_results = report
        .results
        .iter()
        .map(|r| GateResultRecord {
            model_id: r.model_id.clone(),
            gate: r.gate.clone(),
            passed: r.passed,
            detail: r.detail.clone(),
        })
        .collect();
    node.store.put_fleet_model(id, &record)?;
    node.store.flush().await?;
    tracing::info!(
        model = id,
        revision = a.revision,
        gates = state.as_str(),
        "fleet: gates evaluated"
    );
    Ok(())
}

/// The gates of `a`'s revision, from bringing it up to the end of the soak.
async fn run_gates(
    node: &Arc<Node>,
    loads: &Loads,
    a: &Assignment,
    gates: &super::Gates,
    board: &Board,
    reload: bool,
) -> Result<GateState> {
    let id = a.spec.id.as_str();
    let result = |gate: &str, passed: bool, detail: String| GateResult {
        model_id: id.to_owned(),
        gate: gate.to_owned(),
        passed,
        detail,
    };
    let started = Instant::now();
    let staged = match tokio::time::timeout(
        gates.ready_within,
        bring_up(node, loads, a, true, reload),
    )
    .await
    {
        Ok(staged) => staged?,
        Err(_) => {
            board.push(
                id,
                result(
                    "ready",
                    false,
                    format!("not ready within {} s", gates.ready_within.as_secs()),
                ),
            );
            release_standby_load(node, id).await;
            return Ok(GateState::Failed);
        }
    };
    if let Staged::Skipped(why) = &staged {
        board.push(id, result("memory", false, why.clone()));
        return Ok(GateState::Skipped);
    }
    board.push(
        id,
        result(
            "ready",
            true,
            format!("ready after {:.1} s", started.elapsed().as_secs_f64()),
        ),
    );
    let serving = if matches!(staged, Staged::Standby) {
        standby_id(id)
    } else {
        id.to_owned()
    };
    let mut passed = true;
    if a.wanted != Wanted::Stored {
        let worker = node.inference.ready(&serving)?;
        for test in gates
            .smoke_tests
            .iter()
            .filter(|t| t.model_id.is_empty() || t.model_id == id)
        {
            let outcome = gates::smoke(&worker, id, test).await;
            passed &= outcome.passed;
            board.push(id, outcome);
        }
        if passed && gates.max_slowdown > 0.0 {
            let baseline = match &staged {
                Staged::InPlace { baseline } => *baseline,
                _ => match node.inference.ready(id) {
                    Ok(old) => Some(gates::measure(&old).await?),
                    Err(_) => None,
                },
            };
            match baseline {
                Some(old) => {
                    let new = gates::measure(&worker).await?;
                    let outcome = gates::compare(id, old, new, gates.max_slowdown);
                    passed &= outcome.passed;
                    board.push(id, outcome);
                }
                None => board.push(
                    id,
                    result(
                        "speed",
                        true,
                        "not compared: no previous revision was loaded here".into(),
                    ),
                ),
            }
        }
    }
    if !passed {
        release_standby_load(node, id).await;
        return Ok(GateState::Failed);
    }
    if matches!(staged, Staged::Standby) {
        swap_in(node, id).await?;
    }
    if a.wanted != Wanted::Stored && !gates.soak.is_zero() {
        let outcome = soak(node, id, gates.soak, gates.max_error_rate).await;
        passed &= outcome.passed;
        board.push(id, outcome);
    }
    Ok(if passed {
        GateState::Passed
    } else {
        GateState::Failed
    })
}

/// Watches live requests on `id` for `period`: the share that failed must stay at
/// or under `max_rate`.
async fn soak(node: &Node, id: &str, period: Duration, max_rate: f64) -> GateResult {
    let gate = |passed: bool, detail: String| GateResult {
        model_id: id.to_owned(),
        gate: "soak".into(),
        passed,
        detail,
    };
    let Ok(worker) = node.inference.ready(id) else {
        return gate(false, "the model was not loaded when the soak began".into());
    };
    let (finished0, failed0) = worker.outcomes();
    tokio::time::sleep(period).await;
    if worker.failed() {
        return gate(false, "the engine failed during the soak".into());
    }
    let (finished1, failed1) = worker.outcomes();
    let (finished, failed) = (finished1 - finished0, failed1 - failed0);
    if finished == 0 {
        return gate(true, format!("no live requests in {} s", period.as_secs()));
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = failed as f64 / finished as f64;
    gate(
        rate <= max_rate,
        format!(
            "{failed} of {finished} live requests failed in {} s (at most {:.1}% may)",
            period.as_secs(),
            max_rate * 100.0
        ),
    )
}

/// Unloads a staged revision that will not be swapped in (its gates failed).
async fn release_standby_load(node: &Node, id: &str) {
    let standby = standby_id(id);
    if node.inference.ready(&standby).is_ok()
        && let Err(e) = node.inference.unload(&standby, UNLOAD_GRACE).await
    {
        tracing::warn!(model = %standby, error = %e, "fleet: the staged revision could not be unloaded");
    }
}

/// Swaps the staged revision in under the model's id and unloads the one it
/// replaces, whose files stay under the standby id (until nothing retains them).
async fn swap_in(node: &Node, id: &str) -> Result<()> {
    let standby = standby_id(id);
    node.exchange(id, &standby).await?;
    if node.inference.ready(&standby).is_ok() {
        node.inference.unload(&standby, UNLOAD_GRACE).await?;
    }
    tracing::info!(model = id, "fleet: new revision swapped in");
    Ok(())
}

/// Registers `spec` under `id`, replacing a different model held there (unloaded and
/// deleted first).
async fn register_as(
    node: &Node,
    spec: &crate::registry::spec::ModelSpec,
    id: &str,
    source: &str,
) -> Result<()> {
    let mut spec = spec.clone();
    id.clone_into(&mut spec.id);
    match node.registry.get(id) {
        Ok(entry) if entry.spec == spec => return Ok(()),
        Ok(_) => {
            if node.inference.ready(id).is_ok() {
                node.inference.unload(id, UNLOAD_GRACE).await?;
            }
            cancel_transfers(node, id).await;
            node.delete_model(id).await?;
        }
        Err(Error::ModelNotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    node.registry
        .register(spec, Origin::Registered, source)
        .await?;
    Ok(())
}

/// Whether the node's budget holds a load of `a` next to what is loaded now.
fn fits_beside(node: &Node, a: &Assignment) -> bool {
    let context = Some(a.load.options.context_length).filter(|c| *c > 0);
    let needed = crate::registry::compat::estimate_memory(
        &a.spec,
        crate::registry::compat::load_context(&a.spec, context),
    );
    let held: u64 = node.inference.resident().iter().map(|r| r.bytes).sum();
    node.inference.budget().saturating_sub(held) >= needed
}

/// Brings `a`'s spec up: registered and stored, then loaded when wanted. A different
/// spec already under the model's id keeps serving while the new one is staged under
/// the standby id, when memory holds both; `swap_later` says whether the caller swaps
/// it in (after gates) or wants it done here. `reload` says the model is loaded with
/// other options than `a`'s: it is staged again the same way, with no download.
async fn bring_up(
    node: &Arc<Node>,
    loads: &Loads,
    a: &Assignment,
    swap_later: bool,
    reload: bool,
) -> Result<Staged> {
    let id = a.spec.id.as_str();
    let source = format!("fleet deployment {}", a.deployment);
    let held = match node.registry.get(id) {
        Ok(entry) => Some(entry.spec == a.spec),
        Err(Error::ModelNotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    let mut baseline = None;
    let restage =
        held == Some(false) || (held == Some(true) && reload && node.inference.ready(id).is_ok());
    if restage {
        // Another revision (or a model put here by hand that the deployment now
        // claims) holds the id: stage this one beside it.
        let standby = standby_id(id);
        register_as(node, &a.spec, &standby, &source).await?;
        node.store.put_fleet_model(
            &standby,
            &FleetModelRecord {
                deployment: a.deployment.clone(),
                prune: true,
                ..FleetModelRecord::default()
            },
        )?;
        node.store.flush().await?;
        ensure_stored(node, &standby, a).await?;
        let serving = node.inference.ready(id).is_ok();
        if a.wanted != Wanted::Stored && serving {
            if node.inference.ready(&standby).is_ok() || fits_beside(node, a) {
                load(node, loads, &standby, a).await?;
                if swap_later {
                    return Ok(Staged::Standby);
                }
                swap_in(node, id).await?;
                return Ok(Staged::InPlace { baseline: None });
            }
            if a.swap == SwapPolicy::SkipDevice {
                return Ok(Staged::Skipped(format!(
                    "the memory budget cannot hold the new revision beside the old one ({} loaded); the swap policy skips this device",
                    id
                )));
            }
            let slowdown = a.gates.as_ref().is_some_and(|g| g.max_slowdown > 0.0);
            if swap_later && slowdown {
                baseline = Some(gates::measure(&node.inference.ready(id)?).await?);
            }
            tracing::info!(
                model = id,
                "fleet: the budget cannot hold both revisions; unloading the old one first"
            );
            node.inference.unload(id, UNLOAD_GRACE).await?;
        }
        swap_in(node, id).await?;
    } else if held.is_none() {
        node.registry
            .register(a.spec.clone(), Origin::Registered, &source)
            .await?;
    }
    ensure_stored(node, id, a).await?;
    match a.wanted {
        Wanted::Stored => {}
        Wanted::Loaded | Wanted::Pinned => {
            let pinned = node
                .inference
                .resident()
                .iter()
                .any(|r| r.model_id == id && r.pinned);
            if a.wanted == Wanted::Pinned && !pinned && node.inference.ready(id).is_ok() {
                // Loaded without the pin (by hand, or as LOADED before): load it again
                // pinned, so a restart brings it back too.
                node.inference.unload(id, UNLOAD_GRACE).await?;
            }
            load(node, loads, id, a).await?;
        }
    }
    Ok(Staged::InPlace { baseline })
}

/// Downloads what `id` lacks of its files, reading them from the site's peers first
/// when the controller named some.
async fn ensure_stored(node: &Node, id: &str, a: &Assignment) -> Result<()> {
    let entry = node.registry.get(id)?;
    // Files another model stored are not enough: this model must be recorded as
    // holding them too, or that model's deletion would take them away under it (a
    // pull of files already here only records that).
    let recorded = node.store.stored_model(id)?.is_some();
    if entry.local_path.is_some() || (recorded && node.storage.is_stored(&entry.spec)?) {
        return Ok(());
    }
    let mut spec = entry.spec;
    for file in spec.files.iter_mut().filter(|f| f.archive.is_none()) {
        let peers = a.peers.iter().map(|p| format!("modeld://{p}"));
        file.urls = peers.chain(file.urls.drain(..)).collect();
    }
    let (progress, _started) = node.storage.pull(&spec).await?;
    wait_for_transfer(progress).await
}

/// Loads `id` as `a` asks, and waits until it is ready.
async fn load(node: &Arc<Node>, loads: &Loads, id: &str, a: &Assignment) -> Result<()> {
    if node.inference.ready(id).is_ok() {
        return Ok(());
    }
    let mut request = a.load.clone();
    request.pin = a.wanted == Wanted::Pinned;
    // The fleet wants it loaded until the assignment changes: an idle timeout would
    // only unload it for the next pass to load it again.
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
fn report(
    node: &Node,
    wanted: &Assignments,
    failures: &HashMap<String, Failure>,
    board: &Board,
) -> Report {
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
            // A new revision downloads under the standby id: its progress is the
            // model's.
            let standby = standby_id(&id);
            let transfer = transfers
                .iter()
                .find(|t| (t.model_id == id || t.model_id == standby) && !t.stage.is_final());
            let record = owned.get(&id);
            let gates = board.get(&id).or_else(|| {
                record.filter(|r| r.gate_revision > 0).map(|r| GateReport {
                    revision: r.gate_revision,
                    state: GateState::parse(&r.gate_state).unwrap_or(GateState::Failed),
                    results: r
                        .gate_results
                        .iter()
                        .map(|g| GateResult {
                            model_id: g.model_id.clone(),
                            gate: g.gate.clone(),
                            passed: g.passed,
                            detail: g.detail.clone(),
                        })
                        .collect(),
                })
            });
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
                revision: record.map_or(0, |r| r.revision),
                gates,
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
