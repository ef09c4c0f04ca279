//! A sweep of the database file itself, for a store with a write-ahead log: the due records
//! that only redb holds are removed in a write transaction of their own, beside the writer,
//! instead of being read by one batch, laid over the map and removed again at the next
//! checkpoint.
//!
//! The transaction walks the due part of the expiry index once, clears it in one pass, and
//! removes each record with one tree walk (the removal hands back what it removed, which is
//! checked: a record whose expiry is not the entry's stays). The caller (the log's storage)
//! then, under the writer's lock, puts back what a batch changed meanwhile, logs the removals
//! and marks them removed in the map before the commit, so that no batch sees a record the
//! commit removes while counting its scope from before or after it (see
//! `wal::Inner::sweep_base`).
//!
//! The commit is not durable: the log's copy of the removals is what a crash replays (the
//! sweep is acknowledged once a sync of the log covers it). The next checkpoint, which is
//! durable, makes the commit so.

use parking_lot::RwLockReadGuard;
use redb::ReadableTable;

use super::tables::{EXPIRY, RECORDS, SCOPES};
use super::{RedbStorage, batch, count_records};
use crate::core::admin::Swept;
use crate::engine::apply::scope_of;
use crate::engine::codec;
use crate::engine::storage::Storage;
use crate::error::{Error, Result};

/// A removed record: its key, the expiry its index entry had, and its envelope (to put it
/// back if a batch changed it meanwhile).
struct Removed {
    key: Vec<u8>,
    at: u64,
    envelope: Vec<u8>,
}

/// What [`RedbStorage::sweep_begin`] found.
pub(crate) enum SweepStart<'a> {
    /// Nothing removed: no entry due after the floor, or `limit` 0 (`more`: some are due).
    Nothing {
        /// Whether entries are due.
        more: bool,
    },
    /// A due record's key is one the map holds: the writer sweeps it.
    Held,
    /// The due records removed in a transaction not yet committed.
    Open(Box<BaseSweep<'a>>),
}

/// A sweep's write transaction, between [`RedbStorage::sweep_begin`] and its commit or abort.
pub(crate) struct BaseSweep<'a> {
    storage: &'a RedbStorage,
    txn: redb::WriteTransaction,
    removed: Vec<Removed>,
    visited: usize,
    more: bool,
    /// Held until the commit or abort, as by every commit (see `RedbStorage::quiesce`).
    _quiet: RwLockReadGuard<'a, ()>,
}

impl RedbStorage {
    /// Opens a sweep: up to `limit` expiry-index entries due at `now_ms`, after `after` if
    /// given, are removed with the records they name. If the key of any of them is one
    /// `held` names, nothing is removed ([`SweepStart::Held`]).
    pub(crate) fn sweep_begin(
        &self,
        now_ms: u64,
        after: Option<&(u64, Vec<u8>)>,
        limit: usize,
        held: &dyn Fn(&[u8]) -> bool,
    ) -> Result<SweepStart<'_>> {
        use std::ops::Bound;
        let quiet = self.quiesce.read();
        let mut txn = self.db.begin_write().map_err(Error::storage)?;
        txn.set_durability(redb::Durability::None)
            .map_err(Error::storage)?;
        let (due, more) = {
            let expiry = txn.open_table(EXPIRY).map_err(Error::storage)?;
            let upto = batch::due_range(now_ms).end;
            let lower = match after {
                Some((at, key)) => Bound::Excluded((*at, key.as_slice())),
                None => Bound::Unbounded,
            };
            let mut due = Vec::new();
            // One entry past the limit says whether more are due.
            for entry in expiry
                .range::<(u64, &[u8])>((lower, Bound::Excluded(upto)))
                .map_err(Error::storage)?
                .take(limit.saturating_add(1))
            {
                let (k, _) = entry.map_err(Error::storage)?;
                let (at, key) = k.value();
                due.push((at, key.to_vec()));
            }
            let more = due.len() > limit;
            due.truncate(limit);
            (due, more)
        };
        let (Some(first), Some(last)) = (due.first(), due.last()) else {
            txn.abort().map_err(Error::storage)?;
            return Ok(SweepStart::Nothing { more });
        };
        if due.iter().any(|(_, key)| held(key)) {
            txn.abort().map_err(Error::storage)?;
            return Ok(SweepStart::Held);
        }
        let mut removed = Vec::with_capacity(due.len());
        {
            // The entries walked are consecutive in the index: clear them in one pass.
            let mut expiry = txn.open_table(EXPIRY).map_err(Error::storage)?;
            expiry
                .retain_in(
                    (first.0, first.1.as_slice())..=(last.0, last.1.as_slice()),
                    |_, ()| false,
                )
                .map_err(Error::storage)?;
            let mut records = txn.open_table(RECORDS).map_err(Error::storage)?;
            let mut by_key: Vec<&(u64, Vec<u8>)> = due.iter().collect();
            by_key.sort_unstable_by(|a, b| a.1.cmp(&b.1));
            for (at, key) in by_key {
                let Some(old) = records.remove(key.as_slice()).map_err(Error::storage)? else {
                    // A stale entry: its record is gone.
                    continue;
                };
                let envelope = old.value().to_vec();
                drop(old);
                let goes = match codec::decode(key, &envelope) {
                    Ok(r) => r.expires_at_ms == *at && r.is_expired(now_ms),
                    Err(e) => {
                        tracing::warn!(
                            key = %crate::core::record::display_key(key),
                            expired_at_ms = at,
                            reason = %e,
                            "idemstore: swept a record that failed its checks; its retention was over"
                        );
                        true
                    }
                };
                if goes {
                    removed.push(Removed {
                        key: key.clone(),
                        at: *at,
                        envelope,
                    });
                } else {
                    // A stale entry: the record lives on, under its own entry.
                    records
                        .insert(key.as_slice(), envelope.as_slice())
                        .map_err(Error::storage)?;
                }
            }
        }
        Ok(SweepStart::Open(Box::new(BaseSweep {
            storage: self,
            txn,
            visited: due.len(),
            removed,
            more,
            _quiet: quiet,
        })))
    }
}

