//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Lease, ManualClock, Replay, Store};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// 2023-11-14T22:13:20Z: a fixed start time for manual clocks.
pub const T0_MS: u64 = 1_700_000_000_000;

pub const DAY: Duration = Duration::from_secs(86_400);

pub fn clock() -> ManualClock {
    ManualClock::new(T0_MS)
}

/// An in-memory store on `clock`, with no background sweeper.
pub fn memory_store(clock: &ManualClock) -> Store {
    Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .open_in_memory()
        .expect("an in-memory store opens")
}

/// A file store on `clock`, with no background sweeper.
pub fn file_store(path: &Path, clock: &ManualClock) -> Store {
    Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .open(path)
        .expect("a file store opens")
}

pub fn opts(lease_ms: u64) -> ClaimOptions {
    ClaimOptions::default()
        .lease(Duration::from_millis(lease_ms))
        .retention(DAY)
}

pub fn acquired(claim: Claim) -> Lease {
    match claim {
        Claim::Acquired(lease) => lease,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

pub fn replay(claim: Claim) -> Replay {
    match claim {
        Claim::Replay(r) => r,
        other => panic!("expected Replay, got {other:?}"),
    }
}

/// An in-memory backend whose syncs fail while `fail` is set, like a disk that reports EIO.
#[derive(Debug)]
pub struct FailingSync {
    pub inner: redb::backends::InMemoryBackend,
    pub fail: Arc<AtomicBool>,
}

impl redb::StorageBackend for FailingSync {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.inner.write(offset, data)
    }
}
