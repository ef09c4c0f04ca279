//! How long the log's syncs take: a histogram of sync durations since open, with four
//! buckets per power of two of microseconds (each bucket's bounds within 19 % of each other),
//! kept in atomics so that `Stats` reads it while the writer holds the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two.
const SUB: u32 = 4;
/// Powers of two covered: up to 2^36 µs (about 19 hours); longer syncs count in the last.
const POWERS: u32 = 36;
const BUCKETS: usize = (POWERS * SUB) as usize;

/// Sync durations since open.
pub(crate) struct SyncTimes {
    buckets: [AtomicU64; BUCKETS],
    max_us: AtomicU64,
}

impl Default for SyncTimes {
    fn default() -> Self {
        SyncTimes {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            max_us: AtomicU64::new(0),
        }
    }
}

/// The bucket of a duration of `us` microseconds: below 4 µs one bucket per microsecond,
/// above that the power of two and the next two bits.
fn bucket(us: u64) -> usize {
    if us < u64::from(SUB) {
        return usize::try_from(us).unwrap_or(0);
    }
    let power = 63 - us.leading_zeros();
    let sub = (us >> (power - 2)) & u64::from(SUB - 1);
    let index = u64::from((power - 1) * SUB) + sub;
    usize::try_from(index).map_or(BUCKETS - 1, |i| i.min(BUCKETS - 1))
}

/// The largest duration (µs) bucket `index` holds.
fn upper_bound(index: usize) -> u64 {
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    if index < SUB {
        return u64::from(index);
    }
    let power = index / SUB + 1;
    let sub = u64::from(index % SUB);
    ((u64::from(SUB) + sub + 1) << (power - 2)) - 1
}

impl SyncTimes {
    /// Counts one sync that took `took`.
    pub(crate) fn record(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        if let Some(b) = self.buckets.get(bucket(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Syncs counted, the duration (µs) below which a fraction `q` of them took (the upper
    /// bound of the bucket the quantile falls in, and never above the longest), and the longest.
    pub(crate) fn summary(&self, q: f64) -> (u64, u64, u64) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let max = self.max_us.load(Ordering::Relaxed);
        if total == 0 {
            return (0, 0, max);
        }
        // The rank of the quantile, 1-based: the smallest count covering a fraction `q`.
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return (total, upper_bound(i).min(max), max);
            }
        }
        (total, max, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_their_bounds_hold_what_they_count() {
        let mut last = 0;
        for us in 0..100_000u64 {
            let b = bucket(us);
            assert!(b >= last, "bucket of {us} went back");
            last = b;
            assert!(us <= upper_bound(b), "{us} above its bucket's bound");
            assert!(
                b == 0 || us > upper_bound(b - 1),
                "{us} fits the bucket below"
            );
        }
    }

    #[test]
    fn the_quantile_falls_in_the_bucket_of_the_slow_tail() {
        let times = SyncTimes::default();
        for _ in 0..990 {
            times.record(Duration::from_micros(200));
        }
        for _ in 0..10 {
            times.record(Duration::from_millis(40));
        }
        let (n, p99, max) = times.summary(0.99);
        assert_eq!((n, max), (1000, 40_000));
        assert!((200..240).contains(&p99), "p99 {p99}");
        let (_, p999, _) = times.summary(0.999);
        assert!(
            (40_000 - 40_000 / 5..=40_000).contains(&p999),
            "p99.9 {p999}"
        );
        assert_eq!(SyncTimes::default().summary(0.99), (0, 0, 0));
    }
}
