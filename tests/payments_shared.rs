//! The payments demo's chaos run (`examples/payments/`) against two service processes that
//! share one store: the client sends each attempt of a payment to either process at random,
//! drops responses mid-flight, storms duplicates, reuses keys, and the processes are killed
//! with SIGKILL in turn and restarted. The ledger (in PostgreSQL, shared by both processes)
//! must then hold exactly one charge per payment: 0 duplicates executed.
//!
//! The test starts a PostgreSQL server (and a Redis server for the Redis case) with the suite's
//! harness (`tests/servers/`), gives each case a database of its own, builds the example (a
//! no-op when `cargo test` has built it already) and runs a short chaos run. Without the servers
//! it fails under `CI=true` and is skipped, saying why, elsewhere.

mod payments_demo;
mod servers;

use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use payments_demo::{in_ci, payments_example};
use servers::{Installer, PostgresServer};

/// The PostgreSQL server of this test process, started once for every case.
fn postgres_server() -> Result<&'static PostgresServer, String> {
    static SERVER: OnceLock<Result<PostgresServer, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| PostgresServer::start(&mut Installer::new(true)))
        .as_ref()
        .map_err(Clone::clone)
}

/// Fails under CI, otherwise says why the case does not run.
fn unavailable(why: &str) {
    assert!(
        !in_ci(),
        "the shared-store chaos run cannot run in CI: {why}"
    );
    eprintln!("payments_shared: skipped: {why} (CI=true makes this a failure)");
}

/// A new, empty database `name` on `server` (each run needs an empty ledger); its URL.
fn database(server: &PostgresServer, name: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
            .await
            .expect("the server accepts a connection");
        let connection = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("the database is created");
        drop(client);
        let _ = connection.await;
    });
    format!(
        "postgres://{}@127.0.0.1:{}/{name}",
        PostgresServer::USER,
        server.port
    )
}

/// What a chaos run printed: its summary's rows by name, and the whole output for messages.
struct Summary {
    rows: HashMap<String, u64>,
    output: String,
}

impl Summary {
    /// The value of the summary's row `name`; fails the test if the row is missing.
    fn row(&self, name: &str) -> u64 {
        *self
            .rows
            .get(name)
            .unwrap_or_else(|| panic!("no row {name:?} in the summary:\n{}", self.output))
    }
}

/// How long a chaos run may take before the test kills it and fails (a run of `RUN` takes
/// seconds; a request that never gets an answer would otherwise hang the suite).
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// Runs the chaos run with `args`; fails the test if it fails (it exits with an error when the
/// audit finds a duplicate, a disagreement or a payment given up) or outlives `RUN_DEADLINE`.
fn chaos(args: &[&str]) -> Summary {
    let began = Instant::now();
    let mut child = Command::new(payments_example())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the payments example starts");
    let stdout = drain(child.stdout.take().expect("a piped stdout"));
    let stderr = drain(child.stderr.take().expect("a piped stderr"));
    let status = loop {
        if let Some(status) = child.try_wait().expect("the run's status") {
            break Some(status);
        }
        if began.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.join().unwrap_or_default();
    let text = format!("{stdout}\n{}", stderr.join().unwrap_or_default());
    eprintln!(
        "payments_shared: {args:?} in {:.1} s\n{text}",
        began.elapsed().as_secs_f64()
    );
    let Some(status) = status else {
        panic!("the chaos run did not finish in {RUN_DEADLINE:?}:\n{text}");
    };
    assert!(status.success(), "the chaos run failed:\n{text}");
    // "  duplicates executed                            0": the name, then the value.
    let rows = stdout
        .lines()
        .filter_map(|line| {
            let (name, value) = line.trim().rsplit_once(' ')?;
            Some((name.trim().to_owned(), value.parse().ok()?))
        })
        .collect();
    Summary { rows, output: text }
}

/// Reads `pipe` to its end on a thread of its own; the text read.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// The checks every shared run must pass.
fn check(summary: &Summary, crashes: u64) {
    assert_eq!(summary.row("duplicates executed"), 0, "{}", summary.output);
    assert_eq!(
        summary.row("charges executed (ledger)"),
        summary.row("charges expected"),
        "{}",
        summary.output
    );
    assert_eq!(summary.row("client/ledger disagreements"), 0);
    assert_eq!(summary.row("payments given up"), 0);
    // The chaos really happened, across both processes.
    assert_eq!(summary.row("service crashes (SIGKILL) + restarts"), crashes);
    assert!(summary.row("responses dropped by the client") > 0);
    assert!(summary.row("retries sent to another process") > 0);
    for process in ["payments-1", "payments-2"] {
        assert!(
            summary.row(&format!("executed by {process}")) > 0,
            "{process} executed no charge:\n{}",
            summary.output
        );
    }
}

/// The short run: 300 payments (about 2,000 requests) over 32 connections, each process
/// killed once.
const RUN: [&str; 8] = [
    "--payments",
    "300",
    "--concurrency",
    "32",
    "--crashes",
    "2",
    "--seed",
    "7",
];

#[test]
fn two_processes_sharing_one_postgres_store_execute_every_charge_once() {
    let server = match postgres_server() {
        Ok(server) => server,
        Err(why) => return unavailable(&format!("no PostgreSQL server ({why})")),
    };
    let url = database(server, "chaos_postgres");
    let mut args = vec!["--processes", "2", "--backend", &url];
    args.extend(RUN);
    check(&chaos(&args), 2);
}

#[cfg(feature = "redis")]
#[test]
fn two_processes_sharing_one_redis_store_execute_every_charge_once() {
    use servers::RedisServer;

    static REDIS: OnceLock<Result<RedisServer, String>> = OnceLock::new();
    let (postgres, redis) = match (
        postgres_server(),
        REDIS
            .get_or_init(|| RedisServer::start(&mut Installer::new(true), "always"))
            .as_ref(),
    ) {
        (Ok(postgres), Ok(redis)) => (postgres, redis),
        (Err(why), _) => return unavailable(&format!("no PostgreSQL server ({why})")),
        (_, Err(why)) => return unavailable(&format!("no Redis server ({why})")),
    };
    let ledger = database(postgres, "chaos_redis_ledger");
    let backend = redis.url();
    let mut args = vec![
        "--processes",
        "2",
        "--backend",
        &backend,
        "--ledger",
        &ledger,
    ];
    args.extend(RUN);
    check(&chaos(&args), 2);
}
