//! Feeds arbitrary limits, scopes, keys, fingerprints, outcomes, checkpoints and durations to
//! the store's input validation (`idemstore::testkit::validate_input`), on an in-memory store.
//!
//! Every call must succeed exactly when its inputs are within their limits, and otherwise return
//! a typed error that names an input really out of bounds; a rejected input writes nothing; an
//! accepted completion replays its exact bytes; nothing panics.
//!
//! ```text
//! cargo +nightly fuzz run validate
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    idemstore::testkit::validate_input(bytes);
});
