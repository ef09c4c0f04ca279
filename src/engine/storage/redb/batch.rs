//! One commit's writes to the redb tables, through the [`Batch`] interface.

use redb::{ReadableTable, Table, WriteTransaction};

use super::tables::{EXPIRY, RECORDS, SCOPES};
use crate::core::record::Record;
use crate::engine::codec;
use crate::engine::storage::{Batch, Stored};
use crate::error::{Error, Result};

/// The tables a batch writes, opened once per transaction.
pub(super) struct RedbBatch<'t> {
    records: Table<'t, &'static [u8], &'static [u8]>,
    expiry: Table<'t, (u64, &'static [u8]), ()>,
    scopes: Table<'t, &'static [u8], u64>,
    next_token: Option<u64>,
    /// Whether the batch changed a table.
    wrote: bool,
}

impl<'t> RedbBatch<'t> {
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Ok(RedbBatch {
            records: txn.open_table(RECORDS).map_err(Error::storage)?,
            expiry: txn.open_table(EXPIRY).map_err(Error::storage)?,
            scopes: txn.open_table(SCOPES).map_err(Error::storage)?,
            next_token: None,
            wrote: false,
        })
    }

    /// Whether the batch changed anything: a table, or the next token.
    pub(super) fn wrote(&self) -> bool {
        self.wrote || self.next_token.is_some()
    }

    /// The next token to store with the commit, if the batch set one.
    pub(super) fn next_token(&self) -> Option<u64> {
        self.next_token
    }
}

/// The expiry-index range of entries due at `now_ms`: every `(at, key)` with `at <= now_ms`.
pub(super) fn due_range(now_ms: u64) -> std::ops::Range<(u64, &'static [u8])> {
    let empty: &[u8] = &[];
    (0u64, empty)..(now_ms.saturating_add(1), empty)
}

impl Batch for RedbBatch<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Stored>> {
        let value = self.records.get(key).map_err(Error::storage)?;
        Ok(value.map(|guard| codec::decode(key, guard.value())))
    }

    fn put(&mut self, key: &[u8], record: &Record) -> Result<()> {
        self.wrote = true;
        self.records
            .insert(key, codec::encode(key, record).as_slice())
            .map_err(Error::storage)?;
        Ok(())
    }

    fn remove(&mut self, key: &[u8]) -> Result<()> {
        self.wrote = true;
        self.records.remove(key).map_err(Error::storage)?;
        Ok(())
    }

    fn remove_if(&mut self, key: &[u8], goes: &mut dyn FnMut(&Stored) -> bool) -> Result<bool> {
        // Removed first and put back if it must stay: one tree walk for the common case.
        let Some(old) = self.records.remove(key).map_err(Error::storage)? else {
            return Ok(false);
        };
        self.wrote = true;
        if goes(&codec::decode(key, old.value())) {
            return Ok(true);
        }
        let bytes = old.value().to_vec();
        drop(old);
        self.records
            .insert(key, bytes.as_slice())
            .map_err(Error::storage)?;
        Ok(false)
    }

    fn index(&mut self, at_ms: u64, key: &[u8]) -> Result<()> {
        self.wrote = true;
        self.expiry
            .insert((at_ms, key), ())
            .map_err(Error::storage)?;
        Ok(())
    }

    fn unindex(&mut self, at_ms: u64, key: &[u8]) -> Result<()> {
        self.wrote = true;
        self.expiry.remove((at_ms, key)).map_err(Error::storage)?;
        Ok(())
    }

    fn due(&mut self, now_ms: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        self.expiry
            .range(due_range(now_ms))
            .map_err(Error::storage)?
            .take(limit)
            .map(|entry| {
                let (k, _) = entry.map_err(Error::storage)?;
                let (at, key) = k.value();
                Ok((at, key.to_vec()))
            })
            .collect()
    }

    fn scope_records(&mut self, scope: &[u8]) -> Result<u64> {
        let count = self.scopes.get(scope).map_err(Error::storage)?;
        Ok(count.map_or(0, |g| g.value()))
    }

    fn set_scope_records(&mut self, scope: &[u8], count: u64) -> Result<()> {
        self.wrote = true;
        if count == 0 {
            self.scopes.remove(scope).map_err(Error::storage)?;
        } else {
            self.scopes.insert(scope, count).map_err(Error::storage)?;
        }
        Ok(())
    }

    fn set_next_token(&mut self, token: u64) -> Result<()> {
        self.next_token = Some(token);
        Ok(())
    }
}
