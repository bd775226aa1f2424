//! The device's side of a fleet: the assignments a controller gave this node, and the
//! reconciler that drives the node to them.
//!
//! Reconciliation is level-triggered: whatever happened before (a restart, a crash, an
//! eviction, an operator's unload), each pass compares what is assigned with what the
//! node holds and takes the next step, through the same code the public RPCs use. The
//! controller is only the source of the assignments: the node keeps them (the edge
//! stores what it received) and keeps converging while the controller is away.

pub mod gates;
mod reconcile;

pub use reconcile::{Reconciler, spawn};

use crate::inference::LoadRequest;
use crate::model::ModelState;
use crate::registry::spec::ModelSpec;

/// What the fleet wants of one model on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// On disk only (prefetch).
    Stored,
    /// Loaded; it may still be evicted for memory.
    Loaded,
    /// Loaded and never evicted.
    Pinned,
}

impl Wanted {
    pub fn as_str(self) -> &'static str {
        match self {
            Wanted::Stored => "stored",
            Wanted::Loaded => "loaded",
            Wanted::Pinned => "pinned",
        }
    }
}

/// One model this node must hold.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub deployment: String,
    pub spec: ModelSpec,
    pub wanted: Wanted,
    /// How to load it; `pin` follows `wanted`.
    pub load: LoadRequest,
    /// Delete its files when it is no longer assigned.
    pub prune: bool,
    /// The deployment revision this assignment belongs to.
    pub revision: u64,
    /// What the model must pass when the node takes this revision (a rollout's).
    pub gates: Option<Gates>,
    /// The previous revision's spec, kept on disk under the standby id until the
    /// rollout completes, so a rollback needs no download.
    pub retain: Option<ModelSpec>,
    pub swap: SwapPolicy,
    /// `host:port` of devices in the site that hold the files: read before the spec's
    /// URLs.
    pub peers: Vec<String>,
    /// A device of the site is fetching the files from the origin: wait for it.
    pub wait_for_peer: bool,
}

/// When the node cannot hold the old and the new revision in memory at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SwapPolicy {
    /// Unload the old revision first; the model is unavailable while the new loads.
    #[default]
    AllowGap,
    /// Stay on the old revision and report the gate as skipped.
    SkipDevice,
}

/// A rollout's gates, as the node evaluates them.
#[derive(Debug, Clone, PartialEq)]
pub struct Gates {
    pub ready_within: std::time::Duration,
    pub smoke_tests: Vec<SmokeTest>,
    /// 0 = speed not compared.
    pub max_slowdown: f64,
    pub soak: std::time::Duration,
    pub max_error_rate: f64,
}

/// A fixed prompt and what its greedy answer must satisfy.
#[derive(Debug, Clone, PartialEq)]
pub struct SmokeTest {
    /// Empty = every loaded model of the deployment.
    pub model_id: String,
    pub prompt: String,
    pub max_tokens: u32,
    pub contains: Option<String>,
    pub equals: Option<String>,
    pub matches: Option<String>,
    pub json: bool,
}

/// Where a model's gates stand for one revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    Running,
    Passed,
    Failed,
    /// The node stays on the previous revision (its swap policy said so).
    Skipped,
}

impl GateState {
    pub fn as_str(self) -> &'static str {
        match self {
            GateState::Running => "running",
            GateState::Passed => "passed",
            GateState::Failed => "failed",
            GateState::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<GateState> {
        [
            GateState::Running,
            GateState::Passed,
            GateState::Failed,
            GateState::Skipped,
        ]
        .into_iter()
        .find(|g| g.as_str() == s)
    }
}

/// One gate's outcome on one model.
#[derive(Debug, Clone, PartialEq)]
pub struct GateResult {
    pub model_id: String,
    /// "ready", "memory", "smoke", "speed" or "soak".
    pub gate: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GateReport {
    pub revision: u64,
    pub state: GateState,
    pub results: Vec<GateResult>,
}

/// The load options that matter to a loaded model, spelled out field by field so the
/// text is stable across versions: a change means the model must be loaded again.
pub fn load_key(load: &LoadRequest) -> String {
    let o = &load.options;
    format!(
        "runtime={};context={};parallel={};threads={};batch={};gpu_layers={};kv={};flash={};mlock={}",
        load.runtime.map_or("auto", |r| r.as_str()),
        o.context_length,
        o.parallel,
        o.threads,
        o.batch_size,
        o.gpu_layers,
        o.kv_cache_type.as_str(),
        o.flash_attention.as_str(),
        o.use_mlock,
    )
}

/// The id a new revision is staged under (and the previous one kept under) while
/// the model's own id keeps serving.
pub fn standby_id(id: &str) -> String {
    format!("{id}{STANDBY_SUFFIX}")
}

pub const STANDBY_SUFFIX: &str = ".standby";

/// The complete assignments of this node, as of a controller generation.
#[derive(Debug, Clone, Default)]
pub struct Assignments {
    pub generation: u64,
    pub items: Vec<Assignment>,
    /// This device's share of its site's limit on origin downloads (bytes/s).
    pub origin_bytes_per_second: Option<u64>,
}

/// One model as this node reports it to the controller.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelReport {
    pub model_id: String,
    pub state: ModelState,
    /// The deployment that assigned it; empty for a model put here by hand.
    pub deployment: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Why the last attempt to converge failed.
    pub error: String,
    pub memory_bytes: u64,
    /// The deployment revision the model has converged to.
    pub revision: u64,
    pub gates: Option<GateReport>,
}

/// What the node reports: its models and the assignments they reflect.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub models: Vec<ModelReport>,
    pub applied_generation: u64,
    pub disk_free_bytes: u64,
}
