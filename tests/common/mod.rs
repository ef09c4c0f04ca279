//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
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
