//! The service as a child process (this example re-run with `--serve`), and the crash monkey
//! that kills it with SIGKILL mid-run and restarts it on the same data and port.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::ProgressBar;

use crate::BoxError;
use crate::chaos::{Chaos, add};

/// Attempts to start the service before giving up (the port of a killed process may still be
/// held for a moment).
const SPAWN_ATTEMPTS_MAX: usize = 20;

/// Owns the service's child process.
pub struct Supervisor {
    data: PathBuf,
    /// Arguments added to the service's command line.
    server_args: Vec<String>,
    /// Where the service listens, the same across restarts.
    addr: SocketAddr,
    /// `None` once stopped.
    child: Mutex<Option<Child>>,
}

impl Supervisor {
    /// Starts the service on `data` and a free loopback port, with `server_args` added to its
    /// command line (on every restart too). Blocking.
    pub fn start_with(data: PathBuf, server_args: Vec<String>) -> Result<Supervisor, BoxError> {
        let (child, addr) =
            spawn_server(&data, SocketAddr::from(([127, 0, 0, 1], 0)), &server_args)?;
        Ok(Supervisor {
            data,
            server_args,
            addr,
            child: Mutex::new(Some(child)),
        })
    }

    /// Where the service listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The service's log (its stderr, across restarts).
    pub fn log(&self) -> PathBuf {
        self.data.join("server.log")
    }

    /// The process id of the service now running; `None` if it is stopped or being restarted
    /// (never waits for a restart).
    pub fn pid(&self) -> Option<u32> {
        Some(self.child.try_lock().ok()?.as_ref()?.id())
    }

    /// Kills the service with SIGKILL — no shutdown, no flush, requests cut mid-flight — and
    /// starts it again on the same data and port. Blocking.
    pub fn crash_and_restart(&self) -> Result<(), BoxError> {
        let mut slot = self.child.lock().map_err(|_| "poisoned")?;
        if let Some(mut old) = slot.take() {
            old.kill()?;
            old.wait()?;
        }
        *slot = Some(spawn_server(&self.data, self.addr, &self.server_args)?.0);
        Ok(())
    }

    /// Stops the service cleanly: closes its stdin and waits for it to exit. Blocking.
    pub fn stop(&self) -> Result<(), BoxError> {
        if let Some(mut child) = self.child.lock().map_err(|_| "poisoned")?.take() {
            drop(child.stdin.take());
            child.wait()?;
        }
        Ok(())
    }
}

/// Starts `--serve --parent-pipe` on `addr` (plus `extra` arguments) and reads the address it
/// announces.
fn spawn_server(
    data: &Path,
    addr: SocketAddr,
    extra: &[String],
) -> Result<(Child, SocketAddr), BoxError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("server.log"))?;
    let mut last_error: BoxError = "the server did not start".into();
    for _ in 0..SPAWN_ATTEMPTS_MAX {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--serve", "--parent-pipe", "--addr", &addr.to_string()])
            .arg("--data")
            .arg(data)
            .args(extra)
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
            return Ok((child, addr));
        }
        // Typically the port is still held by the killed process's sockets: try again.
        let _ = child.kill();
        let _ = child.wait();
        last_error = format!("the server did not announce its address (got {line:?})").into();
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last_error)
}

/// Crashes and restarts a service process `crashes` times at evenly spaced points of the run
/// (by payments done out of `total`), while requests are in flight: the processes of
/// `supervisors` in turn, the others serving on meanwhile.
pub async fn crash_monkey(
    supervisors: Vec<Arc<Supervisor>>,
    chaos: Arc<Chaos>,
    crashes: usize,
    total: usize,
    bar: ProgressBar,
) {
    for n in 1..=crashes {
        let at = total * n / (crashes + 1);
        while chaos.tally().payments_done.load(Ordering::Relaxed) < at {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let Some(supervisor) = supervisors.get((n - 1) % supervisors.len().max(1)) else {
            return;
        };
        let supervisor = Arc::clone(supervisor);
        let restarted = tokio::task::spawn_blocking(move || supervisor.crash_and_restart()).await;
        let error = match restarted {
            Ok(Ok(())) => {
                add(&chaos.tally().restarts);
                continue;
            }
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        bar.suspend(|| eprintln!("payments: restart failed: {error}"));
    }
}
