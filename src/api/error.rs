//! The API's one error shape: `ApiError` (status, kind, message) answered as
//! `{"error": {"kind": KIND, "message": TEXT}}`, the table of kinds ([`KINDS`]) with
//! their statuses, and the middleware that rewrites axum's own refusals (rejections,
//! 404, 405, 413) into that shape.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{Error, ErrorKind};

/// An error as an HTTP response: `{"error": {"kind": KIND, "message": TEXT}}` with a
/// status from its kind (see the module doc for the kinds).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// The `kind` word of the body (see [`KINDS`]).
    pub kind: &'static str,
    pub message: String,
}

/// `ApiError(status, message)`: an error whose kind follows from its status
/// ([`kind_of_status`]). Kept in the old tuple-constructor form so that call sites read
/// as before.
#[allow(non_snake_case)]
pub fn ApiError(status: StatusCode, message: String) -> ApiError {
    ApiError::new(status, message)
}

impl ApiError {
    /// An error whose kind follows from `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind: kind_of_status(status),
            message: message.into(),
        }
    }

    /// A `400 bad_request` error.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

/// Every `kind` an error body may carry, with its status. The library's
/// [`ErrorKind`]s come first (snake case), then the kinds of the HTTP layer.
pub const KINDS: &[(&str, u16)] = &[
    ("io", 500),
    ("invalid_format", 400),
    ("unsupported", 400),
    ("corrupt", 500),
    ("not_found", 404),
    ("conflict", 409),
    ("config", 400),
    ("cancelled", 409),
    ("full", 507),
    ("unreachable", 500),
    ("key_required", 403),
    ("wrong_key", 403),
    ("bad_request", 400),
    ("unauthorized", 401),
    ("forbidden", 403),
    ("method_not_allowed", 405),
    ("payload_too_large", 413),
    ("unsupported_media_type", 415),
    ("rate_limited", 429),
    ("internal", 500),
    ("unavailable", 503),
];

/// The `kind` of a library error kind: its name in snake case.
pub fn kind_of(k: ErrorKind) -> &'static str {
    k.as_str()
}

/// The `kind` of an error known only by its HTTP status (the router's, an extractor's
/// rejection, or a handler's own refusal).
pub fn kind_of_status(s: StatusCode) -> &'static str {
    match s.as_u16() {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        503 => "unavailable",
        507 => "full",
        400..500 => "bad_request",
        _ => "internal",
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let status = match e.kind() {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict | ErrorKind::Cancelled => StatusCode::CONFLICT,
            ErrorKind::Config | ErrorKind::InvalidFormat | ErrorKind::Unsupported => {
                StatusCode::BAD_REQUEST
            }
            ErrorKind::Full => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::KeyRequired | ErrorKind::WrongKey => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            kind: kind_of(e.kind()),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(error_body(self.kind, &self.message))).into_response()
    }
}

/// The one error body: `{"error": {"kind": KIND, "message": TEXT}}`.
pub fn error_body(kind: &str, message: &str) -> serde_json::Value {
    json!({"error": {"kind": kind, "message": message}})
}

/// Longest error text of the HTTP layer (an extractor's rejection) taken into a body.
const MAX_REJECTION_TEXT: usize = 4096;

/// Every error answer in the one JSON shape: an answer of status 400 or more that is
/// not JSON already (axum's extractor rejections — bad JSON, wrong content type, unknown
/// field, bad path or query, body over the limit — and the router's own 404/405) gets
/// its text as the message and its kind from its status. axum answers a body that is
/// JSON but not of the route's shape (a missing or unknown field, a wrong type) with
/// 422; handlers that check a body themselves answer 400 `bad_request`, so that
/// rejection becomes the same 400.
pub(super) async fn json_errors(resp: Response) -> Response {
    let mut status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        status = StatusCode::BAD_REQUEST;
    }
    let (mut parts, body) = resp.into_parts();
    parts.status = status;
    let text = match axum::body::to_bytes(body, MAX_REJECTION_TEXT).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    let body = error_body(kind_of_status(status), &message).to_string();
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}
