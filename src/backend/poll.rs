//! The bounded wait of a remote backend: polling with backoff (DESIGN §5).

use std::future::Future;
use std::time::{Duration, Instant};

use crate::core::claim::{Claim, ClaimOptions};
use crate::error::Result;

/// The first pause between polls; it doubles up to [`PAUSE_MAX`].
const PAUSE_MIN: Duration = Duration::from_millis(10);
/// The longest pause between polls.
const PAUSE_MAX: Duration = Duration::from_millis(250);

/// Runs `claim_once` and, while it answers [`Claim::InProgress`] and the caller's wait
/// ([`ClaimOptions::wait`]) lasts, again after a pause that doubles from 10 ms to 250 ms and is
/// bounded by the original's remaining lease and the deadline. Nothing wakes the waiter: a
/// remote store's completion is seen at the next poll.
pub(crate) async fn claim_with_wait<F, Fut>(
    options: &ClaimOptions,
    mut claim_once: F,
) -> Result<Claim>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Claim>>,
{
    let Some(wait) = options.wait_duration() else {
        return claim_once().await;
    };
    let deadline = Instant::now() + wait;
    let mut pause = PAUSE_MIN;
    loop {
        let claim = claim_once().await?;
        let Claim::InProgress { retry_after } = claim else {
            return Ok(claim);
        };
        let now = Instant::now();
        if now >= deadline {
            return Ok(claim);
        }
        tokio::time::sleep(pause.min(retry_after).min(deadline - now)).await;
        pause = (pause * 2).min(PAUSE_MAX);
    }
}
