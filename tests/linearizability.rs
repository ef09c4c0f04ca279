//! Linearizability: threads race on a few shared keys with every operation (claim, complete,
//! fail, extend, checkpoint, forget, get), and each key's history must be explainable by some
//! order of the operations that respects real time (an operation that returned before another
//! was invoked comes first) and a sequential model of one record (DESIGN §2).
//!
//! - **Recording.** Every call takes a ticket from one global atomic counter just before it is
//!   invoked and just after it returns; call `a` precedes `b` in real time iff `a.returned <
//!   b.invoked`. The result (including tokens, attempts, lease ends, replayed bytes, whole
//!   records read by `get`) is kept.
//! - **Checking.** Per key, a Wing & Gong search over the orders consistent with real time,
//!   memoised on (set of linearised calls, model state), runs the sequential model of the
//!   record; a key's history is linearisable if some order reproduces every result. Each
//!   round ends with a quiescent `get` per key inside the history, so the next round starts
//!   from the state the store really holds. At most 12 calls per key per round keep the search
//!   small; many rounds, with the clock moved between rounds (leases end, records expire) and,
//!   on the file store, reopens (new process epochs: orphans are taken over).
//! - **Fencing, checked apart from the model.** No lease write with token `a` that was invoked
//!   after a claim of the same key returned a newer token `b > a` may take effect ("double
//!   winner": two leases in force at once), and acquired tokens are unique store-wide.
//! - **Duplicate storm.** Hundreds of concurrent claims of one key with `ClaimOptions::wait`
//!   (threads, and async tasks): exactly one `Acquired`, every other claim a `Replay` of exactly
//!   the bytes the winner completed.
//!
//! The checker lives in `tests/support/linearizability/`, shared with the conformance suite's
//! `linearizability` case, which runs the same rounds as async tasks on every backend.
//!
//! The clock is a `ManualClock` frozen while a round runs, so that time-dependent answers are
//! deterministic given the order; the storms run on the system clock.
//!
//! Default run: a few hundred rounds per store, well under 30 s in debug builds.
//! `IDEMSTORE_LONG=1` runs ten times as many rounds and larger storms.

mod common;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{DAY, T0_MS};
use idemstore::testkit::model::Expected;
use idemstore::{Claim, ClaimOptions, Clock, ManualClock, RecordState, Store};
use support::linearizability::{
    CALLS_PER_KEY, Call, Checker, Ctx, Event, KEYS, KeyState, MANUAL, Pool, Report, Ret, THREADS,
    fencing_violations, linearize, pick_lease, plan_call, round_plans, ticket,
};
use support::long_run;
use support::rng::Rng;

/// The PRNG stream of `seed`, as the seeds this file names were recorded with.
fn seeded(seed: u64) -> Rng {
    Rng::from_state(seed ^ 0x9E37_79B9_7F4A_7C15)
}

// ----- running rounds against a store -----

const SCOPE: &str = "lin";

fn key_name(session: u64, key: usize) -> String {
    format!("s{session}-k{key}")
}

