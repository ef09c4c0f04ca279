//! Real process death: the test binary re-runs itself as a child process (`crash_child`) that
//! drives a file store hard from 4 threads — claims, checkpoints, extends, completions,
//! failures, stale-lease writes, on overlapping keys — and prints one `ACK` line (flushed) after
//! each operation *returned* successfully. The parent kills it with SIGKILL at a random moment,
//! reopens the store (timing the recovery) and checks, cycle after cycle:
//!
//! - every acknowledged completion is there with identical outcome bytes, and no request ran
//!   again after its completion (completions are final here: nothing is forgotten, retention is
//!   long); an outcome replayed to a duplicate is the acknowledged one;
//! - every other acknowledged transition is there (acquisitions, checkpoints — handed over on
//!   takeover —, extensions, failures); every record reads back (no corruption);
//! - fencing: tokens acquired after a restart are above every token acknowledged before it, no
//!   token is granted twice, a stale lease is never accepted, and a completion acknowledged with
//!   token T left the outcome written by T;
//! - the dead process's in-flight records are listed by `orphans()` and taken over at once
//!   (`Acquired` with `is_takeover()`, the last checkpoint handed over).
//!
//! Default: 200 kill cycles. `IDEMSTORE_LONG=1`: 2000 cycles; `IDEMSTORE_CRASH_CYCLES=n` and
//! `IDEMSTORE_SEED=s` override the count and the seed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idemstore::{Claim, ClaimOptions, Error, Lease, ReadOnlyStore, RecordState, Store};
use support::rng::Rng;

const CHILD_DB_ENV: &str = "IDEMSTORE_CRASH_CHILD_DB";
const CHILD_SEED_ENV: &str = "IDEMSTORE_CRASH_CHILD_SEED";
const CHILD_CYCLE_ENV: &str = "IDEMSTORE_CRASH_CHILD_CYCLE";
const CHILD_CREATE_DIR_ENV: &str = "IDEMSTORE_CRASH_CHILD_CREATE_DIR";
/// The name ending of databases the child opens with a write-ahead log.
const WAL_SUFFIX: &str = "-wal.redb";
const SCOPE: &str = "crash";
const GLOBAL_KEYS: u64 = 48;
const LOCAL_KEYS: u64 = 24;
const THREADS: u64 = 4;
const LEASE: Duration = Duration::from_secs(3_600);
const RETENTION: Duration = Duration::from_secs(20 * 86_400);
/// The child stops on its own after this long if nobody kills it.
const CHILD_MAX_RUN: Duration = Duration::from_secs(10);

fn options() -> ClaimOptions {
    ClaimOptions::default().lease(LEASE).retention(RETENTION)
}

fn fingerprint(key: &str) -> Vec<u8> {
    format!("fp:{key}").into_bytes()
}

/// Outcome bytes that name the token that wrote them and can be checked byte for byte.
fn outcome_bytes(token: u64, nonce: u64, len: u64) -> Vec<u8> {
    let mut out = format!("T{token}:N{nonce}:L{len}:").into_bytes();
    out.extend(Rng::new(token ^ nonce.rotate_left(17)).bytes(len as usize));
    out
}

