//! Feeds arbitrary bytes to the record-envelope decoder, as if they had been read from the
//! records table.
//!
//! The decoder must never panic: anything that is not a valid envelope is rejected
//! (`None`). For an accepted envelope, `decode_record` also asserts that re-encoding the
//! record decodes to the same record; a failure of that assertion is a finding too.
//!
//! ```text
//! cargo +nightly fuzz run decode
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Some(record) = idemstore::testkit::decode_record(bytes) {
        // Exercise the accessor a reader calls on every decoded record.
        let _ = record.is_expired(u64::MAX);
    }
});
