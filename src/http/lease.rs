//! The lease of a running request: kept alive while the handler runs, its loss signalled to
//! the handler, and finished exactly once, by a completion or a release, or released when the
//! request future is dropped.
//!
//! Every wait here is on Tokio's clock (`tokio::time`), so a test that pauses it
//! (`tokio::time::pause`, `start_paused`) drives the lease keeper without sleeping.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::{HeaderMap, Response, StatusCode};
use http_body::Body;
use tokio::time::{Instant, sleep_until, timeout_at};
use tracing::Instrument as _;

use super::body::ResponseBody;
use super::metrics::{Counter, Metrics};
use super::outcome;
use super::problem::{Problem, ProblemType, RenderProblem, problem_response};
use super::signal::LostSignal;
use crate::{Error, IdempotencyBackend, Lease};

/// Polls `work`, extending the lease every third of its length until `work` finishes, so that
/// a live request is never taken over.
///
/// Sets `lost` (and stops extending) when the lease is lost: an extension answers
/// [`Error::LeaseLost`], or no extension has succeeded for a whole `lease_len`, after which the
/// lease has certainly run out. The store set the lease's end when it committed the claim or the
/// last extension, before this loop saw the answer, so "a whole `lease_len` after the last
/// answer" is never early. Failed extensions are retried at the same pace until then.
pub(crate) async fn keep_alive<F: Future, B: IdempotencyBackend>(
    work: F,
    backend: &B,
    lease: &mut Lease,
    lease_len: Duration,
    lost: &LostSignal,
    metrics: &Metrics,
) -> F::Output {
    let every = (lease_len / 3).max(Duration::from_millis(1));
    let keeper = async {
        // The store committed the claim, and so set the lease's end, before this started.
        let mut deadline = Instant::now() + lease_len;
        loop {
            sleep_until((Instant::now() + every).min(deadline)).await;
            if Instant::now() >= deadline {
                break;
            }
            // An extension still unanswered at the deadline comes too late: the lease is out.
            match timeout_at(deadline, backend.extend(lease, lease_len)).await {
                Ok(Ok(())) => {
                    deadline = Instant::now() + lease_len;
                    metrics.inc(Counter::LeaseExtension);
                    tracing::trace!("lease extended");
                }
                Ok(Err(Error::LeaseLost { .. })) => {
                    signal_lost(
                        lost,
                        metrics,
                        "the lease was taken over or its record is gone",
                    );
                    return;
                }
                Ok(Err(error)) => tracing::warn!(%error, "lease extension failed; trying again"),
                Err(_elapsed) => break,
            }
        }
        signal_lost(
            lost,
            metrics,
            "no lease extension succeeded before the lease ran out",
        );
    };
    let mut work = pin!(work);
    let mut keeper = pin!(keeper);
    let mut keeping = true;
    poll_fn(move |cx| {
        if let Poll::Ready(output) = work.as_mut().poll(cx) {
            return Poll::Ready(output);
        }
        // The keeper only extends the lease while `work` runs; once it has given up (the
        // lease is lost), `work` goes on alone.
        if keeping && keeper.as_mut().poll(cx).is_ready() {
            keeping = false;
        }
        Poll::Pending
    })
    .await
}

/// Sets the lease-lost signal, counting and logging the loss once per lease.
fn signal_lost(lost: &LostSignal, metrics: &Metrics, why: &'static str) {
    if lost.set() {
        metrics.inc(Counter::LeaseLost);
        tracing::warn!(why, "lease lost while the request runs");
    }
}

/// How a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Stored: the response, or its status and headers only (too large).
    Stored,
    /// The lease no longer owns the record (fencing): nothing was stored, and another attempt
    /// may hold the key.
    LeaseLost,
    /// The store failed: the record stays in flight until its lease ends.
    Failed,
}

