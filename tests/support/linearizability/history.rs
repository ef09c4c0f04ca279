//! Histories: the calls a round makes, what they returned, and when (in tickets).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idemstore::testkit::model::{Expected, MRecord, MState};
use idemstore::{Claim, ClaimOptions, Error, Lease, Record};

use super::super::rng::Rng;

/// Concurrent callers per round.
pub const THREADS: usize = 4;
/// Keys per round.
pub const KEYS: usize = 3;
/// Calls per key per round, the closing `get` included: few enough to keep the search small.
pub const CALLS_PER_KEY: usize = 12;

/// One call on one key, as invoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Call {
    Claim {
        /// The owner the claiming handle stamps on what it acquires: the store's process
        /// epoch, or a shared store's owner id of that handle.
        owner: u64,
        fingerprint: Vec<u8>,
        lease_ms: u64,
        retention_ms: u64,
        wait: bool,
    },
    Complete {
        token: u64,
        outcome: Vec<u8>,
        retention_ms: u64,
    },
    Fail {
        token: u64,
    },
    Extend {
        token: u64,
        by_ms: u64,
    },
    Checkpoint {
        token: u64,
        bytes: Vec<u8>,
    },
    Forget,
    Get,
}

impl Call {
    /// The options of a claim: its lease and retention, and a 5 ms wait if it asked to wait.
    pub fn claim_options(&self) -> Option<ClaimOptions> {
        let Call::Claim {
            lease_ms,
            retention_ms,
            wait,
            ..
        } = self
        else {
            return None;
        };
        let options = ClaimOptions::default()
            .lease(Duration::from_millis(*lease_ms))
            .retention(Duration::from_millis(*retention_ms));
        Some(if *wait {
            options.wait(Duration::from_millis(5))
        } else {
            options
        })
    }

    /// The token of a lease write.
    pub fn lease_token(&self) -> Option<u64> {
        match self {
            Call::Complete { token, .. }
            | Call::Fail { token }
            | Call::Extend { token, .. }
            | Call::Checkpoint { token, .. } => Some(*token),
            _ => None,
        }
    }
}

/// What the call returned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ret {
    /// A claim's answer in the model's terms, with the token the store granted (0 unless the
    /// answer is `Expected::Acquired`).
    Claimed {
        answer: Expected,
        token: u64,
    },
    Done,
    LeaseLost,
    Extended {
        until: u64,
    },
    Forgotten(bool),
    Got(Option<MRecord>),
    /// Anything else: no sequential execution produces it.
    Unexpected(String),
}

impl Ret {
    /// A claim's result.
    pub fn of_claim(result: &idemstore::Result<Claim>) -> Ret {
        let (answer, token) = match result {
            Ok(Claim::Acquired(lease)) => (
                Expected::Acquired {
                    attempt: lease.attempt(),
                    takeover: lease.is_takeover(),
                    checkpoint: lease.checkpoint().map(<[u8]>::to_vec),
                    lease_until: lease.lease_until_ms(),
                },
                lease.token(),
            ),
            Ok(Claim::Replay(r)) => (
                Expected::Replay {
                    outcome: r.outcome.clone(),
                    completed_at: r.completed_at_ms,
                    attempt: r.attempt,
                },
                0,
            ),
            Ok(Claim::InProgress { retry_after }) => (
                Expected::InProgress {
                    retry_after_ms: u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX),
                },
                0,
            ),
            Ok(Claim::Mismatch) => (Expected::Mismatch, 0),
            Ok(other) => return Ret::Unexpected(format!("{other:?}")),
            Err(e) => return Ret::Unexpected(format!("{e} ({e:?})")),
        };
        Ret::Claimed { answer, token }
    }

    /// A `complete`'s, `fail`'s or `checkpoint`'s result.
    pub fn of_write(result: idemstore::Result<()>) -> Ret {
        match result {
            Ok(()) => Ret::Done,
            Err(Error::LeaseLost { .. }) => Ret::LeaseLost,
            Err(e) => Ret::Unexpected(format!("{e} ({e:?})")),
        }
    }

    /// An `extend`'s result; `lease` is the lease it updated.
    pub fn of_extend(result: idemstore::Result<()>, lease: &Lease) -> Ret {
        match result {
            Ok(()) => Ret::Extended {
                until: lease.lease_until_ms(),
            },
            other => Ret::of_write(other),
        }
    }

    /// A `get`'s result.
    pub fn of_get(result: idemstore::Result<Option<Record>>) -> Ret {
        match result {
            Ok(found) => Ret::Got(found.as_ref().map(MRecord::of)),
            Err(e) => Ret::Unexpected(format!("{e} ({e:?})")),
        }
    }

    /// A `forget`'s result.
    pub fn of_forget(result: idemstore::Result<bool>) -> Ret {
        match result {
            Ok(live) => Ret::Forgotten(live),
            Err(e) => Ret::Unexpected(format!("{e} ({e:?})")),
        }
    }

    /// The result with every timestamp (lease ends, retry delays, completion, creation,
    /// update and expiry times) set to 0: what is compared when the store's clock is not the
    /// model's.
    pub fn timeless(&self) -> Ret {
        match self {
            Ret::Claimed { answer, token } => {
                let answer = match answer.clone() {
                    Expected::Acquired {
                        attempt,
                        takeover,
                        checkpoint,
                        ..
                    } => Expected::Acquired {
                        attempt,
                        takeover,
                        checkpoint,
                        lease_until: 0,
                    },
                    Expected::Replay {
                        outcome, attempt, ..
                    } => Expected::Replay {
                        outcome,
                        completed_at: 0,
                        attempt,
                    },
                    Expected::InProgress { .. } => Expected::InProgress { retry_after_ms: 0 },
                    Expected::Mismatch => Expected::Mismatch,
                };
                Ret::Claimed {
                    answer,
                    token: *token,
                }
            }
            Ret::Extended { .. } => Ret::Extended { until: 0 },
            Ret::Got(Some(record)) => {
                let mut record = record.clone();
                record.created = 0;
                record.updated = 0;
                record.expires = 0;
                if let MState::InFlight { lease_until, .. } = &mut record.state {
                    *lease_until = 0;
                }
                Ret::Got(Some(record))
            }
            other => other.clone(),
        }
    }
}

