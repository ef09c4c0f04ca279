//! The storage seam: everything the engine needs from the bytes on disk, and nothing about how
//! they are laid out.
//!
//! Above the seam, the queue and the writer run the state machine and decide what to write;
//! below it, a [`Storage`] keeps four things: records by scoped key, the expiry index
//! `(expires_at_ms, scoped key)`, a record count per scope, and the meta values (epoch, next
//! fencing token). The writer changes them only through a [`Batch`] inside
//! [`Storage::write`], which reads its own writes and becomes visible to readers, all of it at
//! once, when `write` returns.
//! Readers use the [`Storage`] read methods and only ever see committed batches.
//!
//! What the engine keeps consistent across the tables (an expiry entry per record, the scope
//! counts) is decided once, above the seam (`engine::apply`); an implementation stores what it
//! is told. `redb/` is the format-1 implementation: a redb database on a file, in memory, or on
//! any `redb::StorageBackend`; `wal/` (format 2) puts a write-ahead log and a record map in
//! front of it.

pub(crate) mod redb;
pub(crate) mod wal;

use crate::core::record::Record;
use crate::engine::codec::DecodeError;
use crate::error::Result;

/// A record as read from storage: decoded, or the reason its bytes failed their checks.
pub(crate) type Stored = std::result::Result<Record, DecodeError>;

/// Table sizes, for `Store::stats`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    /// Stored records, expired ones not yet swept included.
    pub records: u64,
    /// Entries of the expiry index.
    pub expiry_entries: u64,
}

/// Committed state, readable from any thread, and the way to change it.
pub(crate) trait Storage: Send + Sync {
    /// The record stored under `key` in the latest committed batch.
    fn read(&self, key: &[u8]) -> Result<Option<Stored>>;

    /// Calls `visit` for each stored record in key order until it returns `false`.
    fn scan(&self, visit: &mut dyn FnMut(&[u8], Stored) -> bool) -> Result<()>;

    /// The number of records stored for `scope`.
    fn scope_records(&self, scope: &[u8]) -> Result<u64>;

    /// Table sizes.
    fn counts(&self) -> Result<Counts>;

    /// Runs `apply` on a new batch and commits what it wrote, as one atomic change. `durable`:
    /// return only once the batch is on stable storage; otherwise it may return before (the
    /// relaxed durability's window). When it returns `Ok`, readers see the batch.
    ///
    /// If `apply` fails, nothing of the batch is committed and its error is returned. If the
    /// commit itself fails, the batch is either fully committed or fully absent and which is
    /// unknown: the error is [`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown)
    /// and the engine stops writing. One batch at a time: only the writer thread calls this.
    ///
    /// Returns whether it committed anything: `false` when the batch changed nothing and, if
    /// `durable`, nothing written before waited to be made durable (a sweep that found nothing
    /// due, say), so no commit (and no sync) was made.
    fn write(
        &self,
        durable: bool,
        apply: &mut dyn FnMut(&mut dyn Batch) -> Result<()>,
    ) -> Result<bool>;

    /// Sweeps up to `limit` records due at `now_ms` beside the writer, where the storage can
    /// (see `Store::sweep`); `None` (the default): the caller sweeps through the writer. A
    /// failed commit is [`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown).
    fn sweep_base(&self, _now_ms: u64, _limit: usize) -> Result<Option<crate::core::admin::Swept>> {
        Ok(None)
    }

    /// Stops serving reads from cached state: the writer calls it when it stops, and after a
    /// commit failed (readers then read the file directly and see any error themselves).
    fn release_reads(&self);

    /// The write-ahead log's figures, for a store that has one.
    fn wal_figures(&self) -> Option<wal::WalStats> {
        None
    }

    /// The largest batch payload (as the write-ahead log encodes it) the storage can always
    /// commit; `None`: no bound beyond the writer's own.
    fn batch_bytes_max(&self) -> Option<u64> {
        None
    }

    /// Verifies the checksum of every page of the database file while the store stays open
    /// (commits wait meanwhile). Returns the bytes verified and the time taken; `None` for a
    /// store without a file. A damaged file is [`Error::Corrupt`](crate::Error::Corrupt).
    fn verify_pages(&self) -> Result<Option<(u64, std::time::Duration)>>;
}

/// The writes of one commit, inside [`Storage::write`]. Reads through a batch see its own
/// earlier writes.
pub(crate) trait Batch {
    /// The record stored under `key`, this batch's writes included.
    fn get(&mut self, key: &[u8]) -> Result<Option<Stored>>;

    /// Stores `record` under `key`, replacing what was there.
    fn put(&mut self, key: &[u8], record: &Record) -> Result<()>;

    /// Removes the record under `key` (nothing if there is none).
    fn remove(&mut self, key: &[u8]) -> Result<()>;

    /// Removes the record under `key` if `goes` says so of what is stored; returns whether it
    /// did. (One tree walk for the sweep's common case, where the record goes.)
    fn remove_if(&mut self, key: &[u8], goes: &mut dyn FnMut(&Stored) -> bool) -> Result<bool>;

    /// Adds the expiry-index entry `(at_ms, key)`.
    fn index(&mut self, at_ms: u64, key: &[u8]) -> Result<()>;

    /// Removes the expiry-index entry `(at_ms, key)` (nothing if there is none).
    fn unindex(&mut self, at_ms: u64, key: &[u8]) -> Result<()>;

    /// Up to `limit` expiry-index entries due at `now_ms` (`at_ms <= now_ms`), oldest first.
    fn due(&mut self, now_ms: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>>;

    /// The record count stored for `scope` (0 when none is stored).
    fn scope_records(&mut self, scope: &[u8]) -> Result<u64>;

    /// Stores the record count of `scope`; 0 removes it.
    fn set_scope_records(&mut self, scope: &[u8], count: u64) -> Result<()>;

    /// Stores the next fencing token.
    fn set_next_token(&mut self, token: u64) -> Result<()>;
}
