//! Stripe-shaped error responses: `{"error": {"type", "message", "code"?, "param"?}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error response in Stripe's shape.
pub fn stripe_error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
    message: &str,
) -> Response {
    let mut error = json!({ "type": kind, "message": message });
    if let Some(code) = code {
        error["code"] = code.into();
    }
    if let Some(param) = param {
        error["param"] = param.into();
    }
    (status, axum::Json(json!({ "error": error }))).into_response()
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
