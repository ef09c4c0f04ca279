//! Real PostgreSQL and Redis servers for tests and benchmarks, shared by the conformance suite
//! (`tests/conformance/`) and the comparison harness (`compare/`, which includes this file by
//! path): the servers from Debian's packages, installed when missing (`apt-get install`, as
//! root only), each started on 127.0.0.1 on a free port with its own temporary directory.
//!
//! A server stops when its guard is dropped. A **watchdog** (a small `sh` loop started beside
//! it) also stops it and removes its directory when the process that started it exits in any
//! way, so no server outlives its tests, even when the guard lives in a `static` (never
//! dropped) or the test process is killed.
//!
//! Only the standard library and `tempfile` are used, so both crates can include the file.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Installs Debian packages on demand: `apt-get update` at most once per process, and one
/// apt-get at a time (servers start from parallel tests; apt holds a global lock).
pub struct Installer {
    allowed: bool,
}

/// Held while apt-get runs; `true` once `apt-get update` succeeded in this process.
static APT: Mutex<bool> = Mutex::new(false);

impl Installer {
    /// An installer that installs only if `allowed` (and the process runs as root).
    pub fn new(allowed: bool) -> Installer {
        Installer { allowed }
    }

    /// `apt-get install -y packages`; the reason as an error if that is not possible.
    pub fn install(&mut self, packages: &[&str]) -> Result<(), String> {
        if !self.allowed {
            return Err(format!(
                "not installed, and installing is off (apt-get install {})",
                packages.join(" ")
            ));
        }
        if euid() != Some(0) {
            return Err(format!(
                "not installed, and installing needs root (apt-get install {})",
                packages.join(" ")
            ));
        }
        let mut updated = APT.lock().unwrap_or_else(PoisonError::into_inner);
        // Another process (or another apt) may hold the dpkg lock: wait for it, bounded.
        let lock_wait = ["-o", "DPkg::Lock::Timeout=300"];
        if !*updated {
            eprintln!("[install] apt-get update");
            run_quiet(Command::new("apt-get").args(lock_wait).arg("update"))
                .map_err(|e| format!("apt-get update failed: {e}"))?;
            *updated = true;
        }
        eprintln!("[install] apt-get install -y {}", packages.join(" "));
        run_quiet(
            Command::new("apt-get")
                .args(lock_wait)
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
pub fn free_port() -> std::io::Result<u16> {
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

/// Sends `signal` to `pid` with kill(1) (no libc bindings needed).
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
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts the watchdog of `server`: once this process or the server is gone, it stops the
/// server (`sig`, then SIGKILL after 10 s) and removes `dir`.
fn watchdog(server: u32, sig: &str, dir: &Path) -> std::io::Result<Child> {
    let script = r#"
        while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep 0.5; done
        if kill -0 "$2" 2>/dev/null; then
            kill -s "$3" "$2" 2>/dev/null
            i=0
            while kill -0 "$2" 2>/dev/null && [ "$i" -lt 20 ]; do sleep 0.5; i=$((i+1)); done
            kill -s KILL "$2" 2>/dev/null
        fi
        rm -rf "$4"
    "#;
    Command::new("sh")
        .args(["-c", script, "idemstore-watchdog"])
        .arg(std::process::id().to_string())
        .arg(server.to_string())
        .arg(sig)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: a Ctrl-C aimed at the tests does not stop it first.
        .process_group(0)
        .spawn()
}

/// How to start a server process again with the same arguments.
type Spawn = Box<dyn Fn() -> Command + Send + Sync>;

/// A started server process with its directory and watchdog; stopped on drop.
struct Process {
    child: Child,
    watchdog: Option<Child>,
    stop_signal: &'static str,
    grace: Duration,
    spawn: Spawn,
    /// Process groups killed by `crash_and_restart`: killed again before each start, since a
    /// child forked just as its group was killed can survive the first signal.
    killed: Vec<u32>,
    dir: TempDir,
}

impl Process {
    fn start(
        spawn: Spawn,
        stop_signal: &'static str,
        grace: Duration,
        dir: TempDir,
    ) -> std::io::Result<Process> {
        let child = spawn().spawn()?;
        let watchdog = watchdog(child.id(), stop_signal, dir.path()).ok();
        Ok(Process {
            child,
            watchdog,
            stop_signal,
            grace,
            spawn,
            killed: Vec::new(),
            dir,
        })
    }

    /// Kills the server with SIGKILL (its whole process group: PostgreSQL's backends too), as
    /// a crash would, and starts it again on the same directory and port.
    fn crash_and_restart(&mut self) -> std::io::Result<()> {
        // The watchdog first: it would remove the directory once the server is gone.
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        self.killed.push(self.child.id());
        signal_group(self.child.id(), "-KILL");
        let _ = self.child.wait();
        for _ in 0..3 {
            thread::sleep(Duration::from_millis(50));
            for &group in &self.killed {
                signal_group(group, "-KILL");
            }
        }
        self.child = (self.spawn)().spawn()?;
        self.watchdog = watchdog(self.child.id(), self.stop_signal, self.dir.path()).ok();
        Ok(())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self, name: &str) -> String {
        let log = fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    }
}

/// Sends `signal` to the process group led by `pid`.
fn signal_group(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

impl Drop for Process {
    fn drop(&mut self) {
        stop_child(&mut self.child, self.stop_signal, self.grace);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Opens `path` for appending (a server's log, kept across restarts).
fn log_file(path: &Path) -> std::io::Result<File> {
    fs::OpenOptions::new().create(true).append(true).open(path)
}

// ----- Redis -----

/// A `redis-server` child process with its own directory; stopped on drop.
pub struct RedisServer {
    process: Process,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// `redis-server --version`.
    pub version: String,
}

impl RedisServer {
    /// Finds (or installs) `redis-server` and starts it with AOF on and `appendfsync` set to
    /// `fsync` (`always` or `everysec`), no RDB snapshots, `maxmemory-policy noeviction`.
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

    fn spawn(bin: &Path, fsync: &str) -> Result<RedisServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("idemstore-redis-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let port = free_port().map_err(|e| e.to_string())?;
        let (program, fsync, path) = (
            bin.to_path_buf(),
            fsync.to_owned(),
            dir.path().to_path_buf(),
        );
        let spawn: Spawn = Box::new(move || {
            let mut cmd = Command::new(&program);
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(&path)
                .args(["--appendonly", "yes", "--appendfsync", &fsync])
                .args(["--save", "", "--daemonize", "no", "--protected-mode", "yes"])
                .args(["--maxmemory-policy", "noeviction"])
                .stdin(Stdio::null())
                .process_group(0);
            if let Ok(log) = log_file(&path.join("redis.log"))
                && let Ok(log2) = log.try_clone()
            {
                cmd.stdout(Stdio::from(log)).stderr(Stdio::from(log2));
            }
            cmd
        });
        let process = Process::start(spawn, "-TERM", Duration::from_secs(5), dir)
            .map_err(|e| e.to_string())?;
        let mut server = RedisServer {
            process,
            port,
            version: version_of(bin),
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// Kills the server with SIGKILL and starts it again on the same directory and port: it
    /// recovers what its append-only file holds.
    pub fn crash_and_restart(&mut self) -> Result<(), String> {
        self.process
            .crash_and_restart()
            .map_err(|e| format!("restarting redis-server failed: {e}"))?;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let port = self.port;

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match redis_ping(port) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("no answer on port {port}: {e}"));
                }
                Err(_) => {
                    if let Some(status) = self.process.exited() {
                        return Err(format!(
                            "redis-server exited: {status} ({})",
                            self.process.log_tail("redis.log")
                        ));
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }
}

/// Sends `PING` over a fresh connection and expects `+PONG`.
fn redis_ping(port: u16) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 16];
    let n = stream.read(&mut buf)?;
    if buf.get(..n).is_some_and(|b| b.starts_with(b"+PONG")) {
        Ok(())
    } else {
        Err(std::io::Error::other("no PONG"))
    }
}

// ----- PostgreSQL -----

/// A `postgres` child process (running as a non-root user) with its own data directory;
/// stopped with a fast shutdown on drop.
pub struct PostgresServer {
    process: Process,
    bin: PathBuf,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// `postgres --version`.
    pub version: String,
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
    /// The superuser the cluster is created with (trust authentication on loopback).
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

    fn spawn(bin: &Path, ids: Option<(u32, u32)>) -> Result<PostgresServer, String> {
        let err = |e: std::io::Error| e.to_string();
        let dir = tempfile::Builder::new()
            .prefix("idemstore-pg-")
            .tempdir()
            .map_err(err)?;
        let data = dir.path().join("data");
        fs::create_dir(&data).map_err(err)?;
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(err)?;
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).map_err(err)?;
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
            "--no-sync",
        ]);
        as_user(&mut initdb);
        run_quiet(&mut initdb).map_err(|e| format!("initdb failed: {e}"))?;

        let port = free_port().map_err(err)?;
        let (bin_dir, path) = (bin.to_path_buf(), dir.path().to_path_buf());
        let spawn: Spawn = Box::new(move || {
            let mut postgres = Command::new(bin_dir.join("postgres"));
            postgres
                .arg("-D")
                .arg(path.join("data"))
                .args(["-p", &port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", path.display()))
                .args(["-c", "synchronous_commit=on", "-c", "fsync=on"])
                .args(["-c", "max_connections=200"])
                .current_dir(&path)
                .stdin(Stdio::null())
                .process_group(0);
            if let Some((uid, gid)) = ids {
                postgres.uid(uid).gid(gid);
            }
            if let Ok(log) = log_file(&path.join("postgres.log"))
                && let Ok(log2) = log.try_clone()
            {
                postgres.stdout(Stdio::from(log)).stderr(Stdio::from(log2));
            }
            postgres
        });
        // SIGINT: PostgreSQL's fast shutdown (abort sessions, checkpoint, exit).
        let process = Process::start(spawn, "-INT", Duration::from_secs(20), dir).map_err(err)?;
        let mut server = PostgresServer {
            process,
            bin: bin.to_path_buf(),
            port,
            version: version_of(&bin.join("postgres")),
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// Kills the server and its backends with SIGKILL and starts it again on the same data
    /// directory and port: it recovers from its write-ahead log.
    pub fn crash_and_restart(&mut self) -> Result<(), String> {
        let mut tries = 0;
        loop {
            self.process
                .crash_and_restart()
                .map_err(|e| format!("restarting postgres failed: {e}"))?;
            match self.wait_ready() {
                // A backend that outlived the crash still holds the old shared memory for a
                // moment: the new postmaster exits at once; kill and start again.
                Err(e) if tries < 5 && e.contains("shared memory") => tries += 1,
                other => return other,
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let port = self.port;

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.ready() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("no answer on port {port}: {e}"));
                }
                Err(_) => {
                    if let Some(status) = self.process.exited() {
                        return Err(format!(
                            "postgres exited: {status} ({})",
                            self.process.log_tail("postgres.log")
                        ));
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Whether the server accepts connections (`pg_isready`).
    fn ready(&self) -> Result<(), String> {
        run_quiet(
            Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", Self::USER, "-d", "postgres", "-t", "1"]),
        )
    }

    /// A key=value connection string for the `postgres` database.
    pub fn conn_str(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname=postgres",
            self.port,
            Self::USER
        )
    }

    /// A `postgres://` URL for the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://{}@127.0.0.1:{}/postgres", Self::USER, self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }
}
