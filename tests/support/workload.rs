//! A fixed, seeded, single-threaded workload (claims, completes, fails, checkpoints, extends,
//! forgets, stale-lease writes, clock advances and sweeps) and physical-state snapshots.
//!
//! The workload only decides *what* to do; what the store answers is recorded, not predicted
//! (the model test checks semantics). Given the same seed and the same store answers, it issues
//! the same calls, so a run with a fault injected at call N behaves exactly like the clean run
//! up to the fault.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use idemstore::{Claim, ClaimOptions, Error, Lease, ManualClock, Record, Store};

use super::rng::Rng;

/// 2023-11-14T22:13:20Z: where the workload clock starts.
pub const T0_MS: u64 = 1_700_000_000_000;
const SHORT_RETENTION: Duration = Duration::from_secs(5);
const LONG_RETENTION: Duration = Duration::from_secs(86_400);
const LEASE: Duration = Duration::from_secs(2);

/// `(scope, key)`.
pub type Id = (String, String);

/// Every record the workload may create.
pub fn ids() -> Vec<Id> {
    let mut out = Vec::new();
    for i in 0..10 {
        out.push(("a".to_string(), format!("k{i}")));
    }
    for i in 0..4 {
        out.push(("b".to_string(), format!("k{i}")));
    }
    out
}

/// One step of the workload. `pick` chooses among the leases held at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Claim {
        id: usize,
        wrong_fingerprint: bool,
        short: bool,
    },
    Complete {
        pick: u64,
        len: usize,
        short: bool,
    },
    Fail {
        pick: u64,
    },
    Checkpoint {
        pick: u64,
        len: usize,
    },
    Extend {
        pick: u64,
    },
    Forget {
        id: usize,
    },
    Stale {
        pick: u64,
        complete: bool,
    },
    Advance {
        ms: u64,
    },
    Sweep {
        limit: usize,
    },
}

/// A scripted start that reaches every kind of transition at least once, whatever the seed:
/// checkpoint, extend, completion with an outcome larger than a page, retryable failure and
/// re-acquisition with the checkpoint handed over, a stale lease rejected, forget, a record of
/// the second scope, expiry and a sweep that removes records, a claim after the sweep.
pub fn prelude() -> Vec<Step> {
    vec![
        Step::Claim {
            id: 0,
            wrong_fingerprint: false,
            short: false,
        },
        Step::Checkpoint { pick: 0, len: 40 },
        Step::Extend { pick: 0 },
        Step::Complete {
            pick: 0,
            len: 12_000,
            short: false,
        },
        Step::Claim {
            id: 1,
            wrong_fingerprint: false,
            short: true,
        },
        Step::Checkpoint { pick: 0, len: 10 },
        Step::Fail { pick: 0 },
        Step::Claim {
            id: 1,
            wrong_fingerprint: false,
            short: true,
        },
        Step::Stale {
            pick: 1,
            complete: true,
        },
        Step::Forget { id: 0 },
        Step::Claim {
            id: 10,
            wrong_fingerprint: false,
            short: true,
        },
        Step::Complete {
            pick: 1,
            len: 300,
            short: true,
        },
        Step::Advance { ms: 6_000 },
        Step::Sweep { limit: 10 },
        Step::Claim {
            id: 1,
            wrong_fingerprint: false,
            short: false,
        },
        Step::Claim {
            id: 2,
            wrong_fingerprint: true,
            short: false,
        },
    ]
}

/// The [`prelude`], then random steps from `seed`: `n` steps in all (at least the prelude).
pub fn generate(seed: u64, n: usize) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let n_ids = ids().len() as u64;
    let mut steps = prelude();
    let random = n.saturating_sub(steps.len());
    steps.extend((0..random).map(|_| {
        let roll = rng.below(100);
        match roll {
            0..=29 => Step::Claim {
                id: rng.below(n_ids) as usize,
                wrong_fingerprint: rng.chance(5),
                short: rng.chance(35),
            },
            30..=47 => Step::Complete {
                pick: rng.next_u64(),
                len: outcome_len(&mut rng),
                short: rng.chance(30),
            },
            48..=55 => Step::Fail {
                pick: rng.next_u64(),
            },
            56..=66 => Step::Checkpoint {
                pick: rng.next_u64(),
                len: rng.range(1, 300) as usize,
            },
            67..=71 => Step::Extend {
                pick: rng.next_u64(),
            },
            72..=76 => Step::Forget {
                id: rng.below(n_ids) as usize,
            },
            77..=81 => Step::Stale {
                pick: rng.next_u64(),
                complete: rng.chance(50),
            },
            82..=91 => Step::Advance {
                ms: rng.range(200, 7_000),
            },
            _ => Step::Sweep {
                limit: rng.range(1, 20) as usize,
            },
        }
    }));
    steps
}

