//! End-to-end tests of the HTTP idempotency layer: a real server on 127.0.0.1 (axum, or plain
//! hyper) and a real HTTP client (hyper-util), one behaviour per test.
//!
//! No test sleeps. Tests that depend on an order of events wait for the event itself (a
//! handler that reports it started, a store that reports a claim submitted or a release done).
//! Tests of the lease, whose timing is the point, call the layered router in process on paused
//! Tokio time (`start_paused`), over a store on a [`ManualClock`]: Tokio's clock paces the
//! layer's lease keeper, the store's clock decides expiry, and each test advances the ones it
//! needs.

mod http_server;

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Request as AxumRequest};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemstore::http::{
    ConfigError, HeaderScope, IdempotencyLayer, IdempotentRequest, Metrics, Problem, ProblemType,
    RequestBody, StoreDecision,
};
use idemstore::{Claim, ClaimOptions, IdempotencyBackend, Lease, Limits, ManualClock, Store};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

// ----- harness -----

use http_server::serve;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// Asserts a problem+json answer with this status and `type`.
    fn assert_problem(&self, status: StatusCode, slug: &str) {
        assert_eq!(self.status, status, "body: {:?}", self.body);
        assert_eq!(self.headers["content-type"], "application/problem+json");
        let body = self.json();
        assert_eq!(body["type"], format!("urn:idemstore:problem:{slug}"));
        assert_eq!(body["status"], status.as_u16());
        assert!(body["title"].is_string() && body["detail"].is_string());
    }
}

/// A request to the server, built like an `http::Request`.
struct Call {
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

fn call(method: Method, path: &str) -> Call {
    Call {
        method,
        path: path.to_owned(),
        headers: Vec::new(),
        body: Bytes::new(),
    }
}

fn post_with_key(path: &str, key: &str) -> Call {
    call(Method::POST, path).key(key)
}

impl Call {
    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn key(self, key: &str) -> Self {
        self.header("idempotency-key", key)
    }

    fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    async fn send(&self, client: &HttpClient, addr: SocketAddr) -> Reply {
        self.try_send(client, addr)
            .await
            .expect("the request is answered")
    }

