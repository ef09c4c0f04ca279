//! Model-based test: random operation sequences run against a real file store and against a
//! small reference model of DESIGN §2, written independently of the engine's state machine.
//! After every operation the store's answer, every record of the key space, and the store's
//! counters must agree with the model.
//!
//! The default case count is 64; `PROPTEST_CASES` overrides it (the `proptest!` macro merges
//! the environment into the configuration given here).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use idemstore::{
    Claim, ClaimOptions, Clock, Error, Lease, ManualClock, Record, RecordState, Store,
};
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

// ----- the reference model (DESIGN §2) -----
//
// Rules: a record with `expires_at <= now` is absent to every operation. A claim of an absent
// record acquires attempt 1 (expiry now + retention); another fingerprint is a mismatch; a
// completed record replays; an in-flight record under a live lease of the current epoch is in
// progress; an in-flight record whose lease ended or whose epoch is older is taken over, and a
// failed one re-acquired: attempt + 1, the checkpoint handed over (and kept on the record, so
// that an owner that dies before its first checkpoint still passes on the last recovery
// point), expiry max(old, now + retention). Lease writes take effect only on a live in-flight
// record carrying the lease's token.

type Slot = (usize, usize);

#[derive(Debug, Clone, PartialEq, Eq)]
enum ModelState {
    InFlight {
        token: u64,
        epoch: u64,
        lease_until: u64,
        checkpoint: Option<Vec<u8>>,
    },
    Completed {
        outcome: Vec<u8>,
        completed_at: u64,
    },
    Failed {
        checkpoint: Option<Vec<u8>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelRecord {
    fingerprint: usize,
    created_at: u64,
    expires_at: u64,
    attempt: u32,
    state: ModelState,
}

/// What the model expects a claim to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ExpectedClaim {
    Acquired {
        attempt: u32,
        takeover: bool,
        checkpoint: Option<Vec<u8>>,
        lease_until: u64,
    },
    Replay {
        outcome: Vec<u8>,
        completed_at: u64,
        attempt: u32,
    },
    InProgress {
        retry_after: Duration,
    },
    Mismatch,
}

/// The records physically held (expired ones included until swept or forgotten: they only
/// matter for the record count), the clock and the process epoch.
#[derive(Debug)]
struct Model {
    records: BTreeMap<Slot, ModelRecord>,
    now: u64,
    epoch: u64,
}

impl Model {
    fn live(&self, slot: Slot) -> Option<&ModelRecord> {
        self.records.get(&slot).filter(|r| r.expires_at > self.now)
    }

    /// The live in-flight record owned by `token`, if any.
    fn owned_mut(&mut self, slot: Slot, token: u64) -> Option<&mut ModelRecord> {
        let now = self.now;
        self.records.get_mut(&slot).filter(|r| {
            r.expires_at > now
                && matches!(r.state, ModelState::InFlight { token: t, .. } if t == token)
        })
    }

    /// Decides a claim. An acquisition installs the new in-flight record with token 0; the
    /// caller sets the token the store granted with [`Model::grant`].
    fn claim(&mut self, slot: Slot, fp: usize, lease_ms: u64, retention_ms: u64) -> ExpectedClaim {
        let now = self.now;
        let lease_until = now + lease_ms;
        let fresh_expiry = now + retention_ms;
        let Some(rec) = self.live(slot).cloned() else {
            self.records.insert(
                slot,
                ModelRecord {
                    fingerprint: fp,
                    created_at: now,
                    expires_at: fresh_expiry,
                    attempt: 1,
                    state: self.in_flight(lease_until, None),
                },
            );
            return ExpectedClaim::Acquired {
                attempt: 1,
                takeover: false,
                checkpoint: None,
                lease_until,
            };
        };
        if rec.fingerprint != fp {
            return ExpectedClaim::Mismatch;
        }
        let (checkpoint, takeover) = match &rec.state {
            ModelState::Completed {
                outcome,
                completed_at,
            } => {
                return ExpectedClaim::Replay {
                    outcome: outcome.clone(),
                    completed_at: *completed_at,
                    attempt: rec.attempt,
                };
            }
            ModelState::InFlight {
                epoch,
                lease_until: held_until,
                ..
            } if *held_until > now && *epoch == self.epoch => {
                return ExpectedClaim::InProgress {
                    retry_after: Duration::from_millis(held_until - now),
                };
            }
            ModelState::InFlight { checkpoint, .. } => (checkpoint.clone(), true),
            ModelState::Failed { checkpoint } => (checkpoint.clone(), false),
        };
        let attempt = rec.attempt + 1;
        self.records.insert(
            slot,
            ModelRecord {
                fingerprint: fp,
                created_at: rec.created_at,
                expires_at: rec.expires_at.max(fresh_expiry),
                attempt,
                state: self.in_flight(lease_until, checkpoint.clone()),
            },
        );
        ExpectedClaim::Acquired {
            attempt,
            takeover,
            checkpoint,
            lease_until,
        }
    }

