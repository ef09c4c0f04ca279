//! `reference_model`: random operation sequences (claim, complete, fail, extend, checkpoint,
//! forget, sweep, time passing and, except in memory, reopening) on the backend and on the
//! reference model of DESIGN §2 (`idemstore::testkit::model`, which `tests/model.rs` runs
//! against the file store). Every answer is compared with the model's, and after every
//! operation so is every record of the key space (`get` of two scopes × two keys).
//!
//! - **Time, memory and file**: a manual clock that the sequence moves; every timestamp is
//!   compared exactly.
//! - **Time, PostgreSQL and Redis**: the server's clock, which runs. The server is on this
//!   machine, so its clock is this one: each call is bracketed by the wall-clock times before
//!   and after it, and the model decides at a time inside that window. When the store shows
//!   its own time of the call (a claim's or an extension's lease end minus its length; the
//!   update time a `complete`, `fail` or `checkpoint` stamps, read back at once) the model
//!   decides at exactly that time, which must lie in the window; otherwise (answers that write
//!   nothing) at the window's start or at any lease end or expiry inside it, the only instants
//!   where the model's answer changes. Timestamps are therefore exact here too; only an
//!   in-progress answer's `retry_after` is compared within the window. Time passes by itself
//!   (a call takes about a millisecond) and in short sleeps; leases and retentions are short
//!   (tens to hundreds of milliseconds) or long (minutes), so leases end, records expire and
//!   both are taken over or started afresh.
//! - **Tokens**, as each backend promises them (README, "Choosing a backend"): increasing per
//!   key everywhere; strictly increasing across the store (reopens included) on memory and
//!   file; unique in the store on PostgreSQL and in the scope on Redis. The model holds the
//!   tokens the store granted and compares them in every record.
//! - **Sweeps**: Redis expires records by itself, so its sweep removes nothing; on PostgreSQL
//!   the limit covers the whole key space, because the order among records that expire in the
//!   same millisecond is the server's to choose.
//! - **Reopens**: the file store opens a new process epoch; a server backend connects a new
//!   instance under the same name, which ends the earlier owner. Either way the earlier
//!   owner's in-flight records are taken over at once.
//!
//! Deterministic seeds (one per sequence, printed with any divergence); the store's answers
//! can differ from run to run on a server, whose timing decides when leases end.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idemstore::testkit::model::{Expected, MRecord, MState, Model};
use idemstore::{
    AnyBackend, Claim, ClaimOptions, Clock, Error, IdempotencyBackend, Lease, ManualClock,
};

use crate::env::{Env, Kind};
use crate::support::rng::Rng;

/// Sequences per backend, and operations per sequence.
const SEQUENCES: u64 = 16;
const OPS: usize = 40;
const SCOPES: usize = 2;
const KEYS: usize = 2;
const FINGERPRINTS: [&[u8]; 3] = [b"fp-a", b"fp-b", b"fp-c"];
/// 2023-11-14T22:13:20Z: where the manual clock starts.
const T0_MS: u64 = 1_700_000_000_000;
/// The seed of sequence `n` is `SEED + n`.
const SEED: u64 = 0x5EED_0001;

/// Runs the sequences on one backend.
pub async fn reference_model(env: Env) {
    let manual = matches!(env.kind, Kind::Memory | Kind::File);
    let (mut env, time) = if manual {
        let clock = ManualClock::new(T0_MS);
        (env.with_manual_clock(clock.clone()), Time::Manual(clock))
    } else {
        (env, Time::Server)
    };
    let backend = env.open().await;
    let epoch = env.last_owner();
    let mut h = Harness {
        kind: env.kind,
        env,
        backend: Some(backend),
        time,
        model: Model::new(0, epoch),
        scopes: [Vec::new(), Vec::new()],
        leases: Vec::new(),
        tokens: Tokens::default(),
        stats: Stats::default(),
    };
    let started = std::time::Instant::now();
    for n in 0..SEQUENCES {
        let seed = SEED + n;
        if let Err(divergence) = h.sequence(n, seed).await {
            panic!("{:?}, sequence {n} (seed {seed:#x}): {divergence}", h.kind);
        }
    }
    eprintln!(
        "{:?}: {SEQUENCES} sequences of {OPS} operations in {:.1?}: {:?}",
        h.kind,
        started.elapsed(),
        h.stats
    );
    // Every kind of answer came up, or the sequences tested less than they claim.
    let s = &h.stats;
    assert!(
        s.acquired > 0 && s.takeovers > 0 && s.replays > 0 && s.in_progress > 0,
        "{s:?}"
    );
    assert!(
        s.mismatches > 0 && s.lease_lost > 0 && s.applied_writes > 0 && s.expired_reads > 0,
        "{s:?}"
    );
    assert_eq!(s.swept > 0, h.backend().capabilities().needs_sweep, "{s:?}");
}

