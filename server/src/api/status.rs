//! The one mapping from the agent's errors to gRPC statuses. Every status carries a
//! `google.rpc.ErrorInfo` with a stable `reason` clients can switch on, in domain
//! "modeld"; field errors also carry a `BadRequest` violation.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

pub const DOMAIN: &str = "modeld";

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::from(&e)
    }
}

/// By reference, so one failure shared by several watchers (a transfer two clients
/// joined) becomes a status for each.
impl From<&Error> for Status {
    fn from(e: &Error) -> Status {
        let message = e.to_string();
        let mut meta = HashMap::new();
        let mut violation: Option<(String, String)> = None;
        // No catch-all arm: a new variant must be mapped here before it compiles.
        let (code, reason) = match e {
            Error::Shared(inner) => return Status::from(&**inner),
            Error::InvalidArgument { field, description } => {
                violation = Some((field.clone(), description.clone()));
                (Code::InvalidArgument, "INVALID_ARGUMENT")
            }
            Error::InvalidPageToken(why) => {
                violation = Some(("page_token".into(), why.clone()));
                (Code::InvalidArgument, "INVALID_PAGE_TOKEN")
            }
            Error::InvalidManifest(_) => (Code::InvalidArgument, "INVALID_MANIFEST"),
            Error::ModelNotFound { id } => {
                meta.insert("model_id".into(), id.clone());
                (Code::NotFound, "MODEL_NOT_FOUND")
            }
            Error::ModelAlreadyExists { id } => {
                meta.insert("model_id".into(), id.clone());
                (Code::AlreadyExists, "MODEL_ALREADY_EXISTS")
            }
            Error::ModelInUse { id, state } => {
                meta.insert("model_id".into(), id.clone());
                meta.insert("state".into(), (*state).to_owned());
                (Code::FailedPrecondition, "MODEL_IN_USE")
            }
            Error::PathNotFound { path } => {
                meta.insert("path".into(), path.display().to_string());
                (Code::NotFound, "PATH_NOT_FOUND")
            }
            Error::PathUnusable { path, .. } => {
                meta.insert("path".into(), path.display().to_string());
                (Code::FailedPrecondition, "PATH_UNUSABLE")
            }
            Error::CatalogUnavailable { url, .. } => {
                meta.insert("url".into(), url.clone());
                (Code::Unavailable, "CATALOG_UNAVAILABLE")
            }
            Error::CatalogRejected { url, .. } => {
                meta.insert("url".into(), url.clone());
                (Code::FailedPrecondition, "CATALOG_REJECTED")
            }
            Error::Io { .. } => (Code::Internal, "IO_ERROR"),
            Error::Store(_) => (Code::Internal, "STORE_ERROR"),
            Error::CorruptRecord { .. } => (Code::DataLoss, "CORRUPT_RECORD"),
            Error::SchemaTooNew { .. } => (Code::FailedPrecondition, "SCHEMA_TOO_NEW"),
            Error::Config(_) => (Code::FailedPrecondition, "BAD_CONFIG"),
            Error::TaskFailed(_) => (Code::Internal, "TASK_FAILED"),
            Error::Serve(_) => (Code::Internal, "SERVER_ERROR"),
            Error::DigestMismatch {
                file,
                expected,
                actual,
            } => {
                meta.insert("file".into(), file.clone());
                meta.insert("expected_sha256".into(), expected.clone());
                meta.insert("actual_sha256".into(), actual.clone());
                (Code::DataLoss, "CHECKSUM_MISMATCH")
            }
            Error::SizeMismatch { file, .. } => {
                meta.insert("file".into(), file.clone());
                (Code::DataLoss, "SIZE_MISMATCH")
            }
            Error::SourcesExhausted { file, .. } => {
                meta.insert("file".into(), file.clone());
                (Code::Unavailable, "SOURCES_EXHAUSTED")
            }
            Error::DiskFull { .. } => (Code::ResourceExhausted, "DISK_FULL"),
            Error::QuotaExceeded { .. } => (Code::ResourceExhausted, "QUOTA_EXCEEDED"),
            Error::ArchiveRejected(_) => (Code::FailedPrecondition, "ARCHIVE_REJECTED"),
            Error::ArchiveMemberNotFound { member } => {
                meta.insert("member".into(), member.clone());
                (Code::FailedPrecondition, "ARCHIVE_MEMBER_NOT_FOUND")
            }
            Error::TransferCancelled { id } => {
                meta.insert("transfer_id".into(), id.clone());
                (Code::Cancelled, "TRANSFER_CANCELLED")
            }
            Error::TransferNotFound { id } => {
                meta.insert("transfer_id".into(), id.clone());
                (Code::NotFound, "TRANSFER_NOT_FOUND")
            }
            Error::TransferFinished { id, .. } => {
                meta.insert("transfer_id".into(), id.clone());
                (Code::FailedPrecondition, "TRANSFER_FINISHED")
            }
            Error::BlobNotFound { sha256 } => {
                meta.insert("sha256".into(), sha256.clone());
                (Code::NotFound, "BLOB_NOT_FOUND")
            }
            Error::NothingStored { id } => {
                meta.insert("model_id".into(), id.clone());
                (Code::NotFound, "NOTHING_STORED")
            }
            Error::OutOfRange { field, message } => {
                violation = Some((field.clone(), message.clone()));
                (Code::OutOfRange, "OUT_OF_RANGE")
            }
            Error::PushRejected(_) => (Code::FailedPrecondition, "PUSH_REJECTED"),
            Error::NoRuntime { id, .. } => {
                meta.insert("model_id".into(), id.clone());
                (Code::FailedPrecondition, "NO_RUNTIME")
            }
            Error::ModelNotStored { id } => {
                meta.insert("model_id".into(), id.clone());
                (Code::FailedPrecondition, "MODEL_NOT_STORED")
            }
            // The file is what the Load asked to run: a bad one is a bad argument.
            Error::ModelInvalid { .. } => (Code::InvalidArgument, "MODEL_INVALID"),
            Error::Engine(inner) => match inner {
                modeld_engine_core::EngineError::Load(_) => {
                    (Code::FailedPrecondition, "LOAD_FAILED")
                }
                modeld_engine_core::EngineError::InvalidRequest(_) => {
                    (Code::InvalidArgument, "INVALID_ARGUMENT")
                }
                modeld_engine_core::EngineError::ContextOverflow { .. } => {
                    (Code::InvalidArgument, "CONTEXT_OVERFLOW")
                }
                modeld_engine_core::EngineError::Inference(_) => {
                    (Code::Internal, "INFERENCE_FAILED")
                }
                modeld_engine_core::EngineError::InvalidModel(_) => {
                    (Code::InvalidArgument, "MODEL_INVALID")
                }
                modeld_engine_core::EngineError::Unavailable(_) => {
                    (Code::FailedPrecondition, "RUNTIME_UNAVAILABLE")
                }
            },
            Error::EnginePanicked { id, .. } => {
                meta.insert("model_id".into(), id.clone());
                (Code::Internal, "ENGINE_PANICKED")
            }
            Error::MemoryExhausted {
                id,
                needed,
                available,
                budget,
            } => {
                meta.insert("model_id".into(), id.clone());
                meta.insert("needed_bytes".into(), needed.to_string());
                meta.insert("available_bytes".into(), available.to_string());
                meta.insert("budget_bytes".into(), budget.to_string());
                (Code::ResourceExhausted, "MEMORY_EXHAUSTED")
            }
            Error::InvalidTransition { id, from, to } => {
                meta.insert("model_id".into(), id.clone());
                meta.insert("state".into(), from.as_str().to_owned());
                meta.insert("wanted".into(), to.as_str().to_owned());
                (Code::FailedPrecondition, "INVALID_TRANSITION")
            }
            Error::WatchCompacted { requested, oldest } => {
                meta.insert("requested_revision".into(), requested.to_string());
                meta.insert("oldest_revision".into(), oldest.to_string());
                (Code::OutOfRange, "WATCH_RESYNC_REQUIRED")
            }
            Error::NotReady { id, state } => {
                meta.insert("model_id".into(), id.clone());
                meta.insert("state".into(), state.as_str().to_owned());
                (Code::FailedPrecondition, "MODEL_NOT_READY")
            }
            Error::RuntimeUnavailable { id, runtime, .. } => {
                meta.insert("model_id".into(), id.clone());
                meta.insert("runtime".into(), (*runtime).to_owned());
                (Code::FailedPrecondition, "RUNTIME_UNAVAILABLE")
            }
            Error::Overloaded { id, limit } => {
                meta.insert("model_id".into(), id.clone());
                meta.insert("limit".into(), limit.to_string());
                (Code::ResourceExhausted, "MODEL_OVERLOADED")
            }
            Error::ClientCancelled(_) => (Code::Cancelled, "CLIENT_CANCELLED"),
            Error::Unimplemented { rpc } => {
                meta.insert("rpc".into(), (*rpc).to_owned());
                (Code::Unimplemented, "NOT_IMPLEMENTED")
            }
            Error::ShuttingDown => (Code::Unavailable, "SHUTTING_DOWN"),
        };
        if matches!(code, Code::Internal | Code::DataLoss) {
            tracing::error!(error = %message, reason, "request failed");
        }
        let mut details = ErrorDetails::with_error_info(reason, DOMAIN, meta);
        if let Some((field, description)) = violation {
            details.add_bad_request_violation(field, description);
        }
        Status::with_error_details(code, message, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_reason_and_field_violation() {
        let status: Status = Error::invalid("spec.id", "is required").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "spec.id: is required");
        let details = status.get_error_details();
        let info = details.error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_ARGUMENT", "modeld")
        );
        let br = details.bad_request().unwrap();
        assert_eq!(br.field_violations[0].field, "spec.id");
    }

    #[test]
    fn not_found_names_the_model() {
        let status: Status = Error::ModelNotFound { id: "x".into() }.into();
        assert_eq!(status.code(), Code::NotFound);
        let info = status.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.metadata.get("model_id").map(String::as_str), Some("x"));
    }
}
