//! The Stripe-compatible HTTP API: axum routes behind authentication and the idempotency layer.
//!
//! `POST /v1/charges` charges (the side effect, written to the [`Ledger`]), `GET /v1/charges`
//! lists and `GET /v1/charges/{id}` retrieves. The API key is the idempotency scope. Every
//! error, the idempotency layer's included, is one of Stripe's error objects.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Extension, Path as UrlPath, RawQuery, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, PAD_INDIFFERENT};
use bytes::Bytes;
use idemstore::AnyBackend;
use idemstore::http::{IdempotencyLayer, IdempotentRequest};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::errors::{api_error, invalid_param, render_problem, stripe_error, unknown_param};
use crate::ledger::Ledger;
use crate::params::ChargeParams;
use crate::rng::Rng;

/// What every handler shares.
#[derive(Clone)]
struct AppState {
    ledger: Arc<Ledger>,
    rng: Arc<Rng>,
}

/// The caller, from its API key.
#[derive(Clone)]
pub struct Principal {
    /// `acct_` + 16 hex digits of SHA-256(API key): the ledger's owner column.
    pub account: String,
    /// SHA-256(API key): the idempotency scope (the key itself is never stored).
    scope: [u8; 32],
}

impl Principal {
    /// The principal of an API key.
    pub fn of_key(key: &str) -> Principal {
        let scope: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let hex: String = scope.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Principal {
            account: format!("acct_{hex}"),
            scope,
        }
    }
}

/// The API as an axum router: authentication first, then the idempotency layer on `backend`
/// (the embedded store, or one shared by several processes) scoped by the API key, then the
/// routes. Also returns the idempotency layer's counters (for `GET /metrics`).
pub fn app(backend: AnyBackend, ledger: Arc<Ledger>) -> (Router, idemstore::http::Metrics) {
    let state = AppState {
        ledger,
        rng: Arc::new(Rng::from_time()),
    };
    let idempotency = IdempotencyLayer::new(backend)
        .scope(|request: &axum::http::request::Parts| {
            let principal = request.extensions.get::<Principal>()?;
            Some(principal.scope.to_vec())
        })
        // The layer's own answers (409 in flight, a reused key, ...) as Stripe's error objects.
        .render_errors(render_problem);
    let metrics = idempotency.metrics();
    let router = Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/v1/charges/{id}", get(retrieve_charge))
        .fallback(unknown_route)
        // The last layer runs first: authenticate, then make the request idempotent.
        .layer(idempotency)
        .layer(middleware::from_fn(authenticate))
        .with_state(state);
    (router, metrics)
}

async fn authenticate(mut request: Request, next: Next) -> Response {
    let key = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(api_key);
    let Some(key) = key else {
        return stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            None,
            "You did not provide an API key. Provide it in the Authorization header, using \
             Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
        );
    };
    if !key.starts_with("sk_") || key.len() < 8 {
        return stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            None,
            "Invalid API Key provided.",
        );
    }
    request.extensions_mut().insert(Principal::of_key(&key));
    next.run(request).await
}

/// Basic-auth credentials as clients send them: the standard alphabet, padded or not. (The
/// URL-safe alphabet is accepted too.)
const BASIC_AUTH: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    PAD_INDIFFERENT.with_decode_allow_trailing_bits(true),
);
const BASIC_AUTH_URL_SAFE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    PAD_INDIFFERENT.with_decode_allow_trailing_bits(true),
);

/// The API key of a bearer or basic `Authorization` header (basic: the user name).
fn api_key(header: &str) -> Option<String> {
    if let Some(token) = header.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned());
    }
    let encoded = header.strip_prefix("Basic ")?.trim();
    let decoded = BASIC_AUTH
        .decode(encoded)
        .or_else(|_| BASIC_AUTH_URL_SAFE.decode(encoded))
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    Some(decoded.split(':').next()?.to_owned())
}