// ----- operations -----

/// One step. Lease operations name a lease by an index into the leases the sequence obtained
/// so far (stale ones included), drawn when the step runs.
#[derive(Debug, Clone)]
enum Op {
    Claim {
        slot: Slot,
        fp: usize,
        lease_ms: u64,
        retention_ms: u64,
    },
    Complete {
        outcome: Vec<u8>,
        retention_ms: u64,
    },
    Fail,
    Extend {
        by_ms: u64,
    },
    Checkpoint {
        bytes: Vec<u8>,
    },
    Forget {
        slot: Slot,
    },
    Sweep {
        limit: usize,
    },
    Pass {
        ms: u64,
    },
    Reopen,
}

type Slot = (usize, usize);

/// The durations a sequence draws from: a manual clock takes any; a server's clock runs while
/// the sequence runs, so durations are short (to end during it) or long (to outlast it).
fn draw(rng: &mut Rng, kind: Kind) -> Op {
    let manual = matches!(kind, Kind::Memory | Kind::File);
    let long = |rng: &mut Rng| rng.chance(50);
    let slot = |rng: &mut Rng| (rng.index(SCOPES), rng.index(KEYS));
    // Weights: claim 6, complete 3, fail 2, extend 2, checkpoint 2, forget 1, sweep 1,
    // time 4 (manual) or 1 (server), reopen 1 (not in memory; rarer on a server).
    let roll = rng.index(if manual { 22 } else { 19 });
    match roll {
        0..=5 => {
            let fp = if rng.chance(80) { 0 } else { 1 + rng.index(2) };
            let (lease_ms, retention_ms) = if manual {
                (rng.range(1, 51), rng.range(50, 501))
            } else if long(rng) {
                (60_000, 120_000)
            } else {
                let lease_ms = rng.range(10, 61);
                let retention_ms = if long(rng) {
                    120_000
                } else {
                    rng.range(lease_ms + 50, lease_ms + 300)
                };
                (lease_ms, retention_ms)
            };
            Op::Claim {
                slot: slot(rng),
                fp,
                lease_ms,
                retention_ms,
            }
        }
        6..=8 => {
            let len = rng.index(4);
            let outcome = rng.bytes(len);
            let retention_ms = if manual {
                rng.range(1, 501)
            } else if long(rng) {
                120_000
            } else {
                rng.range(50, 301)
            };
            Op::Complete {
                outcome,
                retention_ms,
            }
        }
        9..=10 => Op::Fail,
        11..=12 => {
            let by_ms = if manual {
                rng.range(1, 201)
            } else if long(rng) {
                60_000
            } else {
                rng.range(30, 151)
            };
            Op::Extend { by_ms }
        }
        13..=14 => {
            let len = rng.index(4);
            Op::Checkpoint {
                bytes: rng.bytes(len),
            }
        }
        15 => Op::Forget { slot: slot(rng) },
        16 => {
            let limit = match kind {
                // The whole key space: the order of equal expiries is the server's choice.
                Kind::Postgres => [SCOPES * KEYS, 100][rng.index(2)],
                _ => rng.index(5),
            };
            Op::Sweep { limit }
        }
        17 if !manual => Op::Pass {
            ms: rng.range(10, 101),
        },
        18 if !manual => {
            // A reconnect costs tens of milliseconds: one in four draws reopens.
            if rng.chance(25) {
                Op::Reopen
            } else {
                Op::Pass { ms: 0 }
            }
        }
        17..=20 => Op::Pass {
            ms: if rng.chance(50) {
                rng.index(21) as u64
            } else {
                rng.index(301) as u64
            },
        },
        _ if kind == Kind::Memory => Op::Pass { ms: 0 },
        _ => Op::Reopen,
    }
}

// ----- time -----

/// Where the time of calls comes from.
enum Time {
    /// The clock of the memory and file stores: still unless moved.
    Manual(ManualClock),
    /// The server's clock, which is this machine's.
    Server,
}

