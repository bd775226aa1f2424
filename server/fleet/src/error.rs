//! The controller's errors, each mapped to a gRPC status with a stable reason.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Domain of the ErrorInfo the controller attaches.
pub const ERROR_DOMAIN: &str = "fleet.modeld.dev";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {description}")]
    Invalid { field: String, description: String },

    #[error("deployment {0:?} not found")]
    DeploymentNotFound(String),

    #[error("device {0:?} not found")]
    DeviceNotFound(String),

    #[error("deployment {0:?} has no rollout: it has not changed under a rollout strategy")]
    RolloutNotFound(String),

    /// A rollout command that its state does not allow (resuming a completed one).
    #[error("{0}")]
    RolloutState(String),

    /// A device broke the stream's protocol (no hello first, say).
    #[error("{0}")]
    Protocol(String),

    #[error(
        "revision {since} is older than the oldest kept ({first}); watch from 0 and list again"
    )]
    RevisionCompacted { since: u64, first: u64 },

    #[error("store: {0}")]
    Store(#[from] sled::Error),

    #[error("corrupt record {0}")]
    Corrupt(String),

    /// Bad configuration; only reachable at start-up.
    #[error("configuration: {0}")]
    Config(String),

    #[error("gRPC server: {0}")]
    Serve(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Error {
        Error::Invalid {
            field: field.into(),
            description: description.into(),
        }
    }

    fn classify(&self) -> (Code, &'static str) {
        match self {
            Error::Invalid { .. } => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            Error::DeploymentNotFound(_) => (Code::NotFound, "DEPLOYMENT_NOT_FOUND"),
            Error::DeviceNotFound(_) => (Code::NotFound, "DEVICE_NOT_FOUND"),
            Error::RolloutNotFound(_) => (Code::NotFound, "ROLLOUT_NOT_FOUND"),
            Error::RolloutState(_) => (Code::FailedPrecondition, "ROLLOUT_STATE"),
            Error::Protocol(_) => (Code::FailedPrecondition, "DEVICE_PROTOCOL"),
            Error::RevisionCompacted { .. } => (Code::OutOfRange, "REVISION_COMPACTED"),
            Error::Store(_) => (Code::Unavailable, "STORE_UNAVAILABLE"),
            Error::Corrupt(_) => (Code::DataLoss, "CORRUPT_RECORD"),
            Error::Config(_) => (Code::FailedPrecondition, "CONFIGURATION"),
            Error::Serve(_) => (Code::Internal, "SERVER"),
        }
    }
}

impl From<modeld_node::Error> for Error {
    /// The node's checks (a model spec's) are the only node errors the controller
    /// meets; they keep their field.
    fn from(e: modeld_node::Error) -> Self {
        match e {
            modeld_node::Error::InvalidArgument { field, description } => {
                Error::Invalid { field, description }
            }
            other => Error::invalid("", other.to_string()),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let (code, reason) = e.classify();
        let mut details =
            ErrorDetails::with_error_info(reason, ERROR_DOMAIN, std::collections::HashMap::new());
        if let Error::Invalid { field, description } = &e {
            details.add_bad_request_violation(field.clone(), description.clone());
        }
        Status::with_error_details(code, e.to_string(), details)
    }
}
