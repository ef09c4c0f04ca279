//! `linearizability`: four async tasks on two handles race on three keys with every operation
//! (claim, with and without a wait, complete, fail, extend, checkpoint, forget, get), and each
//! key's history must be linearizable against the reference model, with fencing and token
//! uniqueness checked apart from it. The checker and the rounds are those of
//! `tests/linearizability.rs` (`tests/support/linearizability/`); here they run through
//! `AnyBackend` on every backend.
//!
//! - **Handles**: on PostgreSQL and Redis two instances, each with its own connections and its
//!   own owner; a round's model knows both owners alive. Memory and file have one store per
//!   process: both handles are that store.
//! - **Time, memory and file**: a manual clock, still while a round runs and moved between
//!   rounds (leases end, records expire); the file store is reopened every 7 rounds (a new
//!   process epoch: orphans are taken over).
//! - **Time, PostgreSQL and Redis**: the server's clock runs while a round runs, so the rounds
//!   keep to what does not depend on it: leases of a minute and retentions of two, which
//!   outlast the case, and results compared without their timestamps (the `reference_model`
//!   case compares those). Takeovers come from owners ending instead: every
//!   7 rounds both instances reconnect under their names, which ends their earlier owners.
//!
//! Before the run, hand-made histories show that the checker, configured as for this backend,
//! rejects what is not linearizable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idemstore::testkit::model::Expected;
use idemstore::{AnyBackend, Claim, Clock, IdempotencyBackend, ManualClock};

use crate::env::{Env, Kind};
use crate::support::linearizability::{
    CALLS_PER_KEY, Call, Checker, Ctx, Event, KEYS, KeyState, MANUAL, Pool, Ret, SERVER, THREADS,
    Timing, linearize, pick_lease, plan_call, round_plans, ticket,
};
use crate::support::rng::Rng;

/// Rounds per backend.
const ROUNDS: usize = 60;
/// Both handles are reopened every this many rounds (not in memory).
const REOPEN_EVERY: usize = 7;
const SCOPE: &[u8] = b"lin";
const SEED: u64 = 0x5EED_0002;
/// 2023-11-14T22:13:20Z: where the manual clock starts.
const T0_MS: u64 = 1_700_000_000_000;

pub async fn linearizability(env: Env) {
    let manual = matches!(env.kind, Kind::Memory | Kind::File);
    the_checker_rejects_what_is_not_linearizable(!manual);
    let started = Instant::now();
    let clock = ManualClock::new(T0_MS);
    let (mut env, timing) = if manual {
        (env.with_manual_clock(clock.clone()), MANUAL)
    } else {
        (env, SERVER)
    };
    let label = format!("{:?}", env.kind);
    let mut handles = Some([
        (env.open().await, env.last_owner()),
        (env.second().await, env.last_owner()),
    ]);
    let mut rng = Rng::new(SEED);
    let mut checker = Checker::new(&label);
    let pool: Pool = Arc::default();
    for round in 0..ROUNDS {
        // Keys are renamed every 20 rounds, so that fresh records are common too.
        let session = (round / 20) as u64;
        if round % 20 == 0 {
            checker.new_keys();
            pool.lock().expect("the pool").clear();
        }
        if manual {
            let advance = [0, 0, 300, 1_500, 6_000][rng.index(5)];
            clock.advance(Duration::from_millis(advance));
        }
        if env.kind != Kind::Memory && round > 0 && round % REOPEN_EVERY == 0 {
            let [(first, _), (second, _)] = handles.take().expect("open handles");
            drop(second);
            let first = env.restart(first).await;
            let first_owner = env.last_owner();
            handles = Some([(first, first_owner), (env.second().await, env.last_owner())]);
        }
        let pair = handles.as_ref().expect("open handles");
        let ctx = Ctx {
            now: if manual { clock.now_ms() } else { wall_ms() },
            owners: pair.iter().map(|(_, owner)| *owner).collect(),
            timeless: !manual,
            ordered_tokens: env.kind != Kind::Postgres,
        };
        let barrier = Arc::new(tokio::sync::Barrier::new(THREADS));
        let mut tasks = Vec::new();
        for (thread, plan) in round_plans(&mut rng).into_iter().enumerate() {
            let (backend, owner) = pair[thread % 2].clone();
            let caller = Caller {
                backend,
                owner,
                pool: Arc::clone(&pool),
                session,
                thread,
                seed: rng.next_u64(),
                timing,
            };
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                caller.run(plan).await
            }));
        }
        let mut per_key: BTreeMap<usize, Vec<Event>> = BTreeMap::new();
        for task in tasks {
            for (key, event) in task.await.expect("a caller finished") {
                per_key.entry(key).or_default().push(event);
            }
        }
        // The quiescent read that closes each key's history.
        for key in 0..KEYS {
            let invoked = ticket();
            let got = pair[0].0.get(SCOPE, &key_name(session, key)).await;
            let returned = ticket();
            let event = Event::quiescent(invoked, returned, Ret::of_get(got));
            per_key.entry(key).or_default().push(event);
        }
        checker.check_round(round, &ctx, per_key);
    }
    eprintln!(
        "{label}: {} ({:.1?})",
        checker.report.summary(),
        started.elapsed()
    );
    checker.report.assert_sound(CALLS_PER_KEY);
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn key_name(session: u64, key: usize) -> Vec<u8> {
    format!("s{session}-k{key}").into_bytes()
}