    fn in_flight(&self, lease_until: u64, checkpoint: Option<Vec<u8>>) -> ModelState {
        ModelState::InFlight {
            token: 0,
            epoch: self.epoch,
            lease_until,
            checkpoint,
        }
    }

    fn grant(&mut self, slot: Slot, granted: u64) {
        if let Some(ModelRecord {
            state: ModelState::InFlight { token, .. },
            ..
        }) = self.records.get_mut(&slot)
        {
            *token = granted;
        }
    }

    /// `complete`: true if it took effect, false for lease lost.
    fn complete(&mut self, slot: Slot, token: u64, outcome: &[u8], retention_ms: u64) -> bool {
        let now = self.now;
        let Some(rec) = self.owned_mut(slot, token) else {
            return false;
        };
        rec.state = ModelState::Completed {
            outcome: outcome.to_vec(),
            completed_at: now,
        };
        rec.expires_at = now + retention_ms;
        true
    }

    fn fail(&mut self, slot: Slot, token: u64) -> bool {
        let Some(rec) = self.owned_mut(slot, token) else {
            return false;
        };
        let ModelState::InFlight { checkpoint, .. } = &rec.state else {
            return false;
        };
        rec.state = ModelState::Failed {
            checkpoint: checkpoint.clone(),
        };
        true
    }

    /// `extend`: the new lease end if it took effect.
    fn extend(&mut self, slot: Slot, token: u64, by_ms: u64) -> Option<u64> {
        let new_until = self.now + by_ms;
        let rec = self.owned_mut(slot, token)?;
        if let ModelState::InFlight { lease_until, .. } = &mut rec.state {
            *lease_until = new_until;
        }
        rec.expires_at = rec.expires_at.max(new_until);
        Some(new_until)
    }

    fn checkpoint(&mut self, slot: Slot, token: u64, bytes: &[u8]) -> bool {
        let Some(rec) = self.owned_mut(slot, token) else {
            return false;
        };
        if let ModelState::InFlight { checkpoint, .. } = &mut rec.state {
            *checkpoint = Some(bytes.to_vec());
        }
        true
    }

    /// `forget`: whether a live record was there; removes it even if expired.
    fn forget(&mut self, slot: Slot) -> bool {
        let live = self.live(slot).is_some();
        self.records.remove(&slot);
        live
    }

    /// `sweep(limit)`: removes up to `limit` expired records, oldest expiry first (ties in the
    /// order of the expiry index: by scoped key). Returns how many it removed.
    fn sweep(&mut self, limit: usize) -> usize {
        let mut due: Vec<(u64, Vec<u8>, Slot)> = self
            .records
            .iter()
            .filter(|(_, r)| r.expires_at <= self.now)
            .map(|(&slot, r)| (r.expires_at, scoped_key(slot), slot))
            .collect();
        due.sort();
        due.truncate(limit);
        for (_, _, slot) in &due {
            self.records.remove(slot);
        }
        due.len()
    }
}

/// The documented storage key order: one length byte, the scope, then the key.
fn scoped_key((scope, key): Slot) -> Vec<u8> {
    let scope = SCOPES[scope].as_bytes();
    let mut out = vec![u8::try_from(scope.len()).unwrap_or(u8::MAX)];
    out.extend_from_slice(scope);
    out.extend_from_slice(KEYS[key].as_bytes());
    out
}

// ----- comparison -----

/// The observable part of a record, in a form both the store and the model produce.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    fingerprint: Vec<u8>,
    created_at: u64,
    expires_at: u64,
    attempt: u32,
    state: ModelState,
}

