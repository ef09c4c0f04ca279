//! [`Idempotency`]: the service that claims, runs, stores and replays requests.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tower::Service;
use tracing::Instrument;

use super::body::{RequestBody, ResponseBody};
use super::fingerprint::fingerprint;
use super::future::{CatchUnwind, ResponseFuture};
use super::layer::{Config, IDEMPOTENT_REPLAYED, IdempotencyLayer};
use super::metrics::{Counter, Metrics};
use super::outcome;
use super::policy::{StoreDecision, StorePolicy};
use super::problem::{Problem, ProblemType};
use super::scope::ScopeExtractor;
use crate::backend::IdempotencyBackend;
use crate::error::Error;
use crate::limits::{KEY_LEN_MAX, SCOPE_LEN_MAX};
use crate::{Claim, Lease};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a handler learns about the claim it runs under, from the request extensions of every
/// request the layer executes: above all whether an earlier attempt may already have performed
/// the side effect.
///
/// `attempt` is 1 for the first run. A higher attempt follows a released claim (a stored
/// policy release, an error, a panic, a dropped request) or a takeover of a request whose owner
/// died ([`is_takeover`](Self::is_takeover)): the earlier attempt may have run some or all of
/// the side effect, so check the downstream system (reconcile) before repeating it.
///
/// ```
/// use axum::Extension;
/// use idemstore::http::IdempotentRequest;
///
/// async fn create_charge(Extension(claim): Extension<IdempotentRequest>) -> &'static str {
///     if claim.attempt() > 1 {
///         // look the charge up by `claim.key()` before creating it again
///     }
///     "ok"
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentRequest {
    key: String,
    attempt: u32,
    takeover: bool,
    checkpoint: Option<Vec<u8>>,
}

impl IdempotentRequest {
    /// The idempotency key of the request (without `sf-string` quotes).
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Which attempt this is: 1 for the first run.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether this run took over a request whose previous owner was gone (its lease ran out,
    /// or its process died).
    #[must_use]
    pub fn is_takeover(&self) -> bool {
        self.takeover
    }

    /// The recovery point left by a previous attempt, if any.
    #[must_use]
    pub fn checkpoint(&self) -> Option<&[u8]> {
        self.checkpoint.as_deref()
    }
}

/// What every clone of a service shares.
struct Shared<B, X, P> {
    backend: Arc<B>,
    scope: Arc<X>,
    policy: Arc<P>,
    config: Arc<Config>,
    metrics: Metrics,
}

/// The idempotency middleware service, made by [`IdempotencyLayer`]: see the
/// [module docs](super) for what it does with each request.
pub struct Idempotency<S, B, X, P> {
    inner: S,
    shared: Arc<Shared<B, X, P>>,
}

impl<S, B, X, P> Idempotency<S, B, X, P> {
    pub(crate) fn new(inner: S, layer: IdempotencyLayer<B, X, P>) -> Self {
        Idempotency {
            inner,
            shared: Arc::new(Shared {
                backend: layer.backend,
                scope: layer.scope,
                policy: layer.policy,
                config: layer.config,
                metrics: layer.metrics,
            }),
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The counters of this service's decisions (shared with its layer).
    #[must_use]
    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.clone()
    }
}

impl<S: Clone, B, X, P> Clone for Idempotency<S, B, X, P> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: std::fmt::Debug, B, X, P> std::fmt::Debug for Idempotency<S, B, X, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// The idempotency key header of a request.
enum KeyHeader {
    Absent,
    Invalid(&'static str),
    Valid(String),
}

/// Reads the key: 1 to 255 visible ASCII characters (`!` to `~`), once. The IETF draft sends
/// it as a structured-field string (`"..."`); the quotes are removed, so `"k"` and `k` are
/// the same key.
fn read_key(headers: &HeaderMap, name: &HeaderName) -> KeyHeader {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return KeyHeader::Absent;
    };
    if values.next().is_some() {
        return KeyHeader::Invalid("the idempotency key header is sent more than once");
    }
    let bytes = match value.as_bytes() {
        [b'"', inner @ .., b'"'] => inner,
        bytes => bytes,
    };
    if bytes.is_empty() {
        return KeyHeader::Invalid("the idempotency key is empty");
    }
    if bytes.len() > KEY_LEN_MAX {
        return KeyHeader::Invalid("the idempotency key is longer than 255 characters");
    }
    if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return KeyHeader::Invalid(
            "the idempotency key may only contain visible ASCII characters (no spaces)",
        );
    }
    match String::from_utf8(bytes.to_vec()) {
        Ok(key) => KeyHeader::Valid(key),
        Err(_) => KeyHeader::Invalid("the idempotency key is not ASCII"),
    }
}

impl<S, B, X, P, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, B, X, P>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: IdempotencyBackend,
    X: ScopeExtractor,
    P: StorePolicy,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        let config = &shared.config;
        if !config.methods.contains(request.method()) {
            shared.metrics.inc(Counter::PassedThrough);
            return ResponseFuture::passthrough(
                self.inner.call(request.map(RequestBody::streaming)),
            );
        }
        let key = match read_key(request.headers(), &config.key_header) {
            KeyHeader::Valid(key) => key,
            KeyHeader::Absent if !config.require_key => {
                shared.metrics.inc(Counter::PassedThrough);
                return ResponseFuture::passthrough(
                    self.inner.call(request.map(RequestBody::streaming)),
                );
            }
            KeyHeader::Absent => {
                let detail = format!(
                    "{} {} requires an `{}` header",
                    request.method(),
                    request.uri().path(),
                    config.key_header
                );
                return ResponseFuture::ready(reject(
                    shared,
                    Problem::new(ProblemType::MissingKey, detail),
                ));
            }
            KeyHeader::Invalid(why) => {
                return ResponseFuture::ready(reject(
                    shared,
                    Problem::new(ProblemType::InvalidKey, why).member("max_length", KEY_LEN_MAX),
                ));
            }
        };
        // The ready service goes into the future and a fresh clone stays (tower's usual dance).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let span = tracing::debug_span!(
            "idempotency",
            key = %key,
            method = %request.method(),
            path = %request.uri().path(),
        );
        let shared = Arc::clone(shared);
        ResponseFuture::idempotent(Box::pin(run(shared, inner, request, key).instrument(span)))
    }
}

