//! [`Store::import`]: loading records exported from a store into another, in one commit.

use std::collections::BTreeMap;
use std::path::Path;

use crate::clock::{Clock, SystemClock};
use crate::core::record::{Record, RecordState, scoped_key};
use crate::engine::apply::scope_of;
use crate::engine::builder::looks_like_a_log;
use crate::engine::storage::redb::{RedbStorage, open};
use crate::engine::storage::wal::log_path;
use crate::engine::storage::{Batch, Storage};
use crate::engine::store::Store;
use crate::error::{Error, Input, Result};
use crate::limits::{CHECKPOINT_LEN_MAX, Limits, OUTCOME_LEN_MAX, RETENTION_MS_MAX};

/// What [`Store::import`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ImportReport {
    /// Records added.
    pub added: u64,
    /// Of those, in-flight records, added as orphans of an earlier epoch.
    pub in_flight: u64,
    /// Records not added because the store already held a live record under their key (the
    /// stored one is kept).
    pub existing: u64,
    /// Records not added because the store holds a record under their key whose bytes fail
    /// their checks (kept; `forget` the key to clear it).
    pub damaged: u64,
    /// Records not added because they had expired.
    pub expired: u64,
}

impl Record {
    /// Builds a record from its parts: for tools that read records back from an export, to
    /// hand them to [`Store::import`].
    ///
    /// ```
    /// use idemstore::{Record, RecordState};
    ///
    /// let state = RecordState::Completed { outcome: b"201 Created".to_vec() };
    /// let record = Record::from_parts(b"fp".to_vec(), 1_000, 2_000, 86_402_000, 1, state);
    /// assert_eq!(record.attempt, 1);
    /// ```
    #[must_use]
    pub fn from_parts(
        fingerprint: Vec<u8>,
        created_at_ms: u64,
        updated_at_ms: u64,
        expires_at_ms: u64,
        attempt: u32,
        state: RecordState,
    ) -> Record {
        Record {
            fingerprint,
            created_at_ms,
            updated_at_ms,
            expires_at_ms,
            attempt,
            state,
        }
    }
}

impl Store {
    /// Adds `records` (`(scope, key, record)`, as a [`ReadOnlyStore`](crate::ReadOnlyStore)
    /// scan gives them) to the store in the file at `path`, creating the file if it is
    /// missing, all in one durable commit: either every record is added or none is.
    ///
    /// - Each record keeps its fingerprint, timestamps, attempt count and outcome or
    ///   checkpoint byte for byte, so a completed record replays exactly as it did.
    /// - A record whose expiry has passed is not added ([`ImportReport::expired`]).
    /// - A key under which the store already holds a live record keeps the stored record
    ///   ([`ImportReport::existing`]): an import never overwrites an answer, and running the
    ///   same import twice adds nothing the second time. An expired stored record is replaced.
    /// - An in-flight record cannot keep its owner, which lives in another process or store.
    ///   It is added with epoch 0, earlier than every open's, so it is an orphan: the first
    ///   claim with its fingerprint takes it over, with its checkpoint. Its fencing token is
    ///   replaced by a new one of this store's, above every token this store has issued and
    ///   above the record's own, so no lease granted before the import, by either store,
    ///   can write to it.
    ///
    /// Opening the file starts a new process epoch, as every open does; the file must not be
    /// open elsewhere. A store with a write-ahead log (format 2) is first opened and closed as
    /// a [`Store`] would be: its log is replayed and checkpointed into the database file, so
    /// that records and tokens only the log held (after a crash, say) count as stored.
    ///
    /// `records` may fail: the first `Err` it yields ends the import with nothing added, and
    /// is returned as `Ok(Err(..))`.
    ///
    /// ```
    /// use idemstore::{Claim, ClaimOptions, ReadOnlyStore, Store};
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let (from, to) = (dir.path().join("from.redb"), dir.path().join("to.redb"));
    /// let store = Store::open(&from)?;
    /// if let Claim::Acquired(lease) = store.claim("s", "k", b"fp", &ClaimOptions::default())? {
    ///     store.complete(&lease, b"done", Duration::from_secs(60))?;
    /// }
    /// store.close()?;
    ///
    /// let mut records = Vec::new();
    /// ReadOnlyStore::open(&from)?.scan(None, |entry| {
    ///     records.push(entry.record.map(|r| (entry.scope, entry.key, r)));
    ///     true
    /// })?;
    /// let report = Store::import(&to, records)??;
    /// assert_eq!(report.added, 1);
    ///
    /// let store = Store::open(&to)?;
    /// match store.claim("s", "k", b"fp", &ClaimOptions::default())? {
    ///     Claim::Replay(replay) => assert_eq!(replay.outcome, b"done"),
    ///     other => panic!("expected a replay, got {other:?}"),
    /// }
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`StoreBuilder::open`](crate::StoreBuilder::open) for the file; a record over the
    /// hard caps ([`KEY_LEN_MAX`](crate::KEY_LEN_MAX), [`OUTCOME_LEN_MAX`](crate::OUTCOME_LEN_MAX)
    /// and the others, an expiry further away than
    /// [`RETENTION_MS_MAX`](crate::RETENTION_MS_MAX) included; nothing added); storage errors. The error of `records` itself is
    /// the inner `Err`.
    pub fn import<E>(
        path: impl AsRef<Path>,
        records: impl IntoIterator<Item = std::result::Result<(Vec<u8>, Vec<u8>, Record), E>>,
    ) -> Result<std::result::Result<ImportReport, E>> {
        let path = path.as_ref();
        // A store with a write-ahead log may hold batches its database file does not have yet:
        // an open replays them and a clean close checkpoints them, so that the import sees
        // every record and issues tokens above every token the log issued.
        if looks_like_a_log(&log_path(path)) {
            Store::builder().sweep_interval(None).open(path)?.close()?;
        }
        let options = open::Options {
            cache_size_bytes: None,
            verify_on_open: true,
            two_phase_commit: false,
        };
        let db = open::file(path, &options)?;
        let (storage, adopted) = RedbStorage::adopt(db, path, &options, None)?;
        let mut importer = Importer {
            // What some store may have accepted: the hard caps, not this build's defaults.
            limits: Limits::default()
                .max_outcome_len(OUTCOME_LEN_MAX)
                .max_checkpoint_len(CHECKPOINT_LEN_MAX),
            now_ms: SystemClock.now_ms(),
            next_token: adopted.next_token,
            scopes: BTreeMap::new(),
            report: ImportReport::default(),
        };
        let mut records = records.into_iter();
        let mut failed = None;
        let written = storage.write(true, &mut |batch| {
            for item in records.by_ref() {
                match item {
                    Ok((scope, key, record)) => importer.add(batch, &scope, &key, record)?,
                    Err(e) => {
                        failed = Some(e);
                        return Err(Error::Internal("the import's input failed".into()));
                    }
                }
            }
            for (scope, count) in &importer.scopes {
                batch.set_scope_records(scope, *count)?;
            }
            if importer.next_token != adopted.next_token {
                batch.set_next_token(importer.next_token)?;
            }
            Ok(())
        });
        if let Some(e) = failed {
            return Ok(Err(e));
        }
        written?;
        Ok(Ok(importer.report))
    }
}

