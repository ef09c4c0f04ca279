//! The backend-neutral async interface that middleware and services are written against
//! (DESIGN §5).
//!
//! [`IdempotencyBackend`] has two parts:
//!
//! - the **request path** a pipeline needs: [`claim`](IdempotencyBackend::claim) a
//!   `(scope, key)`, [`checkpoint`](IdempotencyBackend::checkpoint) progress and
//!   [`extend`](IdempotencyBackend::extend) the lease while it runs, then
//!   [`complete`](IdempotencyBackend::complete) it with an outcome or
//!   [`fail`](IdempotencyBackend::fail) it retryably;
//! - the **administrative part**: [`get`](IdempotencyBackend::get),
//!   [`forget`](IdempotencyBackend::forget), [`orphans`](IdempotencyBackend::orphans),
//!   [`sweep`](IdempotencyBackend::sweep), and [`capabilities`](IdempotencyBackend::capabilities),
//!   which says what a backend cannot do cheaply.
//!
//! Implementations: the embedded engine ([`Store`], on a file or in memory) and, behind cargo
//! features, PostgreSQL (`postgres`). Each one checks its input with the same public checks
//! of [`Limits`] before it queues, writes or sends anything, so every backend refuses the same
//! inputs with the same errors. A remote backend builds the leases it grants with
//! [`Lease::from_parts`].
//!
//! The trait uses `async fn`-style methods with `Send` futures, so it is not object safe;
//! [`AnyBackend`] is its boxed form, for a service that picks its backend at run time from
//! configuration.

mod dynamic;
#[cfg(any(feature = "postgres", feature = "redis"))]
mod poll;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use dynamic::{AnyBackend, BoxFuture, DynBackend};

use crate::core::admin::{Orphan, Swept};
use crate::core::claim::{Claim, ClaimOptions, Lease};
use crate::core::record::Record;
use crate::engine::Store;
use crate::error::Result;
use crate::limits::Limits;

/// What a backend can and cannot do cheaply, from [`IdempotencyBackend::capabilities`].
///
/// Every backend implements every method; these say what a call costs or how far a guarantee
/// reaches, so that a service can decide, for example, whether to run a sweeper.
///
/// ```
/// use idemstore::{IdempotencyBackend, Store};
///
/// let store = Store::in_memory()?;
/// let caps = store.capabilities();
/// assert_eq!(caps.name, "memory");
/// assert!(!caps.shared && caps.needs_sweep);
/// # Ok::<(), idemstore::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// A short name: `"file"`, `"memory"`, `"postgres"`, `"redis"`.
    pub name: &'static str,
    /// Whether several processes (on several machines) can use the same store at once. If
    /// not, a second process cannot open it ([`Error::AlreadyOpen`](crate::Error::AlreadyOpen)).
    pub shared: bool,
    /// Whether an acknowledged write survives a crash of the process (and, for a server, of the
    /// server) at the backend's configuration. `false` for the in-memory store.
    pub durable: bool,
    /// Whether expired records occupy space until [`sweep`](IdempotencyBackend::sweep) removes
    /// them. `false` when the store drops them by itself; `sweep` is then a cheap no-op.
    pub needs_sweep: bool,
    /// Whether [`orphans`](IdempotencyBackend::orphans) scans every record (run it at start-up
    /// or rarely) rather than reading an index.
    pub orphans_scan: bool,
    /// Whether a duplicate's bounded wait ([`ClaimOptions::wait`]) is woken when the original
    /// finishes (`true`), or polls with backoff bounded by the original's lease (`false`).
    pub wakes_waiters: bool,
    /// Whether the per-scope quota ([`Limits::max_records_per_scope`]) is exact under
    /// concurrent claims of new keys in one scope. When `false` it may be overshot by the
    /// number of such claims racing each other.
    pub exact_quota: bool,
}