/// Answers with a problem without touching the store, counting it as a rejection.
fn reject<B, X, P, ResBody: Body>(
    shared: &Shared<B, X, P>,
    problem: Problem,
) -> Response<ResponseBody<ResBody>> {
    shared.metrics.inc(Counter::Rejected);
    tracing::debug!(problem = problem.kind().uri(), "rejected");
    problem_response(problem)
}

fn problem_response<ResBody: Body>(problem: Problem) -> Response<ResponseBody<ResBody>> {
    problem.into_response().map(ResponseBody::full)
}

/// The covered path: scope, body, fingerprint, claim; then run, replay or refuse.
async fn run<S, B, X, P, ReqBody, ResBody>(
    shared: Arc<Shared<B, X, P>>,
    inner: S,
    request: Request<ReqBody>,
    key: String,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    B: IdempotencyBackend,
    X: ScopeExtractor,
    P: StorePolicy,
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body,
{
    let config = Arc::clone(&shared.config);
    let (parts, body) = request.into_parts();
    let Some(scope) = shared.scope.scope(&parts) else {
        return Ok(reject(
            &shared,
            Problem::new(
                ProblemType::InvalidScope,
                "the request has no scope (for example no authenticated principal), so it cannot \
                 be made idempotent",
            ),
        ));
    };
    if scope.len() > SCOPE_LEN_MAX {
        return Ok(reject(
            &shared,
            Problem::new(
                ProblemType::InvalidScope,
                format!("the request's scope is longer than {SCOPE_LEN_MAX} bytes"),
            ),
        ));
    }
    let limit = config.request_body_limit_bytes;
    let body = match read_request_body(&parts.headers, body, limit).await {
        Ok(body) => body,
        Err(ReadError::TooLarge) => {
            return Ok(reject(
                &shared,
                Problem::new(
                    ProblemType::BodyTooLarge,
                    format!("the request body is larger than {limit} bytes"),
                )
                .member("limit", limit),
            ));
        }
        Err(ReadError::Read(error)) => {
            return Ok(reject(
                &shared,
                Problem::new(
                    ProblemType::UnreadableBody,
                    format!("the request body could not be read: {error}"),
                ),
            ));
        }
    };
    let fingerprint = fingerprint(
        &parts.method,
        &parts.uri,
        &parts.headers,
        &config.fingerprint_headers,
        &body,
    );
    let claim = claim_detached(&shared, scope, key.clone(), fingerprint).await;
    match claim {
        Ok(Claimed::Acquired(lease, guard)) => {
            let request = Request::from_parts(parts, RequestBody::buffered(body));
            execute(&shared, inner, request, key, lease, guard).await
        }
        Ok(Claimed::Replay(outcome)) => Ok(replay_response(&shared, &outcome)),
        Ok(Claimed::InProgress { retry_after }) => {
            shared.metrics.inc(Counter::InFlight);
            let retry_after_s = retry_after_seconds(retry_after, config.retry_after_max);
            tracing::debug!(retry_after_s, "conflict: the original is in flight");
            Ok(problem_response(
                Problem::new(
                    ProblemType::InFlight,
                    "a request with this idempotency key is still being processed; retry later",
                )
                .retry_after(retry_after_s),
            ))
        }
        Ok(Claimed::Mismatch) => {
            shared.metrics.inc(Counter::Mismatched);
            tracing::info!("mismatch: the key was used for another request");
            Ok(problem_response(Problem::new(
                ProblemType::KeyReused,
                "this idempotency key was already used for a request with another method, \
                 path, query, body or fingerprinted header; use a new key for a new request",
            )))
        }
        Err(Error::QuotaExceeded { limit }) => Ok(reject(
            &shared,
            Problem::new(
                ProblemType::QuotaExceeded,
                format!("the scope already holds its maximum of {limit} idempotency records"),
            )
            .member("limit", limit),
        )),
        Err(error) => {
            shared.metrics.inc(Counter::StoreError);
            tracing::error!(%error, "claim failed");
            Ok(problem_response(Problem::new(
                ProblemType::StoreUnavailable,
                "the idempotency store failed; the request was not run",
            )))
        }
    }
}

/// A claim's answer, with an acquired lease already in the guard that releases it.
enum Claimed<B: IdempotencyBackend> {
    Acquired(Lease, ReleaseGuard<B>),
    Replay(Vec<u8>),
    InProgress { retry_after: Duration },
    Mismatch,
}

/// Claims in a task of its own. The store applies a claim once it is submitted, even if the
/// request future is dropped while waiting for the answer (the client went away); the claim
/// must still end up owned. The task wraps an acquired lease in a [`ReleaseGuard`] before
/// handing it over, so if nobody receives it, dropping the task's output releases it.
async fn claim_detached<B: IdempotencyBackend, X, P>(
    shared: &Shared<B, X, P>,
    scope: Vec<u8>,
    key: String,
    fingerprint: [u8; super::FINGERPRINT_LEN],
) -> Result<Claimed<B>, Error> {
    let backend = Arc::clone(&shared.backend);
    let options = shared.config.claim.clone();
    let metrics = shared.metrics.clone();
    let task = tokio::spawn(async move {
        match backend
            .claim(&scope, key.as_bytes(), &fingerprint, &options)
            .await?
        {
            Claim::Acquired(lease) => Ok(Claimed::Acquired(
                lease.clone(),
                ReleaseGuard {
                    backend,
                    lease: Some(lease),
                    metrics,
                },
            )),
            Claim::Replay(replay) => Ok(Claimed::Replay(replay.outcome)),
            Claim::InProgress { retry_after } => Ok(Claimed::InProgress { retry_after }),
            Claim::Mismatch => Ok(Claimed::Mismatch),
        }
    });
    task.await
        .map_err(|e| Error::Internal(format!("the claim task failed: {e}")))?
}

/// `Retry-After` in whole seconds: the time left on the original's lease, capped, at least 1.
fn retry_after_seconds(retry_after: Duration, max: Duration) -> u64 {
    let ms = retry_after.min(max).as_millis();
    u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX).max(1)
}

