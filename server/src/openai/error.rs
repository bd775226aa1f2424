//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
//! the HTTP status OpenAI's clients act on (401 re-authenticates, 429 and 5xx are
//! retried). A gRPC status from the agent keeps its message, its ErrorInfo reason
//! becomes `code`, and a BadRequest field becomes `param` in OpenAI's field names.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;
use tonic_types::StatusExt as _;

#[derive(Debug)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl OpenAiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> OpenAiError {
        OpenAiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: (!param.is_empty()).then(|| param.to_owned()),
            code: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> OpenAiError {
        OpenAiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: Some("not_found".into()),
        }
    }

    /// The JSON body, also sent as the last event of a stream that fails midway.
    pub fn body(&self) -> String {
        serde_json::to_string(&Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response()
    }
}

/// OpenAI's name for a field of `modeld.v1.GenerateRequest`.
fn param(field: &str) -> String {
    let field = field.strip_prefix("sampling.").unwrap_or(field);
    match field {
        "model_id" => "model".to_owned(),
        "max_tokens" => "max_tokens".to_owned(),
        "chat" | "chat.messages" => "messages".to_owned(),
        other => other.replace("chat.messages", "messages"),
    }
}

impl From<tonic::Status> for OpenAiError {
    fn from(status: tonic::Status) -> OpenAiError {
        let details = status.get_error_details();
        let reason = details.error_info().map(|i| i.reason.to_lowercase());
        let param = details
            .bad_request()
            .and_then(|b| b.field_violations.first())
            .map(|v| param(&v.field));
        let (http, kind) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error"),
            Code::AlreadyExists | Code::Aborted => (StatusCode::CONFLICT, "invalid_request_error"),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error"),
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error"),
            // The client went away; nobody reads this, but it is not the server's fault.
            Code::Cancelled => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "invalid_request_error"),
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => {
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error")
            }
        };
        OpenAiError {
            status: http,
            kind,
            message: status.message().to_owned(),
            param,
            code: reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::ErrorDetails;

    use super::*;

    #[test]
    fn a_status_keeps_its_message_reason_and_field() {
        let mut details =
            ErrorDetails::with_error_info("INVALID_ARGUMENT", "modeld", HashMap::new());
        details.add_bad_request_violation("sampling.temperature", "-1 is outside [0, 5]");
        let status = tonic::Status::with_error_details(
            Code::InvalidArgument,
            "sampling.temperature: -1 is outside [0, 5]",
            details,
        );
        let e = OpenAiError::from(status);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let body: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(body["error"]["param"], "temperature");
        assert_eq!(body["error"]["code"], "invalid_argument");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("outside")
        );
    }

    #[test]
    fn codes_map_to_the_statuses_clients_act_on() {
        for (code, http) in [
            (Code::Unauthenticated, StatusCode::UNAUTHORIZED),
            (Code::PermissionDenied, StatusCode::FORBIDDEN),
            (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS),
            (Code::NotFound, StatusCode::NOT_FOUND),
            (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            assert_eq!(
                OpenAiError::from(tonic::Status::new(code, "x")).status,
                http
            );
        }
    }
}
