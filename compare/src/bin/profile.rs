//! Workloads to run under a profiler (`perf record`, `valgrind --tool=callgrind`, `strace -c`),
//! each isolated in an `#[inline(never)]` function named `measured_*` so that callgrind can
//! count only it (`--toggle-collect='*measured_*'`).
//!
//! ```text
//! cargo build --release --manifest-path compare/Cargo.toml
//! P=compare/target/release/profile
//! $P cycle  [--threads N] [--ops M] [--memory] [--relaxed]   # claim + complete of fresh keys
//! $P replay [--threads N] [--ops M] [--records R] [--memory] # claims of completed keys
//!            [--path FILE]   # keep the filled store in FILE and reuse it when it exists
//!            [--cache-mib N] # redb's page cache (default: redb's 1 GiB)
//! $P sweep  [--records R] [--batch B] [--memory]             # sweep R expired records
//! valgrind --tool=callgrind --toggle-collect='*measured_*' $P replay --memory --ops 100000
//! ```
//!
//! Each run prints the elapsed time and the store's commit counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idemstore::{Claim, ClaimOptions, Durability, ManualClock, Store};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SCOPE: &[u8] = b"bench";
const RETENTION: Duration = Duration::from_secs(3600);

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn key(n: u64) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = (u128::from(mix(n)) << 64) | u128::from(mix(!n));
    let mut key = [b'-'; 36];
    let mut digit = 0;
    for (i, byte) in key.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        *byte = HEX[((bits >> (124 - 4 * digit)) & 0xF) as usize];
        digit += 1;
    }
    key
}

fn fingerprint(key: &[u8; 36]) -> [u8; 32] {
    let mut fp = [0u8; 32];
    let seed = key.iter().fold(0u64, |h, &b| mix(h ^ u64::from(b)));
    for (i, chunk) in fp.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&mix(seed ^ i as u64).to_le_bytes());
    }
    fp
}

struct Args {
    mode: String,
    threads: usize,
    ops: u64,
    records: u64,
    batch: usize,
    memory: bool,
    relaxed: bool,
    path: Option<std::path::PathBuf>,
    cache_mib: Option<u64>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: profile cycle|replay|sweep [options]")?;
    let mut args = Args {
        mode,
        threads: 1,
        ops: 100_000,
        records: 100_000,
        batch: 1024,
        memory: false,
        relaxed: false,
        path: None,
        cache_mib: None,
    };
    while let Some(flag) = it.next() {
        let mut num = || -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{flag} wants a number"))
        };
        match flag.as_str() {
            "--threads" => args.threads = num()?.max(1) as usize,
            "--ops" => args.ops = num()?,
            "--records" => args.records = num()?.max(1),
            "--batch" => args.batch = num()?.max(1) as usize,
            "--memory" => args.memory = true,
            "--relaxed" => args.relaxed = true,
            "--cache-mib" => args.cache_mib = Some(num()?),
            "--path" => {
                args.path = Some(it.next().ok_or("--path wants a file")?.into());
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn open(args: &Args, dir: &tempfile::TempDir, clock: &ManualClock, relaxed: bool) -> Store {
    let mut builder = Store::builder().clock(clock.clone()).sweep_interval(None);
    if let Some(mib) = args.cache_mib {
        builder = builder.cache_size(usize::try_from(mib << 20).expect("cache size"));
    }
    if relaxed {
        builder = builder.durability(Durability::Relaxed {
            max_unsynced: Duration::from_secs(1),
        });
    }
    if args.memory {
        builder.open_in_memory().expect("open in memory")
    } else {
        let path = args
            .path
            .clone()
            .unwrap_or_else(|| dir.path().join("profile.redb"));
        builder.open(path).expect("open file")
    }
}

fn cycle(store: &Store, n: u64, outcome: &[u8], options: &ClaimOptions) -> Result<(), BoxError> {
    let k = key(n);
    match store.claim(SCOPE, k, fingerprint(&k), options)? {
        Claim::Acquired(lease) => Ok(store.complete(&lease, outcome, RETENTION)?),
        other => Err(format!("key {n} not acquired: {other:?}").into()),
    }
}

/// Runs `f(n)` for `n` in `range` on `threads` threads.
fn parallel(
    threads: usize,
    range: std::ops::Range<u64>,
    f: impl Fn(u64) -> Result<(), BoxError> + Sync,
) {
    if threads == 1 {
        // On the calling thread, so that a profiler's per-function toggle sees it.
        for n in range {
            f(n).expect("operation");
        }
        return;
    }
    let next = AtomicU64::new(range.start);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= range.end {
                        return;
                    }
                    f(n).expect("operation");
                }
            });
        }
    });
}