/// `(token, nonce, len)` of bytes made by [`outcome_bytes`], or `None` if they are not exactly
/// such bytes.
fn parse_outcome(bytes: &[u8]) -> Option<(u64, u64, u64)> {
    let mut fields = bytes.splitn(4, |&b| b == b':');
    let mut num = |prefix: u8| -> Option<u64> {
        let f = fields.next()?;
        let (&p, digits) = f.split_first()?;
        if p != prefix {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    let (token, nonce, len) = (num(b'T')?, num(b'N')?, num(b'L')?);
    (len < 1 << 24 && outcome_bytes(token, nonce, len) == bytes).then_some((token, nonce, len))
}

fn checkpoint_bytes(token: u64, seq: u64) -> Vec<u8> {
    format!("cp:{token}:{seq}").into_bytes()
}

fn parse_checkpoint(bytes: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(bytes).ok()?;
    let mut parts = s.strip_prefix("cp:")?.split(':');
    let token = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some((token, seq))
}

fn checkpoint_field(cp: Option<&[u8]>) -> String {
    match cp {
        None => "-".into(),
        Some(b) => match parse_checkpoint(b) {
            Some((t, s)) => format!("{t}.{s}"),
            None => "?".into(),
        },
    }
}

// ----- the child -----

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The child process: runs only when the parent set its environment; a no-op test otherwise.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_DB_ENV) else {
        return;
    };
    let seed = support::env_u64(CHILD_SEED_ENV, 0);
    let cycle = support::env_u64(CHILD_CYCLE_ENV, 0);
    let builder = Store::builder().sweep_interval(None);
    // A database named `*-wal.redb` runs with a write-ahead log, checkpointed every 20 ms into
    // small recycled segments, so that kills land during checkpoints and recycling too.
    let builder = if path.ends_with(WAL_SUFFIX) {
        builder
            .write_ahead_log(true)
            .checkpoint_interval(Duration::from_millis(20))
            .wal_segment_bytes(idemstore::WAL_SEGMENT_BYTES_MIN)
            .wal_segments(3)
    } else {
        builder
    };
    let store = match builder.open(&path) {
        Ok(store) => Arc::new(store),
        Err(e) => {
            emit(&format!("ERR open {e}"));
            return;
        }
    };
    emit(&format!("OPEN {}", store.epoch()));
    let stop_at = Instant::now() + CHILD_MAX_RUN;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || child_worker(&store, seed, t, cycle, stop_at))
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
}

fn child_worker(store: &Store, seed: u64, thread: u64, cycle: u64, stop_at: Instant) {
    let mut rng = Rng::new(seed.wrapping_mul(0x1_0000_0001).wrapping_add(thread));
    let mut stale: Vec<Lease> = Vec::new();
    while Instant::now() < stop_at {
        if !stale.is_empty() && rng.chance(8) {
            stale_write(store, &mut rng, &stale);
            continue;
        }
        // Overlapping keys: a shared pool across all cycles, this cycle's own pool, and the
        // previous cycle's (whose orphans this process may take over itself).
        let key = match rng.below(100) {
            0..=44 => format!("g{}", rng.below(GLOBAL_KEYS)),
            45..=84 => format!("c{cycle}-{}", rng.below(LOCAL_KEYS)),
            _ => format!("c{}-{}", cycle.saturating_sub(1), rng.below(LOCAL_KEYS)),
        };
        match store.claim(SCOPE, &key, fingerprint(&key), &options()) {
            Ok(Claim::Acquired(lease)) => {
                emit(&format!(
                    "ACK acquire {key} {} {} {} {}",
                    lease.token(),
                    lease.attempt(),
                    u8::from(lease.is_takeover()),
                    checkpoint_field(lease.checkpoint())
                ));
                run_lease(store, &key, lease, &mut rng, &mut stale);
            }
            Ok(Claim::Replay(replay)) => match parse_outcome(&replay.outcome) {
                Some((t, n, l)) => emit(&format!("REPLAY {key} {t} {n} {l}")),
                None => emit(&format!(
                    "VIOLATION replay of {key} is not an outcome we wrote"
                )),
            },
            Ok(_) => {}
            Err(e) => emit(&format!("ERR claim {key}: {e}")),
        }
    }
}

fn run_lease(store: &Store, key: &str, mut lease: Lease, rng: &mut Rng, stale: &mut Vec<Lease>) {
    let token = lease.token();
    for seq in 1..=rng.below(3) {
        match store.checkpoint(&lease, &checkpoint_bytes(token, seq)) {
            Ok(()) => emit(&format!("ACK checkpoint {key} {token} {seq}")),
            Err(e) => return emit(&format!("ERR checkpoint {key} {token}: {e}")),
        }
    }
    if rng.chance(30) {
        match store.extend(&mut lease, LEASE) {
            Ok(()) => emit(&format!(
                "ACK extend {key} {token} {}",
                lease.lease_until_ms()
            )),
            Err(e) => return emit(&format!("ERR extend {key} {token}: {e}")),
        }
    }
    match rng.below(100) {
        0..=49 => {
            let nonce = rng.next_u64() >> 1;
            let len = match rng.below(100) {
                0..=84 => rng.below(400),
                85..=96 => rng.range(400, 3_000),
                _ => rng.range(5_000, 20_000),
            };
            match store.complete(&lease, &outcome_bytes(token, nonce, len), RETENTION) {
                Ok(()) => emit(&format!("ACK complete {key} {token} {nonce} {len}")),
                Err(e) => emit(&format!("ERR complete {key} {token}: {e}")),
            }
            stale.push(lease);
        }
        50..=79 => {
            match store.fail(&lease) {
                Ok(()) => emit(&format!("ACK fail {key} {token}")),
                Err(e) => emit(&format!("ERR fail {key} {token}: {e}")),
            }
            stale.push(lease);
        }
        // Abandoned in flight: an orphan once this process dies.
        _ => {}
    }
}

