//! [`IdempotentRequest`]: the request extension a handler sees while it runs under a claim.

use crate::Lease;

/// What a handler learns about the claim it runs under, from the request extensions of every
/// request the layer executes: above all whether an earlier attempt may already have performed
/// the side effect.
///
/// `attempt` is 1 for the first run. A higher attempt follows a released claim (a stored
/// policy release, an error, a panic, a dropped request) or a takeover of a request whose owner
/// died ([`is_takeover`](Self::is_takeover)): the earlier attempt may have run some or all of
/// the side effect, so check the downstream system (reconcile) before repeating it.
///
/// ```
/// use axum::Extension;
/// use idemstore::http::IdempotentRequest;
///
/// async fn create_charge(Extension(claim): Extension<IdempotentRequest>) -> &'static str {
///     if claim.attempt() > 1 {
///         // look the charge up by `claim.key()` before creating it again
///     }
///     "ok"
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentRequest {
    key: String,
    attempt: u32,
    takeover: bool,
    checkpoint: Option<Vec<u8>>,
}

impl IdempotentRequest {
    /// The extension for a request with `key` that runs under `lease`.
    pub(crate) fn new(key: String, lease: &Lease) -> Self {
        IdempotentRequest {
            key,
            attempt: lease.attempt(),
            takeover: lease.is_takeover(),
            checkpoint: lease.checkpoint().map(<[u8]>::to_vec),
        }
    }

    /// The idempotency key of the request (without `sf-string` quotes).
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Which attempt this is: 1 for the first run.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether this run took over a request whose previous owner was gone (its lease ran out,
    /// or its process died).
    #[must_use]
    pub fn is_takeover(&self) -> bool {
        self.takeover
    }

    /// The recovery point left by a previous attempt, if any.
    #[must_use]
    pub fn checkpoint(&self) -> Option<&[u8]> {
        self.checkpoint.as_deref()
    }
}
