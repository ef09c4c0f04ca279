//! Runs arbitrary operation sequences (claim, complete, fail, extend, checkpoint, forget, sweep,
//! clock advances, reopens) against a reference model of the state machine, on the in-memory
//! simulated disk (`idemstore::testkit::SimDisk`), which fails writes, syncs or resizes at
//! fuzzer-chosen points (`idemstore::testkit::run_ops`).
//!
//! Without a fault every answer and every record must match the model. An operation inside
//! which a fault fired must never be acknowledged; after a reopen its batch is wholly there or
//! wholly absent, and everything acknowledged before it survives. Nothing panics.
//!
//! ```text
//! cargo +nightly fuzz run ops
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = idemstore::testkit::run_ops(bytes);
});
