//! Entry points for the fuzz targets under `fuzz/` and for `tests/fuzz_corpus.rs`, which replays
//! their corpus (and inputs from a seeded PRNG) on stable Rust. Not part of the stable API.
//!
//! Each entry point takes raw fuzzer bytes, decodes what it needs with a small byte reader (an
//! exhausted input reads as zeros, so every byte string is a valid input) and panics on any
//! violated property, which is what a fuzzer reports:
//!
//! - [`decode_record`]: the record-envelope decoder never panics, and what it accepts
//!   re-encodes to itself.
//! - [`validate_input`]: arbitrary limits, scope, key, fingerprint, outcome, checkpoint and
//!   durations against the store's input validation.
//! - [`run_ops`]: arbitrary operation sequences against a reference model of DESIGN §2, on an
//!   in-memory backend that fails writes, syncs or resizes at fuzzer-chosen points.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

pub mod model;

use model::{Expected, MRecord, MState, Model};

use crate::{
    CHECKPOINT_LEN_MAX, Claim, ClaimOptions, Error, FINGERPRINT_LEN_MAX, Input, KEY_LEN_MAX, Lease,
    Limits, ManualClock, OUTCOME_LEN_MAX, RETENTION_MS_MAX, Record, RecordState, SCOPE_LEN_MAX,
    Store, WAIT_MS_MAX,
};

/// Decodes a record envelope; every envelope that decodes must re-encode to a byte string
/// that decodes to the same record (asserted, so a fuzzer reports the violation).
#[must_use]
pub fn decode_record(bytes: &[u8]) -> Option<crate::Record> {
    // The empty key: the checksum then covers the payload alone.
    let record = crate::engine::codec::decode(&[], bytes).ok()?;
    let again = crate::engine::codec::decode(&[], &crate::engine::codec::encode(&[], &record));
    assert_eq!(
        again.as_ref(),
        Ok(&record),
        "a decoded record re-encodes to itself"
    );
    Some(record)
}

// ----- the byte reader -----

/// Reads fuzzer bytes front to back; past the end every read is zero.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        usize::from(self.u16()) % n
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + u64::from(self.u16()) % (hi - lo + 1)
    }

    /// Up to `max` bytes: a length, then that many bytes (fewer if the input ends).
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        let (taken, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        taken.to_vec()
    }

    /// A size in bytes for an input of `max` bytes at most: mostly small, sometimes just
    /// around `limit`, so that both sides of each limit are reached.
    fn len_near(&mut self, limit: usize, max: usize) -> usize {
        let len = match self.u8() % 4 {
            0 => limit.saturating_sub(1),
            1 => limit,
            2 => limit.saturating_add(1),
            _ => self.below(max + 1),
        };
        len.min(max)
    }

    /// A duration in milliseconds, biased to zero, small values and every boundary the
    /// limits have.
    fn millis(&mut self) -> u64 {
        const BOUNDS: [u64; 10] = [
            0,
            1,
            60_000,
            3_600_000,
            3_600_001,
            30 * 24 * 3_600_000,
            RETENTION_MS_MAX,
            RETENTION_MS_MAX + 1,
            WAIT_MS_MAX + 1,
            u64::MAX,
        ];
        match self.u8() % 6 {
            0 => BOUNDS
                .get(self.below(BOUNDS.len()))
                .copied()
                .unwrap_or_default(),
            1 => u64::from(self.u8()),
            2 => u64::from(self.u16()),
            3 => u64::from(self.u32()),
            4 => self.u64(),
            _ => 1_000 * u64::from(self.u16()),
        }
    }
}

/// A fixed start time: 2023-11-14T22:13:20Z.
const T0_MS: u64 = 1_700_000_000_000;

// ----- validate: the store's input validation -----

/// The limits a `validate_input` case runs with, as plain numbers (the oracle's copy).
#[derive(Debug, Clone, Copy)]
struct Bounds {
    key: usize,
    scope: usize,
    fingerprint: usize,
    outcome: usize,
    checkpoint: usize,
    lease: u64,
    retention: u64,
    wait: u64,
}

impl Bounds {
    fn default_limits() -> Bounds {
        Bounds {
            key: KEY_LEN_MAX,
            scope: SCOPE_LEN_MAX,
            fingerprint: FINGERPRINT_LEN_MAX,
            outcome: 1024 * 1024,
            checkpoint: 64 * 1024,
            lease: 3_600_000,
            retention: 30 * 24 * 3_600_000,
            wait: 60_000,
        }
    }

