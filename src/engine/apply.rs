//! What the writer does to a storage batch, decided once for every storage implementation:
//! applying one state-machine step (the record, its expiry-index entry and its scope's count
//! kept in step), and the sweep algorithm.
//!
//! Invariants kept here, for every record stored under key `k`:
//! - exactly one expiry-index entry `(expires_at_ms, k)` (an entry whose record is gone or
//!   has another expiry is stale: the sweep drops it; `forget` of a record whose bytes fail
//!   their checks cannot know its expiry and leaves its entry stale);
//! - the record is counted once in its scope's count.

use std::collections::BTreeMap;

use crate::core::admin::Swept;
use crate::core::record::{Record, split_scoped_key};
use crate::core::transition::{self, Ctx, Op, Reply, Write};
use crate::engine::codec::DecodeError;
use crate::engine::storage::{Batch, Stored};
use crate::error::{Error, Result};

/// The scope of a scoped key (empty for a malformed key, which no caller can make).
pub(crate) fn scope_of(key: &[u8]) -> &[u8] {
    split_scoped_key(key).map_or(&[], |(scope, _)| scope)
}

/// The error reported for a record whose bytes fail their checks.
pub(crate) fn corrupt_record(key: &[u8], e: &DecodeError) -> Error {
    Error::corrupt(
        format!("records/{}", crate::core::record::display_key(key)),
        e.to_string(),
    )
}

/// The per-scope record counts of one batch: read from storage once per scope, changed in
/// memory, and written back once per scope when the batch ends ([`ScopeCounts::flush`]).
#[derive(Debug, Default)]
pub(crate) struct ScopeCounts {
    /// Per scope touched: its count, and whether this batch changed it.
    counts: BTreeMap<Vec<u8>, (u64, bool)>,
}

impl ScopeCounts {
    /// The number of records stored for the scope of `key`, this batch's changes included.
    fn get(&mut self, batch: &mut dyn Batch, key: &[u8]) -> Result<u64> {
        let scope = scope_of(key);
        if let Some((count, _)) = self.counts.get(scope) {
            return Ok(*count);
        }
        let count = batch.scope_records(scope)?;
        self.counts.insert(scope.to_vec(), (count, false));
        Ok(count)
    }

    /// One record more (`added`) or less in the scope of `key`.
    fn adjust(&mut self, batch: &mut dyn Batch, key: &[u8], added: bool) -> Result<()> {
        let count = self.get(batch, key)?;
        let count = if added {
            count.saturating_add(1)
        } else {
            count.saturating_sub(1)
        };
        self.counts.insert(scope_of(key).to_vec(), (count, true));
        Ok(())
    }

    /// Writes every changed count into the batch.
    pub(crate) fn flush(self, batch: &mut dyn Batch) -> Result<()> {
        for (scope, (count, changed)) in self.counts {
            if changed {
                batch.set_scope_records(&scope, count)?;
            }
        }
        Ok(())
    }
}

/// The writer's state while it applies one batch.
pub(crate) struct Apply<'b> {
    pub batch: &'b mut dyn Batch,
    pub scopes: ScopeCounts,
    /// The token the next acquisition receives; advanced as acquisitions are applied.
    pub next_token: u64,
    /// The per-scope quota, if any.
    pub quota: Option<u64>,
}

impl Apply<'_> {
    /// Applies one record operation at `ctx` (whose `next_token` and `scope_full` are filled
    /// in here). The outer `Result` is a storage failure (fatal to the batch); the inner one is
    /// the caller's answer. Also says whether the record changed.
    pub(crate) fn record(&mut self, key: &[u8], op: Op, ctx: Ctx) -> Result<(Result<Reply>, bool)> {
        let stored = match self.batch.get(key)? {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                // `forget` is the way out of a corrupt record; everything else reports it.
                if matches!(op, Op::Forget) {
                    self.batch.remove(key)?;
                    self.scopes.adjust(self.batch, key, false)?;
                    return Ok((Ok(Reply::Forgotten(true)), true));
                }
                return Ok((Err(corrupt_record(key, &e)), false));
            }
        };
        // Only a claim that would create a new stored record can exceed the quota; one that
        // reuses an expired record's slot does not add to the count.
        let scope_full = match (self.quota, &stored, &op) {
            (Some(limit), None, Op::Claim { .. }) => {
                (self.scopes.get(self.batch, key)? >= limit).then_some(limit)
            }
            _ => None,
        };
        let ctx = Ctx {
            next_token: self.next_token,
            scope_full,
            ..ctx
        };
        let step = transition::apply(key, stored.as_ref(), op, &ctx);
        if step.token_used {
            self.next_token = self
                .next_token
                .checked_add(1)
                .ok_or_else(|| Error::corrupt("meta/next_token", "fencing tokens exhausted"))?;
        }
        let wrote = step.write != Write::Keep;
        match step.write {
            Write::Keep => {}
            Write::Put(next) => self.put(key, stored.as_ref(), &next)?,
            Write::Delete => {
                if let Some(old) = &stored {
                    self.batch.unindex(old.expires_at_ms, key)?;
                }
                self.batch.remove(key)?;
                self.scopes.adjust(self.batch, key, false)?;
            }
        }
        Ok((step.reply, wrote))
    }

    fn put(&mut self, key: &[u8], old: Option<&Record>, next: &Record) -> Result<()> {
        let old_expiry = old.map(|r| r.expires_at_ms);
        if old_expiry != Some(next.expires_at_ms) {
            if let Some(at) = old_expiry {
                self.batch.unindex(at, key)?;
            }
            self.batch.index(next.expires_at_ms, key)?;
        }
        self.batch.put(key, next)?;
        if old.is_none() {
            self.scopes.adjust(self.batch, key, true)?;
        }
        Ok(())
    }

    /// Removes up to `limit` expiry-index entries that are due at `now_ms`, oldest first, with
    /// the records they name. A record goes if it is itself due, or if its bytes fail their
    /// checks: the index says its retention is over (each record has exactly one entry, for its
    /// current expiry), and a record nobody can read would otherwise hold its scope's quota
    /// forever. Such a removal is reported through `tracing`. A stale index entry (its record
    /// gone, or carrying another expiry) is dropped.
    pub(crate) fn sweep(&mut self, now_ms: u64, limit: usize) -> Result<Swept> {
        let _span = tracing::debug_span!("idemstore.sweep", limit).entered();
        // One entry past the limit says whether more are due, without a second walk.
        let mut due = self.batch.due(now_ms, limit.saturating_add(1))?;
        let more = due.len() > limit;
        due.truncate(limit);
        let mut removed = 0;
        for (at, key) in &due {
            self.batch.unindex(*at, key)?;
            let mut damage = None;
            let mut goes = |stored: &Stored| match stored {
                Ok(r) => r.expires_at_ms == *at && r.is_expired(now_ms),
                Err(e) => {
                    damage = Some(e.to_string());
                    true
                }
            };
            if self.batch.remove_if(key, &mut goes)? {
                self.scopes.adjust(self.batch, key, false)?;
                removed += 1;
            }
            if let Some(reason) = damage {
                tracing::warn!(
                    key = %crate::core::record::display_key(key),
                    expired_at_ms = at,
                    %reason,
                    "idemstore: swept a record that failed its checks; its retention was over"
                );
            }
        }
        Ok(Swept {
            visited: due.len(),
            removed,
            more,
        })
    }
}