impl Time {
    fn now_ms(&self) -> u64 {
        match self {
            Time::Manual(clock) => clock.now_ms(),
            Time::Server => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    async fn pass(&self, ms: u64) {
        match self {
            Time::Manual(clock) => clock.advance(Duration::from_millis(ms)),
            Time::Server => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }
}

/// The wall-clock times just before a call and just after its answer.
#[derive(Debug, Clone, Copy)]
struct Window {
    before: u64,
    after: u64,
}

// ----- the harness -----

/// Counts of what the sequences reached.
#[derive(Debug, Default)]
struct Stats {
    ops: usize,
    acquired: usize,
    takeovers: usize,
    replays: usize,
    in_progress: usize,
    mismatches: usize,
    lease_lost: usize,
    applied_writes: usize,
    forgotten: usize,
    swept: usize,
    reopens: usize,
    /// Reads that found a record absent because it expired (the model still holds it,
    /// unswept).
    expired_reads: usize,
}

/// The token promises of the backend under test.
#[derive(Debug, Default)]
struct Tokens {
    last_per_key: HashMap<(Vec<u8>, Vec<u8>), u64>,
    last_in_store: u64,
    /// (scope, token), the scope empty where tokens are unique in the whole store.
    seen: HashSet<(Vec<u8>, u64)>,
}

impl Tokens {
    fn granted(&mut self, kind: Kind, scope: &[u8], key: &[u8], token: u64) -> Result<(), String> {
        let id = (scope.to_vec(), key.to_vec());
        if let Some(&last) = self.last_per_key.get(&id)
            && token <= last
        {
            return Err(format!("token {token} after {last} on the same key"));
        }
        self.last_per_key.insert(id, token);
        if matches!(kind, Kind::Memory | Kind::File) && token <= self.last_in_store {
            return Err(format!(
                "token {token} after {} in the store: tokens must strictly increase",
                self.last_in_store
            ));
        }
        self.last_in_store = self.last_in_store.max(token);
        let unique_in = if kind == Kind::Redis { scope } else { b"" };
        if !self.seen.insert((unique_in.to_vec(), token)) {
            return Err(format!("token {token} granted twice"));
        }
        Ok(())
    }
}

struct Harness {
    kind: Kind,
    env: Env,
    /// The open handle (`None` only while it is reopened).
    backend: Option<AnyBackend>,
    time: Time,
    model: Model,
    /// The two scopes of the running sequence (new names per sequence).
    scopes: [Vec<u8>; SCOPES],
    /// Every lease the sequence obtained.
    leases: Vec<Lease>,
    tokens: Tokens,
    stats: Stats,
}

fn expect_eq<T: Debug + PartialEq>(what: &str, got: &T, want: &T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}:\n  store: {got:?}\n  model: {want:?}"))
    }
}

fn key_name(key: usize) -> Vec<u8> {
    format!("k{key}").into_bytes()
}

/// A lease write's answer: took effect (true) or lease lost (false); anything else is a
/// failure.
fn fenced(result: &idemstore::Result<()>, lease: &Lease) -> Result<bool, String> {
    match result {
        Ok(()) => Ok(true),
        Err(Error::LeaseLost { token }) if *token == lease.token() => Ok(false),
        Err(e) => Err(format!("expected Ok or LeaseLost, got {e} ({e:?})")),
    }
}

/// A claim's answer in the model's terms.
fn view(claim: &Claim) -> Result<Expected, String> {
    Ok(match claim {
        Claim::Acquired(lease) => Expected::Acquired {
            attempt: lease.attempt(),
            takeover: lease.is_takeover(),
            checkpoint: lease.checkpoint().map(<[u8]>::to_vec),
            lease_until: lease.lease_until_ms(),
        },
        Claim::Replay(r) => Expected::Replay {
            outcome: r.outcome.clone(),
            completed_at: r.completed_at_ms,
            attempt: r.attempt,
        },
        Claim::InProgress { retry_after } => Expected::InProgress {
            retry_after_ms: u64::try_from(retry_after.as_millis()).map_err(|e| e.to_string())?,
        },
        Claim::Mismatch => Expected::Mismatch,
        other => return Err(format!("unknown claim answer {other:?}")),
    })
}

impl Harness {
    async fn sequence(&mut self, n: u64, seed: u64) -> Result<(), String> {
        let mut rng = Rng::new(seed);
        self.scopes = [
            format!("m{n}-s0").into_bytes(),
            format!("m{n}-s1").into_bytes(),
        ];
        self.leases.clear();
        self.model = Model::new(self.time.now_ms(), self.env.last_owner());
        self.check_everything()
            .await
            .map_err(|e| format!("at the start: {e}"))?;
        for i in 0..OPS {
            let op = draw(&mut rng, self.kind);
            let pick = (rng.chance(50), rng.next_u64());
            self.step(&op, pick)
                .await
                .map_err(|e| format!("after op #{i} {op:?}: {e}"))?;
            self.check_everything()
                .await
                .map_err(|e| format!("after op #{i} {op:?}: {e}"))?;
            self.stats.ops += 1;
        }
        // Sweep what expired, then leave nothing behind: the next sequence's sweeps count
        // only its own records.
        let clear = std::iter::once(Op::Sweep { limit: 100 }).chain(
            (0..SCOPES)
                .flat_map(|scope| (0..KEYS).map(move |key| Op::Forget { slot: (scope, key) })),
        );
        for op in clear {
            self.step(&op, (false, 0))
                .await
                .map_err(|e| format!("clearing, {op:?}: {e}"))?;
        }
        Ok(())
    }

