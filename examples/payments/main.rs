//! A Stripe-compatible mini payment API on idemstore, and a chaos client that proves its
//! charges run exactly once.
//!
//! ```sh
//! cargo run --release --example payments --features http
//! cargo run --release --example payments --features http -- --serve --addr 127.0.0.1:4242 --data ./payments-data
//! ```
//!
//! With no arguments it starts the service as a child process on a temporary data directory and
//! drives it with a chaos client: thousands of requests from four tenants, responses dropped
//! mid-flight and retried, concurrent duplicate storms, keys reused with other parameters,
//! invalid parameters, and the service killed with SIGKILL and restarted on the same data
//! mid-run. Then it audits the ledger and prints a summary; "duplicates executed" must be 0.
//!
//! `--serve` keeps serving for real clients: point an official Stripe SDK at it with its API
//! base URL (`http://127.0.0.1:4242`) and any `sk_test_...` key.
//!
//! The API: `POST /v1/charges` (form-encoded `amount`, `currency`, optional `source`,
//! `customer`, `description`, `metadata[...]`) -> a charge object; `GET /v1/charges/{id}`;
//! `GET /v1/charges` (newest first, `limit`, `starting_after`, `has_more`). The API key
//! (bearer, or basic-auth user name) is the idempotency scope, so tenants never share keys.
//!
//! Exactly-once, honestly: the idempotency layer runs each `(API key, Idempotency-Key)` once
//! and replays its response. The one window it cannot close is a crash (or a dropped request)
//! after the charge was written but before the response was stored; the layer then lets the
//! retry run as attempt 2, and the handler reconciles: on `attempt() > 1` it looks the charge
//! up in the ledger by its key before charging again.

use std::collections::HashMap;
use std::error::Error;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Extension, Path as UrlPath, RawQuery, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idemstore::Store;
use idemstore::http::{IdempotencyLayer, IdempotentRequest};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

type BoxError = Box<dyn Error + Send + Sync>;

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = if args.serve {
        serve_main(&args)
    } else {
        chaos_main(&args)
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("payments: {error}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage:
  payments                                   chaos run on a temporary store, then a summary
  payments --payments N --concurrency N --crashes N --seed N
  payments --serve [--addr 127.0.0.1:4242] [--data DIR]   serve real clients
                                             (default data directory: ./payments-data)";

struct Args {
    serve: bool,
    addr: SocketAddr,
    data: Option<PathBuf>,
    payments: usize,
    concurrency: usize,
    crashes: usize,
    seed: u64,
    /// Set by the chaos run on its child: shut down when stdin closes (the parent is done or
    /// gone).
    parent_pipe: bool,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args {
            serve: false,
            addr: SocketAddr::from(([127, 0, 0, 1], 4242)),
            data: None,
            payments: 2000,
            concurrency: 48,
            crashes: 2,
            seed: 42,
            parent_pipe: false,
        };
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            match arg.as_str() {
                "--serve" => parsed.serve = true,
                "--parent-pipe" => parsed.parent_pipe = true,
                "--addr" => {
                    parsed.addr = value("--addr")?
                        .parse()
                        .map_err(|e| format!("--addr: {e}"))?;
                }
                "--data" => parsed.data = Some(PathBuf::from(value("--data")?)),
                "--payments" => parsed.payments = number(&value("--payments")?)?,
                "--concurrency" => parsed.concurrency = number(&value("--concurrency")?)?.max(1),
                "--crashes" => parsed.crashes = number(&value("--crashes")?)?,
                "--seed" => parsed.seed = number(&value("--seed")?)? as u64,
                other => return Err(format!("unknown argument {other}")),
            }
        }
        Ok(parsed)
    }
}

fn number(s: &str) -> Result<usize, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

// =====================================================================================
// The service
// =====================================================================================

fn serve_main(args: &Args) -> Result<ExitCode, BoxError> {
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from("payments-data"));
    std::fs::create_dir_all(&data)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = Store::open(data.join("idempotency.redb"))?;
        let orphans = store.orphans(10_000)?.len();
        let ledger = Arc::new(Ledger::open(&data.join("ledger.redb"))?);
        let listener = tokio::net::TcpListener::bind(args.addr).await?;
        println!(
            "payments: listening on http://{} (data in {}; {orphans} requests in flight when the \
             last process died, reconciled on retry)",
            listener.local_addr()?,
            data.display()
        );
        std::io::stdout().flush()?;
        let parent_pipe = args.parent_pipe;
        let shutdown = async move {
            if parent_pipe {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
                    let _ = tx.send(());
                });
                let _ = rx.await;
            } else {
                let _ = tokio::signal::ctrl_c().await;
            }
        };
        axum::serve(listener, app(store, ledger))
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok::<_, BoxError>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone)]
struct AppState {
    ledger: Arc<Ledger>,
    rng: Arc<Rng>,
}

