//! The state machine: a pure function from `(key, stored record, operation, context)` to
//! `(write, reply)`. It does no I/O; the engine's writer applies its writes, the read path asks
//! it whether a claim can be answered without one, and the unit tests drive it directly. This
//! is the one place that decides semantics (DESIGN §2), and the one place that builds the
//! public answers ([`Claim`], [`Lease`], [`Replay`]) from a record.

use std::borrow::Cow;
use std::time::Duration;

use crate::core::claim::{Claim, Lease, Replay};
use crate::core::record::{Record, RecordState};
use crate::error::Error;

/// What the state machine knows when it applies one operation. Built by
/// [`Ctx::new`] and, for writes, completed with the next token and the quota state.
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

impl Ctx {
    /// The context of a decision at `now_ms` in process epoch `epoch`: what a read-only
    /// decision needs. The writer adds the next token and whether the scope is full.
    pub(crate) fn new(now_ms: u64, epoch: u64) -> Ctx {
        Ctx {
            now_ms,
            epoch,
            next_token: 0,
            scope_full: None,
        }
    }
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

/// The successful answer of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Claim(Claim),
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
pub(crate) fn apply(key: &[u8], stored: Option<&Record>, op: Op, ctx: &Ctx) -> Step {
    let live = stored.filter(|r| !r.is_expired(ctx.now_ms));
    match op {
        Op::Claim {
            fingerprint,
            lease_ms,
            retention_ms,
        } => claim(
            key,
            live.map(Cow::Borrowed),
            Cow::Owned(fingerprint),
            lease_ms,
            retention_ms,
            ctx,
        ),
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

/// [`apply`] for a claim decided by a reader from its own copy of the stored record, which it
/// needs no further: the same decision, but a replay takes the outcome out of `stored` instead
/// of copying it, and `op` is only borrowed.
pub(crate) fn apply_to_owned(key: &[u8], stored: Record, op: &Op, ctx: &Ctx) -> Step {
    match op {
        Op::Claim {
            fingerprint,
            lease_ms,
            retention_ms,
        } => {
            let live = (!stored.is_expired(ctx.now_ms)).then_some(Cow::Owned(stored));
            claim(
                key,
                live,
                Cow::Borrowed(fingerprint),
                *lease_ms,
                *retention_ms,
                ctx,
            )
        }
        other => apply(key, Some(&stored), other.clone(), ctx),
    }
}

fn claim(
    key: &[u8],
    live: Option<Cow<'_, Record>>,
    fingerprint: Cow<'_, [u8]>,
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
            fingerprint: fingerprint.into_owned(),
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
        return acquired(key, record, None, false, ctx);
    };
    if !fingerprints_equal(&r.fingerprint, &fingerprint) {
        return Step::keep(Ok(Reply::Claim(Claim::Mismatch)));
    }
    let r = match r {
        Cow::Owned(Record {
            state: RecordState::Completed { outcome },
            updated_at_ms,
            attempt,
            ..
        }) => return replay(outcome, updated_at_ms, attempt),
        other => other,
    };
    let (checkpoint, takeover) = match &r.state {
        RecordState::Completed { outcome } => {
            return replay(outcome.clone(), r.updated_at_ms, r.attempt);
        }
        RecordState::InFlight {
            lease_until_ms: current_until,
            ..
        } if !owner_is_gone(&r.state, ctx) => {
            return Step::keep(Ok(Reply::Claim(Claim::InProgress {
                retry_after: Duration::from_millis(current_until.saturating_sub(ctx.now_ms).max(1)),
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
    acquired(key, record, checkpoint, takeover, ctx)
}

/// The answer to a claim of a completed record: its outcome, replayed.
fn replay(outcome: Vec<u8>, completed_at_ms: u64, attempt: u32) -> Step {
    Step::keep(Ok(Reply::Claim(Claim::Replay(Replay {
        outcome,
        completed_at_ms,
        attempt,
    }))))
}

fn acquired(
    key: &[u8],
    record: Record,
    checkpoint: Option<Vec<u8>>,
    takeover: bool,
    ctx: &Ctx,
) -> Step {
    let lease_until_ms = match &record.state {
        RecordState::InFlight { lease_until_ms, .. } => *lease_until_ms,
        _ => ctx.now_ms,
    };
    let decision = Claim::Acquired(Lease {
        scoped_key: key.to_vec(),
        token: ctx.next_token,
        lease_until_ms,
        attempt: record.attempt,
        checkpoint,
        takeover,
    });
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

    const KEY: &[u8] = b"\x01sk";

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
    fn a_claim_decided_from_an_owned_record_is_the_claim_decided_from_a_borrowed_one() {
        let base = Record {
            fingerprint: b"f".to_vec(),
            created_at_ms: 10,
            updated_at_ms: 20,
            expires_at_ms: 5_000,
            attempt: 2,
            state: RecordState::Completed {
                outcome: b"response".to_vec(),
            },
        };
        let in_flight = |lease_until_ms, epoch| RecordState::InFlight {
            token: 7,
            epoch,
            lease_until_ms,
            checkpoint: Some(b"cp".to_vec()),
        };
        let states = [
            base.state.clone(),
            in_flight(1_500, 3),
            in_flight(900, 3),
            in_flight(1_500, 2),
            RecordState::Failed { checkpoint: None },
        ];
        for state in states {
            for expires_at_ms in [5_000, 1_000] {
                let record = Record {
                    state: state.clone(),
                    expires_at_ms,
                    ..base.clone()
                };
                for op in [claim_op(b"f"), claim_op(b"g"), Op::Forget] {
                    let borrowed = apply(KEY, Some(&record), op.clone(), &CTX);
                    let owned = apply_to_owned(KEY, record.clone(), &op, &CTX);
                    assert_eq!(format!("{borrowed:?}"), format!("{owned:?}"));
                }
            }
        }
    }

    #[test]
    fn claim_of_nothing_acquires_attempt_one_with_the_next_token() {
        let step = apply(KEY, None, claim_op(b"f"), &CTX);
        assert!(step.token_used);
        let Ok(Reply::Claim(Claim::Acquired(lease))) = &step.reply else {
            panic!("expected an acquisition, got {:?}", step.reply);
        };
        assert_eq!(
            (
                lease.token,
                lease.attempt,
                lease.takeover,
                lease.lease_until_ms
            ),
            (50, 1, false, 1_100)
        );
        assert_eq!(lease.scoped_key, KEY);
        let r = put(step);
        assert_eq!(r.expires_at_ms, 11_000);
    }

    #[test]
    fn a_write_with_a_foreign_token_changes_nothing() {
        let r = put(apply(KEY, None, claim_op(b"f"), &CTX));
        let step = apply(KEY, Some(&r), Op::Fail { token: 49 }, &CTX);
        assert_eq!(step.write, Write::Keep);
        assert!(matches!(step.reply, Err(Error::LeaseLost { token: 49 })));
    }

    #[test]
    fn a_live_lease_answers_in_progress_with_the_time_it_has_left() {
        let r = put(apply(KEY, None, claim_op(b"f"), &CTX));
        let later = Ctx {
            now_ms: 1_040,
            ..CTX
        };
        let step = apply(KEY, Some(&r), claim_op(b"f"), &later);
        assert_eq!(step.write, Write::Keep);
        assert!(matches!(
            step.reply,
            Ok(Reply::Claim(Claim::InProgress { retry_after })) if retry_after == Duration::from_millis(60)
        ));
    }

    #[test]
    fn fingerprints_compare_by_content_and_length() {
        assert!(fingerprints_equal(b"abc", b"abc"));
        assert!(!fingerprints_equal(b"abc", b"abd"));
        assert!(!fingerprints_equal(b"abc", b"ab"));
        assert!(fingerprints_equal(b"", b""));
    }
}
