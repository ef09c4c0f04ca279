//! The chaos client: sends the workload the way real clients fail — responses dropped
//! mid-flight and retried, concurrent duplicate storms, keys reused with other parameters,
//! invalid parameters — and counts every answer.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{StatusCode, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::latency::Histogram;
use crate::rng::Rng;
use crate::supervisor::{self, Supervisor};
use crate::workload::{Kind, Payment};

/// What the client saw, counted as it happened.
#[derive(Default)]
pub struct Tally {
    /// Requests sent, retries included.
    pub requests: AtomicU64,
    /// Requests sent again with the same key and parameters after an attempt that got no final
    /// answer (dropped, refused, 409, 5xx).
    pub retries: AtomicU64,
    /// Responses the client stopped waiting for.
    pub dropped: AtomicU64,
    /// Requests that got no answer (the service was down or the connection broke).
    pub connection_errors: AtomicU64,
    /// Requests a running service left unanswered for [`EXCHANGE_TIMEOUT`] (retried, and a
    /// failed run: a killed process resets its connections, so only a hung one gets here).
    pub unanswered: AtomicU64,
    /// 200 answers.
    pub ok: AtomicU64,
    /// Answers with `Idempotent-Replayed: true`.
    pub replays: AtomicU64,
    /// 409: the original request was still in flight.
    pub conflicts: AtomicU64,
    /// 400 `idempotency_error`: a key reused with other parameters.
    pub mismatches: AtomicU64,
    /// 400 to an invalid payment.
    pub invalid: AtomicU64,
    /// 5xx answers (retried).
    pub server_errors: AtomicU64,
    /// Answers no correct service gives.
    pub unexpected: AtomicU64,
    /// Storms whose copies did not all get the same charge.
    pub storm_disagreements: AtomicU64,
    /// Logical payments finished.
    pub payments_done: AtomicUsize,
    /// Logical payments abandoned after [`ATTEMPTS_MAX`] attempts.
    pub gave_up: AtomicU64,
    /// Service crashes (SIGKILL) followed by a restart.
    pub restarts: AtomicU64,
    /// TCP connections the client opened (a keep-alive client reuses them).
    pub connections_opened: AtomicU64,
    /// Attempts sent to another service process than the payment's previous attempt.
    pub switched: AtomicU64,
}

/// Counts one.
pub fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The count so far.
pub fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The answer to one attempt.
enum Attempt {
    Answered {
        status: StatusCode,
        replayed: bool,
        body: Bytes,
    },
    /// The client gave up waiting (a dropped response).
    Dropped,
    /// No answer within [`EXCHANGE_TIMEOUT`].
    Unanswered,
    /// No connection (the server is down or restarting) or a broken one.
    Failed,
}

/// The client: an HTTP connection pool to the service processes, its tally and its randomness.
pub struct Chaos {
    client: Client<Counted, Full<Bytes>>,
    /// The service processes; each attempt goes to one of them, at random.
    addrs: Vec<SocketAddr>,
    tally: Arc<Tally>,
    rng: Rng,
    /// At most this many requests in flight at once, and so connections in use, if set.
    in_flight: Option<Semaphore>,
    /// How long the answered requests took.
    latencies: Histogram,
}

/// The HTTP connector, counting the connections it opens.
#[derive(Clone)]
pub struct Counted {
    inner: HttpConnector,
    tally: Arc<Tally>,
}

impl tower::Service<Uri> for Counted {
    type Response = <HttpConnector as tower::Service<Uri>>::Response;
    type Error = <HttpConnector as tower::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let tally = Arc::clone(&self.tally);
        Box::pin(async move {
            let stream = connecting.await?;
            add(&tally.connections_opened);
            Ok(stream)
        })
    }
}

/// Attempts per request before the client gives up (never reached in a healthy run).
const ATTEMPTS_MAX: usize = 400;

/// How long one exchange may take before the client stops waiting: far beyond any answer of a
/// live service, so that a hung one fails the run instead of stalling it.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

impl Chaos {
    /// A client of the service processes at `addrs` (one at least), keeping up to
    /// `concurrency` idle connections to each.
    pub fn new(addrs: Vec<SocketAddr>, concurrency: usize, rng: Rng) -> Chaos {
        let tally = Arc::new(Tally::default());
        let connector = Counted {
            inner: HttpConnector::new(),
            tally: Arc::clone(&tally),
        };
        Chaos {
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(concurrency)
                .build(connector),
            addrs,
            tally,
            rng,
            in_flight: None,
            latencies: Histogram::new(),
        }
    }

    /// A client that keeps at most `connections` requests in flight, so at most `connections`
    /// connections in use (kept alive and reused, up to `connections` idle ones).
    pub fn limited(addr: SocketAddr, connections: usize, rng: Rng) -> Chaos {
        Chaos {
            in_flight: Some(Semaphore::new(connections)),
            ..Chaos::new(vec![addr], connections, rng)
        }
    }