/// A write with a lease that completed or failed: it must be rejected and change nothing.
fn stale_write(store: &Store, rng: &mut Rng, stale: &[Lease]) {
    let mut lease = stale[rng.below(stale.len() as u64) as usize].clone();
    let token = lease.token();
    let key = String::from_utf8_lossy(lease.key()).into_owned();
    let (what, result) = match rng.below(4) {
        0 => ("complete", store.complete(&lease, b"stale!", RETENTION)),
        1 => ("checkpoint", store.checkpoint(&lease, b"stale!")),
        2 => ("extend", store.extend(&mut lease, LEASE)),
        _ => ("fail", store.fail(&lease)),
    };
    match result {
        Err(Error::LeaseLost { .. }) => emit(&format!("STALE {what} {key} {token}")),
        Ok(()) => emit(&format!(
            "VIOLATION stale {what} of {key} with token {token} was accepted"
        )),
        Err(e) => emit(&format!("ERR stale {what} {key} {token}: {e}")),
    }
}

/// The second child: creates databases `db-0`, `db-1`, ... in a directory, one after the other,
/// until killed, so that the kill lands inside the creation of a new file.
#[test]
fn crash_child_creating() {
    let Ok(dir) = std::env::var(CHILD_CREATE_DIR_ENV) else {
        return;
    };
    for i in 0.. {
        let path = std::path::Path::new(&dir).join(format!("db-{i}"));
        match Store::builder().sweep_interval(None).open(&path) {
            Ok(store) => drop(store),
            Err(e) => return emit(&format!("ERR open {}: {e}", path.display())),
        }
    }
}

// ----- the parent -----

/// What has been acknowledged about one key, over all cycles.
#[derive(Debug, Default)]
struct KeyModel {
    /// `(token, nonce, len)` of the completion: acknowledged, replayed or found after reopen.
    completed: Option<(u64, u64, u64)>,
    max_token: u64,
    max_attempt: u32,
    failed_tokens: BTreeSet<u64>,
    max_checkpoint: Option<(u64, u64)>,
    extended_until: BTreeMap<u64, u64>,
}

#[derive(Debug, Default)]
struct Model {
    keys: BTreeMap<String, KeyModel>,
    /// Every token acknowledged so far (acquisitions by children and by the parent).
    tokens: BTreeSet<u64>,
    max_token: u64,
    violations: Vec<String>,
}

#[derive(Debug, Default)]
struct Counters {
    acks: u64,
    acquires: u64,
    completes: u64,
    fails: u64,
    checkpoints: u64,
    extends: u64,
    replays: u64,
    stale_rejected: u64,
    child_takeovers: u64,
    parent_takeovers: u64,
    cycles_without_acks: u64,
    records_checked: u64,
    /// Killed stores read by the read-only view and compared with the store's own recovery.
    views_compared: u64,
    /// Log batches those views replayed (write-ahead log only).
    view_log_batches: u64,
}

impl Model {
    fn violation(&mut self, cycle: u64, what: String) {
        if self.violations.len() < 50 {
            self.violations.push(format!("cycle {cycle}: {what}"));
        }
    }

    fn key(&mut self, key: &str) -> &mut KeyModel {
        self.keys.entry(key.to_string()).or_default()
    }

    fn acquired(&mut self, cycle: u64, key: &str, token: u64, attempt: u32, base: u64) {
        if token <= base {
            self.violation(
                cycle,
                format!(
                    "{key}: token {token} is not above {base}, acknowledged before the restart"
                ),
            );
        }
        if !self.tokens.insert(token) {
            self.violation(cycle, format!("{key}: token {token} granted twice"));
        }
        let km = self.key(key);
        let bad_attempt = attempt <= km.max_attempt;
        let previous_attempt = km.max_attempt;
        km.max_token = km.max_token.max(token);
        km.max_attempt = km.max_attempt.max(attempt);
        self.max_token = self.max_token.max(token);
        if bad_attempt {
            self.violation(
                cycle,
                format!("{key}: attempt {attempt} after attempt {previous_attempt}"),
            );
        }
    }