enum ReadError {
    TooLarge,
    Read(BoxError),
}

/// Reads a request body in full, refusing one over `limit` as early as its declared length
/// allows.
async fn read_request_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
) -> Result<Bytes, ReadError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let limit_u64 = limit as u64;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit_u64) || body.size_hint().lower() > limit_u64 {
        return Err(ReadError::TooLarge);
    }
    let mut body = pin!(body);
    let mut chunks = Chunks::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Read(e.into()))?;
        if let Ok(mut data) = frame.into_data() {
            chunks.push(data.copy_to_bytes(data.remaining()));
            if chunks.len > limit {
                return Err(ReadError::TooLarge);
            }
        }
    }
    Ok(chunks.concat())
}

/// Body chunks read so far, joined without a copy when there is only one.
#[derive(Default)]
struct Chunks {
    parts: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, bytes: Bytes) {
        self.len = self.len.saturating_add(bytes.len());
        if !bytes.is_empty() {
            self.parts.push(bytes);
        }
    }

    fn concat(mut self) -> Bytes {
        if self.parts.len() <= 1 {
            return self.parts.pop().unwrap_or_default();
        }
        let mut out = BytesMut::with_capacity(self.len);
        for part in self.parts {
            out.extend_from_slice(&part);
        }
        out.freeze()
    }
}

