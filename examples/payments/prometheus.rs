//! `GET /metrics` in Prometheus text format: the idempotency layer's counters
//! (`idemstore_http_*`), and the engine's own metrics (`idemstore_*`, listed in the crate docs)
//! when the example is built with `--features http,metrics`.

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use idemstore::http::Metrics;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the process's Prometheus recorder: the engine reports to it from then on, so it
/// comes before the store opens (the open sets `idemstore_poisoned` to 0; a report made before
/// any recorder exists is lost).
pub fn install() -> Result<PrometheusHandle, Box<dyn std::error::Error + Send + Sync>> {
    Ok(PrometheusBuilder::new().install_recorder()?)
}

/// The route that renders `handle`, with the layer's counters copied in at each scrape.
pub fn route(handle: PrometheusHandle, layer: Metrics) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let (handle, layer) = (handle.clone(), layer.clone());
            async move { render(&handle, &layer) }
        }),
    )
}

fn render(handle: &PrometheusHandle, layer: &Metrics) -> axum::response::Response {
    let s = layer.snapshot();
    let counters = [
        ("passed_through", s.passed_through),
        ("acquired", s.acquired),
        ("takeovers", s.takeovers),
        ("replayed", s.replayed),
        ("in_flight", s.in_flight),
        ("mismatched", s.mismatched),
        ("rejected", s.rejected),
        ("stored", s.stored),
        ("released", s.released),
        ("not_stored", s.not_stored),
        ("lease_extensions", s.lease_extensions),
        ("leases_lost", s.leases_lost),
        ("store_errors", s.store_errors),
    ];
    for (answer, total) in counters {
        metrics::counter!("idemstore_http_requests_total", "answer" => answer).absolute(total);
    }
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
