//! The idemstore-only measurements, on a store of each format: format 1 is the redb file alone,
//! format 2 the redb file plus the write-ahead log `<path>.wal` (`write_ahead_log(true)`). For
//! each: the fill, the files it leaves, open time after a clean close and after the writing
//! process is killed with SIGKILL, replay throughput on 2 threads and 1 (random keys of the
//! store, first right after the open and then again on 2 threads once redb's page cache is
//! warm, and keys completed just before), sweep throughput and claim latency
//! while a sweep runs, and the peak RSS of each phase. Then the open time of a much larger
//! store. The sustained run (`sustained.rs`) fills a store of its own with `fill`.

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idemstore::{Claim, ClaimOptions, Durability, ManualClock, Store, StoreBuilder, WalStats};

use crate::BoxError;
use crate::rss;
use crate::stats::{Histogram, median};
use crate::sustained;
use crate::workload::{OUTCOME_LEN, SCOPE, fingerprint, key, outcome};

/// Retention of the records written by the fill; the clock then moves past it.
const RETENTION: Duration = Duration::from_secs(3600);
/// Retention of everything written after the fill (the recent batches, the killed writer): longer than the clock's jump, so the sweep removes exactly the fill.
const LONG_RETENTION: Duration = crate::peers::RETENTION;
/// Threads that fill a store (they keep the single writer's queue full).
pub const FILL_THREADS: usize = 32;
/// The background sweeper's default batch (`StoreBuilder::sweep_batch`).
pub const DEFAULT_SWEEP_BATCH: usize = 1024;
/// Callers running claim + complete cycles while the sweep runs.
pub const SWEEP_CALLERS: usize = 16;
/// Threads of the replay measurement (the target is stated for 2).
pub const REPLAY_THREADS: usize = 2;
/// The largest batch of recently completed keys the recent-replay measurement writes.
pub const RECENT_MAX: u64 = 100_000;
/// Key numbers of the recent batches (two: one before each recent-replay measurement).
const RECENT_KEYS: u64 = 1 << 38;
/// Key numbers of the killed writer (2^32 per kill).
const KILL_KEYS: u64 = 1 << 39;
/// Open measurements per store and kind (the median is reported).
pub const OPENS: usize = 3;
/// Threads of the killed writer, the cycles it has acknowledged before it reports ready, and
/// how long it goes on writing before the kill.
pub const KILL_THREADS: usize = 8;
pub const KILL_READY_CYCLES: u64 = 256;
pub const KILL_AFTER: Duration = Duration::from_millis(300);
/// The hidden subcommand that runs the killed writer (the harness re-executes itself).
pub const CHILD_COMMAND: &str = "__write-until-killed";

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn options(retention: Duration) -> ClaimOptions {
    ClaimOptions::default()
        .lease(Duration::from_secs(30))
        .retention(retention)
}

/// A store's on-disk format.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    /// Format 1: the redb file alone; each commit is a redb transaction.
    Redb,
    /// Format 2: the redb file plus a write-ahead log (`write_ahead_log(true)`).
    Wal,
}

impl Format {
    pub fn number(self) -> u8 {
        match self {
            Format::Redb => 1,
            Format::Wal => 2,
        }
    }

    pub fn from_number(n: &str) -> Option<Format> {
        match n {
            "1" => Some(Format::Redb),
            "2" => Some(Format::Wal),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Redb => "format 1 (redb file only)",
            Format::Wal => "format 2 (write-ahead log)",
        }
    }
}

/// The write-ahead log's builder options given on the command line (`None`: the engine's
/// default), applied wherever the harness opens a format-2 store.
#[derive(Clone, Default)]
pub struct WalOptions {
    pub checkpoint_interval: Option<Duration>,
    pub map_budget: Option<usize>,
    pub segment_bytes: Option<u64>,
    pub segments: Option<u64>,
}

const MIB: u64 = 1024 * 1024;

