//! Persisted records. These are storage formats, deliberately separate from the public
//! API messages: the API can evolve without rewriting the store, and the store can add
//! bookkeeping fields no client should see. Enums are stored by their stable lower-case
//! names, so renumbering an enum cannot corrupt old data.

/// A registry entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelRecord {
    #[prost(message, optional, tag = "1")]
    pub spec: Option<SpecRecord>,
    /// builtin | registered | imported | discovered
    #[prost(string, tag = "2")]
    pub origin: String,
    #[prost(int64, tag = "3")]
    pub create_time_unix_ms: i64,
    #[prost(int64, tag = "4")]
    pub update_time_unix_ms: i64,
    #[prost(uint64, tag = "5")]
    pub generation: u64,
    #[prost(string, tag = "6")]
    pub local_path: String,
    #[prost(string, tag = "7")]
    pub source: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SpecRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub display_name: String,
    #[prost(string, tag = "3")]
    pub family: String,
    #[prost(string, tag = "4")]
    pub format: String,
    #[prost(message, repeated, tag = "5")]
    pub files: Vec<FileRecord>,
    #[prost(string, tag = "6")]
    pub quantization: String,
    #[prost(uint32, tag = "7")]
    pub context_length: u32,
    #[prost(uint64, tag = "8")]
    pub parameter_count: u64,
    #[prost(uint64, tag = "9")]
    pub estimated_memory_bytes: u64,
    #[prost(string, tag = "10")]
    pub tokenizer_kind: String,
    #[prost(string, tag = "11")]
    pub tokenizer_path: String,
    #[prost(string, tag = "12")]
    pub license: String,
    #[prost(string, repeated, tag = "13")]
    pub tags: Vec<String>,
    #[prost(string, tag = "14")]
    pub architecture: String,
    #[prost(string, tag = "15")]
    pub preferred_runtime: String,
    #[prost(string, tag = "16")]
    pub chat_template: String,
    #[prost(string, tag = "17")]
    pub description: String,
    #[prost(string, repeated, tag = "18")]
    pub inputs: Vec<String>,
    #[prost(string, repeated, tag = "19")]
    pub outputs: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FileRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, repeated, tag = "2")]
    pub urls: Vec<String>,
    #[prost(string, tag = "3")]
    pub sha256: String,
    #[prost(uint64, tag = "4")]
    pub size_bytes: u64,
    #[prost(string, tag = "5")]
    pub member: String,
    #[prost(string, tag = "6")]
    pub archive: String,
}

/// Where a model is in its lifecycle. The lifecycle manager owns writes; the registry
/// only reads it (to refuse deleting a model in use).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LifecycleRecord {
    /// Lower-case state name, e.g. "ready".
    #[prost(string, tag = "1")]
    pub state: String,
    /// Revision of the transition that set this state.
    #[prost(uint64, tag = "2")]
    pub revision: u64,
    #[prost(int64, tag = "3")]
    pub update_time_unix_ms: i64,
    /// Set while the state is "failed".
    #[prost(message, optional, tag = "4")]
    pub failure: Option<FailureRecord>,
}

/// Why a model failed: the stage, the error's kind and reason, and the message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FailureRecord {
    /// Lower-case stage name, e.g. "validate".
    #[prost(string, tag = "1")]
    pub stage: String,
    /// google.rpc.Code number; only records written before `kind` carry it.
    #[prost(int32, tag = "2")]
    pub legacy_code: i32,
    #[prost(string, tag = "3")]
    pub message: String,
    /// `ErrorKind::as_str`, e.g. "invalid_argument".
    #[prost(string, tag = "4")]
    pub kind: String,
    /// The error's stable reason, e.g. "MODEL_INVALID".
    #[prost(string, tag = "5")]
    pub reason: String,
}

/// One lifecycle event, kept in `lifecycle_events` under its revision.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TransitionRecord {
    #[prost(string, tag = "1")]
    pub model_id: String,
    /// Empty for the event that registers a model.
    #[prost(string, tag = "2")]
    pub from_state: String,
    /// Empty for the event that deletes a model.
    #[prost(string, tag = "3")]
    pub to_state: String,
    #[prost(string, tag = "4")]
    pub stage: String,
    #[prost(int64, tag = "5")]
    pub time_unix_ms: i64,
    #[prost(double, tag = "6")]
    pub progress: f64,
    #[prost(string, tag = "7")]
    pub reason: String,
    #[prost(message, optional, tag = "8")]
    pub failure: Option<FailureRecord>,
    /// "transition", "registered", "deleted" or "evicted".
    #[prost(string, tag = "9")]
    pub kind: String,
}

/// A verified blob in `<data>/blobs/sha256/<hex>`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlobRecord {
    #[prost(uint64, tag = "1")]
    pub size_bytes: u64,
    #[prost(int64, tag = "2")]
    pub create_time_unix_ms: i64,
}

/// What is stored for a model: which blob holds each of its files.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredModelRecord {
    #[prost(message, repeated, tag = "1")]
    pub files: Vec<StoredFileRecord>,
    /// Extracted directory under `<data>/models/`, for archive models.
    #[prost(string, tag = "2")]
    pub extracted_path: String,
    #[prost(int64, tag = "3")]
    pub update_time_unix_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredFileRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub sha256: String,
    #[prost(uint64, tag = "3")]
    pub size_bytes: u64,
}

