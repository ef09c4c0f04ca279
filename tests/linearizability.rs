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
//! The clock is a `ManualClock` frozen while a round runs, so that time-dependent answers are
//! deterministic given the order; the storms run on the system clock.
//!
//! Default run: a few hundred rounds per store, well under 30 s in debug builds.
//! `IDEMSTORE_LONG=1` runs ten times as many rounds and larger storms.

mod common;
mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{DAY, T0_MS};
use idemstore::testkit::model::{Expected, MRecord, Model};
use idemstore::{Claim, ClaimOptions, Clock, Error, Lease, ManualClock, RecordState, Store};
use support::long_run;
use support::rng::Rng;

/// The PRNG stream of `seed`, as the seeds this file names were recorded with.
fn seeded(seed: u64) -> Rng {
    Rng::from_state(seed ^ 0x9E37_79B9_7F4A_7C15)
}

// ----- histories -----

/// One call on one key, as invoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Call {
    Claim {
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

/// What the call returned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Ret {
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

#[derive(Debug, Clone)]
struct Event {
    thread: usize,
    invoked: u64,
    returned: u64,
    call: Call,
    ret: Ret,
}

// ----- the sequential model of one record (DESIGN §2) -----

/// The name a key's history is checked under in the model: each history is one key's.
const MODEL_SCOPE: &[u8] = b"scope";
const MODEL_KEY: &[u8] = b"key";

/// The model state of one key: the shared reference model holding (at most) that key's record,
/// expired ones dropped, and the newest token granted on the key so far (tokens granted on a
/// key increase in linearisation order).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct KeyState {
    model: Model,
    last_token: u64,
}

impl KeyState {
    /// A key whose record is `record`, with tokens up to `last_token` granted.
    fn holding(record: Option<MRecord>, last_token: u64) -> KeyState {
        let mut model = Model::default();
        model.set(MODEL_SCOPE, MODEL_KEY, record);
        KeyState { model, last_token }
    }
}

/// The time and process epoch of a round: fixed while the round runs.
#[derive(Debug, Clone, Copy)]
struct Ctx {
    now: u64,
    epoch: u64,
}

/// Applies `call` to `state` and returns the next state if `ret` is what the model answers.
/// The token of an acquisition is the store's choice: any token above the key's last one.
fn step(state: &KeyState, call: &Call, ret: &Ret, ctx: Ctx) -> Option<KeyState> {
    let (s, k) = (MODEL_SCOPE, MODEL_KEY);
    let mut next = state.clone();
    next.model.now = ctx.now;
    next.model.epoch = ctx.epoch;
    // Expired records are absent to every call: dropping them keeps the memo small.
    next.model.drop_expired();
    let m = &mut next.model;
    let lease = |took_effect: bool, done: Ret| if took_effect { done } else { Ret::LeaseLost };
    let want = match call {
        Call::Get => Ret::Got(m.live(s, k).cloned()),
        Call::Forget => Ret::Forgotten(m.forget(s, k)),
        Call::Claim {
            fingerprint,
            lease_ms,
            retention_ms,
            wait: _,
        } => {
            let answer = m.claim(s, k, fingerprint, *lease_ms, *retention_ms);
            let mut token = 0;
            if let Expected::Acquired { .. } = answer {
                let granted = acquired_token(ret)?;
                if granted <= state.last_token {
                    return None;
                }
                m.grant(s, k, granted);
                next.last_token = granted;
                token = granted;
            }
            Ret::Claimed { answer, token }
        }
        Call::Complete {
            token,
            outcome,
            retention_ms,
        } => lease(m.complete(s, k, *token, outcome, *retention_ms), Ret::Done),
        Call::Fail { token } => lease(m.fail(s, k, *token), Ret::Done),
        Call::Extend { token, by_ms } => match m.extend(s, k, *token, *by_ms) {
            Some(until) => Ret::Extended { until },
            None => Ret::LeaseLost,
        },
        Call::Checkpoint { token, bytes } => lease(m.checkpoint(s, k, *token, bytes), Ret::Done),
    };
    (*ret == want).then_some(next)
}