/// One thread's part of a round: its calls, each on a key, drawn at run time.
fn run_thread(
    store: &Store,
    pool: &Pool,
    session: u64,
    thread: usize,
    plan: &[usize],
    seed: u64,
) -> Vec<(usize, Event)> {
    let mut rng = seeded(seed);
    let mut out = Vec::new();
    for (n, &key) in plan.iter().enumerate() {
        let name = key_name(session, key);
        let lease = pick_lease(&mut rng, pool, key);
        let call = plan_call(
            &mut rng,
            lease.as_ref(),
            MANUAL,
            store.epoch(),
            (thread, n, seed),
        );
        let options = call.claim_options();
        let mut acquired = None;
        let invoked = ticket();
        let ret = match (&call, lease) {
            (Call::Get, _) => Ret::of_get(store.get(SCOPE, &name)),
            (Call::Forget, _) => Ret::of_forget(store.forget(SCOPE, &name)),
            (Call::Complete { outcome, .. }, Some(lease)) => Ret::of_write(store.complete(
                &lease,
                outcome,
                Duration::from_millis(MANUAL.retention_ms),
            )),
            (Call::Fail { .. }, Some(lease)) => Ret::of_write(store.fail(&lease)),
            (Call::Extend { by_ms, .. }, Some(mut lease)) => {
                let r = store.extend(&mut lease, Duration::from_millis(*by_ms));
                Ret::of_extend(r, &lease)
            }
            (Call::Checkpoint { bytes, .. }, Some(lease)) => {
                Ret::of_write(store.checkpoint(&lease, bytes))
            }
            (Call::Claim { fingerprint, .. }, _) => {
                let options = options.as_ref().expect("a claim has options");
                let r = store.claim(SCOPE, &name, fingerprint, options);
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
            pool.lock()
                .expect("pool")
                .entry(key)
                .or_default()
                .push(lease);
        }
        out.push((
            key,
            Event {
                thread,
                invoked,
                returned,
                call,
                ret,
            },
        ));
    }
    out
}

/// Runs `rounds` rounds on stores made by `open` (called again for a reopen), checking each.
fn run_rounds(
    label: &str,
    rounds: usize,
    seed: u64,
    reopen_every: Option<usize>,
    open: &dyn Fn(&ManualClock) -> Store,
) -> Report {
    let clock = ManualClock::new(T0_MS);
    let mut store = Some(open(&clock));
    let mut rng = seeded(seed);
    let mut checker = Checker::new(label);
    let pool: Pool = Arc::default();
    // Keys are renamed every 20 rounds, so that fresh records are common too.
    for round in 0..rounds {
        let session = (round / 20) as u64;
        if round % 20 == 0 {
            checker.new_keys();
            pool.lock().expect("pool").clear();
        }
        // Between rounds, with nothing running: time passes (leases end, records expire), and
        // now and then the file store is reopened (a new process epoch).
        let advance = [0, 0, 300, 1_500, 6_000][rng.index(5)];
        clock.advance(Duration::from_millis(advance));
        if let Some(every) = reopen_every
            && round > 0
            && round % every == 0
        {
            let s = store.take().expect("store");
            s.close().expect("close");
            store = Some(open(&clock));
        }
        let s = store.as_ref().expect("store");
        let ctx = Ctx {
            now: clock.now_ms(),
            owners: BTreeSet::from([s.epoch()]),
            timeless: false,
            ordered_tokens: true,
        };
        let plans = round_plans(&mut rng);
        let barrier = Barrier::new(THREADS);
        let results: Vec<Vec<(usize, Event)>> = std::thread::scope(|scope| {
            let handles: Vec<_> = plans
                .iter()
                .enumerate()
                .map(|(t, plan)| {
                    let (pool, barrier) = (&pool, &barrier);
                    let thread_seed = rng.next_u64();
                    scope.spawn(move || {
                        barrier.wait();
                        run_thread(s, pool, session, t, plan, thread_seed)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("worker"))
                .collect()
        });
        let mut per_key: BTreeMap<usize, Vec<Event>> = BTreeMap::new();
        for (key, event) in results.into_iter().flatten() {
            per_key.entry(key).or_default().push(event);
        }
        // The quiescent read that closes each key's history.
        for key in 0..KEYS {
            let invoked = ticket();
            let got = s.get(SCOPE, key_name(session, key)).expect("get");
            let returned = ticket();
            let event = Event::quiescent(invoked, returned, Ret::of_get(Ok(got)));
            per_key.entry(key).or_default().push(event);
        }
        checker.check_round(round, &ctx, per_key);
    }
    if let Some(s) = store {
        s.close().expect("close");
    }
    checker.report
}

fn check_report(label: &str, report: &Report, started: Instant) {
    eprintln!("{label}: {} ({:.1?})", report.summary(), started.elapsed());
    report.assert_sound(CALLS_PER_KEY);
}

fn rounds(default: usize) -> usize {
    if long_run() { default * 10 } else { default }
}

#[test]
fn mixed_operations_on_an_in_memory_store_are_linearizable() {
    let started = Instant::now();
    let report = run_rounds("in-memory", rounds(300), 1, None, &|clock| {
        Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .open_in_memory()
            .expect("in-memory store")
    });
    check_report("in-memory store", &report, started);
}

#[test]
fn mixed_operations_on_a_file_store_with_reopens_are_linearizable() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lin.redb");
    let report = run_rounds("file", rounds(150), 2, Some(7), &|clock| {
        Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .open(&path)
            .expect("file store")
    });
    check_report("file store (reopened every 7 rounds)", &report, started);
}

#[test]
fn mixed_operations_on_a_write_ahead_log_store_with_checkpoints_and_reopens_are_linearizable() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lin.redb");
    // A checkpoint after every commit and the smallest map budget: reads race fills of the
    // map, checkpoints and the frozen layer's release.
    let report = run_rounds("write-ahead log", rounds(150), 2, Some(7), &|clock| {
        Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .write_ahead_log(true)
            .checkpoint_interval(Duration::ZERO)
            .map_budget(idemstore::MAP_BUDGET_MIN)
            .wal_segment_bytes(idemstore::WAL_SEGMENT_BYTES_MIN)
            .wal_segments(2)
            .open(&path)
            .expect("file store with a log")
    });
    check_report(
        "write-ahead log store (checkpoint interval 0, reopened every 7 rounds)",
        &report,
        started,
    );
}

// ----- the checker checks -----

const LEASE_MS: u64 = MANUAL.lease_ms;
const RETENTION_MS: u64 = MANUAL.retention_ms;

fn ev(invoked: u64, returned: u64, call: Call, ret: Ret) -> Event {
    Event {
        thread: 0,
        invoked,
        returned,
        call,
        ret,
    }
}

fn claim_call() -> Call {
    Call::Claim {
        owner: 1,
        fingerprint: b"fp".to_vec(),
        lease_ms: LEASE_MS,
        retention_ms: RETENTION_MS,
        wait: false,
    }
}

fn acquired(token: u64, now: u64) -> Ret {
    Ret::Claimed {
        answer: Expected::Acquired {
            attempt: 1,
            takeover: false,
            checkpoint: None,
            lease_until: now + LEASE_MS,
        },
        token,
    }
}

#[test]
fn the_checker_rejects_a_double_winner_and_accepts_overlap() {
    let ctx = Ctx {
        now: 10,
        owners: BTreeSet::from([1]),
        timeless: false,
        ordered_tokens: true,
    };
    let start = KeyState::default();
    // Two claims that both acquired a fresh record: never linearizable, overlapping or not.
    for (a, b) in [((1, 2), (3, 4)), ((1, 4), (2, 3))] {
        let h = [
            ev(a.0, a.1, claim_call(), acquired(5, 10)),
            ev(b.0, b.1, claim_call(), acquired(6, 10)),
        ];
        assert!(linearize(&h, &start, &ctx).end.is_none(), "{h:?}");
    }
    // A claim that saw the record in progress while another acquired it: only if they
    // overlap or the acquisition came first.
    let in_progress = Ret::Claimed {
        answer: Expected::InProgress {
            retry_after_ms: LEASE_MS,
        },
        token: 0,
    };
    let overlap = [
        ev(1, 4, claim_call(), acquired(5, 10)),
        ev(2, 3, claim_call(), in_progress.clone()),
    ];
    assert!(linearize(&overlap, &start, &ctx).end.is_some());
    let too_early = [
        ev(1, 2, claim_call(), in_progress),
        ev(3, 4, claim_call(), acquired(5, 10)),
    ];
    assert!(linearize(&too_early, &start, &ctx).end.is_none());
    // A stale lease write that took effect after a newer grant is a fencing violation.
    let stale = [
        ev(1, 2, claim_call(), acquired(9, 10)),
        ev(3, 4, Call::Fail { token: 5 }, Ret::Done),
    ];
    assert_eq!(fencing_violations(&stale, true).len(), 1);
    // Where tokens are unique but not ordered (PostgreSQL), a write under a lease whose grant
    // another, later grant superseded is a violation whatever the two tokens' values.
    let superseded = [
        ev(1, 2, claim_call(), acquired(5, 10)),
        ev(3, 4, claim_call(), acquired(3, 10)),
        ev(5, 6, Call::Fail { token: 5 }, Ret::Done),
    ];
    assert_eq!(fencing_violations(&superseded, false).len(), 1);
    assert_eq!(fencing_violations(&superseded, true).len(), 0);
    // A replay must carry the completed bytes.
    let complete = Call::Complete {
        token: 5,
        outcome: b"A".to_vec(),
        retention_ms: RETENTION_MS,
    };
    let replay = |outcome: &[u8]| Ret::Claimed {
        answer: Expected::Replay {
            outcome: outcome.to_vec(),
            completed_at: 10,
            attempt: 1,
        },
        token: 0,
    };
    let good = [
        ev(1, 2, claim_call(), acquired(5, 10)),
        ev(3, 4, complete.clone(), Ret::Done),
        ev(5, 6, claim_call(), replay(b"A")),
    ];
    assert!(linearize(&good, &start, &ctx).end.is_some());
    let bad = [
        ev(1, 2, claim_call(), acquired(5, 10)),
        ev(3, 4, complete, Ret::Done),
        ev(5, 6, claim_call(), replay(b"B")),
    ];
    assert!(linearize(&bad, &start, &ctx).end.is_none());
}

// ----- duplicate storms -----

/// `n` concurrent claims of one key with `wait`: exactly one acquires, runs (sleeps) and
/// completes; every other one replays exactly its bytes. Returns (acquired, replays).
fn storm(store: &Arc<Store>, key: &str, n: usize) -> (usize, usize) {
    let options = ClaimOptions::default()
        .lease(Duration::from_secs(30))
        .retention(DAY)
        .wait(Duration::from_secs(30));
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (store, barrier, options, key) = (
                Arc::clone(store),
                Arc::clone(&barrier),
                options.clone(),
                key.to_owned(),
            );
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || -> Result<Option<Vec<u8>>, String> {
                    barrier.wait();
                    match store.claim("storm", &key, b"fp", &options) {
                        Ok(Claim::Acquired(lease)) => {
                            // The side effect takes a while; the duplicates wait meanwhile.
                            std::thread::sleep(Duration::from_millis(30));
                            let outcome = format!("{key} run by claimer {i}").into_bytes();
                            store
                                .complete(&lease, &outcome, DAY)
                                .map_err(|e| e.to_string())?;
                            Ok(Some(outcome))
                        }
                        Ok(Claim::Replay(r)) => {
                            let mut tagged = b"replay:".to_vec();
                            tagged.extend_from_slice(&r.outcome);
                            Ok(Some(tagged))
                        }
                        Ok(other) => Err(format!("{key}: claimer {i} got {other:?}")),
                        Err(e) => Err(format!("{key}: claimer {i}: {e}")),
                    }
                })
                .expect("spawn")
        })
        .collect();
    let results: Vec<Vec<u8>> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .expect("claimer")
                .expect("claim")
                .expect("an outcome")
        })
        .collect();
    let winners: Vec<&Vec<u8>> = results
        .iter()
        .filter(|r| !r.starts_with(b"replay:"))
        .collect();
    assert_eq!(winners.len(), 1, "{key}: exactly one claim acquires");
    let winner = winners[0].clone();
    let mut replays = 0;
    for r in &results {
        if let Some(bytes) = r.strip_prefix(b"replay:") {
            assert_eq!(
                bytes,
                winner.as_slice(),
                "{key}: a replay carries the winner's bytes"
            );
            replays += 1;
        }
    }
    (winners.len(), replays)
}

