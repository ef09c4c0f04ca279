//! Test-only code, compiled only with the internal feature `__testkit`: not part of the API,
//! no stability promise, hidden from the documentation. The integration tests, the fuzz crate
//! under `fuzz/` and its stable replay (`tests/fuzz_corpus.rs`) build on it.
//!
//! - [`SimDisk`]: one simulated disk for every test that needs storage to misbehave. It keeps
//!   unsynced writes apart from the durable image (power-loss images, [`crash_image`]) and fails
//!   the calls a [`Fault`] plans or a byte budget refuses. A plain in-memory file underneath;
//!   `redb::StorageBackend` is one adapter over it.
//! - [`model`]: the reference model of DESIGN §2, written apart from `transition.rs`; every
//!   oracle that needs one uses it (the model test, the `ops` fuzz target, the linearizability
//!   checker, the conformance suite's `reference_model` case on every backend).
//! - The fuzz entry points: [`decode_record`], [`validate_input`], [`run_ops`]; each panics on a
//!   violated property, which is what a fuzzer reports.

mod crash;
mod disk;
mod fuzz;
pub mod model;

pub use crash::{Fates, SECTOR, crash_image};
pub use disk::{Call, Counts, DiskOp, Event, Fault, Recorded, Recorder, SimDisk, Target};
pub use fuzz::{
    OpsSummary, WalSummary, decode_record, run_ops, run_ops_with_log, scan_log, validate_input,
};
