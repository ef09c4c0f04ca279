//! [`Idempotency`]: the service that claims, runs, stores and replays requests.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower::Service;
use tracing::Instrument;

use super::body::{
    BoxError, Collected, ReadError, RequestBody, ResponseBody, collect_response, read_request_body,
};
use super::claim::{Claimed, claim_detached, in_flight, mismatch, refused};
use super::config::Config;
use super::extension::IdempotentRequest;
use super::fingerprint::fingerprint;
use super::future::{CatchUnwind, ResponseFuture};
use super::key::{KeyHeader, read_key};
use super::layer::IdempotencyLayer;
use super::lease::{Completion, ReleaseGuard, keep_alive, superseded};
use super::metrics::{Counter, Metrics};
use super::outcome;
use super::policy::{StoreDecision, StorePolicy};
use super::problem::{Problem, ProblemType, RenderProblem, reject};
use super::replay::{replay_response, replayable_headers};
use super::scope::{ScopeExtractor, read_scope};
use crate::{IdempotencyBackend, KEY_LEN_MAX, Lease};

/// What every clone of a service shares.
struct Shared<B, X, P> {
    backend: Arc<B>,
    scope: Arc<X>,
    policy: Arc<P>,
    config: Arc<Config>,
    renderer: Arc<dyn RenderProblem>,
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
                renderer: layer.renderer,
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
                    &shared.metrics,
                    &*shared.renderer,
                    &Problem::new(ProblemType::MissingKey, detail),
                ));
            }
            KeyHeader::Invalid(why) => {
                return ResponseFuture::ready(reject(
                    &shared.metrics,
                    &*shared.renderer,
                    &Problem::new(ProblemType::InvalidKey, why)
                        .with_member("max_length", KEY_LEN_MAX),
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
    let metrics = &shared.metrics;
    let renderer = &*shared.renderer;
    let (parts, body) = request.into_parts();
    let scope = match read_scope(&*shared.scope, &parts) {
        Ok(scope) => scope,
        Err(problem) => return Ok(reject(metrics, renderer, &problem.with_key(key))),
    };
    let limit = config.request_body_limit_bytes;
    let body = match read_request_body(&parts.headers, body, limit).await {
        Ok(body) => body,
        Err(ReadError::TooLarge) => {
            return Ok(reject(
                metrics,
                renderer,
                &Problem::new(
                    ProblemType::BodyTooLarge,
                    format!("the request body is larger than {limit} bytes"),
                )
                .with_member("limit", limit)
                .with_key(key),
            ));
        }
        Err(ReadError::Read(error)) => {
            return Ok(reject(
                metrics,
                renderer,
                &Problem::new(
                    ProblemType::UnreadableBody,
                    format!("the request body could not be read: {error}"),
                )
                .with_key(key),
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
    let claim = claim_detached(
        &shared.backend,
        &config.claim,
        metrics,
        scope,
        key.clone(),
        fingerprint,
    )
    .await;
    match claim {
        Ok(Claimed::Acquired(lease, guard)) => {
            let request = Request::from_parts(parts, RequestBody::buffered(body));
            execute(&shared, inner, request, key, lease, guard).await
        }
        Ok(Claimed::Replay(outcome)) => Ok(replay_response(metrics, renderer, &key, &outcome)),
        Ok(Claimed::InProgress { retry_after }) => Ok(in_flight(
            metrics,
            renderer,
            &key,
            retry_after,
            config.retry_after_max,
        )),
        Ok(Claimed::Mismatch) => Ok(mismatch(metrics, renderer, &key)),
        Err(error) => Ok(refused(metrics, renderer, &key, &error)),
    }
}

/// What the handler produced, before the claim is finished.
enum Handled<B: Body> {
    Release(http::response::Parts, B),
    Store(http::response::Parts, Collected<B>),
}

/// Runs the handler under an acquired lease, kept alive meanwhile, and finishes the claim by
/// the store policy: complete it with the response, or release it. A response whose completion
/// finds the lease lost is not sent: the caller gets 409, and its retry the new owner's answer.
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
    let renderer = &*shared.renderer;
    metrics.inc(Counter::Acquired);
    if lease.is_takeover() {
        metrics.inc(Counter::Takeover);
    }
    tracing::debug!(
        attempt = lease.attempt(),
        takeover = lease.is_takeover(),
        "acquired"
    );
    let lost = guard.lost_signal().clone();
    request
        .extensions_mut()
        .insert(IdempotentRequest::new(key.clone(), &lease, lost.clone()));
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
    let mut extended = lease;
    let handled = keep_alive(
        CatchUnwind::new(work),
        &*shared.backend,
        &mut extended,
        config.claim.lease_duration(),
        &lost,
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
            let completion = guard
                .complete(parts.status, &replayable, stored_body, config.retention)
                .await;
            if completion == Completion::LeaseLost {
                return Ok(superseded(renderer, &key));
            }
            Ok(Response::from_parts(parts, ResponseBody::full(body)))
        }
        Ok(Ok(Handled::Store(parts, Collected::TooLarge { prefix, rest }))) => {
            let replayable = replayable_headers(&parts.headers, &config.deny_headers);
            let completion = guard
                .complete(parts.status, &replayable, None, config.retention)
                .await;
            if completion == Completion::LeaseLost {
                return Ok(superseded(renderer, &key));
            }
            Ok(Response::from_parts(
                parts,
                ResponseBody::resumed(prefix, rest),
            ))
        }
    }
}