/// The caller, from its API key.
#[derive(Clone)]
struct Principal {
    /// `acct_` + 16 hex digits of SHA-256(API key): the ledger's owner column.
    account: String,
    /// SHA-256(API key): the idempotency scope (the key itself is never stored).
    scope: [u8; 32],
}

fn app(store: Store, ledger: Arc<Ledger>) -> Router {
    let state = AppState {
        ledger,
        rng: Arc::new(Rng::from_time()),
    };
    let idempotency = IdempotencyLayer::new(store).scope(|request: &axum::http::request::Parts| {
        let principal = request.extensions.get::<Principal>()?;
        Some(principal.scope.to_vec())
    });
    Router::new()
        .route("/v1/charges", post(create_charge).get(list_charges))
        .route("/v1/charges/{id}", get(retrieve_charge))
        .fallback(unknown_route)
        // The last layer runs first: authenticate, then make the request idempotent.
        .layer(idempotency)
        .layer(middleware::from_fn(authenticate))
        .with_state(state)
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
    let scope: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let account = format!("acct_{}", hex(scope.get(..8).unwrap_or_default()));
    request
        .extensions_mut()
        .insert(Principal { account, scope });
    next.run(request).await
}

/// The API key of a bearer or basic `Authorization` header (basic: the user name).
fn api_key(header: &str) -> Option<String> {
    if let Some(token) = header.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned());
    }
    let decoded = base64_decode(header.strip_prefix("Basic ")?.trim())?;
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
    for (name, value) in form_pairs(query.unwrap_or_default().as_bytes()) {
        match name.as_str() {
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
            "starting_after" => starting_after = Some(value),
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

/// The validated parameters of `POST /v1/charges`.
struct ChargeParams {
    amount: u64,
    currency: String,
    source: Option<String>,
    customer: Option<String>,
    description: Option<String>,
    metadata: serde_json::Map<String, Value>,
}

impl ChargeParams {
    fn parse(body: &[u8]) -> Result<ChargeParams, Box<Response>> {
        let mut amount = None;
        let mut currency = None;
        let mut params = ChargeParams {
            amount: 0,
            currency: String::new(),
            source: None,
            customer: None,
            description: None,
            metadata: serde_json::Map::new(),
        };
        for (name, value) in form_pairs(body) {
            match name.as_str() {
                "amount" => amount = Some(value),
                "currency" => currency = Some(value),
                "source" => params.source = Some(value),
                "customer" => params.customer = Some(value),
                "description" => params.description = Some(value),
                other => match other
                    .strip_prefix("metadata[")
                    .and_then(|k| k.strip_suffix(']'))
                {
                    Some(key) if !key.is_empty() && key.len() <= 40 && value.len() <= 500 => {
                        if params.metadata.len() >= 50 {
                            return Err(Box::new(invalid_param(
                                "metadata",
                                "parameter_invalid_empty",
                                "Metadata can have at most 50 keys.",
                            )));
                        }
                        params.metadata.insert(key.to_owned(), Value::String(value));
                    }
                    Some(_) => {
                        return Err(Box::new(invalid_param(
                            other,
                            "parameter_invalid_string",
                            "Metadata keys are 1 to 40 characters, values at most 500.",
                        )));
                    }
                    None => return Err(Box::new(unknown_param(other))),
                },
            }
        }
        let Some(amount) = amount else {
            return Err(Box::new(missing_param("amount")));
        };
        params.amount = match amount.parse::<u64>() {
            Ok(a) if (50..=99_999_999).contains(&a) => a,
            Ok(_) => {
                return Err(Box::new(invalid_param(
                    "amount",
                    "amount_too_small",
                    "Amount must be at least 50 (in the currency's smallest unit) and at most \
                     99999999.",
                )));
            }
            Err(_) => {
                return Err(Box::new(invalid_param(
                    "amount",
                    "parameter_invalid_integer",
                    &format!("Invalid integer: {amount}"),
                )));
            }
        };
        let Some(currency) = currency else {
            return Err(Box::new(missing_param("currency")));
        };
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(Box::new(invalid_param(
                "currency",
                "parameter_invalid_string",
                &format!("Invalid currency: {currency}. Use a three-letter ISO currency code."),
            )));
        }
        params.currency = currency.to_ascii_lowercase();
        Ok(params)
    }
}

fn stripe_error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
    message: &str,
) -> Response {
    let mut error = json!({ "type": kind, "message": message });
    if let Some(code) = code {
        error["code"] = code.into();
    }
    if let Some(param) = param {
        error["param"] = param.into();
    }
    (status, axum::Json(json!({ "error": error }))).into_response()
}

