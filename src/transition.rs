//! The state machine: a pure function from `(stored record, operation, context)` to
//! `(write, reply)`. It does no I/O; the commit writer applies its writes, and the tests and the
//! fuzzer drive it directly. This is the one place that decides semantics (DESIGN §2).

use crate::error::Error;
use crate::record::{Record, RecordState};

/// What the writer knows when it applies one operation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx {
    /// The time of the operation.
    pub now_ms: u64,
    /// The process epoch of the open store.
    pub epoch: u64,
    /// The fencing token the next acquisition receives.
    pub next_token: u64,
    /// `Some(limit)` when the record's scope is at its quota: a claim that would create a new
    /// record is refused.
    pub scope_full: Option<u64>,
}

/// One state-changing operation on one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Claim {
        fingerprint: Vec<u8>,
        lease_ms: u64,
        retention_ms: u64,
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
        checkpoint: Vec<u8>,
    },
    Forget,
}

/// The decision of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClaimDecision {
    Acquired {
        token: u64,
        lease_until_ms: u64,
        attempt: u32,
        checkpoint: Option<Vec<u8>>,
        takeover: bool,
    },
    Replay {
        outcome: Vec<u8>,
        completed_at_ms: u64,
        attempt: u32,
    },
    InProgress {
        lease_until_ms: u64,
    },
    Mismatch,
}

/// The successful answer of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Claim(ClaimDecision),
    Done,
    Extended { lease_until_ms: u64 },
    Forgotten(bool),
}

/// What to do with the stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Write {
    Keep,
    Put(Record),
    Delete,
}

/// The result of applying one operation.
#[derive(Debug)]
pub(crate) struct Step {
    pub write: Write,
    pub reply: Result<Reply, Error>,
    /// Whether the operation consumed `ctx.next_token`.
    pub token_used: bool,
}

impl Step {
    fn keep(reply: Result<Reply, Error>) -> Step {
        Step {
            write: Write::Keep,
            reply,
            token_used: false,
        }
    }
}

/// Compares two fingerprints in time that depends only on their lengths, so that timing does
/// not reveal how much of a guessed fingerprint matches a stored one.
pub(crate) fn fingerprints_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an in-flight record's owner is gone: its lease ended, or it belongs to an earlier
/// process epoch (that process is dead; the store holds its file exclusively).
pub(crate) fn owner_is_gone(state: &RecordState, ctx: &Ctx) -> bool {
    match state {
        RecordState::InFlight {
            epoch,
            lease_until_ms,
            ..
        } => *epoch < ctx.epoch || *lease_until_ms <= ctx.now_ms,
        _ => false,
    }
}

/// Applies `op` to the stored record (`None` when there is none). An expired record is treated
/// as absent for every decision; only `Forget` removes it physically.
pub(crate) fn apply(stored: Option<&Record>, op: Op, ctx: &Ctx) -> Step {
    let live = stored.filter(|r| !r.is_expired(ctx.now_ms));
    match op {
        Op::Claim {
            fingerprint,
            lease_ms,
            retention_ms,
        } => claim(live, fingerprint, lease_ms, retention_ms, ctx),
        Op::Complete {
            token,
            outcome,
            retention_ms,
        } => with_lease(live, token, |r| {
            let mut next = r.clone();
            next.state = RecordState::Completed { outcome };
            next.updated_at_ms = ctx.now_ms;
            next.expires_at_ms = ctx.now_ms.saturating_add(retention_ms);
            (next, Reply::Done)
        }),
        Op::Fail { token } => with_lease(live, token, |r| {
            let mut next = r.clone();
            let checkpoint = match &r.state {
                RecordState::InFlight { checkpoint, .. } => checkpoint.clone(),
                _ => None,
            };
            next.state = RecordState::Failed { checkpoint };
            next.updated_at_ms = ctx.now_ms;
            (next, Reply::Done)
        }),
        Op::Extend { token, by_ms } => with_lease(live, token, |r| {
            let mut next = r.clone();
            let until = ctx.now_ms.saturating_add(by_ms);
            if let RecordState::InFlight { lease_until_ms, .. } = &mut next.state {
                *lease_until_ms = until;
            }
            // A record never expires under a live lease.
            next.expires_at_ms = next.expires_at_ms.max(until);
            next.updated_at_ms = ctx.now_ms;
            (
                next,
                Reply::Extended {
                    lease_until_ms: until,
                },
            )
        }),
        Op::Checkpoint { token, checkpoint } => with_lease(live, token, |r| {
            let mut next = r.clone();
            if let RecordState::InFlight { checkpoint: c, .. } = &mut next.state {
                *c = Some(checkpoint);
            }
            next.updated_at_ms = ctx.now_ms;
            (next, Reply::Done)
        }),
        Op::Forget => Step {
            write: if stored.is_some() {
                Write::Delete
            } else {
                Write::Keep
            },
            reply: Ok(Reply::Forgotten(live.is_some())),
            token_used: false,
        },
    }
}

