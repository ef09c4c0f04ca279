//! The reference model of a store's records: DESIGN §2 written apart from `transition.rs`.
//!
//! One model serves every oracle that needs one: the model-based test (`tests/model.rs`), the
//! `ops` fuzz target ([`super::run_ops`]), the linearizability checker
//! (`tests/support/linearizability/`, which runs it one key at a time) and the conformance
//! suite's `reference_model` case, which runs it against every backend.
//!
//! Rules: a record with `expires <= now` is absent to every operation. A claim of an absent
//! record acquires attempt 1 (expiry now + retention); another fingerprint is a mismatch; a
//! completed record replays; an in-flight record under a live lease of a live owner (the
//! current epoch, or one of [`Model::peers`]) is in progress; an in-flight record whose lease
//! ended or whose owner is gone (an older epoch) is taken over, and a failed one re-acquired:
//! attempt + 1, the checkpoint handed over (and kept on the record, so that an owner that dies
//! before its first checkpoint still passes on the last recovery point), expiry max(old, now +
//! retention). Lease writes take effect only on a live in-flight record carrying the lease's
//! token, and stamp the record's update time.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Record, RecordState};

/// The state of a model record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MState {
    /// Owned by the lease with `token`, granted in process epoch `epoch`.
    InFlight {
        /// The fencing token of the owning lease (0 until [`Model::grant`]).
        token: u64,
        /// The process epoch the lease was granted in.
        epoch: u64,
        /// When the lease ends, in milliseconds since the Unix epoch.
        lease_until: u64,
        /// The last recovery point.
        checkpoint: Option<Vec<u8>>,
    },
    /// Completed with `outcome`.
    Completed {
        /// The stored outcome bytes.
        outcome: Vec<u8>,
    },
    /// Released by its owner; may be claimed again.
    Failed {
        /// The recovery point handed to the next attempt.
        checkpoint: Option<Vec<u8>>,
    },
}

/// A record as the model holds it, and as a store's [`Record`] looks through [`MRecord::of`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MRecord {
    /// The request fingerprint.
    pub fingerprint: Vec<u8>,
    /// Creation time (ms).
    pub created: u64,
    /// Time of the last change (ms); for a completed record, the completion time.
    pub updated: u64,
    /// Expiry time (ms).
    pub expires: u64,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The state.
    pub state: MState,
}

impl MRecord {
    /// The model's view of a stored record.
    pub fn of(r: &Record) -> MRecord {
        let state = match &r.state {
            RecordState::InFlight {
                token,
                epoch,
                lease_until_ms,
                checkpoint,
            } => MState::InFlight {
                token: *token,
                epoch: *epoch,
                lease_until: *lease_until_ms,
                checkpoint: checkpoint.clone(),
            },
            RecordState::Completed { outcome } => MState::Completed {
                outcome: outcome.clone(),
            },
            RecordState::Failed { checkpoint } => MState::Failed {
                checkpoint: checkpoint.clone(),
            },
        };
        MRecord {
            fingerprint: r.fingerprint.clone(),
            created: r.created_at_ms,
            updated: r.updated_at_ms,
            expires: r.expires_at_ms,
            attempt: r.attempt,
            state,
        }
    }
}

/// What the model expects a claim to answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expected {
    /// A lease is granted.
    Acquired {
        /// The attempt number.
        attempt: u32,
        /// Whether an expired or orphaned lease was taken over.
        takeover: bool,
        /// The recovery point handed over.
        checkpoint: Option<Vec<u8>>,
        /// When the new lease ends (ms).
        lease_until: u64,
    },
    /// The stored outcome is replayed.
    Replay {
        /// The outcome bytes.
        outcome: Vec<u8>,
        /// When the record was completed (ms).
        completed_at: u64,
        /// The attempt that completed it.
        attempt: u32,
    },
    /// Another live lease of this epoch holds the key.
    InProgress {
        /// Milliseconds until that lease ends.
        retry_after_ms: u64,
    },
    /// The key is held under another fingerprint.
    Mismatch,
}

/// The storage key of (`scope`, `key`): one length byte, the scope, the key. The model keeps
/// records in this order, which is also the tie-break order of the expiry index.
pub fn storage_key(scope: &[u8], key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + scope.len() + key.len());
    out.push(u8::try_from(scope.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(scope);
    out.extend_from_slice(key);
    out
}

/// The records a store physically holds (expired ones until swept or forgotten), the clock
/// and the process epoch.
///
/// A shared store has many owners alive at once (one per instance, each with its own owner id
/// in the records' `epoch` field): `epoch` is then the claiming instance's owner id and
/// `peers` the other live ones, whose in-flight records are in progress too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Model {
    records: BTreeMap<Vec<u8>, MRecord>,
    /// The current time (ms).
    pub now: u64,
    /// The current process epoch (the owner a claim stamps on the record it acquires).
    pub epoch: u64,
    /// Other owners that are alive: an in-flight record of one of them is no orphan. Empty for
    /// an embedded store, which has one owner at a time.
    pub peers: BTreeSet<u64>,
}