fn storm_size() -> (usize, usize) {
    // (claimers per key, keys)
    if long_run() { (800, 20) } else { (300, 3) }
}

#[test]
fn duplicate_storm_has_one_winner_and_identical_replays() {
    let started = Instant::now();
    let (n, keys) = storm_size();
    let dir = tempfile::tempdir().expect("tempdir");
    let stores = [
        ("in-memory", Arc::new(Store::in_memory().expect("store"))),
        (
            "file",
            Arc::new(Store::open(dir.path().join("storm.redb")).expect("store")),
        ),
    ];
    for (label, store) in &stores {
        let (mut acquired, mut replays) = (0, 0);
        for k in 0..keys {
            let (a, r) = storm(store, &format!("key-{k}"), n);
            acquired += a;
            replays += r;
        }
        eprintln!(
            "duplicate storm, {label} store: {keys} keys x {n} concurrent claims: \
             {acquired} acquired, {replays} identical replays ({:.1?})",
            started.elapsed()
        );
        assert_eq!(acquired, keys);
        assert_eq!(replays, keys * (n - 1));
    }
}

#[test]
fn async_duplicate_storm_has_one_winner_and_identical_replays() {
    let started = Instant::now();
    let (n, keys) = storm_size();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let store = Arc::new(Store::in_memory().expect("store"));
    let (mut acquired, mut replays) = (0usize, 0usize);
    for k in 0..keys {
        let key = format!("async-{k}");
        let results: Vec<Result<Claim, String>> = runtime.block_on(async {
            let options = ClaimOptions::default()
                .lease(Duration::from_secs(30))
                .retention(DAY)
                .wait(Duration::from_secs(30));
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let (store, options, key) = (Arc::clone(&store), options.clone(), key.clone());
                    tokio::spawn(async move {
                        let claim = store
                            .claim_async("storm", &key, b"fp", &options)
                            .await
                            .map_err(|e| e.to_string())?;
                        if let Claim::Acquired(lease) = &claim {
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            let outcome = format!("{key} run by task {i}").into_bytes();
                            store
                                .complete_async(lease, &outcome, DAY)
                                .await
                                .map_err(|e| e.to_string())?;
                        }
                        Ok(claim)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.map_err(|e| e.to_string()).and_then(|r| r));
            }
            out
        });
        let claims: Vec<Claim> = results.into_iter().map(|r| r.expect("claim")).collect();
        let winners = claims
            .iter()
            .filter(|c| matches!(c, Claim::Acquired(_)))
            .count();
        assert_eq!(winners, 1, "{key}: exactly one task acquires");
        let stored = store.get("storm", &key).expect("get").expect("record");
        let RecordState::Completed { outcome } = stored.state else {
            panic!("{key}: completed");
        };
        for c in &claims {
            match c {
                Claim::Acquired(_) => acquired += 1,
                Claim::Replay(r) => {
                    assert_eq!(r.outcome, outcome, "{key}: identical replay");
                    replays += 1;
                }
                other => panic!("{key}: {other:?}"),
            }
        }
    }
    eprintln!(
        "async duplicate storm: {keys} keys x {n} concurrent tasks: {acquired} acquired, \
         {replays} identical replays ({:.1?})",
        started.elapsed()
    );
    assert_eq!(acquired, keys);
    assert_eq!(replays, keys * (n - 1));
}