    fn backend(&self) -> &AnyBackend {
        self.backend
            .as_ref()
            .expect("a handle is open except while it is reopened")
    }

    fn name(&self, (scope, key): Slot) -> (Vec<u8>, Vec<u8>) {
        (self.scopes[scope].clone(), key_name(key))
    }

    /// A lease the sequence obtained: one of the latest three (likely still the owner) or any
    /// (likely stale).
    fn pick(&self, (recent, index): (bool, u64)) -> Option<usize> {
        let len = self.leases.len() as u64;
        if len == 0 {
            return None;
        }
        let i = if recent {
            let window = len.min(3);
            len - window + index % window
        } else {
            index % len
        };
        usize::try_from(i).ok()
    }

    /// The instants inside `window` where the model's answers can change: the lease ends and
    /// expiries of the live records.
    fn candidates(&mut self, w: Window, at: Option<u64>) -> Result<Vec<u64>, String> {
        if let Some(at) = at {
            if at < w.before || at > w.after {
                return Err(format!(
                    "the store's time of the call, {at}, is outside its window {w:?}"
                ));
            }
            return Ok(vec![at]);
        }
        self.model.now = w.before;
        let mut out = vec![w.before];
        for scope in 0..SCOPES {
            for key in 0..KEYS {
                let (s, k) = self.name((scope, key));
                if let Some(r) = self.model.live(&s, &k) {
                    out.push(r.expires);
                    if let MState::InFlight { lease_until, .. } = r.state {
                        out.push(lease_until);
                    }
                }
            }
        }
        out.retain(|&t| t >= w.before && t <= w.after);
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Runs `apply` on the model at a time the call may have run at (see the module docs) and
    /// keeps the first result that `check` accepts; `check` gets the model's answer and how
    /// far the call's real time may lie past the model's.
    fn decide<T: Debug>(
        &mut self,
        w: Window,
        at: Option<u64>,
        apply: impl Fn(&mut Model) -> T,
        check: impl Fn(&T, u64) -> Result<(), String>,
    ) -> Result<T, String> {
        let mut first = None;
        for now in self.candidates(w, at)? {
            let mut model = self.model.clone();
            model.now = now;
            let want = apply(&mut model);
            match check(&want, w.after - now) {
                Ok(()) => {
                    self.model = model;
                    return Ok(want);
                }
                Err(e) => {
                    first.get_or_insert(format!("{e}\n  (model time {now}, window {w:?})"));
                }
            }
        }
        Err(first.unwrap_or_else(|| "no time to decide at".to_owned()))
    }

    async fn step(&mut self, op: &Op, pick: (bool, u64)) -> Result<(), String> {
        match op {
            Op::Claim {
                slot,
                fp,
                lease_ms,
                retention_ms,
            } => self.claim(*slot, *fp, *lease_ms, *retention_ms).await,
            Op::Complete {
                outcome,
                retention_ms,
            } => {
                let Some(i) = self.pick(pick) else {
                    return Ok(());
                };
                let lease = self.leases[i].clone();
                let retention = Duration::from_millis(*retention_ms);
                let (r, w) = self
                    .timed(|b| async move { b.complete(&lease, outcome, retention).await })
                    .await;
                let lease = self.leases[i].clone();
                let got = fenced(&r, &lease)?;
                self.lease_write(lease, got, w, |m, l| {
                    m.complete(l.scope(), l.key(), l.token(), outcome, *retention_ms)
                })
                .await
            }
            Op::Fail => {
                let Some(i) = self.pick(pick) else {
                    return Ok(());
                };
                let lease = self.leases[i].clone();
                let (r, w) = self.timed(|b| async move { b.fail(&lease).await }).await;
                let lease = self.leases[i].clone();
                let got = fenced(&r, &lease)?;
                self.lease_write(lease, got, w, |m, l| m.fail(l.scope(), l.key(), l.token()))
                    .await
            }
            Op::Checkpoint { bytes } => {
                let Some(i) = self.pick(pick) else {
                    return Ok(());
                };
                let lease = self.leases[i].clone();
                let (r, w) = self
                    .timed(|b| async move { b.checkpoint(&lease, bytes).await })
                    .await;
                let lease = self.leases[i].clone();
                let got = fenced(&r, &lease)?;
                self.lease_write(lease, got, w, |m, l| {
                    m.checkpoint(l.scope(), l.key(), l.token(), bytes)
                })
                .await
            }
            Op::Extend { by_ms } => {
                let Some(i) = self.pick(pick) else {
                    return Ok(());
                };
                let mut lease = self.leases[i].clone();
                let by = Duration::from_millis(*by_ms);
                let (r, w) = self
                    .timed(|b| async move {
                        let r = b.extend(&mut lease, by).await;
                        (r, lease)
                    })
                    .await;
                let (r, extended) = r;
                let got = fenced(&r, &extended)?;
                // The store's time of the call: the new lease end minus the extension.
                let at = got.then(|| extended.lease_until_ms().saturating_sub(*by_ms));
                let old = &self.leases[i];
                let (s, k, token) = (old.scope().to_vec(), old.key().to_vec(), old.token());
                let old_until = old.lease_until_ms();
                let until = extended.lease_until_ms();
                let want = self.decide(
                    w,
                    at,
                    |m| m.extend(&s, &k, token, *by_ms),
                    |want, _| {
                        expect_eq("extend took effect", &got, &want.is_some())?;
                        match want {
                            Some(w) => expect_eq("extended lease end", &until, w),
                            None => {
                                expect_eq("a refused extend leaves the lease", &until, &old_until)
                            }
                        }
                    },
                )?;
                self.count_write(want.is_some());
                self.leases[i] = extended;
                Ok(())
            }
            Op::Forget { slot } => {
                let (s, k) = self.name(*slot);
                let (r, w) = self
                    .timed(|b| {
                        let (s, k) = (s.clone(), k.clone());
                        async move { b.forget(&s, &k).await }
                    })
                    .await;
                let got = r.map_err(|e| format!("forget: {e} ({e:?})"))?;
                let live = self.decide(
                    w,
                    None,
                    |m| m.forget(&s, &k),
                    |want, _| expect_eq("forget found a live record", &got, want),
                )?;
                self.stats.forgotten += usize::from(live);
                Ok(())
            }
            Op::Sweep { limit } => {
                let limit = *limit;
                let (r, w) = self.timed(|b| async move { b.sweep(limit).await }).await;
                let got = r.map_err(|e| format!("sweep: {e} ({e:?})"))?.removed;
                let frees_itself = !self.backend().capabilities().needs_sweep;
                let removed = self.decide(
                    w,
                    None,
                    |m| {
                        if frees_itself {
                            // The store removed them itself; its sweep has nothing to do.
                            m.sweep(usize::MAX);
                            0
                        } else {
                            m.sweep(limit)
                        }
                    },
                    |want, _| expect_eq("records swept", &got, want),
                )?;
                self.stats.swept += removed;
                Ok(())
            }
            Op::Pass { ms } => {
                self.time.pass(*ms).await;
                Ok(())
            }
            Op::Reopen => {
                let old = self.env.last_owner();
                let backend = self.backend.take().ok_or("no open handle")?;
                self.backend = Some(self.env.restart(backend).await);
                let new = self.env.last_owner();
                if new <= old {
                    return Err(format!("reopened under owner {new}, not after {old}"));
                }
                self.model.epoch = new;
                self.stats.reopens += 1;
                Ok(())
            }
        }
    }

    /// Runs `call` between two readings of the clock.
    async fn timed<T, F, Fut>(&self, call: F) -> (T, Window)
    where
        F: FnOnce(AnyBackend) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let before = self.time.now_ms();
        let r = call(self.backend().clone()).await;
        let after = self.time.now_ms();
        (r, Window { before, after })
    }