// ----- the checker (Wing & Gong, memoised) -----

/// The outcome of checking one key's history.
#[derive(Debug)]
struct Verdict {
    /// The state after a full linearisation, if there is one.
    end: Option<KeyState>,
    /// Search nodes visited.
    explored: usize,
}

/// Searches for an order of `events` that respects real time and that the model accepts from
/// `start`. At most 64 events.
fn linearize(events: &[Event], start: &KeyState, ctx: Ctx) -> Verdict {
    assert!(events.len() <= 64, "histories are kept small");
    let all: u64 = if events.len() == 64 {
        u64::MAX
    } else {
        (1u64 << events.len()) - 1
    };
    let mut seen: HashSet<(u64, KeyState)> = HashSet::new();
    let mut explored = 0;
    // Depth-first, with an explicit stack of (done set, state).
    let mut stack = vec![(0u64, start.clone())];
    while let Some((done, state)) = stack.pop() {
        explored += 1;
        if done == all {
            return Verdict {
                end: Some(state),
                explored,
            };
        }
        if !seen.insert((done, state.clone())) {
            continue;
        }
        // The earliest return among the pending calls: a call invoked after it cannot be next.
        let horizon = events
            .iter()
            .enumerate()
            .filter(|(i, _)| done & (1 << i) == 0)
            .map(|(_, e)| e.returned)
            .min()
            .unwrap_or(u64::MAX);
        for (i, e) in events.iter().enumerate() {
            if done & (1 << i) != 0 || e.invoked > horizon {
                continue;
            }
            if let Some(next) = step(&state, &e.call, &e.ret, ctx) {
                stack.push((done | (1 << i), next));
            }
        }
    }
    Verdict {
        end: None,
        explored,
    }
}

/// Fencing, independent of the model: a lease write with token `a` that took effect must not
/// have been invoked after a claim of the same key returned a newer token. Returns the
/// violations.
fn fencing_violations(events: &[Event]) -> Vec<String> {
    let mut out = Vec::new();
    for w in events {
        let (Some(token), true) = (
            lease_token(&w.call),
            matches!(w.ret, Ret::Done | Ret::Extended { .. }),
        ) else {
            continue;
        };
        for a in events {
            if let Some(newer) = acquired_token(&a.ret)
                && newer > token
                && a.returned < w.invoked
            {
                out.push(format!(
                    "{:?} with token {token} took effect after token {newer} was granted ({a:?} then {w:?})",
                    w.call
                ));
            }
        }
    }
    out
}

fn lease_token(call: &Call) -> Option<u64> {
    match call {
        Call::Complete { token, .. }
        | Call::Fail { token }
        | Call::Extend { token, .. }
        | Call::Checkpoint { token, .. } => Some(*token),
        _ => None,
    }
}

// ----- running rounds against a store -----

static TICKETS: AtomicU64 = AtomicU64::new(1);

fn ticket() -> u64 {
    TICKETS.fetch_add(1, Ordering::SeqCst)
}

const LEASE_MS: u64 = 1_000;
const RETENTION_MS: u64 = 5_000;
const SCOPE: &str = "lin";

/// Leases obtained so far, per key, shared by every thread (a lease is only data: any thread
/// may act as a slow or resurrected owner).
type Pool = Arc<Mutex<BTreeMap<usize, Vec<Lease>>>>;

fn key_name(session: u64, key: usize) -> String {
    format!("s{session}-k{key}")
}

/// The token of an acquisition, if `ret` is one.
fn acquired_token(ret: &Ret) -> Option<u64> {
    match ret {
        Ret::Claimed {
            answer: Expected::Acquired { .. },
            token,
        } => Some(*token),
        _ => None,
    }
}

