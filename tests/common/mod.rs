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

/// What an [`Injected`] backend does while it is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// Every sync fails, like a disk that reports EIO.
    FailSync,
    /// Every write panics: a stand-in for any panic inside the writer thread.
    PanicOnWrite,
}

/// An in-memory backend that injects `fault` while `armed` is set.
#[derive(Debug)]
pub struct Injected {
    inner: redb::backends::InMemoryBackend,
    armed: Arc<AtomicBool>,
    fault: InjectedFault,
}

impl Injected {
    /// A new empty backend, disarmed, and the switch that arms it.
    pub fn new(fault: InjectedFault) -> (Injected, Arc<AtomicBool>) {
        let armed = Arc::new(AtomicBool::new(false));
        let backend = Injected {
            inner: redb::backends::InMemoryBackend::new(),
            armed: Arc::clone(&armed),
            fault,
        };
        (backend, armed)
    }

    fn injects(&self, fault: InjectedFault) -> bool {
        self.fault == fault && self.armed.load(Ordering::SeqCst)
    }
}

impl redb::StorageBackend for Injected {
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
        if self.injects(InjectedFault::FailSync) {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        assert!(
            !self.injects(InjectedFault::PanicOnWrite),
            "injected panic in a backend write"
        );
        self.inner.write(offset, data)
    }
}
