//! Model-based test: random operation sequences run against a real file store (with and
//! without a write-ahead log; the log checkpointed after every commit, with the smallest map
//! budget) and against a small reference model of DESIGN §2, written independently of the
//! engine's state machine.
//! After every operation the store's answer, every record of the key space, and the store's
//! counters must agree with the model.
//!
//! The default case count is 64; `PROPTEST_CASES` overrides it (the `proptest!` macro merges
//! the environment into the configuration given here).

use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use idemstore::testkit::model::{Expected, MRecord, Model};
use idemstore::{Claim, ClaimOptions, Clock, Error, Lease, ManualClock, Store};
use proptest::prelude::*;
use proptest::sample::Index;

/// 2023-11-14T22:13:20Z: a fixed start time for the manual clock.
const T0_MS: u64 = 1_700_000_000_000;
const SCOPES: [&str; 2] = ["s0", "s1"];
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const FINGERPRINTS: [&[u8]; 2] = [b"fp-a", b"fp-b"];

// ----- operations -----

/// One step of a test case. Lease operations name a lease by an index into the leases the
/// test obtained so far (stale ones included); with none obtained yet they are skipped.
#[derive(Debug, Clone)]
enum Op {
    Claim {
        scope: usize,
        key: usize,
        fp: usize,
        lease_ms: u64,
        retention_ms: u64,
    },
    Complete {
        lease: LeaseRef,
        outcome: Vec<u8>,
        retention_ms: u64,
    },
    Fail {
        lease: LeaseRef,
    },
    Extend {
        lease: LeaseRef,
        by_ms: u64,
    },
    Checkpoint {
        lease: LeaseRef,
        bytes: Vec<u8>,
    },
    Forget {
        scope: usize,
        key: usize,
    },
    Sweep {
        limit: usize,
    },
    Advance {
        ms: u64,
    },
    Reopen,
}

/// Mostly the first fingerprint, so that most claims take the same-request paths.
fn fingerprint() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0usize), 1 => Just(1usize)]
}

/// A lease the test obtained: one of the latest few (likely still the owner) or any of them
/// (likely stale).
#[derive(Debug, Clone)]
struct LeaseRef {
    recent: bool,
    index: Index,
}

fn lease_ref() -> impl Strategy<Value = LeaseRef> {
    (any::<bool>(), any::<Index>()).prop_map(|(recent, index)| LeaseRef { recent, index })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let scope = 0..SCOPES.len();
    let key = 0..KEYS.len();
    prop_oneof![
        6 => (scope.clone(), key.clone(), fingerprint(), 1..=50u64, 50..=500u64).prop_map(
            |(scope, key, fp, lease_ms, retention_ms)| Op::Claim {
                scope,
                key,
                fp,
                lease_ms,
                retention_ms,
            }
        ),
        3 => (lease_ref(), prop::collection::vec(any::<u8>(), 0..4), 1..=500u64).prop_map(
            |(lease, outcome, retention_ms)| Op::Complete {
                lease,
                outcome,
                retention_ms,
            }
        ),
        2 => lease_ref().prop_map(|lease| Op::Fail { lease }),
        2 => (lease_ref(), 1..=200u64).prop_map(|(lease, by_ms)| Op::Extend { lease, by_ms }),
        2 => (lease_ref(), prop::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(lease, bytes)| Op::Checkpoint { lease, bytes }),
        1 => (scope, key).prop_map(|(scope, key)| Op::Forget { scope, key }),
        1 => (0..5usize).prop_map(|limit| Op::Sweep { limit }),
        // Short steps keep leases and records alive long enough to be taken over, long ones
        // expire them.
        4 => prop_oneof![0..=20u64, 0..=300u64].prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Reopen),
    ]
}

// ----- the reference model -----
//
// The model (DESIGN §2, written apart from the engine's state machine) is shared with the
// `ops` fuzz target and the linearizability checker: `idemstore::testkit::model`.

type Slot = (usize, usize);

fn name((scope, key): Slot) -> (&'static [u8], &'static [u8]) {
    (SCOPES[scope].as_bytes(), KEYS[key].as_bytes())
}

fn expect_eq<T: Debug + PartialEq>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}:\n  store: {got:?}\n  model: {want:?}"))
    }
}

fn io<T>(result: idemstore::Result<T>) -> Result<T, String> {
    result.map_err(|e| format!("unexpected store error: {e} ({e:?})"))
}

/// The store's answer to a lease operation, reduced to taken effect (true) or lease lost
/// (false); anything else is a failure.
fn fenced(result: idemstore::Result<()>, lease: &Lease) -> Result<bool, String> {
    match result {
        Ok(()) => Ok(true),
        Err(Error::LeaseLost { token }) if token == lease.token() => Ok(false),
        Err(e) => Err(format!("expected Ok or LeaseLost, got {e} ({e:?})")),
    }
}

