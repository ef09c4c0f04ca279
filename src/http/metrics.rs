//! Counters of the layer's decisions, for export to any metrics system.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one [`IdempotencyLayer`](super::IdempotencyLayer) (shared by every service
/// it builds). Cloning is cheap and shares the counters; read them with
/// [`snapshot`](Metrics::snapshot) and export them to Prometheus, OpenTelemetry, logs.
///
/// ```
/// use idemstore::http::IdempotencyLayer;
///
/// let layer = IdempotencyLayer::new(idemstore::Store::in_memory()?);
/// let metrics = layer.metrics();
/// assert_eq!(metrics.snapshot().acquired, 0);
/// # Ok::<(), idemstore::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    passed_through: AtomicU64,
    acquired: AtomicU64,
    takeovers: AtomicU64,
    replayed: AtomicU64,
    in_flight: AtomicU64,
    mismatched: AtomicU64,
    rejected: AtomicU64,
    stored: AtomicU64,
    released: AtomicU64,
    not_stored: AtomicU64,
    lease_extensions: AtomicU64,
    leases_lost: AtomicU64,
    store_errors: AtomicU64,
}

/// The counters at one moment. Every counter only grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Requests passed to the service untouched: methods not covered, or no key when keys are
    /// optional.
    pub passed_through: u64,
    /// Claims acquired: the handler ran (first attempts, retries after a release, takeovers).
    pub acquired: u64,
    /// Of `acquired`, takeovers of a request whose previous owner was gone.
    pub takeovers: u64,
    /// Stored responses replayed (including 410s for responses too large to store).
    pub replayed: u64,
    /// 409 answers: the original was still in flight.
    pub in_flight: u64,
    /// 422 answers: the key was reused for another request.
    pub mismatched: u64,
    /// Requests rejected without running: missing or invalid key, no scope, unreadable body,
    /// body too large, a key or scope over the store's limits, scope over its record quota.
    pub rejected: u64,
    /// Responses stored for replay.
    pub stored: u64,
    /// Claims released for a retry: by the store policy, a handler error or panic, a dropped
    /// request, or a response body that failed.
    pub released: u64,
    /// Responses too large to store: the claim was completed without the body.
    pub not_stored: u64,
    /// Lease extensions made while slow handlers ran.
    pub lease_extensions: u64,
    /// Leases lost, each counted once: found taken over or removed (while extending,
    /// completing or releasing), or run out while every extension failed. The handler was
    /// told ([`IdempotentRequest::lease_lost`](super::IdempotentRequest::lease_lost)).
    pub leases_lost: u64,
    /// Store operations that failed (503 before running the handler, or a failed
    /// completion).
    pub store_errors: u64,
}

/// Names one counter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    PassedThrough,
    Acquired,
    Takeover,
    Replayed,
    InFlight,
    Mismatched,
    Rejected,
    Stored,
    Released,
    NotStored,
    LeaseExtension,
    LeaseLost,
    StoreError,
}

impl Metrics {
    /// A fresh set of counters, all zero.
    #[must_use]
    pub fn new() -> Self {
        Metrics::default()
    }

    /// The current values.
    #[must_use]
    pub fn snapshot(&self) -> MetricsSnapshot {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            passed_through: get(&c.passed_through),
            acquired: get(&c.acquired),
            takeovers: get(&c.takeovers),
            replayed: get(&c.replayed),
            in_flight: get(&c.in_flight),
            mismatched: get(&c.mismatched),
            rejected: get(&c.rejected),
            stored: get(&c.stored),
            released: get(&c.released),
            not_stored: get(&c.not_stored),
            lease_extensions: get(&c.lease_extensions),
            leases_lost: get(&c.leases_lost),
            store_errors: get(&c.store_errors),
        }
    }

    pub(crate) fn inc(&self, counter: Counter) {
        let c = &self.counters;
        let atomic = match counter {
            Counter::PassedThrough => &c.passed_through,
            Counter::Acquired => &c.acquired,
            Counter::Takeover => &c.takeovers,
            Counter::Replayed => &c.replayed,
            Counter::InFlight => &c.in_flight,
            Counter::Mismatched => &c.mismatched,
            Counter::Rejected => &c.rejected,
            Counter::Stored => &c.stored,
            Counter::Released => &c.released,
            Counter::NotStored => &c.not_stored,
            Counter::LeaseExtension => &c.lease_extensions,
            Counter::LeaseLost => &c.leases_lost,
            Counter::StoreError => &c.store_errors,
        };
        atomic.fetch_add(1, Ordering::Relaxed);
    }
}
