//! The errors the retry layer adds to those of the inner service.

use std::fmt;
use std::time::Duration;

/// A type-erased error, as tower middleware returns them: the inner service's own error (for
/// example hyper-util's `Error`) or a [`RetryError`]; find out which with
/// `error.downcast_ref::<RetryError>()`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in the layer itself, rather than in the inner service.
///
/// The inner service's errors are passed through unchanged (boxed as a [`BoxError`]); these are
/// the layer's own.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use idemstore::client::{BoxError, ClientBody, RetryError, RetryLayer};
/// use tower::{Layer, ServiceExt, service_fn};
///
/// // A server that never answers.
/// let silent = service_fn(|_: Request<ClientBody<Full<Bytes>>>| async {
///     std::future::pending::<Result<Response<String>, BoxError>>().await
/// });
/// let client = RetryLayer::new().total_time(Duration::from_secs(5)).layer(silent);
///
/// let error = client.oneshot(Request::post("/v1/charges").body(Full::new(Bytes::new()))?).await;
/// let error = error.expect_err("no answer within 5 s");
/// assert!(matches!(
///     error.downcast_ref::<RetryError>(),
///     Some(RetryError::TotalTimeElapsed { attempts: 1, .. })
/// ));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum RetryError {
    /// The [total time](super::RetryLayer::total_time) ran out while an attempt was in flight;
    /// that attempt was abandoned. For a request sent with an `Idempotency-Key` this is safe to
    /// retry later with the same key: the server either ran it once or not at all. (To know the
    /// key, set it yourself: [`new_key`](super::new_key).)
    TotalTimeElapsed {
        /// Attempts started, the abandoned one included.
        attempts: u32,
        /// The configured total time.
        total_time: Duration,
    },
    /// One attempt took longer than the [attempt timeout](super::RetryLayer::attempt_timeout)
    /// and was abandoned. The [`RetryPolicy`](super::RetryPolicy) sees it as an error outcome
    /// (the default retries it); it is returned when it was the last attempt.
    AttemptTimedOut {
        /// The configured attempt timeout.
        timeout: Duration,
    },
    /// Reading the request body to buffer it failed; nothing was sent.
    RequestBody(BoxError),
}

impl fmt::Display for RetryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryError::TotalTimeElapsed {
                attempts,
                total_time,
            } => write!(
                f,
                "the request's total time of {total_time:?} ran out during attempt {attempts}"
            ),
            RetryError::AttemptTimedOut { timeout } => {
                write!(f, "an attempt got no response within {timeout:?}")
            }
            RetryError::RequestBody(_) => f.write_str("reading the request body failed"),
        }
    }
}

impl std::error::Error for RetryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RetryError::RequestBody(source) => Some(&**source),
            RetryError::TotalTimeElapsed { .. } | RetryError::AttemptTimedOut { .. } => None,
        }
    }
}
