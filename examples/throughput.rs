//! Claim + complete throughput from N threads sharing one store.
//!
//! ```text
//! cargo run --release --example throughput -- [--threads N] [--seconds S] [--memory | --wal]
//!     [--ordered-keys]
//! ```
//!
//! Each cycle claims a fresh UUID-like 36-byte key with a 32-byte fingerprint and completes it
//! with a 512-byte outcome. Keys are random (like UUIDv4), or with `--ordered-keys` increase
//! in the order they are written (like UUIDv7 or ULID, which lead with a timestamp): a
//! checkpoint then rewrites a few leaves at the end of redb's tree instead of one leaf per
//! record spread over all of it. The store is a new file in a temporary directory at the default
//! durability (`Immediate`: every commit is fsynced before it is acknowledged), or an
//! in-memory store with `--memory`. No background sweeper runs, so every commit counted is one
//! the cycles asked for. The run prints cycles/s and the store's commit counters: operations
//! per commit above 1 is group commit sharing fsyncs between concurrent callers.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use idemstore::{Claim, ClaimOptions, Store};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SCOPE: &[u8] = b"throughput";
const FINGERPRINT_LEN: usize = 32;
const OUTCOME_LEN: usize = 512;
const RETENTION: Duration = Duration::from_secs(24 * 3600);

const USAGE: &str = "usage: throughput [--threads N] [--seconds S] [--memory | --wal]

  --threads N   concurrent client threads (default 1)
  --seconds S   how long to run, in seconds, fractions allowed (default 3)
  --memory      use an in-memory store instead of a file in a temporary directory
  --wal         put a write-ahead log in front of the file (StoreBuilder::write_ahead_log)
  --ordered-keys  keys that increase in the order they are written (like UUIDv7), not random";

struct Args {
    threads: usize,
    seconds: f64,
    memory: bool,
    wal: bool,
    ordered_keys: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        threads: 1,
        seconds: 3.0,
        memory: false,
        wal: false,
        ordered_keys: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--threads" | "-t" => {
                let v = value("--threads")?;
                args.threads = match v.parse::<usize>() {
                    Ok(n) if n >= 1 => n,
                    _ => return Err(format!("--threads wants a whole number >= 1, got {v:?}")),
                };
            }
            "--seconds" | "-s" => {
                let v = value("--seconds")?;
                args.seconds = match v.parse::<f64>() {
                    Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => s,
                    _ => return Err(format!("--seconds wants a number in (0, 86400], got {v:?}")),
                };
            }
            "--memory" | "-m" if inline.is_none() => args.memory = true,
            "--wal" if inline.is_none() => args.wal = true,
            "--ordered-keys" if inline.is_none() => args.ordered_keys = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    if args.memory && args.wal {
        return Err("--memory and --wal exclude each other".into());
    }
    Ok(args)
}

/// Source of unique keys for the whole run: distinct counters give distinct keys.
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

/// A bijective 64-bit mixer (splitmix64's finaliser), so keys look random but never collide.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A fresh key in the textual UUID layout (8-4-4-4-12 hex digits, 36 bytes): random, or with
/// `ordered` led by the key's sequence number (the rest random), as a UUIDv7 is by its
/// timestamp.
fn fresh_key(ordered: bool) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    let high = if ordered { n } else { mix(n) };
    let bits = (u128::from(high) << 64) | u128::from(mix(!n));
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

/// The fingerprint of a request: a digest-sized value derived from its key.
fn fingerprint(key: &[u8; 36]) -> [u8; FINGERPRINT_LEN] {
    let mut fp = [0u8; FINGERPRINT_LEN];
    let seed = key.iter().fold(0u64, |h, &b| mix(h ^ u64::from(b)));
    for (i, chunk) in fp.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&mix(seed ^ i as u64).to_le_bytes());
    }
    fp
}

/// Runs cycles until `deadline`; returns how many completed.
fn client(store: &Store, deadline: Instant, ordered_keys: bool) -> Result<u64, BoxError> {
    let options = ClaimOptions::default();
    let outcome: Vec<u8> = (0..=250u8).cycle().take(OUTCOME_LEN).collect();
    let mut cycles = 0;
    while Instant::now() < deadline {
        let key = fresh_key(ordered_keys);
        match store.claim(SCOPE, key, fingerprint(&key), &options)? {
            Claim::Acquired(lease) => store.complete(&lease, &outcome, RETENTION)?,
            other => return Err(format!("a fresh key was not acquired: {other:?}").into()),
        }
        cycles += 1;
    }
    Ok(cycles)
}

fn run(args: &Args) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let builder = Store::builder().sweep_interval(None);
    let (store, backend) = if args.memory {
        (builder.open_in_memory()?, "in-memory".to_owned())
    } else {
        let path = dir.path().join("throughput.redb");
        let store = builder.write_ahead_log(args.wal).open(&path)?;
        let log = if args.wal { ", write-ahead log" } else { "" };
        (
            store,
            format!("file {} (durability Immediate{log})", path.display()),
        )
    };
    let store = Arc::new(store);
    println!(
        "store: {backend}\nthreads: {}, duration: {} s, key 36 B ({}), fingerprint {FINGERPRINT_LEN} B, outcome {OUTCOME_LEN} B",
        args.threads,
        args.seconds,
        if args.ordered_keys {
            "ordered"
        } else {
            "random"
        }
    );

    let ordered_keys = args.ordered_keys;
    let start = Arc::new(Barrier::new(args.threads + 1));
    let duration = Duration::from_secs_f64(args.seconds);
    let handles: Vec<_> = (0..args.threads)
        .map(|_| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                client(&store, Instant::now() + duration, ordered_keys)
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut cycles = 0u64;
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(n)) => cycles += n,
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => return Err("a client thread panicked".into()),
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    if let Some(e) = first_error {
        return Err(e);
    }

    let stats = store.stats()?;
    let per_commit = if stats.commits == 0 {
        0.0
    } else {
        stats.operations as f64 / stats.commits as f64
    };
    println!("cycles: {cycles} in {elapsed:.2} s");
    println!("cycles/s: {:.0}", cycles as f64 / elapsed);
    println!(
        "mean cycle latency: {:.3} ms",
        elapsed * 1e3 * args.threads as f64 / cycles.max(1) as f64
    );
    println!(
        "commits: {}, operations: {}, ops/commit: {per_commit:.2}, largest batch: {}",
        stats.commits, stats.operations, stats.largest_batch
    );
    println!("records: {}", stats.records);
    if let Some(wal) = stats.wal {
        println!(
            "checkpoints: {} (the last took {} ms; lag at the end {} ms), log syncs: {} (p99 {:.2} ms, longest {:.1} ms)",
            wal.checkpoints,
            wal.last_checkpoint_ms,
            wal.checkpoint_lag_ms,
            wal.log_syncs,
            wal.log_sync_p99_us as f64 / 1e3,
            wal.log_sync_max_us as f64 / 1e3
        );
    }

    match Arc::try_unwrap(store) {
        Ok(store) => store.close()?,
        Err(_) => return Err("the store is still shared after the clients finished".into()),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
