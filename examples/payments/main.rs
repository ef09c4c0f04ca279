//! A Stripe-compatible mini payment API on idemstore, and a chaos client that proves its
//! charges run exactly once.
//!
//! ```sh
//! cargo run --release --example payments --features http
//! cargo run --release --example payments --features http -- --serve --addr 127.0.0.1:4242 --data ./payments-data
//! cargo run --release --example payments --features http -- --soak --minutes 10 --connections 256 --crashes 2
//! cargo run --release --example payments --features http,postgres -- --processes 2 --backend postgres
//! ```
//!
//! With no arguments it starts the service as a child process on a temporary data directory and
//! drives it with a chaos client: thousands of requests from four tenants, responses dropped
//! mid-flight and retried, concurrent duplicate storms, keys reused with other parameters,
//! invalid parameters, and the service killed with SIGKILL and restarted on the same data
//! mid-run. Then it audits the ledger and prints a summary; "duplicates executed" must be 0.
//!
//! `--soak` runs the same service and client for a wall time instead of a payment count: the
//! chaos client's payments over `--connections` keep-alive connections for `--minutes`, the
//! service killed and restarted `--crashes` times spread over the run, then the same audit, and
//! per-minute tables of requests/s, latency p50/p99, and the service's resident memory and open
//! file descriptors (read from `/proc`), to show that they stay flat.
//!
//! `--serve` keeps serving for real clients: point an official Stripe SDK at it with its API
//! base URL (`http://127.0.0.1:4242`) and any `sk_test_...` key.
//!
//! `--backend URL` puts the idempotency store on PostgreSQL (`postgres://…`, feature
//! `postgres`) or Redis (`redis://…`, feature `redis`) instead of the embedded file store, and
//! the ledger in PostgreSQL (`--ledger`, by default the store's database), so that several
//! service processes share both. The chaos run then drives `--processes N` of them at once: each
//! attempt of a payment goes to a process picked at random, and the processes are killed in
//! turn. `--backend postgres` (or `redis`) starts a server for the run.
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
//!
//! The modules: [`api`] (the HTTP API behind the idempotency layer), [`params`] and [`errors`]
//! (its request parameters and Stripe-shaped errors), [`ledger`] (the charges executed, and
//! their audit), [`workload`] and [`chaos`] (the payments and the client that sends them),
//! [`supervisor`] (the service as a child process, and the crashes), [`report`] (the summary),
//! [`shared`] (a store and ledger shared by several processes, and the servers a run starts),
//! [`prometheus`] (`GET /metrics` in `--serve` mode),
//! [`rng`] (ids and jitter), [`soak`] (the soak), [`latency`] and [`probe`] (its latency
//! histogram and its look at the service's process).

mod api;
mod chaos;
mod errors;
mod latency;
mod ledger;
mod params;
mod probe;
mod prometheus;
mod report;
mod rng;
// The test suite's harness: PostgreSQL and Redis servers on free ports, stopped with the run.
#[path = "../../tests/servers/mod.rs"]
mod servers;
mod shared;
mod soak;
mod supervisor;
mod workload;

use std::error::Error;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use idemstore::{AnyBackend, IdempotencyBackend, Store};

use crate::chaos::Chaos;
use crate::ledger::{FileLedger, Ledger};
use crate::rng::Rng;
use crate::shared::{Backend, Shared};
use crate::supervisor::Supervisor;

