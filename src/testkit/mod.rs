//! Test-only code, compiled only with the internal feature `__testkit`: not part of the API,
//! no stability promise, hidden from the documentation. The integration tests, the fuzz crate
//! under `fuzz/` and its stable replay (`tests/fuzz_corpus.rs`) build on it.
//!
//! - [`model`]: the reference model of DESIGN §2, written apart from `transition.rs`; every
//!   oracle that needs one uses it (the model test, the `ops` fuzz target, the linearizability
//!   checker).
//! - The fuzz entry points: [`decode_record`], [`validate_input`], [`run_ops`]; each panics on a
//!   violated property, which is what a fuzzer reports.

mod fuzz;
pub mod model;

pub use fuzz::{OpsSummary, decode_record, run_ops, validate_input};
