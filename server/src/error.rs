//! The agent's one error type. Every variant maps to exactly one gRPC status in
//! `api::status`, with no catch-all, so a new variant cannot ship unmapped.

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
    ModelInUse { id: String, state: &'static str },

    #[error("{path}: no such file or directory on the agent's host")]
    PathNotFound { path: PathBuf },

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

    #[error("not enough disk: {needed} bytes needed, {available} bytes free")]
    DiskFull { needed: u64, available: u64 },

    #[error(
        "disk quota exceeded: {needed} bytes needed, {available} bytes left of the {quota}-byte quota"
    )]
    QuotaExceeded {
        needed: u64,
        available: u64,
        quota: u64,
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
        "model {id:?} is {state}, not ready: load it first (Lifecycle.Load, or `modelctl load {id}`)"
    )]
    NotReady {
        id: String,
        state: crate::lifecycle::ModelState,
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
        from: crate::lifecycle::ModelState,
        to: crate::lifecycle::ModelState,
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

    /// Bad configuration; only reachable at start-up.
    #[error("configuration: {0}")]
    Config(String),

    /// The gRPC server itself failed (listener, transport).
    #[error("gRPC server: {0}")]
    Serve(String),

    /// A blocking task died; the agent keeps serving but this request failed.
    #[error("internal task failed: {0}")]
    TaskFailed(String),

    #[error("{rpc} is not implemented by this agent yet")]
    Unimplemented { rpc: &'static str },

    #[error("the agent is shutting down")]
    ShuttingDown,
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

/// An error and its causes on one line: reqwest's and hyper's top-level messages
/// ("error sending request") hide what actually went wrong.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        cur = cause.source();
    }
    out
}