impl View {
    fn of_model(r: &ModelRecord) -> View {
        View {
            fingerprint: FINGERPRINTS[r.fingerprint].to_vec(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            attempt: r.attempt,
            state: r.state.clone(),
        }
    }

    fn of_store(r: &Record) -> Result<View, String> {
        let state = match &r.state {
            RecordState::InFlight {
                token,
                epoch,
                lease_until_ms,
                checkpoint,
            } => ModelState::InFlight {
                token: *token,
                epoch: *epoch,
                lease_until: *lease_until_ms,
                checkpoint: checkpoint.clone(),
            },
            // `completed_at` is not part of a stored record; replays carry it.
            RecordState::Completed { outcome } => ModelState::Completed {
                outcome: outcome.clone(),
                completed_at: 0,
            },
            RecordState::Failed { checkpoint } => ModelState::Failed {
                checkpoint: checkpoint.clone(),
            },
            other => return Err(format!("unknown record state {other:?}")),
        };
        Ok(View {
            fingerprint: r.fingerprint.clone(),
            created_at: r.created_at_ms,
            expires_at: r.expires_at_ms,
            attempt: r.attempt,
            state,
        })
    }

    fn without_completion_time(mut self) -> View {
        if let ModelState::Completed { completed_at, .. } = &mut self.state {
            *completed_at = 0;
        }
        self
    }
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

fn open(path: &Path, clock: &ManualClock) -> Result<Store, String> {
    io(Store::builder()
        .clock(clock.clone())
        .sweep_interval(None)
        .open(path))
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
}

impl Harness {
    fn new(path: std::path::PathBuf) -> Result<Harness, String> {
        let clock = ManualClock::new(T0_MS);
        let store = open(&path, &clock)?;
        Ok(Harness {
            path,
            model: Model {
                records: BTreeMap::new(),
                now: T0_MS,
                epoch: store.epoch(),
            },
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
                let slot = slot_of(&lease)?;
                let retention = Duration::from_millis(*retention_ms);
                let got = fenced(self.store()?.complete(&lease, outcome, retention), &lease)?;
                let want = self
                    .model
                    .complete(slot, lease.token(), outcome, *retention_ms);
                expect_eq("complete took effect", got, want)?;
            }
            Op::Fail { lease } => {
                let Some(lease) = self.pick(lease) else {
                    return Ok(());
                };
                let got = fenced(self.store()?.fail(&lease), &lease)?;
                let want = self.model.fail(slot_of(&lease)?, lease.token());
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
                let want = self.model.extend(slot_of(lease)?, lease.token(), *by_ms);
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
                let want = self
                    .model
                    .checkpoint(slot_of(&lease)?, lease.token(), bytes);
                expect_eq("checkpoint took effect", got, want)?;
            }
            Op::Forget { scope, key } => {
                let got = io(self.store()?.forget(SCOPES[*scope], KEYS[*key]))?;
                let want = self.model.forget((*scope, *key));
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
                self.store = Some(open(&self.path, &self.clock)?);
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
        let (scope, key) = (SCOPES[slot.0], KEYS[slot.1]);
        let got = io(self.store()?.claim(scope, key, FINGERPRINTS[fp], &options))?;
        let want = self.model.claim(slot, fp, lease_ms, retention_ms);
        let got_view = match &got {
            Claim::Acquired(lease) => {
                if lease.token() <= self.last_token {
                    return Err(format!(
                        "token {} granted after token {}: tokens must strictly increase",
                        lease.token(),
                        self.last_token
                    ));
                }
                expect_eq("lease scope", lease.scope(), scope.as_bytes())?;
                expect_eq("lease key", lease.key(), key.as_bytes())?;
                ExpectedClaim::Acquired {
                    attempt: lease.attempt(),
                    takeover: lease.is_takeover(),
                    checkpoint: lease.checkpoint().map(<[u8]>::to_vec),
                    lease_until: lease.lease_until_ms(),
                }
            }
            Claim::Replay(replay) => ExpectedClaim::Replay {
                outcome: replay.outcome.clone(),
                completed_at: replay.completed_at_ms,
                attempt: replay.attempt,
            },
            Claim::InProgress { retry_after } => ExpectedClaim::InProgress {
                retry_after: *retry_after,
            },
            Claim::Mismatch => ExpectedClaim::Mismatch,
            other => return Err(format!("unknown claim answer {other:?}")),
        };
        expect_eq("claim answer", got_view, want)?;
        if let Claim::Acquired(lease) = got {
            self.last_token = lease.token();
            self.model.grant(slot, lease.token());
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
        for (scope, scope_name) in SCOPES.iter().enumerate() {
            for (key, key_name) in KEYS.iter().enumerate() {
                let got = io(self.store()?.get(scope_name, key_name))?
                    .as_ref()
                    .map(View::of_store)
                    .transpose()?;
                let want = self
                    .model
                    .live((scope, key))
                    .map(|r| View::of_model(r).without_completion_time());
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
            self.model.records.len() as u64,
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

fn run(ops: &[Op]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut harness = Harness::new(dir.path().join("model.redb"))?;
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
        if let Err(divergence) = run(&ops) {
            return Err(TestCaseError::fail(divergence));
        }
    }
}