impl WalOptions {
    pub const USAGE: &str =
        "  --checkpoint-interval-ms N, --map-budget-mib N, --wal-segment-mib N, --wal-segments N
                     the write-ahead log's builder options for every format-2 store of the run
                     (default: the engine's defaults)";

    pub fn apply(&self, mut b: StoreBuilder) -> StoreBuilder {
        if let Some(v) = self.checkpoint_interval {
            b = b.checkpoint_interval(v);
        }
        if let Some(v) = self.map_budget {
            b = b.map_budget(v);
        }
        if let Some(v) = self.segment_bytes {
            b = b.wal_segment_bytes(v);
        }
        if let Some(v) = self.segments {
            b = b.wal_segments(v);
        }
        b
    }

    /// Takes `flag` (with its `value`) if it is one of these options; `Ok(false)` if it is not.
    pub fn parse(
        &mut self,
        flag: &str,
        value: &mut dyn FnMut() -> Result<String, String>,
    ) -> Result<bool, String> {
        let number = |v: String| -> Result<u64, String> {
            v.parse()
                .map_err(|_| format!("{flag} wants a whole number, not {v:?}"))
        };
        match flag {
            "--checkpoint-interval-ms" => {
                self.checkpoint_interval = Some(Duration::from_millis(number(value()?)?));
            }
            "--map-budget-mib" => {
                self.map_budget = Some(
                    usize::try_from(number(value()?)? * MIB)
                        .map_err(|_| "--map-budget-mib is too large")?,
                );
            }
            "--wal-segment-mib" => self.segment_bytes = Some(number(value()?)? * MIB),
            "--wal-segments" => self.segments = Some(number(value()?)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The flags that give these options to a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(v) = self.checkpoint_interval {
            out.extend(["--checkpoint-interval-ms".into(), v.as_millis().to_string()]);
        }
        if let Some(v) = self.map_budget {
            out.extend(["--map-budget-mib".into(), (v as u64 / MIB).to_string()]);
        }
        if let Some(v) = self.segment_bytes {
            out.extend(["--wal-segment-mib".into(), (v / MIB).to_string()]);
        }
        if let Some(v) = self.segments {
            out.extend(["--wal-segments".into(), v.to_string()]);
        }
        out
    }

    /// For the report: "the engine's defaults" or the options given.
    pub fn describe(&self) -> String {
        let args = self.to_args();
        if args.is_empty() {
            "the engine's defaults".into()
        } else {
            format!("`{}`", args.join(" "))
        }
    }
}

/// A builder for a store of `format`: no background sweeper, the given clock.
pub fn builder(format: Format, wal: &WalOptions, clock: Option<&ManualClock>) -> StoreBuilder {
    let mut b = Store::builder().sweep_interval(None);
    if let Some(clock) = clock {
        b = b.clock(clock.clone());
    }
    match format {
        Format::Redb => b,
        Format::Wal => wal.apply(b.write_ahead_log(true)),
    }
}

/// The log file of the store at `path`: `<path>.wal`.
pub fn wal_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".wal");
    PathBuf::from(s)
}

/// The sizes of a store's files: the database file and, for format 2, the log (preallocated,
/// so its size says nothing about how much of it is in use).
#[derive(Clone, Copy)]
pub struct Files {
    pub db: u64,
    pub wal: Option<u64>,
}

impl Files {
    pub fn of(path: &Path) -> Result<Files, BoxError> {
        let wal = match std::fs::metadata(wal_path(path)) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Files {
            db: std::fs::metadata(path)?.len(),
            wal,
        })
    }

    pub fn total(&self) -> u64 {
        self.db + self.wal.unwrap_or(0)
    }
}