    /// Whether `Limits` with these values is within the hard caps.
    fn within_caps(&self) -> bool {
        (1..=KEY_LEN_MAX).contains(&self.key)
            && self.scope <= SCOPE_LEN_MAX
            && self.fingerprint <= FINGERPRINT_LEN_MAX
            && self.outcome <= OUTCOME_LEN_MAX
            && self.checkpoint <= CHECKPOINT_LEN_MAX
            && (1..=RETENTION_MS_MAX).contains(&self.retention)
            && (1..=self.retention).contains(&self.lease)
            && self.wait <= WAIT_MS_MAX
    }

    fn limits(&self) -> Limits {
        Limits::default()
            .max_key_len(self.key)
            .max_scope_len(self.scope)
            .max_fingerprint_len(self.fingerprint)
            .max_outcome_len(self.outcome)
            .max_checkpoint_len(self.checkpoint)
            .max_retention(Duration::from_millis(self.retention))
            .max_lease(Duration::from_millis(self.lease))
            .max_wait(Duration::from_millis(self.wait))
    }
}

/// Whether `e` is an input rejection: raised before anything is queued or written.
fn is_input_error(e: &Error) -> bool {
    matches!(
        e,
        Error::TooLarge { .. } | Error::TooSmall { .. } | Error::LeaseExceedsRetention { .. }
    )
}

/// The observable state of a store: its records table (one key here), its write count and
/// its fencing counter. A rejected input must leave all three unchanged.
/// What a refused call must leave as it was: the key's record, the records held, the commits
/// made and the next fencing token.
type Footprint = (Option<Record>, u64, u64, u64);

fn footprint(store: &Store, scope: &[u8], key: &[u8]) -> Footprint {
    let stats = store.stats().expect("stats of an in-memory store");
    let record = store.get(scope, key).unwrap_or(None);
    (record, stats.records, stats.commits, stats.next_token)
}

/// Checks that an input error names an input that really is out of bounds, with its real
/// size and the configured limit.
fn check_named(e: &Error, sizes: &[(Input, u64, u64, u64)]) {
    match e {
        Error::TooLarge {
            what,
            actual,
            limit,
        } => assert!(
            sizes
                .iter()
                .any(|(w, a, _, max)| w == what && a == actual && max == limit && a > max),
            "{e:?} names no input above its limit ({sizes:?})"
        ),
        Error::TooSmall {
            what,
            actual,
            limit,
        } => assert!(
            sizes
                .iter()
                .any(|(w, a, min, _)| w == what && a == actual && min == limit && a < min),
            "{e:?} names no input below its minimum ({sizes:?})"
        ),
        Error::LeaseExceedsRetention {
            lease_ms,
            retention_ms,
        } => assert!(lease_ms > retention_ms, "{e:?}"),
        other => panic!("expected an input error, got {other:?}"),
    }
}

fn in_bounds(sizes: &[(Input, u64, u64, u64)]) -> bool {
    sizes.iter().all(|(_, a, min, max)| a >= min && a <= max)
}

/// A lease call refused with `e`: some input of `sizes` is out of bounds, `e` names one of them,
/// and nothing was written (the footprint is still `before`).
fn check_refused(
    store: &Store,
    (scope, key): (&[u8], &[u8]),
    before: &Footprint,
    e: &Error,
    sizes: &[(Input, u64, u64, u64)],
    call: &str,
) {
    assert!(!in_bounds(sizes), "{call} refused {sizes:?}: {e:?}");
    check_named(e, sizes);
    assert_eq!(
        &footprint(store, scope, key),
        before,
        "a rejected {call} wrote"
    );
}

