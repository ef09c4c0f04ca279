//! The engine's metrics (feature `metrics`): what a recorder installed by the application sees
//! after real operations.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use idemstore::{Claim, Error};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

/// One metric's value: a counter total, the last gauge value, or every histogram sample.
#[derive(Debug, Default)]
struct Cell {
    total: AtomicU64,
    gauge: Mutex<f64>,
    samples: Mutex<Vec<f64>>,
}

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.total.fetch_add(value, Ordering::SeqCst);
    }

    fn absolute(&self, value: u64) {
        self.total.store(value, Ordering::SeqCst);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        *self.gauge.lock().expect("gauge") += value;
    }

    fn decrement(&self, value: f64) {
        *self.gauge.lock().expect("gauge") -= value;
    }

    fn set(&self, value: f64) {
        *self.gauge.lock().expect("gauge") = value;
    }
}

impl HistogramFn for Cell {
    fn record(&self, value: f64) {
        self.samples.lock().expect("samples").push(value);
    }
}

/// A recorder that keeps every metric by its name and labels, `name{label=value,...}`.
#[derive(Debug, Default, Clone)]
struct Kept {
    cells: Arc<Mutex<BTreeMap<String, Arc<Cell>>>>,
}

impl Kept {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        Arc::clone(self.cells.lock().expect("cells").entry(name).or_default())
    }

    fn counter(&self, name: &str) -> u64 {
        self.cells
            .lock()
            .expect("cells")
            .get(name)
            .map_or(0, |c| c.total.load(Ordering::SeqCst))
    }

    fn gauge(&self, name: &str) -> Option<f64> {
        let cells = self.cells.lock().expect("cells");
        cells.get(name).map(|c| *c.gauge.lock().expect("gauge"))
    }

    fn samples(&self, name: &str) -> Vec<f64> {
        let cells = self.cells.lock().expect("cells");
        cells
            .get(name)
            .map(|c| c.samples.lock().expect("samples").clone())
            .unwrap_or_default()
    }
}

impl Recorder for Kept {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.cell(key))
    }
}

