//! A store shared by several service processes: `--backend` (the idempotency store on
//! PostgreSQL or Redis, through [`AnyBackend`]), `--ledger` (the charges, in PostgreSQL), and
//! the servers a chaos run starts for itself when asked with `--backend postgres` or
//! `--backend redis` (the test suite's server harness, `tests/servers/`).
//!
//! The ledger must be shared too: a retry that lands on another process has to find the charge
//! the first process executed before it crashed, and the audit has to count the executions of
//! every process. With a PostgreSQL store it lives in the same database; with a Redis store
//! `--ledger` names a PostgreSQL database for it (a chaos run starts one).

use idemstore::AnyBackend;

use crate::BoxError;
use crate::ledger::Ledger;
use crate::servers::{Installer, PostgresServer, RedisServer};

/// Where the idempotency store lives, from `--backend`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Backend {
    /// The embedded file store in the data directory (no `--backend`).
    File,
    /// A `postgres://…`, `postgresql://…` or `redis://…` URL.
    Url(String),
    /// `postgres` or `redis` (chaos run only): a server started for the run.
    Start(Server),
}

/// A kind of server a chaos run can start.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Server {
    /// PostgreSQL: store and ledger in its `postgres` database.
    Postgres,
    /// Redis (AOF, `appendfsync always`) for the store, and PostgreSQL for the ledger.
    Redis,
}