/// One call with its result and its place in real time.
#[derive(Debug, Clone)]
pub struct Event {
    /// The caller (`usize::MAX` for the quiescent read that closes a round).
    pub thread: usize,
    pub invoked: u64,
    pub returned: u64,
    pub call: Call,
    pub ret: Ret,
}

impl Event {
    /// The `get` that closes a key's history, with nothing else running.
    pub fn quiescent(invoked: u64, returned: u64, ret: Ret) -> Event {
        Event {
            thread: usize::MAX,
            invoked,
            returned,
            call: Call::Get,
            ret,
        }
    }
}

static TICKETS: AtomicU64 = AtomicU64::new(1);

/// The next ticket of the one global counter that orders invocations and returns.
pub fn ticket() -> u64 {
    TICKETS.fetch_add(1, Ordering::SeqCst)
}

/// How long the leases, retentions and extensions of a run are.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease_ms: u64,
    pub retention_ms: u64,
    /// The extensions a call draws from.
    pub extend_ms: [u64; 4],
}

/// A manual clock, frozen while a round runs and moved between rounds: leases and records
/// end between rounds.
pub const MANUAL: Timing = Timing {
    lease_ms: 1_000,
    retention_ms: 5_000,
    extend_ms: [500, 1_000, 1_500, 2_000],
};

/// A server's clock, which runs during a round: nothing ends while the case runs.
pub const SERVER: Timing = Timing {
    lease_ms: 60_000,
    retention_ms: 120_000,
    extend_ms: [30_000, 40_000, 50_000, 60_000],
};

/// Leases obtained so far, per key, shared by every caller (a lease is only data: any caller
/// may act as a slow or resurrected owner).
pub type Pool = Arc<Mutex<BTreeMap<usize, Vec<Lease>>>>;

/// A lease of `key` from the pool: mostly the newest (likely the owner), else any (likely
/// stale); `None` while the key has none.
pub fn pick_lease(rng: &mut Rng, pool: &Pool, key: usize) -> Option<Lease> {
    let pool = pool.lock().unwrap_or_else(|e| e.into_inner());
    pool.get(&key).and_then(|leases| {
        if leases.is_empty() {
            None
        } else if rng.chance(70) {
            leases.last().cloned()
        } else {
            leases.get(rng.index(leases.len())).cloned()
        }
    })
}

/// The next call of caller `thread` (its `n`th, from the stream `seed`): a `get`, `forget`, a
/// lease write with `lease` if there is one, else a claim (now and then with another
/// fingerprint, or asking to wait) by `owner`.
pub fn plan_call(
    rng: &mut Rng,
    lease: Option<&Lease>,
    timing: Timing,
    owner: u64,
    (thread, n, seed): (usize, usize, u64),
) -> Call {
    let roll = rng.index(100);
    match (roll, lease) {
        (0..=9, _) => Call::Get,
        (10..=13, _) => Call::Forget,
        (14..=33, Some(lease)) => Call::Complete {
            token: lease.token(),
            outcome: format!("outcome t{thread} n{n} s{seed}").into_bytes(),
            retention_ms: timing.retention_ms,
        },
        (34..=43, Some(lease)) => Call::Fail {
            token: lease.token(),
        },
        (44..=53, Some(lease)) => Call::Extend {
            token: lease.token(),
            by_ms: timing.extend_ms[rng.index(4)],
        },
        (54..=63, Some(lease)) => Call::Checkpoint {
            token: lease.token(),
            bytes: format!("cp t{thread} n{n}").into_bytes(),
        },
        _ => {
            let fingerprint: &[u8] = if rng.chance(12) { b"fp-other" } else { b"fp" };
            Call::Claim {
                owner,
                fingerprint: fingerprint.to_vec(),
                lease_ms: timing.lease_ms,
                retention_ms: timing.retention_ms,
                wait: rng.chance(15),
            }
        }
    }
}

/// A round's plan: `CALLS_PER_KEY - 1` calls per key (the closing `get` is the last), spread
/// over the callers at random and shuffled; one list of keys per caller.
pub fn round_plans(rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut plans: Vec<Vec<usize>> = vec![Vec::new(); THREADS];
    for key in 0..KEYS {
        for _ in 0..CALLS_PER_KEY - 1 {
            plans[rng.index(THREADS)].push(key);
        }
    }
    for plan in &mut plans {
        for i in (1..plan.len()).rev() {
            plan.swap(i, rng.index(i + 1));
        }
    }
    plans
}

/// The token of an acquisition, if `ret` is one.
pub fn acquired_token(ret: &Ret) -> Option<u64> {
    match ret {
        Ret::Claimed {
            answer: Expected::Acquired { .. },
            token,
        } => Some(*token),
        _ => None,
    }
}