/// An idempotency store as middleware and services see it: the state machine of DESIGN §2
/// behind async calls whose futures are `Send`, so they can run on a multi-threaded executor.
///
/// Every implementation must keep the engine's semantics; the conformance suite
/// (`tests/conformance/`) runs the same cases on each of them:
///
/// - every call checks its input with [`Limits`] (the `check_*` methods) before anything is
///   queued, written or sent;
/// - `claim` answers per the table in DESIGN §2 (acquire, replay, in progress, mismatch),
///   honouring [`ClaimOptions::wait`] with a bounded wait for an in-flight original;
/// - `complete`, `fail`, `extend` and `checkpoint` are fenced: they succeed only while the
///   record is in flight under the lease's token and not expired, and otherwise return
///   [`Error::LeaseLost`](crate::Error::LeaseLost) and change nothing;
/// - a record past its expiry is absent to every call, swept or not;
/// - an acknowledged transition is durable at the backend's stated durability;
/// - a remote store reports a lost connection as
///   [`Error::Unavailable`](crate::Error::Unavailable) (nothing happened) or
///   [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown) (the request was sent), never as a
///   success and never as a fatal error.
///
/// The futures must not block an executor thread for long: the embedded engine awaits its
/// writer thread (its reads, `get` and `orphans`, run inline on the committed snapshot).
///
/// ```
/// use idemstore::{Claim, ClaimOptions, IdempotencyBackend, Store};
/// use std::time::Duration;
///
/// async fn charge_once(backend: &impl IdempotencyBackend) -> idemstore::Result<Vec<u8>> {
///     let options = ClaimOptions::default();
///     match backend.claim(b"acct_42", b"order-1", b"fingerprint", &options).await? {
///         Claim::Acquired(lease) => {
///             backend.checkpoint(&lease, b"step 1 done").await?;
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
/// // The inherent `Store::get` is blocking; the trait's is async.
/// let record = runtime.block_on(IdempotencyBackend::get(&store, b"acct_42", b"order-1"))?;
/// assert!(record.is_some());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait IdempotencyBackend: Send + Sync + 'static {
    // ----- the request path -----

    /// Claims `(scope, key)` for the request identified by `fingerprint`: see
    /// [`Store::claim`] for the answers.
    ///
    /// # Errors
    /// Input errors (sizes, lease longer than retention) before anything is written; the
    /// backend's storage or connection errors otherwise.
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
    /// storage or connection errors.
    fn complete(
        &self,
        lease: &Lease,
        outcome: &[u8],
        retention: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Releases the leased request as a retryable failure: the next claim with the same
    /// fingerprint runs it again (and receives the last checkpoint).
    ///
    /// # Errors
    /// [`Error::LeaseLost`](crate::Error::LeaseLost) if the lease no longer owns the record;
    /// storage or connection errors.
    fn fail(&self, lease: &Lease) -> impl Future<Output = Result<()>> + Send;

    /// Extends the lease to `by` from now and updates `lease` to match.
    ///
    /// # Errors
    /// [`Error::LeaseLost`](crate::Error::LeaseLost) if the lease no longer owns the record;
    /// an extension outside the lease limits; storage or connection errors.
    fn extend(&self, lease: &mut Lease, by: Duration) -> impl Future<Output = Result<()>> + Send;

    /// Stores a recovery point of a multi-step operation; whoever takes the record over or
    /// retries it after `fail` receives it in [`Lease::checkpoint`]. See [`Store::checkpoint`].
    ///
    /// # Errors
    /// [`Error::LeaseLost`](crate::Error::LeaseLost) if the lease no longer owns the record;
    /// [`Error::TooLarge`](crate::Error::TooLarge) for a checkpoint over the limit; storage or
    /// connection errors.
    fn checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &[u8],
    ) -> impl Future<Output = Result<()>> + Send;

    // ----- administration -----

    /// The live record of `(scope, key)`, or `None` if there is none or it has expired.
    ///
    /// # Errors
    /// Bad scope or key sizes; storage or connection errors.
    fn get(&self, scope: &[u8], key: &[u8]) -> impl Future<Output = Result<Option<Record>>> + Send;

    /// Removes the record of `(scope, key)` whatever its state; returns whether a live record
    /// was there. An in-flight owner's later writes then fail with
    /// [`Error::LeaseLost`](crate::Error::LeaseLost).
    ///
    /// # Errors
    /// Bad scope or key sizes; storage or connection errors.
    fn forget(&self, scope: &[u8], key: &[u8]) -> impl Future<Output = Result<bool>> + Send;

    /// In-flight records whose owner is gone (lease ended, or the owner closed), at most
    /// `limit`, with their checkpoints: the requests to reconcile. See [`Store::orphans`] and
    /// [`Capabilities::orphans_scan`] for the cost.
    ///
    /// # Errors
    /// Storage or connection errors.
    fn orphans(&self, limit: usize) -> impl Future<Output = Result<Vec<Orphan>>> + Send;

    /// Removes up to `limit` expired records, oldest first, at a cost proportional to `limit`.
    /// [`Swept::more`] says whether due records remain. A backend that expires records by
    /// itself ([`Capabilities::needs_sweep`] is `false`) returns an empty [`Swept`].
    ///
    /// # Errors
    /// Storage or connection errors.
    fn sweep(&self, limit: usize) -> impl Future<Output = Result<Swept>> + Send;

    /// What this backend can and cannot do cheaply.
    fn capabilities(&self) -> Capabilities;

    /// The limits this backend checks its input against.
    fn limits(&self) -> &Limits;
}