#[inline(never)]
fn measured_cycles(store: &Store, args: &Args, outcome: &[u8], options: &ClaimOptions) {
    parallel(args.threads, 1 << 40..(1 << 40) + args.ops, |n| {
        cycle(store, n, outcome, options)
    });
}

#[inline(never)]
fn measured_replays(store: &Store, args: &Args, options: &ClaimOptions) {
    let records = args.records;
    parallel(args.threads, 0..args.ops, |n| {
        let k = key(mix(n) % records);
        match store.claim(SCOPE, k, fingerprint(&k), options)? {
            Claim::Replay(r) => {
                std::hint::black_box(r);
                Ok(())
            }
            other => Err(format!("expected a replay: {other:?}").into()),
        }
    });
}

#[inline(never)]
fn measured_sweep(store: &Store, batch: usize) -> u64 {
    let mut removed = 0;
    loop {
        let s = store.sweep(batch).expect("sweep");
        removed += s.removed as u64;
        if !s.more {
            return removed;
        }
    }
}

fn main() -> Result<(), BoxError> {
    let args = parse()?;
    let dir = tempfile::tempdir()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let clock = ManualClock::new(now);
    let options = ClaimOptions::default().retention(RETENTION);
    let outcome: Vec<u8> = (0..=250u8).cycle().take(512).collect();
    let fill = |store: &Store| {
        let began = Instant::now();
        parallel(32, 0..args.records, |n| cycle(store, n, &outcome, &options));
        eprintln!(
            "filled {} records in {:.1} s",
            args.records,
            began.elapsed().as_secs_f64()
        );
    };
    let (store, elapsed, what) = match args.mode.as_str() {
        "cycle" => {
            let store = open(&args, &dir, &clock, args.relaxed);
            let began = Instant::now();
            measured_cycles(&store, &args, &outcome, &options);
            (store, began.elapsed(), format!("{} cycles", args.ops))
        }
        "replay" | "sweep" => {
            let store = if args.memory {
                let store = open(&args, &dir, &clock, true);
                fill(&store);
                store
            } else if args.path.as_ref().is_some_and(|p| p.exists()) {
                open(&args, &dir, &clock, false)
            } else {
                // Fill at a relaxed durability, then reopen at the default one.
                let store = open(&args, &dir, &clock, true);
                fill(&store);
                store.close()?;
                open(&args, &dir, &clock, false)
            };
            let before = store.stats()?;
            let began = Instant::now();
            let what = if args.mode == "replay" {
                measured_replays(&store, &args, &options);
                format!("{} replays", args.ops)
            } else {
                clock.advance(2 * RETENTION);
                let removed = measured_sweep(&store, args.batch);
                format!("swept {removed} records in batches of {}", args.batch)
            };
            let elapsed = began.elapsed();
            let after = store.stats()?;
            eprintln!(
                "commits during the measurement: {}",
                after.commits - before.commits
            );
            (store, elapsed, what)
        }
        other => return Err(format!("unknown mode {other:?}").into()),
    };
    let stats = store.stats()?;
    println!(
        "{what} on {} thread(s) in {:.3} s; commits {}, operations {}, ops/commit {:.1}, largest batch {}",
        args.threads,
        elapsed.as_secs_f64(),
        stats.commits,
        stats.operations,
        stats.operations as f64 / stats.commits.max(1) as f64,
        stats.largest_batch
    );
    store.close()?;
    Ok(())
}