fn missing_param(param: &str) -> Response {
    stripe_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("parameter_missing"),
        Some(param),
        &format!("Missing required param: {param}."),
    )
}

fn invalid_param(param: &str, code: &str, message: &str) -> Response {
    stripe_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some(code),
        Some(param),
        message,
    )
}

fn unknown_param(param: &str) -> Response {
    stripe_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("parameter_unknown"),
        Some(param),
        &format!("Received unknown parameter: {param}"),
    )
}

/// A 500: the idempotency layer releases the claim, so the client's retry runs again.
fn api_error(message: &str) -> Response {
    stripe_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "api_error",
        None,
        None,
        message,
    )
}

// ----- the ledger: every charge executed, persisted beside the idempotency store -----

/// Charge id -> ledger row (JSON).
const CHARGES: TableDefinition<&str, &[u8]> = TableDefinition::new("charges");
/// (account, sequence) -> charge id: listing, newest first.
const BY_ACCOUNT: TableDefinition<(&str, u64), &str> = TableDefinition::new("by_account");
/// (account, idempotency key) -> charge id: reconciliation.
const BY_KEY: TableDefinition<(&str, &str), &str> = TableDefinition::new("by_key");
/// Counters: "seq", "reconciled".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The system of record: one row per charge executed, with the account, the idempotency key
/// and the attempt that executed it, so that exactly-once can be audited afterwards.
///
/// Writes go through one writer thread that commits everything queued while the previous
/// commit was syncing in one durable transaction (group commit, as the engine does): the
/// disk here manages a few hundred fsyncs a second, and one commit per charge would cap the
/// service at that.
struct Ledger {
    db: Arc<Database>,
    writer: std::sync::mpsc::Sender<LedgerJob>,
}

enum LedgerJob {
    Insert {
        account: String,
        key: Option<String>,
        attempt: u32,
        charge: Value,
        done: std::sync::mpsc::SyncSender<Result<(), String>>,
    },
    Reconciled,
}

struct Row {
    account: String,
    charge: Value,
}

/// What the audit of a ledger found.
#[derive(Default)]
struct Audit {
    charges: u64,
    /// Charges beyond the first for one logical payment (`metadata[order_id]`).
    duplicates: u64,
    reconciled: u64,
    /// (account, order id) -> charge ids.
    by_order: HashMap<(String, String), Vec<String>>,
}

/// The most jobs one ledger commit carries.
const LEDGER_BATCH_MAX: usize = 512;

