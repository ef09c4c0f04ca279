//! What a case runs on: an [`Env`] opens handles on one backend's store, fresh for the case.

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use idemstore::{AnyBackend, Limits, ManualClock, Store};

use crate::servers::{Installer, PostgresServer, RedisServer};

/// The backend a case runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memory,
    File,
    Postgres,
    Redis,
}

/// One case's store: handles to it, opened on demand.
pub struct Env {
    pub kind: Kind,
    name: String,
    dir: tempfile::TempDir,
    /// The first handle of a memory or file store: later handles share it.
    first: Option<AnyBackend>,
    url: Option<String>,
    limits: Limits,
    /// A server of the case's own, for cases that crash or disturb it.
    dedicated: Option<Dedicated>,
    /// The heartbeat interval and owner timeout of remote handles, if not the defaults.
    owners: Option<(Duration, Duration)>,
    /// The clock of the memory and file stores, if not the system's.
    clock: Option<ManualClock>,
    /// The owner of the handle opened last.
    last_owner: u64,
}

/// A server started for one case.
enum Dedicated {
    Postgres(PostgresServer),
    Redis(RedisServer),
}

impl Env {
    /// Sets the limits of the handles opened from now on.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the heartbeat interval and owner timeout of the remote handles opened from now on.
    pub fn with_owner_timing(mut self, heartbeat: Duration, owner_timeout: Duration) -> Self {
        self.owners = Some((heartbeat, owner_timeout));
        self
    }

    /// Runs the memory and file stores opened from now on on `clock`. A server's stores always
    /// run on the server's clock.
    // Used by the cases built on the reference model (feature `__testkit`).
    #[cfg_attr(not(feature = "__testkit"), allow(dead_code))]
    pub fn with_manual_clock(mut self, clock: ManualClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The owner of the handle opened last: what it stamps on the records it acquires (the
    /// `epoch` of `RecordState::InFlight`). For memory and file the store's process epoch;
    /// for PostgreSQL and Redis the instance's owner id.
    // Used by the cases built on the reference model (feature `__testkit`).
    #[cfg_attr(not(feature = "__testkit"), allow(dead_code))]
    pub fn last_owner(&self) -> u64 {
        self.last_owner
    }

    /// The case's first handle (the same store on every call for memory and file).
    pub async fn open(&mut self) -> AnyBackend {
        match self.kind {
            Kind::Memory | Kind::File => {
                if let Some(first) = &self.first {
                    return first.clone();
                }
                let mut builder = Store::builder()
                    .sweep_interval(None)
                    .limits(self.limits.clone());
                if let Some(clock) = &self.clock {
                    builder = builder.clock(clock.clone());
                }
                let store = if self.kind == Kind::Memory {
                    builder.open_in_memory()
                } else {
                    builder.open(self.path())
                }
                .expect("the store opens");
                self.last_owner = store.epoch();
                let backend = AnyBackend::new(store);
                self.first = Some(backend.clone());
                backend
            }
            Kind::Postgres => self.postgres(&self.name.clone()).await,
            Kind::Redis => self.redis(&self.name.clone()).await,
        }
    }

    /// A second handle on the same store: for PostgreSQL another instance with its own pool
    /// and owner; for the embedded stores (one process holds the file) the same store.
    pub async fn second(&mut self) -> AnyBackend {
        match self.kind {
            Kind::Memory | Kind::File => self.open().await,
            Kind::Postgres => self.postgres(&format!("{}-second", self.name)).await,
            Kind::Redis => self.redis(&format!("{}-second", self.name)).await,
        }
    }

    /// Drops `handle` (the case's only one) without closing anything gracefully, and opens the
    /// store again as a restarted process would: for a file, a new process epoch; for
    /// PostgreSQL and Redis, a new instance under the same name, which ends the old owner.
    pub async fn restart(&mut self, handle: AnyBackend) -> AnyBackend {
        drop(handle);
        self.first = None;
        self.open().await
    }

    /// Starts a server of the case's own (the shared one serves cases running in parallel);
    /// handles opened from now on use it.
    pub fn start_dedicated_server(&mut self) {
        let mut installer = Installer::new(true);
        let dedicated = match self.kind {
            Kind::Postgres => Dedicated::Postgres(
                PostgresServer::start(&mut installer).expect("a dedicated PostgreSQL server"),
            ),
            Kind::Redis => Dedicated::Redis(
                RedisServer::start(&mut installer, "always").expect("a dedicated Redis server"),
            ),
            other => panic!("no server for {other:?}"),
        };
        self.url = Some(match &dedicated {
            Dedicated::Postgres(s) => s.url(),
            Dedicated::Redis(s) => s.url(),
        });
        self.dedicated = Some(dedicated);
    }

    /// Kills the dedicated server with SIGKILL and starts it again on its data (PostgreSQL
    /// with `synchronous_commit = on`; Redis with AOF and `appendfsync always`).
    pub fn crash_and_restart_server(&mut self) {
        match self.dedicated.as_mut().expect("a dedicated server") {
            Dedicated::Postgres(s) => s.crash_and_restart(),
            Dedicated::Redis(s) => s.crash_and_restart(),
        }
        .expect("the server restarts");
    }

    /// Opens a handle under another instance name (another process of the service).
    pub async fn other_instance(&mut self, name: &str) -> AnyBackend {
        match self.kind {
            Kind::Postgres => self.postgres(&format!("{}-{name}", self.name)).await,
            Kind::Redis => self.redis(&format!("{}-{name}", self.name)).await,
            _ => self.open().await,
        }
    }

    /// The URL of the case's server.
    pub fn url(&self) -> &str {
        self.url.as_deref().expect("a server")
    }

    /// Sends one inline command to the case's Redis server and returns the first line of the
    /// answer (whitebox set-up for Redis-only cases).
    pub fn redis_command(&self, command: &str) -> String {
        use std::io::{BufRead, BufReader, Write};
        let url = self.url.as_deref().expect("a redis case");
        let addr = url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        let mut stream = std::net::TcpStream::connect(addr).expect("connect to Redis");
        stream
            .write_all(format!("{command}\r\n").as_bytes())
            .expect("send");
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).expect("answer");
        line.trim_end().to_owned()
    }

    /// The key prefix of a Redis case.
    pub fn redis_prefix(&self) -> String {
        format!("case_{}", self.name)
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("store.idem")
    }

    #[cfg(feature = "postgres")]
    async fn postgres(&mut self, instance: &str) -> AnyBackend {
        let url = self.url.as_deref().expect("a server for a postgres case");
        let mut builder = idemstore::postgres::PostgresBackend::builder(url)
            .expect("the URL parses")
            .schema(format!("case_{}", self.name))
            .instance_name(instance)
            .limits(self.limits.clone())
            .pool_size(8);
        if let Some((heartbeat, timeout)) = self.owners {
            builder = builder.heartbeat_interval(heartbeat).owner_timeout(timeout);
        }
        let backend = builder.connect().await.expect("the backend connects");
        self.last_owner = backend.owner_id();
        AnyBackend::new(backend)
    }

    #[cfg(not(feature = "postgres"))]
    async fn postgres(&mut self, _instance: &str) -> AnyBackend {
        unreachable!("postgres cases need the `postgres` feature")
    }

    #[cfg(feature = "redis")]
    async fn redis(&mut self, instance: &str) -> AnyBackend {
        let url = self.url.as_deref().expect("a server for a redis case");
        let mut builder = idemstore::redis::RedisBackend::builder(url)
            .expect("the URL parses")
            .prefix(format!("case_{}", self.name))
            .instance_name(instance)
            .limits(self.limits.clone());
        if let Some((heartbeat, timeout)) = self.owners {
            builder = builder.heartbeat_interval(heartbeat).owner_timeout(timeout);
        }
        let backend = builder.connect().await.expect("the backend connects");
        self.last_owner = backend.owner_id();
        AnyBackend::new(backend)
    }

    #[cfg(not(feature = "redis"))]
    async fn redis(&mut self, _instance: &str) -> AnyBackend {
        unreachable!("redis cases need the `redis` feature")
    }
}

/// Whether missing servers fail the run (`CI=true`) instead of skipping their cases.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The PostgreSQL server of this test process, started once for every case.
fn postgres_server() -> Result<&'static PostgresServer, String> {
    static SERVER: OnceLock<Result<PostgresServer, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| PostgresServer::start(&mut Installer::new(true)))
        .as_ref()
        .map_err(Clone::clone)
}

