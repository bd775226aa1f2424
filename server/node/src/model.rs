//! The model's place in its lifecycle, as every part of the node names it: the states a
//! model moves through and the stages that move it. The state machine itself (which
//! transitions exist, their history) is `lifecycle`; these types sit below it so the
//! error type, the store and the registry can name a state without depending on it.

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

/// The stage of the lifecycle a transition belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Download,
    Extract,
    Validate,
    Initialize,
    Load,
    Unload,
    /// Serving requests, once READY.
    Serve,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::Download,
        Stage::Extract,
        Stage::Validate,
        Stage::Initialize,
        Stage::Load,
        Stage::Unload,
        Stage::Serve,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Download => "download",
            Stage::Extract => "extract",
            Stage::Validate => "validate",
            Stage::Initialize => "initialize",
            Stage::Load => "load",
            Stage::Unload => "unload",
            Stage::Serve => "serve",
        }
    }

    pub fn parse(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The stage a model is in while in `state`.
    pub fn of(state: ModelState) -> Option<Stage> {
        Some(match state {
            ModelState::Downloading => Stage::Download,
            ModelState::Extracting => Stage::Extract,
            ModelState::Validating => Stage::Validate,
            ModelState::Initializing => Stage::Initialize,
            ModelState::Loading => Stage::Load,
            ModelState::Unloading => Stage::Unload,
            _ => return None,
        })
    }
}
