//! The `decode` target: the record-envelope decoder on arbitrary bytes.

use crate::Record;

/// Decodes a record envelope; every envelope that decodes must re-encode to a byte string
/// that decodes to the same record (asserted, so a fuzzer reports the violation).
#[must_use]
pub fn decode_record(bytes: &[u8]) -> Option<Record> {
    // The empty key: the checksum then covers the payload alone.
    let record = crate::engine::codec::decode(&[], bytes).ok()?;
    let again = crate::engine::codec::decode(&[], &crate::engine::codec::encode(&[], &record));
    assert_eq!(
        again.as_ref(),
        Ok(&record),
        "a decoded record re-encodes to itself"
    );
    Some(record)
}