impl Backend {
    /// Parses a `--backend` value.
    pub fn parse(value: &str) -> Result<Backend, String> {
        match value {
            "postgres" | "postgresql" => Ok(Backend::Start(Server::Postgres)),
            "redis" => Ok(Backend::Start(Server::Redis)),
            url if is_postgres(url) || is_redis(url) => Ok(Backend::Url(url.to_owned())),
            other => Err(format!(
                "--backend {other:?}: expected a postgres://… or redis://… URL (or, for a chaos \
                 run, `postgres` or `redis` to start a server for the run)"
            )),
        }
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn is_redis(url: &str) -> bool {
    url.starts_with("redis://")
}

/// The ledger database of a shared store at `backend`: `ledger` if given (it must be a
/// PostgreSQL URL), else the store's own database when that is PostgreSQL.
pub fn ledger_url(backend: &str, ledger: Option<&str>) -> Result<String, BoxError> {
    match ledger {
        Some(url) if is_postgres(url) => Ok(url.to_owned()),
        Some(url) => Err(format!("--ledger {url:?}: expected a postgres://… URL").into()),
        None if is_postgres(backend) => Ok(backend.to_owned()),
        None => Err("a Redis store needs a shared ledger: --ledger postgres://…".into()),
    }
}

/// Opens the idempotency store at `url` (PostgreSQL or Redis) as an [`AnyBackend`].
///
/// With an `instance` name, the backend registers under it: when a process is killed and
/// restarted under the same name, the requests it left in flight can be taken over at once
/// (by it or by any other process) instead of after their leases run out.
pub async fn open_backend(url: &str, instance: Option<&str>) -> Result<AnyBackend, BoxError> {
    let Some(name) = instance else {
        return Ok(AnyBackend::open(url).await?);
    };
    if is_postgres(url) {
        #[cfg(feature = "postgres")]
        return Ok(AnyBackend::new(
            idemstore::postgres::PostgresBackend::builder(url)?
                .instance_name(name)
                .connect()
                .await?,
        ));
    }
    if is_redis(url) {
        #[cfg(feature = "redis")]
        return Ok(AnyBackend::new(
            idemstore::redis::RedisBackend::builder(url)?
                .instance_name(name)
                .connect()
                .await?,
        ));
    }
    // A scheme this build has no feature for: `open` says which feature it needs.
    let _ = name;
    Ok(AnyBackend::open(url).await?)
}

/// Opens the shared ledger at `url`, recording charges as executed by `process`.
#[cfg(feature = "postgres")]
pub async fn open_ledger(url: &str, process: &str) -> Result<Ledger, BoxError> {
    Ok(Ledger::Postgres(
        crate::ledger::postgres::PgLedger::connect(url, process).await?,
    ))
}

/// Opens the shared ledger at `url`: not in this build.
#[cfg(not(feature = "postgres"))]
pub async fn open_ledger(_url: &str, _process: &str) -> Result<Ledger, BoxError> {
    Err("a shared ledger needs the `postgres` feature (--features http,postgres)".into())
}

/// The shared store of a chaos run: its URLs, and the servers started for it (stopped when
/// this is dropped).
pub struct Shared {
    /// The idempotency store.
    pub backend: String,
    /// The ledger's PostgreSQL database.
    pub ledger: String,
    /// What the summary calls the store.
    pub name: &'static str,
    _postgres: Option<PostgresServer>,
    _redis: Option<RedisServer>,
}

impl Shared {
    /// The shared store of a chaos run on `backend` (`None` for the embedded file store),
    /// starting the servers it asks for. Blocking.
    pub fn prepare(backend: &Backend, ledger: Option<&str>) -> Result<Option<Shared>, BoxError> {
        // The servers are never installed from here: a missing one is an error that names the
        // package (the tests install them under CI).
        let mut installer = Installer::new(false);
        let start_postgres = |installer: &mut Installer| {
            PostgresServer::start(installer).map_err(|e| format!("PostgreSQL: {e}"))
        };
        let name = |url: &str| if is_redis(url) { "Redis" } else { "PostgreSQL" };
        match backend {
            Backend::File => Ok(None),
            Backend::Url(url) => Ok(Some(Shared {
                backend: url.clone(),
                ledger: ledger_url(url, ledger)?,
                name: name(url),
                _postgres: None,
                _redis: None,
            })),
            Backend::Start(Server::Postgres) => {
                check_features(Server::Postgres)?;
                let postgres = start_postgres(&mut installer)?;
                Ok(Some(Shared {
                    backend: postgres.url(),
                    ledger: match ledger {
                        Some(url) => ledger_url(&postgres.url(), Some(url))?,
                        None => postgres.url(),
                    },
                    name: "PostgreSQL",
                    _postgres: Some(postgres),
                    _redis: None,
                }))
            }
            Backend::Start(Server::Redis) => {
                check_features(Server::Redis)?;
                let redis = RedisServer::start(&mut installer, "always")
                    .map_err(|e| format!("Redis: {e}"))?;
                let (ledger, postgres) = match ledger {
                    Some(url) => (ledger_url(&redis.url(), Some(url))?, None),
                    None => {
                        let postgres = start_postgres(&mut installer)?;
                        (postgres.url(), Some(postgres))
                    }
                };
                Ok(Some(Shared {
                    backend: redis.url(),
                    ledger,
                    name: "Redis",
                    _postgres: postgres,
                    _redis: Some(redis),
                }))
            }
        }
    }

    /// The arguments of service process `instance`: the store, the ledger, and the name it
    /// registers under (the same across its restarts).
    pub fn server_args(&self, instance: &str) -> Vec<String> {
        vec![
            "--backend".into(),
            self.backend.clone(),
            "--ledger".into(),
            self.ledger.clone(),
            "--instance".into(),
            instance.into(),
        ]
    }
}

/// Fails unless this build has the features a run on `server` needs.
fn check_features(server: Server) -> Result<(), BoxError> {
    let (postgres, redis) = (cfg!(feature = "postgres"), cfg!(feature = "redis"));
    match server {
        Server::Postgres if !postgres => {
            Err("--backend postgres needs the `postgres` feature (--features http,postgres)".into())
        }
        Server::Redis if !(redis && postgres) => Err(
            "--backend redis needs the `redis` and `postgres` features (the ledger is in \
             PostgreSQL): --features http,postgres,redis"
                .into(),
        ),
        _ => Ok(()),
    }
}
