//! Error responses: a FHIR `OperationOutcome` body, with the status and
//! issue code that fit, and never a file path or SQL (the diagnostics come
//! from [`StorageError::message`], which holds neither, or are fixed text).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::{ErrorKind, StorageError};

/// An `OperationOutcome` response with one error issue of FHIR issue type
/// `code`.
pub(super) fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    let body = serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    });
    (
        status,
        [
            (header::CONTENT_TYPE, "application/fhir+json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// The response for a storage error, by category.
pub(super) fn storage_error(e: &StorageError) -> Response {
    let (status, code) = match e.kind() {
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not-found"),
        ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, "invalid"),
        ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "transient"),
        ErrorKind::Conflict => (StatusCode::CONFLICT, "conflict"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "exception"),
    };
    let mut r = outcome(status, code, e.message());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// `404` for a part that does not exist (or is not finished).
pub(super) fn no_part() -> Response {
    outcome(
        StatusCode::NOT_FOUND,
        "not-found",
        "no finished export file at this address",
    )
}