/// A response body after the attempt to read it for storing.
enum Collected<B: Body> {
    /// Read in full, within the limit.
    Complete(Bytes),
    /// Over the limit: what was read, and the rest still to stream.
    TooLarge {
        prefix: Bytes,
        rest: std::pin::Pin<Box<B>>,
    },
    /// The body failed after `prefix`.
    Failed { prefix: Bytes, error: B::Error },
}

async fn collect_response<B: Body>(body: B, limit: usize) -> Collected<B> {
    let mut body = Box::pin(body);
    if body.size_hint().lower() > limit as u64 {
        return Collected::TooLarge {
            prefix: Bytes::new(),
            rest: body,
        };
    }
    let mut chunks = Chunks::default();
    loop {
        match body.frame().await {
            None => return Collected::Complete(chunks.concat()),
            Some(Err(error)) => {
                return Collected::Failed {
                    prefix: chunks.concat(),
                    error,
                };
            }
            Some(Ok(frame)) => {
                // Trailers are neither stored nor forwarded for a stored response.
                if let Ok(mut data) = frame.into_data() {
                    chunks.push(data.copy_to_bytes(data.remaining()));
                    if chunks.len > limit {
                        return Collected::TooLarge {
                            prefix: chunks.concat(),
                            rest: body,
                        };
                    }
                }
            }
        }
    }
}

/// What the handler produced, before the claim is finished.
enum Handled<B: Body> {
    Release(http::response::Parts, B),
    Store(http::response::Parts, Collected<B>),
}

