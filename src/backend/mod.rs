//! The backend-neutral async interface that middleware is written against (DESIGN §5).
//!
//! [`IdempotencyBackend`] is the part of the store that a request pipeline needs: claim a
//! `(scope, key)`, then finish the lease by completing it with an outcome or releasing it as a
//! retryable failure, and extend it while a slow request runs. The embedded engine
//! ([`Store`], on a file or in memory) implements it; a PostgreSQL or Redis backend for services
//! that outgrow one machine implements the same trait, building its leases with
//! [`Lease::from_parts`], and the middleware works unchanged on top of it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::core::claim::{Claim, ClaimOptions, Lease};
use crate::engine::Store;
use crate::error::Result;

/// An idempotency store as middleware sees it: the state machine of DESIGN §2 behind async
/// calls whose futures are `Send`, so they can run on a multi-threaded executor.
///
/// Every implementation must keep the engine's semantics:
///
/// - `claim` answers per the table in DESIGN §2 (acquire, replay, in progress, mismatch),
///   honouring [`ClaimOptions::wait`] with a bounded wait for an in-flight original;
/// - `complete`, `fail` and `extend` are fenced: they succeed only while the record still
///   carries the lease's token, and otherwise return [`Error::LeaseLost`](crate::Error::LeaseLost)
///   and change nothing;
/// - an acknowledged transition is durable at the backend's stated durability.
///
/// The futures must not block an executor thread: the embedded engine awaits its writer
/// thread instead.
///
/// ```
/// use idemstore::{Claim, ClaimOptions, IdempotencyBackend, Store};
/// use std::time::Duration;
///
/// async fn charge_once(backend: &impl IdempotencyBackend) -> idemstore::Result<Vec<u8>> {
///     let options = ClaimOptions::default();
///     match backend.claim(b"acct_42", b"order-1", b"fingerprint", &options).await? {
///         Claim::Acquired(lease) => {
///             let outcome = b"201 ch_1".to_vec(); // run the side effect here
///             backend.complete(&lease, &outcome, Duration::from_secs(3600)).await?;
///             Ok(outcome)
///         }
///         Claim::Replay(replay) => Ok(replay.outcome),
///         _ => Ok(b"409".to_vec()),
///     }
/// }
///
/// let store = Store::in_memory()?;
/// let runtime = tokio::runtime::Builder::new_current_thread().build()?;
/// let first = runtime.block_on(charge_once(&store))?;
/// let retry = runtime.block_on(charge_once(&store))?;
/// assert_eq!(first, retry);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait IdempotencyBackend: Send + Sync + 'static {
    /// Claims `(scope, key)` for the request identified by `fingerprint`: see
    /// [`Store::claim`] for the answers.
    ///
    /// # Errors
    /// Input errors (sizes, lease longer than retention) before anything is written; the
    /// backend's storage errors otherwise.
    fn claim(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> impl Future<Output = Result<Claim>> + Send;

    /// Completes the leased request with `outcome`, replayed to every duplicate for
    /// `retention`.
    ///
    /// # Errors
    /// [`Error::LeaseLost`](crate::Error::LeaseLost) if the lease no longer owns the record;
    /// [`Error::TooLarge`](crate::Error::TooLarge) for an outcome over the backend's limit;
    /// storage errors.
    fn complete(
        &self,
        lease: &Lease,
        outcome: &[u8],
        retention: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Releases the leased request as a retryable failure: the next claim with the same
    /// fingerprint runs it again.
    ///
    /// # Errors
    /// [`Error::LeaseLost`](crate::Error::LeaseLost) if the lease no longer owns the record;
    /// storage errors.
    fn fail(&self, lease: &Lease) -> impl Future<Output = Result<()>> + Send;

    /// Extends the lease to `by` from now and updates `lease` to match.
    ///
    /// # Errors
    /// [`Error::LeaseLost`](crate::Error::LeaseLost) if the lease no longer owns the record;
    /// an extension outside the lease limits; storage errors.
    fn extend(&self, lease: &mut Lease, by: Duration) -> impl Future<Output = Result<()>> + Send;
}

/// The embedded engine, on a file or in memory (`Store::builder().open_in_memory()`), through
/// its async operations: they await the writer thread and never block the executor.
impl IdempotencyBackend for Store {
    fn claim(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> impl Future<Output = Result<Claim>> + Send {
        self.claim_async(scope, key, fingerprint, options)
    }

    fn complete(
        &self,
        lease: &Lease,
        outcome: &[u8],
        retention: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        self.complete_async(lease, outcome, retention)
    }

    fn fail(&self, lease: &Lease) -> impl Future<Output = Result<()>> + Send {
        self.fail_async(lease)
    }

    fn extend(&self, lease: &mut Lease, by: Duration) -> impl Future<Output = Result<()>> + Send {
        self.extend_async(lease, by)
    }
}

/// A shared backend: middleware and application code can hold the same store.
impl<T: IdempotencyBackend> IdempotencyBackend for Arc<T> {
    fn claim(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> impl Future<Output = Result<Claim>> + Send {
        T::claim(self, scope, key, fingerprint, options)
    }

    fn complete(
        &self,
        lease: &Lease,
        outcome: &[u8],
        retention: Duration,
    ) -> impl Future<Output = Result<()>> + Send {
        T::complete(self, lease, outcome, retention)
    }

    fn fail(&self, lease: &Lease) -> impl Future<Output = Result<()>> + Send {
        T::fail(self, lease)
    }

    fn extend(&self, lease: &mut Lease, by: Duration) -> impl Future<Output = Result<()>> + Send {
        T::extend(self, lease, by)
    }
}
