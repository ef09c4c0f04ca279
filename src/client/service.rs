//! [`RetryService`]: one logical request, as many attempts as the configuration allows.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Request, Response};
use http_body::Body;
use tokio::time::{Instant, sleep, timeout_at};
use tower::Service;

use super::backoff;
use super::body::{self, ClientBody, Read};
use super::error::{BoxError, RetryError};
use super::layer::{Config, Resend};
use super::policy::{Attempt, Outcome, RetryPolicy};

/// The service [`RetryLayer`](super::RetryLayer) wraps around an HTTP client service.
///
/// It takes `Request<B>` for any body `B` and sends the inner service `Request<ClientBody<B>>`
/// (see [`ClientBody`]); its error is a [`BoxError`]: the inner service's last error as it
/// was, or a [`RetryError`]. It is cheap to clone (the configuration and policy are shared),
/// as each concurrent caller should.
///
/// ```
/// use http::{Request, Response};
/// use idemstore::client::{BoxError, ClientBody, RetryLayer};
/// use tower::{Layer, service_fn};
///
/// let transport = service_fn(|_: Request<ClientBody<String>>| async {
///     Ok::<_, BoxError>(Response::new(()))
/// });
/// let client = RetryLayer::new().layer(transport);
/// let for_another_task = client.clone();
/// # let _ = (client.get_ref(), for_another_task);
/// ```
pub struct RetryService<S, P> {
    inner: S,
    config: Arc<Config>,
    policy: Arc<P>,
}

impl<S, P> RetryService<S, P> {
    pub(super) fn new(inner: S, config: Arc<Config>, policy: Arc<P>) -> Self {
        RetryService {
            inner,
            config,
            policy,
        }
    }

    /// The wrapped client service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, P> Clone for RetryService<S, P> {
    fn clone(&self) -> Self {
        RetryService {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
            policy: Arc::clone(&self.policy),
        }
    }
}

impl<S: fmt::Debug, P> fmt::Debug for RetryService<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryService")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .field("policy", &std::any::type_name::<P>())
            .finish()
    }
}

impl<S, P, B, ResB> Service<Request<B>> for RetryService<S, P>
where
    S: Service<Request<ClientBody<B>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    P: RetryPolicy,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<Response<ResB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The inner service polled ready goes with this call; a clone stays for the next one.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        let config = Arc::clone(&self.config);
        let policy = Arc::clone(&self.policy);
        ResponseFuture {
            inner: Box::pin(run(inner, config, policy, request)),
        }
    }
}

/// The future a [`RetryService`] returns: the response of the last attempt.
pub struct ResponseFuture<R> {
    inner: Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>,
}

