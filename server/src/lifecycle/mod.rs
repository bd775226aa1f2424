//! The model lifecycle. This stage only defines the states, so the registry can tell a
//! model in use from an idle one; the state machine that drives them lives here too once
//! loading exists.

use std::fmt;
use std::time::SystemTime;

use crate::error::Result;
use crate::store::{LifecycleRecord, Store};

/// Lifecycle state of one model. "generating" is `Ready` with requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelState {
    Registered,
    Downloading,
    Downloaded,
    Extracting,
    Validating,
    Initializing,
    Loading,
    Ready,
    Unloading,
    Failed,
}

impl ModelState {
    pub const ALL: [ModelState; 10] = [
        ModelState::Registered,
        ModelState::Downloading,
        ModelState::Downloaded,
        ModelState::Extracting,
        ModelState::Validating,
        ModelState::Initializing,
        ModelState::Loading,
        ModelState::Ready,
        ModelState::Unloading,
        ModelState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Registered => "registered",
            ModelState::Downloading => "downloading",
            ModelState::Downloaded => "downloaded",
            ModelState::Extracting => "extracting",
            ModelState::Validating => "validating",
            ModelState::Initializing => "initializing",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Unloading => "unloading",
            ModelState::Failed => "failed",
        }
    }

    pub fn parse(name: &str) -> Option<ModelState> {
        ModelState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// True while some stage holds the model's files: deleting it then would pull them
    /// from under a download, an extraction or a running engine.
    pub fn holds_files(self) -> bool {
        !matches!(
            self,
            ModelState::Registered | ModelState::Downloaded | ModelState::Failed
        )
    }
}

impl fmt::Display for ModelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Records a model's state. The one writer of the lifecycle tree until the state
/// machine arrives; the caller flushes.
pub fn set_state(store: &Store, id: &str, state: ModelState) -> Result<()> {
    let revision = store.lifecycle(id)?.map_or(0, |r| r.revision) + 1;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    store.put_lifecycle(
        id,
        &LifecycleRecord {
            state: state.as_str().to_owned(),
            revision,
            update_time_unix_ms: now,
        },
    )
}

/// A model's recorded state; a model never touched by a stage is `Registered`.
pub fn state(store: &Store, id: &str) -> Result<ModelState> {
    Ok(store
        .lifecycle(id)?
        .and_then(|r| ModelState::parse(&r.state))
        .unwrap_or(ModelState::Registered))
}

/// After a restart nothing is in memory: models recorded as loading, loaded or
/// unloading are back to `Downloaded`. The caller flushes.
pub fn forget_loaded(store: &Store) -> Result<usize> {
    let mut reset = 0;
    for (id, record) in store.lifecycles()? {
        let in_memory = matches!(
            ModelState::parse(&record.state),
            Some(
                ModelState::Validating
                    | ModelState::Loading
                    | ModelState::Ready
                    | ModelState::Unloading
            )
        );
        if in_memory {
            set_state(store, &id, ModelState::Downloaded)?;
            reset += 1;
        }
    }
    Ok(reset)
}
