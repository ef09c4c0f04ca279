//! What the engine reports to the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`). Without the feature every method here is empty and compiles away; with it, each
//! builds its metric's key (the `store` label is shared, not copied) and hands it to whatever
//! recorder is installed (none: nothing more).
//!
//! The metrics are listed in the crate docs ("Metrics"), which are the reference. Each carries
//! a `store` label naming the store it comes from
//! ([`StoreBuilder::metrics_label`](crate::StoreBuilder::metrics_label)), so that several
//! stores of one process report apart: a gauge set by one store is not overwritten by another.

#[cfg(feature = "metrics")]
use std::time::Duration;

use crate::core::claim::Claim;

/// Where one store's metrics go: the value of their `store` label. Empty without the
/// `metrics` feature.
#[derive(Debug, Clone)]
pub(crate) struct Telemetry {
    #[cfg(feature = "metrics")]
    store: metrics::SharedString,
}

impl Telemetry {
    /// Reports labelled `store = name`.
    pub(crate) fn new(name: &str) -> Telemetry {
        #[cfg(feature = "metrics")]
        {
            Telemetry {
                store: metrics::SharedString::from(std::sync::Arc::<str>::from(name)),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = name;
            Telemetry {}
        }
    }

    /// A claim was answered.
    pub(crate) fn claim_answered(&self, claim: &Claim) {
        #[cfg(feature = "metrics")]
        {
            let answer = match claim {
                Claim::Acquired(_) => "acquired",
                Claim::Replay(_) => "replay",
                Claim::InProgress { .. } => "in_progress",
                Claim::Mismatch => "mismatch",
            };
            metrics::counter!("idemstore_claims_total", "store" => self.store.clone(), "answer" => answer).increment(1);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = claim;
    }

    /// A lease write was refused by fencing.
    pub(crate) fn lease_lost(&self) {
        #[cfg(feature = "metrics")]
        metrics::counter!("idemstore_lease_lost_total", "store" => self.store.clone()).increment(1);
    }

    /// A batch of `operations` was committed in `elapsed`.
    pub(crate) fn committed(&self, operations: usize, durable: bool, elapsed: std::time::Duration) {
        #[cfg(feature = "metrics")]
        {
            let durable = if durable { "true" } else { "false" };
            metrics::counter!("idemstore_commits_total", "store" => self.store.clone(), "durable" => durable).increment(1);
            metrics::histogram!("idemstore_commit_operations", "store" => self.store.clone())
                .record(operations as f64);
            metrics::histogram!("idemstore_commit_seconds", "store" => self.store.clone(), "durable" => durable)
                .record(Duration::as_secs_f64(&elapsed));
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (operations, durable, elapsed);
    }

    /// A batch failed to commit; the store is poisoned.
    pub(crate) fn commit_failed(&self) {
        #[cfg(feature = "metrics")]
        {
            metrics::counter!("idemstore_commit_failures_total", "store" => self.store.clone())
                .increment(1);
            metrics::gauge!("idemstore_poisoned", "store" => self.store.clone()).set(1.0);
        }
    }

    /// The store was opened (and is not poisoned).
    pub(crate) fn opened(&self) {
        #[cfg(feature = "metrics")]
        metrics::gauge!("idemstore_poisoned", "store" => self.store.clone()).set(0.0);
    }

    /// What the commit queue holds after the writer took a batch.
    pub(crate) fn queue(&self, queue: &crate::engine::queue::Queue) {
        #[cfg(feature = "metrics")]
        {
            metrics::gauge!("idemstore_queue_depth", "store" => self.store.clone())
                .set(queue.len() as f64);
            metrics::gauge!("idemstore_queue_bytes", "store" => self.store.clone())
                .set(queue.bytes() as f64);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = queue;
    }

    /// A sweep removed `removed` records.
    pub(crate) fn swept(&self, removed: usize) {
        #[cfg(feature = "metrics")]
        metrics::counter!("idemstore_swept_total", "store" => self.store.clone())
            .increment(removed as u64);
        #[cfg(not(feature = "metrics"))]
        let _ = removed;
    }

    /// The write-ahead log's sync took `took`.
    pub(crate) fn log_synced(&self, took: std::time::Duration) {
        #[cfg(feature = "metrics")]
        metrics::histogram!("idemstore_log_sync_seconds", "store" => self.store.clone())
            .record(Duration::as_secs_f64(&took));
        #[cfg(not(feature = "metrics"))]
        let _ = took;
    }

    /// A checkpoint wrote the record map into the database file in `took`.
    pub(crate) fn checkpointed(&self, took: std::time::Duration) {
        #[cfg(feature = "metrics")]
        {
            metrics::counter!("idemstore_checkpoints_total", "store" => self.store.clone())
                .increment(1);
            metrics::histogram!("idemstore_checkpoint_seconds", "store" => self.store.clone())
                .record(Duration::as_secs_f64(&took));
        }
        #[cfg(not(feature = "metrics"))]
        let _ = took;
    }

    /// A scrub verified the database file's pages: `result` is `ok`, `damaged` or `unreadable`.
    pub(crate) fn scrubbed(&self, result: &'static str) {
        #[cfg(feature = "metrics")]
        metrics::counter!("idemstore_scrubs_total", "store" => self.store.clone(), "result" => result).increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = result;
    }

    /// The write-ahead log's figures, as the checkpointer saw them after a checkpoint or an idle
    /// interval.
    pub(crate) fn wal_figures(&self, figures: &crate::engine::storage::wal::WalStats) {
        #[cfg(feature = "metrics")]
        {
            metrics::gauge!("idemstore_wal_map_bytes", "store" => self.store.clone())
                .set(figures.map_bytes as f64);
            metrics::gauge!("idemstore_wal_read_cache_bytes", "store" => self.store.clone())
                .set(figures.cache_bytes as f64);
            metrics::gauge!("idemstore_wal_log_bytes", "store" => self.store.clone())
                .set(figures.log_bytes as f64);
            metrics::gauge!("idemstore_checkpoint_lag_bytes", "store" => self.store.clone())
                .set(figures.checkpoint_lag_bytes as f64);
            metrics::gauge!("idemstore_checkpoint_lag_seconds", "store" => self.store.clone())
                .set(figures.checkpoint_lag_ms as f64 / 1000.0);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = figures;
    }

    /// A checkpoint failed; the store accepts no more writes until reopened.
    pub(crate) fn checkpoint_failed(&self) {
        #[cfg(feature = "metrics")]
        {
            metrics::counter!("idemstore_checkpoint_failures_total", "store" => self.store.clone())
                .increment(1);
            metrics::gauge!("idemstore_poisoned", "store" => self.store.clone()).set(1.0);
        }
    }
}
