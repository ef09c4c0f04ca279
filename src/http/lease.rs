//! The lease of a running request: kept alive while the handler runs, and finished exactly
//! once, by a completion or a release, or released when the request future is dropped.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

use super::metrics::{Counter, Metrics};
use super::outcome;
use crate::{Error, IdempotencyBackend, Lease};

/// Polls `work`, extending the lease every third of its length until `work` finishes, so that
/// a live request is never taken over.
pub(crate) async fn keep_alive<F: Future, B: IdempotencyBackend>(
    work: F,
    backend: &B,
    lease: &mut Lease,
    lease_len: Duration,
    metrics: &Metrics,
) -> F::Output {
    let every = (lease_len / 3).max(Duration::from_millis(1));
    let extender = async {
        loop {
            tokio::time::sleep(every).await;
            match backend.extend(lease, lease_len).await {
                Ok(()) => {
                    metrics.inc(Counter::LeaseExtension);
                    tracing::trace!("lease extended");
                }
                Err(Error::LeaseLost { .. }) => {
                    metrics.inc(Counter::LeaseLost);
                    tracing::warn!("lease lost while the handler runs");
                    break;
                }
                Err(error) => tracing::warn!(%error, "lease extension failed; trying again"),
            }
        }
        std::future::pending::<()>().await;
    };
    let mut work = pin!(work);
    let mut extender = pin!(extender);
    poll_fn(move |cx| {
        if let Poll::Ready(output) = work.as_mut().poll(cx) {
            return Poll::Ready(output);
        }
        // Never ready: it only extends the lease while `work` runs.
        let _ = extender.as_mut().poll(cx);
        Poll::Pending
    })
    .await
}

/// Releases the claim if the request ends without finishing it: on an explicit release, and
/// on drop (the request future was dropped, for example because the client went away).
pub(crate) struct ReleaseGuard<B: IdempotencyBackend> {
    backend: Arc<B>,
    lease: Option<Lease>,
    metrics: Metrics,
}

impl<B: IdempotencyBackend> ReleaseGuard<B> {
    /// Guards `lease`, acquired on `backend`.
    pub(crate) fn new(backend: Arc<B>, lease: Lease, metrics: Metrics) -> Self {
        ReleaseGuard {
            backend,
            lease: Some(lease),
            metrics,
        }
    }

    /// Releases the claim as a retryable failure, for `reason`. The guard stays armed until
    /// the release has returned: if this future is dropped first, the drop releases.
    pub(crate) async fn release(&mut self, reason: &'static str) {
        if let Some(lease) = &self.lease {
            release(&*self.backend, lease, &self.metrics, reason).await;
        }
        self.lease = None;
    }

    /// Completes the claim with the response (`body: None`: too large, stored without its
    /// body), retained for `retention`. The caller's response goes out whatever happens here:
    /// the request ran, so the claim is never released from here on, even if completing fails.
    pub(crate) async fn complete(
        &mut self,
        status: StatusCode,
        headers: &HeaderMap,
        body: Option<&[u8]>,
        retention: Duration,
    ) {
        // From here on the side effect has happened: disarm first, never release.
        let Some(lease) = self.lease.take() else {
            return;
        };
        let metrics = &self.metrics;
        // What to store, best first: the response; without its body; without its headers either.
        // A step down follows when the backend's outcome limit is below the layer's.
        let empty = HeaderMap::new();
        let mut candidates = Vec::with_capacity(3);
        if body.is_some() {
            candidates.push((headers, body));
        }
        candidates.push((headers, None));
        candidates.push((&empty, None));
        for (headers, body) in candidates {
            let Some(encoded) = outcome::encode(status, headers, body) else {
                continue;
            };
            match self.backend.complete(&lease, &encoded, retention).await {
                Ok(()) => {
                    if body.is_some() {
                        metrics.inc(Counter::Stored);
                        tracing::debug!(status = status.as_u16(), bytes = encoded.len(), "stored");
                    } else {
                        metrics.inc(Counter::NotStored);
                        tracing::warn!(
                            status = status.as_u16(),
                            "response too large to store: retries get 410"
                        );
                    }
                    return;
                }
                Err(Error::TooLarge { .. }) => continue,
                Err(Error::LeaseLost { .. }) => {
                    metrics.inc(Counter::LeaseLost);
                    tracing::warn!("lease lost before completion: the response was not stored");
                    return;
                }
                Err(error) => {
                    metrics.inc(Counter::StoreError);
                    tracing::error!(
                        %error,
                        "completion failed: the request stays in flight until its lease ends"
                    );
                    return;
                }
            }
        }
        metrics.inc(Counter::StoreError);
        tracing::error!("no form of the response fits the store: the request stays in flight");
    }
}

impl<B: IdempotencyBackend> Drop for ReleaseGuard<B> {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        // Never block here (this may run on an executor thread): release on the runtime.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let backend = Arc::clone(&self.backend);
                let metrics = self.metrics.clone();
                handle.spawn(async move {
                    release(&*backend, &lease, &metrics, "the request was dropped").await;
                });
            }
            Err(_) => tracing::warn!(
                "request dropped outside a Tokio runtime: its claim is left to its lease"
            ),
        }
    }
}

async fn release<B: IdempotencyBackend>(
    backend: &B,
    lease: &Lease,
    metrics: &Metrics,
    reason: &'static str,
) {
    match backend.fail(lease).await {
        Ok(()) => {
            metrics.inc(Counter::Released);
            tracing::debug!(reason, "released");
        }
        Err(Error::LeaseLost { .. }) => {
            metrics.inc(Counter::LeaseLost);
            tracing::warn!(reason, "release found the lease lost");
        }
        Err(error) => {
            metrics.inc(Counter::StoreError);
            tracing::error!(reason, %error, "release failed: the claim is left to its lease");
        }
    }
}