/// Arbitrary limits, scope, key, fingerprint, durations, outcome and checkpoint against the
/// store's input validation, on an in-memory store. Asserts (panics on a violation):
///
/// - the builder accepts exactly the limits within the hard caps (else a `Config` error);
/// - `claim`, `checkpoint`, `extend`, `complete`, `get` and `forget` succeed exactly when
///   every input is within its limit, and otherwise return `TooLarge`/`TooSmall`/
///   `LeaseExceedsRetention` naming an input that really is out of bounds, with its size
///   and the limit;
/// - a rejected input writes nothing: the record, the record count, the commit count and
///   the fencing counter are unchanged;
/// - an accepted completion replays its exact bytes.
pub fn validate_input(data: &[u8]) {
    let mut r = Reader::new(data);
    let mut b = Bounds::default_limits();
    let custom = r.u8();
    if custom & 0x01 != 0 {
        b.key = r.len_near(KEY_LEN_MAX, 300);
    }
    if custom & 0x02 != 0 {
        b.scope = r.len_near(SCOPE_LEN_MAX, 300);
    }
    if custom & 0x04 != 0 {
        b.fingerprint = r.len_near(FINGERPRINT_LEN_MAX, 80);
    }
    if custom & 0x08 != 0 {
        // Small enough that the outcome and checkpoint below can exceed them.
        b.outcome = r.below(64);
        b.checkpoint = r.below(64);
    }
    if custom & 0x10 != 0 {
        b.lease = r.millis();
    }
    if custom & 0x20 != 0 {
        b.retention = r.millis();
    }
    if custom & 0x40 != 0 {
        b.wait = r.millis();
    }
    let now = match r.u8() % 4 {
        0 => 0,
        1 => 1 << 62,
        _ => T0_MS + u64::from(r.u32()),
    };
    let opened = Store::builder()
        .clock(ManualClock::new(now))
        .sweep_interval(None)
        .limits(b.limits())
        .open_in_memory();
    let store = match opened {
        Ok(store) => {
            assert!(
                b.within_caps(),
                "limits beyond the hard caps accepted: {b:?}"
            );
            store
        }
        Err(e) => {
            assert!(
                !b.within_caps(),
                "limits within the hard caps refused: {b:?}: {e:?}"
            );
            assert!(
                matches!(
                    e,
                    Error::TooLarge {
                        what: Input::Config(_),
                        ..
                    } | Error::TooSmall {
                        what: Input::Config(_),
                        ..
                    }
                ),
                "a bad configuration is a Config error: {e:?}"
            );
            return;
        }
    };

    let scope = {
        let n = r.len_near(b.scope, 300);
        vec![b's'; n]
    };
    let key = {
        let n = r.len_near(b.key, 300);
        let mut k = r.bytes(n);
        k.resize(n, b'k');
        k
    };
    let fingerprint = {
        let n = r.len_near(b.fingerprint, 80);
        vec![b'f'; n]
    };
    let lease_ms = r.millis();
    let retention_ms = r.millis();
    let wait_ms = r.bool().then(|| r.millis());
    let mut options = ClaimOptions::default()
        .lease(Duration::from_millis(lease_ms))
        .retention(Duration::from_millis(retention_ms));
    if let Some(w) = wait_ms {
        options = options.wait(Duration::from_millis(w));
    }
    let len = |v: &[u8]| v.len() as u64;
    let identity = [
        (Input::Scope, len(&scope), 0, b.scope as u64),
        (Input::Key, len(&key), 1, b.key as u64),
    ];
    let mut sizes = identity.to_vec();
    sizes.extend([
        (
            Input::Fingerprint,
            len(&fingerprint),
            0,
            b.fingerprint as u64,
        ),
        (Input::Lease, lease_ms, 1, b.lease),
        (Input::Retention, retention_ms, 1, b.retention),
        (Input::Wait, wait_ms.unwrap_or(0), 0, b.wait),
    ]);
    let claim_valid = in_bounds(&sizes) && lease_ms <= retention_ms;

    let before = footprint(&store, &scope, &key);
    let claimed = store.claim(&scope, &key, &fingerprint, &options);
    let mut lease = match claimed {
        Ok(Claim::Acquired(lease)) => {
            assert!(claim_valid, "claim accepted out-of-bounds input {sizes:?}");
            lease
        }
        Ok(other) => panic!("the first claim of a key acquires it, got {other:?}"),
        Err(e) => {
            assert!(is_input_error(&e), "unexpected error {e:?}");
            assert!(!claim_valid, "claim refused valid input {sizes:?}: {e:?}");
            check_named(&e, &sizes);
            assert_eq!(
                footprint(&store, &scope, &key),
                before,
                "a rejected claim wrote"
            );
            // The identity alone decides get and forget.
            let id_valid = in_bounds(&identity);
            match store.get(&scope, &key) {
                Ok(found) => assert!(id_valid && found.is_none()),
                Err(e) => {
                    assert!(!id_valid, "get refused a valid identity: {e:?}");
                    check_named(&e, &identity);
                }
            }
            match store.forget(&scope, &key) {
                // A valid forget of nothing may commit an empty batch, and writes nothing.
                Ok(existed) => {
                    assert!(id_valid && !existed);
                    let (record, records, _, next_token) = footprint(&store, &scope, &key);
                    assert_eq!(
                        (record, records, next_token),
                        (before.0, before.1, before.3)
                    );
                }
                Err(e) => {
                    assert!(!id_valid, "forget refused a valid identity: {e:?}");
                    check_named(&e, &identity);
                    assert_eq!(footprint(&store, &scope, &key), before, "forget wrote");
                }
            }
            return;
        }
    };
    let record = store
        .get(&scope, &key)
        .expect("get")
        .expect("the claimed record");
    assert!(matches!(record.state, RecordState::InFlight { token, .. } if token == lease.token()));

    // Lease operations with arbitrary inputs.
    let checkpoint = {
        let n = r.len_near(b.checkpoint, 80);
        vec![b'c'; n]
    };
    let before = footprint(&store, &scope, &key);
    let sizes = [(Input::Checkpoint, len(&checkpoint), 0, b.checkpoint as u64)];
    match store.checkpoint(&lease, &checkpoint) {
        Ok(()) => {
            assert!(in_bounds(&sizes), "checkpoint accepted {sizes:?}");
            let r = store.get(&scope, &key).expect("get").expect("record");
            assert!(matches!(
                r.state,
                RecordState::InFlight { checkpoint: Some(ref c), .. } if *c == checkpoint
            ));
        }
        Err(e) => check_refused(&store, (&scope, &key), &before, &e, &sizes, "checkpoint"),
    }

    let by_ms = r.millis();
    let before = footprint(&store, &scope, &key);
    let sizes = [(Input::Lease, by_ms, 1, b.lease)];
    match store.extend(&mut lease, Duration::from_millis(by_ms)) {
        Ok(()) => {
            assert!(in_bounds(&sizes), "extend accepted {sizes:?}");
            assert_eq!(lease.lease_until_ms(), now.saturating_add(by_ms));
        }
        Err(e) => check_refused(&store, (&scope, &key), &before, &e, &sizes, "extend"),
    }

    let outcome = {
        let n = r.len_near(b.outcome, 80);
        let mut o = r.bytes(n);
        o.resize(n, b'o');
        o
    };
    let retention2 = r.millis();
    let before = footprint(&store, &scope, &key);
    let sizes = [
        (Input::Outcome, len(&outcome), 0, b.outcome as u64),
        (Input::Retention, retention2, 1, b.retention),
    ];
    match store.complete(&lease, &outcome, Duration::from_millis(retention2)) {
        Ok(()) => {
            assert!(in_bounds(&sizes), "complete accepted {sizes:?}");
            let again = ClaimOptions::default()
                .lease(Duration::from_millis(b.lease.min(b.retention)))
                .retention(Duration::from_millis(b.retention));
            match store.claim(&scope, &key, &fingerprint, &again) {
                Ok(Claim::Replay(replay)) => assert_eq!(replay.outcome, outcome),
                other => panic!("a completed request replays, got {other:?}"),
            }
        }
        Err(e) => check_refused(&store, (&scope, &key), &before, &e, &sizes, "complete"),
    }

    // A lease built from arbitrary parts is checked like any other.
    let token = r.u64();
    match Lease::from_parts(&scope, &key, token, 0, 1, None, false) {
        Ok(forged) => {
            assert!(scope.len() <= SCOPE_LEN_MAX);
            if forged.token() != lease.token() {
                assert!(matches!(store.fail(&forged), Err(Error::LeaseLost { .. })));
            }
        }
        Err(e) => assert!(scope.len() > SCOPE_LEN_MAX, "{e:?}"),
    }
    assert!(
        store
            .forget(&scope, &key)
            .expect("forget of a valid identity")
    );
    assert!(store.get(&scope, &key).expect("get").is_none());
}

