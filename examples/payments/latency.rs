//! Request latencies in a fixed-size, lock-free histogram: log-linear buckets (64 per power of
//! two, so a quantile is within about 1.6 % of the exact value), whatever the run's length.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two (a power of two itself).
const SUB_BUCKETS: u64 = 64;
/// `log2(SUB_BUCKETS)`.
const SUB_BITS: u32 = 6;
/// Buckets for every `u64` microsecond count: values below [`SUB_BUCKETS`] exactly, then
/// [`SUB_BUCKETS`] per power of two up to 2^63.
const BUCKETS: usize = (SUB_BUCKETS + (64 - SUB_BITS as u64) * SUB_BUCKETS) as usize;

/// Counts of latencies, in microseconds, by bucket.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
}

/// A copy of a [`Histogram`]'s counts at one moment; two of them subtract to the latencies
/// recorded in between.
#[derive(Clone)]
pub struct Snapshot {
    counts: Vec<u64>,
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Counts one latency.
    pub fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

impl Snapshot {
    /// An empty snapshot (the counts before the first request).
    pub fn empty() -> Snapshot {
        Snapshot {
            counts: vec![0; BUCKETS],
        }
    }

    /// The latencies counted since `earlier`.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        }
    }

    /// How many latencies are counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (`0.0..=1.0`), as the middle of its bucket; `None` if empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the quantile, 1-based: the smallest value with at least q of the counts
        // at or below it.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, high) = bounds(index);
                return Some(Duration::from_micros(low + (high - low) / 2));
            }
        }
        None
    }
}

/// The bucket of `micros`.
fn bucket(micros: u64) -> usize {
    if micros < SUB_BUCKETS {
        return micros as usize;
    }
    let exponent = 63 - micros.leading_zeros(); // >= SUB_BITS
    let sub = (micros >> (exponent - SUB_BITS)) & (SUB_BUCKETS - 1);
    (SUB_BUCKETS + u64::from(exponent - SUB_BITS) * SUB_BUCKETS + sub) as usize
}

/// The values a bucket holds, `low..=high`.
fn bounds(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < SUB_BUCKETS {
        return (index, index);
    }
    let exponent = (index - SUB_BUCKETS) / SUB_BUCKETS + u64::from(SUB_BITS);
    let sub = (index - SUB_BUCKETS) % SUB_BUCKETS;
    let width = 1u64 << (exponent - u64::from(SUB_BITS));
    let low = (1u64 << exponent) + sub * width;
    (low, low + (width - 1))
}