/// 409: the request ran, but its lease was lost before its response could be stored. The
/// response is not sent: the record of the attempt that holds the key is the one answer every
/// retry gets, so this caller retries too and gets it.
pub(crate) fn superseded<ResBody: Body>(
    renderer: &dyn RenderProblem,
    key: &str,
) -> Response<ResponseBody<ResBody>> {
    problem_response(
        renderer,
        &Problem::new(
            ProblemType::LeaseLost,
            "the request lost its claim on this idempotency key before its response could be \
             stored (it outlived its lease and another attempt took over); retry to get the \
             answer of the attempt that holds the key",
        )
        .with_retry_after(1)
        .with_key(key),
    )
}

/// Releases the claim if the request ends without finishing it: on an explicit release, and
/// on drop (the request future was dropped, for example because the client went away).
///
/// It also holds the lease's lost signal, set by whichever of the keeper, the completion or the
/// release finds the lease lost first.
pub(crate) struct ReleaseGuard<B: IdempotencyBackend> {
    backend: Arc<B>,
    lease: Option<Lease>,
    lost: LostSignal,
    metrics: Metrics,
}

impl<B: IdempotencyBackend> ReleaseGuard<B> {
    /// Guards `lease`, acquired on `backend`.
    pub(crate) fn new(backend: Arc<B>, lease: Lease, metrics: Metrics) -> Self {
        ReleaseGuard {
            backend,
            lease: Some(lease),
            lost: LostSignal::new(),
            metrics,
        }
    }

    /// The signal set when the lease is found lost.
    pub(crate) fn lost_signal(&self) -> &LostSignal {
        &self.lost
    }

    /// Releases the claim as a retryable failure, for `reason`. The guard stays armed until
    /// the release has returned: if this future is dropped first, the drop releases.
    pub(crate) async fn release(&mut self, reason: &'static str) {
        if let Some(lease) = &self.lease {
            release(&*self.backend, lease, &self.lost, &self.metrics, reason).await;
        }
        self.lease = None;
    }

    /// Completes the claim with the response (`body: None`: too large, stored without its
    /// body), retained for `retention`. The request ran, so the claim is never released from
    /// here on, even if completing fails.
    ///
    /// The completion runs in a task of its own, as the claim does: once started it finishes
    /// even if the request future is dropped (the client went away while the response was
    /// being stored). Otherwise a remote store, whose call may not have been sent yet, would
    /// leave the record in flight until its lease ends, answering every retry 409 meanwhile.
    pub(crate) async fn complete(
        &mut self,
        status: StatusCode,
        headers: &HeaderMap,
        body: Option<&[u8]>,
        retention: Duration,
    ) -> Completion {
        // From here on the side effect has happened: disarm first, never release.
        let Some(lease) = self.lease.take() else {
            // Finished already (never: a request completes or releases once). Nothing stored.
            return Completion::Failed;
        };
        // The response as stored, encoded here so that the task owns it; the fallbacks without
        // the body are encoded only if the backend refuses it.
        let response = ToStore {
            status,
            headers: headers.clone(),
            full: body.and_then(|body| outcome::encode(status, headers, Some(body))),
        };
        let task = tokio::spawn(
            complete_detached(
                Arc::clone(&self.backend),
                lease,
                response,
                retention,
                self.lost.clone(),
                self.metrics.clone(),
            )
            .instrument(tracing::Span::current()),
        );
        match task.await {
            Ok(completion) => completion,
            Err(error) => {
                self.metrics.inc(Counter::StoreError);
                tracing::error!(%error, "the completion task failed: the request stays in flight");
                Completion::Failed
            }
        }
    }
}

/// A response to store, owned by the completion task.
struct ToStore {
    status: StatusCode,
    /// The replayable headers.
    headers: HeaderMap,
    /// The response with its body, encoded; `None` if it is stored without its body.
    full: Option<Vec<u8>>,
}