// ----- ops: operation sequences against a reference model, with I/O faults -----

/// Which backend calls a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultOn {
    Write,
    Sync,
    SetLen,
    Any,
}

#[derive(Debug, Clone, Copy)]
struct FaultPlan {
    on: FaultOn,
    /// Matching calls to let through before failing.
    skip: u32,
    /// Fail every matching call from then on, not just one.
    persistent: bool,
    /// Fail with `StorageFull` rather than a plain I/O error.
    full: bool,
}

#[derive(Debug, Default)]
struct MemoryState {
    bytes: RwLock<Vec<u8>>,
    plan: Mutex<Option<FaultPlan>>,
    fired: AtomicU64,
}

/// An in-memory redb backend whose handle can be cloned (so a store can be reopened over
/// the same bytes) and whose writes, syncs and resizes fail as planned.
#[derive(Debug, Clone, Default)]
struct FaultyMemory {
    state: Arc<MemoryState>,
}

impl FaultyMemory {
    fn arm(&self, plan: FaultPlan) {
        *self.state.plan.lock() = Some(plan);
    }

    fn disarm(&self) {
        *self.state.plan.lock() = None;
    }

    fn fired(&self) -> u64 {
        self.state.fired.load(Ordering::SeqCst)
    }

    fn check(&self, call: FaultOn) -> std::io::Result<()> {
        let mut plan = self.state.plan.lock();
        let Some(p) = plan.as_mut() else {
            return Ok(());
        };
        if p.on != FaultOn::Any && p.on != call {
            return Ok(());
        }
        if p.skip > 0 {
            p.skip -= 1;
            return Ok(());
        }
        let full = p.full;
        if !p.persistent {
            *plan = None;
        }
        self.state.fired.fetch_add(1, Ordering::SeqCst);
        Err(if full {
            std::io::Error::new(std::io::ErrorKind::StorageFull, "injected: disk full")
        } else {
            std::io::Error::other(format!("injected {call:?} failure"))
        })
    }

