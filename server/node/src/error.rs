//! The node's one error type. Each variant has a stable reason (what clients switch
//! on) and a kind (the failure's class, which the gRPC edge maps one-to-one to a
//! status code), both decided in `Error::classify` with no catch-all arm, so a new
//! variant cannot ship unclassified. Nothing here knows gRPC.

use std::path::PathBuf;

/// Convenience alias used throughout the agent.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field failed validation. `field` is the path in the request, e.g.
    /// `spec.files[0].sha256`.
    #[error("{field}: {description}")]
    InvalidArgument { field: String, description: String },

    #[error("invalid page_token: {0}; start again without a page_token")]
    InvalidPageToken(String),

    #[error("invalid catalog manifest: {0}")]
    InvalidManifest(String),

    #[error("model {id:?} not found; `modelctl models list` shows the registered ids")]
    ModelNotFound { id: String },

    #[error(
        "model {id:?} is already registered with a different spec; use UpdateModel to change it"
    )]
    ModelAlreadyExists { id: String },

    #[error("model {id:?} is in use (state {state}); unload it before deleting")]
    ModelInUse {
        id: String,
        state: crate::model::ModelState,
    },

    #[error("{path}: no such file or directory on the agent's host")]
    PathNotFound { path: PathBuf },

    /// A request named a local path outside the allowed roots. Says nothing of the
    /// file itself.
    #[error(
        "{field}: a local path must be under a directory this agent allows (--allow-dir, \
         or a --models-dir); this one is not, or leads outside through a link"
    )]
    PathNotAllowed { field: String },

    /// A path the operator named (scan directory, catalog file) cannot be used.
    #[error("{path}: {reason}")]
    PathUnusable { path: PathBuf, reason: String },

    #[error("catalog could not be fetched from {url}: {message}")]
    CatalogUnavailable { url: String, message: String },

    #[error("catalog at {url} was refused: {message}")]
    CatalogRejected { url: String, message: String },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("store error: {0}")]
    Store(#[from] sled::Error),

    #[error("corrupt record {key:?} in store tree {tree}: {message}")]
    CorruptRecord {
        tree: &'static str,
        key: String,
        message: String,
    },

    #[error(
        "store schema version {found} is newer than this agent supports ({supported}); \
         run a newer modeld or point --data-dir elsewhere"
    )]
    SchemaTooNew { found: u32, supported: u32 },

    #[error(
        "{file}: sha256 mismatch: expected {expected}, got {actual} (the source served different bytes; they were deleted)"
    )]
    DigestMismatch {
        file: String,
        expected: String,
        actual: String,
    },

    #[error(
        "{file}: size mismatch: expected {expected} bytes, got {actual} (the bytes were deleted)"
    )]
    SizeMismatch {
        file: String,
        expected: u64,
        actual: u64,
    },

    #[error("{file}: every source failed: {attempts}")]
    SourcesExhausted { file: String, attempts: String },

    #[error("not enough disk: {needed} bytes needed, {available} bytes free{kept}")]
    DiskFull {
        needed: u64,
        available: u64,
        /// What stays stored and why ("" when nothing could be removed anyway).
        kept: String,
    },

    #[error(
        "disk quota exceeded: {needed} bytes needed, {available} bytes left of the {quota}-byte quota{kept}"
    )]
    QuotaExceeded {
        needed: u64,
        available: u64,
        quota: u64,
        /// What stays stored and why ("" when nothing could be removed anyway).
        kept: String,
    },

    #[error("archive rejected: {0}; nothing was extracted")]
    ArchiveRejected(String),

    #[error("archive has no member {member:?}")]
    ArchiveMemberNotFound { member: String },

    #[error("transfer {id:?} was cancelled")]
    TransferCancelled { id: String },

    #[error("transfer {id:?} not found; `modelctl transfers` lists the running ones")]
    TransferNotFound { id: String },

    #[error("transfer {id:?} has already ended ({stage})")]
    TransferFinished { id: String, stage: String },

    #[error("no stored blob with sha256 {sha256}")]
    BlobNotFound { sha256: String },

    #[error("model {id:?} has nothing stored")]
    NothingStored { id: String },

    #[error("{field}: {message}")]
    OutOfRange { field: String, message: String },

    #[error("the client went away: {0}")]
    ClientCancelled(String),

    #[error("push refused: {0}")]
    PushRejected(String),

    #[error("model {id:?} is {format}, and this build of modeld has no runtime for {format}")]
    NoRuntime { id: String, format: &'static str },

    #[error("model {id:?} is not stored on this node; pull or push it first")]
    ModelNotStored { id: String },

    #[error("{path} is not a usable model: {reason}")]
    ModelInvalid { path: PathBuf, reason: String },

    #[error("{0}")]
    Engine(#[from] modeld_engine_core::EngineError),

    #[error(
        "model {id:?} failed: its inference engine crashed during {during}; load it again to retry"
    )]
    EnginePanicked { id: String, during: &'static str },

    #[error(
        "model {id:?} crashed {crashes} times within {window_minutes} minutes and is no longer \
         restarted by itself: find the cause in the agent's log, then load it again"
    )]
    CrashLoop {
        id: String,
        crashes: usize,
        window_minutes: u64,
    },

    /// The model's engine process ended under it; the agent and other models serve on.
    #[error("model {id:?} failed: its engine process {how}; load it again to start a fresh one")]
    EngineCrashed { id: String, how: String },

    #[error(
        "model {id:?} is {state}, not ready: load it first (Lifecycle.Load, or `modelctl load {id}`)"
    )]
    NotReady {
        id: String,
        state: crate::model::ModelState,
    },

    #[error(
        "model {id:?} needs {needed} bytes of memory and {available} of the {budget}-byte budget can be made free (pinned and busy models stay); unload something or raise --memory-budget"
    )]
    MemoryExhausted {
        id: String,
        needed: u64,
        available: u64,
        budget: u64,
    },

    /// One failure several waiters share (a transfer two Loads joined).
    #[error("{0}")]
    Shared(std::sync::Arc<Error>),

    #[error("model {id:?} is {from}; it cannot go to {to} from there")]
    InvalidTransition {
        id: String,
        from: crate::model::ModelState,
        to: crate::model::ModelState,
    },

    #[error(
        "revision {requested} is older than the oldest event kept ({oldest}): resync with GetState (or ListModels) and watch from the revision it returns"
    )]
    WatchCompacted { requested: u64, oldest: u64 },

    #[error("model {id:?} is {format}, and runtime {runtime} in this build cannot run {format}")]
    RuntimeUnavailable {
        id: String,
        runtime: &'static str,
        format: &'static str,
    },

    #[error("model {id:?} is busy: its request queue is full; retry later")]
    Overloaded { id: String, limit: usize },

    /// Something the node needs could not be set up (its HTTP client); only reachable
    /// at start-up.
    #[error("setup: {0}")]
    Setup(String),

    /// A blocking task died; the agent keeps serving but this request failed.
    #[error("internal task failed: {0}")]
    TaskFailed(String),

    #[error("the agent is shutting down")]
    ShuttingDown,

    /// The caller's deadline passed before the work ended.
    #[error("{0}")]
    DeadlineExceeded(&'static str),
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            description: description.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::TaskFailed(e.to_string())
    }
}