impl Model {
    /// An empty model at time `now` in process epoch `epoch`.
    pub fn new(now: u64, epoch: u64) -> Model {
        Model {
            records: BTreeMap::new(),
            now,
            epoch,
            peers: BTreeSet::new(),
        }
    }

    /// How many records are physically held, expired ones included.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no record is held at all.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The record of (`scope`, `key`) if it is live (not expired).
    pub fn live(&self, scope: &[u8], key: &[u8]) -> Option<&MRecord> {
        self.records
            .get(&storage_key(scope, key))
            .filter(|r| r.expires > self.now)
    }

    /// The record of (`scope`, `key`) as held, expired or not (until swept or forgotten).
    pub fn held(&self, scope: &[u8], key: &[u8]) -> Option<&MRecord> {
        self.records.get(&storage_key(scope, key))
    }

    /// Replaces the record of (`scope`, `key`) (`None` removes it): for a checker that
    /// resumes from what a store was seen to hold.
    pub fn set(&mut self, scope: &[u8], key: &[u8], record: Option<MRecord>) {
        let storage = storage_key(scope, key);
        match record {
            Some(r) => {
                self.records.insert(storage, r);
            }
            None => {
                self.records.remove(&storage);
            }
        }
    }

    /// Forgets every expired record: for a checker that only compares live state.
    pub fn drop_expired(&mut self) {
        let now = self.now;
        self.records.retain(|_, r| r.expires > now);
    }

    fn owned(&mut self, scope: &[u8], key: &[u8], token: u64) -> Option<&mut MRecord> {
        let now = self.now;
        self.records.get_mut(&storage_key(scope, key)).filter(|r| {
            r.expires > now && matches!(r.state, MState::InFlight { token: t, .. } if t == token)
        })
    }

    /// Decides a claim. An acquisition installs the new in-flight record with token 0; the
    /// caller sets the token the store granted with [`Model::grant`].
    pub fn claim(
        &mut self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        lease_ms: u64,
        retention_ms: u64,
    ) -> Expected {
        let now = self.now;
        let lease_until = now + lease_ms;
        let fresh_expiry = now + retention_ms;
        let (attempt, checkpoint, takeover, created, expires) = match self.live(scope, key) {
            None => (1, None, false, now, fresh_expiry),
            Some(r) if r.fingerprint != fingerprint => return Expected::Mismatch,
            Some(r) => match &r.state {
                MState::Completed { outcome } => {
                    return Expected::Replay {
                        outcome: outcome.clone(),
                        completed_at: r.updated,
                        attempt: r.attempt,
                    };
                }
                MState::InFlight {
                    epoch,
                    lease_until: held,
                    ..
                } if *held > now && (*epoch == self.epoch || self.peers.contains(epoch)) => {
                    return Expected::InProgress {
                        retry_after_ms: held - now,
                    };
                }
                MState::InFlight { checkpoint, .. } => (
                    r.attempt + 1,
                    checkpoint.clone(),
                    true,
                    r.created,
                    r.expires.max(fresh_expiry),
                ),
                MState::Failed { checkpoint } => (
                    r.attempt + 1,
                    checkpoint.clone(),
                    false,
                    r.created,
                    r.expires.max(fresh_expiry),
                ),
            },
        };
        self.records.insert(
            storage_key(scope, key),
            MRecord {
                fingerprint: fingerprint.to_vec(),
                created,
                updated: now,
                expires,
                attempt,
                state: MState::InFlight {
                    token: 0,
                    epoch: self.epoch,
                    lease_until,
                    checkpoint: checkpoint.clone(),
                },
            },
        );
        Expected::Acquired {
            attempt,
            takeover,
            checkpoint,
            lease_until,
        }
    }

    /// Sets the token of the in-flight record of (`scope`, `key`) to the one the store granted.
    pub fn grant(&mut self, scope: &[u8], key: &[u8], granted: u64) {
        if let Some(MRecord {
            state: MState::InFlight { token, .. },
            ..
        }) = self.records.get_mut(&storage_key(scope, key))
        {
            *token = granted;
        }
    }

    /// A fenced write: `f` applied to the live record `token` owns, which it stamps with the
    /// current time. False (and no change) for a lost lease.
    fn fenced(
        &mut self,
        scope: &[u8],
        key: &[u8],
        token: u64,
        f: impl FnOnce(&mut MRecord, u64),
    ) -> bool {
        let now = self.now;
        match self.owned(scope, key, token) {
            Some(r) => {
                f(r, now);
                r.updated = now;
                true
            }
            None => false,
        }
    }

    /// `complete`: whether it took effect (false for a lost lease).
    pub fn complete(
        &mut self,
        scope: &[u8],
        key: &[u8],
        token: u64,
        outcome: &[u8],
        retention_ms: u64,
    ) -> bool {
        self.fenced(scope, key, token, |r, now| {
            r.state = MState::Completed {
                outcome: outcome.to_vec(),
            };
            r.expires = now + retention_ms;
        })
    }