impl BaseSweep<'_> {
    /// Puts back each removed record whose key `held` names (with its index entry): a batch
    /// changed it since the sweep began, and the map holds its newer state.
    pub(crate) fn put_back(&mut self, held: &dyn Fn(&[u8]) -> bool) -> Result<()> {
        if !self.removed.iter().any(|r| held(&r.key)) {
            return Ok(());
        }
        let mut records = self.txn.open_table(RECORDS).map_err(Error::storage)?;
        let mut expiry = self.txn.open_table(EXPIRY).map_err(Error::storage)?;
        let mut kept = Vec::with_capacity(self.removed.len());
        for r in self.removed.drain(..) {
            if held(&r.key) {
                records
                    .insert(r.key.as_slice(), r.envelope.as_slice())
                    .map_err(Error::storage)?;
                expiry
                    .insert((r.at, r.key.as_slice()), ())
                    .map_err(Error::storage)?;
            } else {
                kept.push(r);
            }
        }
        self.removed = kept;
        Ok(())
    }

    /// The key and expiry of each record the sweep removes.
    pub(crate) fn removals(&self) -> impl Iterator<Item = (&[u8], u64)> {
        self.removed.iter().map(|r| (r.key.as_slice(), r.at))
    }

    /// Commits the removals (not durably) with their scopes' counts, and serves the result to
    /// readers. A failed commit is [`Error::CommitOutcomeUnknown`].
    pub(crate) fn commit(self) -> Result<Swept> {
        let BaseSweep {
            storage,
            txn,
            removed,
            visited,
            more,
            _quiet,
        } = self;
        {
            let mut counts: std::collections::HashMap<&[u8], i64> =
                std::collections::HashMap::new();
            for r in &removed {
                *counts.entry(scope_of(&r.key)).or_default() -= 1;
            }
            let mut scopes = txn.open_table(SCOPES).map_err(Error::storage)?;
            for (scope, change) in counts {
                count_records(&mut scopes, scope, change)?;
            }
        }
        if let Err(e) = txn.commit() {
            storage.release_reads();
            return Err(Error::CommitOutcomeUnknown {
                source: Box::new(Error::storage(e)),
            });
        }
        // Durable with the next checkpoint, or `sync_sweeps` when the store closes.
        storage
            .unsynced
            .store(true, std::sync::atomic::Ordering::SeqCst);
        storage.refresh_snapshot();
        Ok(Swept {
            visited,
            removed: removed.len(),
            more,
        })
    }

    /// Drops the transaction: nothing of the sweep is committed.
    pub(crate) fn abort(self) -> Result<()> {
        self.txn.abort().map_err(Error::storage)
    }
}
