//! SplitMix64 over an atomic counter: a shared, lock-free source of ids and jitter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A SplitMix64 generator many tasks can draw from at once.
pub struct Rng(AtomicU64);

impl Rng {
    /// A generator with a fixed seed: the chaos run's workload repeats for a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(AtomicU64::new(seed))
    }

    /// A generator seeded from the clock and the process id: the service's ids.
    pub fn from_time() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng::new(nanos ^ u64::from(std::process::id()).rotate_left(32))
    }

    fn next(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 for `n == 0`).
    pub fn below(&self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with a probability of `percent` in 100.
    pub fn chance(&self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// `len` random characters of `[0-9A-Za-z]`, as in Stripe's ids (`ch_...`).
    pub fn token(&self, len: usize) -> String {
        const ID_CHARS: &[u8; 62] = b"0123456789\
            ABCDEFGHIJKLMNOPQRSTUVWXYZ\
            abcdefghijklmnopqrstuvwxyz";
        (0..len)
            .map(|_| ID_CHARS[self.below(ID_CHARS.len() as u64) as usize] as char)
            .collect()
    }
}
