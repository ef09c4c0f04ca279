//! The fuzz targets on stable Rust, without cargo-fuzz: every file of `fuzz/corpus/<target>/`
//! (the corpus the fuzzer grew, committed), every file of `fuzz/regressions/<target>/` (inputs
//! that once found a defect), and inputs from a seeded PRNG go through the same functions the
//! targets call (`idemstore::testkit`), which panic on any violated property.
//!
//! Default: the corpus plus a few thousand generated inputs per target. `IDEMSTORE_LONG=1`
//! generates ten times as many; `IDEMSTORE_FUZZ_SEED=S` changes the PRNG seed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use idemstore::testkit;

mod support;

use support::long_run;
use support::rng::Rng;

fn seed() -> u64 {
    std::env::var("IDEMSTORE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x1DE5_7012)
}

/// Up to `max_len` bytes (the length uniform in `0..=max_len`), one PRNG draw per byte.
fn bytes_up_to(rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let len = rng.index(max_len + 1);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Runs `f` on every committed input of `target`, then on `generated` PRNG inputs of up to
/// `max_len` bytes. A panic names the input.
fn replay(target: &str, generated: usize, max_len: usize, f: impl Fn(&[u8])) {
    let started = Instant::now();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut corpus = 0;
    for dir in ["corpus", "regressions"] {
        for path in files(&root.join(dir).join(target)) {
            let bytes = std::fs::read(&path).expect("a corpus file");
            eprintln!("{target}: {}", path.display());
            f(&bytes);
            corpus += 1;
        }
    }
    let mut rng = Rng::from_state(seed() ^ target.len() as u64);
    let n = if long_run() {
        generated * 10
    } else {
        generated
    };
    for i in 0..n {
        let input = bytes_up_to(&mut rng, max_len);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&input)));
        assert!(
            result.is_ok(),
            "{target}: generated input #{i} (seed {}) failed: {input:?}",
            seed()
        );
    }
    eprintln!(
        "{target}: {corpus} corpus and regression files, {n} generated inputs, {:.1?}",
        started.elapsed()
    );
}

#[test]
fn decode_corpus_and_generated_inputs() {
    replay("decode", 20_000, 256, |bytes| {
        let _ = testkit::decode_record(bytes);
    });
}

#[test]
fn validate_corpus_and_generated_inputs() {
    replay("validate", 3_000, 96, testkit::validate_input);
}

#[test]
fn ops_corpus_and_generated_inputs() {
    ops(testkit::run_ops, "");
}

/// The `ops` inputs again, on a store with a write-ahead log (the `ops_wal` target).
#[test]
fn ops_corpus_and_generated_inputs_with_a_write_ahead_log() {
    ops(testkit::run_ops_with_log, " (write-ahead log)");
}

fn ops(run: fn(&[u8]) -> testkit::OpsSummary, label: &str) {
    let total = std::sync::Mutex::new(testkit::OpsSummary::default());
    replay("ops", 800, 400, |bytes| {
        let s = run(bytes);
        let mut t = total
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.ops += s.ops;
        t.faults_fired += s.faults_fired;
        t.rolled_back += s.rolled_back;
        t.rolled_forward += s.rolled_forward;
        t.reopens += s.reopens;
    });
    let t = total
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    eprintln!(
        "ops{label}: {} operations, {} injected I/O failures fired, failed operations rolled \
         back {} / rolled forward {} (each checked after a reopen), {} reopens",
        t.ops, t.faults_fired, t.rolled_back, t.rolled_forward, t.reopens
    );
    assert!(
        t.faults_fired > 0 && t.rolled_back > 0,
        "faults are exercised"
    );
}

#[test]
fn wal_corpus_and_generated_inputs() {
    let total = std::sync::Mutex::new(testkit::WalSummary::default());
    replay("wal", 3_000, 1_200, |bytes| {
        let s = testkit::scan_log(bytes);
        let mut t = total
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.appended += s.appended;
        t.recovered += s.recovered;
        t.refused += s.refused;
    });
    let t = total
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    eprintln!("wal: {t:?}");
    // The inputs reached both outcomes of a damaged log.
    assert!(t.appended > 0 && t.recovered > 0 && t.refused > 0, "{t:?}");
}
