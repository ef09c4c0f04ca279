//! How long to wait before the next attempt: the server's `Retry-After`, or exponential backoff
//! with full jitter.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::RETRY_AFTER;

/// The ceiling of the wait before retry number `retry` (0 for the first retry):
/// `min(max_delay, base_delay * 2^retry)`, saturating instead of overflowing.
pub(super) fn ceiling(base_delay: Duration, max_delay: Duration, retry: u32) -> Duration {
    let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
    base_delay.saturating_mul(factor).min(max_delay)
}

/// AWS's "full jitter": a wait drawn uniformly from `0..=ceiling`. Spreading retries over the
/// whole window keeps clients that failed together from retrying together.
pub(super) fn full_jitter(rng: &mut fastrand::Rng, ceiling: Duration) -> Duration {
    let ceiling_ns = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(0..=ceiling_ns))
}

/// The wait a `Retry-After` header asks for, in either form: delay-seconds (`120`) or an
/// HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`, measured against `now`; a date in the past is no
/// wait). `None` without the header or when it is malformed, so that the backoff applies.
pub(super) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    // A delay-seconds too long for a `u64` is still a delay (RFC 9110 allows any number of
    // digits): the longest one, not none.
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::MAX);
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_str(value).expect("a valid header value"),
        );
        headers
    }

    #[test]
    fn the_ceiling_doubles_from_the_base_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        let ceilings: Vec<_> = (0..6).map(|retry| ceiling(base, cap, retry)).collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
        assert_eq!(ceiling(base, Duration::MAX, 200), base * u32::MAX);
    }

    #[test]
    fn full_jitter_stays_within_the_ceiling_and_spreads_over_it() {
        let mut rng = fastrand::Rng::with_seed(7);
        let ceiling = Duration::from_millis(800);
        let waits: Vec<_> = (0..1000).map(|_| full_jitter(&mut rng, ceiling)).collect();
        assert!(waits.iter().all(|wait| *wait <= ceiling));
        assert!(waits.iter().any(|wait| *wait < ceiling / 4));
        assert!(waits.iter().any(|wait| *wait > ceiling * 3 / 4));
        assert_eq!(full_jitter(&mut rng, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_400);
        assert_eq!(
            retry_after(&headers("120"), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2015 07:28:00 GMT"), now),
            Some(Duration::from_secs(1_445_412_480 - 1_445_412_400))
        );
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2015 07:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(&headers("99999999999999999999999"), now),
            Some(Duration::MAX)
        );
        assert_eq!(retry_after(&headers("soon"), now), None);
        assert_eq!(retry_after(&headers("-5"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