impl<R> Future for ResponseFuture<R> {
    type Output = Result<R, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<R> fmt::Debug for ResponseFuture<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// One logical request: the key, the buffered body, then attempts and waits until an answer
/// the policy does not retry, or the attempts or the time run out.
async fn run<S, P, B, ResB>(
    mut inner: S,
    config: Arc<Config>,
    policy: Arc<P>,
    request: Request<B>,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Request<ClientBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    P: RetryPolicy,
    B: Body,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let deadline = started + config.total_time();
    let (mut parts, body) = request.into_parts();
    let resend = config.resend(&parts.method);
    if resend == Resend::WithKey && !parts.headers.contains_key(&config.key_header) {
        parts.headers.insert(config.key_header.clone(), new_key());
    }
    // Every response carries the key it answers, for a caller who retries by hand later.
    let sent = (resend == Resend::WithKey)
        .then(|| parts.headers.get(&config.key_header).cloned())
        .flatten()
        .map(SentKey);
    let stamp = |result: Result<Response<ResB>, BoxError>| {
        result.map(|mut response| {
            if let Some(sent) = &sent {
                response.extensions_mut().insert(sent.clone());
            }
            response
        })
    };
    if resend == Resend::Never {
        let request = Request::from_parts(parts, ClientBody::passthrough(body));
        return send_once(&mut inner, request, deadline, &config).await;
    }
    let body = match body::read(body, config.max_body_bytes).await? {
        Read::Whole(body) => body,
        Read::TooLarge(body) => {
            tracing::debug!(
                max_body_bytes = config.max_body_bytes,
                "request body over the buffer bound: sent once, without retries"
            );
            let request = Request::from_parts(parts, body);
            return stamp(send_once(&mut inner, request, deadline, &config).await);
        }
    };
    let mut rng = config
        .jitter_seed
        .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
    let mut number: u32 = 1;
    loop {
        let request = Request::from_parts(parts.clone(), body.body());
        let result = attempt(&mut inner, request, deadline, &config)
            .await
            .map_err(|()| RetryError::TotalTimeElapsed {
                attempts: number,
                total_time: config.total_time,
            })?;
        let Some(wait) = next_wait(&result, number, &parts.method, &config, &*policy, &mut rng)
        else {
            return stamp(result);
        };
        // A wait past the deadline (or too long to add to an instant) is not taken.
        if Instant::now()
            .checked_add(wait)
            .is_none_or(|end| end > deadline)
        {
            tracing::debug!(attempt = number, ?wait, "no time left for another attempt");
            return stamp(result);
        }
        // The response (and its connection) is let go before the wait.
        drop(result);
        tracing::debug!(attempt = number, ?wait, "retrying");
        sleep(wait).await;
        number += 1;
    }
}

/// The wait before the next attempt, or `None` if there is to be none: the last attempt was
/// made, or the policy does not retry the outcome.
fn next_wait<ResB, P: RetryPolicy>(
    result: &Result<Response<ResB>, BoxError>,
    number: u32,
    method: &http::Method,
    config: &Config,
    policy: &P,
    rng: &mut fastrand::Rng,
) -> Option<Duration> {
    if number >= config.max_attempts {
        return None;
    }
    let outcome = match result {
        Ok(response) => Outcome::Response {
            status: response.status(),
            headers: response.headers(),
        },
        Err(error) => Outcome::Error(&**error),
    };
    let attempt = Attempt {
        method,
        number,
        outcome,
    };
    if !policy.should_retry(&attempt) {
        return None;
    }
    let asked = match result {
        Ok(response) => backoff::retry_after(response.headers(), SystemTime::now()),
        Err(_) => None,
    };
    Some(asked.unwrap_or_else(|| {
        let ceiling = backoff::ceiling(config.base_delay, config.max_delay, number - 1);
        backoff::full_jitter(rng, ceiling)
    }))
}

/// One attempt, bounded by the attempt timeout and the deadline. `Err(())` when the deadline
/// passed first; an attempt timeout is an error outcome.
async fn attempt<S, Req, ResB>(
    inner: &mut S,
    request: Req,
    deadline: Instant,
    config: &Config,
) -> Result<Result<Response<ResB>, BoxError>, ()>
where
    S: Service<Req, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    let attempt_deadline = config
        .attempt_timeout
        .and_then(|timeout| Instant::now().checked_add(timeout))
        .filter(|end| *end < deadline);
    let call = async {
        poll_fn(|cx| inner.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        inner.call(request).await.map_err(Into::into)
    };
    match timeout_at(attempt_deadline.unwrap_or(deadline), call).await {
        Ok(result) => Ok(result),
        Err(_elapsed) => match (attempt_deadline, config.attempt_timeout) {
            (Some(_), Some(timeout)) => Ok(Err(Box::new(RetryError::AttemptTimedOut { timeout }))),
            _ => Err(()),
        },
    }
}

/// A request that is not resent: one attempt, within the deadline.
async fn send_once<S, B, ResB>(
    inner: &mut S,
    request: Request<ClientBody<B>>,
    deadline: Instant,
    config: &Config,
) -> Result<Response<ResB>, BoxError>
where
    S: Service<Request<ClientBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    attempt(inner, request, deadline, config)
        .await
        .map_err(|()| -> BoxError {
            Box::new(RetryError::TotalTimeElapsed {
                attempts: 1,
                total_time: config.total_time,
            })
        })?
}

/// A new idempotency key, as [`RetryLayer`](super::RetryLayer) makes one for a request that
/// has none: a random (version 4) UUID, 122 bits from the operating system's generator, so
/// keys from any number of clients never collide in practice.
///
/// Set it yourself when the logical request may have to be sent again later, outside the
/// layer's retries (after [`RetryError::TotalTimeElapsed`](super::RetryError), say, or after a
/// restart): keep the key with the work, and send it again with the same body.
///
/// ```
/// use idemstore::client::new_key;
///
/// let key = new_key();
/// let request = http::Request::post("/v1/charges")
///     .header("idempotency-key", key.clone())
///     .body(())?;
/// assert_eq!(request.headers()["idempotency-key"], key);
/// assert_eq!(key.len(), 36);
/// # Ok::<(), http::Error>(())
/// ```
#[must_use]
pub fn new_key() -> HeaderValue {
    let key = uuid::Uuid::new_v4().hyphenated().to_string();
    HeaderValue::try_from(key).expect("a hyphenated UUID is a valid header value")
}

/// The `Idempotency-Key` a response answers (the caller's own, or the one the layer made),
/// in the extensions of every response [`RetryLayer`](super::RetryLayer) returns for a request
/// it sent under a key.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idemstore::client::BoxError> {
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use idemstore::client::{ClientBody, RetryLayer, SentKey};
/// use tower::{Layer, ServiceExt, service_fn};
///
/// let server = service_fn(|request: Request<ClientBody<Full<Bytes>>>| async move {
///     let key = request.headers()["idempotency-key"].clone();
///     Ok::<_, idemstore::client::BoxError>(Response::new(key))
/// });
/// let client = RetryLayer::new().layer(server);
/// let response = client.oneshot(Request::post("/v1/charges").body(Full::new(Bytes::new()))?).await?;
/// let SentKey(key) = response.extensions().get::<SentKey>().cloned().expect("sent under a key");
/// assert_eq!(&key, response.body());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentKey(pub HeaderValue);