fn ret_of_claim(result: idemstore::Result<Claim>) -> Ret {
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
                outcome: r.outcome,
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

fn ret_of_write(result: idemstore::Result<()>) -> Ret {
    match result {
        Ok(()) => Ret::Done,
        Err(Error::LeaseLost { .. }) => Ret::LeaseLost,
        Err(e) => Ret::Unexpected(format!("{e} ({e:?})")),
    }
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
        let lease = {
            let pool = pool.lock().expect("pool");
            pool.get(&key).and_then(|leases| {
                if leases.is_empty() {
                    None
                } else if rng.chance(70) {
                    leases.last().cloned()
                } else {
                    leases.get(rng.index(leases.len())).cloned()
                }
            })
        };
        let roll = rng.index(100);
        let (call, timed) = match (roll, lease) {
            (0..=9, _) => {
                let invoked = ticket();
                let r = store.get(SCOPE, &name);
                let returned = ticket();
                let ret = match r {
                    Ok(found) => Ret::Got(found.as_ref().map(MRecord::of)),
                    Err(e) => Ret::Unexpected(format!("{e} ({e:?})")),
                };
                (Call::Get, (invoked, ret, returned))
            }
            (10..=13, _) => {
                let invoked = ticket();
                let r = store.forget(SCOPE, &name);
                let returned = ticket();
                let ret = match r {
                    Ok(b) => Ret::Forgotten(b),
                    Err(e) => Ret::Unexpected(format!("{e} ({e:?})")),
                };
                (Call::Forget, (invoked, ret, returned))
            }
            (14..=33, Some(lease)) => {
                let outcome = format!("outcome t{thread} n{n} s{seed}").into_bytes();
                let call = Call::Complete {
                    token: lease.token(),
                    outcome: outcome.clone(),
                    retention_ms: RETENTION_MS,
                };
                let invoked = ticket();
                let r = store.complete(&lease, &outcome, Duration::from_millis(RETENTION_MS));
                (call, (invoked, ret_of_write(r), ticket()))
            }
            (34..=43, Some(lease)) => {
                let call = Call::Fail {
                    token: lease.token(),
                };
                let invoked = ticket();
                let r = store.fail(&lease);
                (call, (invoked, ret_of_write(r), ticket()))
            }
            (44..=53, Some(mut lease)) => {
                let by_ms = 500 + 500 * rng.index(4) as u64;
                let call = Call::Extend {
                    token: lease.token(),
                    by_ms,
                };
                let invoked = ticket();
                let r = store.extend(&mut lease, Duration::from_millis(by_ms));
                let returned = ticket();
                let ret = match r {
                    Ok(()) => Ret::Extended {
                        until: lease.lease_until_ms(),
                    },
                    Err(Error::LeaseLost { .. }) => Ret::LeaseLost,
                    Err(e) => Ret::Unexpected(format!("{e} ({e:?})")),
                };
                (call, (invoked, ret, returned))
            }
            (54..=63, Some(lease)) => {
                let bytes = format!("cp t{thread} n{n}").into_bytes();
                let call = Call::Checkpoint {
                    token: lease.token(),
                    bytes: bytes.clone(),
                };
                let invoked = ticket();
                let r = store.checkpoint(&lease, &bytes);
                (call, (invoked, ret_of_write(r), ticket()))
            }
            _ => {
                let fingerprint: &[u8] = if rng.chance(12) { b"fp-other" } else { b"fp" };
                let wait = rng.chance(15);
                let mut options = ClaimOptions::default()
                    .lease(Duration::from_millis(LEASE_MS))
                    .retention(Duration::from_millis(RETENTION_MS));
                if wait {
                    options = options.wait(Duration::from_millis(5));
                }
                let call = Call::Claim {
                    fingerprint: fingerprint.to_vec(),
                    lease_ms: LEASE_MS,
                    retention_ms: RETENTION_MS,
                    wait,
                };
                let invoked = ticket();
                let r = store.claim(SCOPE, &name, fingerprint, &options);
                let returned = ticket();
                if let Ok(Claim::Acquired(lease)) = &r {
                    pool.lock()
                        .expect("pool")
                        .entry(key)
                        .or_default()
                        .push(lease.clone());
                }
                (call, (invoked, ret_of_claim(r), returned))
            }
        };
        let (invoked, ret, returned) = timed;
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

/// Totals over all rounds of one store.
#[derive(Debug, Default)]
struct Report {
    rounds: usize,
    histories: usize,
    calls: usize,
    max_calls_per_key: usize,
    explored: usize,
    /// Calls whose interval overlapped another call on the same key.
    overlapping: usize,
    acquired: usize,
    replays: usize,
    lease_lost: usize,
    non_linearizable: Vec<String>,
    fencing: Vec<String>,
    duplicate_tokens: usize,
}

const THREADS: usize = 4;
const KEYS: usize = 3;
/// Calls per key per round, the closing `get` included.
const CALLS_PER_KEY: usize = 12;

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
    let mut report = Report::default();
    let mut states: BTreeMap<usize, KeyState> = BTreeMap::new();
    let pool: Pool = Arc::default();
    let mut tokens: HashSet<u64> = HashSet::new();
    // Keys are renamed every 20 rounds, so that fresh records are common too.
    for round in 0..rounds {
        let session = (round / 20) as u64;
        if round % 20 == 0 {
            states.clear();
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
            epoch: s.epoch(),
        };
        // The plan: CALLS_PER_KEY - 1 concurrent calls per key, spread over the threads.
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
            let m = got.as_ref().map(MRecord::of);
            per_key.entry(key).or_default().push(Event {
                thread: usize::MAX,
                invoked,
                returned,
                call: Call::Get,
                ret: Ret::Got(m),
            });
        }
        report.rounds += 1;
        for (key, events) in per_key {
            report.histories += 1;
            report.calls += events.len();
            report.max_calls_per_key = report.max_calls_per_key.max(events.len());
            report.overlapping += events
                .iter()
                .enumerate()
                .filter(|(i, a)| {
                    events
                        .iter()
                        .enumerate()
                        .any(|(j, b)| *i != j && a.invoked < b.returned && b.invoked < a.returned)
                })
                .count();
            for e in &events {
                if let Some(token) = acquired_token(&e.ret) {
                    report.acquired += 1;
                    if !tokens.insert(token) {
                        report.duplicate_tokens += 1;
                    }
                }
                match &e.ret {
                    Ret::Claimed {
                        answer: Expected::Replay { .. },
                        ..
                    } => report.replays += 1,
                    Ret::LeaseLost => report.lease_lost += 1,
                    _ => {}
                }
            }
            report.fencing.extend(fencing_violations(&events));
            let start = states.get(&key).cloned().unwrap_or_default();
            let verdict = linearize(&events, &start, ctx);
            report.explored += verdict.explored;
            match verdict.end {
                Some(end) => {
                    states.insert(key, end);
                }
                None => {
                    let mut sorted = events.clone();
                    sorted.sort_by_key(|e| e.invoked);
                    let mut text = format!(
                        "{label} round {round} key {key}: not linearizable from {start:?} at {ctx:?}"
                    );
                    for e in &sorted {
                        let who = if e.thread == usize::MAX {
                            "quiescent".to_owned()
                        } else {
                            format!("thread {}", e.thread)
                        };
                        // Byte strings shown as text: outcomes and checkpoints are ASCII here.
                        let call = readable(&format!("{:?}", e.call));
                        let ret = readable(&format!("{:?}", e.ret));
                        text.push_str(&format!(
                            "\n    {who} [{}..{}] {call} -> {ret}",
                            e.invoked, e.returned
                        ));
                    }
                    report.non_linearizable.push(text);
                    // Continue from what the store holds.
                    let observed = sorted.last().and_then(|e| match &e.ret {
                        Ret::Got(m) => Some(m.clone()),
                        _ => None,
                    });
                    let last_token = tokens.iter().copied().max().unwrap_or(0);
                    states.insert(key, KeyState::holding(observed.flatten(), last_token));
                }
            }
        }
    }
    if let Some(s) = store {
        s.close().expect("close");
    }
    report
}