    /// The process the next attempt of a payment goes to: one at random, counted as a switch
    /// when it is not the one its previous attempt (`last`) went to.
    fn pick(&self, last: &mut Option<usize>) -> Option<SocketAddr> {
        let i = if self.addrs.len() > 1 {
            self.rng.below(self.addrs.len() as u64) as usize
        } else {
            0
        };
        if last.is_some_and(|previous| previous != i) {
            add(&self.tally.switched);
        }
        *last = Some(i);
        self.addrs.get(i).copied()
    }

    /// How long the answered requests took, so far.
    pub fn latencies(&self) -> &Histogram {
        &self.latencies
    }

    /// What the client saw so far.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Sends one attempt to a process picked by [`Chaos::pick`] (`last`: the process of the
    /// payment's previous attempt).
    async fn send(
        &self,
        payment: &Payment,
        amount: u64,
        drop_after: Option<Duration>,
        last: &mut Option<usize>,
    ) -> Attempt {
        // The semaphore is never closed: `acquire` cannot fail.
        let _slot = match &self.in_flight {
            Some(limit) => limit.acquire().await.ok(),
            None => None,
        };
        add(&self.tally.requests);
        let Some(addr) = self.pick(last) else {
            return Attempt::Failed;
        };
        let request = axum::http::Request::post(format!("http://{addr}/v1/charges"))
            .header("authorization", payment.authorization())
            .header("idempotency-key", &payment.key)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("stripe-version", "2024-06-20")
            .body(Full::new(Bytes::from(payment.body(amount))));
        let Ok(request) = request else {
            return Attempt::Failed;
        };
        let started = Instant::now();
        let exchange = async {
            let response = self.client.request(request).await.ok()?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.ok()?.to_bytes();
            Some((parts, body))
        };
        let answer = match drop_after {
            Some(after) => match tokio::time::timeout(after, exchange).await {
                Ok(answer) => answer,
                Err(_) => {
                    add(&self.tally.dropped);
                    return Attempt::Dropped;
                }
            },
            None => match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
                Ok(answer) => answer,
                Err(_) => {
                    add(&self.tally.unanswered);
                    return Attempt::Unanswered;
                }
            },
        };
        let Some((parts, body)) = answer else {
            add(&self.tally.connection_errors);
            return Attempt::Failed;
        };
        self.latencies.record(started.elapsed());
        let replayed = parts
            .headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        Attempt::Answered {
            status: parts.status,
            replayed,
            body,
        }
    }

    /// Sends until a final answer; returns the charge id (or `None` for a final error).
    async fn settle(&self, payment: &Payment, amount: u64, flaky: bool) -> Option<String> {
        let mut last = None;
        for attempt in 0..ATTEMPTS_MAX {
            if attempt > 0 {
                add(&self.tally.retries);
            }
            let drop_after = (flaky && attempt < 6 && self.rng.chance(35))
                .then(|| Duration::from_micros(self.rng.below(7000)));
            match self.send(payment, amount, drop_after, &mut last).await {
                Attempt::Answered {
                    status: StatusCode::OK,
                    replayed,
                    body,
                } => {
                    add(&self.tally.ok);
                    if replayed {
                        add(&self.tally.replays);
                    }
                    let charge: Value = serde_json::from_slice(&body).unwrap_or_default();
                    return charge["id"].as_str().map(str::to_owned);
                }
                Attempt::Answered {
                    status: StatusCode::CONFLICT,
                    ..
                } => {
                    add(&self.tally.conflicts);
                    // Retry-After says 1 s; the chaos client retries sooner to keep the run
                    // short (a 409 is cheap: a read of committed state).
                    self.pause(5, 20).await;
                }
                Attempt::Answered {
                    status: StatusCode::BAD_REQUEST,
                    replayed,
                    ..
                } if payment.kind == Kind::Invalid => {
                    add(&self.tally.invalid);
                    if replayed {
                        add(&self.tally.replays);
                    }
                    return None;
                }
                Attempt::Answered { status, .. } if status.is_server_error() => {
                    add(&self.tally.server_errors);
                    self.pause(10, 30).await;
                }
                Attempt::Answered { .. } => {
                    add(&self.tally.unexpected);
                    return None;
                }
                Attempt::Dropped => self.pause(1, 10).await,
                Attempt::Failed | Attempt::Unanswered => self.pause(20, 60).await,
            }
        }
        add(&self.tally.gave_up);
        None
    }

    async fn pause(&self, min_ms: u64, max_ms: u64) {
        let ms = min_ms + self.rng.below(max_ms - min_ms + 1);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Runs one logical payment; returns the charge id the client ended up with.
    pub async fn run(self: &Arc<Self>, payment: Arc<Payment>) -> Option<String> {
        match payment.kind {
            Kind::Flaky => self.settle(&payment, payment.amount, true).await,
            Kind::Invalid => {
                self.settle(&payment, payment.amount, false).await;
                self.settle(&payment, payment.amount, false).await
            }
            Kind::Storm => {
                let copies: Vec<_> = (0..8)
                    .map(|_| {
                        let (chaos, payment) = (Arc::clone(self), Arc::clone(&payment));
                        tokio::spawn(
                            async move { chaos.settle(&payment, payment.amount, false).await },
                        )
                    })
                    .collect();
                let mut ids = Vec::new();
                for copy in copies {
                    ids.push(copy.await.ok().flatten());
                }
                let first = ids.first().cloned().flatten();
                if first.is_none() || ids.iter().any(|id| *id != first) {
                    add(&self.tally.storm_disagreements);
                }
                first
            }
            Kind::Reuse => {
                let id = self.settle(&payment, payment.amount, false).await;
                // Same key, other parameters: a client bug the layer refuses, as Stripe does, with
                // a 400 `idempotency_error`.
                let mut last = None;
                for attempt in 0..ATTEMPTS_MAX {
                    if attempt > 0 {
                        add(&self.tally.retries);
                    }
                    match self
                        .send(&payment, payment.amount + 1, None, &mut last)
                        .await
                    {
                        Attempt::Answered {
                            status: StatusCode::BAD_REQUEST,
                            body,
                            ..
                        } if error_type(&body) == Some("idempotency_error".to_owned()) => {
                            add(&self.tally.mismatches);
                            break;
                        }
                        Attempt::Answered { .. } => {
                            add(&self.tally.unexpected);
                            break;
                        }
                        _ => self.pause(20, 60).await,
                    }
                }
                let again = self.settle(&payment, payment.amount, false).await;
                if again != id {
                    add(&self.tally.unexpected);
                }
                id
            }
        }
    }
}

