//! Entry points for the fuzz targets under `fuzz/` and for `tests/fuzz_corpus.rs`, which replays
//! their corpus (and inputs from a seeded PRNG) on stable Rust.
//!
//! Each entry point takes raw fuzzer bytes, decodes what it needs with a small byte reader (an
//! exhausted input reads as zeros, so every byte string is a valid input) and panics on any
//! violated property, which is what a fuzzer reports:
//!
//! - [`decode_record`]: the record-envelope decoder never panics, and what it accepts
//!   re-encodes to itself.
//! - [`validate_input`]: arbitrary limits, scope, key, fingerprint, outcome, checkpoint and
//!   durations against the store's input validation.
//! - [`run_ops`]: arbitrary operation sequences against the reference model of DESIGN §2, on a
//!   [`SimDisk`](super::SimDisk) that fails writes, syncs or resizes at fuzzer-chosen points;
//!   [`run_ops_with_log`]: the same on a store with a write-ahead log (faults on the log).
//! - [`scan_log`]: the write-ahead log's recovery over logs damaged in arbitrary ways.

mod decode;
mod harness;
mod ops;
mod reader;
mod validate;
mod wal;

pub use decode::decode_record;
pub use ops::{OpsSummary, run_ops, run_ops_with_log};
pub use validate::validate_input;
pub use wal::{WalSummary, scan_log};

/// A fixed start time: 2023-11-14T22:13:20Z.
const T0_MS: u64 = 1_700_000_000_000;
