//! The idemstore-only measurements: replay throughput on 2 threads, sweep throughput and claim
//! latency while a sweep runs, open time of large stores, file size per record and after
//! sweeping everything, and peak RSS of each phase.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idemstore::{Claim, ClaimOptions, Durability, ManualClock, Store};

use crate::BoxError;
use crate::rss;
use crate::stats::{Histogram, median};
use crate::workload::{OUTCOME_LEN, SCOPE, fingerprint, key, outcome};

/// Retention of the records written for these measurements; the clock then moves past it.
const RETENTION: Duration = Duration::from_secs(3600);
/// Threads that fill a store (they keep the single writer's queue full).
const FILL_THREADS: usize = 32;
/// The background sweeper's default batch (`StoreBuilder::sweep_batch`).
pub const DEFAULT_SWEEP_BATCH: usize = 1024;
/// Callers running claim + complete cycles while the sweep runs.
pub const SWEEP_CALLERS: usize = 16;
/// Threads of the replay measurement (the target is stated for 2).
pub const REPLAY_THREADS: usize = 2;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn options() -> ClaimOptions {
    ClaimOptions::default()
        .lease(Duration::from_secs(30))
        .retention(RETENTION)
}

/// Filling a store: how long it took and what it left on disk.
pub struct Fill {
    pub records: u64,
    pub elapsed: Duration,
    pub file_len: u64,
    pub peak_rss: Option<u64>,
}

