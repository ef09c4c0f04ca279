//! Claiming a covered request in the store, and the answers to a claim that does not run it:
//! 409 in flight, 422 mismatch, 429 over quota, 400 for a key or scope the store refuses, 503
//! for a failing store.

use std::sync::Arc;
use std::time::Duration;

use http::Response;
use http_body::Body;

use super::body::ResponseBody;
use super::fingerprint::FINGERPRINT_LEN;
use super::lease::ReleaseGuard;
use super::metrics::{Counter, Metrics};
use super::problem::{Problem, ProblemType, RenderProblem, problem_response, reject};
use crate::{Claim, ClaimOptions, Error, IdempotencyBackend, Input, Lease};

/// A claim's answer, with an acquired lease already in the guard that releases it.
pub(crate) enum Claimed<B: IdempotencyBackend> {
    Acquired(Lease, ReleaseGuard<B>),
    Replay(Vec<u8>),
    InProgress { retry_after: Duration },
    Mismatch,
}

/// Claims in a task of its own. The store applies a claim once it is submitted, even if the
/// request future is dropped while waiting for the answer (the client went away); the claim
/// must still end up owned. The task wraps an acquired lease in a [`ReleaseGuard`] before
/// handing it over, so if nobody receives it, dropping the task's output releases it.
pub(crate) async fn claim_detached<B: IdempotencyBackend>(
    backend: &Arc<B>,
    options: &ClaimOptions,
    metrics: &Metrics,
    scope: Vec<u8>,
    key: String,
    fingerprint: [u8; FINGERPRINT_LEN],
) -> Result<Claimed<B>, Error> {
    let backend = Arc::clone(backend);
    let options = options.clone();
    let metrics = metrics.clone();
    let task = tokio::spawn(async move {
        match backend
            .claim(&scope, key.as_bytes(), &fingerprint, &options)
            .await?
        {
            Claim::Acquired(lease) => Ok(Claimed::Acquired(
                lease.clone(),
                ReleaseGuard::new(backend, lease, metrics),
            )),
            Claim::Replay(replay) => Ok(Claimed::Replay(replay.outcome)),
            Claim::InProgress { retry_after } => Ok(Claimed::InProgress { retry_after }),
            Claim::Mismatch => Ok(Claimed::Mismatch),
        }
    });
    task.await
        .map_err(|e| Error::Internal(format!("the claim task failed: {e}")))?
}

/// 409: the original is still in flight; retry after the time left on its lease, capped.
pub(crate) fn in_flight<ResBody: Body>(
    metrics: &Metrics,
    renderer: &dyn RenderProblem,
    key: &str,
    retry_after: Duration,
    retry_after_max: Duration,
) -> Response<ResponseBody<ResBody>> {
    metrics.inc(Counter::InFlight);
    let retry_after_s = retry_after_seconds(retry_after, retry_after_max);
    tracing::debug!(retry_after_s, "conflict: the original is in flight");
    problem_response(
        renderer,
        &Problem::new(
            ProblemType::InFlight,
            "a request with this idempotency key is still being processed; retry later",
        )
        .with_retry_after(retry_after_s)
        .with_key(key),
    )
}

/// 422: the key was used for another request.
pub(crate) fn mismatch<ResBody: Body>(
    metrics: &Metrics,
    renderer: &dyn RenderProblem,
    key: &str,
) -> Response<ResponseBody<ResBody>> {
    metrics.inc(Counter::Mismatched);
    tracing::info!("mismatch: the key was used for another request");
    problem_response(
        renderer,
        &Problem::new(
            ProblemType::KeyReused,
            "this idempotency key was already used for a request with another method, path, \
             query, body or fingerprinted header; use a new key for a new request",
        )
        .with_key(key),
    )
}

/// The answer to a claim the store refused. What the client sent (a key or scope over the
/// store's limits, a scope over its record quota) is the client's to fix: a 4xx rejection.
/// Anything else is the server's: 503 with an `error` event and a store error counted. That
/// includes a fingerprint over the store's limit: the layer computes it (always
/// [`FINGERPRINT_LEN`] bytes), so only a store configured below that refuses it.
pub(crate) fn refused<ResBody: Body>(
    metrics: &Metrics,
    renderer: &dyn RenderProblem,
    key: &str,
    error: &Error,
) -> Response<ResponseBody<ResBody>> {
    let problem = match *error {
        Error::QuotaExceeded { limit } => Problem::new(
            ProblemType::QuotaExceeded,
            format!("the scope already holds its maximum of {limit} idempotency records"),
        )
        .with_member("limit", limit),
        Error::TooLarge {
            what: Input::Key,
            limit,
            ..
        } => Problem::new(
            ProblemType::InvalidKey,
            format!("the idempotency key is longer than {limit} characters"),
        )
        .with_member("max_length", limit),
        Error::TooSmall {
            what: Input::Key,
            limit,
            ..
        } => Problem::new(
            ProblemType::InvalidKey,
            format!("the idempotency key is shorter than {limit} characters"),
        )
        .with_member("min_length", limit),
        Error::TooLarge {
            what: Input::Scope,
            limit,
            ..
        } => Problem::new(
            ProblemType::InvalidScope,
            format!("the request's scope is longer than {limit} bytes"),
        ),
        Error::TooSmall {
            what: Input::Scope,
            limit,
            ..
        } => Problem::new(
            ProblemType::InvalidScope,
            format!("the request's scope is shorter than {limit} bytes"),
        ),
        _ => {
            metrics.inc(Counter::StoreError);
            tracing::error!(%error, "claim failed");
            let problem = Problem::new(
                ProblemType::StoreUnavailable,
                "the idempotency store failed; the request was not run",
            );
            return problem_response(renderer, &problem.with_key(key));
        }
    };
    reject(metrics, renderer, &problem.with_key(key))
}

/// `Retry-After` in whole seconds: the time left on the original's lease, capped, at least 1.
fn retry_after_seconds(retry_after: Duration, max: Duration) -> u64 {
    let ms = retry_after.min(max).as_millis();
    u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_capped_and_at_least_one() {
        let max = Duration::from_secs(5);
        assert_eq!(retry_after_seconds(Duration::from_millis(1), max), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1500), max), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(60), max), 5);
    }
}