    fn out_of_range() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "out of range")
    }
}

impl redb::StorageBackend for FaultyMemory {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state.bytes.read().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let bytes = self.state.bytes.read();
        let start = usize::try_from(offset).map_err(|_| Self::out_of_range())?;
        let end = start
            .checked_add(out.len())
            .ok_or_else(Self::out_of_range)?;
        out.copy_from_slice(bytes.get(start..end).ok_or_else(Self::out_of_range)?);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check(FaultOn::SetLen)?;
        let len = usize::try_from(len).map_err(|_| Self::out_of_range())?;
        self.state.bytes.write().resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.check(FaultOn::Sync)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check(FaultOn::Write)?;
        let mut bytes = self.state.bytes.write();
        let start = usize::try_from(offset).map_err(|_| Self::out_of_range())?;
        let end = start
            .checked_add(data.len())
            .ok_or_else(Self::out_of_range)?;
        bytes
            .get_mut(start..end)
            .ok_or_else(Self::out_of_range)?
            .copy_from_slice(data);
        Ok(())
    }
}

const SCOPES: [&[u8]; 2] = [b"s0", b"s1"];
const KEYS: [&[u8]; 3] = [b"k0", b"k1", b"k2"];
const FINGERPRINTS: [&[u8]; 2] = [b"fp-a", b"fp-b"];
/// The most operations one input runs.
const OPS_MAX: usize = 96;

type Slot = (usize, usize);

fn slots() -> impl Iterator<Item = Slot> {
    (0..SCOPES.len()).flat_map(|s| (0..KEYS.len()).map(move |k| (s, k)))
}

fn name(slot: Slot) -> (&'static [u8], &'static [u8]) {
    (
        SCOPES.get(slot.0).copied().unwrap_or_default(),
        KEYS.get(slot.1).copied().unwrap_or_default(),
    )
}

/// One step of an `ops` input.
#[derive(Debug, Clone)]
enum Op {
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
                0 => FaultOn::Write,
                1 => FaultOn::Sync,
                2 => FaultOn::SetLen,
                _ => FaultOn::Any,
            },
            skip: u32::from(r.u8() % 16),
            persistent: r.bool(),
            full: r.u8().is_multiple_of(4),
        }),
    }
}

