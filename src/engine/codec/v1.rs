//! Envelope version 1: the persisted record as bincode 2 (standard config) lays it out.
//!
//! ```text
//! RecordV1 { fingerprint: bytes, created_at_ms: u64, updated_at_ms: u64, expires_at_ms: u64,
//!            attempt: u32, state: StateV1 }
//! StateV1  = 0 InFlight { token: u64, epoch: u64, lease_until_ms: u64, checkpoint: Option<bytes> }
//!          | 1 Completed { outcome: bytes }
//!          | 2 Failed { checkpoint: Option<bytes> }
//! bytes    = varint length, then the bytes
//! ```
//!
//! Frozen: `tests/fixtures/v1.redb` was written with this layout and must keep decoding byte
//! for byte. Field order, variant order and types never change here; a new layout is a new
//! module and a new envelope version. Encoding borrows the record's byte fields (an outcome of
//! up to 16 MiB is not copied to be encoded); decoding owns them and moves them into the
//! public [`Record`].

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::core::record::{Record, RecordState};

#[derive(Serialize, Deserialize)]
pub(super) struct RecordV1<'a> {
    #[serde(with = "bytes")]
    fingerprint: Cow<'a, [u8]>,
    created_at_ms: u64,
    updated_at_ms: u64,
    expires_at_ms: u64,
    attempt: u32,
    state: StateV1<'a>,
}

#[derive(Serialize, Deserialize)]
enum StateV1<'a> {
    InFlight {
        token: u64,
        epoch: u64,
        lease_until_ms: u64,
        #[serde(with = "bytes::option")]
        checkpoint: Option<Cow<'a, [u8]>>,
    },
    Completed {
        #[serde(with = "bytes")]
        outcome: Cow<'a, [u8]>,
    },
    Failed {
        #[serde(with = "bytes::option")]
        checkpoint: Option<Cow<'a, [u8]>>,
    },
}

impl<'a> From<&'a Record> for RecordV1<'a> {
    fn from(r: &'a Record) -> Self {
        let borrow = |c: &'a Option<Vec<u8>>| c.as_deref().map(Cow::Borrowed);
        RecordV1 {
            fingerprint: Cow::Borrowed(&r.fingerprint),
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            expires_at_ms: r.expires_at_ms,
            attempt: r.attempt,
            state: match &r.state {
                RecordState::InFlight {
                    token,
                    epoch,
                    lease_until_ms,
                    checkpoint,
                } => StateV1::InFlight {
                    token: *token,
                    epoch: *epoch,
                    lease_until_ms: *lease_until_ms,
                    checkpoint: borrow(checkpoint),
                },
                RecordState::Completed { outcome } => StateV1::Completed {
                    outcome: Cow::Borrowed(outcome),
                },
                RecordState::Failed { checkpoint } => StateV1::Failed {
                    checkpoint: borrow(checkpoint),
                },
            },
        }
    }
}

impl From<RecordV1<'_>> for Record {
    fn from(p: RecordV1<'_>) -> Self {
        let own = |c: Option<Cow<'_, [u8]>>| c.map(Cow::into_owned);
        Record {
            fingerprint: p.fingerprint.into_owned(),
            created_at_ms: p.created_at_ms,
            updated_at_ms: p.updated_at_ms,
            expires_at_ms: p.expires_at_ms,
            attempt: p.attempt,
            state: match p.state {
                StateV1::InFlight {
                    token,
                    epoch,
                    lease_until_ms,
                    checkpoint,
                } => RecordState::InFlight {
                    token,
                    epoch,
                    lease_until_ms,
                    checkpoint: own(checkpoint),
                },
                StateV1::Completed { outcome } => RecordState::Completed {
                    outcome: outcome.into_owned(),
                },
                StateV1::Failed { checkpoint } => RecordState::Failed {
                    checkpoint: own(checkpoint),
                },
            },
        }
    }
}

/// Serde helpers that write byte strings as one length-prefixed run instead of a sequence of
/// single-byte elements, and read them back owned.
mod bytes {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::Serializer;

    #[allow(clippy::ptr_arg)] // serde's `with` passes `&T` of the field's type
    pub(super) fn serialize<S: Serializer>(v: &Cow<'_, [u8]>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, 'a, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Cow<'a, [u8]>, D::Error> {
        // `bytes`, not `byte_buf`: from a slice the decoder then lends the bytes, and they are
        // copied once into a buffer of their length (`byte_buf` zero-fills one, then copies).
        d.deserialize_bytes(BytesVisitor).map(Cow::Owned)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Bounded by the decoder's size check: the hint is capped to what was received.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    pub(super) mod option {
        use std::borrow::Cow;

        use serde::de::Deserializer;
        use serde::ser::Serializer;
        use serde::{Deserialize, Serialize};

        struct Borrowed<'b>(&'b [u8]);

        impl Serialize for Borrowed<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }

        #[derive(Deserialize)]
        struct Owned(#[serde(deserialize_with = "super::deserialize")] Cow<'static, [u8]>);

        #[allow(clippy::ref_option)] // serde's `with` passes `&Option<T>`
        pub(in super::super) fn serialize<S: Serializer>(
            v: &Option<Cow<'_, [u8]>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(bytes) => s.serialize_some(&Borrowed(bytes)),
                None => s.serialize_none(),
            }
        }

        pub(in super::super) fn deserialize<'de, 'a, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Cow<'a, [u8]>>, D::Error> {
            Ok(Option::<Owned>::deserialize(d)?.map(|w| w.0))
        }
    }
}