/// The state of one import's commit.
struct Importer {
    limits: Limits,
    now_ms: u64,
    next_token: u64,
    /// Record counts of the scopes touched, as they will be stored.
    scopes: BTreeMap<Vec<u8>, u64>,
    report: ImportReport,
}

impl Importer {
    fn add(
        &mut self,
        batch: &mut dyn Batch,
        scope: &[u8],
        key: &[u8],
        mut record: Record,
    ) -> Result<()> {
        self.limits.check_identity(scope, key)?;
        self.limits.check_fingerprint(&record.fingerprint)?;
        match &record.state {
            RecordState::Completed { outcome } => self.limits.check_outcome(outcome)?,
            RecordState::InFlight { checkpoint, .. } | RecordState::Failed { checkpoint } => {
                if let Some(c) = checkpoint {
                    self.limits.check_checkpoint(c)?;
                }
            }
        }
        if record.is_expired(self.now_ms) {
            self.report.expired += 1;
            return Ok(());
        }
        // No store accepts a retention past the hard cap: such an expiry is not an export's.
        let retention_ms = record.expires_at_ms.saturating_sub(self.now_ms);
        if retention_ms > RETENTION_MS_MAX {
            return Err(Error::TooLarge {
                what: Input::Retention,
                actual: retention_ms,
                limit: RETENTION_MS_MAX,
            });
        }
        let sk = scoped_key(scope, key);
        let replaced = match batch.get(&sk)? {
            None => None,
            Some(Err(_)) => {
                self.report.damaged += 1;
                return Ok(());
            }
            Some(Ok(stored)) if !stored.is_expired(self.now_ms) => {
                self.report.existing += 1;
                return Ok(());
            }
            Some(Ok(stored)) => Some(stored.expires_at_ms),
        };
        if let RecordState::InFlight { token, epoch, .. } = &mut record.state {
            let fresh = self.next_token.max(token.saturating_add(1));
            self.next_token = fresh
                .checked_add(1)
                .ok_or_else(|| Error::corrupt("meta/next_token", "fencing tokens exhausted"))?;
            *token = fresh;
            *epoch = 0;
            self.report.in_flight += 1;
        }
        match replaced {
            Some(at_ms) => batch.unindex(at_ms, &sk)?,
            None => {
                let scope = scope_of(&sk).to_vec();
                let count = match self.scopes.get(&scope) {
                    Some(count) => *count,
                    None => batch.scope_records(&scope)?,
                };
                self.scopes.insert(scope, count.saturating_add(1));
            }
        }
        batch.index(record.expires_at_ms, &sk)?;
        batch.put(&sk, &record)?;
        self.report.added += 1;
        Ok(())
    }
}