    async fn try_send(
        &self,
        client: &HttpClient,
        addr: SocketAddr,
    ) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(format!("http://{addr}{}", self.path));
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        let request = builder.body(Full::new(self.body.clone()))?;
        let response = client.request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Calls `app` in process, without a server: for the tests on paused time.
    async fn send_to(&self, app: &Router) -> Reply {
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(&self.path);
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(axum::body::Body::from(self.body.clone()))
            .expect("a valid request");
        let Ok(response) = app.clone().oneshot(request).await;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a whole body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

/// Counts handler executions.
#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);

impl Counter {
    fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn memory_store() -> Store {
    Store::builder()
        .open_in_memory()
        .expect("an in-memory store opens")
}

/// How long a test waits for an event that must come, before it fails instead of hanging.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits for `event`, failing the test if it has not come within [`EVENT_TIMEOUT`].
async fn within<T>(what: &str, event: impl Future<Output = T>) -> T {
    tokio::time::timeout(EVENT_TIMEOUT, event)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The backend methods the layer does not use, forwarded to the wrapped store.
macro_rules! forward_admin_to_store {
    () => {
        async fn checkpoint(&self, lease: &Lease, checkpoint: &[u8]) -> idemstore::Result<()> {
            IdempotencyBackend::checkpoint(&self.store, lease, checkpoint).await
        }

        async fn get(
            &self,
            scope: &[u8],
            key: &[u8],
        ) -> idemstore::Result<Option<idemstore::Record>> {
            IdempotencyBackend::get(&self.store, scope, key).await
        }

        async fn forget(&self, scope: &[u8], key: &[u8]) -> idemstore::Result<bool> {
            IdempotencyBackend::forget(&self.store, scope, key).await
        }

        async fn orphans(&self, limit: usize) -> idemstore::Result<Vec<idemstore::Orphan>> {
            IdempotencyBackend::orphans(&self.store, limit).await
        }

        async fn sweep(&self, limit: usize) -> idemstore::Result<idemstore::Swept> {
            IdempotencyBackend::sweep(&self.store, limit).await
        }

        fn capabilities(&self) -> idemstore::Capabilities {
            IdempotencyBackend::capabilities(&self.store)
        }

        fn limits(&self) -> &idemstore::Limits {
            IdempotencyBackend::limits(&self.store)
        }
    };
}

/// The embedded store, reporting what the tests wait for instead of sleeping.
struct Watched {
    store: Store,
    /// Sent once per claim whose first poll left it pending: submitted to the writer, or
    /// registered as a waiter for an in-flight original.
    claim_pending: mpsc::UnboundedSender<()>,
    /// Whether each claim's answer is held, once committed, until `deliver` is notified.
    hold_answers: bool,
    /// Notified when a held answer has been committed.
    committed: Notify,
    /// Lets a held answer go.
    deliver: Notify,
    /// Notified after each release (`fail`) has returned.
    released: Notify,
    /// Whether each completion waits, before it reaches the store, until `send_completion`
    /// is notified: a remote store's call not sent yet.
    hold_completions: bool,
    /// Notified when a completion starts (before it waits).
    completing: Notify,
    /// Lets a held completion go on to the store.
    send_completion: Notify,
    /// Notified after each completion has returned.
    completed: Notify,
}

impl Watched {
    /// A watched in-memory store, and the receiver of its `claim_pending` events.
    fn new(hold_answers: bool) -> (Arc<Watched>, mpsc::UnboundedReceiver<()>) {
        let (claim_pending, pending) = mpsc::unbounded_channel();
        let watched = Watched {
            store: memory_store(),
            claim_pending,
            hold_answers,
            committed: Notify::new(),
            deliver: Notify::new(),
            released: Notify::new(),
            hold_completions: false,
            completing: Notify::new(),
            send_completion: Notify::new(),
            completed: Notify::new(),
        };
        (Arc::new(watched), pending)
    }

    /// A watched in-memory store whose completions wait for `send_completion`.
    fn holding_completions() -> Arc<Watched> {
        let (claim_pending, _) = mpsc::unbounded_channel();
        Arc::new(Watched {
            store: memory_store(),
            claim_pending,
            hold_answers: false,
            committed: Notify::new(),
            deliver: Notify::new(),
            released: Notify::new(),
            hold_completions: true,
            completing: Notify::new(),
            send_completion: Notify::new(),
            completed: Notify::new(),
        })
    }
}

impl IdempotencyBackend for Watched {
    forward_admin_to_store!();

    async fn claim(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> idemstore::Result<Claim> {
        let mut claim = pin!(IdempotencyBackend::claim(
            &self.store,
            scope,
            key,
            fingerprint,
            options
        ));
        let mut announced = false;
        let answer = poll_fn(|cx| {
            let poll = claim.as_mut().poll(cx);
            if poll.is_pending() && !announced {
                announced = true;
                let _ = self.claim_pending.send(());
            }
            poll
        })
        .await;
        if self.hold_answers {
            self.committed.notify_one();
            self.deliver.notified().await;
        }
        answer
    }

    async fn complete(
        &self,
        lease: &Lease,
        outcome: &[u8],
        retention: Duration,
    ) -> idemstore::Result<()> {
        self.completing.notify_one();
        if self.hold_completions {
            self.send_completion.notified().await;
        }
        let completed = IdempotencyBackend::complete(&self.store, lease, outcome, retention).await;
        self.completed.notify_one();
        completed
    }

    async fn fail(&self, lease: &Lease) -> idemstore::Result<()> {
        let released = IdempotencyBackend::fail(&self.store, lease).await;
        self.released.notify_one();
        released
    }

    async fn extend(&self, lease: &mut Lease, by: Duration) -> idemstore::Result<()> {
        IdempotencyBackend::extend(&self.store, lease, by).await
    }
}

/// A route that creates a "charge": 201, a `Location` header, a JSON body naming the
/// execution number and echoing the request body.
fn charge_route(runs: &Counter) -> Router {
    let runs = runs.clone();
    Router::new().route(
        "/charges",
        post(move |body: Bytes| {
            let runs = runs.clone();
            async move {
                let n = runs.bump();
                let body = format!(
                    "{{\"id\":\"ch_{n}\",\"echo\":{:?},\"note\":\"héllo\"}}",
                    String::from_utf8_lossy(&body)
                );
                (
                    StatusCode::CREATED,
                    [
                        ("location", format!("/charges/ch_{n}")),
                        ("x-charge-number", n.to_string()),
                        ("content-type", "application/json".to_owned()),
                    ],
                    body,
                )
            }
        }),
    )
}

// ----- configuration -----

#[test]
fn a_configuration_that_cannot_work_is_refused_when_the_layer_is_built() {
    let layer = || IdempotencyLayer::new(memory_store());
    let lease_over_retention = layer()
        .lease(Duration::from_secs(120))
        .retention(Duration::from_secs(60))
        .build();
    assert_eq!(
        lease_over_retention.err(),
        Some(ConfigError::LeaseExceedsRetention {
            lease: Duration::from_secs(120),
            retention: Duration::from_secs(60),
        })
    );
    let zero_lease = layer().lease(Duration::ZERO).build();
    assert!(matches!(
        zero_lease,
        Err(ConfigError::TooShort {
            setting: "lease",
            ..
        })
    ));
    let zero_retention = layer().retention(Duration::ZERO).build();
    assert!(matches!(
        zero_retention,
        Err(ConfigError::TooShort {
            setting: "retention",
            ..
        })
    ));
    let endless_wait = layer().wait_for_original(Duration::from_secs(7200)).build();
    assert!(matches!(
        endless_wait,
        Err(ConfigError::TooLong {
            setting: "wait_for_original",
            ..
        })
    ));
}

#[test]
fn a_valid_configuration_builds_in_any_order_of_settings() {
    // The lease is checked against the retention only once both are set.
    let layer = IdempotencyLayer::new(memory_store())
        .lease(Duration::from_secs(48 * 3600))
        .retention(Duration::from_secs(72 * 3600))
        .build();
    assert!(layer.is_ok(), "{:?}", layer.err());
    assert!(IdempotencyLayer::new(memory_store()).build().is_ok());
}

#[test]
#[should_panic(expected = "invalid IdempotencyLayer configuration")]
fn applying_a_layer_that_cannot_work_panics_at_start_up() {
    let layer = IdempotencyLayer::new(memory_store()).lease(Duration::ZERO);
    let _app: Router = charge_route(&Counter::default()).layer(layer);
}

// ----- replay -----

#[tokio::test]
async fn first_request_runs_and_a_retry_replays_status_headers_and_body() {
    let runs = Counter::default();
    let app = charge_route(&runs).layer(IdempotencyLayer::new(memory_store()));
    let server = serve(app).await;
    let client = client();
    let request = post_with_key("/charges", "key-1").body("amount=500");

    let first = request.send(&client, server.addr).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());

    let retry = request.send(&client, server.addr).await;
    assert_eq!(runs.get(), 1, "the retry does not run the handler");
    assert!(retry.replayed());
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.headers["location"], first.headers["location"]);
    assert_eq!(retry.headers["x-charge-number"], "1");
    assert_eq!(retry.headers["content-type"], "application/json");
    assert_eq!(retry.body, first.body, "the body is replayed byte for byte");
    server.stop().await;
}

#[tokio::test]
async fn replay_leaves_out_denied_headers() {
    let app = Router::new()
        .route(
            "/login",
            post(|| async {
                (
                    [
                        ("set-cookie", "session=secret"),
                        ("x-internal", "1"),
                        ("x-kept", "yes"),
                    ],
                    "ok",
                )
            }),
        )
        .layer(IdempotencyLayer::new(memory_store()).deny_headers([
            HeaderName::from_static("set-cookie"),
            HeaderName::from_static("x-internal"),
        ]));
    let server = serve(app).await;
    let client = client();
    let request = post_with_key("/login", "k");
    let first = request.send(&client, server.addr).await;
    assert!(
        first.headers.contains_key("set-cookie"),
        "the caller gets every header"
    );
    let retry = request.send(&client, server.addr).await;
    assert!(retry.replayed());
    assert_eq!(retry.headers["x-kept"], "yes");
    assert!(!retry.headers.contains_key("set-cookie"));
    assert!(!retry.headers.contains_key("x-internal"));
    assert_eq!(retry.body, "ok");
    server.stop().await;
}

// ----- coverage and keys -----

#[tokio::test]
async fn methods_not_covered_pass_through_even_with_a_key() {
    let runs = Counter::default();
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/balance",
            get(move || {
                let n = counted.bump();
                async move { n.to_string() }
            }),
        )
        .layer(IdempotencyLayer::new(memory_store()));
    let server = serve(app).await;
    let client = client();
    let request = call(Method::GET, "/balance").key("k");
    let first = request.send(&client, server.addr).await;
    let second = request.send(&client, server.addr).await;
    assert_eq!((&first.body[..], &second.body[..]), (&b"1"[..], &b"2"[..]));
    assert!(!second.replayed());
    server.stop().await;
}

#[tokio::test]
async fn covered_request_without_a_key_passes_through_by_default() {
    let runs = Counter::default();
    let app = charge_route(&runs).layer(IdempotencyLayer::new(memory_store()));
    let server = serve(app).await;
    let client = client();
    let request = call(Method::POST, "/charges").body("amount=1");
    assert_eq!(
        request.send(&client, server.addr).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        request.send(&client, server.addr).await.status,
        StatusCode::CREATED
    );
    assert_eq!(runs.get(), 2);
    server.stop().await;
}

#[tokio::test]
async fn covered_request_without_a_key_is_rejected_when_keys_are_required() {
    let runs = Counter::default();
    let app = charge_route(&runs).layer(IdempotencyLayer::new(memory_store()).require_key(true));
    let server = serve(app).await;
    let reply = call(Method::POST, "/charges")
        .send(&client(), server.addr)
        .await;
    reply.assert_problem(StatusCode::BAD_REQUEST, "missing-key");
    assert_eq!(runs.get(), 0);
    server.stop().await;
}

#[tokio::test]
async fn invalid_keys_are_rejected_with_400() {
    let runs = Counter::default();
    let app = charge_route(&runs).layer(IdempotencyLayer::new(memory_store()));
    let server = serve(app).await;
    let client = client();
    let too_long = "k".repeat(256);
    for request in [
        post_with_key("/charges", &too_long),
        post_with_key("/charges", "has space"),
        post_with_key("/charges", "\"\""),
        post_with_key("/charges", "a").key("b"),
    ] {
        let reply = request.send(&client, server.addr).await;
        reply.assert_problem(StatusCode::BAD_REQUEST, "invalid-key");
    }
    let longest = post_with_key("/charges", &"k".repeat(255))
        .send(&client, server.addr)
        .await;
    assert_eq!(
        longest.status,
        StatusCode::CREATED,
        "255 characters is a valid key"
    );
    assert_eq!(runs.get(), 1);
    server.stop().await;
}

/// A store whose limits are lower than the layer's.
fn store_with_limits(limits: Limits) -> Store {
    Store::builder()
        .limits(limits)
        .open_in_memory()
        .expect("an in-memory store opens")
}

#[tokio::test]
async fn a_key_over_the_store_key_limit_is_400_not_a_store_error() {
    let runs = Counter::default();
    let layer = IdempotencyLayer::new(store_with_limits(Limits::default().max_key_len(64)));
    let metrics = layer.metrics();
    let server = serve(charge_route(&runs).layer(layer)).await;
    let reply = post_with_key("/charges", &"k".repeat(100))
        .send(&client(), server.addr)
        .await;
    reply.assert_problem(StatusCode::BAD_REQUEST, "invalid-key");
    assert_eq!(reply.json()["max_length"], 64, "the store's limit, not 255");
    assert_eq!(runs.get(), 0);
    let m = metrics.snapshot();
    assert_eq!((m.store_errors, m.rejected), (0, 1));
    server.stop().await;
}

#[tokio::test]
async fn a_scope_over_the_store_scope_limit_is_400_not_a_store_error() {
    let runs = Counter::default();
    let layer = IdempotencyLayer::new(store_with_limits(Limits::default().max_scope_len(8)))
        .scope(HeaderScope::new(HeaderName::from_static("x-tenant")));
    let metrics = layer.metrics();
    let server = serve(charge_route(&runs).layer(layer)).await;
    let reply = post_with_key("/charges", "k")
        .header("x-tenant", "a-tenant-name-of-30-characters")
        .send(&client(), server.addr)
        .await;
    reply.assert_problem(StatusCode::BAD_REQUEST, "invalid-scope");
    assert_eq!(runs.get(), 0);
    let m = metrics.snapshot();
    assert_eq!((m.store_errors, m.rejected), (0, 1));
    server.stop().await;
}

#[tokio::test]
async fn a_store_that_refuses_the_layer_fingerprint_is_a_server_error() {
    // The fingerprint is the layer's own (32 bytes): a store that refuses it is misconfigured,
    // not the client's fault, so it stays a 503 with a store error counted.
    let runs = Counter::default();
    let layer = IdempotencyLayer::new(store_with_limits(Limits::default().max_fingerprint_len(16)));
    let metrics = layer.metrics();
    let server = serve(charge_route(&runs).layer(layer)).await;
    let reply = post_with_key("/charges", "k")
        .send(&client(), server.addr)
        .await;
    reply.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert_eq!(runs.get(), 0);
    let m = metrics.snapshot();
    assert_eq!((m.store_errors, m.rejected), (1, 0));
    server.stop().await;
}

#[tokio::test]
async fn custom_key_header_is_honoured() {
    let runs = Counter::default();
    let layer =
        IdempotencyLayer::new(memory_store()).key_header(HeaderName::from_static("x-request-key"));
    let server = serve(charge_route(&runs).layer(layer)).await;
    let client = client();
    let request = call(Method::POST, "/charges").header("x-request-key", "k");
    request.send(&client, server.addr).await;
    assert!(request.send(&client, server.addr).await.replayed());
    assert_eq!(runs.get(), 1);
    server.stop().await;
}

// ----- fingerprint -----

#[tokio::test]
async fn same_key_with_another_request_is_422() {
    let runs = Counter::default();
    let layer = IdempotencyLayer::new(memory_store())
        .fingerprint_header(HeaderName::from_static("x-api-version"));
    let app = charge_route(&runs).layer(layer);
    let server = serve(app).await;
    let client = client();
    let original = post_with_key("/charges?currency=usd", "k")
        .header("x-api-version", "1")
        .body("amount=500");
    assert_eq!(
        original.send(&client, server.addr).await.status,
        StatusCode::CREATED
    );
    for other in [
        post_with_key("/charges?currency=usd", "k")
            .header("x-api-version", "1")
            .body("amount=501"),
        post_with_key("/charges?currency=eur", "k")
            .header("x-api-version", "1")
            .body("amount=500"),
        post_with_key("/charges?currency=usd", "k")
            .header("x-api-version", "2")
            .body("amount=500"),
        post_with_key("/charges?currency=usd", "k").body("amount=500"),
    ] {
        other
            .send(&client, server.addr)
            .await
            .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused");
    }
    assert!(
        original.send(&client, server.addr).await.replayed(),
        "the original still replays"
    );
    assert_eq!(runs.get(), 1);
    server.stop().await;
}

// ----- in flight -----

/// A route whose handler signals that it started, then waits for `release`.
fn gated_route(runs: &Counter, started: &Arc<Notify>, release: &Arc<Notify>) -> Router {
    let (runs, started, release) = (runs.clone(), Arc::clone(started), Arc::clone(release));
    Router::new().route(
        "/slow",
        post(move || {
            let (runs, started, release) =
                (runs.clone(), Arc::clone(&started), Arc::clone(&release));
            async move {
                let n = runs.bump();
                started.notify_one();
                release.notified().await;
                (StatusCode::CREATED, format!("run {n}"))
            }
        }),
    )
}

#[tokio::test]
async fn duplicate_of_a_running_request_gets_409_with_retry_after() {
    let (runs, started, release) = (
        Counter::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let app = gated_route(&runs, &started, &release).layer(IdempotencyLayer::new(memory_store()));
    let server = serve(app).await;
    let addr = server.addr;
    let client = client();
    let original = tokio::spawn({
        let client = client.clone();
        async move { post_with_key("/slow", "k").send(&client, addr).await }
    });
    started.notified().await;

    let duplicate = post_with_key("/slow", "k").send(&client, addr).await;
    duplicate.assert_problem(StatusCode::CONFLICT, "in-flight");
    assert_eq!(duplicate.headers["retry-after"], "1");
    assert_eq!(duplicate.json()["retry_after"], 1);

    release.notify_one();
    let original = original.await.expect("the original completes");
    assert_eq!(original.status, StatusCode::CREATED);
    let retry = post_with_key("/slow", "k").send(&client, addr).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, original.body);
    assert_eq!(runs.get(), 1);
    server.stop().await;
}

#[tokio::test]
async fn duplicate_waits_for_the_original_and_replays_it_when_configured() {
    let (runs, started, release) = (
        Counter::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let (store, mut claim_pending) = Watched::new(false);
    let layer = IdempotencyLayer::new(store).wait_for_original(Duration::from_secs(10));
    let metrics = layer.metrics();
    let app = gated_route(&runs, &started, &release).layer(layer);
    let server = serve(app).await;
    let addr = server.addr;
    let client = client();
    let original = tokio::spawn({
        let client = client.clone();
        async move { post_with_key("/slow", "k").send(&client, addr).await }
    });
    started.notified().await;
    while claim_pending.try_recv().is_ok() {} // the original's own claim, if it was pending
    let duplicate = tokio::spawn({
        let client = client.clone();
        async move { post_with_key("/slow", "k").send(&client, addr).await }
    });
    // The duplicate's claim found the original in flight and waits for it in the store.
    within("the duplicate's claim to wait", claim_pending.recv()).await;
    release.notify_one();

    let original = original.await.expect("the original completes");
    let duplicate = duplicate.await.expect("the duplicate completes");
    assert_eq!(duplicate.status, StatusCode::CREATED);
    assert!(duplicate.replayed());
    assert_eq!(duplicate.body, original.body);
    assert_eq!(runs.get(), 1);
    assert_eq!(metrics.snapshot().in_flight, 0, "nobody got a 409");
    server.stop().await;
}

#[tokio::test]
async fn concurrent_duplicates_execute_once() {
    let (runs, started, release) = (
        Counter::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let app = gated_route(&runs, &started, &release).layer(IdempotencyLayer::new(memory_store()));
    let server = serve(app).await;
    let addr = server.addr;
    let client = client();
    let mut storm = JoinSet::new();
    for _ in 0..16 {
        let client = client.clone();
        storm.spawn(async move { post_with_key("/slow", "storm").send(&client, addr).await });
    }
    // One request runs and is held there; every other one is answered while it runs.
    for _ in 0..15 {
        let reply = within("a duplicate's answer", storm.join_next())
            .await
            .expect("a request of the storm")
            .expect("every duplicate is answered");
        reply.assert_problem(StatusCode::CONFLICT, "in-flight");
    }
    release.notify_one();
    let original = within("the original's answer", storm.join_next())
        .await
        .expect("the original")
        .expect("the original is answered");
    assert_eq!(
        (original.status, original.body),
        (StatusCode::CREATED, Bytes::from("run 1"))
    );
    assert_eq!(runs.get(), 1, "exactly one execution");
    let after = post_with_key("/slow", "storm").send(&client, addr).await;
    assert_eq!(
        (after.status, after.replayed(), after.body),
        (StatusCode::CREATED, true, Bytes::from("run 1"))
    );
    server.stop().await;
}

// ----- scope -----

#[tokio::test]
async fn scopes_are_isolated() {
    let runs = Counter::default();
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/charges",
            post(move |headers: HeaderMap| {
                let n = counted.bump();
                let tenant = headers["x-tenant"].to_str().unwrap_or("?").to_owned();
                async move { format!("{tenant} run {n}") }
            }),
        )
        .layer(
            IdempotencyLayer::new(memory_store())
                .scope(HeaderScope::new(HeaderName::from_static("x-tenant"))),
        );
    let server = serve(app).await;
    let client = client();
    let alice = post_with_key("/charges", "shared-key").header("x-tenant", "alice");
    let bob = post_with_key("/charges", "shared-key").header("x-tenant", "bob");
    assert_eq!(alice.send(&client, server.addr).await.body, "alice run 1");
    assert_eq!(
        bob.send(&client, server.addr).await.body,
        "bob run 2",
        "bob's key is his own"
    );
    let alice_retry = alice.send(&client, server.addr).await;
    let bob_retry = bob.send(&client, server.addr).await;
    assert_eq!(
        (alice_retry.replayed(), alice_retry.body),
        (true, Bytes::from("alice run 1"))
    );
    assert_eq!(
        (bob_retry.replayed(), bob_retry.body),
        (true, Bytes::from("bob run 2"))
    );
    assert_eq!(runs.get(), 2);

    let anonymous = post_with_key("/charges", "shared-key")
        .send(&client, server.addr)
        .await;
    anonymous.assert_problem(StatusCode::BAD_REQUEST, "invalid-scope");
    server.stop().await;
}

#[tokio::test]
async fn scope_from_an_auth_extension_separates_principals() {
    #[derive(Clone)]
    struct Principal(&'static str);

    let runs = Counter::default();
    let idempotency =
        IdempotencyLayer::new(memory_store()).scope(|request: &http::request::Parts| {
            request
                .extensions
                .get::<Principal>()
                .map(|p| p.0.as_bytes().to_vec())
        });
    let auth = axum::middleware::from_fn(
        |mut request: AxumRequest, next: axum::middleware::Next| async move {
            let principal = match request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
            {
                Some("Bearer sk_alice") => Principal("alice"),
                Some("Bearer sk_bob") => Principal("bob"),
                _ => return StatusCode::UNAUTHORIZED.into_response(),
            };
            request.extensions_mut().insert(principal);
            next.run(request).await
        },
    );
    // The last layer added runs first: authentication, then idempotency.
    let app = charge_route(&runs).layer(idempotency).layer(auth);
    let server = serve(app).await;
    let client = client();
    let as_alice = post_with_key("/charges", "k").header("authorization", "Bearer sk_alice");
    let as_bob = post_with_key("/charges", "k").header("authorization", "Bearer sk_bob");
    let a = as_alice.send(&client, server.addr).await;
    let b = as_bob.send(&client, server.addr).await;
    assert!(!b.replayed(), "bob never sees alice's record");
    assert_ne!(a.body, b.body);
    assert!(as_alice.send(&client, server.addr).await.replayed());
    assert_eq!(runs.get(), 2);
    server.stop().await;
}

// ----- body limit -----

#[tokio::test]
async fn request_body_over_the_limit_is_413_and_claims_nothing() {
    let runs = Counter::default();
    let app =
        charge_route(&runs).layer(IdempotencyLayer::new(memory_store()).request_body_limit(16));
    let server = serve(app).await;
    let client = client();
    let too_big = post_with_key("/charges", "k").body("x".repeat(17));
    let reply = too_big.send(&client, server.addr).await;
    reply.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");
    assert_eq!(reply.json()["limit"], 16);
    assert_eq!(runs.get(), 0);

    // Nothing was claimed: the key is still free for a request of another fingerprint.
    let fits = post_with_key("/charges", "k").body("x".repeat(16));
    assert_eq!(
        fits.send(&client, server.addr).await.status,
        StatusCode::CREATED
    );
    assert_eq!(runs.get(), 1);
    server.stop().await;
}

/// A request body sent in chunks without a declared length (`Transfer-Encoding: chunked`).
struct Chunked(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test]
async fn chunked_request_body_over_the_limit_is_413() {
    let runs = Counter::default();
    let app =
        charge_route(&runs).layer(IdempotencyLayer::new(memory_store()).request_body_limit(16));
    let server = serve(app).await;
    let client: Client<HttpConnector, Chunked> = Client::builder(TokioExecutor::new()).build_http();
    let send = |chunks: &[&'static str]| {
        let request = Request::post(format!("http://{}/charges", server.addr))
            .header("idempotency-key", "k")
            .body(Chunked(chunks.iter().map(|c| Bytes::from(*c)).collect()))
            .expect("a valid request");
        client.request(request)
    };
    let too_big = send(&["0123456789", "0123456789"]).await.expect("answered");
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        too_big.headers()["content-type"],
        "application/problem+json"
    );
    let fits = send(&["01234567", "89abcdef"]).await.expect("answered");
    assert_eq!(fits.status(), StatusCode::CREATED);
    let body = fits.into_body().collect().await.expect("a body").to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("0123456789abcdef"),
        "the handler got both chunks"
    );
    assert_eq!(runs.get(), 1);
    server.stop().await;
}

// ----- release -----

#[tokio::test]
async fn server_errors_408_and_429_release_the_claim_and_the_retry_runs_again() {
    for failure in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::REQUEST_TIMEOUT,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let runs = Counter::default();
        let counted = runs.clone();
        let app = Router::new()
            .route(
                "/charges",
                post(move || {
                    let n = counted.bump();
                    async move {
                        if n == 1 {
                            (failure, "try again".to_owned())
                        } else {
                            (StatusCode::CREATED, format!("ch_{n}"))
                        }
                    }
                }),
            )
            .layer(IdempotencyLayer::new(memory_store()));
        let server = serve(app).await;
        let client = client();
        let request = post_with_key("/charges", "k");
        let first = request.send(&client, server.addr).await;
        assert_eq!(
            (first.status, first.body),
            (failure, Bytes::from("try again"))
        );
        let retry = request.send(&client, server.addr).await;
        assert_eq!(
            retry.status,
            StatusCode::CREATED,
            "after {failure} the retry runs"
        );
        assert!(!retry.replayed());
        let again = request.send(&client, server.addr).await;
        assert!(again.replayed());
        assert_eq!(again.body, "ch_2");
        assert_eq!(runs.get(), 2);
        server.stop().await;
    }
}

#[tokio::test]
async fn a_custom_store_policy_decides_what_is_stored() {
    let runs = Counter::default();
    let counted = runs.clone();
    let layer =
        IdempotencyLayer::new(memory_store()).store_policy(|response: &http::response::Parts| {
            if response.status == StatusCode::BAD_GATEWAY {
                StoreDecision::Store
            } else {
                StoreDecision::Release
            }
        });
    let app = Router::new()
        .route(
            "/charges",
            post(move || {
                counted.bump();
                async { StatusCode::BAD_GATEWAY }
            }),
        )
        .layer(layer);
    let server = serve(app).await;
    let client = client();
    post_with_key("/charges", "k")
        .send(&client, server.addr)
        .await;
    let retry = post_with_key("/charges", "k")
        .send(&client, server.addr)
        .await;
    assert_eq!(
        (retry.status, retry.replayed()),
        (StatusCode::BAD_GATEWAY, true)
    );
    assert_eq!(runs.get(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_handler_panic_releases_the_claim() {
    let runs = Counter::default();
    let counted = runs.clone();
    let layer = IdempotencyLayer::new(memory_store());
    let metrics = layer.metrics();
    let app = Router::new()
        .route(
            "/charges",
            post(move || {
                let n = counted.bump();
                async move {
                    assert!(
                        n > 1,
                        "deliberate panic in the first run (expected in test output)"
                    );
                    (StatusCode::CREATED, "ch_2")
                }
            }),
        )
        .layer(layer);
    let server = serve(app).await;
    let client = client();
    let request = post_with_key("/charges", "k");
    assert!(
        request.try_send(&client, server.addr).await.is_err(),
        "the panic closes the connection"
    );
    assert_eq!(
        metrics.snapshot().released,
        1,
        "released before the panic went on"
    );
    let retry = request.send(&client, server.addr).await;
    assert_eq!(
        (retry.status, retry.replayed()),
        (StatusCode::CREATED, false)
    );
    assert_eq!(runs.get(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_dropped_request_releases_the_claim() {
    let (runs, started, release) = (
        Counter::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let (store, _claim_pending) = Watched::new(false);
    let layer = IdempotencyLayer::new(Arc::clone(&store));
    let metrics = layer.metrics();
    let app = gated_route(&runs, &started, &release).layer(layer);
    let server = serve(app).await;
    let addr = server.addr;
    // The client goes away while the handler runs: its connection closes, the server drops the
    // request future.
    let abandoned = tokio::spawn({
        let client = client();
        async move { post_with_key("/slow", "k").send(&client, addr).await }
    });
    started.notified().await;
    abandoned.abort();
    let _ = abandoned.await;

    // The release runs in the background, once the server has seen the connection close.
    within("the release", store.released.notified()).await;
    assert_eq!(
        metrics.snapshot().released,
        1,
        "the dropped request released its claim"
    );
    release.notify_one(); // lets the retry's handler finish at once
    let retry = post_with_key("/slow", "k").send(&client(), addr).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_request_dropped_while_its_claim_commits_releases_the_claim() {
    // In process, so that the request future is dropped at a known point: while its claim is
    // committed but its answer not yet delivered.
    let runs = Counter::default();
    let (store, _claim_pending) = Watched::new(true);
    let layer = IdempotencyLayer::new(Arc::clone(&store));
    let metrics = layer.metrics();
    let app = charge_route(&runs).layer(layer);
    let abandoned = tokio::spawn({
        let app = app.clone();
        async move { post_with_key("/charges", "k").send_to(&app).await }
    });
    within("the claim to commit", store.committed.notified()).await;
    abandoned.abort();
    assert!(
        abandoned.await.is_err_and(|e| e.is_cancelled()),
        "the request future was dropped"
    );
    store.deliver.notify_one(); // the answer arrives, and nobody takes it
    within("the release", store.released.notified()).await;
    assert_eq!(
        metrics.snapshot().released,
        1,
        "the orphaned claim was released"
    );
    store.deliver.notify_one(); // lets the retry's claim answer at once
    let retry = post_with_key("/charges", "k").send_to(&app).await;
    assert_eq!(
        (retry.status, retry.replayed()),
        (StatusCode::CREATED, false)
    );
    assert_eq!(runs.get(), 1, "the abandoned request never ran its handler");
}

#[tokio::test]
async fn a_request_dropped_while_its_response_is_stored_still_completes() {
    // In process, so that the request future is dropped at a known point: after the handler
    // ran, while the completion has not reached the store yet (a remote store's call not yet
    // sent). The completion must still land: otherwise every retry gets 409 until the lease
    // runs out.
    let runs = Counter::default();
    let store = Watched::holding_completions();
    let layer = IdempotencyLayer::new(Arc::clone(&store));
    let metrics = layer.metrics();
    let app = charge_route(&runs).layer(layer);
    let abandoned = tokio::spawn({
        let app = app.clone();
        async move { post_with_key("/charges", "k").send_to(&app).await }
    });
    within("the completion to start", store.completing.notified()).await;
    abandoned.abort();
    assert!(
        abandoned.await.is_err_and(|e| e.is_cancelled()),
        "the request future was dropped"
    );
    store.send_completion.notify_one();
    within("the completion", store.completed.notified()).await;
    assert_eq!(metrics.snapshot().stored, 1, "the response was stored");
    let retry = post_with_key("/charges", "k").send_to(&app).await;
    assert_eq!(
        (retry.status, retry.replayed()),
        (StatusCode::CREATED, true),
        "the retry replays the abandoned request's response"
    );
    assert_eq!(runs.get(), 1, "the handler ran once");
}

// ----- lease (in process, on paused time) -----

/// The store's clock at the start of the lease tests (ms since the Unix epoch).
const T0_MS: u64 = 1_700_000_000_000;

/// The embedded store on a [`ManualClock`], answering on the caller's thread through its
/// blocking calls. On paused Tokio time the runtime then never idles while the store works, so
/// Tokio's clock moves only when every task waits for a timer (or the test advances it), and
/// the store's clock only when the test advances it.
struct Inline {
    store: Store,
    /// Whether every extension fails, as with a store that cannot be reached.
    failing_extensions: bool,
}

impl Inline {
    fn new(clock: &ManualClock) -> Inline {
        Inline {
            store: Store::builder()
                .clock(clock.clone())
                .open_in_memory()
                .expect("an in-memory store opens"),
            failing_extensions: false,
        }
    }

    /// As [`Inline::new`], but no lease extension ever succeeds.
    fn failing_extensions(clock: &ManualClock) -> Inline {
        Inline {
            failing_extensions: true,
            ..Inline::new(clock)
        }
    }
}

impl IdempotencyBackend for Inline {
    forward_admin_to_store!();

    async fn claim(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> idemstore::Result<Claim> {
        self.store.claim(scope, key, fingerprint, options)
    }

    async fn complete(
        &self,
        lease: &Lease,
        outcome: &[u8],
        retention: Duration,
    ) -> idemstore::Result<()> {
        self.store.complete(lease, outcome, retention)
    }

    async fn fail(&self, lease: &Lease) -> idemstore::Result<()> {
        self.store.fail(lease)
    }

    async fn extend(&self, lease: &mut Lease, by: Duration) -> idemstore::Result<()> {
        if self.failing_extensions {
            return Err(idemstore::Error::Io(Arc::new(std::io::Error::other(
                "the store cannot be reached",
            ))));
        }
        self.store.extend(lease, by)
    }
}

/// Lets the other tasks run until `done` holds, without moving paused time.
async fn settle(what: &str, done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{what} did not happen");
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_keeps_its_lease_and_is_not_taken_over() {
    let clock = ManualClock::new(T0_MS);
    let lease = Duration::from_secs(30);
    let (runs, started, release) = (
        Counter::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let layer = IdempotencyLayer::new(Inline::new(&clock)).lease(lease);
    let metrics = layer.metrics();
    let app = gated_route(&runs, &started, &release).layer(layer);
    let original = tokio::spawn({
        let app = app.clone();
        async move { post_with_key("/slow", "k").send_to(&app).await }
    });
    started.notified().await;

    // Four leases, a third at a time on both clocks: the layer extends the lease each third,
    // so a duplicate never finds it run out (without the extensions, the fourth would).
    let third = lease / 3;
    for extensions in 1..=12 {
        clock.advance(third);
        tokio::time::advance(third).await;
        settle("a lease extension", || {
            metrics.snapshot().lease_extensions == extensions
        })
        .await;
        let duplicate = post_with_key("/slow", "k").send_to(&app).await;
        duplicate.assert_problem(StatusCode::CONFLICT, "in-flight");
    }
    release.notify_one();
    let original = original.await.expect("the original completes");
    assert_eq!(
        (original.status, original.body),
        (StatusCode::CREATED, Bytes::from("run 1"))
    );
    assert_eq!(runs.get(), 1, "never taken over while alive");
    assert_eq!(metrics.snapshot().leases_lost, 0);
    assert!(post_with_key("/slow", "k").send_to(&app).await.replayed());
}

#[tokio::test(start_paused = true)]
async fn a_handler_is_told_when_its_lease_is_taken_over_and_its_response_is_not_stored() {
    let clock = ManualClock::new(T0_MS);
    let lease = Duration::from_secs(30);
    let layer = IdempotencyLayer::new(Inline::new(&clock)).lease(lease);
    let metrics = layer.metrics();
    let started = Arc::new(Notify::new());
    let told = Arc::new(AtomicBool::new(false));
    let app = Router::new()
        .route(
            "/charges",
            post({
                let (started, told) = (Arc::clone(&started), Arc::clone(&told));
                move |Extension(claim): Extension<IdempotentRequest>| {
                    let (started, told) = (Arc::clone(&started), Arc::clone(&told));
                    async move {
                        if claim.attempt() > 1 {
                            return (StatusCode::CREATED, "ch_2");
                        }
                        started.notify_one();
                        // Runs until told its lease is lost (bounded, so that a handler never
                        // told fails the test instead of hanging it).
                        let _ = tokio::time::timeout(lease * 4, claim.lease_lost()).await;
                        told.store(claim.is_lease_lost(), Ordering::SeqCst);
                        (StatusCode::CREATED, "ch_1")
                    }
                }
            }),
        )
        .layer(layer);
    let original = tokio::spawn({
        let app = app.clone();
        async move { post_with_key("/charges", "k").send_to(&app).await }
    });
    started.notified().await;

    // The original stalls past its lease before its first extension (as a paused VM would):
    // the store's clock moves beyond the lease, and a retry takes the key over and completes.
    clock.advance(lease * 2);
    let successor = post_with_key("/charges", "k").send_to(&app).await;
    assert_eq!(
        (successor.status, successor.body),
        (StatusCode::CREATED, Bytes::from("ch_2"))
    );

    // The original's next extension finds the lease lost: the handler is told, and what it
    // answers anyway is never stored over the successor's record: its caller gets 409.
    let original = original.await.expect("the original is answered");
    assert!(told.load(Ordering::SeqCst), "the handler was told");
    original.assert_problem(StatusCode::CONFLICT, "lease-lost");
    assert_eq!(original.headers["retry-after"], "1");
    let retry = post_with_key("/charges", "k").send_to(&app).await;
    assert_eq!(
        (retry.replayed(), retry.body),
        (true, Bytes::from("ch_2")),
        "the successor's answer is the one kept"
    );
    let m = metrics.snapshot();
    assert_eq!(
        (m.acquired, m.takeovers, m.stored, m.leases_lost),
        (2, 1, 1, 1)
    );
    assert_eq!(m.store_errors, 0, "a lost lease is not a store failure");
}

#[tokio::test(start_paused = true)]
async fn a_handler_is_told_when_its_lease_runs_out_unextended() {
    let clock = ManualClock::new(T0_MS);
    let lease = Duration::from_secs(30);
    let layer = IdempotencyLayer::new(Inline::failing_extensions(&clock)).lease(lease);
    let metrics = layer.metrics();
    let (told, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let lost_after = Arc::new(std::sync::Mutex::new(None));
    let app = Router::new()
        .route(
            "/charges",
            post({
                let (told, release, lost_after) = (
                    Arc::clone(&told),
                    Arc::clone(&release),
                    Arc::clone(&lost_after),
                );
                move |Extension(claim): Extension<IdempotentRequest>| {
                    let (told, release, lost_after) = (
                        Arc::clone(&told),
                        Arc::clone(&release),
                        Arc::clone(&lost_after),
                    );
                    async move {
                        let began = Instant::now();
                        let _ = tokio::time::timeout(lease * 4, claim.lease_lost()).await;
                        *lost_after.lock().expect("not poisoned") =
                            claim.is_lease_lost().then(|| began.elapsed());
                        told.notify_one();
                        release.notified().await;
                        (StatusCode::CREATED, "ch_1")
                    }
                }
            }),
        )
        .layer(layer);
    let original = tokio::spawn({
        let app = app.clone();
        async move { post_with_key("/charges", "k").send_to(&app).await }
    });
    // Every extension fails (at 10 s and 20 s): at 30 s the lease has certainly run out.
    told.notified().await;
    let lost_after = lost_after.lock().expect("not poisoned").take();
    assert!(
        lost_after.is_some_and(|after| after >= lease && after < lease + lease / 3),
        "told once the lease had run out, not before: {lost_after:?}"
    );

    // The store's clock reaches the end of the lease too. Nobody took the key over, so the
    // completion, fenced by the lease's token and not by time, still stores the response.
    clock.advance(lease + Duration::from_secs(1));
    release.notify_one();
    let original = original.await.expect("the original is answered");
    assert_eq!(
        (original.status, original.body),
        (StatusCode::CREATED, Bytes::from("ch_1"))
    );
    assert!(
        post_with_key("/charges", "k")
            .send_to(&app)
            .await
            .replayed()
    );
    let m = metrics.snapshot();
    assert_eq!(
        (m.lease_extensions, m.leases_lost, m.stored, m.store_errors),
        (0, 1, 1, 0)
    );
}

// ----- large responses -----

#[tokio::test]
async fn a_response_too_large_to_store_is_delivered_and_retries_get_410() {
    let runs = Counter::default();
    let counted = runs.clone();
    let big = "x".repeat(4096);
    let layer = IdempotencyLayer::new(memory_store()).stored_response_limit(1024);
    let metrics = layer.metrics();
    let app = Router::new()
        .route(
            "/export",
            post(move || {
                counted.bump();
                let big = big.clone();
                async move { big }
            }),
        )
        .layer(layer);
    let server = serve(app).await;
    let client = client();
    let first = post_with_key("/export", "k")
        .send(&client, server.addr)
        .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body.len(), 4096, "the caller gets the whole response");

    let retry = post_with_key("/export", "k")
        .send(&client, server.addr)
        .await;
    retry.assert_problem(StatusCode::GONE, "response-not-stored");
    assert!(retry.replayed());
    assert_eq!(retry.json()["original_status"], 200);
    assert_eq!(runs.get(), 1, "the request never runs again");
    assert_eq!(metrics.snapshot().not_stored, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_response_over_the_store_outcome_limit_is_completed_without_its_body() {
    // The layer would store 1 MiB, but this store takes outcomes of at most 512 bytes.
    let store = Store::builder()
        .limits(idemstore::Limits::default().max_outcome_len(512))
        .open_in_memory()
        .expect("an in-memory store");
    let runs = Counter::default();
    let counted = runs.clone();
    let app = Router::new()
        .route(
            "/export",
            post(move || {
                counted.bump();
                async { (StatusCode::CREATED, "y".repeat(2048)) }
            }),
        )
        .layer(IdempotencyLayer::new(store));
    let server = serve(app).await;
    let client = client();
    let first = post_with_key("/export", "k")
        .send(&client, server.addr)
        .await;
    assert_eq!(
        (first.status, first.body.len()),
        (StatusCode::CREATED, 2048)
    );
    let retry = post_with_key("/export", "k")
        .send(&client, server.addr)
        .await;
    retry.assert_problem(StatusCode::GONE, "response-not-stored");
    assert_eq!(retry.json()["original_status"], 201);
    assert_eq!(runs.get(), 1);
    server.stop().await;
}

// ----- restarts -----

#[tokio::test]
async fn a_retry_after_a_server_restart_replays_the_stored_response() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("idem.redb");
    let runs = Counter::default();
    let request = post_with_key("/charges", "k").body("amount=500");

    let server =
        serve(charge_route(&runs).layer(IdempotencyLayer::new(Store::open(&path).expect("opens"))))
            .await;
    let first = request.send(&client(), server.addr).await;
    server.stop().await; // the store is dropped with the app: the file is released

    let server = serve(
        charge_route(&runs).layer(IdempotencyLayer::new(Store::open(&path).expect("reopens"))),
    )
    .await;
    let retry = request.send(&client(), server.addr).await;
    assert!(retry.replayed());
    assert_eq!((retry.status, &retry.body), (first.status, &first.body));
    assert_eq!(retry.headers["location"], first.headers["location"]);
    assert_eq!(runs.get(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_request_in_flight_when_the_server_dies_runs_again_after_restart_as_attempt_two() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("idem.redb");
    let (claimed_tx, claimed_rx) = std::sync::mpsc::channel::<()>();
    let (crash_tx, crash_rx) = std::sync::mpsc::channel::<()>();

    // The first server lives on its own runtime, which is torn down mid-request: the handler
    // never finishes and nothing releases the claim, as in a process crash.
    let first_path = path.clone();
    let crashed = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let server = runtime.block_on(async {
            let store = Store::open(&first_path).expect("opens");
            let started = Arc::new(Notify::new());
            let handler_started = Arc::clone(&started);
            let app = Router::new()
                .route(
                    "/charges",
                    post(move || {
                        handler_started.notify_one();
                        std::future::pending::<&'static str>()
                    }),
                )
                .layer(IdempotencyLayer::new(store));
            let server = serve(app).await;
            let addr = server.addr;
            tokio::spawn(async move {
                let _ = post_with_key("/charges", "k")
                    .try_send(&client(), addr)
                    .await;
            });
            started.notified().await; // the claim is taken and the handler is running
            claimed_tx.send(()).expect("the test is alive");
            let _ = tokio::task::spawn_blocking(move || crash_rx.recv()).await;
            server
        });
        runtime.shutdown_background();
        drop(server);
    });
    claimed_rx.recv().expect("the first server took the claim");
    crash_tx.send(()).expect("the server thread is alive");
    crashed.join().expect("the crashed server's thread ends");

    let store = Store::open(&path).expect("reopens after the crash");
    let seen = Arc::new(std::sync::Mutex::new(None));
    let app = Router::new()
        .route(
            "/charges",
            post({
                let seen = Arc::clone(&seen);
                move |Extension(claim): Extension<IdempotentRequest>| {
                    *seen.lock().expect("not poisoned") =
                        Some((claim.attempt(), claim.is_takeover()));
                    async { (StatusCode::CREATED, "ch_after_restart") }
                }
            }),
        )
        .layer(IdempotencyLayer::new(store));
    let server = serve(app).await;
    let retry = post_with_key("/charges", "k")
        .send(&client(), server.addr)
        .await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(
        *seen.lock().expect("not poisoned"),
        Some((2, true)),
        "a takeover of the dead process's claim"
    );
    server.stop().await;
}

// ----- plain hyper -----

#[tokio::test]
async fn the_layer_wraps_a_plain_hyper_service() {
    let runs = Counter::default();
    let counted = runs.clone();
    let service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(memory_store()))
        .service_fn(
            move |request: Request<RequestBody<hyper::body::Incoming>>| {
                let n = counted.bump();
                async move {
                    let body = request.into_body().collect().await?.to_bytes();
                    let mut response = hyper::Response::new(Full::new(Bytes::from(format!(
                        "run {n}: {}",
                        String::from_utf8_lossy(&body)
                    ))));
                    *response.status_mut() = StatusCode::CREATED;
                    Ok::<_, hyper::Error>(response)
                }
            },
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let accept = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let client = client();
    let request = post_with_key("/anything", "k").body("amount=7");
    let first = request.send(&client, addr).await;
    let retry = request.send(&client, addr).await;
    assert_eq!(
        (first.status, &first.body[..]),
        (StatusCode::CREATED, &b"run 1: amount=7"[..])
    );
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1);
    accept.abort();
}

// ----- metrics -----

#[tokio::test]
async fn metrics_count_each_decision() {
    let runs = Counter::default();
    let layer = IdempotencyLayer::new(memory_store());
    let metrics: Metrics = layer.metrics();
    let server = serve(charge_route(&runs).layer(layer)).await;
    let client = client();
    post_with_key("/charges", "a")
        .body("1")
        .send(&client, server.addr)
        .await; // acquired, stored
    post_with_key("/charges", "a")
        .body("1")
        .send(&client, server.addr)
        .await; // replayed
    post_with_key("/charges", "a")
        .body("2")
        .send(&client, server.addr)
        .await; // mismatch
    post_with_key("/charges", "bad key")
        .send(&client, server.addr)
        .await; // rejected
    call(Method::POST, "/charges")
        .send(&client, server.addr)
        .await; // passed through
    let m = metrics.snapshot();
    assert_eq!(
        (
            m.acquired,
            m.stored,
            m.replayed,
            m.mismatched,
            m.rejected,
            m.passed_through
        ),
        (1, 1, 1, 1, 1, 1)
    );
    assert_eq!((m.in_flight, m.released, m.store_errors), (0, 0, 0));
    server.stop().await;
}

// ----- error rendering -----

/// The response headers of a layer's own answer, without the ones the server adds (`Date`,
/// `Content-Length`), in order.
fn own_headers(reply: &Reply) -> Vec<(String, String)> {
    reply
        .headers
        .iter()
        .filter(|(name, _)| *name != "date" && *name != "content-length")
        .map(|(name, value)| {
            let value = value.to_str().expect("an ASCII header value").to_owned();
            (name.as_str().to_owned(), value)
        })
        .collect()
}

/// The default rendering, pinned byte for byte: a reused key (422), a duplicate of a running
/// request (409 with `Retry-After`), and a key the layer refuses (400 with `max_length`).
#[tokio::test]
async fn the_default_rendering_is_problem_json_byte_for_byte() {
    let (runs, started, release) = (
        Counter::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let app = gated_route(&runs, &started, &release)
        .merge(charge_route(&runs))
        .layer(IdempotencyLayer::new(memory_store()));
    let server = serve(app).await;
    let (addr, client) = (server.addr, client());

    post_with_key("/charges", "reused")
        .body("amount=500")
        .send(&client, addr)
        .await;
    let reused = post_with_key("/charges", "reused")
        .body("amount=501")
        .send(&client, addr)
        .await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        own_headers(&reused),
        [(
            "content-type".to_owned(),
            "application/problem+json".to_owned()
        )]
    );
    assert_eq!(
        reused.body,
        "{\"type\":\"urn:idemstore:problem:key-reused\",\"title\":\"Idempotency key reused for \
         another request\",\"status\":422,\"detail\":\"this idempotency key was already used for \
         a request with another method, path, query, body or fingerprinted header; use a new \
         key for a new request\"}"
    );

    let original = tokio::spawn({
        let client = client.clone();
        async move { post_with_key("/slow", "running").send(&client, addr).await }
    });
    within("the original to start", started.notified()).await;
    let in_flight = post_with_key("/slow", "running").send(&client, addr).await;
    assert_eq!(in_flight.status, StatusCode::CONFLICT);
    assert_eq!(
        own_headers(&in_flight),
        [
            (
                "content-type".to_owned(),
                "application/problem+json".to_owned()
            ),
            ("retry-after".to_owned(), "1".to_owned()),
        ]
    );
    assert_eq!(
        in_flight.body,
        "{\"type\":\"urn:idemstore:problem:in-flight\",\"title\":\"Original request still in \
         progress\",\"status\":409,\"detail\":\"a request with this idempotency key is still \
         being processed; retry later\",\"retry_after\":1}"
    );
    release.notify_one();
    original.await.expect("the original completes");

    let invalid = post_with_key("/charges", "has space")
        .send(&client, addr)
        .await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    let body = std::str::from_utf8(&invalid.body).expect("a UTF-8 body");
    assert!(
        body.starts_with("{\"type\":\"urn:idemstore:problem:invalid-key\",\"title\":")
            && body.ends_with(",\"max_length\":255}"),
        "{body}"
    );
    server.stop().await;
}

/// A renderer that answers every problem with its own JSON shape, a status of its choice for a
/// reused key, and a `Retry-After` of its own, which the layer replaces.
fn plain_json(problem: &Problem) -> http::Response<Bytes> {
    let status = match problem.kind() {
        ProblemType::KeyReused => StatusCode::BAD_REQUEST,
        _ => problem.status(),
    };
    let body = serde_json::json!({
        "error": {
            "kind": format!("{:?}", problem.kind()),
            "status": problem.status().as_u16(),
            "title": problem.title(),
            "detail": problem.detail(),
            "key": problem.key(),
            "retry_after": problem.retry_after(),
            "members": problem.members(),
        }
    });
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("retry-after", "99")
        .header("x-rendered", "yes")
        .body(Bytes::from(body.to_string()))
        .expect("a valid response")
}

#[tokio::test]
async fn a_renderer_shapes_every_answer_of_the_layer_and_the_layer_keeps_retry_after() {
    let (runs, started, release) = (
        Counter::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let layer = IdempotencyLayer::new(memory_store())
        .require_key(true)
        .request_body_limit(16)
        .render_errors(plain_json);
    let app = gated_route(&runs, &started, &release)
        .merge(charge_route(&runs))
        .layer(layer);
    let server = serve(app).await;
    let (addr, client) = (server.addr, client());
    let error = |reply: &Reply| {
        assert_eq!(reply.headers["content-type"], "application/json");
        assert_eq!(reply.headers["x-rendered"], "yes");
        reply.json()["error"].clone()
    };

    // A key reused with another body: the renderer's status (400) and the key it quotes.
    let first = post_with_key("/charges", "k-1")
        .body("amount=500")
        .send(&client, addr)
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let reused = post_with_key("/charges", "k-1")
        .body("amount=501")
        .send(&client, addr)
        .await;
    assert_eq!(reused.status, StatusCode::BAD_REQUEST);
    let reused = error(&reused);
    assert_eq!(reused["kind"], "KeyReused");
    assert_eq!(reused["status"], 422);
    assert_eq!(
        reused["title"],
        "Idempotency key reused for another request"
    );
    assert_eq!(reused["key"], "k-1");
    assert!(reused["retry_after"].is_null());
    assert!(
        reused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("use a new key"))
    );

    // In flight: the renderer's `Retry-After: 99` is replaced by the layer's.
    let original = tokio::spawn({
        let client = client.clone();
        async move { post_with_key("/slow", "k-2").send(&client, addr).await }
    });
    within("the original to start", started.notified()).await;
    let in_flight = post_with_key("/slow", "k-2").send(&client, addr).await;
    assert_eq!(in_flight.status, StatusCode::CONFLICT);
    assert_eq!(in_flight.headers.get_all("retry-after").iter().count(), 1);
    assert_eq!(in_flight.headers["retry-after"], "1");
    let in_flight = error(&in_flight);
    assert_eq!(in_flight["kind"], "InFlight");
    assert_eq!(
        (in_flight["key"].as_str(), in_flight["retry_after"].as_u64()),
        (Some("k-2"), Some(1))
    );
    assert_eq!(in_flight["members"]["retry_after"], 1);
    release.notify_one();
    let original = original.await.expect("the original completes");
    assert_eq!(original.status, StatusCode::CREATED);

    // Answers decided before the claim: no key, an invalid key, a body over the limit.
    let missing = call(Method::POST, "/charges").send(&client, addr).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.headers["retry-after"], "99",
        "where the layer has no Retry-After to set, the renderer's headers are left alone"
    );
    let missing = error(&missing);
    assert_eq!(
        (missing["kind"].as_str(), missing["key"].is_null()),
        (Some("MissingKey"), true)
    );
    let invalid = error(
        &post_with_key("/charges", "has space")
            .send(&client, addr)
            .await,
    );
    assert_eq!(invalid["kind"], "InvalidKey");
    assert!(
        invalid["key"].is_null(),
        "an invalid key is not quoted back"
    );
    assert_eq!(invalid["members"]["max_length"], 255);
    let large = post_with_key("/charges", "k-3")
        .body("amount=500&currency=usd")
        .send(&client, addr)
        .await;
    assert_eq!(large.status, StatusCode::PAYLOAD_TOO_LARGE);
    let large = error(&large);
    assert_eq!(
        (large["kind"].as_str(), large["key"].as_str()),
        (Some("BodyTooLarge"), Some("k-3"))
    );
    assert_eq!(large["members"]["limit"], 16);

    // The handler's own responses, first and replayed, are never rendered.
    let replay = post_with_key("/charges", "k-1")
        .body("amount=500")
        .send(&client, addr)
        .await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert!(replay.headers.get("x-rendered").is_none());
    assert_eq!(runs.get(), 2);
    server.stop().await;
}
