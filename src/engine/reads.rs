//! The read side of the store: every read ([`Store::get`], the claim path's answer from
//! committed state, [`Store::orphans`], [`Store::scope_records`], [`Store::stats`]) goes
//! through one [`Reader`], which reads committed state through the storage seam and never
//! waits for the writer.

use crate::core::admin::Orphan;
use crate::core::claim::Claim;
use crate::core::record::{Record, RecordState, scoped_key, split_scoped_key};
use crate::core::transition::{self, Op, Reply, Write};
use crate::engine::apply::corrupt_record;
use crate::engine::shared::Shared;
use crate::engine::storage::wal::WalStats;
use crate::engine::store::Store;
use crate::error::{Error, Result};

/// Counters and sizes of a store, from [`Store::stats`].
///
/// Table sizes are read from committed state; the writer's counters are bumped just after each
/// commit returns, so for a moment they may trail what the tables already show.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Records stored, including expired ones not yet swept.
    pub records: u64,
    /// Entries in the expiry index (one per record).
    pub expiry_entries: u64,
    /// The process epoch of this open.
    pub epoch: u64,
    /// The fencing token the next acquisition receives.
    pub next_token: u64,
    /// Commits since open that wrote something (an operation answered without a change, such
    /// as a rejected stale lease, commits nothing).
    pub commits: u64,
    /// Write operations the writer answered since open, those that changed nothing included
    /// (a `LeaseLost`, say): under load several share a commit (group commit), so this
    /// grows faster than `commits`.
    pub operations: u64,
    /// The most operations one commit carried.
    pub largest_batch: u64,
    /// Expired records removed by sweeps since open.
    pub swept: u64,
    /// Operations waiting in the commit queue.
    pub queue_depth: usize,
    /// Bytes held by the operations waiting in the commit queue (see
    /// [`StoreBuilder::queue_capacity_bytes`](crate::StoreBuilder::queue_capacity_bytes)).
    pub queue_bytes: usize,
    /// Duplicate claims currently waiting for their original ([`ClaimOptions::wait`](crate::ClaimOptions::wait)).
    pub waiting: usize,
    /// Whether a fatal error has stopped writes until reopen.
    pub poisoned: bool,
    /// The write-ahead log's figures, for a store opened with one
    /// ([`StoreBuilder::write_ahead_log`](crate::StoreBuilder::write_ahead_log)).
    pub wal: Option<WalStats>,
}

/// Reads committed state for one store.
pub(crate) struct Reader<'a> {
    pub shared: &'a Shared,
}

impl Reader<'_> {
    /// The record stored under `sk`, expired or not; a record that fails its checks is
    /// [`Error::Corrupt`].
    pub(crate) fn record(&self, sk: &[u8]) -> Result<Option<Record>> {
        match self.shared.storage.read(sk)? {
            None => Ok(None),
            Some(Ok(record)) => Ok(Some(record)),
            Some(Err(e)) => Err(corrupt_record(sk, &e)),
        }
    }

    /// The live record stored under `sk` (`None` if absent or expired at the clock's current
    /// reading, taken as it is: a clock set back shows records the writer already treats as
    /// expired, which whitebox tests use to read a store's physical contents).
    pub(crate) fn live(&self, sk: &[u8]) -> Result<Option<Record>> {
        let now_ms = self.shared.clock_ms();
        Ok(self.record(sk)?.filter(|r| !r.is_expired(now_ms)))
    }

    /// Decides the claim `op` of `sk` from committed state when the decision writes nothing
    /// (replay, mismatch, in progress); `None` when it needs the writer. The state machine
    /// decides, exactly as the writer would at this moment.
    pub(crate) fn claim_without_write(&self, sk: &[u8], op: &Op) -> Result<Option<Claim>> {
        let Some(stored) = self.record(sk)? else {
            return Ok(None);
        };
        let step = transition::apply_to_owned(sk, stored, op, &self.shared.ctx());
        if step.write != Write::Keep {
            return Ok(None);
        }
        match step.reply? {
            Reply::Claim(claim) => Ok(Some(claim)),
            other => Err(Error::Internal(format!(
                "the state machine answered a claim with {other:?}"
            ))),
        }
    }

    /// In-flight records whose owner is gone, at most `limit`; records that fail their checks
    /// are skipped.
    pub(crate) fn orphans(&self, limit: usize) -> Result<Vec<Orphan>> {
        let _span = tracing::debug_span!("idemstore.orphans", limit).entered();
        let ctx = self.shared.ctx();
        let mut out = Vec::new();
        self.shared.storage.scan(&mut |key, stored| {
            if out.len() >= limit {
                return false;
            }
            let Ok(record) = stored else {
                return true;
            };
            let gone = matches!(record.state, RecordState::InFlight { .. })
                && !record.is_expired(ctx.now_ms)
                && transition::owner_is_gone(&record.state, &ctx);
            if let (true, Some((scope, key))) = (gone, split_scoped_key(key)) {
                out.push(Orphan {
                    scope: scope.to_vec(),
                    key: key.to_vec(),
                    record,
                });
            }
            out.len() < limit
        })?;
        Ok(out)
    }

    /// The number of records stored for `scope`.
    pub(crate) fn scope_records(&self, scope: &[u8]) -> Result<u64> {
        self.shared.storage.scope_records(scope)
    }

    pub(crate) fn stats(&self) -> Result<Stats> {
        use std::sync::atomic::Ordering::Relaxed;
        let counts = self.shared.storage.counts()?;
        let c = &self.shared.counters;
        Ok(Stats {
            records: counts.records,
            expiry_entries: counts.expiry_entries,
            epoch: self.shared.epoch,
            next_token: c.next_token.load(Relaxed),
            commits: c.commits.load(Relaxed),
            operations: c.operations.load(Relaxed),
            largest_batch: c.largest_batch.load(Relaxed),
            swept: c.swept.load(Relaxed),
            queue_depth: self.shared.queue.len(),
            queue_bytes: self.shared.queue.bytes(),
            waiting: self.shared.waiters.len(),
            poisoned: self.shared.is_poisoned(),
            wal: self.shared.storage.wal_figures(),
        })
    }
}