/// The Redis server of this test process (AOF with `appendfsync always`), started once.
fn redis_server() -> Result<&'static RedisServer, String> {
    static SERVER: OnceLock<Result<RedisServer, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| RedisServer::start(&mut Installer::new(true), "always"))
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs `case` on a fresh store of `backend` on its own multi-threaded runtime.
pub fn run<F, Fut>(backend: &str, case: &str, f: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()>,
{
    let kind = match backend {
        "memory" => Kind::Memory,
        "file" => Kind::File,
        "postgres" => Kind::Postgres,
        "redis" => Kind::Redis,
        other => panic!("unknown backend {other}"),
    };
    let url = match kind {
        Kind::Postgres => match postgres_server() {
            Ok(server) => Some(server.url()),
            Err(e) if in_ci() => panic!("PostgreSQL is required under CI=true: {e}"),
            Err(e) => {
                eprintln!("skipped: no PostgreSQL server ({e}); CI=true makes this a failure");
                return;
            }
        },
        Kind::Redis => match redis_server() {
            Ok(server) => Some(server.url()),
            Err(e) if in_ci() => panic!("Redis is required under CI=true: {e}"),
            Err(e) => {
                eprintln!("skipped: no Redis server ({e}); CI=true makes this a failure");
                return;
            }
        },
        _ => None,
    };
    let env = Env {
        kind,
        name: case.to_owned(),
        dir: tempfile::tempdir().expect("a temporary directory"),
        first: None,
        url,
        limits: Limits::default(),
        dedicated: None,
        owners: None,
        clock: None,
        last_owner: 0,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(f(env));
}
