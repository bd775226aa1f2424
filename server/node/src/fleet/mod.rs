//! The device's side of a fleet: the assignments a controller gave this node, and the
//! reconciler that drives the node to them.
//!
//! Reconciliation is level-triggered: whatever happened before (a restart, a crash, an
//! eviction, an operator's unload), each pass compares what is assigned with what the
//! node holds and takes the next step, through the same code the public RPCs use. The
//! controller is only the source of the assignments: the node keeps them (the edge
//! stores what it received) and keeps converging while the controller is away.

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
}

/// The complete assignments of this node, as of a controller generation.
#[derive(Debug, Clone, Default)]
pub struct Assignments {
    pub generation: u64,
    pub items: Vec<Assignment>,
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
}

/// What the node reports: its models and the assignments they reflect.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub models: Vec<ModelReport>,
    pub applied_generation: u64,
    pub disk_free_bytes: u64,
}