/// Writes `records` completed records (key numbers `0..records`, 512-byte outcomes) into a new
/// store at `path` at a relaxed durability (the fill is set-up, not a measurement of durable
/// writes), then closes it (which syncs everything).
pub fn fill(path: &Path, records: u64, clock: &ManualClock) -> Result<Fill, BoxError> {
    rss::reset_peak();
    let store = Store::builder()
        .clock(clock.clone())
        .durability(Durability::Relaxed {
            max_unsynced: Duration::from_secs(1),
        })
        .sweep_interval(None)
        .open(path)?;
    let next = AtomicU64::new(0);
    let began = Instant::now();
    let outcome = outcome(OUTCOME_LEN);
    let options = options();
    let report_every = (records / 10).max(1);
    thread::scope(|s| -> Result<(), BoxError> {
        let handles: Vec<_> = (0..FILL_THREADS)
            .map(|_| {
                s.spawn(|| -> Result<(), String> {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= records {
                            return Ok(());
                        }
                        if n > 0 && n.is_multiple_of(report_every) {
                            eprintln!(
                                "[fill] {n}/{records} records, {:.0}/s",
                                n as f64 / began.elapsed().as_secs_f64()
                            );
                        }
                        let k = key(n);
                        let claim = store
                            .claim(SCOPE, k, fingerprint(&k), &options)
                            .map_err(|e| e.to_string())?;
                        let Claim::Acquired(lease) = claim else {
                            return Err(format!("fill: key {n} was not acquired"));
                        };
                        store
                            .complete(&lease, &outcome, RETENTION)
                            .map_err(|e| e.to_string())?;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "a fill thread panicked")??;
        }
        Ok(())
    })?;
    store.close()?;
    let elapsed = began.elapsed();
    Ok(Fill {
        records,
        elapsed,
        file_len: std::fs::metadata(path)?.len(),
        peak_rss: rss::peak(),
    })
}

/// Opens the store at `path` `times` times (closing in between); the median open time.
pub fn open_time(path: &Path, clock: &ManualClock, times: usize) -> Result<Duration, BoxError> {
    let mut secs = Vec::new();
    for _ in 0..times {
        let began = Instant::now();
        let store = Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .open(path)?;
        secs.push(began.elapsed().as_secs_f64());
        store.close()?;
    }
    Ok(Duration::from_secs_f64(median(&secs)))
}

/// Replays of random completed keys (of `0..records`) on `threads` threads for `duration`.
pub fn replay(
    store: &Store,
    records: u64,
    threads: usize,
    duration: Duration,
) -> Result<f64, BoxError> {
    let options = options();
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
                            let k = key(r % records);
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
    let options = options();
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
    pub file_len_before: u64,
    pub file_len_after: u64,
    pub file_len_after_close: u64,
    pub peak_rss: Option<u64>,
}

/// Everything measured on the store of `records` records.
pub struct Large {
    pub fill: Fill,
    pub open: Duration,
    pub replay_2: f64,
    pub replay_1: f64,
    pub replay_rss: Option<u64>,
    pub sweep: SweepUnderLoad,
}

pub fn large(
    dir: &Path,
    records: u64,
    phase: Duration,
    sweep_batch: usize,
) -> Result<Large, BoxError> {
    let path = dir.join("large.redb");
    let clock = ManualClock::new(wall_ms());
    eprintln!("[large] filling {records} records");
    let fill = fill(&path, records, &clock)?;
    eprintln!(
        "[large] filled in {:.1} s, file {} bytes",
        fill.elapsed.as_secs_f64(),
        fill.file_len
    );
    let open = open_time(&path, &clock, 3)?;

    rss::reset_peak();
    let store = Arc::new(
        Store::builder()
            .clock(clock.clone())
            .sweep_interval(None)
            .open(&path)?,
    );
    eprintln!("[large] replay on {REPLAY_THREADS} threads");
    let replay_2 = replay(&store, records, REPLAY_THREADS, phase)?;
    let replay_1 = replay(&store, records, 1, phase)?;
    let replay_rss = rss::peak();

    // Every record written by the fill is now expired (logically absent), none swept yet.
    clock.advance(2 * RETENTION);
    rss::reset_peak();
    let file_len_before = std::fs::metadata(&path)?.len();
    let never = AtomicBool::new(false);
    eprintln!("[large] claim latency before the sweep");
    let before = load(&store, SWEEP_CALLERS, &never, Some(phase))?;

    eprintln!("[large] sweeping {records} expired records under load");
    let stop = AtomicBool::new(false);
    let (during, sweep) = thread::scope(|s| {
        let sweeper = s.spawn(|| -> Result<(u64, Duration), String> {
            let began = Instant::now();
            let mut removed = 0u64;
            let result = loop {
                match store.sweep(sweep_batch) {
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
    eprintln!("[large] claim latency after the sweep");
    let after = load(&store, SWEEP_CALLERS, &never, Some(phase))?;
    let file_len_after = std::fs::metadata(&path)?.len();
    let peak_rss = rss::peak();
    match Arc::try_unwrap(store) {
        Ok(store) => store.close()?,
        Err(_) => return Err("the store is still shared".into()),
    }
    let file_len_after_close = std::fs::metadata(&path)?.len();
    Ok(Large {
        fill,
        open,
        replay_2,
        replay_1,
        replay_rss,
        sweep: SweepUnderLoad {
            batch: sweep_batch,
            removed,
            sweep_elapsed,
            before,
            during,
            after,
            file_len_before,
            file_len_after,
            file_len_after_close,
            peak_rss,
        },
    })
}

/// Open time of a store of `records` records (filled first, then removed).
pub struct Huge {
    pub fill: Fill,
    pub open: Duration,
    pub open_rss: Option<u64>,
}

pub fn huge(dir: &Path, records: u64) -> Result<Huge, BoxError> {
    let path = dir.join("huge.redb");
    let clock = ManualClock::new(wall_ms());
    eprintln!("[huge] filling {records} records");
    let fill = fill(&path, records, &clock)?;
    eprintln!(
        "[huge] filled in {:.1} s, file {} bytes",
        fill.elapsed.as_secs_f64(),
        fill.file_len
    );
    rss::reset_peak();
    let open = open_time(&path, &clock, 3)?;
    let open_rss = rss::peak();
    std::fs::remove_file(&path)?;
    Ok(Huge {
        fill,
        open,
        open_rss,
    })
}