/// Runs every payment on `concurrency` workers while the supervisors crash their service
/// processes `crashes` times in all (in turn), with a progress bar on stderr; returns the
/// charge id each payment ended up with, in the workload's order.
pub async fn drive(
    chaos: Arc<Chaos>,
    payments: &[Arc<Payment>],
    concurrency: usize,
    supervisors: Vec<Arc<Supervisor>>,
    crashes: usize,
) -> Vec<Option<String>> {
    let payments: Arc<[Arc<Payment>]> = payments.into();
    let total = payments.len();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let bar = progress_bar(total);
    let monkey = tokio::spawn(supervisor::crash_monkey(
        supervisors,
        Arc::clone(&chaos),
        crashes,
        total,
        bar.clone(),
    ));
    let progress = tokio::spawn(follow(Arc::clone(&chaos), bar, Arc::clone(&done)));
    let results = Arc::new(Mutex::new(vec![None; total]));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (chaos, next, results) =
                (Arc::clone(&chaos), Arc::clone(&next), Arc::clone(&results));
            let payments = Arc::clone(&payments);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(payment) = payments.get(i) else {
                        break;
                    };
                    let id = chaos.run(Arc::clone(payment)).await;
                    if let Ok(mut results) = results.lock()
                        && let Some(slot) = results.get_mut(i)
                    {
                        *slot = id;
                    }
                    chaos.tally.payments_done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let _ = monkey.await;
    done.store(true, Ordering::Relaxed);
    let _ = progress.await;
    results.lock().map(|r| r.clone()).unwrap_or_default()
}

/// A one-line progress bar on stderr; hidden when stderr is not a terminal.
fn progress_bar(total: usize) -> ProgressBar {
    let style = ProgressStyle::with_template("  [{bar:30}] {pos:>5}/{len} payments  {msg}")
        .expect("the template is a constant that parses")
        .progress_chars("#.");
    ProgressBar::new(total as u64).with_style(style)
}

/// Keeps the bar up to date with the tally until `done`, then finishes it.
async fn follow(chaos: Arc<Chaos>, bar: ProgressBar, done: Arc<AtomicBool>) {
    loop {
        let finished = done.load(Ordering::Relaxed);
        bar.set_position(chaos.tally.payments_done.load(Ordering::Relaxed) as u64);
        bar.set_message(format!(
            "{:>6} requests  {} restarts",
            load(&chaos.tally.requests),
            load(&chaos.tally.restarts),
        ));
        if finished {
            bar.finish();
            if !bar.is_hidden() {
                // The bar leaves the cursor at the end of its line: end it, so the summary
                // starts after a blank line.
                eprintln!();
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `type` of a Stripe error object.
fn error_type(body: &[u8]) -> Option<String> {
    let error: Value = serde_json::from_slice(body).ok()?;
    Some(error["error"]["type"].as_str()?.to_owned())
}
