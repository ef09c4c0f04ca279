//! The claim + complete cycle, the replay path, and group commit under concurrency.
//!
//! Every cycle claims a fresh UUID-like 36-byte key with a 32-byte fingerprint and completes it
//! with a 512-byte outcome. Stores are opened without a background sweeper (nothing expires
//! during a run); the file store uses the default durability, [`Durability::Immediate`]
//! (one fsync per commit).
//!
//! - `cycle/{memory,file}`: one thread, one cycle per iteration.
//! - `cycle_threads/{memory,file}/N`: N threads share one store, each running its share of
//!   the iterations; the time is wall-clock for all of them, so the reported throughput is
//!   the store's total cycles/s and shows how much group commit batches concurrent callers.
//! - `replay/{memory,file}`: a claim of a completed key (read-only, no commit).
//!
//! Run with `cargo bench --bench cycle`; sample sizes are small so that the fsync-bound cases
//! finish in reasonable time.
//!
//! [`Durability::Immediate`]: idemstore::Durability::Immediate

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main, measurement::WallTime,
};
use idemstore::{Claim, ClaimOptions, Store};
use tempfile::TempDir;

const SCOPE: &[u8] = b"bench";
const FINGERPRINT_LEN: usize = 32;
const OUTCOME_LEN: usize = 512;
const RETENTION: Duration = Duration::from_secs(24 * 3600);
const THREADS: [usize; 3] = [1, 4, 16];

/// Source of unique keys for the whole process: distinct counters give distinct keys.
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

/// A bijective 64-bit mixer (splitmix64's finaliser), so keys look random but never collide.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A fresh key in the textual UUID layout (8-4-4-4-12 hex digits, 36 bytes).
fn fresh_key() -> [u8; 36] {
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
fn fingerprint(key: &[u8; 36]) -> [u8; FINGERPRINT_LEN] {
    let mut fp = [0u8; FINGERPRINT_LEN];
    let seed = key.iter().fold(0u64, |h, &b| mix(h ^ u64::from(b)));
    for (i, chunk) in fp.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&mix(seed ^ i as u64).to_le_bytes());
    }
    fp
}

fn outcome() -> Vec<u8> {
    (0..=250u8).cycle().take(OUTCOME_LEN).collect()
}

/// One claim + complete of a fresh key.
fn cycle(store: &Store, options: &ClaimOptions, outcome: &[u8]) {
    let key = fresh_key();
    let claim = store
        .claim(SCOPE, key, fingerprint(&key), options)
        .expect("claim of a fresh key");
    let Claim::Acquired(lease) = claim else {
        panic!("a fresh key must be acquired, got {claim:?}");
    };
    store
        .complete(&lease, outcome, RETENTION)
        .expect("complete of an owned lease");
}

/// A store and, for a file store, the directory that holds it (removed on drop, after the
/// store is closed).
struct Fixture {
    store: Arc<Store>,
    _dir: Option<TempDir>,
}

#[derive(Clone, Copy)]
enum Backend {
    Memory,
    File,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::File => "file",
        }
    }

    fn open(self) -> Fixture {
        let builder = Store::builder().sweep_interval(None);
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

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        // Fsync-bound iterations take milliseconds: flat sampling keeps the run short.
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(1));
}

fn single_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("cycle");
    configure(&mut group);
    let options = ClaimOptions::default();
    let outcome = outcome();
    for backend in [Backend::Memory, Backend::File] {
        let fixture = backend.open();
        group.bench_function(backend.name(), |b| {
            b.iter(|| cycle(&fixture.store, &options, &outcome));
        });
    }
    group.finish();
}

/// Runs `iters` cycles split over `threads` threads sharing `store`; returns the wall time
/// from the moment all threads are ready until the last one finishes.
fn run_concurrent(
    store: &Arc<Store>,
    threads: usize,
    iters: u64,
    options: &ClaimOptions,
    outcome: &Arc<Vec<u8>>,
) -> Duration {
    let n = threads as u64;
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..n)
        .map(|t| {
            let share = iters / n + u64::from(t < iters % n);
            let store = Arc::clone(store);
            let start = Arc::clone(&start);
            let options = options.clone();
            let outcome = Arc::clone(outcome);
            thread::spawn(move || {
                start.wait();
                for _ in 0..share {
                    cycle(&store, &options, &outcome);
                }
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    for handle in handles {
        handle.join().expect("a bench thread panicked");
    }
    began.elapsed()
}

fn concurrent(c: &mut Criterion) {
    let mut group = c.benchmark_group("cycle_threads");
    configure(&mut group);
    let options = ClaimOptions::default();
    let outcome = Arc::new(outcome());
    for backend in [Backend::Memory, Backend::File] {
        let fixture = backend.open();
        for threads in THREADS {
            group.bench_with_input(
                BenchmarkId::new(backend.name(), threads),
                &threads,
                |b, &threads| {
                    b.iter_custom(|iters| {
                        run_concurrent(&fixture.store, threads, iters, &options, &outcome)
                    });
                },
            );
        }
    }
    group.finish();
}

fn replay(c: &mut Criterion) {
    let mut group = c.benchmark_group("replay");
    configure(&mut group);
    group.sampling_mode(SamplingMode::Auto);
    let options = ClaimOptions::default();
    let outcome = outcome();
    for backend in [Backend::Memory, Backend::File] {
        let fixture = backend.open();
        let store = &fixture.store;
        let key = fresh_key();
        let fp = fingerprint(&key);
        let Claim::Acquired(lease) = store.claim(SCOPE, key, fp, &options).expect("claim") else {
            panic!("a fresh key must be acquired");
        };
        store
            .complete(&lease, &outcome, RETENTION)
            .expect("complete");
        group.bench_function(backend.name(), |b| {
            b.iter(|| {
                let claim = store
                    .claim(SCOPE, key, fp, &options)
                    .expect("claim of a completed key");
                assert!(matches!(claim, Claim::Replay(_)), "expected a replay");
                black_box(claim)
            });
        });
    }
    group.finish();
}

criterion_group!(benches, single_thread, concurrent, replay);
criterion_main!(benches);