    /// `fail`: whether it took effect. The checkpoint stays for the next attempt.
    pub fn fail(&mut self, scope: &[u8], key: &[u8], token: u64) -> bool {
        self.fenced(scope, key, token, |r, _| {
            if let MState::InFlight { checkpoint, .. } = &mut r.state {
                r.state = MState::Failed {
                    checkpoint: checkpoint.take(),
                };
            }
        })
    }

    /// `extend` by `by_ms` from now: the new lease end if it took effect. The record's expiry
    /// is pushed out to the lease end if that is later.
    pub fn extend(&mut self, scope: &[u8], key: &[u8], token: u64, by_ms: u64) -> Option<u64> {
        let until = self.now + by_ms;
        self.fenced(scope, key, token, |r, _| {
            if let MState::InFlight { lease_until, .. } = &mut r.state {
                *lease_until = until;
            }
            r.expires = r.expires.max(until);
        })
        .then_some(until)
    }

    /// `checkpoint`: whether it took effect.
    pub fn checkpoint(&mut self, scope: &[u8], key: &[u8], token: u64, bytes: &[u8]) -> bool {
        self.fenced(scope, key, token, |r, _| {
            if let MState::InFlight { checkpoint, .. } = &mut r.state {
                *checkpoint = Some(bytes.to_vec());
            }
        })
    }

    /// `forget`: whether a live record was there. Removes the record even if it expired.
    pub fn forget(&mut self, scope: &[u8], key: &[u8]) -> bool {
        let live = self.live(scope, key).is_some();
        self.records.remove(&storage_key(scope, key));
        live
    }

    /// `sweep(limit)`: removes up to `limit` expired records, oldest expiry first (ties in the
    /// order of the expiry index: by storage key). Returns how many it removed.
    pub fn sweep(&mut self, limit: usize) -> usize {
        let mut due: Vec<(u64, Vec<u8>)> = self
            .records
            .iter()
            .filter(|(_, r)| r.expires <= self.now)
            .map(|(k, r)| (r.expires, k.clone()))
            .collect();
        due.sort();
        due.truncate(limit);
        for (_, k) in &due {
            self.records.remove(k);
        }
        due.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_acquires_then_replays_after_completion() {
        let mut m = Model::new(1_000, 1);
        let want = Expected::Acquired {
            attempt: 1,
            takeover: false,
            checkpoint: None,
            lease_until: 1_010,
        };
        assert_eq!(m.claim(b"s", b"k", b"fp", 10, 100), want);
        m.grant(b"s", b"k", 7);
        assert!(
            !m.complete(b"s", b"k", 6, b"no", 100),
            "a stale token is fenced off"
        );
        m.now += 5;
        assert!(m.complete(b"s", b"k", 7, b"ok", 100));
        let replay = Expected::Replay {
            outcome: b"ok".to_vec(),
            completed_at: 1_005,
            attempt: 1,
        };
        assert_eq!(m.claim(b"s", b"k", b"fp", 10, 100), replay);
        assert_eq!(m.claim(b"s", b"k", b"other", 10, 100), Expected::Mismatch);
        m.now += 100;
        assert!(m.live(b"s", b"k").is_none(), "expired at 1_105");
        assert_eq!(m.len(), 1, "held until swept");
        assert_eq!(m.sweep(10), 1);
        assert!(m.is_empty());
    }

    #[test]
    fn an_orphan_of_an_older_epoch_is_taken_over_with_its_checkpoint() {
        let mut m = Model::new(0, 1);
        m.claim(b"s", b"k", b"fp", 1_000, 5_000);
        m.grant(b"s", b"k", 1);
        assert!(m.checkpoint(b"s", b"k", 1, b"step-1"));
        assert_eq!(
            m.claim(b"s", b"k", b"fp", 1_000, 5_000),
            Expected::InProgress {
                retry_after_ms: 1_000
            }
        );
        m.epoch = 2;
        let want = Expected::Acquired {
            attempt: 2,
            takeover: true,
            checkpoint: Some(b"step-1".to_vec()),
            lease_until: 1_000,
        };
        assert_eq!(m.claim(b"s", b"k", b"fp", 1_000, 5_000), want);
    }

    #[test]
    fn a_live_peer_keeps_its_record_and_a_gone_one_loses_it() {
        // Owner 7 claims; owner 8 sees it in progress while 7 is a live peer.
        let mut m = Model::new(0, 7);
        m.claim(b"s", b"k", b"fp", 1_000, 5_000);
        m.epoch = 8;
        m.peers.insert(7);
        assert_eq!(
            m.claim(b"s", b"k", b"fp", 1_000, 5_000),
            Expected::InProgress {
                retry_after_ms: 1_000
            }
        );
        m.peers.clear();
        assert!(matches!(
            m.claim(b"s", b"k", b"fp", 1_000, 5_000),
            Expected::Acquired {
                attempt: 2,
                takeover: true,
                ..
            }
        ));
    }
}
