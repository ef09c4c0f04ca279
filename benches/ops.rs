//! Each store operation on its own, and a mixed workload.
//!
//! Record shape: a 36-byte UUID key, a 32-byte fingerprint, and a 512-byte or 16 KiB outcome.
//! Every bench runs on the in-memory store and on a file store at the default durability
//! (`Durability::Immediate`: one fsync per commit); none runs a background sweeper.
//!
//! - `claim_new/{memory,file}`: a claim of a fresh key (one commit). No outcome is stored yet,
//!   so there is no size dimension.
//! - `replay/{backend}/{size}`: a claim of a completed key, answered from committed state (no
//!   commit), over a pool of [`POOL`] completed records.
//! - `get/{backend}/{size}`: a `get` of a completed record from the same pool.
//! - `complete/{backend}/{size}`: a complete of a held lease (one commit); the leases are
//!   claimed untimed before each sample.
//! - `fail/{backend}`: a fail (release for retry) of a held lease (one commit), likewise.
//! - `sweep/{backend}/{size}`: sweeping [`SWEEP_N`] expired records in batches of 1024 (the
//!   background sweeper's default batch, one commit each); throughput in records. The records
//!   are written untimed before each iteration and expired by moving a `ManualClock`.
//! - `mixed/{backend}/{size}/{1,16}`: 70% claim + complete of a new key, 20% a duplicate claim
//!   of a completed key (replay), 10% `get`, from 1 or 16 threads; throughput in operations.
//!
//! Single-operation benches run on one thread: at the file store's durability they measure one
//! fsync per commit. Group commit under concurrency is `benches/cycle.rs`.
//!
//! Run with `cargo bench --bench ops` (add a filter such as `-- replay` for one group).

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemstore::{Claim, ClaimOptions, Lease, Store};

use common::{
    Backend, SCOPE, Size, Stores, claim_fresh, completed_keys, configure, cycle, fingerprint, mix,
    prepare, timed_parallel,
};

/// Completed records that replays and gets pick from.
const POOL: u64 = 1024;
/// Expired records one sweep iteration removes.
const SWEEP_N: u64 = 10_000;
/// The background sweeper's default batch.
const SWEEP_BATCH: usize = 1024;
/// Caller counts of the mixed workload.
const MIXED_CALLERS: [usize; 2] = [1, 16];

type Pool = Vec<([u8; 36], [u8; common::FINGERPRINT_LEN])>;

fn pool(store: &Store, options: &ClaimOptions, outcome: &[u8]) -> Pool {
    completed_keys(store, POOL, options, outcome)
        .into_iter()
        .map(|k| (k, fingerprint(&k)))
        .collect()
}

/// Claims `(key, fp)` of a completed record; panics unless it replays.
fn replay(store: &Store, (key, fp): &([u8; 36], [u8; 32]), options: &ClaimOptions) {
    let claim = store
        .claim(SCOPE, key, fp, options)
        .expect("claim of a completed key");
    assert!(matches!(claim, Claim::Replay(_)), "expected a replay");
    black_box(claim);
}

fn get(store: &Store, (key, _): &([u8; 36], [u8; 32])) {
    let record = store.get(SCOPE, key).expect("get");
    assert!(record.is_some(), "a completed record is found");
    black_box(record);
}

fn claim_new(c: &mut Criterion) {
    let mut group = c.benchmark_group("claim_new");
    configure(&mut group);
    let options = ClaimOptions::default();
    for backend in Backend::ALL {
        let stores = Stores::new(backend);
        group.bench_function(backend.name(), |b| {
            b.iter_custom(|iters| {
                let store = stores.for_sample();
                let began = Instant::now();
                for _ in 0..iters {
                    black_box(claim_fresh(&store, &options));
                }
                began.elapsed()
            });
        });
    }
    group.finish();
}

fn reads(c: &mut Criterion) {
    let options = ClaimOptions::default();
    let mut fixtures = Vec::new();
    for backend in Backend::ALL {
        for size in Size::ALL {
            let fixture = backend.open();
            let keys = pool(&fixture.store, &options, &size.outcome());
            fixtures.push((backend, size, fixture, keys));
        }
    }
    for (name, read) in [("replay", true), ("get", false)] {
        let mut group = c.benchmark_group(name);
        configure(&mut group);
        // Reads take microseconds: let criterion pick growing iteration counts.
        group.sampling_mode(criterion::SamplingMode::Auto);
        for (backend, size, fixture, keys) in &fixtures {
            let id = format!("{}/{}", backend.name(), size.name());
            let mut i = 0u64;
            group.bench_function(id, |b| {
                b.iter(|| {
                    i = i.wrapping_add(1);
                    let entry = &keys[(mix(i) % POOL) as usize];
                    if read {
                        replay(&fixture.store, entry, &options);
                    } else {
                        get(&fixture.store, entry);
                    }
                });
            });
        }
        group.finish();
    }
}