impl Ledger {
    fn open(path: &Path) -> Result<Ledger, BoxError> {
        let db = Arc::new(Database::create(path)?);
        let tx = db.begin_write()?;
        tx.open_table(CHARGES)?;
        tx.open_table(BY_ACCOUNT)?;
        tx.open_table(BY_KEY)?;
        tx.open_table(META)?;
        tx.commit()?;
        let (writer, jobs) = std::sync::mpsc::channel();
        let writer_db = Arc::clone(&db);
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || ledger_writer(&writer_db, &jobs))?;
        Ok(Ledger { db, writer })
    }

    /// Records an executed charge; returns once it is durable. Blocking.
    fn insert(
        &self,
        account: &str,
        key: Option<&str>,
        attempt: u32,
        charge: &Value,
    ) -> Result<(), BoxError> {
        let (done, ack) = std::sync::mpsc::sync_channel(1);
        self.writer
            .send(LedgerJob::Insert {
                account: account.to_owned(),
                key: key.map(str::to_owned),
                attempt,
                charge: charge.clone(),
                done,
            })
            .map_err(|_| "the ledger writer stopped")?;
        ack.recv().map_err(|_| "the ledger writer stopped")??;
        Ok(())
    }

    /// The charge an earlier attempt of `(account, key)` executed, if any (counted).
    fn reconcile(&self, account: &str, key: &str) -> Result<Option<Value>, BoxError> {
        let id = {
            let read = self.db.begin_read()?;
            let by_key = read.open_table(BY_KEY)?;
            let Some(id) = by_key.get((account, key))? else {
                return Ok(None);
            };
            id.value().to_owned()
        };
        let _ = self.writer.send(LedgerJob::Reconciled);
        Ok(self.get(&id)?.map(|row| row.charge))
    }

    fn get(&self, id: &str) -> Result<Option<Row>, BoxError> {
        let read = self.db.begin_read()?;
        let charges = read.open_table(CHARGES)?;
        let Some(bytes) = charges.get(id)? else {
            return Ok(None);
        };
        let mut row: Value = serde_json::from_slice(bytes.value())?;
        Ok(Some(Row {
            account: row["account"].as_str().unwrap_or_default().to_owned(),
            charge: row["charge"].take(),
        }))
    }

    /// Up to `limit` charges of `account`, newest first, after `starting_after`.
    fn list(
        &self,
        account: &str,
        limit: usize,
        starting_after: Option<&str>,
    ) -> Result<(Vec<Value>, bool), BoxError> {
        let read = self.db.begin_read()?;
        let by_account = read.open_table(BY_ACCOUNT)?;
        let charges = read.open_table(CHARGES)?;
        let mut upper = u64::MAX;
        if let Some(after) = starting_after {
            let Some(bytes) = charges.get(after)? else {
                return Ok((Vec::new(), false));
            };
            let row: Value = serde_json::from_slice(bytes.value())?;
            if row["account"] != account {
                return Ok((Vec::new(), false));
            }
            upper = row["seq"].as_u64().unwrap_or(0);
        }
        let mut data = Vec::new();
        let mut has_more = false;
        for entry in by_account.range((account, 0)..(account, upper))?.rev() {
            let (_, id) = entry?;
            if data.len() == limit {
                has_more = true;
                break;
            }
            if let Some(bytes) = charges.get(id.value())? {
                let mut row: Value = serde_json::from_slice(bytes.value())?;
                data.push(row["charge"].take());
            }
        }
        Ok((data, has_more))
    }

    fn audit(&self) -> Result<Audit, BoxError> {
        let read = self.db.begin_read()?;
        let mut audit = Audit {
            reconciled: read
                .open_table(META)?
                .get("reconciled")?
                .map_or(0, |v| v.value()),
            ..Audit::default()
        };
        for entry in read.open_table(CHARGES)?.iter()? {
            let (id, bytes) = entry?;
            let row: Value = serde_json::from_slice(bytes.value())?;
            audit.charges += 1;
            let order = row["charge"]["metadata"]["order_id"]
                .as_str()
                .unwrap_or("none")
                .to_owned();
            let account = row["account"].as_str().unwrap_or_default().to_owned();
            let ids = audit.by_order.entry((account, order)).or_default();
            ids.push(id.value().to_owned());
            if ids.len() > 1 {
                audit.duplicates += 1;
            }
        }
        Ok(audit)
    }
}

/// The ledger's writer thread: drains the queue, applies it in one transaction, commits once
/// (durably) and acknowledges every insert of the batch.
fn ledger_writer(db: &Database, jobs: &std::sync::mpsc::Receiver<LedgerJob>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < LEDGER_BATCH_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = commit_batch(db, &batch).map_err(|e| e.to_string());
        for job in batch {
            if let LedgerJob::Insert { done, .. } = job {
                let _ = done.send(result.clone());
            }
        }
    }
}

fn commit_batch(db: &Database, batch: &[LedgerJob]) -> Result<(), BoxError> {
    let tx = db.begin_write()?;
    {
        let mut meta = tx.open_table(META)?;
        let mut charges = tx.open_table(CHARGES)?;
        let mut by_account = tx.open_table(BY_ACCOUNT)?;
        let mut by_key = tx.open_table(BY_KEY)?;
        let mut seq = meta.get("seq")?.map_or(0, |v| v.value());
        let mut reconciled = meta.get("reconciled")?.map_or(0, |v| v.value());
        for job in batch {
            match job {
                LedgerJob::Insert {
                    account,
                    key,
                    attempt,
                    charge,
                    ..
                } => {
                    let id = charge["id"].as_str().ok_or("a charge has an id")?;
                    seq += 1;
                    let row = json!({
                        "account": account,
                        "idempotency_key": key,
                        "attempt": attempt,
                        "seq": seq,
                        "charge": charge,
                    });
                    charges.insert(id, serde_json::to_vec(&row)?.as_slice())?;
                    by_account.insert((account.as_str(), seq), id)?;
                    if let Some(key) = key {
                        by_key.insert((account.as_str(), key.as_str()), id)?;
                    }
                }
                LedgerJob::Reconciled => reconciled += 1,
            }
        }
        meta.insert("seq", seq)?;
        meta.insert("reconciled", reconciled)?;
    }
    tx.commit()?;
    Ok(())
}

// ----- small helpers: form decoding, base64, hex, time, randomness -----

/// `application/x-www-form-urlencoded` pairs (also query strings), percent-decoded.
fn form_pairs(input: &[u8]) -> Vec<(String, String)> {
    input
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let mut parts = pair.splitn(2, |&b| b == b'=');
            let name = percent_decode(parts.next().unwrap_or_default());
            let value = percent_decode(parts.next().unwrap_or_default());
            (name, value)
        })
        .collect()
}