// One test in this binary: the recorder is global to the process (the writer thread reports).
#[test]
fn claims_commits_fencing_and_sweeps_are_reported() -> TestResult {
    let kept = Kept::default();
    metrics::set_global_recorder(kept.clone()).map_err(|e| e.to_string())?;
    let clock = clock();
    let store = memory_store(&clock);

    let lease = acquired(store.claim("s", "k", "fp", &opts(1_000))?);
    assert!(matches!(
        store.claim("s", "k", "fp", &opts(1_000))?,
        Claim::InProgress { .. }
    ));
    store.complete(&lease, b"done", Duration::from_secs(10))?;
    replay(store.claim("s", "k", "fp", &opts(1_000))?);
    assert!(matches!(
        store.claim("s", "k", "other", &opts(1_000))?,
        Claim::Mismatch
    ));
    let stale = store.complete(&lease, b"again", Duration::from_secs(10));
    assert!(matches!(stale, Err(Error::LeaseLost { .. })));
    clock.advance(Duration::from_secs(11));
    assert_eq!(store.sweep(100)?.removed, 1);

    for answer in ["acquired", "in_progress", "replay", "mismatch"] {
        let name = format!("idemstore_claims_total{{answer={answer},store=memory}}");
        assert_eq!(kept.counter(&name), 1, "{name}");
    }
    assert_eq!(kept.counter("idemstore_lease_lost_total{store=memory}"), 1);
    assert_eq!(kept.counter("idemstore_swept_total{store=memory}"), 1);
    // The acquisition, the completion and the sweep each committed; the refused completion
    // and the answers that changed nothing (in progress, mismatch) committed nothing.
    let commits = kept.counter("idemstore_commits_total{durable=true,store=memory}");
    assert_eq!(commits, 3, "{commits} commits");
    let batch_sizes = kept.samples("idemstore_commit_operations{store=memory}");
    assert_eq!(batch_sizes.len() as u64, commits);
    assert!(batch_sizes.iter().all(|n| *n >= 1.0));
    assert_eq!(
        kept.samples("idemstore_commit_seconds{durable=true,store=memory}")
            .len() as u64,
        commits
    );
    assert_eq!(kept.gauge("idemstore_poisoned{store=memory}"), Some(0.0));
    assert_eq!(kept.gauge("idemstore_queue_depth{store=memory}"), Some(0.0));

    // With a write-ahead log: its syncs, the checkpoints and the map's figures.
    // Labelled with the path it was opened at.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem.redb");
    let store = idemstore::Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .write_ahead_log(true)
        .wal_segment_bytes(1 << 20)
        .checkpoint_interval(Duration::from_secs(3600))
        .open(&path)?;
    let wal = |name: &str| format!("{name}{{store={}}}", path.display());
    for i in 0..5 {
        let lease = acquired(store.claim("s", format!("w{i}"), "fp", &opts(1_000))?);
        store.complete(&lease, b"done", DAY)?;
    }
    let syncs = store.stats()?.wal.ok_or("a log")?.log_syncs;
    assert!(syncs >= 10, "{syncs} log syncs");
    let samples = kept.samples(&wal("idemstore_log_sync_seconds"));
    assert_eq!(samples.len() as u64, syncs);
    assert!(
        samples.iter().all(|s| *s >= 0.0 && *s < 60.0),
        "{samples:?}"
    );
    assert_eq!(kept.counter(&wal("idemstore_checkpoints_total")), 0);
    // Closing checkpoints what the map holds.
    store.close()?;
    assert_eq!(kept.counter(&wal("idemstore_checkpoints_total")), 1);
    assert_eq!(kept.samples(&wal("idemstore_checkpoint_seconds")).len(), 1);
    // The checkpointer's last report: the map written out, nothing left to checkpoint.
    assert_eq!(kept.gauge(&wal("idemstore_wal_map_bytes")), Some(0.0));
    assert_eq!(
        kept.gauge(&wal("idemstore_checkpoint_lag_bytes")),
        Some(0.0)
    );
    assert_eq!(kept.counter(&wal("idemstore_checkpoint_failures_total")), 0);

    // Stores report apart: one poisoned by a failed sync stays poisoned in its gauge when
    // another store opens (which sets its own to 0).
    let (backend, fail) = Injected::new(InjectedFault::FailSync);
    let failing = idemstore::Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .metrics_label("failing")
        .open_with_backend(backend)?;
    let lease = acquired(failing.claim("s", "k", "fp", &opts(1_000))?);
    fail.store(true, Ordering::SeqCst);
    let result = failing.complete(&lease, b"maybe", DAY);
    assert!(
        matches!(result, Err(Error::CommitOutcomeUnknown { .. })),
        "{result:?}"
    );
    assert_eq!(kept.gauge("idemstore_poisoned{store=failing}"), Some(1.0));
    assert_eq!(
        kept.counter("idemstore_commit_failures_total{store=failing}"),
        1
    );
    let other = idemstore::Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .metrics_label("other")
        .open_in_memory()?;
    assert_eq!(kept.gauge("idemstore_poisoned{store=other}"), Some(0.0));
    assert_eq!(kept.gauge("idemstore_poisoned{store=failing}"), Some(1.0));
    let lease = acquired(other.claim("s", "k", "fp", &opts(1_000))?);
    other.complete(&lease, b"done", DAY)?;
    assert_eq!(
        kept.counter("idemstore_claims_total{answer=acquired,store=other}"),
        1
    );
    assert_eq!(
        kept.counter("idemstore_commit_failures_total{store=other}"),
        0
    );

    // Every series of the run names its store.
    let cells = kept.cells.lock().expect("cells");
    for name in cells.keys() {
        assert!(
            name.contains("store=") && !name.contains("store=,") && !name.contains("store=}"),
            "{name}"
        );
    }
    Ok(())
}