impl Store {
    pub(crate) fn reader(&self) -> Reader<'_> {
        Reader {
            shared: &self.shared,
        }
    }

    /// The live record of `(scope, key)`, or `None` if there is none or it has expired.
    ///
    /// # Errors
    /// Bad scope or key sizes; [`Error::Corrupt`] if the stored bytes fail their checks;
    /// [`Error::Io`].
    pub fn get(&self, scope: impl AsRef<[u8]>, key: impl AsRef<[u8]>) -> Result<Option<Record>> {
        self.limits.check_identity(scope.as_ref(), key.as_ref())?;
        self.reader()
            .live(&scoped_key(scope.as_ref(), key.as_ref()))
    }

    /// The async form of [`Store::get`]: the read runs on the store's reader threads, never
    /// on the executor's.
    ///
    /// # Errors
    /// As [`Store::get`].
    pub async fn get_async(
        &self,
        scope: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Record>> {
        self.limits.check_identity(scope.as_ref(), key.as_ref())?;
        let sk = scoped_key(scope.as_ref(), key.as_ref());
        let shared = std::sync::Arc::clone(&self.shared);
        self.read_pool
            .run(move || Reader { shared: &shared }.live(&sk))
            .await
    }

    /// The async form of [`Store::orphans`]: the scan runs on the store's reader threads.
    ///
    /// # Errors
    /// As [`Store::orphans`].
    pub async fn orphans_async(&self, limit: usize) -> Result<Vec<Orphan>> {
        let shared = std::sync::Arc::clone(&self.shared);
        self.read_pool
            .run(move || Reader { shared: &shared }.orphans(limit))
            .await
    }

    /// In-flight records whose owner is gone (lease ended, or granted by an earlier process
    /// epoch), at most `limit`, with their checkpoints: the requests that may have run partly
    /// or fully without being completed. Reconcile each (ask the downstream system), then
    /// `claim` it with its fingerprint, which takes it over at once, and `complete` or `fail`
    /// it.
    ///
    /// This scans the records table: run it at start-up or rarely, not per request. Records
    /// that fail their checks are skipped here; `get` reports them.
    ///
    /// # Errors
    /// [`Error::Io`] and other storage errors.
    pub fn orphans(&self, limit: usize) -> Result<Vec<Orphan>> {
        self.reader().orphans(limit)
    }

    /// How many records `scope` holds, counting expired ones not yet swept: the figure the
    /// per-scope quota ([`Limits::max_records_per_scope`](crate::Limits::max_records_per_scope))
    /// is checked against.
    ///
    /// # Errors
    /// A scope over its size limit; [`Error::Io`] and other storage errors.
    pub fn scope_records(&self, scope: impl AsRef<[u8]>) -> Result<u64> {
        let scope = scope.as_ref();
        self.limits.check_identity(scope, b"-")?;
        self.reader().scope_records(scope)
    }

    /// Counters and sizes.
    ///
    /// # Errors
    /// [`Error::Io`] and other storage errors while counting the tables.
    pub fn stats(&self) -> Result<Stats> {
        self.reader().stats()
    }
}
