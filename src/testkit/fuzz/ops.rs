//! The `ops` target: operation sequences against the reference model, with I/O faults.
//!
//! This file decodes the input into [`Op`]s and runs them; `harness.rs` applies each one to
//! the store and to the model and checks the answers.

use super::harness::Harness;
use super::reader::Reader;
use crate::Error;
use crate::testkit::{Call, Fault, SimDisk, Target};

/// An I/O fault as an input plans it: relative to the calls the disk has seen when armed.
#[derive(Debug, Clone, Copy)]
pub(super) struct FaultPlan {
    on: Target,
    /// Matching calls to let through before failing.
    skip: u32,
    /// Fail every matching call from then on, not just one.
    persistent: bool,
    /// Fail with `StorageFull` rather than a plain I/O error.
    full: bool,
}

impl FaultPlan {
    /// Plans the fault on `disk`, replacing any earlier plan: the `skip + 1`-th matching call
    /// from now on fails.
    pub(super) fn arm(self, disk: &SimDisk) {
        let nth = disk.counts().of(self.on) + u64::from(self.skip) + 1;
        disk.set_fault(Some(Fault {
            on: self.on,
            nth,
            persistent: self.persistent,
            full: self.full,
        }));
    }
}

pub(super) const SCOPES: [&[u8]; 2] = [b"s0", b"s1"];
pub(super) const KEYS: [&[u8]; 3] = [b"k0", b"k1", b"k2"];
pub(super) const FINGERPRINTS: [&[u8]; 2] = [b"fp-a", b"fp-b"];
/// The most operations one input runs.
const OPS_MAX: usize = 96;

pub(super) type Slot = (usize, usize);

pub(super) fn slots() -> impl Iterator<Item = Slot> {
    (0..SCOPES.len()).flat_map(|s| (0..KEYS.len()).map(move |k| (s, k)))
}

pub(super) fn name(slot: Slot) -> (&'static [u8], &'static [u8]) {
    (
        SCOPES.get(slot.0).copied().unwrap_or_default(),
        KEYS.get(slot.1).copied().unwrap_or_default(),
    )
}

/// One step of an `ops` input.
#[derive(Debug, Clone)]
pub(super) enum Op {
    Claim {
        slot: Slot,
        fp: usize,
        lease_ms: u64,
        retention_ms: u64,
    },
    Complete {
        lease: (bool, usize),
        outcome: Vec<u8>,
        retention_ms: u64,
    },
    Fail {
        lease: (bool, usize),
    },
    Extend {
        lease: (bool, usize),
        by_ms: u64,
    },
    Checkpoint {
        lease: (bool, usize),
        bytes: Vec<u8>,
    },
    Forget {
        slot: Slot,
    },
    Sweep {
        limit: usize,
    },
    Advance {
        ms: u64,
    },
    Reopen,
    Fault(FaultPlan),
}

fn read_op(r: &mut Reader<'_>) -> Op {
    let slot = |r: &mut Reader<'_>| (r.below(SCOPES.len()), r.below(KEYS.len()));
    let lease = |r: &mut Reader<'_>| (r.bool(), usize::from(r.u8()));
    match r.u8() % 16 {
        0..=3 => Op::Claim {
            slot: slot(r),
            fp: usize::from(r.u8() % 5 == 4),
            lease_ms: r.range(1, 50),
            retention_ms: r.range(50, 500),
        },
        4 | 5 => Op::Complete {
            lease: lease(r),
            outcome: r.bytes(6),
            retention_ms: r.range(1, 500),
        },
        6 => Op::Fail { lease: lease(r) },
        7 => Op::Extend {
            lease: lease(r),
            by_ms: r.range(1, 200),
        },
        8 => Op::Checkpoint {
            lease: lease(r),
            bytes: r.bytes(4),
        },
        9 => Op::Forget { slot: slot(r) },
        10 => Op::Sweep { limit: r.below(5) },
        11 | 12 => Op::Advance {
            ms: if r.bool() {
                r.range(0, 20)
            } else {
                r.range(0, 300)
            },
        },
        13 => Op::Reopen,
        _ => Op::Fault(FaultPlan {
            on: match r.u8() % 4 {
                0 => Target::Only(Call::Write),
                1 => Target::Only(Call::Sync),
                2 => Target::Only(Call::SetLen),
                _ => Target::Any,
            },
            skip: u32::from(r.u8() % 16),
            persistent: r.bool(),
            full: r.u8().is_multiple_of(4),
        }),
    }
}

/// The store's answer to a lease write: taken effect (true), lease lost (false), or an
/// error that only an I/O fault explains.
pub(super) fn fenced_result(result: crate::Result<()>) -> Result<bool, Error> {
    match result {
        Ok(()) => Ok(true),
        Err(Error::LeaseLost { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `e` is what a failed write, sync or resize may surface as.
pub(super) fn is_storage_error(e: &Error) -> bool {
    matches!(
        e,
        Error::CommitOutcomeUnknown { .. }
            | Error::Io(_)
            | Error::StorageFull(_)
            | Error::Backend { .. }
            | Error::Internal(_)
    )
}

/// What one [`run_ops`] input did, for the stable test's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpsSummary {
    /// Operations run.
    pub ops: usize,
    /// Injected I/O failures that fired.
    pub faults_fired: u64,
    /// Failed operations whose batch was absent after the reopen.
    pub rolled_back: usize,
    /// Failed operations whose batch was durable after the reopen.
    pub rolled_forward: usize,
    /// Reopens (requested, after faults, and the final one).
    pub reopens: usize,
}

/// Decodes arbitrary bytes into up to 96 operations (claim, complete, fail, extend,
/// checkpoint, forget, sweep, clock advance, reopen, and "arm an I/O fault") on two scopes
/// × three keys, and runs them on a store over a [`SimDisk`] that fails writes, syncs or
/// resizes at fuzzer-chosen points (once or from then on, as an I/O error or a full disk).
///
/// The oracle is the reference model of DESIGN §2 in [`model`](crate::testkit::model) (shared
/// with `tests/model.rs` and `tests/linearizability.rs`, written apart from `transition.rs`):
/// when no fault fired inside an operation, its answer and every record of the key space must
/// equal the model's, and fencing tokens must strictly increase. When a fault fired inside an
/// operation, the operation must have failed (never acknowledged) with a storage error, the
/// store must refuse further writes, and after a reopen over the same bytes every record must be
/// exactly as before the operation or exactly as after it, tokens never reused. A reopen
/// also checks that everything acknowledged survived it.
pub fn run_ops(data: &[u8]) -> OpsSummary {
    run(data, false)
}

/// [`run_ops`] on a store with a write-ahead log, checkpointed after every commit into the
/// smallest record map, on a log of two 1 MiB segments: the faults go to the log's disk (its
/// writes and syncs are what acknowledge), while checkpoints, segment recycling and sweeps
/// committed beside the writer race the operations. The same properties hold.
pub fn run_ops_with_log(data: &[u8]) -> OpsSummary {
    run(data, true)
}

fn run(data: &[u8], wal: bool) -> OpsSummary {
    let mut r = Reader::new(data);
    let mut harness = Harness::start(wal);
    let mut ops = 0;
    while !r.is_empty() && ops < OPS_MAX {
        let op = read_op(&mut r);
        harness.step(&op);
        harness.check_everything();
        ops += 1;
    }
    harness.finish(ops)
}
