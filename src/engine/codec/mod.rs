//! The on-disk record envelope: `magic, format version, CRC-32, bincode payload`.
//!
//! ```text
//! offset  size  field
//! 0       1     magic 0xD1
//! 1       1     envelope format version (1)
//! 2       4     CRC-32 (IEEE, crc32fast) of the scoped key followed by the payload, LE
//! 6       n     payload: bincode 2 (standard config) of the persisted record of that version
//! ```
//!
//! The payload is a private struct per envelope version ([`v1`]), converted to and from the
//! public [`Record`]: the public type can grow without changing the file format, and `decode`
//! dispatches on the version byte, so a later version adds a module and an arm, and files
//! written by earlier builds keep decoding.
//!
//! The checksum covers the record's storage key although the key is not stored in the
//! envelope: a record that a damaged B-tree page shows under another key fails its check
//! instead of being replayed for the wrong request.
//!
//! Decoding checks every field and the exact payload length, and returns a typed corruption
//! error for any byte string that is not a valid envelope; it never panics.

mod v1;

use crate::core::record::Record;

/// First byte of every record envelope.
pub(crate) const ENVELOPE_MAGIC: u8 = 0xD1;
/// The envelope format written by this build.
pub(crate) const ENVELOPE_VERSION: u8 = 1;
const HEADER_LEN: usize = 6;

/// Decoding never allocates more than this for the lengths a payload declares: the largest
/// payload any record can have. Without it, a payload that passes its CRC but declares a
/// length near 2^63 would make the decoder try to allocate it.
const PAYLOAD_LIMIT: usize = crate::limits::OUTCOME_LEN_MAX
    + crate::limits::CHECKPOINT_LEN_MAX
    + crate::limits::FINGERPRINT_LEN_MAX
    + 256;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<PAYLOAD_LIMIT>()
}

fn checksum(key: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(payload);
    hasher.finalize()
}

/// Encodes the record stored under `key` into its envelope.
pub(crate) fn encode(key: &[u8], record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 64 + payload_hint(record));
    out.extend_from_slice(&[ENVELOPE_MAGIC, ENVELOPE_VERSION, 0, 0, 0, 0]);
    // Writing into a Vec cannot fail, and every field of the persisted record is encodable.
    bincode::serde::encode_into_std_write(v1::RecordV1::from(record), &mut out, config())
        .expect("encoding a persisted record into a Vec is infallible");
    let crc = checksum(key, out.get(HEADER_LEN..).unwrap_or_default());
    out.splice(2..HEADER_LEN, crc.to_le_bytes());
    out
}

fn payload_hint(record: &Record) -> usize {
    use crate::core::record::RecordState;
    record.fingerprint.len()
        + match &record.state {
            RecordState::Completed { outcome } => outcome.len(),
            RecordState::InFlight { checkpoint, .. } | RecordState::Failed { checkpoint } => {
                checkpoint.as_ref().map_or(0, Vec::len)
            }
        }
}

/// Why an envelope was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    Truncated(usize),
    BadMagic(u8),
    UnknownVersion(u8),
    Oversized(usize),
    Checksum { stored: u32, computed: u32 },
    Payload(String),
    TrailingBytes(usize),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated(n) => {
                write!(f, "envelope of {n} bytes is shorter than its header")
            }
            DecodeError::BadMagic(m) => write!(f, "bad envelope magic {m:#04x}"),
            DecodeError::UnknownVersion(v) => write!(f, "unknown envelope version {v}"),
            DecodeError::Oversized(n) => {
                write!(f, "payload of {n} bytes exceeds every record limit")
            }
            DecodeError::Checksum { stored, computed } => write!(
                f,
                "CRC-32 mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
            DecodeError::Payload(e) => write!(f, "undecodable payload: {e}"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} bytes after the payload"),
        }
    }
}

/// Decodes the envelope stored under `key`, checking magic, version, size bound, CRC (over key
/// and payload) and exact length.
pub(crate) fn decode(key: &[u8], bytes: &[u8]) -> Result<Record, DecodeError> {
    let (header, payload) = match bytes.split_at_checked(HEADER_LEN) {
        Some(parts) => parts,
        None => return Err(DecodeError::Truncated(bytes.len())),
    };
    let [magic, version, c0, c1, c2, c3] = header else {
        return Err(DecodeError::Truncated(bytes.len()));
    };
    if *magic != ENVELOPE_MAGIC {
        return Err(DecodeError::BadMagic(*magic));
    }
    if !(1..=ENVELOPE_VERSION).contains(version) {
        return Err(DecodeError::UnknownVersion(*version));
    }
    if payload.len() > PAYLOAD_LIMIT {
        return Err(DecodeError::Oversized(payload.len()));
    }
    let stored = u32::from_le_bytes([*c0, *c1, *c2, *c3]);
    let computed = checksum(key, payload);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    match *version {
        1 => {
            let persisted: v1::RecordV1<'static> = decode_payload(payload)?;
            Ok(persisted.into())
        }
        other => Err(DecodeError::UnknownVersion(other)),
    }
}

