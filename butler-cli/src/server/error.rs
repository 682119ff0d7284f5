//! Errors as the API answers them: a status and `{"error": CODE, "message": TEXT}`, where the
//! code is stable for programs and the message is the sentence a person reads.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `not_found`.
    pub code: &'static str,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_input`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }
}

impl From<butler_core::Error> for ApiError {
    fn from(error: butler_core::Error) -> Self {
        use butler_core::Error;
        let (status, code) = match &error {
            Error::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            Error::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::InvalidInput(_) => (StatusCode::BAD_REQUEST, "invalid_input"),
            Error::NotSupported(_) => (StatusCode::BAD_REQUEST, "not_supported"),
            Error::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::warn!(%error, "request failed");
        }
        ApiError::new(status, code, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.code, "message": self.message});
        (self.status, Json(body)).into_response()
    }
}