// ----- the driver -----

/// Opens the store; `wal`: with a write-ahead log checkpointed after every commit and the
/// smallest map budget, so that reads race checkpoints and evictions of the map.
fn open(path: &Path, clock: &ManualClock, wal: bool) -> Result<Store, String> {
    let builder = Store::builder().clock(clock.clone()).sweep_interval(None);
    let builder = if wal {
        builder
            .write_ahead_log(true)
            .checkpoint_interval(Duration::ZERO)
            .map_budget(idemstore::MAP_BUDGET_MIN)
            .wal_segment_bytes(idemstore::WAL_SEGMENT_BYTES_MIN)
            .wal_segments(2)
    } else {
        builder
    };
    io(builder.open(path))
}

fn slot_of(lease: &Lease) -> Result<Slot, String> {
    let scope = SCOPES.iter().position(|s| s.as_bytes() == lease.scope());
    let key = KEYS.iter().position(|k| k.as_bytes() == lease.key());
    scope
        .zip(key)
        .ok_or_else(|| format!("lease names an unknown record: {lease:?}"))
}

struct Harness {
    path: std::path::PathBuf,
    clock: ManualClock,
    store: Option<Store>,
    model: Model,
    leases: Vec<Lease>,
    last_token: u64,
    wal: bool,
}