/// One task of a round.
struct Caller {
    backend: AnyBackend,
    /// The owner the task's handle stamps on what it acquires.
    owner: u64,
    pool: Pool,
    session: u64,
    thread: usize,
    seed: u64,
    timing: Timing,
}

impl Caller {
    /// The task's calls, each on a key of `plan`, drawn at run time.
    async fn run(self, plan: Vec<usize>) -> Vec<(usize, Event)> {
        let b = &self.backend;
        let mut rng = Rng::new(self.seed);
        let mut out = Vec::new();
        for (n, key) in plan.into_iter().enumerate() {
            let name = key_name(self.session, key);
            let lease = pick_lease(&mut rng, &self.pool, key);
            let call = plan_call(
                &mut rng,
                lease.as_ref(),
                self.timing,
                self.owner,
                (self.thread, n, self.seed),
            );
            let options = call.claim_options();
            let mut acquired = None;
            let invoked = ticket();
            let ret = match (&call, lease) {
                (Call::Get, _) => Ret::of_get(b.get(SCOPE, &name).await),
                (Call::Forget, _) => Ret::of_forget(b.forget(SCOPE, &name).await),
                (
                    Call::Complete {
                        outcome,
                        retention_ms,
                        ..
                    },
                    Some(lease),
                ) => Ret::of_write(
                    b.complete(&lease, outcome, Duration::from_millis(*retention_ms))
                        .await,
                ),
                (Call::Fail { .. }, Some(lease)) => Ret::of_write(b.fail(&lease).await),
                (Call::Extend { by_ms, .. }, Some(mut lease)) => {
                    let r = b.extend(&mut lease, Duration::from_millis(*by_ms)).await;
                    Ret::of_extend(r, &lease)
                }
                (Call::Checkpoint { bytes, .. }, Some(lease)) => {
                    Ret::of_write(b.checkpoint(&lease, bytes).await)
                }
                (Call::Claim { fingerprint, .. }, _) => {
                    let options = options.as_ref().expect("a claim has options");
                    let r = b.claim(SCOPE, &name, fingerprint, options).await;
                    let ret = Ret::of_claim(&r);
                    if let Ok(Claim::Acquired(lease)) = r {
                        acquired = Some(lease);
                    }
                    ret
                }
                (call, None) => unreachable!("{call:?} is planned only with a lease"),
            };
            let returned = ticket();
            if let Some(lease) = acquired {
                self.pool
                    .lock()
                    .expect("the pool")
                    .entry(key)
                    .or_default()
                    .push(lease);
            }
            out.push((
                key,
                Event {
                    thread: self.thread,
                    invoked,
                    returned,
                    call,
                    ret,
                },
            ));
        }
        out
    }
}

