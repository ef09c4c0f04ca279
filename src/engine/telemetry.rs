//! What the engine reports to the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`). Without the feature every function here is empty and compiles away; with it and
//! no recorder installed, each is an atomic load.
//!
//! The metrics are listed in the crate docs ("Metrics"), which are the reference.
//!
//! Each store reports under the same names; a process with several stores sees their sum (the
//! facade has no per-store scope: install a recorder per process).

#[cfg(feature = "metrics")]
use std::time::Duration;

use crate::core::claim::Claim;

/// A claim was answered.
pub(crate) fn claim_answered(claim: &Claim) {
    #[cfg(feature = "metrics")]
    {
        let answer = match claim {
            Claim::Acquired(_) => "acquired",
            Claim::Replay(_) => "replay",
            Claim::InProgress { .. } => "in_progress",
            Claim::Mismatch => "mismatch",
        };
        metrics::counter!("idemstore_claims_total", "answer" => answer).increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = claim;
}

/// A lease write was refused by fencing.
pub(crate) fn lease_lost() {
    #[cfg(feature = "metrics")]
    metrics::counter!("idemstore_lease_lost_total").increment(1);
}

/// A batch of `operations` was committed in `elapsed`.
pub(crate) fn committed(operations: usize, durable: bool, elapsed: std::time::Duration) {
    #[cfg(feature = "metrics")]
    {
        let durable = if durable { "true" } else { "false" };
        metrics::counter!("idemstore_commits_total", "durable" => durable).increment(1);
        metrics::histogram!("idemstore_commit_operations").record(operations as f64);
        metrics::histogram!("idemstore_commit_seconds", "durable" => durable)
            .record(Duration::as_secs_f64(&elapsed));
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (operations, durable, elapsed);
}

/// A batch failed to commit; the store is poisoned.
pub(crate) fn commit_failed() {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("idemstore_commit_failures_total").increment(1);
        metrics::gauge!("idemstore_poisoned").set(1.0);
    }
}

/// The store was opened (and is not poisoned).
pub(crate) fn opened() {
    #[cfg(feature = "metrics")]
    metrics::gauge!("idemstore_poisoned").set(0.0);
}

/// What the commit queue holds after the writer took a batch.
pub(crate) fn queue(queue: &crate::engine::queue::Queue) {
    #[cfg(feature = "metrics")]
    {
        metrics::gauge!("idemstore_queue_depth").set(queue.len() as f64);
        metrics::gauge!("idemstore_queue_bytes").set(queue.bytes() as f64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = queue;
}

/// A sweep removed `removed` records.
pub(crate) fn swept(removed: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idemstore_swept_total").increment(removed as u64);
    #[cfg(not(feature = "metrics"))]
    let _ = removed;
}
