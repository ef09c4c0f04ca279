//! The `ops` target's harness: one store over a [`SimDisk`], the reference model beside it,
//! and the checks after every operation.

use std::time::Duration;

use super::T0_MS;
use super::ops::{
    FINGERPRINTS, KEYS, Op, OpsSummary, SCOPES, Slot, fenced_result, is_storage_error, name, slots,
};
use crate::testkit::SimDisk;
use crate::testkit::model::{Expected, MRecord, MState, Model};
use crate::{Claim, ClaimOptions, Error, Lease, ManualClock, Record, RecordState, Store};

pub(super) struct Harness {
    summary: OpsSummary,
    disk: SimDisk,
    /// The write-ahead log's disk, for a store with one; faults then go to it (its writes and
    /// syncs are what acknowledge, and happen inside operations, while the database file is
    /// written by the checkpointer in the background).
    log: Option<SimDisk>,
    clock: ManualClock,
    store: Option<Store>,
    model: Model,
    leases: Vec<Lease>,
    /// The newest token granted (acknowledged, or seen in a record after a reopen).
    last_token: u64,
}

impl Harness {
    /// A new store over an empty disk (and an empty log with `wal`), checked against an empty
    /// model.
    pub(super) fn start(wal: bool) -> Harness {
        let mut harness = Harness {
            summary: OpsSummary::default(),
            disk: SimDisk::new(),
            log: wal.then(SimDisk::new),
            clock: ManualClock::new(T0_MS),
            store: None,
            model: Model::new(T0_MS, 0),
            leases: Vec::new(),
            last_token: 0,
        };
        let store = harness.open().expect("a new in-memory store opens");
        harness.model.epoch = store.epoch();
        harness.store = Some(store);
        harness.check_everything();
        harness
    }

    /// Disarms the faults, checks that whatever was acknowledged survives a clean reopen, and
    /// reports what the run did (`ops` operations).
    pub(super) fn finish(mut self, ops: usize) -> OpsSummary {
        self.faulty().set_fault(None);
        self.step(&Op::Reopen);
        self.check_everything();
        self.summary.ops = ops;
        self.summary.faults_fired = self.faulty().injected();
        self.summary
    }

    /// The disk faults are planned on.
    fn faulty(&self) -> &SimDisk {
        self.log.as_ref().unwrap_or(&self.disk)
    }

    fn open(&self) -> crate::Result<Store> {
        let builder = Store::builder()
            .clock(self.clock.clone())
            .sweep_interval(None);
        match &self.log {
            None => builder.open_with_backend(self.disk.clone()),
            // A checkpoint after every commit, in the smallest map: checkpoints, evictions and
            // sweeps of the database file race every operation; two small segments recycle often.
            Some(log) => builder
                .write_ahead_log(true)
                .checkpoint_interval(Duration::ZERO)
                .map_budget(crate::MAP_BUDGET_MIN)
                .wal_segment_bytes(1 << 20)
                .wal_segments(2)
                .open_with_backends(self.disk.clone(), log.clone()),
        }
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
    pub(super) fn check_everything(&self) {
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
        self.faulty().set_fault(None);
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
    pub(super) fn step(&mut self, op: &Op) {
        let fired_before = self.faulty().injected();
        let before = self.model.clone();
        let result = self.apply(op);
        let fired = self.faulty().injected() > fired_before;
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
                            self.faulty().injected() > 0,
                            "open failed without a fault: {e:?}"
                        );
                        self.faulty().set_fault(None);
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
            Op::Fault(plan) => plan.arm(self.faulty()),
        }
        Ok(())
    }
}