fn outcome_len(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..=69 => rng.below(200) as usize,
        70..=94 => rng.range(200, 3_000) as usize,
        // Larger than a page: overflow pages.
        _ => rng.range(5_000, 20_000) as usize,
    }
}

/// What a step did, when the store did not report an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing to do (no lease to pick), or a clock advance.
    Skipped,
    /// Answered from committed state without a commit (replay, mismatch, in progress).
    ReadOnly,
    /// Answered by the writer after a commit: the change (if any) is acknowledged.
    Committed,
    /// A fencing rejection: nothing changed.
    LeaseLost,
}

/// Runs the workload against one store, keeping the leases it holds.
pub struct Driver {
    pub clock: ManualClock,
    rng: Rng,
    leases: BTreeMap<usize, Lease>,
    stale: Vec<Lease>,
    ids: Vec<Id>,
}

fn fingerprint(id: &Id) -> Vec<u8> {
    format!("fp:{}/{}", id.0, id.1).into_bytes()
}

impl Driver {
    pub fn new(seed: u64, clock: ManualClock) -> Driver {
        Driver {
            clock,
            rng: Rng::new(seed ^ 0xD1CE),
            leases: BTreeMap::new(),
            stale: Vec::new(),
            ids: ids(),
        }
    }

    fn pick(&self, pick: u64) -> Option<usize> {
        if self.leases.is_empty() {
            return None;
        }
        let i = (pick % self.leases.len() as u64) as usize;
        self.leases.keys().nth(i).copied()
    }

    fn retire(&mut self, id: usize) {
        if let Some(old) = self.leases.remove(&id) {
            self.stale.push(old);
        }
    }

    /// Runs one step. `Err` is a storage error (anything but a fencing rejection).
    pub fn run(&mut self, store: &Store, step: &Step) -> Result<Effect, Error> {
        let result = self.run_inner(store, step);
        match result {
            Err(Error::LeaseLost { .. }) => Ok(Effect::LeaseLost),
            other => other,
        }
    }

