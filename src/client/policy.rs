//! What is worth another attempt: the [`RetryPolicy`] trait and its default.

use http::{HeaderMap, Method, StatusCode};

/// One finished attempt, as a [`RetryPolicy`] sees it.
///
/// ```
/// use http::Method;
/// use idemstore::client::{Attempt, DefaultRetryPolicy, RetryLayer, RetryPolicy};
///
/// // The default, but a `PATCH` is tried at most twice.
/// let layer = RetryLayer::new().policy(|attempt: &Attempt<'_>| {
///     (attempt.method() != Method::PATCH || attempt.number() < 2)
///         && DefaultRetryPolicy.should_retry(attempt)
/// });
/// # let _ = layer;
/// ```
#[derive(Debug)]
pub struct Attempt<'a> {
    pub(super) method: &'a Method,
    pub(super) number: u32,
    pub(super) outcome: Outcome<'a>,
}

impl<'a> Attempt<'a> {
    /// The request's method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// Which attempt this was: 1 for the first.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// What the attempt got back.
    pub fn outcome(&self) -> &Outcome<'a> {
        &self.outcome
    }
}

/// What an attempt got back: a response head, or an error instead of a response.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome<'a> {
    /// A response arrived.
    Response {
        /// Its status.
        status: StatusCode,
        /// Its headers.
        headers: &'a HeaderMap,
    },
    /// No response: the inner service failed (connection refused or reset, the connection
    /// closed before the response, ...) or the layer's [attempt
    /// timeout](super::RetryLayer::attempt_timeout) fired
    /// ([`RetryError::AttemptTimedOut`](super::RetryError::AttemptTimedOut)).
    Error(&'a (dyn std::error::Error + Send + Sync + 'static)),
}

/// Decides whether a finished attempt is worth another one.
///
/// The layer asks only about requests it may resend (a `POST`/`PATCH` it gave an
/// `Idempotency-Key`, or a method idempotent by definition when
/// [configured](super::RetryLayer::retry_idempotent_methods)), and only while attempts and
/// time remain: a policy decides *what* is transient, the layer decides *how often* and *how
/// long*. Closures `Fn(&Attempt<'_>) -> bool` are policies:
///
/// ```
/// use http::StatusCode;
/// use idemstore::client::{Attempt, DefaultRetryPolicy, Outcome, RetryLayer, RetryPolicy};
///
/// // Everything the default retries, and 404 too (a replica that has not caught up).
/// let layer = RetryLayer::new().policy(|attempt: &Attempt<'_>| {
///     matches!(attempt.outcome(), Outcome::Response { status: StatusCode::NOT_FOUND, .. })
///         || DefaultRetryPolicy.should_retry(attempt)
/// });
/// # let _ = layer;
/// ```
pub trait RetryPolicy: Send + Sync + 'static {
    /// Whether to try again after `attempt`.
    fn should_retry(&self, attempt: &Attempt<'_>) -> bool;
}

impl<F> RetryPolicy for F
where
    F: Fn(&Attempt<'_>) -> bool + Send + Sync + 'static,
{
    fn should_retry(&self, attempt: &Attempt<'_>) -> bool {
        self(attempt)
    }
}

/// The default [`RetryPolicy`]: retry what may succeed later, never what the server has
/// refused for good.
///
/// | outcome | retried | why |
/// |---|---|---|
/// | an error (no response) | yes | the request is idempotent, so resending is safe |
/// | 408 Request Timeout | yes | the server gave up waiting, not on the request |
/// | 409 Conflict | yes | with an `Idempotency-Key`: the original is still in flight |
/// | 429 Too Many Requests | yes | rate limited; `Retry-After` says when |
/// | 5xx but 501 | yes | a server or gateway failure (the server's idempotency layer stores none of them) |
/// | 501 Not Implemented | no | the server does not support the method; it never will on retry |
/// | any other 4xx (400, 401, 403, 404, 422, ...) | no | final: the same request fails the same way |
/// | 1xx, 2xx, 3xx | no | an answer |
/// | any response with `Idempotent-Replayed: true` | no | the server stored it as the request's answer: every retry gets it again |
///
/// ```
/// use http::{HeaderMap, Method, StatusCode};
/// use idemstore::client::{DefaultRetryPolicy, RetryPolicy};
///
/// assert!(DefaultRetryPolicy::is_retryable_status(StatusCode::SERVICE_UNAVAILABLE));
/// assert!(DefaultRetryPolicy::is_retryable_status(StatusCode::CONFLICT));
/// assert!(!DefaultRetryPolicy::is_retryable_status(StatusCode::UNPROCESSABLE_ENTITY));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultRetryPolicy;

impl DefaultRetryPolicy {
    /// Whether the default retries a response with this status (see the table above).
    pub fn is_retryable_status(status: StatusCode) -> bool {
        match status {
            StatusCode::REQUEST_TIMEOUT | StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS => {
                true
            }
            StatusCode::NOT_IMPLEMENTED => false,
            status => status.is_server_error(),
        }
    }
}

impl RetryPolicy for DefaultRetryPolicy {
    fn should_retry(&self, attempt: &Attempt<'_>) -> bool {
        match attempt.outcome() {
            Outcome::Response { status, headers } => {
                Self::is_retryable_status(*status) && !is_replay(headers)
            }
            Outcome::Error(_) => true,
        }
    }
}

/// Whether a response is a replay of a stored answer (`Idempotent-Replayed: true`, as the
/// server layer and Stripe mark them).
fn is_replay(headers: &HeaderMap) -> bool {
    headers
        .get("idempotent-replayed")
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"))
}
