//! The client half (cargo feature `client`): a tower [`Layer`](tower::Layer) for HTTP clients
//! that gives each logical `POST`/`PATCH` one `Idempotency-Key` and retries it with exponential
//! backoff and full jitter, so a server behind [`IdempotencyLayer`](crate::http::IdempotencyLayer)
//! (or Stripe's API, or any server following the IETF draft) runs it exactly once.
//!
//! [`RetryLayer`] wraps any tower service that sends `http::Request<ClientBody<B>>` and answers
//! `http::Response<_>`: hyper-util's legacy `Client` is one as it is; another client is one
//! through a `tower::service_fn` adapter. (reqwest's `Client` is not a tower service: use
//! hyper-util's client, which reqwest is built on, or such an adapter.)
//!
//! ```
//! # #[cfg(feature = "http")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use bytes::Bytes;
//! use http::{Request, StatusCode};
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use idemstore::client::{ClientBody, RetryLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! // A server that runs each key once (see `idemstore::http`).
//! let store = idemstore::Store::builder().open_in_memory()?;
//! let app = axum::Router::new()
//!     .route("/v1/charges", axum::routing::post(|| async { (StatusCode::CREATED, "ch_1") }))
//!     .layer(idemstore::http::IdempotencyLayer::new(store));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! // The client: hyper-util's, sending the layer's bodies, under the layer.
//! let http = Client::builder(TokioExecutor::new()).build_http::<ClientBody<Full<Bytes>>>();
//! let client = ServiceBuilder::new().layer(RetryLayer::new()).service(http);
//!
//! let request = Request::post(format!("http://{addr}/v1/charges"))
//!     .body(Full::new(Bytes::from("amount=500&currency=usd")))?;
//! let response = client.oneshot(request).await?;
//! assert_eq!(response.status(), StatusCode::CREATED);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "http"))]
//! # fn main() {}
//! ```
//!
//! # What happens to a request
//!
//! 1. **Which requests.** `POST` and `PATCH` are resent only under an `Idempotency-Key`: the
//!    layer adds one, a random UUID (version 4), unless the request already has one, which is
//!    kept. `GET`, `HEAD`, `PUT`, `DELETE`, `OPTIONS` and `TRACE` are idempotent by their
//!    method and resent, without a key, only if
//!    [configured](RetryLayer::retry_idempotent_methods). Any other request is sent once,
//!    untouched.
//! 2. **The body** is read into memory so that it can be resent, up to
//!    [`max_body_bytes`](RetryLayer::max_body_bytes) (default 1 MiB). A larger body is sent
//!    once, streamed, without retries (a `POST` still gets its key, so the caller can retry it
//!    safely by hand: the response carries the key in its extensions, [`SentKey`]; to be able
//!    to resend after an error as well, set the key yourself, [`new_key`]).
//! 3. **Attempts.** After each attempt the [`RetryPolicy`] decides whether the outcome is
//!    worth another; [`DefaultRetryPolicy`] retries errors (no response: connection refused,
//!    reset, closed before the response), 408, 409 (the original is still in flight), 429 and
//!    5xx but 501, and never a final 4xx (400, 401, 403, 404, 422, ...) nor a response marked
//!    `Idempotent-Replayed: true` (the server stored it: every retry would get it again).
//!    Every attempt sends the same headers, key and body.
//! 4. **Waits.** Before retry `n` (0 for the first) the layer waits the server's `Retry-After`
//!    (delay-seconds or HTTP-date) if the response has one, otherwise a random time in
//!    `0..=min(max_delay, base_delay * 2^n)` ("full jitter", as in AWS's *Exponential
//!    Backoff And Jitter*). It sleeps with `tokio::time`, so tests can pause time.
//! 5. **Limits.** At most [`max_attempts`](RetryLayer::max_attempts) attempts and
//!    [`total_time`](RetryLayer::total_time) in all, waits included: a wait that would end past
//!    it is not taken and the last response (or error) is returned; an attempt still in flight
//!    when it runs out is abandoned with [`RetryError::TotalTimeElapsed`]. An
//!    [`attempt_timeout`](RetryLayer::attempt_timeout) bounds each attempt.
//!
//! The caller gets the last attempt's response (a replay from an idempotent server carries
//! `Idempotent-Replayed: true`; the key it answers is in its extensions, [`SentKey`]) or its
//! error: the inner service's own, boxed, or a [`RetryError`]. An error carries no key: a
//! caller who may resend the request after one sets the key itself ([`new_key`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), idemstore::client::BoxError> {
//! use std::sync::{Arc, Mutex};
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use idemstore::client::{BoxError, ClientBody, RetryLayer};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! // A flaky transport: the first two attempts lose their connection.
//! let keys = Arc::new(Mutex::new(Vec::new()));
//! let seen = Arc::clone(&keys);
//! let transport = service_fn(move |request: Request<ClientBody<Full<Bytes>>>| {
//!     let seen = Arc::clone(&seen);
//!     async move {
//!         let mut seen = seen.lock().expect("not poisoned");
//!         seen.push(request.headers()["idempotency-key"].clone());
//!         if seen.len() < 3 {
//!             return Err::<Response<String>, BoxError>("connection reset".into());
//!         }
//!         Ok(Response::new("ch_1".to_owned()))
//!     }
//! });
//! let client = RetryLayer::new().layer(transport);
//!
//! let response = client.oneshot(Request::post("/v1/charges").body(Full::new(Bytes::new()))?).await?;
//! assert_eq!(response.body(), "ch_1");
//! let keys = keys.lock().expect("not poisoned");
//! assert_eq!(keys.len(), 3);
//! assert!(keys.iter().all(|key| *key == keys[0]), "one key for every attempt");
//! # Ok(())
//! # }
//! ```

mod backoff;
mod body;
mod error;
mod layer;
mod policy;
mod service;

pub use body::ClientBody;
pub use error::{BoxError, RetryError};
pub use layer::{
    DEFAULT_BASE_DELAY, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_DELAY,
    DEFAULT_TOTAL_TIME, IDEMPOTENCY_KEY, RetryLayer,
};
pub use policy::{Attempt, DefaultRetryPolicy, Outcome, RetryPolicy};
pub use service::{ResponseFuture, RetryService, SentKey, new_key};