/// The store's answer to a lease write: taken effect (true), lease lost (false), or an
/// error that only an I/O fault explains.
fn fenced_result(result: crate::Result<()>) -> Result<bool, Error> {
    match result {
        Ok(()) => Ok(true),
        Err(Error::LeaseLost { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `e` is what a failed write, sync or resize may surface as.
fn is_storage_error(e: &Error) -> bool {
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

struct Harness {
    summary: OpsSummary,
    backend: FaultyMemory,
    clock: ManualClock,
    store: Option<Store>,
    model: Model,
    leases: Vec<Lease>,
    /// The newest token granted (acknowledged, or seen in a record after a reopen).
    last_token: u64,
}

impl Harness {
    fn open(&self) -> crate::Result<Store> {
        Store::builder()
            .clock(self.clock.clone())
            .sweep_interval(None)
            .open_with_backend(self.backend.clone())
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the harness keeps a store open")
    }

    fn pick(&self, (recent, index): (bool, usize)) -> Option<usize> {
        let len = self.leases.len();
        if len == 0 {
            return None;
        }
        Some(if recent {
            let window = len.min(3);
            len - window + index % window
        } else {
            index % len
        })
    }

    fn slot_of(lease: &Lease) -> Slot {
        let scope = SCOPES.iter().position(|s| *s == lease.scope());
        let key = KEYS.iter().position(|k| *k == lease.key());
        scope.zip(key).expect("leases name known records")
    }

    /// Every record of the key space, the counters and the epoch against the model.
    fn check_everything(&self) {
        let store = self.store();
        for slot in slots() {
            let (scope, key) = name(slot);
            let got = store
                .get(scope, key)
                .expect("get")
                .as_ref()
                .map(MRecord::of);
            let want = self.model.live(scope, key).cloned();
            assert_eq!(got, want, "record {slot:?} at {}", self.model.now);
        }
        let stats = store.stats().expect("stats");
        assert_eq!(
            stats.records, stats.expiry_entries,
            "one expiry entry per record"
        );
        assert_eq!(stats.records, self.model.len() as u64, "records held");
        assert!(
            stats.next_token > self.last_token,
            "next token {} after token {}",
            stats.next_token,
            self.last_token
        );
        assert_eq!(store.epoch(), self.model.epoch, "epoch");
    }

    /// Whether the store's records are exactly those of `model`, taking the token of an
    /// in-flight record whose token the model does not know (0) from the store.
    fn matches(&self, model: &mut Model) -> bool {
        let store = self.store();
        let mut adopted = Vec::new();
        for slot in slots() {
            let (scope, key) = name(slot);
            let got = match store.get(scope, key) {
                Ok(r) => r.as_ref().map(MRecord::of),
                Err(_) => return false,
            };
            let mut want = model.live(scope, key).cloned();
            if let (
                Some(MRecord {
                    state: MState::InFlight { token: 0, .. },
                    ..
                }),
                Some(MRecord {
                    state: MState::InFlight { token, .. },
                    ..
                }),
            ) = (&want, &got)
            {
                if *token <= self.last_token {
                    return false;
                }
                if let Some(MRecord {
                    state: MState::InFlight { token: t, .. },
                    ..
                }) = want.as_mut()
                {
                    *t = *token;
                }
                adopted.push((slot, *token));
            }
            if got != want {
                return false;
            }
        }
        match store.stats() {
            Ok(stats) if stats.records == model.len() as u64 => {}
            _ => return false,
        }
        for (slot, token) in adopted {
            let (scope, key) = name(slot);
            model.grant(scope, key, token);
        }
        true
    }

    /// After a failed I/O call inside an operation: the operation must not have been
    /// acknowledged, the store must refuse writes, and after a reopen every record must be
    /// exactly as before the operation or exactly as after it (its batch is atomic).
    fn recover(&mut self, op: &Op, before: Model, mut after: Model) {
        self.backend.disarm();
        let store = self.store.take().expect("store");
        assert!(
            matches!(store.flush(), Err(Error::Poisoned { .. })),
            "after a failed commit the store refuses writes ({op:?})"
        );
        let _ = store.close();
        let store = self.open().expect("a reopen after a fault");
        assert!(
            store.epoch() > self.model.epoch,
            "a reopen starts a new epoch"
        );
        let epoch = store.epoch();
        self.store = Some(store);
        self.summary.reopens += 1;
        let mut before = before;
        if self.matches(&mut before) {
            self.model = before;
            self.summary.rolled_back += 1;
        } else if self.matches(&mut after) {
            self.model = after;
            self.summary.rolled_forward += 1;
        } else {
            let got: Vec<_> = slots()
                .map(|slot| {
                    let (scope, key) = name(slot);
                    self.store()
                        .get(scope, key)
                        .ok()
                        .flatten()
                        .map(|r| MRecord::of(&r))
                })
                .collect();
            panic!(
                "after a failed {op:?} the store holds neither the state before nor the \
                 state after it:\n  store:  {got:?}\n  before: {before:?}\n  after:  {after:?}"
            );
        }
        for slot in slots() {
            let (scope, key) = name(slot);
            if let Ok(Some(Record {
                state: RecordState::InFlight { token, .. },
                ..
            })) = self.store().get(scope, key)
            {
                self.last_token = self.last_token.max(token);
            }
        }
        self.model.epoch = epoch;
    }

    /// Runs one operation and checks its answer against the model; when an injected fault
    /// fired inside it, checks that it failed and recovers by a reopen. Panics on any
    /// divergence.
    fn step(&mut self, op: &Op) {
        let fired_before = self.backend.fired();
        let before = self.model.clone();
        let result = self.apply(op);
        let fired = self.backend.fired() > fired_before;
        match (result, fired) {
            (Ok(()), false) => {}
            (Ok(()), true) => {
                if !matches!(op, Op::Reopen) {
                    panic!("{op:?} was acknowledged although an I/O call inside it failed");
                }
            }
            (Err(e), true) => {
                assert!(is_storage_error(&e), "{op:?} failed with {e:?}");
                let after = self.model.clone();
                self.model = before.clone();
                self.recover(op, before, after);
            }
            (Err(e), false) => panic!("{op:?} failed without a fault: {e:?}"),
        }
    }

    /// Applies `op` to the store and the model; `Err` is a store error (the model then
    /// holds the state the operation would have produced).
    fn apply(&mut self, op: &Op) -> Result<(), Error> {
        match op {
            Op::Claim {
                slot,
                fp,
                lease_ms,
                retention_ms,
            } => {
                let fp_bytes = FINGERPRINTS.get(*fp).copied().unwrap_or_default();
                let (scope, key) = name(*slot);
                let options = ClaimOptions::default()
                    .lease(Duration::from_millis(*lease_ms))
                    .retention(Duration::from_millis(*retention_ms));
                let want = self
                    .model
                    .claim(scope, key, fp_bytes, *lease_ms, *retention_ms);
                let got = self.store().claim(scope, key, fp_bytes, &options)?;
                let (seen, lease) = match got {
                    Claim::Acquired(lease) => (
                        Expected::Acquired {
                            attempt: lease.attempt(),
                            takeover: lease.is_takeover(),
                            checkpoint: lease.checkpoint().map(<[u8]>::to_vec),
                            lease_until: lease.lease_until_ms(),
                        },
                        Some(lease),
                    ),
                    Claim::Replay(r) => (
                        Expected::Replay {
                            outcome: r.outcome,
                            completed_at: r.completed_at_ms,
                            attempt: r.attempt,
                        },
                        None,
                    ),
                    Claim::InProgress { retry_after } => (
                        Expected::InProgress {
                            retry_after_ms: u64::try_from(retry_after.as_millis())
                                .unwrap_or(u64::MAX),
                        },
                        None,
                    ),
                    Claim::Mismatch => (Expected::Mismatch, None),
                };
                assert_eq!(seen, want, "claim of {slot:?}");
                if let Some(lease) = lease {
                    assert!(
                        lease.token() > self.last_token,
                        "token {} after {}",
                        lease.token(),
                        self.last_token
                    );
                    self.last_token = lease.token();
                    self.model.grant(scope, key, lease.token());
                    self.leases.push(lease);
                }
            }
            Op::Complete {
                lease,
                outcome,
                retention_ms,
            } => {
                let Some(i) = self.pick(*lease) else {
                    return Ok(());
                };
                let lease = self.leases.get(i).cloned().expect("picked lease");
                let slot = Self::slot_of(&lease);
                let (scope, key) = name(slot);
                let want = self
                    .model
                    .complete(scope, key, lease.token(), outcome, *retention_ms);
                let retention = Duration::from_millis(*retention_ms);
                let got = fenced_result(self.store().complete(&lease, outcome, retention))?;
                assert_eq!(got, want, "complete took effect");
            }
            Op::Fail { lease } => {
                let Some(i) = self.pick(*lease) else {
                    return Ok(());
                };
                let lease = self.leases.get(i).cloned().expect("picked lease");
                let (scope, key) = name(Self::slot_of(&lease));
                let want = self.model.fail(scope, key, lease.token());
                let got = fenced_result(self.store().fail(&lease))?;
                assert_eq!(got, want, "fail took effect");
            }
            Op::Extend { lease, by_ms } => {
                let Some(i) = self.pick(*lease) else {
                    return Ok(());
                };
                let mut lease = self.leases.get(i).cloned().expect("picked lease");
                let by = *by_ms;
                let (scope, key) = name(Self::slot_of(&lease));
                let want = self.model.extend(scope, key, lease.token(), by).is_some();
                let result = self.store().extend(&mut lease, Duration::from_millis(by));
                let got = fenced_result(result)?;
                assert_eq!(got, want, "extend took effect");
                if got {
                    assert_eq!(lease.lease_until_ms(), self.model.now + by);
                }
                if let Some(l) = self.leases.get_mut(i) {
                    *l = lease;
                }
            }
            Op::Checkpoint { lease, bytes } => {
                let Some(i) = self.pick(*lease) else {
                    return Ok(());
                };
                let lease = self.leases.get(i).cloned().expect("picked lease");
                let (scope, key) = name(Self::slot_of(&lease));
                let want = self.model.checkpoint(scope, key, lease.token(), bytes);
                let got = fenced_result(self.store().checkpoint(&lease, bytes))?;
                assert_eq!(got, want, "checkpoint took effect");
            }
            Op::Forget { slot } => {
                let (scope, key) = name(*slot);
                let want = self.model.forget(scope, key);
                let got = self.store().forget(scope, key)?;
                assert_eq!(got, want, "forget found a live record");
            }
            Op::Sweep { limit } => {
                let want = self.model.sweep(*limit);
                let got = self.store().sweep(*limit)?;
                assert_eq!(got.removed, want, "records swept");
            }
            Op::Advance { ms } => {
                self.clock.advance(Duration::from_millis(*ms));
                self.model.now += ms;
            }
            Op::Reopen => {
                let store = self.store.take().expect("store");
                store.close()?;
                let store = match self.open() {
                    Ok(store) => store,
                    Err(e) => {
                        // A fault during the open: nothing was acknowledged, so open again
                        // without faults; the state must be unchanged.
                        assert!(
                            self.backend.fired() > 0,
                            "open failed without a fault: {e:?}"
                        );
                        self.backend.disarm();
                        self.open().expect("a reopen without faults")
                    }
                };
                assert!(
                    store.epoch() > self.model.epoch,
                    "a reopen starts a new epoch"
                );
                self.model.epoch = store.epoch();
                self.store = Some(store);
                self.summary.reopens += 1;
            }
            Op::Fault(plan) => self.backend.arm(*plan),
        }
        Ok(())
    }
}

/// Decodes arbitrary bytes into up to 96 operations (claim, complete, fail, extend,
/// checkpoint, forget, sweep, clock advance, reopen, and "arm an I/O fault") on two scopes
/// × three keys, and runs them on an in-memory store over a backend that fails writes,
/// syncs or resizes at fuzzer-chosen points (once or from then on, as an I/O error or a
/// full disk).
///
/// The oracle is the reference model of DESIGN §2 in [`model`] (shared with `tests/model.rs`
/// and `tests/linearizability.rs`, written apart from `transition.rs`): when no fault fired inside an
/// operation, its answer and every record of the key space must equal the model's, and
/// fencing tokens must strictly increase. When a fault fired inside an operation, the
/// operation must have failed (never acknowledged) with a storage error, the store must
/// refuse further writes, and after a reopen over the same bytes every record must be
/// exactly as before the operation or exactly as after it, tokens never reused. A reopen
/// also checks that everything acknowledged survived it.
pub fn run_ops(data: &[u8]) -> OpsSummary {
    let mut r = Reader::new(data);
    let clock = ManualClock::new(T0_MS);
    let backend = FaultyMemory::default();
    let mut harness = Harness {
        summary: OpsSummary::default(),
        backend,
        clock,
        store: None,
        model: Model::new(T0_MS, 0),
        leases: Vec::new(),
        last_token: 0,
    };
    let store = harness.open().expect("a new in-memory store opens");
    harness.model.epoch = store.epoch();
    harness.store = Some(store);
    harness.check_everything();
    let mut ops = 0;
    while !r.is_empty() && ops < OPS_MAX {
        let op = read_op(&mut r);
        harness.step(&op);
        harness.check_everything();
        ops += 1;
    }
    harness.backend.disarm();
    // Whatever was acknowledged survives a clean reopen.
    harness.step(&Op::Reopen);
    harness.check_everything();
    harness.summary.ops = ops;
    harness.summary.faults_fired = harness.backend.fired();
    harness.summary
}