/// The embedded engine, on a file or in memory (`Store::builder().open_in_memory()`), through
/// its async operations: they await the writer thread and its reader threads, and never block
/// the executor.
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

    fn checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &[u8],
    ) -> impl Future<Output = Result<()>> + Send {
        self.checkpoint_async(lease, checkpoint)
    }

    fn get(&self, scope: &[u8], key: &[u8]) -> impl Future<Output = Result<Option<Record>>> + Send {
        self.get_async(scope, key)
    }

    fn forget(&self, scope: &[u8], key: &[u8]) -> impl Future<Output = Result<bool>> + Send {
        self.forget_async(scope, key)
    }

    fn orphans(&self, limit: usize) -> impl Future<Output = Result<Vec<Orphan>>> + Send {
        self.orphans_async(limit)
    }

    fn sweep(&self, limit: usize) -> impl Future<Output = Result<Swept>> + Send {
        self.sweep_async(limit)
    }

    fn capabilities(&self) -> Capabilities {
        let memory = self.kind == "memory";
        Capabilities {
            name: self.kind,
            shared: false,
            durable: !memory,
            needs_sweep: true,
            orphans_scan: true,
            wakes_waiters: true,
            exact_quota: true,
        }
    }

    fn limits(&self) -> &Limits {
        Store::limits(self)
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

    fn checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &[u8],
    ) -> impl Future<Output = Result<()>> + Send {
        T::checkpoint(self, lease, checkpoint)
    }

    fn get(&self, scope: &[u8], key: &[u8]) -> impl Future<Output = Result<Option<Record>>> + Send {
        T::get(self, scope, key)
    }

    fn forget(&self, scope: &[u8], key: &[u8]) -> impl Future<Output = Result<bool>> + Send {
        T::forget(self, scope, key)
    }

    fn orphans(&self, limit: usize) -> impl Future<Output = Result<Vec<Orphan>>> + Send {
        T::orphans(self, limit)
    }

    fn sweep(&self, limit: usize) -> impl Future<Output = Result<Swept>> + Send {
        T::sweep(self, limit)
    }

    fn capabilities(&self) -> Capabilities {
        T::capabilities(self)
    }

    fn limits(&self) -> &Limits {
        T::limits(self)
    }
}
