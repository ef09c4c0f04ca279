//! Recovery of the write-ahead log over logs damaged in arbitrary ways: appends, then bit
//! flips, zeroed sectors, stale sectors and junk, then the recovery scan, which must return a
//! prefix of what was appended (or refuse the log as corrupt) and never panic. See
//! `idemstore::testkit::scan_log`.
//!
//! ```text
//! cargo +nightly fuzz run wal
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = idemstore::testkit::scan_log(bytes);
});