/// The class of a failure, in the vocabulary RPC systems share (google.rpc.Code's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    Cancelled,
    DeadlineExceeded,
    DataLoss,
    Internal,
    PermissionDenied,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::FailedPrecondition,
        ErrorKind::OutOfRange,
        ErrorKind::ResourceExhausted,
        ErrorKind::Unavailable,
        ErrorKind::Cancelled,
        ErrorKind::DeadlineExceeded,
        ErrorKind::DataLoss,
        ErrorKind::Internal,
        ErrorKind::PermissionDenied,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::DataLoss => "data_loss",
            ErrorKind::Internal => "internal",
            ErrorKind::PermissionDenied => "permission_denied",
        }
    }

    pub fn parse(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The google.rpc.Code number of this kind (a published standard, the same in
    /// every gRPC implementation).
    pub fn rpc_code(self) -> i32 {
        match self {
            ErrorKind::Cancelled => 1,
            ErrorKind::InvalidArgument => 3,
            ErrorKind::DeadlineExceeded => 4,
            ErrorKind::NotFound => 5,
            ErrorKind::AlreadyExists => 6,
            ErrorKind::PermissionDenied => 7,
            ErrorKind::ResourceExhausted => 8,
            ErrorKind::FailedPrecondition => 9,
            ErrorKind::OutOfRange => 11,
            ErrorKind::Internal => 13,
            ErrorKind::Unavailable => 14,
            ErrorKind::DataLoss => 15,
        }
    }

    /// The kind of a google.rpc.Code number, for records written before kinds were
    /// stored; codes the node never produces read as `Internal`.
    pub fn from_rpc_code(code: i32) -> ErrorKind {
        ErrorKind::ALL
            .into_iter()
            .find(|k| k.rpc_code() == code)
            .unwrap_or(ErrorKind::Internal)
    }
}

impl Error {
    /// The failure's kind and its stable reason. No catch-all arm: a new variant is
    /// classified here before it compiles.
    pub fn classify(&self) -> (ErrorKind, &'static str) {
        use ErrorKind as K;
        use modeld_engine_core::EngineError as E;
        match self {
            Error::Shared(inner) => inner.classify(),
            Error::InvalidArgument { .. } => (K::InvalidArgument, "INVALID_ARGUMENT"),
            Error::InvalidPageToken(_) => (K::InvalidArgument, "INVALID_PAGE_TOKEN"),
            Error::InvalidManifest(_) => (K::InvalidArgument, "INVALID_MANIFEST"),
            Error::ModelNotFound { .. } => (K::NotFound, "MODEL_NOT_FOUND"),
            Error::ModelAlreadyExists { .. } => (K::AlreadyExists, "MODEL_ALREADY_EXISTS"),
            Error::ModelInUse { .. } => (K::FailedPrecondition, "MODEL_IN_USE"),
            Error::PathNotFound { .. } => (K::NotFound, "PATH_NOT_FOUND"),
            Error::PathNotAllowed { .. } => (K::PermissionDenied, "PATH_NOT_ALLOWED"),
            Error::PathUnusable { .. } => (K::FailedPrecondition, "PATH_UNUSABLE"),
            Error::CatalogUnavailable { .. } => (K::Unavailable, "CATALOG_UNAVAILABLE"),
            Error::CatalogRejected { .. } => (K::FailedPrecondition, "CATALOG_REJECTED"),
            Error::Io { .. } => (K::Internal, "IO_ERROR"),
            Error::Store(_) => (K::Internal, "STORE_ERROR"),
            Error::CorruptRecord { .. } => (K::DataLoss, "CORRUPT_RECORD"),
            Error::SchemaTooNew { .. } => (K::FailedPrecondition, "SCHEMA_TOO_NEW"),
            Error::Setup(_) => (K::Internal, "SETUP_FAILED"),
            Error::TaskFailed(_) => (K::Internal, "TASK_FAILED"),
            Error::DigestMismatch { .. } => (K::DataLoss, "CHECKSUM_MISMATCH"),
            Error::SizeMismatch { .. } => (K::DataLoss, "SIZE_MISMATCH"),
            Error::SourcesExhausted { .. } => (K::Unavailable, "SOURCES_EXHAUSTED"),
            Error::DiskFull { .. } => (K::ResourceExhausted, "DISK_FULL"),
            Error::QuotaExceeded { .. } => (K::ResourceExhausted, "QUOTA_EXCEEDED"),
            Error::ArchiveRejected(_) => (K::FailedPrecondition, "ARCHIVE_REJECTED"),
            Error::ArchiveMemberNotFound { .. } => {
                (K::FailedPrecondition, "ARCHIVE_MEMBER_NOT_FOUND")
            }
            Error::TransferCancelled { .. } => (K::Cancelled, "TRANSFER_CANCELLED"),
            Error::TransferNotFound { .. } => (K::NotFound, "TRANSFER_NOT_FOUND"),
            Error::TransferFinished { .. } => (K::FailedPrecondition, "TRANSFER_FINISHED"),
            Error::BlobNotFound { .. } => (K::NotFound, "BLOB_NOT_FOUND"),
            Error::NothingStored { .. } => (K::NotFound, "NOTHING_STORED"),
            Error::OutOfRange { .. } => (K::OutOfRange, "OUT_OF_RANGE"),
            Error::PushRejected(_) => (K::FailedPrecondition, "PUSH_REJECTED"),
            Error::NoRuntime { .. } => (K::FailedPrecondition, "NO_RUNTIME"),
            Error::ModelNotStored { .. } => (K::FailedPrecondition, "MODEL_NOT_STORED"),
            // The file is what the Load asked to run: a bad one is a bad argument.
            Error::ModelInvalid { .. } => (K::InvalidArgument, "MODEL_INVALID"),
            Error::Engine(inner) => match inner {
                E::Load(_) => (K::FailedPrecondition, "LOAD_FAILED"),
                E::InvalidRequest(_) => (K::InvalidArgument, "INVALID_ARGUMENT"),
                E::ContextOverflow { .. } => (K::InvalidArgument, "CONTEXT_OVERFLOW"),
                E::Inference(_) => (K::Internal, "INFERENCE_FAILED"),
                E::InvalidModel(_) => (K::InvalidArgument, "MODEL_INVALID"),
                E::Unavailable(_) => (K::FailedPrecondition, "RUNTIME_UNAVAILABLE"),
                E::Crashed(_) => (K::Unavailable, "ENGINE_CRASHED"),
            },
            Error::EnginePanicked { .. } => (K::Internal, "ENGINE_PANICKED"),
            Error::EngineCrashed { .. } => (K::Unavailable, "ENGINE_CRASHED"),
            Error::CrashLoop { .. } => (K::Unavailable, "ENGINE_CRASH_LOOP"),
            Error::MemoryExhausted { .. } => (K::ResourceExhausted, "MEMORY_EXHAUSTED"),
            Error::InvalidTransition { .. } => (K::FailedPrecondition, "INVALID_TRANSITION"),
            Error::WatchCompacted { .. } => (K::OutOfRange, "WATCH_RESYNC_REQUIRED"),
            Error::NotReady { .. } => (K::FailedPrecondition, "MODEL_NOT_READY"),
            Error::RuntimeUnavailable { .. } => (K::FailedPrecondition, "RUNTIME_UNAVAILABLE"),
            Error::Overloaded { .. } => (K::ResourceExhausted, "MODEL_OVERLOADED"),
            Error::ClientCancelled(_) => (K::Cancelled, "CLIENT_CANCELLED"),
            Error::ShuttingDown => (K::Unavailable, "SHUTTING_DOWN"),
            Error::DeadlineExceeded(_) => (K::DeadlineExceeded, "DEADLINE_EXCEEDED"),
        }
    }

    /// What a program needs to act on the failure: the ids, paths and figures it
    /// names, as key-value pairs (gRPC ErrorInfo metadata).
    pub fn facts(&self) -> Vec<(&'static str, String)> {
        match self {
            Error::Shared(inner) => inner.facts(),
            Error::ModelNotFound { id }
            | Error::ModelAlreadyExists { id }
            | Error::NothingStored { id }
            | Error::NoRuntime { id, .. }
            | Error::ModelNotStored { id }
            | Error::EnginePanicked { id, .. } => vec![("model_id", id.clone())],
            Error::CrashLoop { id, crashes, .. } => {
                vec![("model_id", id.clone()), ("crashes", crashes.to_string())]
            }
            Error::EngineCrashed { id, how } => {
                let mut facts = vec![("model_id", id.clone())];
                if let Some(signal) = modeld_engine_core::signal_name(how) {
                    facts.push(("signal", signal.to_owned()));
                }
                facts
            }
            Error::ModelInUse { id, state } | Error::NotReady { id, state } => vec![
                ("model_id", id.clone()),
                ("state", state.as_str().to_owned()),
            ],
            Error::PathNotAllowed { field } => vec![("field", field.clone())],
            Error::PathNotFound { path } | Error::PathUnusable { path, .. } => {
                vec![("path", path.display().to_string())]
            }
            Error::CatalogUnavailable { url, .. } | Error::CatalogRejected { url, .. } => {
                vec![("url", url.clone())]
            }
            Error::DigestMismatch {
                file,
                expected,
                actual,
            } => vec![
                ("file", file.clone()),
                ("expected_sha256", expected.clone()),
                ("actual_sha256", actual.clone()),
            ],
            Error::SizeMismatch { file, .. } | Error::SourcesExhausted { file, .. } => {
                vec![("file", file.clone())]
            }
            Error::ArchiveMemberNotFound { member } => vec![("member", member.clone())],
            Error::TransferCancelled { id }
            | Error::TransferNotFound { id }
            | Error::TransferFinished { id, .. } => vec![("transfer_id", id.clone())],
            Error::BlobNotFound { sha256 } => vec![("sha256", sha256.clone())],
            Error::MemoryExhausted {
                id,
                needed,
                available,
                budget,
            } => vec![
                ("model_id", id.clone()),
                ("needed_bytes", needed.to_string()),
                ("available_bytes", available.to_string()),
                ("budget_bytes", budget.to_string()),
            ],
            Error::InvalidTransition { id, from, to } => vec![
                ("model_id", id.clone()),
                ("state", from.as_str().to_owned()),
                ("wanted", to.as_str().to_owned()),
            ],
            Error::WatchCompacted { requested, oldest } => vec![
                ("requested_revision", requested.to_string()),
                ("oldest_revision", oldest.to_string()),
            ],
            Error::RuntimeUnavailable { id, runtime, .. } => {
                vec![("model_id", id.clone()), ("runtime", (*runtime).to_owned())]
            }
            Error::Overloaded { id, limit } => {
                vec![("model_id", id.clone()), ("limit", limit.to_string())]
            }
            Error::InvalidArgument { .. }
            | Error::InvalidPageToken(_)
            | Error::InvalidManifest(_)
            | Error::Io { .. }
            | Error::Store(_)
            | Error::CorruptRecord { .. }
            | Error::SchemaTooNew { .. }
            | Error::Setup(_)
            | Error::TaskFailed(_)
            | Error::DiskFull { .. }
            | Error::QuotaExceeded { .. }
            | Error::ArchiveRejected(_)
            | Error::OutOfRange { .. }
            | Error::PushRejected(_)
            | Error::ModelInvalid { .. }
            | Error::Engine(_)
            | Error::ClientCancelled(_)
            | Error::ShuttingDown
            | Error::DeadlineExceeded(_) => Vec::new(),
        }
    }

    /// The request field at fault and why, for errors that name one.
    pub fn field_violation(&self) -> Option<(String, String)> {
        match self {
            Error::Shared(inner) => inner.field_violation(),
            Error::InvalidArgument { field, description } => {
                Some((field.clone(), description.clone()))
            }
            Error::InvalidPageToken(why) => Some(("page_token".into(), why.clone())),
            Error::OutOfRange { field, message } => Some((field.clone(), message.clone())),
            _ => None,
        }
    }
}
