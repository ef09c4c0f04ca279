//! What the criterion benches share: the record shape, key generation, store fixtures, and
//! running work on N threads with wall-clock timing (for `iter_custom`).
//!
//! Record shape: a 36-byte key (a UUID in its textual layout), a 32-byte fingerprint (a
//! SHA-256-sized digest), and an outcome of 512 bytes or 16 KiB ([`Size`]).

// Each bench binary uses a different part of this module.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{BenchmarkGroup, SamplingMode, Throughput, measurement::WallTime};
use idemstore::{Claim, ClaimOptions, Lease, ManualClock, Store, StoreBuilder};
use tempfile::TempDir;

/// The scope every bench record lives in.
pub const SCOPE: &[u8] = b"bench";
/// A SHA-256-sized fingerprint.
pub const FINGERPRINT_LEN: usize = 32;
/// Retention of completed records: nothing expires during a run unless a bench moves a
/// [`ManualClock`] past it.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Threads used to prepare records (claims that share commits through group commit), so that
/// untimed set-up on a file store does not cost one fsync per record.
pub const SETUP_THREADS: usize = 16;

/// The outcome size of a record.
#[derive(Clone, Copy, Debug)]
pub enum Size {
    /// A 512-byte outcome (a small JSON response).
    Small,
    /// A 16 KiB outcome (a large response body).
    Large,
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    pub fn bytes(self) -> usize {
        match self {
            Size::Small => 512,
            Size::Large => 16 * 1024,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "512B",
            Size::Large => "16KiB",
        }
    }

    /// The outcome bytes of this size.
    pub fn outcome(self) -> Vec<u8> {
        (0..=250u8).cycle().take(self.bytes()).collect()
    }
}

/// Source of unique keys for the whole process: distinct counters give distinct keys.
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

/// A bijective 64-bit mixer (splitmix64's finaliser), so keys look random but never collide.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A fresh key in the textual UUID layout (8-4-4-4-12 hex digits, 36 bytes).
pub fn fresh_key() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
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

/// The fingerprint of a request: a digest-sized value derived from its key.
pub fn fingerprint(key: &[u8; 36]) -> [u8; FINGERPRINT_LEN] {
    let mut fp = [0u8; FINGERPRINT_LEN];
    let seed = key.iter().fold(0u64, |h, &b| mix(h ^ u64::from(b)));
    for (i, chunk) in fp.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&mix(seed ^ i as u64).to_le_bytes());
    }
    fp
}

/// Claims a fresh key; panics unless it is acquired.
pub fn claim_fresh(store: &Store, options: &ClaimOptions) -> Lease {
    let key = fresh_key();
    match store
        .claim(SCOPE, key, fingerprint(&key), options)
        .expect("claim of a fresh key")
    {
        Claim::Acquired(lease) => lease,
        other => panic!("a fresh key must be acquired, got {other:?}"),
    }
}

/// One claim + complete of a fresh key; returns the key.
pub fn cycle(store: &Store, options: &ClaimOptions, outcome: &[u8]) -> [u8; 36] {
    let lease = claim_fresh(store, options);
    store
        .complete(&lease, outcome, options.retention_duration())
        .expect("complete of an owned lease");
    let mut key = [0u8; 36];
    key.copy_from_slice(lease.key());
    key
}

/// Where a store lives.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// redb's in-memory backend.
    Memory,
    /// A file in a temporary directory, at the default durability (`Immediate`: one fsync per
    /// commit).
    File,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Memory, Backend::File];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::File => "file",
        }
    }

    /// A store without a background sweeper (nothing is swept behind a bench's back).
    pub fn open(self) -> Fixture {
        self.open_with(Store::builder())
    }

    /// A store from `builder`, with the background sweeper turned off.
    pub fn open_with(self, builder: StoreBuilder) -> Fixture {
        let builder = builder.sweep_interval(None);
        match self {
            Backend::Memory => Fixture {
                store: Arc::new(builder.open_in_memory().expect("open an in-memory store")),
                _dir: None,
            },
            Backend::File => {
                let dir = tempfile::tempdir().expect("create a temp dir");
                let store = builder
                    .open(dir.path().join("bench.redb"))
                    .expect("open a file store");
                Fixture {
                    store: Arc::new(store),
                    _dir: Some(dir),
                }
            }
        }
    }
}

/// A store and, for a file store, the directory that holds it (removed after the store).
pub struct Fixture {
    pub store: Arc<Store>,
    _dir: Option<TempDir>,
}

/// The store a sample runs on: the file store lives for the whole benchmark (its records are on
/// disk), the in-memory store is opened fresh for every sample so that what the samples write
/// (all of it in memory) stays bounded.
pub struct Stores {
    backend: Backend,
    file: Option<Fixture>,
}

impl Stores {
    pub fn new(backend: Backend) -> Stores {
        Stores {
            backend,
            file: matches!(backend, Backend::File).then(|| backend.open()),
        }
    }

    /// The store for one sample.
    pub fn for_sample(&self) -> Arc<Store> {
        match &self.file {
            Some(fixture) => Arc::clone(&fixture.store),
            None => self.backend.open().store,
        }
    }
}

/// A [`ManualClock`] at the current wall-clock time.
pub fn manual_clock_now() -> ManualClock {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    ManualClock::new(now)
}

/// Small samples and short runs: the fsync-bound cases take milliseconds per iteration, and the
/// whole `cargo bench` should stay within minutes on two cores.
pub fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        // Flat sampling: every sample runs the same number of iterations, so slow iterations
        // do not stretch the run quadratically.
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(1));
}

/// The share of `total` items that worker `index` of `workers` takes.
pub fn share(total: u64, workers: usize, index: usize) -> u64 {
    let n = workers as u64;
    total / n + u64::from((index as u64) < total % n)
}

/// Runs `work(thread, count)` on `threads` threads, splitting `iters` between them; returns
/// the wall time from the moment every thread is ready until the last one finishes (thread
/// start-up is not timed).
pub fn timed_parallel<F>(threads: usize, iters: u64, work: F) -> Duration
where
    F: Fn(usize, u64) + Sync,
{
    let start = Barrier::new(threads + 1);
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (start, work) = (&start, &work);
                s.spawn(move || {
                    start.wait();
                    work(t, share(iters, threads, t));
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        for handle in handles {
            handle.join().expect("a bench thread panicked");
        }
        began.elapsed()
    })
}

/// Runs `make(thread)` `count` times on [`SETUP_THREADS`] threads (so a file store shares its
/// fsyncs) and collects the results: untimed set-up.
pub fn prepare<T, F>(count: u64, make: F) -> Vec<T>
where
    T: Send,
    F: Fn() -> T + Sync,
{
    thread::scope(|s| {
        let handles: Vec<_> = (0..SETUP_THREADS)
            .map(|t| {
                let make = &make;
                s.spawn(move || {
                    (0..share(count, SETUP_THREADS, t))
                        .map(|_| make())
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a set-up thread panicked"))
            .collect()
    })
}

/// `count` completed records with `outcome`; returns their keys.
pub fn completed_keys(
    store: &Store,
    count: u64,
    options: &ClaimOptions,
    outcome: &[u8],
) -> Vec<[u8; 36]> {
    prepare(count, || cycle(store, options, outcome))
}