fn percent_decode(input: &[u8]) -> String {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.iter().copied();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.next();
                let lo = bytes.next();
                match (hi.and_then(hex_digit), lo.and_then(hex_digit)) {
                    (Some(h), Some(l)) => out.push(h << 4 | l),
                    _ => out.extend([Some(b'%'), hi, lo].into_iter().flatten()),
                }
            }
            b => out.push(b),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn base64_decode(input: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in input.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = acc << 6 | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// SplitMix64 over an atomic counter: a shared, lock-free source of ids and jitter.
struct Rng(AtomicU64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(AtomicU64::new(seed))
    }

    fn from_time() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng::new(nanos ^ u64::from(std::process::id()).rotate_left(32))
    }

    fn next(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn token(&self, len: usize) -> String {
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        (0..len)
            .map(|_| ALPHABET[self.below(ALPHABET.len() as u64) as usize] as char)
            .collect()
    }
}

// =====================================================================================
// The chaos run
// =====================================================================================

const TENANTS: [&str; 4] = [
    "sk_test_alice_4eC39HqLyjWDarjtT1zdp7dc",
    "sk_test_bob_9fK2mQpL0aZxV7bN3cR8sT1u",
    "sk_test_carol_Q1w2E3r4T5y6U7i8O9p0AsDf",
    "sk_test_dave_Zx8Cv7Bn6Mm5Ll4Kk3Jj2Hh1G",
];

/// What one logical payment does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Sent over a flaky network: responses are dropped mid-flight, the client retries.
    Flaky,
    /// Eight concurrent copies of the same request.
    Storm,
    /// Completed, then the key is reused with another amount (422), then retried as it was.
    Reuse,
    /// Invalid parameters: a Stripe 400 error, stored and replayed; no charge.
    Invalid,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Flaky => "flaky network",
            Kind::Storm => "duplicate storm",
            Kind::Reuse => "reused key",
            Kind::Invalid => "invalid parameters",
        }
    }
}

struct Payment {
    order_id: String,
    tenant: usize,
    key: String,
    /// Whether the key is the previous payment's, used by another tenant.
    shares_key: bool,
    amount: u64,
    kind: Kind,
}

impl Payment {
    fn body(&self, amount: u64) -> String {
        let currency = if self.kind == Kind::Invalid {
            "dollars"
        } else {
            "usd"
        };
        format!(
            "amount={amount}&currency={currency}&source=tok_visa&description={}&{}={}",
            percent_encode(&format!("Order {}", self.order_id)),
            percent_encode("metadata[order_id]"),
            self.order_id
        )
    }

    fn authorization(&self) -> String {
        let key = TENANTS[self.tenant % TENANTS.len()];
        if self.tenant.is_multiple_of(2) {
            format!("Bearer {key}")
        } else {
            format!("Basic {}", base64_encode(format!("{key}:").as_bytes()))
        }
    }
}

/// Builds the workload: mostly flaky payments, some storms, reused keys and invalid requests;
/// one payment in twelve shares its idempotency key with another tenant's payment.
fn workload(count: usize, rng: &Rng) -> Vec<Payment> {
    let mut payments: Vec<Payment> = Vec::with_capacity(count);
    for i in 0..count {
        let kind = match rng.below(100) {
            0..=64 => Kind::Flaky,
            65..=79 => Kind::Storm,
            80..=94 => Kind::Reuse,
            _ => Kind::Invalid,
        };
        let tenant = rng.below(TENANTS.len() as u64) as usize;
        let share = rng.chance(8);
        let (key, shares_key) = match payments.last() {
            // The key of the previous payment, by another tenant: scopes keep the two apart.
            // (Only pairs: a third user of the key could be the first one's tenant.)
            Some(previous) if share && previous.tenant != tenant && !previous.shares_key => {
                (previous.key.clone(), true)
            }
            _ => (
                format!("{}-{}-{}", rng.token(8), rng.token(4), rng.token(12)),
                false,
            ),
        };
        payments.push(Payment {
            order_id: format!("ord_{i:05}"),
            tenant,
            key,
            shares_key,
            amount: 500 + rng.below(100_000),
            kind,
        });
    }
    payments
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    dropped: AtomicU64,
    connection_errors: AtomicU64,
    ok: AtomicU64,
    replays: AtomicU64,
    conflicts: AtomicU64,
    mismatches: AtomicU64,
    invalid: AtomicU64,
    server_errors: AtomicU64,
    unexpected: AtomicU64,
    storm_disagreements: AtomicU64,
    payments_done: AtomicUsize,
    gave_up: AtomicU64,
    restarts: AtomicU64,
}

fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The answer to one attempt.
enum Attempt {
    Answered {
        status: StatusCode,
        replayed: bool,
        body: Bytes,
    },
    /// The client gave up waiting (a dropped response).
    Dropped,
    /// No connection (the server is down or restarting) or a broken one.
    Failed,
}

struct Chaos {
    client: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    tally: Tally,
    rng: Rng,
}

/// Attempts per request before the client gives up (never reached in a healthy run).
const ATTEMPTS_MAX: usize = 400;

impl Chaos {
    async fn send(&self, payment: &Payment, amount: u64, drop_after: Option<Duration>) -> Attempt {
        add(&self.tally.requests);
        let request = axum::http::Request::post(format!("http://{}/v1/charges", self.addr))
            .header("authorization", payment.authorization())
            .header("idempotency-key", &payment.key)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("stripe-version", "2024-06-20")
            .body(Full::new(Bytes::from(payment.body(amount))));
        let Ok(request) = request else {
            return Attempt::Failed;
        };
        let exchange = async {
            let response = self.client.request(request).await.ok()?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.ok()?.to_bytes();
            Some((parts, body))
        };
        let answer = match drop_after {
            Some(after) => match tokio::time::timeout(after, exchange).await {
                Ok(answer) => answer,
                Err(_) => {
                    add(&self.tally.dropped);
                    return Attempt::Dropped;
                }
            },
            None => exchange.await,
        };
        let Some((parts, body)) = answer else {
            add(&self.tally.connection_errors);
            return Attempt::Failed;
        };
        let replayed = parts
            .headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        Attempt::Answered {
            status: parts.status,
            replayed,
            body,
        }
    }

    /// Sends until a final answer; returns the charge id (or `None` for a final error).
    async fn settle(&self, payment: &Payment, amount: u64, flaky: bool) -> Option<String> {
        for attempt in 0..ATTEMPTS_MAX {
            let drop_after = (flaky && attempt < 6 && self.rng.chance(35))
                .then(|| Duration::from_micros(self.rng.below(7000)));
            match self.send(payment, amount, drop_after).await {
                Attempt::Answered {
                    status: StatusCode::OK,
                    replayed,
                    body,
                } => {
                    add(&self.tally.ok);
                    if replayed {
                        add(&self.tally.replays);
                    }
                    let charge: Value = serde_json::from_slice(&body).unwrap_or_default();
                    return charge["id"].as_str().map(str::to_owned);
                }
                Attempt::Answered {
                    status: StatusCode::CONFLICT,
                    ..
                } => {
                    add(&self.tally.conflicts);
                    // Retry-After says 1 s; the chaos client retries sooner to keep the run
                    // short (a 409 is cheap: a read of committed state).
                    self.pause(5, 20).await;
                }
                Attempt::Answered {
                    status: StatusCode::BAD_REQUEST,
                    replayed,
                    ..
                } if payment.kind == Kind::Invalid => {
                    add(&self.tally.invalid);
                    if replayed {
                        add(&self.tally.replays);
                    }
                    return None;
                }
                Attempt::Answered { status, .. } if status.is_server_error() => {
                    add(&self.tally.server_errors);
                    self.pause(10, 30).await;
                }
                Attempt::Answered { .. } => {
                    add(&self.tally.unexpected);
                    return None;
                }
                Attempt::Dropped => self.pause(1, 10).await,
                Attempt::Failed => self.pause(20, 60).await,
            }
        }
        add(&self.tally.gave_up);
        None
    }

