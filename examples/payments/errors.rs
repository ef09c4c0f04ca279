//! Stripe-shaped error responses: `{"error": {"type", "message", "code"?, "param"?}}`, for the
//! API's own errors and, through [`render_problem`], for the answers the idempotency layer makes
//! itself, so that Stripe's SDKs raise their own errors (`IdempotencyError` for a reused key).

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use idemstore::http::{Problem, ProblemType};
use serde_json::{Value, json};

/// The body of an error in Stripe's shape.
fn error_body(kind: &str, code: Option<&str>, param: Option<&str>, message: &str) -> Value {
    let mut error = json!({ "type": kind, "message": message });
    if let Some(code) = code {
        error["code"] = code.into();
    }
    if let Some(param) = param {
        error["param"] = param.into();
    }
    json!({ "error": error })
}

/// An error response in Stripe's shape.
pub fn stripe_error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
    message: &str,
) -> Response {
    (status, axum::Json(error_body(kind, code, param, message))).into_response()
}

/// The idempotency layer's own answers as Stripe answers them (its renderer, see
/// [`IdempotencyLayer::render_errors`](idemstore::http::IdempotencyLayer::render_errors)):
///
/// | the layer's answer | status | `type` (`code`) | Stripe's SDKs raise |
/// | --- | --- | --- | --- |
/// | key reused with other parameters | 400 | `idempotency_error` | `IdempotencyError` |
/// | original still in flight | 409 | `idempotency_error` (`idempotency_key_in_use`) | retried, then `APIError` |
/// | superseded (lease lost) | 409 | `idempotency_error` | retried, then `APIError` |
/// | key missing or invalid, body unreadable or too large | 400, 413 | `invalid_request_error` | `InvalidRequestError` (400) |
/// | too many records | 429 | `invalid_request_error` (`rate_limit`) | `RateLimitError` |
/// | store unavailable, stored answer unreadable or not stored | 503, 500, 410 | `api_error` | `APIError` (5xx retried) |
///
/// The messages of the first two are Stripe's own; the others are in Stripe's style. The
/// layer adds `Retry-After` to the 409s itself.
pub fn render_problem(problem: &Problem) -> axum::http::Response<Bytes> {
    let key = problem.key().unwrap_or_default();
    let (status, body) = match problem.kind() {
        ProblemType::KeyReused => (
            StatusCode::BAD_REQUEST,
            error_body(
                "idempotency_error",
                None,
                None,
                &format!(
                    "Keys for idempotent requests can only be used with the same parameters they \
                     were first used with. Try using a key other than '{key}' if you meant to \
                     execute a different request."
                ),
            ),
        ),
        ProblemType::InFlight => (
            StatusCode::CONFLICT,
            error_body(
                "idempotency_error",
                Some("idempotency_key_in_use"),
                None,
                &format!(
                    "There is currently another in-progress request using this Idempotent Key \
                     (that probably means you submitted twice, and the other request is still \
                     going through): {key}. Please try again later."
                ),
            ),
        ),
        ProblemType::LeaseLost => (
            StatusCode::CONFLICT,
            error_body(
                "idempotency_error",
                None,
                None,
                &format!(
                    "This request took too long and another request using this Idempotent Key \
                     took over: {key}. Please try again to get that request's result."
                ),
            ),
        ),
        ProblemType::MissingKey => (
            StatusCode::BAD_REQUEST,
            error_body(
                "invalid_request_error",
                None,
                None,
                "This request requires an Idempotency-Key header.",
            ),
        ),
        ProblemType::InvalidKey => (
            StatusCode::BAD_REQUEST,
            error_body(
                "invalid_request_error",
                None,
                None,
                &format!(
                    "Invalid Idempotency-Key: {}. Keys are 1 to 255 visible ASCII characters, \
                     sent once.",
                    problem.detail()
                ),
            ),
        ),
        ProblemType::QuotaExceeded => (
            StatusCode::TOO_MANY_REQUESTS,
            error_body(
                "invalid_request_error",
                Some("rate_limit"),
                None,
                "Too many idempotent requests for this account. Please try again later.",
            ),
        ),
        kind => {
            let status = problem.status();
            let kind_name = if status.is_server_error() || kind == ProblemType::ResponseNotStored {
                "api_error"
            } else {
                "invalid_request_error"
            };
            let message = capitalized(problem.detail());
            (
                status,
                error_body(kind_name, None, None, &format!("{message}.")),
            )
        }
    };
    let mut response = axum::http::Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `text` with its first letter in upper case.
fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// A 400 for a required parameter the request lacks.
pub fn missing_param(param: &str) -> Response {
    stripe_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("parameter_missing"),
        Some(param),
        &format!("Missing required param: {param}."),
    )
}

/// A 400 for a parameter with an invalid value.
pub fn invalid_param(param: &str, code: &str, message: &str) -> Response {
    stripe_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some(code),
        Some(param),
        message,
    )
}

/// A 400 for a parameter the endpoint does not take.
pub fn unknown_param(param: &str) -> Response {
    stripe_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("parameter_unknown"),
        Some(param),
        &format!("Received unknown parameter: {param}"),
    )
}

/// A 500: the idempotency layer releases the claim, so the client's retry runs again.
pub fn api_error(message: &str) -> Response {
    stripe_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "api_error",
        None,
        None,
        message,
    )
}