    async fn claim(
        &mut self,
        slot: Slot,
        fp: usize,
        lease_ms: u64,
        retention_ms: u64,
    ) -> Result<(), String> {
        let (s, k) = self.name(slot);
        let options = ClaimOptions::default()
            .lease(Duration::from_millis(lease_ms))
            .retention(Duration::from_millis(retention_ms));
        let (r, w) = self
            .timed(|b| {
                let (s, k) = (s.clone(), k.clone());
                async move { b.claim(&s, &k, FINGERPRINTS[fp], &options).await }
            })
            .await;
        let got = r.map_err(|e| format!("claim: {e} ({e:?})"))?;
        let seen = view(&got)?;
        // An acquisition shows the store's time of the call: its lease end minus its length.
        let at = match &got {
            Claim::Acquired(lease) => {
                expect_eq("lease scope", &lease.scope(), &&s[..])?;
                expect_eq("lease key", &lease.key(), &&k[..])?;
                Some(lease.lease_until_ms().saturating_sub(lease_ms))
            }
            _ => None,
        };
        let want = self.decide(
            w,
            at,
            |m| m.claim(&s, &k, FINGERPRINTS[fp], lease_ms, retention_ms),
            |want, slack| match (&seen, want) {
                // The server's time of the answer lies up to `slack` past the model's.
                (
                    Expected::InProgress { retry_after_ms: r },
                    Expected::InProgress { retry_after_ms: m },
                ) if *r <= *m && *r + slack >= *m => Ok(()),
                _ => expect_eq("claim answer", &seen, want),
            },
        )?;
        match want {
            Expected::Acquired { takeover, .. } => {
                self.stats.acquired += 1;
                self.stats.takeovers += usize::from(takeover);
            }
            Expected::Replay { .. } => self.stats.replays += 1,
            Expected::InProgress { .. } => self.stats.in_progress += 1,
            Expected::Mismatch => self.stats.mismatches += 1,
        }
        if let Claim::Acquired(lease) = got {
            self.tokens.granted(self.kind, &s, &k, lease.token())?;
            self.model.grant(&s, &k, lease.token());
            self.leases.push(lease);
        }
        Ok(())
    }

