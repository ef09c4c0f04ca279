//! Which responses are stored for replay and which release the claim for a retry.

use http::StatusCode;
use http::response::Parts;

/// What happens to the claim once the handler has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreDecision {
    /// Complete the claim with this response: every retry with the key replays it.
    Store,
    /// Release the claim as a retryable failure: the next request with the key runs the
    /// handler again. The response itself still goes to the caller.
    Release,
}

/// Decides, from a response's status and headers, whether it is stored for replay or releases
/// the claim.
///
/// Implemented by [`DefaultStorePolicy`] and by every closure
/// `Fn(&http::response::Parts) -> StoreDecision`:
///
/// ```
/// use idemstore::http::{IdempotencyLayer, StoreDecision};
///
/// let store = idemstore::Store::in_memory()?;
/// // Store only successes; anything else may be retried.
/// let layer = IdempotencyLayer::new(store).store_policy(|response: &http::response::Parts| {
///     if response.status.is_success() { StoreDecision::Store } else { StoreDecision::Release }
/// });
/// # Ok::<(), idemstore::Error>(())
/// ```
pub trait StorePolicy: Send + Sync + 'static {
    /// The decision for this response.
    fn decide(&self, response: &Parts) -> StoreDecision;
}

impl<F> StorePolicy for F
where
    F: Fn(&Parts) -> StoreDecision + Send + Sync + 'static,
{
    fn decide(&self, response: &Parts) -> StoreDecision {
        self(response)
    }
}

/// The default policy: store every response except server errors (5xx), `408 Request Timeout`
/// and `429 Too Many Requests`, which release the claim so that the client's retry runs the
/// request again (the IETF Idempotency-Key draft and Stripe do the same).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultStorePolicy;

impl StorePolicy for DefaultStorePolicy {
    fn decide(&self, response: &Parts) -> StoreDecision {
        let status = response.status;
        if status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            StoreDecision::Release
        } else {
            StoreDecision::Store
        }
    }
}
