//! The `ops` target on a store with a write-ahead log (`idemstore::testkit::run_ops_with_log`):
//! the same operation sequences and properties, with a checkpoint after every commit into the
//! smallest record map and a log of two small segments, so that checkpoints, segment recycling
//! and sweeps committed beside the writer race every operation; the injected faults go to the
//! log's disk.
//!
//! ```text
//! cargo +nightly fuzz run ops_wal fuzz/corpus/ops
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = idemstore::testkit::run_ops_with_log(bytes);
});