/// [`ReleaseGuard::complete`]'s task: stores the response with its body, or, if the backend's
/// outcome limit refuses that, its status and headers, or its status alone.
async fn complete_detached<B: IdempotencyBackend>(
    backend: Arc<B>,
    lease: Lease,
    response: ToStore,
    retention: Duration,
    lost: LostSignal,
    metrics: Metrics,
) -> Completion {
    let ToStore {
        status,
        headers,
        full,
    } = response;
    // What to store, best first: the response; without its body; without its headers either.
    // A step down follows when the backend's outcome limit is below the layer's.
    let empty = HeaderMap::new();
    let with_body = full.map(|encoded| (Some(encoded), true));
    let fallbacks = [&headers, &empty]
        .into_iter()
        .map(|headers| (outcome::encode(status, headers, None), false));
    for (encoded, has_body) in with_body.into_iter().chain(fallbacks) {
        let Some(encoded) = encoded else {
            continue;
        };
        match backend.complete(&lease, &encoded, retention).await {
            Ok(()) => {
                if has_body {
                    metrics.inc(Counter::Stored);
                    tracing::debug!(status = status.as_u16(), bytes = encoded.len(), "stored");
                } else {
                    metrics.inc(Counter::NotStored);
                    tracing::warn!(
                        status = status.as_u16(),
                        "response too large to store: retries get 410"
                    );
                }
                return Completion::Stored;
            }
            Err(Error::TooLarge { .. }) => continue,
            Err(Error::LeaseLost { .. }) => {
                // Fencing at work, not a store failure: another attempt holds the key (or the
                // record is gone), and its answer is the one to keep.
                if lost.set() {
                    metrics.inc(Counter::LeaseLost);
                }
                tracing::warn!(
                    status = status.as_u16(),
                    "lease lost before completion: the response was not stored; answered 409"
                );
                return Completion::LeaseLost;
            }
            Err(error) => {
                metrics.inc(Counter::StoreError);
                tracing::error!(
                    %error,
                    "completion failed: the request stays in flight until its lease ends"
                );
                return Completion::Failed;
            }
        }
    }
    metrics.inc(Counter::StoreError);
    tracing::error!("no form of the response fits the store: the request stays in flight");
    Completion::Failed
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
                let lost = self.lost.clone();
                let metrics = self.metrics.clone();
                handle.spawn(async move {
                    release(
                        &*backend,
                        &lease,
                        &lost,
                        &metrics,
                        "the request was dropped",
                    )
                    .await;
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
    lost: &LostSignal,
    metrics: &Metrics,
    reason: &'static str,
) {
    match backend.fail(lease).await {
        Ok(()) => {
            metrics.inc(Counter::Released);
            tracing::debug!(reason, "released");
        }
        Err(Error::LeaseLost { .. }) => {
            if lost.set() {
                metrics.inc(Counter::LeaseLost);
            }
            tracing::warn!(reason, "release found the lease lost");
        }
        Err(error) => {
            metrics.inc(Counter::StoreError);
            tracing::error!(reason, %error, "release failed: the claim is left to its lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::http::MetricsSnapshot;
    use crate::{Claim, ClaimOptions};

    /// How every extension of [`Extensions`] answers.
    #[derive(Clone, Copy)]
    enum Answer {
        Extended,
        Failed,
        LeaseLost,
        Never,
    }

    /// A backend that only extends, answering each extension the same way, and counts them.
    struct Extensions {
        answer: Answer,
        calls: AtomicUsize,
        limits: crate::Limits,
    }

    impl IdempotencyBackend for Extensions {
        async fn claim(
            &self,
            _: &[u8],
            _: &[u8],
            _: &[u8],
            _: &ClaimOptions,
        ) -> Result<Claim, Error> {
            Err(Error::Internal("not used".to_owned()))
        }

        async fn complete(&self, _: &Lease, _: &[u8], _: Duration) -> Result<(), Error> {
            Err(Error::Internal("not used".to_owned()))
        }

        async fn fail(&self, _: &Lease) -> Result<(), Error> {
            Err(Error::Internal("not used".to_owned()))
        }

        async fn extend(&self, lease: &mut Lease, _: Duration) -> Result<(), Error> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match self.answer {
                Answer::Extended => Ok(()),
                Answer::Failed => Err(Error::Io(Arc::new(std::io::Error::other("unreachable")))),
                Answer::LeaseLost => Err(Error::LeaseLost {
                    token: lease.token(),
                }),
                Answer::Never => std::future::pending().await,
            }
        }

        async fn checkpoint(&self, _: &Lease, _: &[u8]) -> Result<(), Error> {
            Err(Error::Internal("not used".to_owned()))
        }

        async fn get(&self, _: &[u8], _: &[u8]) -> Result<Option<crate::Record>, Error> {
            Err(Error::Internal("not used".to_owned()))
        }

        async fn forget(&self, _: &[u8], _: &[u8]) -> Result<bool, Error> {
            Err(Error::Internal("not used".to_owned()))
        }

        async fn orphans(&self, _: usize) -> Result<Vec<crate::Orphan>, Error> {
            Err(Error::Internal("not used".to_owned()))
        }

        async fn sweep(&self, _: usize) -> Result<crate::Swept, Error> {
            Err(Error::Internal("not used".to_owned()))
        }

        fn capabilities(&self) -> crate::Capabilities {
            crate::Capabilities {
                name: "extensions-only",
                shared: false,
                durable: false,
                needs_sweep: false,
                orphans_scan: false,
                wakes_waiters: false,
                exact_quota: true,
            }
        }

        fn limits(&self) -> &crate::Limits {
            &self.limits
        }
    }

    const LEASE: Duration = Duration::from_secs(30);

    /// Runs a handler that lasts `runs` (or until the signal, if sooner) under [`keep_alive`]
    /// on paused time. Returns when the signal was set (time since the start), the number of
    /// extensions asked for, and the metrics.
    async fn run(answer: Answer, runs: Duration) -> (Option<Duration>, usize, MetricsSnapshot) {
        let backend = Extensions {
            answer,
            calls: AtomicUsize::new(0),
            limits: crate::Limits::default(),
        };
        let mut lease =
            Lease::from_parts(b"scope", b"key", 7, 0, 1, None, false).expect("a valid lease");
        let (lost, metrics) = (LostSignal::new(), Metrics::new());
        let began = Instant::now();
        let work = async {
            let _ = tokio::time::timeout(runs, lost.wait()).await;
            lost.is_set().then(|| began.elapsed())
        };
        let lost_after = keep_alive(work, &backend, &mut lease, LEASE, &lost, &metrics).await;
        // The keeper is gone with `keep_alive`: it asks for nothing more, whatever time passes.
        let calls = backend.calls.load(Ordering::SeqCst);
        tokio::time::sleep(LEASE * 10).await;
        assert_eq!(backend.calls.load(Ordering::SeqCst), calls);
        (lost_after, calls, metrics.snapshot())
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_lease_is_extended_every_third_and_never_lost() {
        let (lost_after, calls, m) = run(Answer::Extended, LEASE * 4 + LEASE / 6).await;
        assert_eq!(lost_after, None);
        assert_eq!(calls, 12, "at 10 s, 20 s, ... 120 s");
        assert_eq!((m.lease_extensions, m.leases_lost), (12, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_lost_to_another_owner_is_signalled_at_the_extension_that_finds_it() {
        let (lost_after, calls, m) = run(Answer::LeaseLost, LEASE * 4).await;
        assert_eq!(lost_after, Some(LEASE / 3));
        assert_eq!(calls, 1, "no extension after the loss");
        assert_eq!((m.lease_extensions, m.leases_lost), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn failing_extensions_are_retried_until_the_lease_has_run_out() {
        let (lost_after, calls, m) = run(Answer::Failed, LEASE * 4).await;
        assert_eq!(
            lost_after,
            Some(LEASE),
            "not before the lease's end, not later"
        );
        assert_eq!(calls, 2, "at 10 s and 20 s; at 30 s the lease is out");
        assert_eq!((m.lease_extensions, m.leases_lost), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_extension_unanswered_at_the_end_of_the_lease_is_too_late() {
        let (lost_after, calls, m) = run(Answer::Never, LEASE * 4).await;
        assert_eq!(lost_after, Some(LEASE));
        assert_eq!(calls, 1);
        assert_eq!(m.leases_lost, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_done_within_its_lease_is_never_told() {
        let (lost_after, calls, m) = run(Answer::Failed, LEASE / 2).await;
        assert_eq!((lost_after, calls, m.leases_lost), (None, 1, 0));
    }
}
