//! The client half: `idemstore::client::RetryLayer` over hyper-util's client, against the
//! server layer on 127.0.0.1 through a proxy that drops responses, and over scripted transports
//! in paused time for the waits. One behaviour per test.

mod http_server;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::Path;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idemstore::Store;
use idemstore::client::{
    Attempt, BoxError, ClientBody, DefaultRetryPolicy, Outcome, RetryError, RetryLayer,
    RetryPolicy, RetryService, SentKey, new_key,
};
use idemstore::http::IdempotencyLayer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

// ----- harness: the server -----

use http_server::serve;

fn memory_store() -> Store {
    Store::builder()
        .open_in_memory()
        .expect("an in-memory store opens")
}

/// The handler's side effects: how often each key ran, and the body each execution answered.
#[derive(Clone, Default)]
struct Ledger {
    runs: Arc<AtomicUsize>,
    by_key: Arc<Mutex<HashMap<String, Vec<String>>>>,
}

impl Ledger {
    fn record(&self, key: &str, answer: &str) -> usize {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        self.by_key
            .lock()
            .expect("not poisoned")
            .entry(key.to_owned())
            .or_default()
            .push(answer.to_owned());
        n
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn answers(&self, key: &str) -> Vec<String> {
        self.by_key
            .lock()
            .expect("not poisoned")
            .get(key)
            .cloned()
            .unwrap_or_default()
    }
}

/// `POST /charges`: a side effect per execution, answered with a JSON body naming the
/// execution, the key it ran under and the request body. `POST /status/{code}` answers that
/// status, counting executions per key the same way. Behind the server's idempotency layer.
fn charges_app(ledger: &Ledger, slow: Duration) -> Router {
    let charges = ledger.clone();
    let statuses = ledger.clone();
    Router::new()
        .route(
            "/charges",
            post(move |headers: HeaderMap, body: Bytes| {
                let ledger = charges.clone();
                async move {
                    tokio::time::sleep(slow).await;
                    let key = header(&headers, "idempotency-key");
                    let n = ledger.runs() + 1;
                    let answer = format!(
                        "{{\"id\":\"ch_{n}\",\"key\":{key:?},\"echo\":{:?}}}",
                        String::from_utf8_lossy(&body)
                    );
                    ledger.record(&key, &answer);
                    (StatusCode::CREATED, answer)
                }
            }),
        )
        .route(
            "/status/{code}",
            post(move |Path(code): Path<u16>, headers: HeaderMap| {
                let ledger = statuses.clone();
                async move {
                    let key = header(&headers, "idempotency-key");
                    ledger.record(&key, &code.to_string());
                    StatusCode::from_u16(code).expect("a valid status code")
                }
            }),
        )
        .layer(IdempotencyLayer::new(memory_store()))
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

// ----- harness: the proxy that drops responses -----

/// Which connections lose their response.
#[derive(Clone, Copy)]
enum Drops {
    /// The first `n` connections.
    First(usize),
    /// Each connection with this probability (percent), from a seeded generator.
    Random { seed: u64, percent: u64 },
}

/// A TCP proxy in front of the server. A connection chosen to lose its response forwards the
/// request, waits until the server starts answering (so the request ran, and the server layer
/// has stored its answer), then closes both sides without forwarding a byte of it. Other
/// connections are piped both ways.
struct Proxy {
    addr: SocketAddr,
    /// The `Idempotency-Key` of each request whose response was dropped.
    dropped: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

async fn proxy(upstream: SocketAddr, drops: Drops) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("bound address");
    let dropped = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&dropped);
    let task = tokio::spawn(async move {
        let mut rng = match drops {
            Drops::Random { seed, .. } => fastrand::Rng::with_seed(seed),
            Drops::First(_) => fastrand::Rng::with_seed(0),
        };
        let mut accepted = 0usize;
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            accepted += 1;
            let drop_response = match drops {
                Drops::First(n) => accepted <= n,
                Drops::Random { percent, .. } => rng.u64(0..100) < percent,
            };
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                if drop_response {
                    drop_the_response(client, server, &log).await;
                } else {
                    let (mut client, mut server) = (client, server);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    Proxy {
        addr,
        dropped,
        task,
    }
}

async fn drop_the_response(client: TcpStream, server: TcpStream, log: &Mutex<Vec<String>>) {
    let (mut client_read, _client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let request = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&request);
    let forward = tokio::spawn(async move {
        let mut buffer = [0u8; 4096];
        loop {
            match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let chunk = buffer.get(..n).expect("read returns at most the buffer");
                    seen.lock().expect("not poisoned").extend_from_slice(chunk);
                    if server_write.write_all(chunk).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut first = [0u8; 1];
    let started = server_read.read(&mut first).await;
    forward.abort();
    if matches!(started, Ok(1)) {
        let request = request.lock().expect("not poisoned");
        let text = String::from_utf8_lossy(&request);
        let key = text
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("idempotency-key")
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_default();
        log.lock().expect("not poisoned").push(key);
    }
    // Both sockets close here: the client sees its connection end before any response.
}

impl Proxy {
    fn dropped(&self) -> Vec<String> {
        self.dropped.lock().expect("not poisoned").clone()
    }

    fn stop(self) {
        self.task.abort();
    }
}

// ----- harness: the client -----

type Transport = Client<HttpConnector, ClientBody<Full<Bytes>>>;

/// hyper-util's client under the layer, with short waits so the real-time tests stay fast.
/// Connections are not pooled, so that each attempt is a connection of its own and the proxy's
/// choice of connections is a choice of attempts.
fn retrying_client(layer: RetryLayer) -> RetryService<Transport, DefaultRetryPolicy> {
    let transport = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    layer
        .base_delay(Duration::from_millis(2))
        .max_delay(Duration::from_millis(20))
        .layer(transport)
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
}

async fn post_to<S>(client: &S, url: String, key: Option<&str>, body: &str) -> Reply
where
    S: Service<Request<Full<Bytes>>, Response = Response<hyper::body::Incoming>, Error = BoxError>
        + Clone,
{
    let mut request = Request::post(url);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("a valid request");
    let response = client
        .clone()
        .oneshot(request)
        .await
        .expect("the client gets an answer");
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("a whole body").to_bytes(),
    }
}

// ----- against the server layer, through the proxy -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_logical_post_runs_once_and_every_caller_gets_the_original_answer() {
    let ledger = Ledger::default();
    let server = serve(charges_app(&ledger, Duration::ZERO)).await;
    let proxy = proxy(
        server.addr,
        Drops::Random {
            seed: 12,
            percent: 35,
        },
    )
    .await;
    let client = retrying_client(RetryLayer::new().max_attempts(30));
    const CALLS: usize = 48;

    let calls = (0..CALLS).map(|i| {
        let client = client.clone();
        let url = format!("http://{}/charges", proxy.addr);
        tokio::spawn(async move { (i, post_to(&client, url, None, &format!("amount={i}")).await) })
    });
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.expect("the call task completes"));
    }

    assert_eq!(
        ledger.runs(),
        CALLS,
        "every logical request ran exactly once"
    );
    let mut keys = HashSet::new();
    let mut replayed_keys = HashSet::new();
    for (i, reply) in &replies {
        assert_eq!(reply.status, StatusCode::CREATED);
        let body = reply.json();
        assert_eq!(body["echo"], format!("amount={i}"));
        let key = body["key"].as_str().expect("the key the request ran under");
        assert_eq!(key.len(), 36, "a generated UUID: {key}");
        assert!(keys.insert(key.to_owned()), "one key per logical request");
        let answers = ledger.answers(key);
        assert_eq!(answers.len(), 1, "key {key} ran once");
        assert_eq!(
            reply.body,
            answers.concat().as_bytes(),
            "the caller got the original answer"
        );
        if reply.replayed() {
            replayed_keys.insert(key.to_owned());
        }
    }
    eprintln!(
        "{CALLS} logical requests, {} responses dropped by the proxy",
        proxy.dropped().len()
    );
    let dropped: HashSet<String> = proxy.dropped().into_iter().collect();
    assert!(
        dropped.len() >= CALLS / 5,
        "the proxy dropped responses: {}",
        dropped.len()
    );
    assert_eq!(
        replayed_keys, dropped,
        "exactly the requests whose response was lost were answered by a replay"
    );
    proxy.stop();
    server.stop().await;
}

#[tokio::test]
async fn a_key_the_caller_chose_is_kept_across_retries() {
    let ledger = Ledger::default();
    let server = serve(charges_app(&ledger, Duration::ZERO)).await;
    let proxy = proxy(server.addr, Drops::First(2)).await;
    let client = retrying_client(RetryLayer::new());

    let reply = post_to(
        &client,
        format!("http://{}/charges", proxy.addr),
        Some("order-7"),
        "amount=700",
    )
    .await;

    assert_eq!(reply.status, StatusCode::CREATED);
    assert!(reply.replayed());
    assert_eq!(reply.json()["key"], "order-7");
    assert_eq!(proxy.dropped(), ["order-7", "order-7"]);
    assert_eq!(ledger.answers("order-7").len(), 1);
    assert_eq!(ledger.runs(), 1);
    proxy.stop();
    server.stop().await;
}

#[tokio::test]
async fn a_final_4xx_is_not_retried() {
    let ledger = Ledger::default();
    let server = serve(charges_app(&ledger, Duration::ZERO)).await;
    let client = retrying_client(RetryLayer::new().max_attempts(10));

    for code in [400u16, 401, 403, 404, 405, 410, 413, 422] {
        let key = format!("final-{code}");
        let reply = post_to(
            &client,
            format!("http://{}/status/{code}", server.addr),
            Some(&key),
            "",
        )
        .await;
        assert_eq!(reply.status.as_u16(), code);
        assert!(
            !reply.replayed(),
            "{code}: the first answer, not a retry's replay"
        );
        assert_eq!(ledger.answers(&key).len(), 1, "{code} was sent once");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_stored_answer_replayed_by_the_server_is_final_even_if_its_status_is_retryable() {
    // The handler itself answers 409: the server layer stores it, so the one retry the client
    // makes gets it back marked as a replay, and the client stops there.
    let ledger = Ledger::default();
    let server = serve(charges_app(&ledger, Duration::ZERO)).await;
    let client = retrying_client(RetryLayer::new().max_attempts(10));

    let reply = post_to(
        &client,
        format!("http://{}/status/409", server.addr),
        Some("conflict-1"),
        "",
    )
    .await;

    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert!(reply.replayed());
    assert_eq!(ledger.answers("conflict-1").len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_while_the_original_runs_waits_the_servers_retry_after_and_gets_the_replay() {
    let ledger = Ledger::default();
    let server = serve(charges_app(&ledger, Duration::from_millis(400))).await;
    let client = retrying_client(RetryLayer::new());
    let url = format!("http://{}/charges", server.addr);

    let original = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post_to(&client, url, Some("slow-1"), "amount=1").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let duplicate = post_to(&client, url, Some("slow-1"), "amount=1").await;
    let waited = started.elapsed();
    let original = original.await.expect("the original completes");

    assert_eq!(ledger.runs(), 1);
    assert_eq!(original.status, StatusCode::CREATED);
    assert!(!original.replayed());
    assert_eq!(duplicate.status, StatusCode::CREATED);
    assert!(duplicate.replayed());
    assert_eq!(duplicate.body, original.body);
    // The server's 409 said `Retry-After: 1`; the client's jittered backoff alone would
    // have waited at most 2 ms.
    assert!(waited >= Duration::from_secs(1), "waited {waited:?}");
    server.stop().await;
}

// ----- scripted transports, in paused time -----

/// What a scripted transport saw: when each attempt came, its key and its body.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    method: Method,
    key: Option<String>,
    body: Bytes,
}

impl Log {
    fn attempts(&self) -> Vec<Seen> {
        self.0.lock().expect("not poisoned").clone()
    }

    fn gaps(&self) -> Vec<Duration> {
        self.attempts()
            .windows(2)
            .map(|pair| match pair {
                [a, b] => b.at - a.at,
                _ => unreachable!("windows(2) yields pairs"),
            })
            .collect()
    }
}

/// What a scripted transport answers to attempt `n` (1 for the first).
#[derive(Debug, Clone)]
enum Answer {
    Status(u16, Option<String>),
    Error,
    Hang,
}

use Answer::{Error as Fails, Hang, Status};

/// A transport that logs each attempt and answers from `script` (its last entry repeats).
fn scripted<B>(
    log: &Log,
    script: Vec<Answer>,
) -> impl Service<
    Request<ClientBody<B>>,
    Response = Response<String>,
    Error = BoxError,
    Future = impl Send,
> + Clone
+ Send
+ 'static
where
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    let log = log.clone();
    let script = Arc::new(script);
    service_fn(move |request: Request<ClientBody<B>>| {
        let (log, script) = (log.clone(), Arc::clone(&script));
        async move {
            let at = Instant::now();
            let (parts, body) = request.into_parts();
            let body = body.collect().await?.to_bytes();
            let n = {
                let mut seen = log.0.lock().expect("not poisoned");
                seen.push(Seen {
                    at,
                    method: parts.method.clone(),
                    key: parts
                        .headers
                        .get("idempotency-key")
                        .map(|key| key.to_str().expect("a visible key").to_owned()),
                    body,
                });
                seen.len()
            };
            let answer = script
                .get(n - 1)
                .or(script.last())
                .cloned()
                .expect("a non-empty script");
            match answer {
                Status(code, retry_after) => {
                    let mut response = Response::builder().status(code);
                    if let Some(retry_after) = retry_after {
                        response = response.header("retry-after", retry_after);
                    }
                    Ok(response.body(format!("answer {n}"))?)
                }
                Fails => Err(BoxError::from("connection reset by peer")),
                Hang => std::future::pending().await,
            }
        }
    })
}

fn post_charge(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("http://api.test/charges")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a valid request")
}

#[tokio::test(start_paused = true)]
async fn retry_after_in_seconds_is_waited_exactly() {
    let log = Log::default();
    let client = RetryLayer::new().layer(scripted(
        &log,
        vec![Status(429, Some("7".into())), Status(201, None)],
    ));

    let response = client.oneshot(post_charge("a")).await.expect("an answer");

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(log.gaps(), [Duration::from_secs(7)]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_as_an_http_date_is_waited_until() {
    let log = Log::default();
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
    let client = RetryLayer::new().layer(scripted(
        &log,
        vec![Status(503, Some(date)), Status(201, None)],
    ));

    let response = client.oneshot(post_charge("a")).await.expect("an answer");

    assert_eq!(response.status(), StatusCode::CREATED);
    let gaps = log.gaps();
    // An HTTP-date has whole seconds: the wait is the 30 s less the part-second cut off.
    assert!(
        gaps.len() == 1
            && gaps
                .iter()
                .all(|gap| *gap > Duration::from_secs(28) && *gap <= Duration::from_secs(30)),
        "{gaps:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_past_the_total_time_returns_the_response_at_once() {
    let log = Log::default();
    let client = RetryLayer::new()
        .total_time(Duration::from_secs(60))
        .layer(scripted(&log, vec![Status(503, Some("120".into()))]));
    let started = Instant::now();

    let response = client.oneshot(post_charge("a")).await.expect("an answer");

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(log.attempts().len(), 1);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn an_absurd_retry_after_or_backoff_cap_is_no_wait_past_the_total_time() {
    let log = Log::default();
    let client = RetryLayer::new().layer(scripted(
        &log,
        vec![Status(503, Some("18446744073709551615".into()))],
    ));
    let response = client.oneshot(post_charge("a")).await.expect("an answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(log.attempts().len(), 1);

    let log = Log::default();
    let client = RetryLayer::new()
        .base_delay(Duration::MAX)
        .max_delay(Duration::MAX)
        .total_time(Duration::MAX)
        .jitter_seed(3)
        .layer(scripted(&log, vec![Status(503, None), Status(201, None)]));
    let started = Instant::now();
    let response = client.oneshot(post_charge("a")).await.expect("an answer");
    // This seed's jittered wait is centuries long (the window is u64::MAX ns, 584 years): past
    // the year that "no limit" means, so it is not taken, and nothing overflows.
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(log.attempts().len(), 1);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn backoff_waits_are_full_jitter_under_a_doubling_capped_ceiling() {
    let base = Duration::from_millis(100);
    let cap = Duration::from_secs(1);
    let ceilings = [100, 200, 400, 800, 1000, 1000, 1000].map(Duration::from_millis);
    let mut all_gaps = Vec::new();
    for seed in 0..20 {
        let log = Log::default();
        let client = RetryLayer::new()
            .max_attempts(8)
            .base_delay(base)
            .max_delay(cap)
            .jitter_seed(seed)
            .layer(scripted(&log, vec![Status(503, None)]));

        let response = client.oneshot(post_charge("a")).await.expect("an answer");

        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let gaps = log.gaps();
        assert_eq!(gaps.len(), ceilings.len());
        for (gap, ceiling) in gaps.iter().zip(ceilings) {
            assert!(gap <= &ceiling, "seed {seed}: {gaps:?}");
        }
        all_gaps.push(gaps);
    }
    // Full jitter: waits spread over the whole window, from near zero to near the ceiling.
    let last: Vec<Duration> = all_gaps
        .iter()
        .filter_map(|gaps| gaps.last().copied())
        .collect();
    assert!(last.iter().any(|gap| *gap < cap / 4), "{last:?}");
    assert!(last.iter().any(|gap| *gap > cap * 3 / 4), "{last:?}");
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_draws_the_same_waits() {
    let waits = |seed| async move {
        let log = Log::default();
        let client = RetryLayer::new()
            .jitter_seed(seed)
            .layer(scripted(&log, vec![Status(500, None)]));
        client.oneshot(post_charge("a")).await.expect("an answer");
        log.gaps()
    };
    assert_eq!(waits(5).await, waits(5).await);
    assert_ne!(waits(5).await, waits(6).await);
}

#[tokio::test(start_paused = true)]
async fn attempts_are_capped_and_the_last_answer_is_returned() {
    let log = Log::default();
    let client = RetryLayer::new()
        .max_attempts(6)
        .layer(scripted(&log, vec![Status(502, None)]));

    let response = client.oneshot(post_charge("a")).await.expect("an answer");

    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.body(), "answer 6");
    assert_eq!(log.attempts().len(), 6);
}

/// The response names the key it answers (the one the layer made, or the caller's own), so a
/// caller can send the same request again later; a request sent without a key has none.
#[tokio::test(start_paused = true)]
async fn the_response_carries_the_key_it_answers() {
    let log = Log::default();
    let client = RetryLayer::new()
        .retry_idempotent_methods(true)
        .layer(scripted(&log, vec![Status(503, None), Status(201, None)]));

    let response = client
        .clone()
        .oneshot(post_charge("a"))
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::CREATED);
    let SentKey(sent) = response
        .extensions()
        .get::<SentKey>()
        .cloned()
        .expect("a key");
    let seen: Vec<Option<String>> = log.attempts().into_iter().map(|s| s.key).collect();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|key| key.as_deref() == sent.to_str().ok()),
        "{seen:?}"
    );

    let own = new_key();
    let request = Request::post("http://api.test/charges")
        .header("idempotency-key", own.clone())
        .body(Full::new(Bytes::from_static(b"b")))
        .expect("a valid request");
    let response = client.clone().oneshot(request).await.expect("an answer");
    assert_eq!(response.extensions().get::<SentKey>(), Some(&SentKey(own)));

    let get = Request::get("http://api.test/charges/ch_1")
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let response = client.oneshot(get).await.expect("an answer");
    assert_eq!(response.extensions().get::<SentKey>(), None);
}

#[tokio::test(start_paused = true)]
async fn connection_errors_are_retried_and_the_last_one_is_returned() {
    let log = Log::default();
    let client = RetryLayer::new()
        .max_attempts(3)
        .layer(scripted(&log, vec![Fails]));

    let error = client
        .oneshot(post_charge("a"))
        .await
        .expect_err("no answer");

    assert_eq!(error.to_string(), "connection reset by peer");
    assert_eq!(log.attempts().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn total_time_stops_the_waits() {
    let log = Log::default();
    let client = RetryLayer::new()
        .max_attempts(100)
        .total_time(Duration::from_secs(25))
        .layer(scripted(&log, vec![Status(503, Some("10".into()))]));
    let started = Instant::now();

    let response = client.oneshot(post_charge("a")).await.expect("an answer");

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        log.attempts().len(),
        3,
        "at 0 s, 10 s and 20 s; 30 s is too late"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(20));
}

#[tokio::test(start_paused = true)]
async fn total_time_abandons_an_attempt_in_flight() {
    let log = Log::default();
    let client = RetryLayer::new()
        .total_time(Duration::from_secs(25))
        .layer(scripted(&log, vec![Status(503, Some("10".into())), Hang]));
    let started = Instant::now();

    let error = client
        .oneshot(post_charge("a"))
        .await
        .expect_err("no answer");

    assert_eq!(started.elapsed(), Duration::from_secs(25));
    assert!(matches!(
        error.downcast_ref::<RetryError>(),
        Some(RetryError::TotalTimeElapsed { attempts: 2, .. })
    ));
    assert_eq!(log.attempts().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_attempt_over_its_timeout_is_retried() {
    let log = Log::default();
    let client = RetryLayer::new()
        .attempt_timeout(Duration::from_secs(2))
        .base_delay(Duration::ZERO)
        .layer(scripted(&log, vec![Hang, Status(201, None)]));
    let started = Instant::now();

    let response = client.oneshot(post_charge("a")).await.expect("an answer");

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(log.attempts().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn every_attempt_resends_the_same_key_and_body() {
    let log = Log::default();
    let client = RetryLayer::new().layer(scripted(
        &log,
        vec![
            Fails,
            Status(500, None),
            Status(429, None),
            Status(200, None),
        ],
    ));

    let response = client
        .oneshot(post_charge("amount=500&currency=usd"))
        .await
        .expect("an answer");

    assert_eq!(response.status(), StatusCode::OK);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 4);
    let key = attempts.first().and_then(|seen| seen.key.clone());
    assert!(key.is_some());
    for seen in &attempts {
        assert_eq!(seen.key, key);
        assert_eq!(seen.body, "amount=500&currency=usd");
    }
}

#[tokio::test(start_paused = true)]
async fn patch_gets_a_key_like_post() {
    let log = Log::default();
    let client =
        RetryLayer::new().layer(scripted(&log, vec![Status(503, None), Status(200, None)]));
    let request = Request::patch("http://api.test/charges/ch_1")
        .body(Full::new(Bytes::from_static(b"amount=600")))
        .expect("a valid request");

    client.oneshot(request).await.expect("an answer");

    let attempts = log.attempts();
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|seen| seen.key.is_some()
        && seen.key == attempts.first().and_then(|first| first.key.clone())));
}

#[tokio::test(start_paused = true)]
async fn methods_idempotent_by_definition_are_sent_once_unless_configured() {
    let request = |method: Method| {
        Request::builder()
            .method(method)
            .uri("http://api.test/charges/ch_1")
            .body(Full::new(Bytes::new()))
            .expect("a valid request")
    };
    for method in [
        Method::GET,
        Method::HEAD,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
    ] {
        let log = Log::default();
        let once = RetryLayer::new().layer(scripted(&log, vec![Status(503, None)]));
        let response = once
            .oneshot(request(method.clone()))
            .await
            .expect("an answer");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(log.attempts().len(), 1, "{method} is sent once by default");

        let log = Log::default();
        let retried = RetryLayer::new()
            .retry_idempotent_methods(true)
            .layer(scripted(&log, vec![Status(503, None), Status(200, None)]));
        let response = retried
            .oneshot(request(method.clone()))
            .await
            .expect("an answer");
        assert_eq!(response.status(), StatusCode::OK);
        let attempts = log.attempts();
        assert_eq!(attempts.len(), 2, "{method} is retried when configured");
        assert!(
            attempts
                .iter()
                .all(|seen| seen.key.is_none() && seen.method == method),
            "{method} is retried by its method, without a key"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn other_methods_are_never_retried() {
    let log = Log::default();
    let client = RetryLayer::new()
        .retry_idempotent_methods(true)
        .layer(scripted(&log, vec![Status(503, None)]));
    let request = Request::builder()
        .method(Method::from_bytes(b"PURGE").expect("a valid method"))
        .uri("http://api.test/cache")
        .body(Full::new(Bytes::new()))
        .expect("a valid request");

    client.oneshot(request).await.expect("an answer");

    let attempts = log.attempts();
    assert_eq!(attempts.len(), 1);
    assert!(attempts.iter().all(|seen| seen.key.is_none()));
}

/// A body of `chunks` chunks of `chunk` bytes that does not say its length.
struct Chunked {
    chunks: usize,
    chunk: &'static [u8],
}

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.chunks == 0 {
            return Poll::Ready(None);
        }
        self.chunks -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(self.chunk)))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::new()
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_bound_is_sent_once_whole_and_keyed() {
    // One body says its length up front; the other is found too long while it is read.
    let log = Log::default();
    let client = RetryLayer::new()
        .max_body_bytes(16)
        .layer(scripted(&log, vec![Status(503, None)]));
    let response = client
        .oneshot(post_charge("0123456789abcdefXYZ"))
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 1);
    assert!(
        attempts
            .iter()
            .all(|seen| seen.body == "0123456789abcdefXYZ" && seen.key.is_some())
    );

    let log = Log::default();
    let client = RetryLayer::new()
        .max_body_bytes(16)
        .layer(scripted(&log, vec![Status(503, None)]));
    let request = Request::post("http://api.test/uploads")
        .body(Chunked {
            chunks: 10,
            chunk: b"12345",
        })
        .expect("a valid request");
    let response = client.oneshot(request).await.expect("an answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 1);
    assert!(attempts.iter().all(|seen| seen.body == "12345".repeat(10)));
}

#[tokio::test(start_paused = true)]
async fn a_body_within_the_bound_is_buffered_and_resent() {
    let log = Log::default();
    let client = RetryLayer::new()
        .max_body_bytes(50)
        .layer(scripted(&log, vec![Status(503, None), Status(201, None)]));
    let request = Request::post("http://api.test/uploads")
        .body(Chunked {
            chunks: 10,
            chunk: b"12345",
        })
        .expect("a valid request");

    let response = client.oneshot(request).await.expect("an answer");

    assert_eq!(response.status(), StatusCode::CREATED);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|seen| seen.body == "12345".repeat(10)));
}

#[tokio::test(start_paused = true)]
async fn a_policy_closure_decides_what_is_retried() {
    let log = Log::default();
    let client = RetryLayer::new()
        .max_attempts(3)
        .policy(|attempt: &Attempt<'_>| {
            matches!(
                attempt.outcome(),
                Outcome::Response {
                    status: StatusCode::NOT_FOUND,
                    ..
                }
            ) || DefaultRetryPolicy.should_retry(attempt)
        })
        .layer(scripted(
            &log,
            vec![Status(404, None), Status(503, None), Status(200, None)],
        ));

    let response = client.oneshot(post_charge("a")).await.expect("an answer");

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(log.attempts().len(), 3);

    let log = Log::default();
    let never = RetryLayer::new()
        .policy(|_: &Attempt<'_>| false)
        .layer(scripted(&log, vec![Status(503, None)]));
    never.oneshot(post_charge("a")).await.expect("an answer");
    assert_eq!(log.attempts().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_policy_sees_each_attempt_numbered_from_one() {
    let log = Log::default();
    let numbers = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&numbers);
    let client = RetryLayer::new()
        .max_attempts(4)
        .policy(move |attempt: &Attempt<'_>| {
            seen.lock()
                .expect("not poisoned")
                .push((attempt.number(), attempt.method().clone()));
            true
        })
        .layer(scripted(&log, vec![Status(500, None)]));

    client.oneshot(post_charge("a")).await.expect("an answer");

    // The fourth attempt is the last: the policy is not asked about it.
    assert_eq!(
        *numbers.lock().expect("not poisoned"),
        [(1, Method::POST), (2, Method::POST), (3, Method::POST)]
    );
    assert_eq!(log.attempts().len(), 4);
}
