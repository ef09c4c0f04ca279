//! What the administrative calls of every backend answer: [`Orphan`] and [`Swept`].

use crate::core::record::Record;

/// An in-flight record whose owner is gone, listed by
/// [`IdempotencyBackend::orphans`](crate::IdempotencyBackend::orphans) (and
/// [`Store::orphans`](crate::Store::orphans)) for reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Orphan {
    /// The record's scope.
    pub scope: Vec<u8>,
    /// The record's key.
    pub key: Vec<u8>,
    /// The record (state [`RecordState::InFlight`](crate::RecordState::InFlight), with the owner's last checkpoint).
    pub record: Record,
}

/// The result of one sweep ([`IdempotencyBackend::sweep`](crate::IdempotencyBackend::sweep),
/// [`Store::sweep`](crate::Store::sweep)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Swept {
    /// Expiry-index entries visited (at most the limit).
    pub visited: usize,
    /// Expired records removed.
    pub removed: usize,
    /// Whether due entries remain after this sweep: sweep again while it is true.
    pub more: bool,
}