fn claim(
    live: Option<&Record>,
    fingerprint: Vec<u8>,
    lease_ms: u64,
    retention_ms: u64,
    ctx: &Ctx,
) -> Step {
    let lease_until_ms = ctx.now_ms.saturating_add(lease_ms);
    let expires_at_ms = ctx.now_ms.saturating_add(retention_ms);
    let Some(r) = live else {
        if let Some(limit) = ctx.scope_full {
            return Step::keep(Err(Error::QuotaExceeded { limit }));
        }
        let record = Record {
            fingerprint,
            created_at_ms: ctx.now_ms,
            updated_at_ms: ctx.now_ms,
            expires_at_ms,
            attempt: 1,
            state: RecordState::InFlight {
                token: ctx.next_token,
                epoch: ctx.epoch,
                lease_until_ms,
                checkpoint: None,
            },
        };
        return acquired(record, None, false, ctx);
    };
    if !fingerprints_equal(&r.fingerprint, &fingerprint) {
        return Step::keep(Ok(Reply::Claim(ClaimDecision::Mismatch)));
    }
    let (checkpoint, takeover) = match &r.state {
        RecordState::Completed { outcome } => {
            return Step::keep(Ok(Reply::Claim(ClaimDecision::Replay {
                outcome: outcome.clone(),
                completed_at_ms: r.updated_at_ms,
                attempt: r.attempt,
            })));
        }
        RecordState::InFlight {
            lease_until_ms: current_until,
            ..
        } if !owner_is_gone(&r.state, ctx) => {
            return Step::keep(Ok(Reply::Claim(ClaimDecision::InProgress {
                lease_until_ms: *current_until,
            })));
        }
        RecordState::InFlight { checkpoint, .. } => (checkpoint.clone(), true),
        RecordState::Failed { checkpoint } => (checkpoint.clone(), false),
    };
    let record = Record {
        fingerprint: r.fingerprint.clone(),
        created_at_ms: r.created_at_ms,
        updated_at_ms: ctx.now_ms,
        expires_at_ms: r.expires_at_ms.max(expires_at_ms),
        attempt: r.attempt.saturating_add(1),
        state: RecordState::InFlight {
            token: ctx.next_token,
            epoch: ctx.epoch,
            lease_until_ms,
            checkpoint: checkpoint.clone(),
        },
    };
    acquired(record, checkpoint, takeover, ctx)
}

fn acquired(record: Record, checkpoint: Option<Vec<u8>>, takeover: bool, ctx: &Ctx) -> Step {
    let lease_until_ms = match &record.state {
        RecordState::InFlight { lease_until_ms, .. } => *lease_until_ms,
        _ => ctx.now_ms,
    };
    let decision = ClaimDecision::Acquired {
        token: ctx.next_token,
        lease_until_ms,
        attempt: record.attempt,
        checkpoint,
        takeover,
    };
    Step {
        write: Write::Put(record),
        reply: Ok(Reply::Claim(decision)),
        token_used: true,
    }
}

/// Runs `f` if `live` is in flight under `token`; otherwise rejects with `LeaseLost`.
fn with_lease(
    live: Option<&Record>,
    token: u64,
    f: impl FnOnce(&Record) -> (Record, Reply),
) -> Step {
    match live {
        Some(r) if matches!(r.state, RecordState::InFlight { token: t, .. } if t == token) => {
            let (next, reply) = f(r);
            Step {
                write: Write::Put(next),
                reply: Ok(reply),
                token_used: false,
            }
        }
        _ => Step::keep(Err(Error::LeaseLost { token })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Ctx = Ctx {
        now_ms: 1_000,
        epoch: 3,
        next_token: 50,
        scope_full: None,
    };

    fn claim_op(fp: &[u8]) -> Op {
        Op::Claim {
            fingerprint: fp.to_vec(),
            lease_ms: 100,
            retention_ms: 10_000,
        }
    }

    fn put(step: Step) -> Record {
        match step.write {
            Write::Put(r) => r,
            other => panic!("expected a put, got {other:?}"),
        }
    }

    #[test]
    fn claim_of_nothing_acquires_attempt_one_with_the_next_token() {
        let step = apply(None, claim_op(b"f"), &CTX);
        assert!(step.token_used);
        assert!(matches!(
            step.reply,
            Ok(Reply::Claim(ClaimDecision::Acquired {
                token: 50,
                attempt: 1,
                takeover: false,
                lease_until_ms: 1_100,
                ..
            }))
        ));
        let r = put(step);
        assert_eq!(r.expires_at_ms, 11_000);
    }

    #[test]
    fn a_write_with_a_foreign_token_changes_nothing() {
        let r = put(apply(None, claim_op(b"f"), &CTX));
        let step = apply(Some(&r), Op::Fail { token: 49 }, &CTX);
        assert_eq!(step.write, Write::Keep);
        assert!(matches!(step.reply, Err(Error::LeaseLost { token: 49 })));
    }

    #[test]
    fn fingerprints_compare_by_content_and_length() {
        assert!(fingerprints_equal(b"abc", b"abc"));
        assert!(!fingerprints_equal(b"abc", b"abd"));
        assert!(!fingerprints_equal(b"abc", b"ab"));
        assert!(fingerprints_equal(b"", b""));
    }
}