async fn create_charge(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    claim: Option<Extension<IdempotentRequest>>,
    body: Bytes,
) -> Response {
    let params = match ChargeParams::parse(&body) {
        Ok(params) => params,
        Err(error) => return *error,
    };
    let key = claim.as_ref().map(|Extension(c)| c.key().to_owned());
    // Reconcile: an earlier attempt of this key may have charged before it crashed or was
    // dropped. The ledger is the downstream system of record: look before charging again.
    if let Some(Extension(claim)) = &claim
        && claim.attempt() > 1
    {
        let ledger = Arc::clone(&app.ledger);
        let (account, key) = (principal.account.clone(), claim.key().to_owned());
        match tokio::task::spawn_blocking(move || ledger.reconcile(&account, &key)).await {
            Ok(Ok(Some(charge))) => return charge_response(&app, charge),
            Ok(Ok(None)) => {}
            Ok(Err(error)) => return api_error(&error.to_string()),
            Err(error) => return api_error(&error.to_string()),
        }
    }
    // The card network: a few milliseconds of latency, during which a client may give up.
    tokio::time::sleep(Duration::from_micros(500 + app.rng.below(4000))).await;
    let charge = json!({
        "id": format!("ch_{}", app.rng.token(24)),
        "object": "charge",
        "amount": params.amount,
        "amount_captured": params.amount,
        "amount_refunded": 0,
        "balance_transaction": format!("txn_{}", app.rng.token(24)),
        "captured": true,
        "created": unix_seconds(),
        "currency": params.currency,
        "customer": params.customer,
        "description": params.description,
        "livemode": false,
        "metadata": params.metadata,
        "paid": true,
        "refunded": false,
        "source": params.source.map(|s| json!({"id": s, "object": "card"})),
        "status": "succeeded",
    });
    // The side effect. `block_in_place` runs the (fsyncing) ledger commit on this worker while
    // the runtime moves its other tasks elsewhere, and the request future cannot be dropped in
    // the middle of it: once the handler got here, the charge is either committed or not
    // started, which is what makes the reconciliation above exact.
    let attempt = claim.as_ref().map_or(1, |Extension(c)| c.attempt());
    let written = tokio::task::block_in_place(|| {
        app.ledger
            .insert(&principal.account, key.as_deref(), attempt, &charge)
    });
    match written {
        Ok(()) => charge_response(&app, charge),
        Err(error) => api_error(&error.to_string()),
    }
}

fn charge_response(app: &AppState, charge: Value) -> Response {
    let mut response = axum::Json(charge).into_response();
    if let Ok(id) = HeaderValue::from_str(&format!("req_{}", app.rng.token(14))) {
        response.headers_mut().insert("request-id", id);
    }
    response
}

async fn retrieve_charge(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let ledger = Arc::clone(&app.ledger);
    let found = tokio::task::spawn_blocking(move || ledger.get(&id).map(|row| (id, row))).await;
    match found {
        Ok(Ok((_, Some(row)))) if row.account == principal.account => {
            axum::Json(row.charge).into_response()
        }
        Ok(Ok((id, _))) => stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("resource_missing"),
            Some("id"),
            &format!("No such charge: '{id}'"),
        ),
        Ok(Err(error)) => api_error(&error.to_string()),
        Err(error) => api_error(&error.to_string()),
    }
}

async fn list_charges(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut limit = 10;
    let mut starting_after = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=100).contains(&n) => limit = n,
                _ => {
                    return invalid_param(
                        "limit",
                        "parameter_invalid_integer",
                        "Invalid limit: must be an integer between 1 and 100.",
                    );
                }
            },
            "starting_after" => starting_after = Some(value.into_owned()),
            other => return unknown_param(other),
        }
    }
    let ledger = Arc::clone(&app.ledger);
    let account = principal.account.clone();
    let listed = tokio::task::spawn_blocking(move || {
        ledger.list(&account, limit, starting_after.as_deref())
    })
    .await;
    match listed {
        Ok(Ok((data, has_more))) => axum::Json(json!({
            "object": "list",
            "url": "/v1/charges",
            "has_more": has_more,
            "data": data,
        }))
        .into_response(),
        Ok(Err(error)) => api_error(&error.to_string()),
        Err(error) => api_error(&error.to_string()),
    }
}

async fn unknown_route(method: Method, uri: axum::http::Uri) -> Response {
    stripe_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        None,
        None,
        &format!("Unrecognized request URL ({method}: {}).", uri.path()),
    )
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