    fn completed(&mut self, cycle: u64, key: &str, done: (u64, u64, u64), how: &str) {
        let km = self.key(key);
        match km.completed {
            None => km.completed = Some(done),
            Some(known) if known == done => {}
            Some(known) => {
                self.violation(
                    cycle,
                    format!("{key}: {how} {done:?} but the completion was {known:?}"),
                );
            }
        }
    }
}

fn num<T: std::str::FromStr>(field: Option<&str>) -> Option<T> {
    field?.parse().ok()
}

/// Applies the child's lines of one cycle to the model.
fn absorb(model: &mut Model, counters: &mut Counters, cycle: u64, base: u64, lines: &[String]) {
    let mut acks = 0;
    for line in lines {
        let mut f = line.split(' ');
        let (kind, op) = (f.next(), f.next());
        let parsed: Option<()> = (|| {
            match (kind?, op?) {
                ("ACK", "acquire") => {
                    let key = f.next()?;
                    let token: u64 = num(f.next())?;
                    let attempt: u32 = num(f.next())?;
                    let takeover = f.next()? == "1";
                    let handed = f.next()?;
                    model.acquired(cycle, key, token, attempt, base);
                    counters.acquires += 1;
                    counters.child_takeovers += u64::from(takeover);
                    // The last acknowledged checkpoint is handed over with the record.
                    if let Some((t, s)) = model.key(key).max_checkpoint {
                        let got = handed.split_once('.').and_then(|(a, b)| {
                            Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
                        });
                        if got.is_none_or(|g| g < (t, s)) {
                            model.violation(
                                cycle,
                                format!("{key}: token {token} was handed checkpoint {handed}, the last acknowledged is {t}.{s}"),
                            );
                        }
                    }
                }
                ("ACK", "complete") => {
                    let key = f.next()?;
                    let done = (num(f.next())?, num(f.next())?, num(f.next())?);
                    model.completed(cycle, key, done, "acknowledged completion");
                    counters.completes += 1;
                }
                ("ACK", "fail") => {
                    let key = f.next()?;
                    let token = num(f.next())?;
                    model.key(key).failed_tokens.insert(token);
                    counters.fails += 1;
                }
                ("ACK", "checkpoint") => {
                    let key = f.next()?;
                    let cp = (num(f.next())?, num(f.next())?);
                    let km = model.key(key);
                    km.max_checkpoint = km.max_checkpoint.max(Some(cp));
                    counters.checkpoints += 1;
                }
                ("ACK", "extend") => {
                    let key = f.next()?;
                    let token = num(f.next())?;
                    let until: u64 = num(f.next())?;
                    let e = model.key(key).extended_until.entry(token).or_default();
                    *e = (*e).max(until);
                    counters.extends += 1;
                }
                ("REPLAY", key) => {
                    let done = (num(f.next())?, num(f.next())?, num(f.next())?);
                    model.completed(cycle, key, done, "replayed");
                    counters.replays += 1;
                    return Some(());
                }
                ("STALE", _) => {
                    counters.stale_rejected += 1;
                    return Some(());
                }
                ("OPEN", _) => return Some(()),
                ("VIOLATION" | "ERR", _) => {
                    model.violation(cycle, format!("child: {line}"));
                    return Some(());
                }
                _ => return None,
            }
            acks += 1;
            Some(())
        })();
        if parsed.is_none() && (line.starts_with("ACK") || line.starts_with("REPLAY")) {
            model.violation(cycle, format!("unparsable line {line:?}"));
        }
    }
    counters.acks += acks;
    if acks == 0 {
        counters.cycles_without_acks += 1;
    }
    // A completed request never runs again: no acquisition above the completing token.
    let reruns: Vec<String> = model
        .keys
        .iter()
        .filter_map(|(key, km)| {
            let (t, ..) = km.completed?;
            (km.max_token > t).then(|| {
                format!(
                    "{key}: acquired with token {} after completing with {t}",
                    km.max_token
                )
            })
        })
        .collect();
    for r in reruns {
        model.violation(cycle, r);
    }
}