/// Removes the store at `path`: its database file and its log, if any.
pub fn remove_store(path: &Path) -> Result<(), BoxError> {
    std::fs::remove_file(path)?;
    match std::fs::remove_file(wal_path(path)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Claims and completes keys `first..first + count` (512-byte outcomes, `retention`) from
/// `threads` threads; `progress`: a label to print progress under.
fn write_keys(
    store: &Store,
    first: u64,
    count: u64,
    threads: usize,
    retention: Duration,
    progress: Option<&str>,
) -> Result<(), BoxError> {
    let next = AtomicU64::new(0);
    let began = Instant::now();
    let outcome = outcome(OUTCOME_LEN);
    let options = options(retention);
    let report_every = (count / 10).max(1);
    thread::scope(|s| -> Result<(), BoxError> {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<(), String> {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= count {
                            return Ok(());
                        }
                        if let Some(label) = progress
                            && n > 0
                            && n.is_multiple_of(report_every)
                        {
                            eprintln!(
                                "[{label}] {n}/{count} records, {:.0}/s",
                                n as f64 / began.elapsed().as_secs_f64()
                            );
                        }
                        let k = key(first + n);
                        let claim = store
                            .claim(SCOPE, k, fingerprint(&k), &options)
                            .map_err(|e| e.to_string())?;
                        let Claim::Acquired(lease) = claim else {
                            return Err(format!("key {} was not acquired", first + n));
                        };
                        store
                            .complete(&lease, &outcome, retention)
                            .map_err(|e| e.to_string())?;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a writer thread panicked")??;
        }
        Ok(())
    })
}

/// Filling a store: how long it took and what it left on disk.
pub struct Fill {
    pub records: u64,
    pub elapsed: Duration,
    pub files: Files,
    pub peak_rss: rss::Peak,
}

/// Writes `records` completed records (key numbers `0..records`, 512-byte outcomes) into a new
/// store of `format` at `path` at a relaxed durability (the fill is set-up, not a measurement of
/// durable writes), then closes it (which syncs everything).
pub fn fill(
    path: &Path,
    format: Format,
    wal: &WalOptions,
    records: u64,
    clock: &ManualClock,
    label: &str,
) -> Result<Fill, BoxError> {
    let phase = rss::Phase::start();
    let store = builder(format, wal, Some(clock))
        .durability(Durability::Relaxed {
            max_unsynced: Duration::from_secs(1),
        })
        .open(path)?;
    let began = Instant::now();
    write_keys(&store, 0, records, FILL_THREADS, RETENTION, Some(label))?;
    store.close()?;
    let elapsed = began.elapsed();
    Ok(Fill {
        records,
        elapsed,
        files: Files::of(path)?,
        peak_rss: phase.end(),
    })
}

/// Opens the store at `path` `OPENS` times (closing in between); the median open time.
pub fn open_time(
    path: &Path,
    format: Format,
    wal: &WalOptions,
    clock: &ManualClock,
) -> Result<Duration, BoxError> {
    let mut secs = Vec::new();
    for _ in 0..OPENS {
        let began = Instant::now();
        let store = builder(format, wal, Some(clock)).open(path)?;
        secs.push(began.elapsed().as_secs_f64());
        store.close()?;
    }
    Ok(Duration::from_secs_f64(median(&secs)))
}

/// Opening a store after the process writing to it was killed with SIGKILL.
pub struct KilledOpen {
    /// The median and the longest of the `OPENS` opens, each after its own kill.
    pub median: Duration,
    pub max: Duration,
    /// Peak RSS of each killed writer (a fresh process that opened the store and wrote for
    /// `KILL_AFTER`), read just before the kill.
    pub child_rss: Vec<u64>,
    /// The write-ahead log's checkpoint lag right after each open (format 2), as
    /// `Store::stats` reports it: what the open found in the log and left to checkpoint.
    pub lag_after_open: Vec<WalStats>,
}

/// Kills the child on drop (an error of the parent must not leave it writing).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `OPENS` times: starts a child process (this binary, `CHILD_COMMAND`) that opens the store at
/// `path` writably and runs cycles from `KILL_THREADS` threads at `Immediate`; once it has
/// acknowledged `KILL_READY_CYCLES` of them, lets it write `KILL_AFTER` longer and sends it
/// SIGKILL (`Child::kill`), then times the open. Each open checks that the first key the child
/// acknowledged is there.
pub fn open_after_kill(
    path: &Path,
    format: Format,
    wal: &WalOptions,
    clock: &ManualClock,
) -> Result<KilledOpen, BoxError> {
    let exe = std::env::current_exe()?;
    let mut secs = Vec::new();
    let mut lag_after_open = Vec::new();
    let mut child_rss = Vec::new();
    for i in 0..OPENS as u64 {
        let base = KILL_KEYS + (i << 32);
        let child = Command::new(&exe)
            .arg(CHILD_COMMAND)
            .arg(path)
            .arg(format.number().to_string())
            .arg(base.to_string())
            .args(wal.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().ok_or("the child has no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let status = child.0.wait()?;
            return Err(format!("the writer to kill did not start ({status})").into());
        }
        thread::sleep(KILL_AFTER);
        child_rss.extend(rss::peak_of(child.0.id()));
        child.0.kill()?;
        child.0.wait()?;
        let began = Instant::now();
        let store = builder(format, wal, Some(clock)).open(path)?;
        secs.push(began.elapsed().as_secs_f64());
        let stats = store.stats()?;
        if let Some(w) = stats.wal {
            lag_after_open.push(w);
        }
        if store.get(SCOPE, key(base))?.is_none() {
            return Err(format!(
                "after the kill, the key the writer acknowledged first ({base}) is missing"
            )
            .into());
        }
        store.close()?;
    }
    let max = secs.iter().copied().fold(0.0, f64::max);
    Ok(KilledOpen {
        median: Duration::from_secs_f64(median(&secs)),
        max: Duration::from_secs_f64(max),
        child_rss,
        lag_after_open,
    })
}

/// The child process of `open_after_kill`: `argv` is `[path, format, first key number, WAL
/// options...]`. Opens the store, completes the first key, then runs cycles from `KILL_THREADS`
/// threads; prints `ready` once `KILL_READY_CYCLES` more are acknowledged, and goes on until
/// killed.
pub fn child_main(argv: &[String]) -> Result<(), BoxError> {
    let [path, format, base, rest @ ..] = argv else {
        return Err(format!("{CHILD_COMMAND} PATH FORMAT FIRST-KEY [WAL options]").into());
    };
    let format = Format::from_number(format).ok_or("the format is 1 or 2")?;
    let base: u64 = base.parse()?;
    let mut wal = WalOptions::default();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        if !wal.parse(flag, &mut value)? {
            return Err(format!("unknown argument {flag:?}").into());
        }
    }
    let store = builder(format, &wal, None).open(path)?;
    write_keys(&store, base, 1, 1, LONG_RETENTION, None)?;
    let acknowledged = AtomicU64::new(0);
    let next = AtomicU64::new(base + 1);
    let outcome = outcome(OUTCOME_LEN);
    let options = options(LONG_RETENTION);
    thread::scope(|s| -> Result<(), BoxError> {
        let handles: Vec<_> = (0..KILL_THREADS)
            .map(|_| {
                s.spawn(|| -> Result<(), String> {
                    loop {
                        let k = key(next.fetch_add(1, Ordering::Relaxed));
                        let claim = store
                            .claim(SCOPE, k, fingerprint(&k), &options)
                            .map_err(|e| e.to_string())?;
                        let Claim::Acquired(lease) = claim else {
                            return Err("a fresh key was not acquired".into());
                        };
                        store
                            .complete(&lease, &outcome, LONG_RETENTION)
                            .map_err(|e| e.to_string())?;
                        if acknowledged.fetch_add(1, Ordering::Relaxed) + 1 == KILL_READY_CYCLES {
                            let mut out = std::io::stdout().lock();
                            writeln!(out, "ready")
                                .and_then(|()| out.flush())
                                .map_err(|e| e.to_string())?;
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a writer thread panicked")??;
        }
        Ok(())
    })
}

/// Replays of random keys of `first..first + count` (all completed) on `threads` threads for
/// `duration`; replays per second.
pub fn replay(
    store: &Store,
    first: u64,
    count: u64,
    threads: usize,
    duration: Duration,
) -> Result<f64, BoxError> {
    let options = options(RETENTION);
    let deadline = Instant::now() + duration;
    let began = Instant::now();
    let total = thread::scope(|s| -> Result<u64, BoxError> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let options = &options;
                s.spawn(move || -> Result<u64, String> {
                    let mut n = 0u64;
                    let mut r = (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    while Instant::now() < deadline {
                        for _ in 0..64 {
                            r = crate::workload::mix(r);
                            let k = key(first + r % count);
                            match store.claim(SCOPE, k, fingerprint(&k), options) {
                                Ok(Claim::Replay(replay)) => {
                                    std::hint::black_box(replay);
                                }
                                Ok(other) => return Err(format!("expected a replay: {other:?}")),
                                Err(e) => return Err(e.to_string()),
                            }
                            n += 1;
                        }
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h.join().map_err(|_| "a replay thread panicked")??;
        }
        Ok(total)
    })?;
    Ok(total as f64 / began.elapsed().as_secs_f64())
}

/// Claim + complete cycles of fresh keys from `callers` threads until `stop` is set (or
/// `duration` passes, if given): latency of the claims alone, and cycles/s.
pub struct Load {
    pub claim: Histogram,
    pub cycles: u64,
    pub elapsed: Duration,
}

pub fn load(
    store: &Store,
    callers: usize,
    stop: &AtomicBool,
    duration: Option<Duration>,
) -> Result<Load, BoxError> {
    static NEXT: AtomicU64 = AtomicU64::new(1 << 36);
    let outcome = outcome(OUTCOME_LEN);
    let options = options(RETENTION);
    let began = Instant::now();
    let deadline = duration.map(|d| began + d);
    let results = thread::scope(|s| {
        let handles: Vec<_> = (0..callers)
            .map(|_| {
                let (outcome, options) = (&outcome, &options);
                s.spawn(move || -> Result<(u64, Histogram), String> {
                    let mut claim = Histogram::default();
                    let mut cycles = 0;
                    while !stop.load(Ordering::Relaxed)
                        && deadline.is_none_or(|d| Instant::now() < d)
                    {
                        let k = key(NEXT.fetch_add(1, Ordering::Relaxed));
                        let t0 = Instant::now();
                        let answer = store
                            .claim(SCOPE, k, fingerprint(&k), options)
                            .map_err(|e| e.to_string())?;
                        claim.record(t0.elapsed().as_nanos() as u64);
                        let Claim::Acquired(lease) = answer else {
                            return Err("a fresh key was not acquired".into());
                        };
                        store
                            .complete(&lease, outcome, RETENTION)
                            .map_err(|e| e.to_string())?;
                        cycles += 1;
                    }
                    Ok((cycles, claim))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a load thread panicked".to_string())?)
            .collect::<Vec<_>>()
    });
    let elapsed = began.elapsed();
    let mut out = Load {
        claim: Histogram::default(),
        cycles: 0,
        elapsed,
    };
    for r in results {
        let (cycles, claim) = r?;
        out.cycles += cycles;
        out.claim.merge(&claim);
    }
    Ok(out)
}

/// Sweeping every expired record while callers run cycles.
pub struct SweepUnderLoad {
    pub batch: usize,
    pub removed: u64,
    pub sweep_elapsed: Duration,
    pub before: Load,
    pub during: Load,
    pub after: Load,
    pub files_before: Files,
    pub files_after: Files,
    pub files_after_close: Files,
    /// `Store::compact` after the close: the files then, and how long it took.
    pub files_after_compact: Files,
    pub compact_elapsed: Duration,
    pub peak_rss: rss::Peak,
}

/// Replays of keys completed just before the measurement.
pub struct Recent {
    /// Keys in each batch.
    pub keys: u64,
    /// How long writing the batch before the 2-thread measurement took (`Immediate`,
    /// `FILL_THREADS` threads).
    pub write: Duration,
    pub replay_2: f64,
    pub replay_1: f64,
}

/// Everything measured on the store of `records` records of one format.
pub struct Large {
    pub format: Format,
    pub fill: Fill,
    pub open: Duration,
    pub killed: KilledOpen,
    /// Random keys on 2 threads, first thing after the open (redb's page cache holds only what
    /// the open read: with format 1's page verification at open, the whole file).
    pub replay_2: f64,
    pub replay_1: f64,
    /// Random keys on 2 threads again, after the two passes above.
    pub replay_2_again: f64,
    /// The length of each replay pass.
    pub phase: Duration,
    pub recent: Recent,
    pub replay_rss: rss::Peak,
    pub sweep: SweepUnderLoad,
}

/// Everything the idemstore-only measurements produced, for the report.
#[derive(Default)]
pub struct Measured {
    /// The `--records` store, one per format.
    pub large: Vec<(Format, Result<Large, String>)>,
    /// The sustained run on idemstore (write-ahead log, `Immediate`).
    pub sustained: Option<Result<sustained::Store, String>>,
    /// The Redis side of the sustained run.
    pub redis: Option<Result<sustained::RedisRun, String>>,
    /// The `--big-records` store.
    pub huge: Option<Result<Huge, String>>,
}

/// What the measurements on the large store are given.
pub struct LargePlan<'a> {
    pub dir: &'a Path,
    pub format: Format,
    pub wal: &'a WalOptions,
    pub records: u64,
    /// Length of each replay and load phase.
    pub phase: Duration,
    pub sweep_batch: usize,
}

pub fn large(plan: &LargePlan<'_>) -> Result<Large, BoxError> {
    let (format, wal, records, phase) = (plan.format, plan.wal, plan.records, plan.phase);
    let n = format.number();
    let label = format!("large f{n}");
    let path = plan.dir.join(format!("large-f{n}.redb"));
    let clock = ManualClock::new(wall_ms());
    eprintln!("[{label}] filling {records} records ({})", format.name());
    let fill = fill(&path, format, wal, records, &clock, &label)?;
    eprintln!(
        "[{label}] filled in {:.1} s, files {} + {} bytes",
        fill.elapsed.as_secs_f64(),
        fill.files.db,
        fill.files.wal.unwrap_or(0)
    );
    let open = open_time(&path, format, wal, &clock)?;
    eprintln!("[{label}] open after kill -9");
    let killed = open_after_kill(&path, format, wal, &clock)?;

    let rss_phase = rss::Phase::start();
    let store = Arc::new(builder(format, wal, Some(&clock)).open(&path)?);
    eprintln!("[{label}] replay on {REPLAY_THREADS} threads and 1");
    let replay_2 = replay(&store, 0, records, REPLAY_THREADS, phase)?;
    let replay_1 = replay(&store, 0, records, 1, phase)?;
    let replay_2_again = replay(&store, 0, records, REPLAY_THREADS, phase)?;
    let keys = (records / 10).min(RECENT_MAX);
    eprintln!("[{label}] replay of {keys} keys completed just before");
    let began = Instant::now();
    write_keys(
        &store,
        RECENT_KEYS,
        keys,
        FILL_THREADS,
        LONG_RETENTION,
        None,
    )?;
    let write = began.elapsed();
    let recent_2 = replay(&store, RECENT_KEYS, keys, REPLAY_THREADS, phase)?;
    let second = RECENT_KEYS + (1 << 32);
    write_keys(&store, second, keys, FILL_THREADS, LONG_RETENTION, None)?;
    let recent_1 = replay(&store, second, keys, 1, phase)?;
    let replay_rss = rss_phase.end();

    // Every record written by the fill is now expired (logically absent), none swept yet.
    clock.advance(2 * RETENTION);
    let rss_phase = rss::Phase::start();
    let files_before = Files::of(&path)?;
    let never = AtomicBool::new(false);
    eprintln!("[{label}] claim latency before the sweep");
    let before = load(&store, SWEEP_CALLERS, &never, Some(phase))?;

    eprintln!("[{label}] sweeping {records} expired records under load");
    let stop = AtomicBool::new(false);
    let (during, sweep) = thread::scope(|s| {
        let sweeper = s.spawn(|| -> Result<(u64, Duration), String> {
            let began = Instant::now();
            let mut removed = 0u64;
            let result = loop {
                match store.sweep(plan.sweep_batch) {
                    Ok(swept) => {
                        removed += swept.removed as u64;
                        if !swept.more {
                            break Ok((removed, began.elapsed()));
                        }
                    }
                    Err(e) => break Err(e.to_string()),
                }
            };
            stop.store(true, Ordering::Relaxed);
            result
        });
        let during = load(&store, SWEEP_CALLERS, &stop, None);
        let sweep = sweeper
            .join()
            .unwrap_or_else(|_| Err("the sweep thread panicked".into()));
        (during, sweep)
    });
    let during = during?;
    let (removed, sweep_elapsed) = sweep?;
    eprintln!("[{label}] claim latency after the sweep");
    let after = load(&store, SWEEP_CALLERS, &never, Some(phase))?;
    let files_after = Files::of(&path)?;
    let peak_rss = rss_phase.end();
    match Arc::try_unwrap(store) {
        Ok(store) => store.close()?,
        Err(_) => return Err("the store is still shared".into()),
    }
    let files_after_close = Files::of(&path)?;
    eprintln!("[{label}] compacting the file");
    let compaction = Store::compact(&path)?;
    let files_after_compact = Files::of(&path)?;
    remove_store(&path)?;
    Ok(Large {
        format,
        fill,
        open,
        killed,
        replay_2,
        replay_1,
        replay_2_again,
        phase,
        recent: Recent {
            keys,
            write,
            replay_2: recent_2,
            replay_1: recent_1,
        },
        replay_rss,
        sweep: SweepUnderLoad {
            batch: plan.sweep_batch,
            removed,
            sweep_elapsed,
            before,
            during,
            after,
            files_before,
            files_after,
            files_after_close,
            files_after_compact,
            compact_elapsed: compaction.elapsed,
            peak_rss,
        },
    })
}

/// Open time of a store of `records` records (filled first, then removed).
pub struct Huge {
    pub format: Format,
    pub fill: Fill,
    pub open: Duration,
    pub open_rss: rss::Peak,
    pub killed: Result<KilledOpen, String>,
}

pub fn huge(dir: &Path, format: Format, wal: &WalOptions, records: u64) -> Result<Huge, BoxError> {
    let path = dir.join(format!("huge-f{}.redb", format.number()));
    let clock = ManualClock::new(wall_ms());
    eprintln!("[huge] filling {records} records ({})", format.name());
    let fill = fill(&path, format, wal, records, &clock, "huge")?;
    eprintln!(
        "[huge] filled in {:.1} s, files {} + {} bytes",
        fill.elapsed.as_secs_f64(),
        fill.files.db,
        fill.files.wal.unwrap_or(0)
    );
    let rss_phase = rss::Phase::start();
    let open = open_time(&path, format, wal, &clock)?;
    let open_rss = rss_phase.end();
    eprintln!("[huge] open after kill -9");
    let killed = open_after_kill(&path, format, wal, &clock).map_err(|e| e.to_string());
    remove_store(&path)?;
    Ok(Huge {
        format,
        fill,
        open,
        open_rss,
        killed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The killed writer gets the log options through `to_args`, and reads them with `parse`.
    #[test]
    fn wal_options_reach_the_child_unchanged() {
        let given = WalOptions {
            checkpoint_interval: Some(Duration::from_millis(250)),
            map_budget: Some(64 * MIB as usize),
            segment_bytes: Some(16 * MIB),
            segments: Some(6),
        };
        let args = given.to_args();
        let mut read = WalOptions::default();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().cloned().ok_or_else(|| "no value".to_owned());
            assert!(read.parse(flag, &mut value).unwrap(), "{flag}");
        }
        assert_eq!(read.to_args(), args);
        assert_eq!(read.checkpoint_interval, given.checkpoint_interval);
        assert_eq!(read.map_budget, given.map_budget);
        assert_eq!(read.segment_bytes, given.segment_bytes);
        assert_eq!(read.segments, given.segments);
        assert!(WalOptions::default().to_args().is_empty());
        assert!(!read.parse("--rounds", &mut || Ok("1".into())).unwrap());
    }

    #[test]
    fn the_log_sits_beside_the_database_file() {
        assert_eq!(
            wal_path(Path::new("/tmp/x/large-f2.redb")),
            Path::new("/tmp/x/large-f2.redb.wal")
        );
    }
}
