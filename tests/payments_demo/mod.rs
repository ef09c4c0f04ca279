//! The payments example (`examples/payments/`) for the tests that run it as a program
//! (`stripe_sdk.rs`, `payments_shared.rs`): built by cargo with the build profile and the
//! features of the test itself, so that under `cargo test` the build is the one cargo made
//! already.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Whether the test runs in CI, where a missing prerequisite is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Runs `command` (stdin closed) to completion; its output, or why it failed with its output.
pub fn run(command: &mut Command) -> Result<Output, String> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{shown}: {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The features this test was built with, as `--features` takes them.
fn features() -> String {
    let mut features = vec!["http"];
    for (on, name) in [
        (cfg!(feature = "metrics"), "metrics"),
        (cfg!(feature = "postgres"), "postgres"),
        (cfg!(feature = "redis"), "redis"),
        (cfg!(feature = "client"), "client"),
        (cfg!(feature = "cli"), "cli"),
        (cfg!(feature = "__testkit"), "__testkit"),
    ] {
        if on {
            features.push(name);
        }
    }
    features.join(",")
}

/// The `payments` example of the build profile this test was built with, built (or found
/// fresh) by cargo with the features this test was built with.
pub fn payments_example() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target/<profile> has a parent");
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "--example", "payments", "--features"])
        .arg(features())
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir);
    if profile_dir
        .file_name()
        .is_some_and(|name| name == "release")
    {
        build.arg("--release");
    }
    if let Err(error) = run(&mut build) {
        panic!("building the payments example failed: {error}");
    }
    let example = profile_dir
        .join("examples")
        .join(format!("payments{}", std::env::consts::EXE_SUFFIX));
    assert!(example.is_file(), "no example at {}", example.display());
    example
}