/// Checks one key of the reopened store against the model.
fn check_key(store: &Store, model: &mut Model, cycle: u64, key: &str) -> Option<u64> {
    let record = match store.get(SCOPE, key) {
        Ok(r) => r,
        Err(e) => {
            model.violation(cycle, format!("{key}: does not read back: {e}"));
            return None;
        }
    };
    let km = model.key(key);
    let (completed, max_token) = (km.completed, km.max_token);
    let failed = km.failed_tokens.clone();
    let max_cp = km.max_checkpoint;
    let extended = km.extended_until.clone();
    let Some(record) = record else {
        if completed.is_some() || max_token > 0 {
            model.violation(cycle, format!("{key}: acknowledged record is gone"));
        }
        return None;
    };
    let mut durable_token = None;
    let cp_ok = |cp: &Option<Vec<u8>>| match (max_cp, cp) {
        (None, _) => true,
        (Some(want), Some(b)) => parse_checkpoint(b).is_some_and(|got| got >= want),
        (Some(_), None) => false,
    };
    match &record.state {
        RecordState::Completed { outcome } => match (completed, parse_outcome(outcome)) {
            (Some(want), Some(got)) if want == got => {}
            (None, Some(got)) if got.0 >= max_token => {
                // Completed by an operation whose acknowledgement the kill cut off: durable
                // now, so it must stay.
                model.completed(cycle, key, got, "found after reopen");
            }
            (want, got) => model.violation(
                cycle,
                format!(
                    "{key}: completed with {got:?}, acknowledged {want:?} (max token {max_token})"
                ),
            ),
        },
        _ if completed.is_some() => {
            model.violation(
                cycle,
                format!("{key}: acknowledged completion {completed:?} lost: {record:?}"),
            );
        }
        RecordState::InFlight {
            token,
            lease_until_ms,
            checkpoint,
            ..
        } => {
            durable_token = Some(*token);
            if *token < max_token
                || (*token == max_token && failed.contains(token))
                || extended.get(token).is_some_and(|u| lease_until_ms < u)
                || !cp_ok(checkpoint)
            {
                model.violation(
                    cycle,
                    format!(
                        "{key}: in flight {record:?} but acknowledged: max token {max_token}, failed \
                         {failed:?}, extended {extended:?}, checkpoint {max_cp:?}"
                    ),
                );
            }
        }
        RecordState::Failed { checkpoint } => {
            if !cp_ok(checkpoint) {
                model.violation(
                    cycle,
                    format!("{key}: failed record lost checkpoint {max_cp:?}: {record:?}"),
                );
            }
        }
        _ => model.violation(cycle, format!("{key}: unknown state {record:?}")),
    }
    durable_token
}

fn spawn_child(db: &std::path::Path, seed: u64, cycle: u64) -> std::process::Child {
    let exe = std::env::current_exe().expect("the test binary's path");
    Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB_ENV, db)
        .env(CHILD_SEED_ENV, seed.to_string())
        .env(CHILD_CYCLE_ENV, cycle.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child test process")
}

/// Complete lines only: a line cut by the kill has no newline and is dropped.
fn read_lines(out: impl Read) -> Vec<String> {
    let mut reader = BufReader::new(out);
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) if buf.ends_with(b"\n") => {
                lines.push(String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned());
            }
            Ok(_) => break,
        }
    }
    lines
}

/// The parent's own work after a reopen: take over an orphan (or claim the probe key) and
/// complete or fail it. Run concurrently, so the writer group-commits them.
struct Plan {
    key: String,
    /// The orphan's checkpoint, which the takeover must receive; `None` for the probe.
    orphan_checkpoint: Option<Option<Vec<u8>>>,
    /// `Some((nonce, len))`: complete with that outcome; `None`: fail.
    complete: Option<(u64, u64)>,
}

#[derive(Debug, Default)]
struct Stats {
    counters: Counters,
    /// Recovery time and database size before the open, per cycle.
    recovery: Vec<(Duration, u64)>,
    slept: Duration,
    verifying: Duration,
    generations: Vec<String>,
}