    async fn pause(&self, min_ms: u64, max_ms: u64) {
        let ms = min_ms + self.rng.below(max_ms - min_ms + 1);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Runs one logical payment; returns the charge id the client ended up with.
    async fn run(self: &Arc<Self>, payment: Arc<Payment>) -> Option<String> {
        match payment.kind {
            Kind::Flaky => self.settle(&payment, payment.amount, true).await,
            Kind::Invalid => {
                self.settle(&payment, payment.amount, false).await;
                self.settle(&payment, payment.amount, false).await
            }
            Kind::Storm => {
                let copies: Vec<_> = (0..8)
                    .map(|_| {
                        let (chaos, payment) = (Arc::clone(self), Arc::clone(&payment));
                        tokio::spawn(
                            async move { chaos.settle(&payment, payment.amount, false).await },
                        )
                    })
                    .collect();
                let mut ids = Vec::new();
                for copy in copies {
                    ids.push(copy.await.ok().flatten());
                }
                let first = ids.first().cloned().flatten();
                if first.is_none() || ids.iter().any(|id| *id != first) {
                    add(&self.tally.storm_disagreements);
                }
                first
            }
            Kind::Reuse => {
                let id = self.settle(&payment, payment.amount, false).await;
                // Same key, other parameters: a client bug the layer refuses with 422.
                for _ in 0..ATTEMPTS_MAX {
                    match self.send(&payment, payment.amount + 1, None).await {
                        Attempt::Answered {
                            status: StatusCode::UNPROCESSABLE_ENTITY,
                            ..
                        } => {
                            add(&self.tally.mismatches);
                            break;
                        }
                        Attempt::Answered { .. } => {
                            add(&self.tally.unexpected);
                            break;
                        }
                        _ => self.pause(20, 60).await,
                    }
                }
                let again = self.settle(&payment, payment.amount, false).await;
                if again != id {
                    add(&self.tally.unexpected);
                }
                id
            }
        }
    }
}

/// The service as a child process: this example re-run with `--serve`.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

fn spawn_server(data: &Path, addr: SocketAddr) -> Result<ServerProcess, BoxError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("server.log"))?;
    let mut last_error: BoxError = "the server did not start".into();
    for _ in 0..20 {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--serve", "--parent-pipe", "--addr", &addr.to_string()])
            .arg("--data")
            .arg(data)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log.try_clone()?)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let announced = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        if let Some(addr) = announced {
            return Ok(ServerProcess { child, addr });
        }
        // Typically the port is still held by the killed process's sockets: try again.
        let _ = child.kill();
        let _ = child.wait();
        last_error = format!("the server did not announce its address (got {line:?})").into();
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last_error)
}

