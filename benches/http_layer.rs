//! The HTTP idempotency layer's overhead per request: the same axum route with and without
//! `IdempotencyLayer`, one request per iteration through `tower::ServiceExt::oneshot` (no
//! network), on a current-thread Tokio runtime.
//!
//! - `http_layer/no_layer`: `POST /charges` straight to the handler (201, a 64-byte body).
//! - `http_layer/passthrough_get`: a `GET` through the layer (not covered: no store access).
//! - `http_layer/new_key/{memory,file}`: a `POST` with a fresh key: read the body,
//!   fingerprint, claim (one commit), run, store the response (one commit).
//! - `http_layer/replay/{memory,file}`: a `POST` with a completed key: claim answered from
//!   committed state (no commit), stored response decoded and returned.
//!
//! Stores run without a background sweeper; the file store uses the default durability,
//! `Durability::Immediate` (one fsync per commit), so `new_key/file` measures the disk.
//!
//! Run with `cargo bench --bench http_layer --features http`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, StatusCode};
use idemstore::Store;
use idemstore::http::IdempotencyLayer;
use tempfile::TempDir;
use tower::ServiceExt;

const BODY: &str = "amount=500&currency=usd&source=tok_visa&description=benchmark+charge";

static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

fn fresh_key() -> String {
    let n = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    format!(
        "bench-{n:016x}-{:016x}",
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
}

fn route() -> Router {
    Router::new()
        .route(
            "/charges",
            post(|| async {
                (
                    StatusCode::CREATED,
                    [("location", "/charges/ch_1")],
                    "x".repeat(64),
                )
            }),
        )
        .route("/balance", get(|| async { "42" }))
}

fn request(method: &str, path: &str, key: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(BODY))
        .expect("a valid request")
}

fn memory_store() -> Store {
    Store::builder()
        .sweep_interval(None)
        .open_in_memory()
        .expect("an in-memory store")
}

fn file_store(dir: &TempDir) -> Store {
    Store::builder()
        .sweep_interval(None)
        .open(dir.path().join("bench.redb"))
        .expect("a file store")
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let send = |app: &Router, request: Request<Body>| {
        let response = runtime
            .block_on(app.clone().oneshot(request))
            .expect("infallible");
        assert!(response.status().is_success());
        black_box(response);
    };

    let mut group = c.benchmark_group("http_layer");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let plain = route();
    group.bench_function("no_layer", |b| {
        b.iter(|| send(&plain, request("POST", "/charges", Some(&fresh_key()))));
    });

    let layered = route().layer(IdempotencyLayer::new(memory_store()));
    group.bench_function("passthrough_get", |b| {
        b.iter(|| send(&layered, request("GET", "/balance", Some("k"))));
    });

    let dir = tempfile::tempdir().expect("a temporary directory");
    let stores = [
        (
            "memory",
            route().layer(IdempotencyLayer::new(memory_store())),
        ),
        (
            "file",
            route().layer(IdempotencyLayer::new(file_store(&dir))),
        ),
    ];
    for (name, app) in &stores {
        group.bench_function(format!("new_key/{name}"), |b| {
            b.iter(|| send(app, request("POST", "/charges", Some(&fresh_key()))));
        });
        let key = fresh_key();
        send(app, request("POST", "/charges", Some(&key)));
        group.bench_function(format!("replay/{name}"), |b| {
            b.iter(|| send(app, request("POST", "/charges", Some(&key))));
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