fn one_cycle(
    db: &std::path::Path,
    seed: u64,
    cycle: u64,
    full: bool,
    rng: &mut Rng,
    model: &mut Model,
    stats: &mut Stats,
) {
    let base = model.max_token;
    let mut child = spawn_child(db, seed.wrapping_add(cycle), cycle);
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || read_lines(stdout));
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let delay = Duration::from_millis(rng.range(5, 200));
    std::thread::sleep(delay);
    stats.slept += delay;
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    let lines = out_reader.join().expect("stdout reader");
    let errors = err_reader.join().expect("stderr reader");
    if status.success() || errors.contains("panicked") {
        model.violation(
            cycle,
            format!("the child was not killed ({status}): {errors}"),
        );
    }
    absorb(model, &mut stats.counters, cycle, base, &lines);

    // First the read-only view of the killed store, now and then (after every kill with a
    // log, which it replays in memory): it must see exactly what the store opened for writing
    // sees next.
    let with_log = db.to_string_lossy().ends_with(WAL_SUFFIX);
    // A child killed before it made its database leaves no file, or one without tables: the
    // view refuses those, and the store then creates (or initialises) an empty one.
    let view = (full || with_log).then(|| match ReadOnlyStore::open(db) {
        Ok(view) => {
            let mut records = BTreeMap::new();
            view.scan(None, |entry| {
                records.insert((entry.scope, entry.key), entry.record.ok());
                true
            })
            .expect("scan the view");
            Some((view.summary().expect("view summary"), records))
        }
        Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(Error::NotAnIdemstoreFile { .. }) => None,
        Err(e) => panic!("cycle {cycle}: read-only open after SIGKILL: {e:?}"),
    });

    // Recovery: reopen after the kill, timed.
    let verify_started = Instant::now();
    let size = std::fs::metadata(db).map(|m| m.len()).unwrap_or(0);
    let store = match Store::builder().sweep_interval(None).open(db) {
        Ok(store) => store,
        Err(e) => panic!("cycle {cycle}: reopen after SIGKILL failed: {e:?}"),
    };
    stats.recovery.push((verify_started.elapsed(), size));
    if let Some(None) = view {
        let records = store.stats().expect("stats").records;
        if records != 0 {
            model.violation(
                cycle,
                format!("the read-only view found no store, the store {records} records"),
            );
        }
    }
    if let Some(Some((summary, records))) = view {
        stats.counters.views_compared += 1;
        stats.counters.view_log_batches += summary.log_batches;
        let store_stats = store.stats().expect("stats");
        if (summary.records, summary.next_token) != (store_stats.records, store_stats.next_token) {
            model.violation(
                cycle,
                format!(
                    "the read-only view saw {} records and next token {}, the store {} and {}",
                    summary.records,
                    summary.next_token,
                    store_stats.records,
                    store_stats.next_token
                ),
            );
        }
        for ((scope, key), record) in records {
            let stored = store.get(&scope, &key).ok().flatten();
            if record.is_none() || stored != record {
                model.violation(
                    cycle,
                    format!(
                        "{}: the read-only view read {record:?}, the store {stored:?}",
                        String::from_utf8_lossy(&key)
                    ),
                );
            }
        }
    }

    // Which keys to check: all of them now and then, else the ones in play this cycle.
    let keys: Vec<String> = if full {
        model.keys.keys().cloned().collect()
    } else {
        let mut keys: BTreeSet<String> = (0..GLOBAL_KEYS).map(|i| format!("g{i}")).collect();
        for c in [cycle.saturating_sub(1), cycle] {
            keys.extend((0..LOCAL_KEYS).map(|i| format!("c{c}-{i}")));
        }
        keys.into_iter().collect()
    };
    let mut in_flight = BTreeSet::new();
    let mut max_durable = model.max_token;
    for key in &keys {
        stats.counters.records_checked += 1;
        if let Some(t) = check_key(&store, model, cycle, key) {
            in_flight.insert(key.clone());
            max_durable = max_durable.max(t);
        }
    }

    // The dead process's in-flight records are orphans, and can be taken over at once.
    let orphans = store.orphans(usize::MAX).expect("orphans");
    let orphan_keys: BTreeSet<String> = orphans
        .iter()
        .map(|o| String::from_utf8_lossy(&o.key).into_owned())
        .collect();
    for key in in_flight.difference(&orphan_keys) {
        model.violation(
            cycle,
            format!("{key}: in flight after the crash but not an orphan"),
        );
    }
    let mut plans = Vec::new();
    for o in &orphans {
        let key = String::from_utf8_lossy(&o.key).into_owned();
        let RecordState::InFlight {
            epoch, checkpoint, ..
        } = &o.record.state
        else {
            model.violation(cycle, format!("{key}: orphan not in flight"));
            continue;
        };
        if *epoch >= store.epoch() {
            model.violation(cycle, format!("{key}: orphan of the live epoch"));
        }
        // Leave some for the next child to take over itself.
        if rng.chance(30) {
            continue;
        }
        plans.push(Plan {
            key,
            orphan_checkpoint: Some(checkpoint.clone()),
            complete: rng
                .chance(60)
                .then(|| (rng.next_u64() >> 1, rng.below(300))),
        });
    }
    // And a fresh key: its acquisition after the restart is above every token seen before.
    plans.push(Plan {
        key: format!("probe-{cycle}"),
        orphan_checkpoint: None,
        complete: Some((cycle, 16)),
    });
    let store_ref = &store;
    let results: Vec<Result<Lease, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = plans
            .iter()
            .map(|plan| {
                scope.spawn(move || {
                    let key = &plan.key;
                    let lease = match store_ref.claim(SCOPE, key, fingerprint(key), &options()) {
                        Ok(Claim::Acquired(lease)) => lease,
                        other => return Err(format!("{key}: claim gave {other:?}")),
                    };
                    let token = lease.token();
                    let done = match plan.complete {
                        Some((nonce, len)) => {
                            store_ref.complete(&lease, &outcome_bytes(token, nonce, len), RETENTION)
                        }
                        None => store_ref.fail(&lease),
                    };
                    done.map(|()| lease).map_err(|e| format!("{key}: {e}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a parent worker"))
            .collect()
    });
    let base = model.max_token;
    for (plan, result) in plans.iter().zip(results) {
        let lease = match result {
            Ok(lease) => lease,
            Err(e) => {
                model.violation(cycle, e);
                continue;
            }
        };
        let key = &plan.key;
        let token = lease.token();
        match &plan.orphan_checkpoint {
            Some(checkpoint) => {
                stats.counters.parent_takeovers += 1;
                if !lease.is_takeover() || lease.checkpoint() != checkpoint.as_deref() {
                    model.violation(
                        cycle,
                        format!("{key}: takeover {lease:?}, orphan checkpoint {checkpoint:?}"),
                    );
                }
            }
            None if lease.is_takeover() => {
                model.violation(cycle, format!("{key}: a fresh key taken over"));
            }
            None => {}
        }
        if token <= max_durable {
            model.violation(
                cycle,
                format!("{key}: token {token} after the restart, not above {max_durable}"),
            );
        }
        model.acquired(cycle, key, token, lease.attempt(), base);
        match plan.complete {
            Some((nonce, len)) => model.completed(cycle, key, (token, nonce, len), "parent"),
            None => {
                model.key(key).failed_tokens.insert(token);
            }
        }
    }
    store.close().expect("a clean close");
    stats.verifying += verify_started.elapsed();
    assert!(
        model.violations.is_empty(),
        "after cycle {cycle}:\n{}",
        model.violations.join("\n")
    );
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_transition() {
    kill_loop(false, 200);
}

/// The same loop on a store with a write-ahead log (checkpoints every 20 ms, three 1 MiB
/// segments recycled): kills land during log appends, checkpoints and recycling.
#[test]
fn sigkill_with_a_write_ahead_log_loses_no_acknowledged_transition() {
    kill_loop(true, 100);
}

fn kill_loop(wal: bool, default_cycles: u64) {
    let long = support::long_run();
    let cycles = support::env_u64(
        "IDEMSTORE_CRASH_CYCLES",
        if long { 2_000 } else { default_cycles },
    );
    let seed = support::env_u64("IDEMSTORE_SEED", 0x1DE5_7012);
    // A new database every `generation` cycles: redb's recovery after a kill walks the whole
    // file, so a single ever-growing database would make late cycles slower and slower.
    let generation = if long { 500 } else { 100 };
    let full_check_every = 25;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng::new(seed);
    let mut stats = Stats::default();
    let started = Instant::now();
    let mut first = 0;
    while first < cycles {
        let n = generation.min(cycles - first);
        let db = dir.path().join(if wal {
            format!("crash-{first}{WAL_SUFFIX}")
        } else {
            format!("crash-{first}.redb")
        });
        let mut model = Model::default();
        let recovery_start = stats.recovery.len();
        for cycle in first..first + n {
            let last = cycle + 1 == first + n;
            let full = last || (cycle - first) % full_check_every == full_check_every - 1;
            one_cycle(&db, seed, cycle, full, &mut rng, &mut model, &mut stats);
        }
        let gen_recovery: Vec<Duration> = stats.recovery[recovery_start..]
            .iter()
            .map(|(d, _)| *d)
            .collect();
        let (head, tail) = (
            median(&gen_recovery[..gen_recovery.len().min(10)]),
            median(&gen_recovery[gen_recovery.len().saturating_sub(10)..]),
        );
        stats.generations.push(format!(
            "cycles {first}..{}: {} keys, {} tokens, file {} KiB, median recovery first 10 \
             {head:?} / last 10 {tail:?}",
            first + n,
            model.keys.len(),
            model.tokens.len(),
            std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0) / 1024,
        ));
        first += n;
    }

    let counters = &stats.counters;
    // The run really exercised what it claims to.
    assert!(
        counters.acks > 0
            && counters.completes > 0
            && counters.fails > 0
            && counters.checkpoints > 0
            && counters.replays > 0
            && counters.stale_rejected > 0
            && counters.parent_takeovers > 0
            && counters.views_compared > 0
            && (!wal || counters.view_log_batches > 0),
        "{counters:?}"
    );
    assert!(
        counters.cycles_without_acks < cycles / 2 + 1,
        "most children were killed before acknowledging anything: {counters:?}"
    );
    let mut recovery: Vec<Duration> = stats.recovery.iter().map(|(d, _)| *d).collect();
    recovery.sort();
    println!(
        "crash{}: {cycles} SIGKILL cycles in {:?} (children ran {:?} in all before the kill; \
         parent recovery + checks {:?}); recovery (open after kill) min {:?} / median {:?} / max \
         {:?}; {counters:?}\n  {}",
        if wal { " (write-ahead log)" } else { "" },
        started.elapsed(),
        stats.slept,
        stats.verifying,
        recovery[0],
        median(&recovery),
        recovery[recovery.len() - 1],
        stats.generations.join("\n  "),
    );
}

fn median(durations: &[Duration]) -> Duration {
    let mut d = durations.to_vec();
    d.sort();
    d.get(d.len() / 2).copied().unwrap_or_default()
}

/// Regression: a process killed while `Store::open` was creating a new database file must not
/// leave a file that every later open refuses. (redb writes its magic number last, after two
/// fsyncs, so a kill in between left a file without it, refused as `NotAnIdemstoreFile` forever:
/// a service that crashed during its very first start could never start again.)
#[test]
fn sigkill_while_creating_the_database_never_leaves_an_unopenable_file() {
    let kills = support::env_u64(
        "IDEMSTORE_CREATE_KILLS",
        if support::long_run() { 100 } else { 12 },
    );
    let mut rng = Rng::new(support::env_u64("IDEMSTORE_SEED", 0xC4EA7E));
    let (mut files, mut refused, mut leftovers) = (0, Vec::new(), 0);
    for kill in 0..kills {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "crash_child_creating",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_CREATE_DIR_ENV, dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the child");
        let stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || read_lines(stdout));
        std::thread::sleep(Duration::from_millis(rng.range(30, 250)));
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        for line in reader.join().expect("reader") {
            assert!(!line.starts_with("ERR"), "kill {kill}: child: {line}");
        }
        for entry in std::fs::read_dir(dir.path()).expect("read_dir") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !name.starts_with("db-") {
                leftovers += 1;
                continue;
            }
            files += 1;
            match Store::builder().sweep_interval(None).open(&path) {
                Ok(store) => store.close().expect("close"),
                Err(e) => refused.push(format!("kill {kill}: {name}: {e:?}")),
            }
        }
    }
    println!(
        "creation kills: {kills} kills, {files} database files reopened, {} refused, {leftovers} \
         other files left behind",
        refused.len()
    );
    assert!(refused.is_empty(), "{}", refused.join("\n"));
}