fn chaos_main(args: &Args) -> Result<ExitCode, BoxError> {
    let temp = tempfile::tempdir()?;
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&data)?;
    let started = Instant::now();
    let server = spawn_server(&data, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = server.addr;
    let server = Arc::new(Mutex::new(Some(server)));
    eprintln!(
        "payments: service on http://{addr} (child process, data in {})",
        data.display()
    );

    let rng = Rng::new(args.seed);
    let payments: Vec<Arc<Payment>> = workload(args.payments, &rng)
        .into_iter()
        .map(Arc::new)
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let chaos = Arc::new(Chaos {
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(args.concurrency)
            .build_http(),
        addr,
        tally: Tally::default(),
        rng: Rng::new(args.seed ^ 0x5EED),
    });

    let outcomes: Vec<Option<String>> = runtime.block_on(async {
        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let total = payments.len();
        let monkey = tokio::spawn(crash_monkey(
            Arc::clone(&chaos),
            Arc::clone(&server),
            data.clone(),
            args.crashes,
            total,
        ));
        let progress = tokio::spawn(progress_bar(Arc::clone(&chaos), total, Arc::clone(&done)));
        let results = Arc::new(Mutex::new(vec![None; total]));
        let workers: Vec<_> = (0..args.concurrency)
            .map(|_| {
                let (chaos, next, results) =
                    (Arc::clone(&chaos), Arc::clone(&next), Arc::clone(&results));
                let payments = payments.clone();
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(payment) = payments.get(i) else {
                            break;
                        };
                        let id = chaos.run(Arc::clone(payment)).await;
                        if let Ok(mut results) = results.lock()
                            && let Some(slot) = results.get_mut(i)
                        {
                            *slot = id;
                        }
                        chaos.tally.payments_done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for worker in workers {
            let _ = worker.await;
        }
        let _ = monkey.await;
        done.store(true, Ordering::Relaxed);
        let _ = progress.await;
        results.lock().map(|r| r.clone()).unwrap_or_default()
    });
    let elapsed = started.elapsed();

    // Stop the service cleanly (close its stdin), then audit what it left on disk.
    if let Some(mut server) = server.lock().map_err(|_| "poisoned")?.take() {
        drop(server.child.stdin.take());
        server.child.wait()?;
    }
    let ledger = Ledger::open(&data.join("ledger.redb"))?;
    let audit = ledger.audit()?;
    let store = Store::open(data.join("idempotency.redb"))?;
    let orphans = store.orphans(100_000)?.len();
    drop(store);

    let mut disagreements = 0u64;
    let mut expected = 0u64;
    for (payment, outcome) in payments.iter().zip(&outcomes) {
        if payment.kind == Kind::Invalid {
            continue;
        }
        expected += 1;
        let account = {
            let scope: [u8; 32] = Sha256::digest(TENANTS[payment.tenant].as_bytes()).into();
            format!("acct_{}", hex(scope.get(..8).unwrap_or_default()))
        };
        let in_ledger = audit.by_order.get(&(account, payment.order_id.clone()));
        let agrees = matches!((outcome, in_ledger), (Some(id), Some(ids)) if ids.len() == 1 && ids.first() == Some(id));
        if !agrees {
            disagreements += 1;
            if disagreements <= 10 {
                eprintln!(
                    "disagreement: {} ({}) client got {outcome:?}, ledger has {in_ledger:?}",
                    payment.order_id,
                    payment.kind.name()
                );
            }
        }
    }

    let t = &chaos.tally;
    let rows: Vec<(&str, String)> = vec![
        ("logical payments (4 tenants)", args.payments.to_string()),
        (
            "idempotency keys shared by two tenants",
            payments.iter().filter(|p| p.shares_key).count().to_string(),
        ),
        ("requests sent", load(&t.requests).to_string()),
        (
            "responses dropped by the client",
            load(&t.dropped).to_string(),
        ),
        (
            "connection errors (service down)",
            load(&t.connection_errors).to_string(),
        ),
        (
            "service crashes (SIGKILL) + restarts",
            load(&t.restarts).to_string(),
        ),
        ("", String::new()),
        ("charges expected", expected.to_string()),
        ("charges executed (ledger)", audit.charges.to_string()),
        ("200 answers", load(&t.ok).to_string()),
        (
            "replays (Idempotent-Replayed: true)",
            load(&t.replays).to_string(),
        ),
        ("409 original in flight", load(&t.conflicts).to_string()),
        (
            "422 key reused with other params",
            load(&t.mismatches).to_string(),
        ),
        (
            "400 invalid params (stored, replayed)",
            load(&t.invalid).to_string(),
        ),
        ("5xx (retried)", load(&t.server_errors).to_string()),
        (
            "retries reconciled from the ledger",
            audit.reconciled.to_string(),
        ),
        ("orphaned claims left in the store", orphans.to_string()),
        (
            "client/ledger disagreements",
            (disagreements + load(&t.storm_disagreements) + load(&t.unexpected)).to_string(),
        ),
        ("payments given up", load(&t.gave_up).to_string()),
        ("duplicates executed", audit.duplicates.to_string()),
    ];
    println!();
    println!("idemstore payments demo: chaos run against a Stripe-compatible API");
    println!();
    for (name, value) in &rows {
        if name.is_empty() {
            println!("  {}", "-".repeat(48));
        } else {
            println!("  {name:<38} {value:>9}");
        }
    }
    println!();
    let healthy = audit.duplicates == 0
        && audit.charges == expected
        && disagreements == 0
        && load(&t.storm_disagreements) == 0
        && load(&t.unexpected) == 0
        && load(&t.gave_up) == 0;
    println!(
        "  {} in {:.1} s: {}",
        if healthy { "PASS" } else { "FAIL" },
        elapsed.as_secs_f64(),
        if healthy {
            "every payment charged exactly once"
        } else {
            "see the counts above"
        }
    );
    if !healthy {
        eprintln!("server log: {}", data.join("server.log").display());
        // Keep the data for inspection.
        let _ = temp.keep();
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Kills the service with SIGKILL at evenly spaced points of the run, while requests are in
/// flight, and restarts it on the same data and port.
async fn crash_monkey(
    chaos: Arc<Chaos>,
    server: Arc<Mutex<Option<ServerProcess>>>,
    data: PathBuf,
    crashes: usize,
    total: usize,
) {
    for n in 1..=crashes {
        let at = total * n / (crashes + 1);
        while chaos.tally.payments_done.load(Ordering::Relaxed) < at {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let data = data.clone();
        let server = Arc::clone(&server);
        let addr = chaos.addr;
        let restarted = tokio::task::spawn_blocking(move || -> Result<(), BoxError> {
            let mut slot = server.lock().map_err(|_| "poisoned")?;
            if let Some(mut old) = slot.take() {
                old.child.kill()?; // SIGKILL: no shutdown, no flush, requests cut mid-flight
                old.child.wait()?;
            }
            *slot = Some(spawn_server(&data, addr)?);
            Ok(())
        })
        .await;
        match restarted {
            Ok(Ok(())) => add(&chaos.tally.restarts),
            Ok(Err(error)) => eprintln!("\npayments: restart failed: {error}"),
            Err(error) => eprintln!("\npayments: restart failed: {error}"),
        }
    }
}

/// A one-line progress bar on stderr.
async fn progress_bar(chaos: Arc<Chaos>, total: usize, done: Arc<AtomicBool>) {
    const WIDTH: usize = 30;
    loop {
        let finished = done.load(Ordering::Relaxed);
        let n = chaos.tally.payments_done.load(Ordering::Relaxed);
        let filled = WIDTH * n / total.max(1);
        eprint!(
            "\r  [{}{}] {n:>5}/{total} payments  {:>6} requests  {} restarts ",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            load(&chaos.tally.requests),
            load(&chaos.tally.restarts),
        );
        let _ = std::io::stderr().flush();
        if finished {
            eprintln!();
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