/// The checker as this run configures it (two owners; timestamps left out if `timeless`)
/// accepts what a correct store may answer and rejects what none may.
fn the_checker_rejects_what_is_not_linearizable(timeless: bool) {
    let (a, b) = (41, 42);
    let ctx = |owners: &[u64]| Ctx {
        now: 1_000,
        owners: owners.iter().copied().collect::<BTreeSet<u64>>(),
        timeless,
        ordered_tokens: true,
    };
    let both = ctx(&[a, b]);
    let claim = |owner: u64| Call::Claim {
        owner,
        fingerprint: b"fp".to_vec(),
        lease_ms: 1_000,
        retention_ms: 5_000,
        wait: false,
    };
    let acquired = |token: u64, attempt: u32, takeover: bool, lease_until: u64| Ret::Claimed {
        answer: Expected::Acquired {
            attempt,
            takeover,
            checkpoint: None,
            lease_until,
        },
        token,
    };
    let in_progress = Ret::Claimed {
        answer: Expected::InProgress {
            retry_after_ms: 1_000,
        },
        token: 0,
    };
    let ev = |invoked: u64, returned: u64, call: Call, ret: Ret| Event {
        thread: 0,
        invoked,
        returned,
        call,
        ret,
    };
    let linearizable =
        |h: &[Event], ctx: &Ctx| linearize(h, &KeyState::default(), ctx).end.is_some();

    // Owners a and b both acquire the fresh key: two winners, in either order or overlapping.
    for (x, y) in [((1, 2), (3, 4)), ((1, 4), (2, 3))] {
        let h = [
            ev(x.0, x.1, claim(a), acquired(5, 1, false, 2_000)),
            ev(y.0, y.1, claim(b), acquired(6, 1, false, 2_000)),
        ];
        assert!(!linearizable(&h, &both), "two winners accepted: {h:?}");
    }
    // b finds a's record in progress while a is alive; once a is gone, b takes it over.
    let waits = [
        ev(1, 2, claim(a), acquired(5, 1, false, 2_000)),
        ev(3, 4, claim(b), in_progress.clone()),
    ];
    assert!(linearizable(&waits, &both));
    assert!(
        !linearizable(&waits, &ctx(&[b])),
        "a gone owner's record answered in progress"
    );
    let takes_over = [
        ev(1, 2, claim(a), acquired(5, 1, false, 2_000)),
        ev(3, 4, claim(b), acquired(9, 2, true, 2_000)),
    ];
    assert!(linearizable(&takes_over, &ctx(&[b])));
    assert!(
        !linearizable(&takes_over, &both),
        "a live owner's record taken over"
    );
    // In progress before anyone acquired: impossible unless the calls overlap.
    let early = [
        ev(1, 2, claim(b), in_progress.clone()),
        ev(3, 4, claim(a), acquired(5, 1, false, 2_000)),
    ];
    assert!(!linearizable(&early, &both), "an answer from the future");
    let overlapping = [
        ev(1, 4, claim(a), acquired(5, 1, false, 2_000)),
        ev(2, 3, claim(b), in_progress),
    ];
    assert!(linearizable(&overlapping, &both));
    // A replay carries the completed bytes.
    let complete = Call::Complete {
        token: 5,
        outcome: b"A".to_vec(),
        retention_ms: 5_000,
    };
    let replay = |outcome: &[u8]| Ret::Claimed {
        answer: Expected::Replay {
            outcome: outcome.to_vec(),
            completed_at: 1_000,
            attempt: 1,
        },
        token: 0,
    };
    let history = |outcome: &[u8]| {
        [
            ev(1, 2, claim(a), acquired(5, 1, false, 2_000)),
            ev(3, 4, complete.clone(), Ret::Done),
            ev(5, 6, claim(b), replay(outcome)),
        ]
    };
    assert!(linearizable(&history(b"A"), &both));
    assert!(
        !linearizable(&history(b"B"), &both),
        "a replay of bytes never completed"
    );
    // A lease end the model did not compute: accepted only when timestamps are left out.
    let other_time = [ev(1, 2, claim(a), acquired(5, 1, false, 2_345))];
    assert_eq!(linearizable(&other_time, &both), timeless);
}