/// The error type of everything the example does outside a request handler.
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
    } else if args.soak {
        soak::soak_main(&args)
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
  payments --soak [--minutes 10] [--connections 256] [--crashes 2] [--seed N] [--data DIR]
                                             load for a wall time; memory, fds, latency
  payments --serve [--addr 127.0.0.1:4242] [--data DIR]   serve real clients
                                             (default data directory: ./payments-data)
  --cache-mib N                              with --serve or --soak: cap each database's page
                                             cache (the store's, the ledger's) at N MiB
                                             (default: redb's, 1 GiB)

a store shared by several processes (chaos run and --serve; features postgres, redis):
  --backend URL                              the idempotency store on postgres://... or
                                             redis://... instead of the file in --data
  --backend postgres | redis                 chaos run: start a server for the run (Redis:
                                             and a PostgreSQL for the ledger)
  --ledger URL                               the charges in this PostgreSQL database
                                             (default: the store's, if PostgreSQL)
  --processes N                              chaos run: N service processes on the shared
                                             store; each attempt goes to one at random, and
                                             the crashes kill them in turn (default 1)
  --instance NAME                            --serve: the name this process registers under
                                             in the shared store (a restart under the same
                                             name takes over its requests at once)";

/// The command line.
struct Args {
    serve: bool,
    soak: bool,
    addr: SocketAddr,
    data: Option<PathBuf>,
    payments: usize,
    concurrency: usize,
    crashes: usize,
    seed: u64,
    /// `--soak`: how long to load the service, in minutes.
    minutes: f64,
    /// `--soak`: connections (and requests in flight) at most.
    connections: usize,
    /// The service's page cache per database, in MiB (`None`: redb's default).
    cache_mib: Option<usize>,
    /// Where the idempotency store lives.
    backend: Backend,
    /// The shared ledger's PostgreSQL URL, if given.
    ledger: Option<String>,
    /// The chaos run's service processes.
    processes: usize,
    /// `--serve`: the name this process registers under in a shared store.
    instance: Option<String>,
    /// Set by the chaos run on its child: shut down when stdin closes (the parent is done or
    /// gone).
    parent_pipe: bool,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut parsed = Args {
            serve: false,
            soak: false,
            addr: SocketAddr::from(([127, 0, 0, 1], 4242)),
            data: None,
            payments: 2000,
            concurrency: 48,
            crashes: 2,
            seed: 42,
            minutes: 10.0,
            connections: 256,
            cache_mib: None,
            backend: Backend::File,
            ledger: None,
            processes: 1,
            instance: None,
            parent_pipe: false,
        };
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            match arg.as_str() {
                "--serve" => parsed.serve = true,
                "--soak" => parsed.soak = true,
                "--minutes" => {
                    let minutes: f64 = value("--minutes")?
                        .parse()
                        .map_err(|e| format!("--minutes: {e}"))?;
                    if !(minutes > 0.0 && minutes <= soak::MINUTES_MAX) {
                        return Err(format!(
                            "--minutes must be more than 0 and at most {}",
                            soak::MINUTES_MAX
                        ));
                    }
                    parsed.minutes = minutes;
                }
                "--cache-mib" => {
                    parsed.cache_mib = Some(number(&value("--cache-mib")?)?.clamp(1, 1 << 20));
                }
                "--connections" => {
                    parsed.connections = number(&value("--connections")?)?.clamp(1, 65_536);
                }
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
                "--backend" => parsed.backend = Backend::parse(&value("--backend")?)?,
                "--ledger" => parsed.ledger = Some(value("--ledger")?),
                "--processes" => {
                    parsed.processes = number(&value("--processes")?)?.clamp(1, PROCESSES_MAX);
                }
                "--instance" => parsed.instance = Some(value("--instance")?),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if parsed.serve && matches!(parsed.backend, Backend::Start(_)) {
            return Err("--serve --backend takes a URL (postgres://… or redis://…)".into());
        }
        if parsed.soak && (parsed.backend != Backend::File || parsed.processes > 1) {
            return Err(
                "--soak runs on the embedded file store (no --backend, --processes)".into(),
            );
        }
        if parsed.processes > 1 && parsed.backend == Backend::File {
            return Err(
                "--processes needs a store the processes can share: --backend postgres|redis|URL"
                    .into(),
            );
        }
        Ok(parsed)
    }
}

/// The most service processes a chaos run starts.
const PROCESSES_MAX: usize = 16;

fn number(s: &str) -> Result<usize, String> {
    s.parse().map_err(|e| format!("{s}: {e}"))
}

/// `--serve`: the API on `--addr` until Ctrl-C (or, under `--parent-pipe`, until stdin closes).
/// Creates the data directory `dir` if it is missing, with an error that names it.
fn data_dir(dir: &Path) -> Result<(), BoxError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        let why = if dir.is_file() {
            "it is a file; --data names a directory (the store and the ledger go in it)".to_owned()
        } else {
            e.to_string()
        };
        format!("cannot use {} as the data directory: {why}", dir.display()).into()
    })
}

