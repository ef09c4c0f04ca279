//! Helpers shared by the integration tests: a seeded PRNG, the long-run switch, a small worker
//! pool, a deterministic single-threaded workload with physical-state snapshots, and the
//! linearizability checker (feature `__testkit`, for its reference model). The simulated disk
//! they run on is `idemstore::testkit::SimDisk` (feature `__testkit`).
#![allow(dead_code)]

#[cfg(feature = "__testkit")]
pub mod linearizability;
pub mod rng;
pub mod workload;

/// Whether the long runs were asked for (`IDEMSTORE_LONG=1`).
pub fn long_run() -> bool {
    std::env::var("IDEMSTORE_LONG").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// An integer from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `f` on every item on a few worker threads (the machine's parallelism, at most 4),
/// returning the results in item order.
pub fn parallel_map<T, R, F>(items: Vec<T>, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    use std::sync::Mutex;
    let workers = std::thread::available_parallelism()
        .map_or(2, std::num::NonZeroUsize::get)
        .clamp(1, 4);
    let queue: Mutex<Vec<(usize, T)>> = Mutex::new(items.into_iter().enumerate().rev().collect());
    let results: Mutex<Vec<(usize, R)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some((i, item)) = next else { break };
                    let r = f(item);
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, r));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}