    fn run_inner(&mut self, store: &Store, step: &Step) -> Result<Effect, Error> {
        match *step {
            Step::Claim {
                id,
                wrong_fingerprint,
                short,
            } => {
                let (scope, key) = self.ids[id].clone();
                let mut fp = fingerprint(&self.ids[id]);
                if wrong_fingerprint {
                    fp.extend_from_slice(b"-other");
                }
                let retention = if short {
                    SHORT_RETENTION
                } else {
                    LONG_RETENTION
                };
                let options = ClaimOptions::default().lease(LEASE).retention(retention);
                match store.claim(&scope, &key, &fp, &options)? {
                    Claim::Acquired(lease) => {
                        self.retire(id);
                        self.leases.insert(id, lease);
                        Ok(Effect::Committed)
                    }
                    _ => Ok(Effect::ReadOnly),
                }
            }
            Step::Complete { pick, len, short } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(Effect::Skipped);
                };
                let mut outcome = format!("outcome of {:?}: ", self.ids[id]).into_bytes();
                outcome.extend(self.rng.bytes(len));
                let retention = if short {
                    SHORT_RETENTION
                } else {
                    LONG_RETENTION
                };
                let lease = self.leases[&id].clone();
                let result = store.complete(&lease, &outcome, retention);
                self.after_lease_op(id, result, true)
            }
            Step::Fail { pick } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(Effect::Skipped);
                };
                let lease = self.leases[&id].clone();
                let result = store.fail(&lease);
                self.after_lease_op(id, result, true)
            }
            Step::Checkpoint { pick, len } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(Effect::Skipped);
                };
                let bytes = self.rng.bytes(len);
                let lease = self.leases[&id].clone();
                let result = store.checkpoint(&lease, &bytes);
                self.after_lease_op(id, result, false)
            }
            Step::Extend { pick } => {
                let Some(id) = self.pick(pick) else {
                    return Ok(Effect::Skipped);
                };
                let mut lease = self.leases[&id].clone();
                let result = store.extend(&mut lease, LEASE);
                if result.is_ok() {
                    self.leases.insert(id, lease);
                }
                self.after_lease_op(id, result, false)
            }
            Step::Forget { id } => {
                let (scope, key) = &self.ids[id];
                store.forget(scope, key)?;
                Ok(Effect::Committed)
            }
            Step::Stale { pick, complete } => {
                if self.stale.is_empty() {
                    return Ok(Effect::Skipped);
                }
                let lease = self.stale[(pick % self.stale.len() as u64) as usize].clone();
                let result = if complete {
                    store.complete(&lease, b"stale!", LONG_RETENTION)
                } else {
                    store.checkpoint(&lease, b"stale!")
                };
                match result {
                    Ok(()) => panic!("a stale lease (token {}) was accepted", lease.token()),
                    Err(e) => Err(e),
                }
            }
            Step::Advance { ms } => {
                self.clock.advance(Duration::from_millis(ms));
                Ok(Effect::Skipped)
            }
            Step::Sweep { limit } => {
                store.sweep(limit)?;
                Ok(Effect::Committed)
            }
        }
    }

    fn after_lease_op(
        &mut self,
        id: usize,
        result: Result<(), Error>,
        ends_lease: bool,
    ) -> Result<Effect, Error> {
        match result {
            Ok(()) => {
                if ends_lease {
                    self.retire(id);
                }
                Ok(Effect::Committed)
            }
            Err(e @ Error::LeaseLost { .. }) => {
                self.retire(id);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

/// The physical contents of the store for every workload id: every stored record, expired or
/// not (read with the clock at 0, so that nothing looks expired), then the clock is restored.
/// Swept and forgotten records are absent; a record that comes back after one is visible here.
pub fn snapshot(store: &Store, clock: &ManualClock) -> Result<BTreeMap<Id, Record>, Error> {
    let now = idemstore::Clock::now_ms(clock);
    clock.set(0);
    let result = physical(store);
    clock.set(now);
    result
}

/// As [`snapshot`], for a store whose clock already reads 0.
pub fn physical(store: &Store) -> Result<BTreeMap<Id, Record>, Error> {
    let mut out = BTreeMap::new();
    for id in ids() {
        if let Some(r) = store.get(&id.0, &id.1)? {
            out.insert(id, r);
        }
    }
    Ok(out)
}

/// The largest fencing token held by an in-flight record of `state`, or 0.
pub fn max_token(state: &BTreeMap<Id, Record>) -> u64 {
    state
        .values()
        .filter_map(|r| match r.state {
            idemstore::RecordState::InFlight { token, .. } => Some(token),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// How a recovered state differs from the allowed ones, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divergence {
    /// Equal to a state from before the last acknowledged operation: an ack was lost.
    LostAck,
    /// A record that no allowed state has (e.g. one forgotten or swept before): resurrected.
    Resurrected,
    /// Something else: a record in no allowed version.
    Other,
}

/// Classifies `found` against the allowed states `snapshots[lo..=hi]` (None = fine).
pub fn classify(
    found: &BTreeMap<Id, Record>,
    snapshots: &[BTreeMap<Id, Record>],
    lo: usize,
    hi: usize,
) -> Option<Divergence> {
    let allowed = &snapshots[lo..=hi];
    if allowed.iter().any(|s| s == found) {
        return None;
    }
    if snapshots[..lo].iter().any(|s| s == found) {
        return Some(Divergence::LostAck);
    }
    let allowed_keys: BTreeSet<&Id> = allowed.iter().flat_map(|s| s.keys()).collect();
    if found.keys().any(|k| !allowed_keys.contains(k)) {
        return Some(Divergence::Resurrected);
    }
    // Per record: a version that no allowed state has.
    for k in &allowed_keys {
        let v = found.get(*k);
        if allowed.iter().any(|s| s.get(*k) == v) {
            continue;
        }
        let older = snapshots[..lo].iter().any(|s| s.get(*k) == v);
        return Some(if v.is_none() || older {
            Divergence::LostAck
        } else {
            Divergence::Other
        });
    }
    // Every record is allowed on its own but not together: a torn (non-atomic) commit.
    Some(Divergence::Other)
}

/// Checks that a clean run really exercised the [`prelude`]: what each scripted step did, and
/// that the sweep removed the two expired records. `effects[i]` is step i's effect and
/// `snapshots[i + 1]` the state after it.
pub fn check_prelude(effects: &[Effect], snapshots: &[BTreeMap<Id, Record>]) {
    use Effect::{Committed as C, LeaseLost as L, Skipped as S};
    let expected = [C, C, C, C, C, C, C, C, L, C, C, C, S, C, C, C];
    assert_eq!(
        &effects[..expected.len()],
        &expected,
        "the scripted prelude"
    );
    let a1: Id = ("a".into(), "k1".into());
    let b0: Id = ("b".into(), "k0".into());
    let before_sweep = &snapshots[13];
    let after_sweep = &snapshots[14];
    assert!(before_sweep.contains_key(&a1) && before_sweep.contains_key(&b0));
    assert!(!after_sweep.contains_key(&a1) && !after_sweep.contains_key(&b0));
    assert!(
        !snapshots[10].contains_key(&("a".into(), "k0".into())),
        "forgotten"
    );
}
