//! The record shape and the timed loop every system runs.

use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::BoxError;
use crate::peers::Worker;
use crate::stats::Histogram;

pub const SCOPE: &[u8] = b"bench";
pub const KEY_LEN: usize = 36;
pub const FINGERPRINT_LEN: usize = 32;
pub const OUTCOME_LEN: usize = 512;

/// A bijective 64-bit mixer (splitmix64's finaliser).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Key number `n` in the textual UUID layout (36 bytes): distinct `n` give distinct keys, and
/// the same `n` gives the same key (the replay measurement recomputes keys it wrote).
pub fn key(n: u64) -> [u8; KEY_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = (u128::from(mix(n)) << 64) | u128::from(mix(!n));
    let mut key = [b'-'; KEY_LEN];
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
pub fn fingerprint(key: &[u8; KEY_LEN]) -> [u8; FINGERPRINT_LEN] {
    let mut fp = [0u8; FINGERPRINT_LEN];
    let seed = key.iter().fold(0u64, |h, &b| mix(h ^ u64::from(b)));
    for (i, chunk) in fp.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&mix(seed ^ i as u64).to_le_bytes());
    }
    fp
}

pub fn outcome(len: usize) -> Vec<u8> {
    (0..=250u8).cycle().take(len).collect()
}

/// Each caller thread takes a block of 2^32 key numbers per round, so keys never repeat in a
/// process. Key numbers below 2^40 are left to the measurements that recompute their keys.
static NEXT_BLOCK: AtomicU64 = AtomicU64::new(1 << 40);

pub fn key_block() -> u64 {
    NEXT_BLOCK.fetch_add(1 << 32, Ordering::Relaxed)
}

/// What one round of one system at one caller count measured.
pub struct Round {
    pub cycles: u64,
    pub elapsed: Duration,
    pub latency: Histogram,
}

impl Round {
    pub fn per_sec(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs cycles of fresh keys on every worker (one thread each) for `duration`, all starting
/// together; the elapsed time runs from the start to the last thread's last cycle.
pub fn run_round(
    workers: &mut [Box<dyn Worker>],
    duration: Duration,
    outcome: &[u8],
) -> Result<Round, BoxError> {
    run_callers(workers, duration, outcome, &|_| {}, |_| {})
}

/// [`run_round`], with `on_cycle` called by each caller after each cycle with the time since
/// that caller started, and `meanwhile` run on this thread once the callers have started
/// (with the start time) while they run.
pub fn run_callers(
    workers: &mut [Box<dyn Worker>],
    duration: Duration,
    outcome: &[u8],
    on_cycle: &(dyn Fn(Duration) + Sync),
    meanwhile: impl FnOnce(Instant),
) -> Result<Round, BoxError> {
    let start = Barrier::new(workers.len() + 1);
    thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|worker| {
                let start = &start;
                s.spawn(move || -> Result<(u64, Histogram, Instant), String> {
                    let base = key_block();
                    let mut latency = Histogram::default();
                    start.wait();
                    let began = Instant::now();
                    let deadline = began + duration;
                    let mut n = 0u64;
                    loop {
                        let key = key(base + n);
                        let fp = fingerprint(&key);
                        let t0 = Instant::now();
                        worker
                            .cycle(&key, &fp, outcome)
                            .map_err(|e| e.to_string())?;
                        let t1 = Instant::now();
                        latency.record((t1 - t0).as_nanos() as u64);
                        on_cycle(t1 - began);
                        n += 1;
                        if t1 >= deadline {
                            return Ok((n, latency, t1));
                        }
                    }
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        meanwhile(began);
        let mut round = Round {
            cycles: 0,
            elapsed: Duration::ZERO,
            latency: Histogram::default(),
        };
        let mut first_error = None;
        for handle in handles {
            match handle.join() {
                Ok(Ok((n, latency, ended))) => {
                    round.cycles += n;
                    round.latency.merge(&latency);
                    round.elapsed = round.elapsed.max(ended.saturating_duration_since(began));
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert_with(|| "a caller thread panicked".into());
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(round),
        }
    })
}