fn serve_main(args: &Args) -> Result<ExitCode, BoxError> {
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from("payments-data"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Before the store opens, so that the engine's reports from its open on are kept.
        let recorder = prometheus::install()?;
        let cache_bytes = args.cache_mib.map(|mib| mib << 20);
        let (backend, ledger, stored) = match &args.backend {
            Backend::Url(url) => {
                let instance = args
                    .instance
                    .clone()
                    .unwrap_or_else(|| format!("payments-{}", std::process::id()));
                let backend = shared::open_backend(url, Some(&instance)).await?;
                let ledger_url = shared::ledger_url(url, args.ledger.as_deref())?;
                let ledger = shared::open_ledger(&ledger_url, &instance).await?;
                let name = backend.capabilities().name;
                (
                    backend,
                    ledger,
                    format!("store on {name}, ledger on PostgreSQL, instance {instance}"),
                )
            }
            _ => {
                data_dir(&data)?;
                let store = match cache_bytes {
                    Some(bytes) => Store::builder()
                        .cache_size(bytes)
                        .open(data.join("idempotency.redb"))?,
                    None => Store::open(data.join("idempotency.redb"))?,
                };
                let ledger = FileLedger::open_with_cache(&data.join("ledger.redb"), cache_bytes)?;
                (
                    AnyBackend::new(store),
                    Ledger::File(ledger),
                    format!("data in {}", data.display()),
                )
            }
        };
        let orphans = backend.orphans(10_000).await?.len();
        let listener = tokio::net::TcpListener::bind(args.addr).await?;
        // The supervisor reads this line for the address (the port may have been 0).
        println!(
            "payments: listening on http://{} ({stored}; {orphans} requests in flight when the \
             last process died, reconciled on retry)",
            listener.local_addr()?,
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
        let (app, layer_metrics) = api::app(backend, Arc::new(ledger));
        // GET /metrics (no API key needed): Prometheus text.
        let app = prometheus::route(recorder, layer_metrics).merge(app);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok::<_, BoxError>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// No `--serve`: the service as child processes, the chaos client against them, the audit.
fn chaos_main(args: &Args) -> Result<ExitCode, BoxError> {
    let temp = tempfile::tempdir()?;
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    data_dir(&data)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Started before the services, stopped (dropped) after the audit.
    let shared = Shared::prepare(&args.backend, args.ledger.as_deref())?;
    if let Some(shared) = &shared {
        // The audit counts every charge in the ledger: a run needs an empty one.
        let ledger = runtime.block_on(shared::open_ledger(&shared.ledger, "auditor"))?;
        let charges = ledger.audit()?.charges;
        if charges > 0 {
            return Err(format!(
                "the ledger database already holds {charges} charges: a chaos run needs an \
                 empty database (or `--backend postgres` to start one)"
            )
            .into());
        }
    }
    let started = Instant::now();
    let mut supervisors = Vec::with_capacity(args.processes);
    for i in 1..=args.processes {
        let (dir, server_args) = match &shared {
            // Each process logs to its own directory; the store and ledger are the shared ones.
            Some(shared) => {
                let instance = format!("payments-{i}");
                (data.join(&instance), shared.server_args(&instance))
            }
            None => (data.clone(), Vec::new()),
        };
        data_dir(&dir)?;
        let supervisor = Supervisor::start_with(dir.clone(), server_args)?;
        eprintln!(
            "payments: service on http://{} (child process, {})",
            supervisor.addr(),
            match &shared {
                Some(shared) => format!("{} store, log in {}", shared.name, dir.display()),
                None => format!("data in {}", dir.display()),
            }
        );
        supervisors.push(Arc::new(supervisor));
    }

    let rng = Rng::new(args.seed);
    let payments = workload::workload(args.payments, &rng);
    let chaos = Arc::new(Chaos::new(
        supervisors.iter().map(|s| s.addr()).collect(),
        args.concurrency,
        Rng::new(args.seed ^ 0x5EED),
    ));
    let outcomes = runtime.block_on(chaos::drive(
        Arc::clone(&chaos),
        &payments,
        args.concurrency,
        supervisors.clone(),
        args.crashes,
    ));
    let elapsed = started.elapsed();

    // Stop the services cleanly (close their stdin), then audit what they left.
    for supervisor in &supervisors {
        supervisor.stop()?;
    }
    let (audit, orphans) = match &shared {
        None => {
            let audit = FileLedger::open(&data.join("ledger.redb"))?.audit()?;
            let store = Store::open(data.join("idempotency.redb"))?;
            (audit, store.orphans(100_000)?.len())
        }
        Some(shared) => {
            let ledger = runtime.block_on(shared::open_ledger(&shared.ledger, "auditor"))?;
            let audit = ledger.audit()?;
            let orphans = runtime.block_on(async {
                let backend = AnyBackend::open(&shared.backend).await?;
                Ok::<_, BoxError>(backend.orphans(100_000).await?.len())
            })?;
            (audit, orphans)
        }
    };

    let store = match &shared {
        Some(shared) => format!(
            "{} service process{} sharing one {} store and one ledger in PostgreSQL",
            supervisors.len(),
            if supervisors.len() == 1 { "" } else { "es" },
            shared.name
        ),
        None => "one service process on the embedded file store".to_owned(),
    };
    let healthy = report::print(&report::Report {
        payments: &payments,
        outcomes: &outcomes,
        audit: &audit,
        tally: chaos.tally(),
        orphans,
        elapsed,
        store: &store,
        processes: supervisors.len(),
    });
    if !healthy {
        for supervisor in &supervisors {
            eprintln!("server log: {}", supervisor.log().display());
        }
        // Keep the data for inspection.
        let _ = temp.keep();
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