/// A download that has not finished. Its offsets are persisted only after the bytes
/// they count are synced to the partial file, so a restart resumes from data that is
/// really on disk.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TransferRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub model_id: String,
    /// queued | paused (running transfers are stored as queued)
    #[prost(string, tag = "3")]
    pub state: String,
    #[prost(message, repeated, tag = "4")]
    pub files: Vec<TransferFileRecord>,
    #[prost(int64, tag = "5")]
    pub create_time_unix_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TransferFileRecord {
    /// Index of the file in the model spec.
    #[prost(uint32, tag = "1")]
    pub index: u32,
    /// Bytes of the source synced to the partial file.
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    /// Source the partial bytes came from, and its validator for If-Range.
    #[prost(string, tag = "3")]
    pub source_url: String,
    #[prost(string, tag = "4")]
    pub validator: String,
    #[prost(bool, tag = "5")]
    pub done: bool,
}

/// An upload in progress through Push.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushRecord {
    #[prost(string, tag = "1")]
    pub sha256: String,
    #[prost(uint64, tag = "2")]
    pub size_bytes: u64,
    #[prost(uint64, tag = "3")]
    pub offset: u64,
}

/// A model a fleet deployment placed on this node: the reconciler removes it when no
/// assignment names it any more, and leaves every other model alone.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FleetModelRecord {
    #[prost(string, tag = "1")]
    pub deployment: String,
    /// Delete its files when it leaves.
    #[prost(bool, tag = "2")]
    pub prune: bool,
    /// The deployment revision the model converged to.
    #[prost(uint64, tag = "3")]
    pub revision: u64,
    /// The revision the gates below were evaluated for (0 = none).
    #[prost(uint64, tag = "4")]
    pub gate_revision: u64,
    /// "running", "passed", "failed" or "skipped".
    #[prost(string, tag = "5")]
    pub gate_state: String,
    #[prost(message, repeated, tag = "6")]
    pub gate_results: Vec<GateResultRecord>,
    /// The fleet's load options the model was last loaded with ([`crate::fleet::load_key`]);
    /// empty in records from before it was kept.
    #[prost(string, tag = "7")]
    pub load_key: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GateResultRecord {
    #[prost(string, tag = "1")]
    pub model_id: String,
    #[prost(string, tag = "2")]
    pub gate: String,
    #[prost(bool, tag = "3")]
    pub passed: bool,
    #[prost(string, tag = "4")]
    pub detail: String,
}

/// How a pinned model was loaded, so a restart can load it again the same way.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PinnedLoadRecord {
    #[prost(uint32, tag = "1")]
    pub context_length: u32,
    #[prost(uint32, tag = "2")]
    pub parallel: u32,
    #[prost(uint32, tag = "3")]
    pub threads: u32,
    #[prost(uint32, tag = "4")]
    pub batch_size: u32,
    /// Empty = the best runtime for the format.
    #[prost(string, tag = "5")]
    pub runtime: String,
    /// "f16", "q8_0" or "q4_0"; empty in records older than the option = f16.
    #[prost(string, tag = "6")]
    pub kv_cache_type: String,
    /// "auto", "on" or "off"; empty in older records = auto.
    #[prost(string, tag = "7")]
    pub flash_attention: String,
}

/// Speed measured by Node.Benchmark for one runtime on one format, on this node.
/// Runtime selection ranks the engines that can run a format by these.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BenchmarkRecord {
    /// Format name, e.g. "gguf".
    #[prost(string, tag = "1")]
    pub format: String,
    /// Runtime name, e.g. "llama.cpp".
    #[prost(string, tag = "2")]
    pub runtime: String,
    /// The model it was measured on.
    #[prost(string, tag = "3")]
    pub model_id: String,
    #[prost(double, tag = "4")]
    pub prompt_tokens_per_second: f64,
    #[prost(double, tag = "5")]
    pub generation_tokens_per_second: f64,
    #[prost(uint64, tag = "6")]
    pub peak_memory_bytes: u64,
    #[prost(int64, tag = "7")]
    pub time_unix_ms: i64,
    /// The model's bytes and parameters, so that the rates calibrate predictions for
    /// other models (0 in records older than that).
    #[prost(uint64, tag = "8")]
    pub model_bytes: u64,
    #[prost(uint64, tag = "9")]
    pub parameter_count: u64,
}

/// The node's measured rates, kept so that a restart does not measure them again.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeRatesRecord {
    #[prost(double, tag = "1")]
    pub memory_read_bytes_per_second: f64,
    #[prost(double, tag = "2")]
    pub compute_flops_per_second: f64,
    #[prost(int64, tag = "3")]
    pub measured_unix_ms: i64,
    /// The CPU they were measured on (model and logical cores): another CPU, as
    /// after a disk moved to a new device, measures again.
    #[prost(string, tag = "4")]
    pub cpu: String,
}

/// A time as records store it: milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The inverse of `unix_ms`; negative values read as the epoch.
pub fn from_unix_ms(ms: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// One state-changing call, as the audit log keeps it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditRecord {
    #[prost(int64, tag = "1")]
    pub time_unix_ms: i64,
    /// The caller's name (a token's name, a certificate's identity, "anonymous").
    #[prost(string, tag = "2")]
    pub identity: String,
    #[prost(string, tag = "3")]
    pub role: String,
    /// The gRPC method, e.g. "/modeld.v1.ModelRegistry/RegisterModel".
    #[prost(string, tag = "4")]
    pub method: String,
    #[prost(string, tag = "5")]
    pub request_id: String,
    #[prost(string, tag = "6")]
    pub peer: String,
    /// google.rpc.Code of the outcome (0 = OK).
    #[prost(int32, tag = "7")]
    pub code: i32,
    /// The ErrorInfo reason of a failure.
    #[prost(string, tag = "8")]
    pub reason: String,
}
