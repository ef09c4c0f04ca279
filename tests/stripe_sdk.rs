//! The payments demo (`examples/payments --serve`) against the official Stripe SDK for Python
//! as a real client: a charge and its retry under one key are one charge, replayed; the key
//! reused with other parameters makes the SDK raise its own `IdempotencyError` with Stripe's
//! message; duplicates of a running charge get Stripe's 409, which the SDK retries.
//!
//! The test builds the example (a no-op when `cargo test` has built it already), starts it on
//! an ephemeral port of 127.0.0.1, makes a Python virtual environment in a temporary directory
//! and installs the `stripe` package from PyPI into it, then runs `tests/stripe_sdk.py`.
//! Without Python 3 (with `venv`) or without PyPI, it fails under `CI=true` and is skipped,
//! saying why, elsewhere.
//!
//! With the `metrics` feature, a second test scrapes the demo's `GET /metrics` as a Prometheus
//! server would (no Python needed).

mod payments_demo;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Instant;

use serde_json::Value;

use payments_demo::{in_ci, payments_example, run};

/// Fails under CI, otherwise says why the test does not run.
fn unavailable(why: &str) {
    assert!(!in_ci(), "the Stripe SDK test cannot run in CI: {why}");
    eprintln!("stripe_sdk: skipped: {why} (CI=true makes this a failure)");
}

/// `payments --serve` on 127.0.0.1, stopped (its stdin closed, then killed if need be) on drop.
struct Demo {
    child: Child,
    stdin: Option<ChildStdin>,
    base: String,
}

impl Demo {
    fn start(example: &Path, data: &Path) -> Demo {
        let mut child = Command::new(example)
            .args([
                "--serve",
                "--parent-pipe",
                "--addr",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(data)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the payments example starts");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("a piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server's first line");
        // "payments: listening on http://127.0.0.1:PORT (data in ...)"
        let base = line
            .split_whitespace()
            .find(|word| word.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in the server's first line: {line:?}"))
            .to_owned();
        Demo { child, stdin, base }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // Closing stdin is the demo's signal to shut down gracefully (`--parent-pipe`).
        drop(self.stdin.take());
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A virtual environment in `dir` with the `stripe` package; its Python.
fn python_with_stripe(dir: &Path) -> Result<PathBuf, String> {
    let venv = dir.join("venv");
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    let python = if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    };
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "stripe",
    ]))?;
    Ok(python)
}

#[test]
fn the_stripe_sdk_raises_its_own_idempotency_errors() {
    let began = Instant::now();
    let temp = tempfile::tempdir().expect("a temporary directory");
    let python = match python_with_stripe(temp.path()) {
        Ok(python) => python,
        Err(why) => return unavailable(&why),
    };
    let installed = began.elapsed();
    let example = payments_example();
    let data = temp.path().join("data");
    let demo = Demo::start(&example, &data);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stripe_sdk.py");
    let output = run(Command::new(&python).arg(&script).arg(&demo.base))
        .unwrap_or_else(|error| panic!("the SDK script failed: {error}"));
    drop(demo);
    let out: Value = serde_json::from_slice(&output.stdout).expect("the script's JSON report");
    eprintln!(
        "stripe_sdk: stripe-python {} (venv + pip install {:.1} s, whole test {:.1} s)",
        out["sdk_version"],
        installed.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );

    // A charge and its retry under one key: one charge, the retry replayed.
    let (first, retry) = (&out["first"], &out["retry"]);
    assert!(first["id"].as_str().is_some_and(|id| id.starts_with("ch_")));
    assert_eq!(first["amount"], 500);
    assert!(first["replayed"].is_null(), "the first answer is no replay");
    assert_eq!(retry["id"], first["id"]);
    assert_eq!(retry["replayed"], "true");

    // The key reused with other parameters: the SDK's own IdempotencyError, Stripe's words.
    let key = out["key"].as_str().expect("the key");
    let reused = &out["reused"];
    assert_eq!(reused["class"], "IdempotencyError", "{reused}");
    assert_eq!(out["reused_is_idempotency_error"], true);
    assert_eq!(reused["http_status"], 400);
    assert_eq!(reused["type"], "idempotency_error");
    assert_eq!(
        reused["message"],
        format!(
            "Keys for idempotent requests can only be used with the same parameters they were \
             first used with. Try using a key other than '{key}' if you meant to execute a \
             different request."
        )
    );

    // Duplicates of a running charge, without the SDK's retries: each copy gets the charge or
    // Stripe's 409, never another charge.
    let storms = out["storms_without_retries"]
        .as_array()
        .expect("the storms");
    let mut conflicts = 0;
    for storm in storms {
        let copies = storm.as_array().expect("a storm's copies");
        let ids: Vec<&Value> = copies.iter().filter_map(|c| c.get("id")).collect();
        assert!(
            !ids.is_empty() && ids.iter().all(|id| *id == ids[0]),
            "{storm}"
        );
        for error in copies.iter().filter_map(|c| c.get("error")) {
            conflicts += 1;
            assert_eq!(
                error["class"], "APIError",
                "the SDK's class for a 409: {error}"
            );
            assert_eq!(error["http_status"], 409);
            assert_eq!(error["type"], "idempotency_error");
            assert_eq!(error["code"], "idempotency_key_in_use");
            let message = error["message"].as_str().expect("a message");
            assert!(
                message.starts_with(
                    "There is currently another in-progress request using this Idempotent Key"
                ) && message.ends_with("Please try again later."),
                "{message}"
            );
        }
    }
    if conflicts == 0 {
        eprintln!(
            "stripe_sdk: no duplicate arrived while its original ran in {} storms",
            storms.len()
        );
    }

    // With the SDK's retries (it retries a 409), every copy ends with the one charge.
    let storm = out["storm_with_retries"].as_array().expect("a storm");
    let first_id = &storm[0]["id"];
    assert!(first_id.is_string(), "{storm:?}");
    assert!(
        storm.iter().all(|copy| copy["id"] == *first_id),
        "{storm:?}"
    );
}

/// One HTTP/1.0 exchange with the demo at `base` ("http://127.0.0.1:PORT"): the response's
/// status line, headers and body as text.
#[cfg(feature = "metrics")]
fn exchange(base: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).expect("the demo accepts a connection");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("a read timeout");
    stream
        .write_all(request.as_bytes())
        .expect("the request is sent");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("the response (HTTP/1.0: up to the close)");
    response
}

