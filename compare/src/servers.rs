//! The server peers: Redis and PostgreSQL from Debian's packages, installed if missing, each
//! started by the harness on 127.0.0.1 on a free port with its own temporary directory, and
//! stopped when its guard is dropped (also on error and on panic unwinding).

use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::BoxError;

/// Installs Debian packages on demand: `apt-get update` at most once per run.
pub struct Installer {
    allowed: bool,
    updated: bool,
}

impl Installer {
    pub fn new(allowed: bool) -> Installer {
        Installer {
            allowed,
            updated: false,
        }
    }

    /// `apt-get install -y packages`; the reason as an error if that is not possible.
    pub fn install(&mut self, packages: &[&str]) -> Result<(), String> {
        if !self.allowed {
            return Err(format!(
                "not installed, and --no-install was given (apt-get install {})",
                packages.join(" ")
            ));
        }
        if euid() != Some(0) {
            return Err(format!(
                "not installed, and installing needs root (apt-get install {})",
                packages.join(" ")
            ));
        }
        if !self.updated {
            eprintln!("[install] apt-get update");
            run_quiet(Command::new("apt-get").arg("update"))
                .map_err(|e| format!("apt-get update failed: {e}"))?;
            self.updated = true;
        }
        eprintln!("[install] apt-get install -y {}", packages.join(" "));
        run_quiet(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .map_err(|e| format!("apt-get install {} failed: {e}", packages.join(" ")))
    }
}

/// Runs `cmd` with its output captured; the tail of stderr as the error if it fails.
fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().rev().take(3).collect();
    Err(format!(
        "{} ({})",
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// The effective user id, from `/proc/self/status`.
pub fn euid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The first executable named `name` on `PATH` or in the usual system directories.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The first line of `program --version`.
pub fn version_of(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown version".into())
}

/// Sends `signal` to `pid` with kill(1) (the harness uses no libc bindings).
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Stops `child`: `sig` first, then SIGKILL after `grace`.
fn stop_child(child: &mut Child, sig: &str, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child.id(), sig);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

// ----- Redis -----

/// A `redis-server` child process with its own directory; killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub version: String,
    _dir: TempDir,
}

impl RedisServer {
    /// Finds (or installs) `redis-server` and starts it with AOF on and `appendfsync` set to
    /// `fsync` (`always` or `everysec`), no RDB snapshots.
    pub fn start(installer: &mut Installer, fsync: &str) -> Result<RedisServer, String> {
        let bin = match which("redis-server") {
            Some(bin) => bin,
            None => {
                installer.install(&["redis-server"])?;
                which("redis-server").ok_or("redis-server still missing after install")?
            }
        };
        Self::spawn(&bin, fsync).map_err(|e| format!("starting redis-server failed: {e}"))
    }

    fn spawn(bin: &Path, fsync: &str) -> Result<RedisServer, BoxError> {
        let dir = tempfile::Builder::new()
            .prefix("compare-redis-")
            .tempdir()?;
        let port = free_port()?;
        let log = File::create(dir.path().join("redis.log"))?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--appendonly", "yes", "--appendfsync", fsync])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        let mut server = RedisServer {
            child,
            port,
            version: version_of(bin),
            _dir: dir,
        };
        let client = redis::Client::open(server.url())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ping = client
                .get_connection()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            match ping {
                Ok(_) => return Ok(server),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("no answer on port {port}: {e}").into());
                }
                Err(_) => {
                    if let Ok(Some(status)) = server.child.try_wait() {
                        return Err(format!("redis-server exited: {status}").into());
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Peak resident memory of the server process.
    pub fn peak_rss(&self) -> Option<u64> {
        crate::rss::peak_of(self.child.id())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Throw-away data: no need for a graceful shutdown's final AOF rewrite.
        stop_child(&mut self.child, "-TERM", Duration::from_secs(5));
    }
}

// ----- PostgreSQL -----

/// A `postgres` child process (running as a non-root user) with its own data directory;
/// stopped with a fast shutdown on drop.
pub struct PostgresServer {
    child: Child,
    pub port: u16,
    pub version: String,
    _dir: TempDir,
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb` and `postgres`.
fn postgres_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// The uid and gid of `user`, if it exists.
fn ids_of(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// The user PostgreSQL runs as: itself when not root; as root, `postgres` (created by
/// Debian's package), else a system user `idemstore-bench` created for the purpose.
fn postgres_user() -> Result<Option<(u32, u32)>, String> {
    if euid() != Some(0) {
        return Ok(None);
    }
    if let Some(ids) = ids_of("postgres") {
        return Ok(Some(ids));
    }
    let user = "idemstore-bench";
    if ids_of(user).is_none() {
        run_quiet(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            user,
        ]))
        .map_err(|e| format!("useradd {user} failed: {e}"))?;
    }
    ids_of(user)
        .map(Some)
        .ok_or_else(|| format!("user {user} missing after useradd"))
}

impl PostgresServer {
    pub const USER: &'static str = "bench";

    /// Finds (or installs) PostgreSQL, `initdb`s a temporary cluster and starts it with
    /// `synchronous_commit = on` and `fsync = on` (the defaults, set explicitly).
    pub fn start(installer: &mut Installer) -> Result<PostgresServer, String> {
        let bin = match postgres_bin_dir() {
            Some(bin) => bin,
            None => {
                installer.install(&["postgresql"])?;
                postgres_bin_dir().ok_or("postgresql binaries still missing after install")?
            }
        };
        let ids = postgres_user()?;
        Self::spawn(&bin, ids).map_err(|e| format!("starting postgres failed: {e}"))
    }

    fn spawn(bin: &Path, ids: Option<(u32, u32)>) -> Result<PostgresServer, BoxError> {
        let dir = tempfile::Builder::new().prefix("compare-pg-").tempdir()?;
        let data = dir.path().join("data");
        fs::create_dir(&data)?;
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&data, Some(uid), Some(gid))?;
        }
        let as_user = |cmd: &mut Command| {
            cmd.current_dir(dir.path()).stdin(Stdio::null());
            if let Some((uid, gid)) = ids {
                cmd.uid(uid).gid(gid);
            }
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            Self::USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        as_user(&mut initdb);
        run_quiet(&mut initdb).map_err(|e| format!("initdb failed: {e}"))?;

        let port = free_port()?;
        let log = File::create(dir.path().join("postgres.log"))?;
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "synchronous_commit=on", "-c", "fsync=on"])
            .args(["-c", "max_connections=200"])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        as_user(&mut postgres);
        let child = postgres.spawn()?;
        let mut server = PostgresServer {
            child,
            port,
            version: version_of(&bin.join("postgres")),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match postgres::Client::connect(&server.conn_str(), postgres::NoTls) {
                Ok(_) => return Ok(server),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("no answer on port {port}: {e}").into());
                }
                Err(_) => {
                    if let Ok(Some(status)) = server.child.try_wait() {
                        return Err(format!("postgres exited: {status}").into());
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    pub fn conn_str(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname=postgres",
            self.port,
            Self::USER
        )
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown (abort sessions, checkpoint, exit).
        stop_child(&mut self.child, "-INT", Duration::from_secs(20));
    }
}
