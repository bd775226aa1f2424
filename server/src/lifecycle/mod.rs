//! The model lifecycle. This stage only defines the states, so the registry can tell a
//! model in use from an idle one; the state machine that drives them lives here too once
//! loading exists.

use std::fmt;

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