/// `GET /metrics` of the demo (built with `--features http,metrics`, as the README runs it)
/// shows the engine's metrics from the store's open on, labelled with the store's path: the
/// recorder is installed before the store opens, so `idemstore_poisoned` is there at 0, and a
/// charge and its retry count as one acquired claim and one replay.
#[cfg(feature = "metrics")]
#[test]
fn the_demo_serves_the_engine_metrics_labelled_by_store() {
    let temp = tempfile::tempdir().expect("a temporary directory");
    let data = temp.path().join("data");
    let demo = Demo::start(&payments_example(), &data);
    let body = "amount=700&currency=usd";
    let charge = format!(
        "POST /v1/charges HTTP/1.0\r\nauthorization: Bearer sk_test_metrics\r\n\
         idempotency-key: metrics-1\r\ncontent-type: application/x-www-form-urlencoded\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..2 {
        let response = exchange(&demo.base, &charge);
        assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    }
    let metrics = exchange(&demo.base, "GET /metrics HTTP/1.0\r\n\r\n");
    drop(demo);
    let store = data.join("idempotency.redb");
    let series =
        |name: &str, labels: &str| format!("{name}{{store=\"{}\"{labels}}}", store.display());
    let value = |series: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    assert_eq!(value(&series("idemstore_poisoned", "")), 0.0);
    assert_eq!(
        value(&series("idemstore_claims_total", ",answer=\"acquired\"")),
        1.0
    );
    assert_eq!(
        value(&series("idemstore_claims_total", ",answer=\"replay\"")),
        1.0
    );
}