/// Decodes one bincode payload, which must fill `payload` exactly.
fn decode_payload<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let (value, used): (T, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| DecodeError::Payload(e.to_string()))?;
    if used != payload.len() {
        return Err(DecodeError::TrailingBytes(payload.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::RecordState;

    const KEY: &[u8] = b"\x05scopekey";

    fn sample() -> Record {
        Record {
            fingerprint: vec![7; 32],
            created_at_ms: 1,
            updated_at_ms: 2,
            expires_at_ms: 3,
            attempt: 1,
            state: RecordState::InFlight {
                token: 9,
                epoch: 2,
                lease_until_ms: 5,
                checkpoint: Some(b"step-1".to_vec()),
            },
        }
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(decode(KEY, &encode(KEY, &r)), Ok(r));
    }

    #[test]
    fn version_one_lays_a_record_out_as_documented() {
        // The layout of `v1.rs`'s docs, byte for byte: a change here changes the file format.
        let mut payload = vec![32];
        payload.extend_from_slice(&[7; 32]); // fingerprint
        payload.extend_from_slice(&[1, 2, 3]); // created, updated, expires
        payload.push(1); // attempt
        payload.extend_from_slice(&[0, 9, 2, 5]); // InFlight: token, epoch, lease_until
        payload.extend_from_slice(&[1, 6]); // checkpoint: Some, 6 bytes
        payload.extend_from_slice(b"step-1");
        let bytes = encode(KEY, &sample());
        assert_eq!(bytes.get(..2), Some(&[ENVELOPE_MAGIC, 1][..]));
        assert_eq!(bytes.get(HEADER_LEN..), Some(payload.as_slice()));
        let crc = checksum(KEY, &payload).to_le_bytes();
        assert_eq!(bytes.get(2..HEADER_LEN), Some(&crc[..]));
    }

    #[test]
    fn an_unknown_envelope_version_is_refused() {
        let mut bytes = encode(KEY, &sample());
        if let Some(v) = bytes.get_mut(1) {
            *v = ENVELOPE_VERSION + 1;
        }
        assert_eq!(
            decode(KEY, &bytes),
            Err(DecodeError::UnknownVersion(ENVELOPE_VERSION + 1))
        );
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = encode(KEY, &sample());
        for len in 0..bytes.len() {
            assert!(
                decode(KEY, bytes.get(..len).unwrap_or_default()).is_err(),
                "len {len}"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let bytes = encode(KEY, &sample());
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            if let Some(byte) = b.get_mut(i / 8) {
                *byte ^= 1 << (i % 8);
            }
            assert!(decode(KEY, &b).is_err(), "bit {i}");
        }
    }

    #[test]
    fn a_huge_declared_length_is_rejected_without_allocating() {
        // Found by the decode fuzz target: a valid CRC over a payload whose fingerprint
        // declares a length of about 2^63 bytes.
        let payload = [0xFD, 0x04, 0, 0, 0, 0, 0x64, 0x80, 0xC2, 0x00];
        let mut bytes = vec![ENVELOPE_MAGIC, ENVELOPE_VERSION];
        bytes.extend_from_slice(&checksum(KEY, &payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        assert!(matches!(decode(KEY, &bytes), Err(DecodeError::Payload(_))));
    }

    #[test]
    fn an_envelope_read_under_another_key_fails_its_check() {
        let bytes = encode(KEY, &sample());
        assert!(matches!(
            decode(b"\x05scopeother", &bytes),
            Err(DecodeError::Checksum { .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_rejected_even_with_a_valid_crc() {
        let mut bytes = encode(KEY, &sample());
        bytes.push(0);
        let crc = checksum(KEY, bytes.get(HEADER_LEN..).unwrap_or_default());
        bytes.splice(2..HEADER_LEN, crc.to_le_bytes());
        assert!(matches!(
            decode(KEY, &bytes),
            Err(DecodeError::TrailingBytes(1))
        ));
    }
}