/// Rewrites every `[b, y, t, e, s]` list of a debug string as the text it encodes.
fn readable(debug: &str) -> String {
    let mut out = String::new();
    let mut rest = debug;
    while let Some(open) = rest.find('[') {
        let (head, tail) = rest.split_at(open);
        out.push_str(head);
        let Some(close) = tail.find(']') else {
            out.push_str(tail);
            return out;
        };
        let inner = &tail[1..close];
        let bytes: Option<Vec<u8>> = inner
            .split(", ")
            .map(|b| b.trim().parse::<u8>().ok())
            .collect();
        match bytes {
            Some(b) if !inner.is_empty() => {
                out.push_str(&format!("{:?}", String::from_utf8_lossy(&b)));
            }
            _ => out.push_str(&tail[..=close]),
        }
        rest = &tail[close + 1..];
    }
    out.push_str(rest);
    out
}

fn check_report(label: &str, report: &Report, started: Instant) {
    eprintln!(
        "{label}: {} rounds, {} key histories, {} calls (at most {} per key per round, {} \
         overlapping another on the same key), {} search nodes; {} acquired, {} replays, \
         {} lease-lost; \
         non-linearizable {}, fencing violations (double winners) {}, duplicate tokens {} ({:.1?})",
        report.rounds,
        report.histories,
        report.calls,
        report.max_calls_per_key,
        report.overlapping,
        report.explored,
        report.acquired,
        report.replays,
        report.lease_lost,
        report.non_linearizable.len(),
        report.fencing.len(),
        report.duplicate_tokens,
        started.elapsed(),
    );
    assert!(
        report.non_linearizable.is_empty(),
        "{} non-linearizable histories; the first:\n{}",
        report.non_linearizable.len(),
        report.non_linearizable.first().map_or("", String::as_str)
    );
    assert!(report.fencing.is_empty(), "{:#?}", report.fencing);
    assert_eq!(report.duplicate_tokens, 0, "tokens are unique store-wide");
    assert!(report.max_calls_per_key <= CALLS_PER_KEY);
    assert!(report.acquired > 0 && report.replays > 0 && report.lease_lost > 0);
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
    let ctx = Ctx { now: 10, epoch: 1 };
    let start = KeyState::default();
    // Two claims that both acquired a fresh record: never linearizable, overlapping or not.
    for (a, b) in [((1, 2), (3, 4)), ((1, 4), (2, 3))] {
        let h = [
            ev(a.0, a.1, claim_call(), acquired(5, 10)),
            ev(b.0, b.1, claim_call(), acquired(6, 10)),
        ];
        assert!(linearize(&h, &start, ctx).end.is_none(), "{h:?}");
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
    assert!(linearize(&overlap, &start, ctx).end.is_some());
    let too_early = [
        ev(1, 2, claim_call(), in_progress),
        ev(3, 4, claim_call(), acquired(5, 10)),
    ];
    assert!(linearize(&too_early, &start, ctx).end.is_none());
    // A stale lease write that took effect after a newer grant is a fencing violation.
    let stale = [
        ev(1, 2, claim_call(), acquired(9, 10)),
        ev(3, 4, Call::Fail { token: 5 }, Ret::Done),
    ];
    assert_eq!(fencing_violations(&stale).len(), 1);
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
    assert!(linearize(&good, &start, ctx).end.is_some());
    let bad = [
        ev(1, 2, claim_call(), acquired(5, 10)),
        ev(3, 4, complete, Ret::Done),
        ev(5, 6, claim_call(), replay(b"B")),
    ];
    assert!(linearize(&bad, &start, ctx).end.is_none());
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