/// `complete` or `fail` of leases claimed untimed before each sample.
fn lease_ops(c: &mut Criterion) {
    let options = ClaimOptions::default();
    let mut group = c.benchmark_group("complete");
    configure(&mut group);
    for backend in Backend::ALL {
        for size in Size::ALL {
            let outcome = size.outcome();
            let stores = Stores::new(backend);
            group.bench_function(format!("{}/{}", backend.name(), size.name()), |b| {
                b.iter_custom(|iters| {
                    let store = stores.for_sample();
                    let leases: Vec<Lease> = prepare(iters, || claim_fresh(&store, &options));
                    let began = Instant::now();
                    for lease in &leases {
                        store
                            .complete(lease, &outcome, options.retention_duration())
                            .expect("complete");
                    }
                    began.elapsed()
                });
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("fail");
    configure(&mut group);
    for backend in Backend::ALL {
        let stores = Stores::new(backend);
        group.bench_function(backend.name(), |b| {
            b.iter_custom(|iters| {
                let store = stores.for_sample();
                let leases: Vec<Lease> = prepare(iters, || claim_fresh(&store, &options));
                let began = Instant::now();
                for lease in &leases {
                    store.fail(lease).expect("fail");
                }
                began.elapsed()
            });
        });
    }
    group.finish();
}

fn sweep(c: &mut Criterion) {
    let mut group = c.benchmark_group("sweep");
    configure(&mut group);
    group.throughput(Throughput::Elements(SWEEP_N));
    // Every iteration first writes SWEEP_N records untimed: keep the run short.
    group.warm_up_time(Duration::from_millis(100));
    group.measurement_time(Duration::from_secs(1));
    let retention = Duration::from_secs(3600);
    let options = ClaimOptions::default().retention(retention);
    for backend in Backend::ALL {
        for size in Size::ALL {
            let outcome = size.outcome();
            let clock = common::manual_clock_now();
            let fixture = backend.open_with(Store::builder().clock(clock.clone()));
            let store = Arc::clone(&fixture.store);
            group.bench_function(format!("{}/{}", backend.name(), size.name()), |b| {
                b.iter_custom(|iters| {
                    let mut swept = Duration::ZERO;
                    for _ in 0..iters {
                        prepare(SWEEP_N, || {
                            let lease = claim_fresh(&store, &options);
                            store
                                .complete(&lease, &outcome, retention)
                                .expect("complete");
                        });
                        clock.advance(2 * retention);
                        let began = Instant::now();
                        let mut removed = 0;
                        loop {
                            let s = store.sweep(SWEEP_BATCH).expect("sweep");
                            removed += s.removed as u64;
                            if !s.more {
                                break;
                            }
                        }
                        swept += began.elapsed();
                        assert_eq!(removed, SWEEP_N, "every expired record is swept");
                    }
                    swept
                });
            });
        }
    }
    group.finish();
}

fn mixed(c: &mut Criterion) {
    let mut group = c.benchmark_group("mixed");
    configure(&mut group);
    let options = ClaimOptions::default();
    for backend in Backend::ALL {
        for size in Size::ALL {
            let outcome = size.outcome();
            let stores = Stores::new(backend);
            // The file store keeps its pool; an in-memory store gets one per sample.
            let file_pool = matches!(backend, Backend::File)
                .then(|| pool(&stores.for_sample(), &options, &outcome));
            for callers in MIXED_CALLERS {
                let id = BenchmarkId::new(format!("{}/{}", backend.name(), size.name()), callers);
                group.bench_with_input(id, &callers, |b, &callers| {
                    b.iter_custom(|iters| {
                        let store = stores.for_sample();
                        let fresh;
                        let keys = match &file_pool {
                            Some(keys) => keys,
                            None => {
                                fresh = pool(&store, &options, &outcome);
                                &fresh
                            }
                        };
                        timed_parallel(callers, iters, |t, n| {
                            for i in 0..n {
                                let r = mix(((t as u64) << 40) ^ i);
                                let entry = &keys[(r % POOL) as usize];
                                match (i + t as u64) % 10 {
                                    0..=6 => {
                                        cycle(&store, &options, &outcome);
                                    }
                                    7 | 8 => replay(&store, entry, &options),
                                    _ => get(&store, entry),
                                }
                            }
                        })
                    });
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, claim_new, reads, lease_ops, sweep, mixed);
criterion_main!(benches);
