//! HTTP idempotency middleware: a tower [`Layer`](tower::Layer) for axum routers and hyper
//! services (cargo feature `http`).
//!
//! [`IdempotencyLayer`] makes retried requests run once. It follows the IETF
//! `Idempotency-Key` HTTP header draft and Stripe's practice, on any
//! [`IdempotencyBackend`](crate::IdempotencyBackend): the embedded [`Store`](crate::Store), on a
//! file or in memory.
//!
//! ```
//! use axum::{Router, body::Body, routing::post};
//! use http::{Request, StatusCode};
//! use idemstore::http::IdempotencyLayer;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = idemstore::Store::builder().open_in_memory()?;
//! let app = Router::new()
//!     .route("/v1/charges", post(|| async { (StatusCode::CREATED, "ch_1") }))
//!     .layer(IdempotencyLayer::new(store));
//!
//! let request = || {
//!     Request::post("/v1/charges")
//!         .header("idempotency-key", "8e03978e-40d5-43e8-bc93-6894a57f9324")
//!         .body(Body::from("amount=500&currency=usd"))
//! };
//! let first = app.clone().oneshot(request()?).await?;
//! assert_eq!(first.status(), StatusCode::CREATED);
//!
//! // The retry is answered from the store: same status, headers and body, handler not run.
//! let retry = app.oneshot(request()?).await?;
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! # Ok(())
//! # }
//! ```
//!
//! # What happens to a request
//!
//! 1. **Coverage.** Requests whose method is not [covered](IdempotencyLayer::methods)
//!    (default: `POST`, `PATCH`) pass through untouched. A covered request without an
//!    `Idempotency-Key` header passes through too, or gets 400 if
//!    [keys are required](IdempotencyLayer::require_key).
//! 2. **Key.** 1 to 255 visible ASCII characters, sent once; the draft's quoted form `"..."`
//!    is accepted. Otherwise 400, as for a key longer than the store's
//!    [key limit](crate::Limits::max_key_len) when the claim is refused for it.
//! 3. **Scope.** The [`ScopeExtractor`] names whose key it is (for example the authenticated
//!    principal an auth middleware put in the request extensions); tenants never share records.
//!    No scope, or one longer than the store accepts: 400.
//! 4. **Body.** Read in full, up to the [limit](IdempotencyLayer::request_body_limit): 413
//!    above it, before anything is claimed.
//! 5. **Fingerprint.** SHA-256 over the method, path and query, the
//!    [fingerprinted headers](IdempotencyLayer::fingerprint_header) and the body.
//! 6. **Claim** in the store, then by its answer:
//!    - *acquired*: the handler runs, with an [`IdempotentRequest`] in its request extensions.
//!      While it runs, the lease is extended every third of its length, so a slow request is
//!      never taken over while it is alive; if it is lost all the same, the handler is told
//!      (see *A lease lost while the handler runs* below). The [`StorePolicy`] then decides:
//!      **store** the response (default: all but 5xx, 408 and 429), or **release** the claim so
//!      that the client's retry runs again. A handler error, a handler panic (released, then
//!      the panic resumes) and a dropped request future (released in the background) release
//!      too.
//!    - *replay*: the stored status, headers (without hop-by-hop headers and the
//!      [deny list](IdempotencyLayer::deny_headers)) and body, plus `Idempotent-Replayed: true`.
//!    - *in flight*: 409 with `Retry-After`, or, if
//!      [configured](IdempotencyLayer::wait_for_original), a bounded wait for the original and
//!      its replay.
//!    - *mismatch* (same key, other fingerprint): 422.
//!
//! The layer's own answers are `application/problem+json` (RFC 9457) with a stable `type` per
//! condition: see [`ProblemType`]. What the client got wrong is a 4xx, never a store error; a
//! failing store answers 503 and runs nothing. Another shape (an API's own error objects, such
//! as Stripe's `{"error": {"type": "idempotency_error", ...}}`) is a
//! [renderer](IdempotencyLayer::render_errors) away: see [`RenderProblem`].
//!
//! # Configuration
//!
//! A configuration that cannot work (a lease or retention under 1 ms, a lease longer than the
//! retention, a value above the crate's hard caps) is refused before the layer serves:
//! [`IdempotencyLayer::build`] returns a [`ConfigError`], and applying the layer without it
//! panics with the same error. A backend's own, lower [`Limits`](crate::Limits) are known only
//! to the backend: a lease, retention or wait above them is answered 503 on every covered
//! request, with an `error` event naming the cause.
//!
//! # Edge cases, decided
//!
//! - **Responses too large to store** (over
//!   [`stored_response_limit`](IdempotencyLayer::stored_response_limit), or over the store's
//!   outcome limit) still go to their caller in full, streamed. The claim is completed without
//!   the body, so the request never runs again: every retry gets 410
//!   ([`ProblemType::ResponseNotStored`]) with the original status in `original_status`, and
//!   `Idempotent-Replayed: true`.
//! - **Stored responses are buffered**: the caller receives a stored response once its whole
//!   body has been read (up to the limit), because it must be stored before the caller may
//!   retry. Released responses (5xx, 408, 429 by default) and uncovered requests stream.
//! - **Trailers** of a covered request or a stored response are dropped.
//! - **A response body that fails** while being read for storing releases the claim; the
//!   caller gets the bytes read so far, then the error.
//! - **A completion that fails** (store I/O error) leaves the record in flight: retries get
//!   409 until the lease ends (or the process restarts), then take it over with
//!   [`IdempotentRequest::is_takeover`] set. A handler that may run twice must reconcile on
//!   `attempt() > 1`, as after any crash between its side effect and the completion.
//! - **A lease lost while the handler runs**: when an extension finds the lease taken over
//!   or its record gone ([`Error::LeaseLost`](crate::Error::LeaseLost)), or no extension has
//!   succeeded for a whole lease (the store failing), the layer stops extending and sets the
//!   handler's signal: [`IdempotentRequest::lease_lost`] resolves and
//!   [`is_lease_lost`](IdempotentRequest::is_lease_lost) turns `true`. Another attempt may be
//!   running the request from then on; a handler should stop at its next safe point. Its
//!   response is never stored over another attempt's record: the completion is fenced by the
//!   lease. If the completion finds the lease lost, the caller gets 409
//!   ([`ProblemType::LeaseLost`], with `Retry-After`) instead of the response, and its retry
//!   gets the answer of the attempt that holds the key; this is counted in
//!   [`leases_lost`](MetricsSnapshot::leases_lost), logged as a warning, never as a store
//!   error. A lease that merely ran out, with nobody taking the key over, still completes.
//! - **A request dropped while its claim is being committed** still releases it: the claim
//!   runs in a task of its own, whose acquired lease is released if nobody takes it.
//! - **A request dropped while its response is being stored** (the client went away after the
//!   handler ran) is still completed: the completion runs in a task of its own too, so a
//!   remote store's call that was not sent yet is not lost with the request, which would leave
//!   the record in flight, and every retry answered 409, until the lease ends.
//! - **Runtime**: the layer needs a Tokio runtime with its time driver (`enable_all`, as
//!   `#[tokio::main]` and axum's `serve` have): the claim and the completion run in spawned
//!   tasks and the lease extension uses Tokio timers. A request dropped outside a runtime cannot be released; its
//!   claim waits for the lease to end.
//! - **Time**: every wait of the layer (the pace of lease extensions, the deadline after which
//!   an unextended lease counts as lost) is on Tokio's clock, so tests drive it with
//!   `tokio::time::pause` (or `#[tokio::test(start_paused = true)]`) instead of sleeping. The
//!   store decides expiry by its own [`Clock`](crate::Clock): a test that needs both advances
//!   both (a [`ManualClock`](crate::ManualClock) for the store).
//!
//! # Observability
//!
//! Every covered request runs in a `tracing` span `idempotency` (key, method, path) with an
//! event per decision: `acquired`, `replayed`, `conflict`, `mismatch`, `released`, `stored`,
//! `rejected`. [`Metrics`] counts them for export.
//!
//! # Plain hyper and tower services
//!
//! The inner service receives a [`RequestBody`] (buffered for covered requests, streamed
//! otherwise) and the layer returns a [`ResponseBody`]. Axum routes accept both as they are; a
//! hand-written service names them: `Request<RequestBody<hyper::body::Incoming>>`.

mod body;
mod claim;
mod config;
mod extension;
mod fingerprint;
mod future;
mod key;
mod layer;
mod lease;
mod metrics;
mod outcome;
mod policy;
mod problem;
mod replay;
mod scope;
mod service;
mod signal;

pub use body::{RequestBody, ResponseBody};
pub use config::{
    ConfigError, DEFAULT_LEASE, DEFAULT_REQUEST_BODY_LIMIT_BYTES, DEFAULT_RETENTION,
    DEFAULT_RETRY_AFTER_MAX, DEFAULT_STORED_RESPONSE_LIMIT_BYTES,
};
pub use extension::IdempotentRequest;
pub use fingerprint::FINGERPRINT_LEN;
pub use future::ResponseFuture;
pub use key::IDEMPOTENCY_KEY;
pub use layer::IdempotencyLayer;
pub use metrics::{Metrics, MetricsSnapshot};
pub use policy::{DefaultStorePolicy, StoreDecision, StorePolicy};
pub use problem::{PROBLEM_JSON, Problem, ProblemJson, ProblemType, RenderProblem};
pub use replay::IDEMPOTENT_REPLAYED;
pub use scope::{GlobalScope, HeaderScope, ScopeExtractor};
pub use service::Idempotency;
