//! Idempotency records and the scoped keys that name them.

/// One idempotency record as stored: what a `get` returns.
///
/// Timestamps are milliseconds since the Unix epoch, read from the store's [`Clock`](crate::Clock).
///
/// This is the public view of a record, not its on-disk form: the engine persists a private,
/// versioned struct and converts (`src/engine/codec/`), so a field added here never changes the
/// file format by accident.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The fingerprint of the request that created the record.
    pub fingerprint: Vec<u8>,
    /// When the record was first claimed.
    pub created_at_ms: u64,
    /// When the record last changed state.
    pub updated_at_ms: u64,
    /// When the record expires: from then on it is absent, swept or not.
    pub expires_at_ms: u64,
    /// How many times the request has been acquired for execution (1 for the first run).
    pub attempt: u32,
    /// Where the request is in its life.
    pub state: RecordState,
}

/// The state of a [`Record`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordState {
    /// A caller holds a lease and is executing the request.
    InFlight {
        /// The fencing token of the lease that owns the record.
        token: u64,
        /// Who holds the lease. In the embedded engine: the process epoch of the store that
        /// granted it (an earlier epoch means the owner is dead). In a shared store
        /// (PostgreSQL, Redis): the id of the owner (one per backend instance) that claimed
        /// it; a closed owner is gone.
        epoch: u64,
        /// When the lease ends unless extended.
        lease_until_ms: u64,
        /// The latest recovery point of the owner, handed to whoever takes the record over.
        checkpoint: Option<Vec<u8>>,
    },
    /// The request finished; its outcome is replayed to every duplicate.
    Completed {
        /// The stored outcome, replayed byte for byte.
        outcome: Vec<u8>,
    },
    /// The request failed retryably: the next claim with the same fingerprint runs it again.
    Failed {
        /// The recovery point of the failed attempt, handed to the next one.
        checkpoint: Option<Vec<u8>>,
    },
}

impl Record {
    /// Whether the record is absent at `now_ms` (past its expiry).
    #[must_use]
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms <= now_ms
    }
}

/// The storage key of `(scope, key)`: a one-byte scope length, the scope, then the key.
///
/// The length prefix keeps `("ab", "c")` and `("a", "bc")` apart, so no key of one scope can
/// name a record of another.
pub(crate) fn scoped_key(scope: &[u8], key: &[u8]) -> Vec<u8> {
    debug_assert!(scope.len() <= crate::limits::SCOPE_LEN_MAX);
    let mut out = Vec::with_capacity(1 + scope.len() + key.len());
    // Scope length is capped at 255 by `Limits`, so it fits in the prefix byte.
    out.push(u8::try_from(scope.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(scope);
    out.extend_from_slice(key);
    out
}

/// Splits a storage key into `(scope, key)`, or `None` if it is malformed.
pub(crate) fn split_scoped_key(stored: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&len, rest) = stored.split_first()?;
    let len = usize::from(len);
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// A printable form of a scoped key for error messages: `scope/key`, escaped.
pub(crate) fn display_key(stored: &[u8]) -> String {
    match split_scoped_key(stored) {
        Some((scope, key)) => format!("{}/{}", scope.escape_ascii(), key.escape_ascii()),
        None => stored.escape_ascii().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_keys_of_different_scopes_never_collide() {
        assert_ne!(scoped_key(b"ab", b"c"), scoped_key(b"a", b"bc"));
        assert_eq!(
            split_scoped_key(&scoped_key(b"ab", b"c")),
            Some((&b"ab"[..], &b"c"[..]))
        );
        assert_eq!(split_scoped_key(&[5, 1]), None);
        assert_eq!(split_scoped_key(&[]), None);
    }
}
