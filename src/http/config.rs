//! The layer's plain settings and their defaults.

use std::time::Duration;

use http::header::{DATE, SET_COOKIE};
use http::{HeaderName, Method};

use super::key::IDEMPOTENCY_KEY;
use crate::ClaimOptions;

/// Default lease of a running request (extended every third of it while the handler runs).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default retention of a completed request's response: 24 hours, as Stripe keeps keys.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Default limit of a covered request's body: 1 MiB.
pub const DEFAULT_REQUEST_BODY_LIMIT_BYTES: usize = 1024 * 1024;
/// Default limit of a stored response (status, headers and body as encoded): 1 MiB, the
/// engine's default outcome limit.
pub const DEFAULT_STORED_RESPONSE_LIMIT_BYTES: usize = 1024 * 1024;
/// Default cap of the `Retry-After` of a 409: 1 second.
pub const DEFAULT_RETRY_AFTER_MAX: Duration = Duration::from_secs(1);

/// The settings of a layer that are plain values.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) require_key: bool,
    pub(crate) key_header: HeaderName,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) claim: ClaimOptions,
    pub(crate) retention: Duration,
    pub(crate) retry_after_max: Duration,
    pub(crate) request_body_limit_bytes: usize,
    pub(crate) stored_response_limit_bytes: usize,
    pub(crate) deny_headers: Vec<HeaderName>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            methods: vec![Method::POST, Method::PATCH],
            require_key: false,
            key_header: IDEMPOTENCY_KEY,
            fingerprint_headers: Vec::new(),
            claim: ClaimOptions::default()
                .lease(DEFAULT_LEASE)
                .retention(DEFAULT_RETENTION),
            retention: DEFAULT_RETENTION,
            retry_after_max: DEFAULT_RETRY_AFTER_MAX,
            request_body_limit_bytes: DEFAULT_REQUEST_BODY_LIMIT_BYTES,
            stored_response_limit_bytes: DEFAULT_STORED_RESPONSE_LIMIT_BYTES,
            deny_headers: vec![DATE, SET_COOKIE],
        }
    }
}
