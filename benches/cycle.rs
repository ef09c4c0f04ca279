//! The claim + complete cycle under concurrency: how group commit batches concurrent callers.
//!
//! `cycle/{memory,file}/{512B,16KiB}/N`: N threads (1, 4, 16, 64) share one store, each running
//! its share of the iterations, each iteration one claim of a fresh 36-byte UUID key with a
//! 32-byte fingerprint and one complete with a 512-byte or 16 KiB outcome. The time is
//! wall-clock for all of them (`iter_custom`), so the reported throughput is the store's total
//! cycles/s; at N > 1 it shows how many operations share a commit.
//!
//! The file store uses the default durability, `Durability::Immediate` (one fsync per commit),
//! and lives for the whole benchmark; the in-memory store is opened fresh for every sample so
//! that the records it accumulates (memory only) stay bounded. No background sweeper runs.
//!
//! The single-operation benches (claim, replay, complete, fail, get, sweep, mixed workload) are
//! in `benches/ops.rs`; the side-by-side comparison against redb, SQLite, Redis and PostgreSQL
//! is the `compare/` crate (`cargo run --release --manifest-path compare/Cargo.toml`).
//!
//! Run with `cargo bench --bench cycle`.

mod common;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use idemstore::ClaimOptions;

use common::{Backend, Size, Stores, configure, cycle, timed_parallel};

const CALLERS: [usize; 4] = [1, 4, 16, 64];

fn concurrent_cycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("cycle");
    configure(&mut group);
    let options = ClaimOptions::default();
    for backend in Backend::ALL {
        for size in Size::ALL {
            let outcome = size.outcome();
            let stores = Stores::new(backend);
            for callers in CALLERS {
                let id = BenchmarkId::new(format!("{}/{}", backend.name(), size.name()), callers);
                group.bench_with_input(id, &callers, |b, &callers| {
                    b.iter_custom(|iters| {
                        let store = stores.for_sample();
                        timed_parallel(callers, iters, |_, n| {
                            for _ in 0..n {
                                cycle(&store, &options, &outcome);
                            }
                        })
                    });
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, concurrent_cycle);
criterion_main!(benches);