impl Harness {
    fn new(path: std::path::PathBuf, wal: bool) -> Result<Harness, String> {
        let clock = ManualClock::new(T0_MS);
        let store = open(&path, &clock, wal)?;
        Ok(Harness {
            wal,
            path,
            model: Model::new(T0_MS, store.epoch()),
            clock,
            store: Some(store),
            leases: Vec::new(),
            last_token: 0,
        })
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Claim {
                scope,
                key,
                fp,
                lease_ms,
                retention_ms,
            } => self.claim((*scope, *key), *fp, *lease_ms, *retention_ms)?,
            Op::Complete {
                lease,
                outcome,
                retention_ms,
            } => {
                let Some(lease) = self.pick(lease) else {
                    return Ok(());
                };
                let (scope, key) = name(slot_of(&lease)?);
                let retention = Duration::from_millis(*retention_ms);
                let got = fenced(self.store()?.complete(&lease, outcome, retention), &lease)?;
                let want = self
                    .model
                    .complete(scope, key, lease.token(), outcome, *retention_ms);
                expect_eq("complete took effect", got, want)?;
            }
            Op::Fail { lease } => {
                let Some(lease) = self.pick(lease) else {
                    return Ok(());
                };
                let got = fenced(self.store()?.fail(&lease), &lease)?;
                let (scope, key) = name(slot_of(&lease)?);
                let want = self.model.fail(scope, key, lease.token());
                expect_eq("fail took effect", got, want)?;
            }
            Op::Extend { lease, by_ms } => {
                let Some(index) = self.pick_index(lease) else {
                    return Ok(());
                };
                let store = self.store.as_ref().ok_or("the store is not open")?;
                let Some(lease) = self.leases.get_mut(index) else {
                    return Ok(());
                };
                let result = store.extend(lease, Duration::from_millis(*by_ms));
                let got = fenced(result, lease)?;
                let (scope, key) = name(slot_of(lease)?);
                let want = self.model.extend(scope, key, lease.token(), *by_ms);
                expect_eq("extend took effect", got, want.is_some())?;
                if let Some(until) = want {
                    expect_eq("extended lease end", lease.lease_until_ms(), until)?;
                }
            }
            Op::Checkpoint { lease, bytes } => {
                let Some(lease) = self.pick(lease) else {
                    return Ok(());
                };
                let got = fenced(self.store()?.checkpoint(&lease, bytes), &lease)?;
                let (scope, key) = name(slot_of(&lease)?);
                let want = self.model.checkpoint(scope, key, lease.token(), bytes);
                expect_eq("checkpoint took effect", got, want)?;
            }
            Op::Forget { scope, key } => {
                let (scope, key) = name((*scope, *key));
                let got = io(self.store()?.forget(scope, key))?;
                let want = self.model.forget(scope, key);
                expect_eq("forget found a live record", got, want)?;
            }
            Op::Sweep { limit } => {
                let swept = io(self.store()?.sweep(*limit))?;
                let want = self.model.sweep(*limit);
                expect_eq("records swept", swept.removed, want)?;
            }
            Op::Advance { ms } => {
                self.clock.advance(Duration::from_millis(*ms));
                self.model.now += ms;
            }
            Op::Reopen => {
                // Close releases the file; the reopen starts the next process epoch.
                let store = self.store.take().ok_or("the store is not open")?;
                io(store.close())?;
                self.store = Some(open(&self.path, &self.clock, self.wal)?);
                self.model.epoch += 1;
            }
        }
        self.check_everything()
    }

    fn claim(
        &mut self,
        slot: Slot,
        fp: usize,
        lease_ms: u64,
        retention_ms: u64,
    ) -> Result<(), String> {
        let options = ClaimOptions::default()
            .lease(Duration::from_millis(lease_ms))
            .retention(Duration::from_millis(retention_ms));
        let (scope, key) = name(slot);
        let got = io(self.store()?.claim(scope, key, FINGERPRINTS[fp], &options))?;
        let want = self
            .model
            .claim(scope, key, FINGERPRINTS[fp], lease_ms, retention_ms);
        let got_view = match &got {
            Claim::Acquired(lease) => {
                if lease.token() <= self.last_token {
                    return Err(format!(
                        "token {} granted after token {}: tokens must strictly increase",
                        lease.token(),
                        self.last_token
                    ));
                }
                expect_eq("lease scope", lease.scope(), scope)?;
                expect_eq("lease key", lease.key(), key)?;
                Expected::Acquired {
                    attempt: lease.attempt(),
                    takeover: lease.is_takeover(),
                    checkpoint: lease.checkpoint().map(<[u8]>::to_vec),
                    lease_until: lease.lease_until_ms(),
                }
            }
            Claim::Replay(replay) => Expected::Replay {
                outcome: replay.outcome.clone(),
                completed_at: replay.completed_at_ms,
                attempt: replay.attempt,
            },
            Claim::InProgress { retry_after } => Expected::InProgress {
                retry_after_ms: u64::try_from(retry_after.as_millis())
                    .map_err(|e| e.to_string())?,
            },
            Claim::Mismatch => Expected::Mismatch,
            other => return Err(format!("unknown claim answer {other:?}")),
        };
        expect_eq("claim answer", got_view, want)?;
        if let Claim::Acquired(lease) = got {
            self.last_token = lease.token();
            self.model.grant(scope, key, lease.token());
            self.leases.push(lease);
        }
        Ok(())
    }

    fn store(&self) -> Result<&Store, String> {
        self.store
            .as_ref()
            .ok_or_else(|| "the store is not open".to_owned())
    }

    fn pick_index(&self, lease: &LeaseRef) -> Option<usize> {
        let len = self.leases.len();
        if len == 0 {
            return None;
        }
        Some(if lease.recent {
            let window = len.min(3);
            len - window + lease.index.index(window)
        } else {
            lease.index.index(len)
        })
    }

    fn pick(&self, index: &LeaseRef) -> Option<Lease> {
        self.pick_index(index)
            .and_then(|i| self.leases.get(i))
            .cloned()
    }

    /// Every record of the key space, the counters and the epoch against the model.
    fn check_everything(&self) -> Result<(), String> {
        for scope_name in SCOPES {
            for key_name in KEYS {
                let got = io(self.store()?.get(scope_name, key_name))?
                    .as_ref()
                    .map(MRecord::of);
                let want = self
                    .model
                    .live(scope_name.as_bytes(), key_name.as_bytes())
                    .cloned();
                expect_eq(&format!("get({scope_name}, {key_name})"), got, want)?;
            }
        }
        let stats = io(self.store()?.stats())?;
        expect_eq(
            "stats: expiry entries vs records",
            stats.expiry_entries,
            stats.records,
        )?;
        expect_eq(
            "stats: records held (live or awaiting sweep)",
            stats.records,
            self.model.len() as u64,
        )?;
        if stats.next_token <= self.last_token {
            return Err(format!(
                "stats.next_token {} is not above the last granted token {}",
                stats.next_token, self.last_token
            ));
        }
        expect_eq("epoch", self.store()?.epoch(), self.model.epoch)?;
        expect_eq("clock", self.clock.now_ms(), self.model.now)
    }
}

fn run(ops: &[Op], wal: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut harness = Harness::new(dir.path().join("model.redb"), wal)?;
    expect_eq("epoch of a new database", harness.model.epoch, 1)?;
    harness.check_everything()?;
    for (i, op) in ops.iter().enumerate() {
        harness
            .step(op)
            .map_err(|e| format!("after op #{i} {op:?}: {e}"))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn store_matches_reference_model(ops in prop::collection::vec(op_strategy(), 1..60)) {
        if let Err(divergence) = run(&ops, false) {
            return Err(TestCaseError::fail(divergence));
        }
    }

    #[test]
    fn store_with_a_write_ahead_log_matches_reference_model(
        ops in prop::collection::vec(op_strategy(), 1..60)
    ) {
        if let Err(divergence) = run(&ops, true) {
            return Err(TestCaseError::fail(divergence));
        }
    }
}