    /// Checks a `complete`, `fail` or `checkpoint` of `lease` that took effect (`got`) or
    /// not. One that took effect stamped the record with the store's time of the call, which
    /// a read right after shows.
    async fn lease_write(
        &mut self,
        lease: Lease,
        got: bool,
        w: Window,
        apply: impl Fn(&mut Model, &Lease) -> bool,
    ) -> Result<(), String> {
        let at = if got {
            let record = self
                .backend()
                .get(lease.scope(), lease.key())
                .await
                .map_err(|e| format!("get: {e} ({e:?})"))?;
            record.map(|r| r.updated_at_ms)
        } else {
            None
        };
        let took = self.decide(
            w,
            at,
            |m| apply(m, &lease),
            |want, _| expect_eq("the write took effect", &got, want),
        )?;
        self.count_write(took);
        Ok(())
    }

    fn count_write(&mut self, took_effect: bool) {
        if took_effect {
            self.stats.applied_writes += 1;
        } else {
            self.stats.lease_lost += 1;
        }
    }

    /// Every record of the key space against the model.
    async fn check_everything(&mut self) -> Result<(), String> {
        for scope in 0..SCOPES {
            for key in 0..KEYS {
                let (s, k) = self.name((scope, key));
                let (r, w) = self
                    .timed(|b| {
                        let (s, k) = (s.clone(), k.clone());
                        async move { b.get(&s, &k).await }
                    })
                    .await;
                let got = r
                    .map_err(|e| format!("get: {e} ({e:?})"))?
                    .as_ref()
                    .map(MRecord::of);
                let what = format!(
                    "get({}, {})",
                    String::from_utf8_lossy(&s),
                    String::from_utf8_lossy(&k)
                );
                let want = self.decide(
                    w,
                    None,
                    |m| m.live(&s, &k).cloned(),
                    |want, _| expect_eq(&what, &got, want),
                )?;
                if want.is_none() && self.model.held(&s, &k).is_some() {
                    self.stats.expired_reads += 1;
                }
            }
        }
        Ok(())
    }
}