/// Runs the handler under an acquired lease and finishes the claim.
async fn execute<S, B, X, P, ReqBody, ResBody>(
    shared: &Shared<B, X, P>,
    mut inner: S,
    mut request: Request<RequestBody<ReqBody>>,
    key: String,
    lease: Lease,
    mut guard: ReleaseGuard<B>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    B: IdempotencyBackend,
    P: StorePolicy,
    ResBody: Body,
{
    let metrics = &shared.metrics;
    let config = &shared.config;
    metrics.inc(Counter::Acquired);
    if lease.is_takeover() {
        metrics.inc(Counter::Takeover);
    }
    tracing::debug!(
        attempt = lease.attempt(),
        takeover = lease.is_takeover(),
        "acquired"
    );
    request.extensions_mut().insert(IdempotentRequest {
        key,
        attempt: lease.attempt(),
        takeover: lease.is_takeover(),
        checkpoint: lease.checkpoint().map(<[u8]>::to_vec),
    });
    let work = async {
        let response = inner.call(request).await?;
        let (parts, body) = response.into_parts();
        Ok(match shared.policy.decide(&parts) {
            StoreDecision::Release => Handled::Release(parts, body),
            StoreDecision::Store => {
                let collected = collect_response(body, config.stored_response_limit_bytes).await;
                Handled::Store(parts, collected)
            }
        })
    };
    let mut extended = lease.clone();
    let handled = keep_alive(
        CatchUnwind::new(work),
        &*shared.backend,
        &mut extended,
        config.claim.lease_duration(),
        metrics,
    )
    .await;
    match handled {
        Err(panic) => {
            guard.release("the handler panicked").await;
            std::panic::resume_unwind(panic)
        }
        Ok(Err(error)) => {
            guard.release("the service returned an error").await;
            Err(error)
        }
        Ok(Ok(Handled::Release(parts, body))) => {
            guard
                .release("the store policy released the response")
                .await;
            Ok(Response::from_parts(parts, ResponseBody::streaming(body)))
        }
        Ok(Ok(Handled::Store(parts, Collected::Failed { prefix, error }))) => {
            guard.release("the response body failed").await;
            Ok(Response::from_parts(
                parts,
                ResponseBody::failed(prefix, error),
            ))
        }
        Ok(Ok(Handled::Store(parts, Collected::Complete(body)))) => {
            let replayable = replayable_headers(&parts.headers, &config.deny_headers);
            let fits = outcome::encoded_len(&replayable, Some(&body))
                <= config.stored_response_limit_bytes;
            let stored_body = fits.then_some(&body[..]);
            finish(
                shared,
                &mut guard,
                &lease,
                parts.status,
                &replayable,
                stored_body,
            )
            .await;
            Ok(Response::from_parts(parts, ResponseBody::full(body)))
        }
        Ok(Ok(Handled::Store(parts, Collected::TooLarge { prefix, rest }))) => {
            let replayable = replayable_headers(&parts.headers, &config.deny_headers);
            finish(shared, &mut guard, &lease, parts.status, &replayable, None).await;
            Ok(Response::from_parts(
                parts,
                ResponseBody::resumed(prefix, rest),
            ))
        }
    }
}

/// Completes the claim with the response (`body: None`: too large, stored without its body).
/// The caller's response goes out whatever happens here: the request ran.
async fn finish<B: IdempotencyBackend, X, P>(
    shared: &Shared<B, X, P>,
    guard: &mut ReleaseGuard<B>,
    lease: &Lease,
    status: StatusCode,
    headers: &HeaderMap,
    body: Option<&[u8]>,
) {
    let metrics = &shared.metrics;
    let retention = shared.config.retention;
    // From here on the side effect has happened: never release, even if completing fails.
    guard.disarm();
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
        match shared.backend.complete(lease, &encoded, retention).await {
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

/// Polls `work`, extending the lease every third of its length until `work` finishes, so that
/// a live request is never taken over.
async fn keep_alive<F: Future, B: IdempotencyBackend>(
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
struct ReleaseGuard<B: IdempotencyBackend> {
    backend: Arc<B>,
    lease: Option<Lease>,
    metrics: Metrics,
}

impl<B: IdempotencyBackend> ReleaseGuard<B> {
    async fn release(&mut self, reason: &'static str) {
        if let Some(lease) = &self.lease {
            release(&*self.backend, lease, &self.metrics, reason).await;
        }
        self.lease = None;
    }

    fn disarm(&mut self) {
        self.lease = None;
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

/// Hop-by-hop headers (RFC 9110 §7.6.1) and `Content-Length` (recomputed on replay).
const NEVER_STORED: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    CONTENT_LENGTH,
];

/// The response headers to store: all but hop-by-hop ones, those named by `Connection`, and
/// the deny list.
fn replayable_headers(headers: &HeaderMap, deny: &[HeaderName]) -> HeaderMap {
    let named_by_connection: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let skip = NEVER_STORED.contains(name)
            || deny.contains(name)
            || named_by_connection.iter().any(|n| n == name.as_str());
        if !skip {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The response for a replay: the stored status, headers and body, marked as a replay.
fn replay_response<B, X, P, ResBody: Body>(
    shared: &Shared<B, X, P>,
    stored: &[u8],
) -> Response<ResponseBody<ResBody>> {
    let metrics = &shared.metrics;
    let stored = match outcome::decode(stored) {
        Ok(stored) => stored,
        Err(error) => {
            metrics.inc(Counter::StoreError);
            tracing::error!(reason = error.0, "stored response unreadable");
            return problem_response(Problem::new(
                ProblemType::OutcomeUnreadable,
                "the stored response of this request cannot be read; the request is not run \
                 again",
            ));
        }
    };
    metrics.inc(Counter::Replayed);
    tracing::debug!(status = stored.status.as_u16(), "replayed");
    let mut response = match stored.body {
        Some(body) => {
            let mut response = Response::new(ResponseBody::full(body));
            *response.status_mut() = stored.status;
            *response.headers_mut() = stored.headers;
            response
        }
        None => problem_response(
            Problem::new(
                ProblemType::ResponseNotStored,
                "the request with this idempotency key ran, but its response was too large to \
                 store; it is not run again",
            )
            .member("original_status", stored.status.as_u16()),
        ),
    };
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_for_length_and_characters() {
        let name = HeaderName::from_static("idempotency-key");
        let check = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(&name, HeaderValue::from_bytes(value).expect("valid header"));
            read_key(&headers, &name)
        };
        assert!(matches!(check(b"abc-123"), KeyHeader::Valid(k) if k == "abc-123"));
        assert!(matches!(check(b"\"abc\""), KeyHeader::Valid(k) if k == "abc"));
        assert!(matches!(check(&[b'k'; 255]), KeyHeader::Valid(_)));
        assert!(matches!(check(&[b'k'; 256]), KeyHeader::Invalid(_)));
        assert!(matches!(check(b"has space"), KeyHeader::Invalid(_)));
        assert!(matches!(check(b"\"\""), KeyHeader::Invalid(_)));
        assert!(matches!(check(b"caf\xc3\xa9"), KeyHeader::Invalid(_)));
        assert!(matches!(
            read_key(&HeaderMap::new(), &name),
            KeyHeader::Absent
        ));
    }

    #[test]
    fn hop_by_hop_and_denied_headers_are_not_stored() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("close, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("3"));
        headers.insert("set-cookie", HeaderValue::from_static("a=b"));
        let kept = replayable_headers(&headers, &[http::header::SET_COOKIE]);
        assert_eq!(kept.len(), 1);
        assert!(kept.contains_key("x-kept"));
    }

    #[test]
    fn retry_after_is_whole_seconds_capped_and_at_least_one() {
        let max = Duration::from_secs(5);
        assert_eq!(retry_after_seconds(Duration::from_millis(1), max), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1500), max), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(60), max), 5);
    }
}
