//! The one mapping from the node's errors to gRPC statuses: each error's kind becomes
//! its code, its reason and facts a `google.rpc.ErrorInfo` in domain "modeld", and a
//! field at fault a `BadRequest` violation.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use modeld_node::error::{Error, ErrorKind};

pub const DOMAIN: &str = "modeld";

/// What a handler fails with: a node error, or a status the edge made itself. Every
/// handler body returns it; the service method turns it into the status.
#[derive(Debug)]
pub enum ApiError {
    Node(Error),
    Status(Status),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError::Node(e)
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> ApiError {
        ApiError::Status(s)
    }
}

impl From<crate::error::Error> for ApiError {
    fn from(e: crate::error::Error) -> ApiError {
        ApiError::Status(Status::from(e))
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> ApiError {
        ApiError::Node(e.into())
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Node(e) => of(&e),
            ApiError::Status(s) => s,
        }
    }
}

/// Runs a handler body and answers its failure as a status.
pub async fn rpc<T>(body: impl std::future::Future<Output = ApiResult<T>>) -> Result<T, Status> {
    body.await.map_err(Status::from)
}

/// The status code of each kind of failure; the one place that knows tonic's codes.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
    }
}

/// Errors of starting and serving: only the node's can reach a client, but every one
/// has its status.
impl From<crate::error::Error> for Status {
    fn from(e: crate::error::Error) -> Status {
        match e {
            crate::error::Error::Node(e) => of(&e),
            crate::error::Error::Config(_) => Status::with_error_details(
                Code::FailedPrecondition,
                e.to_string(),
                ErrorDetails::with_error_info("BAD_CONFIG", DOMAIN, HashMap::new()),
            ),
            crate::error::Error::Serve(_) => Status::with_error_details(
                Code::Internal,
                e.to_string(),
                ErrorDetails::with_error_info("SERVER_ERROR", DOMAIN, HashMap::new()),
            ),
            crate::error::Error::Fleet(_) => Status::with_error_details(
                Code::Unavailable,
                e.to_string(),
                ErrorDetails::with_error_info("FLEET_UNREACHABLE", DOMAIN, HashMap::new()),
            ),
        }
    }
}

/// A node error as a status. By reference, so one failure shared by several watchers
/// (a transfer two clients joined) becomes a status for each.
pub fn of(e: &Error) -> Status {
    {
        let message = e.to_string();
        let (kind, reason) = e.classify();
        let code = code(kind);
        if matches!(code, Code::Internal | Code::DataLoss) {
            tracing::error!(error = %message, reason, "request failed");
        }
        let meta: HashMap<String, String> = e
            .facts()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let mut details = ErrorDetails::with_error_info(reason, DOMAIN, meta);
        if let Some((field, description)) = e.field_violation() {
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
        let status = of(&Error::invalid("spec.id", "is required"));
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
        let status = of(&Error::ModelNotFound { id: "x".into() });
        assert_eq!(status.code(), Code::NotFound);
        let info = status.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.metadata.get("model_id").map(String::as_str), Some("x"));
    }

    #[test]
    fn every_kind_has_the_code_of_its_standard_number() {
        for kind in ErrorKind::ALL {
            assert_eq!(code(kind) as i32, kind.rpc_code(), "{kind:?}");
        }
    }
}
