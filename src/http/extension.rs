//! [`IdempotentRequest`]: the request extension a handler sees while it runs under a claim.

use std::future::Future;

use super::signal::LostSignal;
use crate::Lease;

/// What a handler learns about the claim it runs under, from the request extensions of every
/// request the layer executes: above all whether an earlier attempt may already have performed
/// the side effect, and whether this run has lost its lease.
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
///
/// # Lease lost
///
/// While the handler runs, the layer extends the request's lease. If it finds the lease lost
/// (another attempt took the key over, or the record is gone) or cannot extend it until it has
/// certainly run out, it sets the [lease-lost signal](Self::lease_lost): another attempt may be
/// running the same request from then on. A handler with a long or resumable side effect
/// should stop at the next safe point:
///
/// ```
/// use axum::Extension;
/// use http::StatusCode;
/// use idemstore::http::IdempotentRequest;
///
/// # async fn transfer_in_batches() {}
/// async fn long_export(Extension(claim): Extension<IdempotentRequest>) -> StatusCode {
///     tokio::select! {
///         () = transfer_in_batches() => StatusCode::CREATED,
///         // Another attempt owns the key now: stop, and let the client's retry see its result.
///         () = claim.lease_lost() => StatusCode::SERVICE_UNAVAILABLE,
///     }
/// }
/// ```
///
/// Whatever the handler does, a response produced after its lease was taken over is never
/// stored over the successor's record (the completion is fenced by the lease). A response the
/// [store policy](super::StorePolicy) would store is then replaced by 409
/// ([`ProblemType::LeaseLost`](super::ProblemType::LeaseLost)), and the client's retry gets the
/// successor's answer; one it would release (a 5xx, for example) goes to the client as it is.
///
/// # Equality
///
/// Two extensions are equal when they describe the same claim: same key, attempt, takeover
/// and checkpoint. The lease-lost signal is not compared.
#[derive(Debug, Clone)]
pub struct IdempotentRequest {
    key: String,
    attempt: u32,
    takeover: bool,
    checkpoint: Option<Vec<u8>>,
    lost: LostSignal,
}

impl IdempotentRequest {
    /// The extension for a request with `key` that runs under `lease`, told through `lost` when
    /// the lease is lost.
    pub(crate) fn new(key: String, lease: &Lease, lost: LostSignal) -> Self {
        IdempotentRequest {
            key,
            attempt: lease.attempt(),
            takeover: lease.is_takeover(),
            checkpoint: lease.checkpoint().map(<[u8]>::to_vec),
            lost,
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

    /// Whether the lease of this run is lost: the layer found it taken over or gone while
    /// extending it, or could not extend it until it had certainly run out. Once `true`, it
    /// stays `true`.
    ///
    /// An expired lease may still complete if nobody took the key over in the meantime (the
    /// completion is fenced, not timed), but another attempt may be running: stop where it is
    /// safe to.
    #[must_use]
    pub fn is_lease_lost(&self) -> bool {
        self.lost.is_set()
    }

    /// Resolves when the lease of this run is lost (at once if it is lost already): see
    /// [`is_lease_lost`](Self::is_lease_lost). It never resolves for a lease kept to the end.
    ///
    /// The future holds no borrow of the extension: it can be moved into a task or a
    /// `select!`, and dropping it is cheap.
    pub fn lease_lost(&self) -> impl Future<Output = ()> + Send + Unpin + use<> {
        self.lost.wait()
    }
}

impl PartialEq for IdempotentRequest {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
            && self.attempt == other.attempt
            && self.takeover == other.takeover
            && self.checkpoint == other.checkpoint
    }
}

impl Eq for IdempotentRequest {}
