//! The redb implementation of the storage seam: the tables and meta keys ([`tables`]), opening
//! a file safely ([`open`], with [`overlay`] to inspect a file that needs repair without
//! writing to it), and the batch that applies one commit ([`batch`]).
//!
//! Reads share one snapshot of the records table as of the latest commit, so that a read needs
//! no transaction of its own; [`Storage::write`] replaces it after each commit, before it
//! returns, so a read that starts after an acknowledgement sees the acknowledged state or a
//! newer one.

mod batch;
pub(crate) mod open;
mod overlay;
mod sweep;
pub(crate) mod tables;
pub(crate) mod view;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::engine::apply::scope_of;
use crate::engine::codec;
use crate::engine::storage::{Batch, Counts, Storage, Stored};
use crate::error::{Error, Result};

pub(crate) use open::Options;
use overlay::Overlay;
pub(crate) use sweep::SweepStart;
pub(crate) use tables::{Adopted, WalMeta};
use tables::{EXPIRY, META, META_NEXT_TOKEN, META_WAL_CHECKPOINT_LSN, RECORDS, SCOPES};

/// redb's page cache for the view [`RedbStorage::verify_pages`] opens: pages are read once,
/// so a small cache does, and keeps the check from growing the process.
const VERIFY_CACHE_BYTES: usize = 16 * 1024 * 1024;

use crate::engine::storage::wal::layer::Layer;

/// The records table of one committed state, readable from any thread.
type RecordsSnapshot = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

/// An idemstore database in redb.
pub(crate) struct RedbStorage {
    /// The records table as of the latest commit, shared by every reader. `None` (readers open
    /// their own transaction) until the first refresh and after a failed commit or refresh.
    /// Declared before `db` so that it is dropped first.
    snapshot: RwLock<Option<Arc<RecordsSnapshot>>>,
    db: Database,
    two_phase_commit: bool,
    /// The database file, for [`RedbStorage::verify_pages`] (`None`: memory, or a backend).
    file: Option<PathBuf>,
    /// Held (read) by every commit, and (write) while the pages of the file are verified, so
    /// that the file holds still meanwhile.
    quiesce: RwLock<()>,
    /// Whether a commit since the last durable one was not durable (a durable batch that
    /// changes nothing must still commit, to make it so).
    unsynced: AtomicBool,
}

impl RedbStorage {
    /// Adopts `db` as an idemstore database (initialising an empty one, refusing a foreign
    /// one, bumping the process epoch durably; with `upgrade`, moving it to format 2 with that
    /// write-ahead log) and serves it.
    pub(crate) fn adopt(
        db: Database,
        path: &Path,
        options: &Options,
        upgrade: Option<WalMeta>,
    ) -> Result<(Self, Adopted)> {
        let adopted = tables::adopt(&db, path, upgrade)?;
        let file = (path != Path::new(":memory:") && path != Path::new("<backend>"))
            .then(|| path.to_path_buf());
        let storage = RedbStorage {
            snapshot: RwLock::new(None),
            db,
            two_phase_commit: options.two_phase_commit,
            file,
            quiesce: RwLock::new(()),
            unsynced: AtomicBool::new(false),
        };
        storage.refresh_snapshot();
        Ok((storage, adopted))
    }

    /// Replaces the shared snapshot with the latest committed state; clears it if that cannot
    /// be read (readers then open their own transactions, and see the error themselves).
    fn refresh_snapshot(&self) {
        let open = std::panic::AssertUnwindSafe(|| {
            let read = self.db.begin_read().ok()?;
            read.open_table(RECORDS).ok().map(Arc::new)
        });
        let fresh = std::panic::catch_unwind(open).ok().flatten();
        *self.snapshot.write() = fresh;
    }

    fn read_txn(&self) -> Result<redb::ReadTransaction> {
        self.db.begin_read().map_err(Error::storage)
    }

    /// Writes `layer` into the tables in one durable transaction that also records `lsn` as
    /// the write-ahead log's checkpoint (and the layer's next token), then serves it to readers.
    pub(crate) fn checkpoint(&self, layer: &Layer, lsn: u64) -> Result<()> {
        let _quiet = self.quiesce.read();
        let mut txn = self.db.begin_write().map_err(Error::storage)?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(Error::storage)?;
        // Checkpoints are rare (about one a second), so each saves redb's allocator state and
        // commits in two phases: a crash then needs no walk of the whole file to repair it.
        txn.set_quick_repair(true);
        write_layer(&txn, layer, lsn)?;
        if let Err(e) = txn.commit() {
            self.release_reads();
            return Err(Error::CommitOutcomeUnknown {
                source: Box::new(Error::storage(e)),
            });
        }
        // Durable: so is every sweep committed before it.
        self.unsynced.store(false, Ordering::SeqCst);
        self.refresh_snapshot();
        Ok(())
    }

    /// Makes the sweeps committed since the last checkpoint durable, if there are any, in a
    /// durable commit that records `lsn` as the write-ahead log's checkpoint: when the store
    /// closes with nothing left to checkpoint, `lsn` is the last batch logged (the sweeps'
    /// own, whose removals redb holds), so that the next open replays nothing.
    pub(crate) fn sync_sweeps(&self, lsn: u64) -> Result<()> {
        if !self.unsynced.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _quiet = self.quiesce.read();
        let mut txn = self.db.begin_write().map_err(Error::storage)?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(Error::storage)?;
        {
            let mut meta = txn.open_table(META).map_err(Error::storage)?;
            if lsn > tables::meta_u64(&meta, META_WAL_CHECKPOINT_LSN)? {
                tables::put_u64(&mut meta, META_WAL_CHECKPOINT_LSN, lsn)?;
            }
        }
        if let Err(e) = txn.commit() {
            self.release_reads();
            return Err(Error::CommitOutcomeUnknown {
                source: Box::new(Error::storage(e)),
            });
        }
        self.unsynced.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Up to `limit` committed expiry-index entries due at `now_ms` and after `after` (if
    /// given), oldest first, leaving out those `skip` names.
    pub(crate) fn due_except(
        &self,
        now_ms: u64,
        after: Option<&(u64, Vec<u8>)>,
        limit: usize,
        skip: &dyn Fn(u64, &[u8]) -> bool,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        use std::ops::Bound;
        let read = self.read_txn()?;
        let expiry = read.open_table(EXPIRY).map_err(Error::storage)?;
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let upto = batch::due_range(now_ms).end;
        let lower = match after {
            Some((at, key)) => Bound::Excluded((*at, key.as_slice())),
            None => Bound::Unbounded,
        };
        for entry in expiry
            .range::<(u64, &[u8])>((lower, Bound::Excluded(upto)))
            .map_err(Error::storage)?
        {
            let (k, _) = entry.map_err(Error::storage)?;
            let (at, key) = k.value();
            if skip(at, key) {
                continue;
            }
            out.push((at, key.to_vec()));
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// Verifies the checksum of every page of the database file as it is on disk, with commits
    /// held off meanwhile: a second, read-only view of the file is opened (whatever redb writes
    /// while opening it stays in memory) and checked whole. Returns the bytes verified and the
    /// time it took, `None` for a store without a file; a damaged file is [`Error::Corrupt`].
    pub(crate) fn verify_pages(&self) -> Result<Option<(u64, Duration)>> {
        let Some(path) = &self.file else {
            return Ok(None);
        };
        let _quiet = self.quiesce.write();
        let started = Instant::now();
        let damaged = |reason: String| Error::corrupt("database file", reason);
        let check = || -> Result<u64> {
            let view = Overlay::open(path).map_err(Error::from_io)?;
            let bytes = redb::StorageBackend::len(&view).map_err(Error::from_io)?;
            let mut db = redb::Builder::new()
                .set_cache_size(VERIFY_CACHE_BYTES)
                .create_with_backend(view)
                .map_err(|e| damaged(format!("it cannot be opened for verification: {e}")))?;
            match db.check_integrity() {
                Ok(true) => Ok(bytes),
                Ok(false) => Err(damaged(
                    "a page checksum does not match (the latest commit is damaged)".into(),
                )),
                Err(e) => Err(damaged(format!("a page checksum does not match: {e}"))),
            }
        };
        let bytes =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)).unwrap_or_else(|_| {
                Err(damaged(
                    "its structures are damaged (the storage engine panicked reading them)".into(),
                ))
            })?;
        Ok(Some((bytes, started.elapsed())))
    }

    /// `with` applied to the envelope stored under `key` in the latest commit.
    pub(crate) fn read_with<T>(
        &self,
        key: &[u8],
        with: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>> {
        let snapshot = self.snapshot.read().clone();
        if let Some(table) = snapshot {
            let value = table.get(key).map_err(Error::storage)?;
            return Ok(value.map(|guard| with(guard.value())));
        }
        let read = self.read_txn()?;
        let table = read.open_table(RECORDS).map_err(Error::storage)?;
        let value = table.get(key).map_err(Error::storage)?;
        Ok(value.map(|guard| with(guard.value())))
    }

    /// Whether the latest commit's expiry index holds `(at, key)`.
    pub(crate) fn has_expiry_entry(&self, at: u64, key: &[u8]) -> Result<bool> {
        let read = self.read_txn()?;
        let expiry = read.open_table(EXPIRY).map_err(Error::storage)?;
        Ok(expiry.get((at, key)).map_err(Error::storage)?.is_some())
    }

    /// From one committed state: the write-ahead log's checkpoint LSN, the record count of
    /// each scope, and the number of expiry-index entries.
    pub(crate) fn committed_counts(
        &self,
    ) -> Result<(u64, std::collections::HashMap<Vec<u8>, u64>, u64)> {
        let read = self.read_txn()?;
        let meta = read.open_table(META).map_err(Error::storage)?;
        let checkpoint_lsn = tables::meta_u64(&meta, META_WAL_CHECKPOINT_LSN)?;
        let scopes = read.open_table(SCOPES).map_err(Error::storage)?;
        let mut counts = std::collections::HashMap::new();
        for entry in scopes.iter().map_err(Error::storage)? {
            let (scope, count) = entry.map_err(Error::storage)?;
            counts.insert(scope.value().to_vec(), count.value());
        }
        let expiry = read.open_table(EXPIRY).map_err(Error::storage)?;
        let expiry_entries = expiry.len().map_err(Error::storage)?;
        Ok((checkpoint_lsn, counts, expiry_entries))
    }
}

fn decoded(key: &[u8], bytes: &[u8]) -> Stored {
    codec::decode(key, bytes)
}

impl Storage for RedbStorage {
    fn verify_pages(&self) -> Result<Option<(u64, Duration)>> {
        RedbStorage::verify_pages(self)
    }

    fn read(&self, key: &[u8]) -> Result<Option<Stored>> {
        self.read_with(key, |bytes| decoded(key, bytes))
    }

    fn scan(&self, visit: &mut dyn FnMut(&[u8], Stored) -> bool) -> Result<()> {
        let read = self.read_txn()?;
        let table = read.open_table(RECORDS).map_err(Error::storage)?;
        for entry in table.iter().map_err(Error::storage)? {
            let (k, v) = entry.map_err(Error::storage)?;
            if !visit(k.value(), decoded(k.value(), v.value())) {
                break;
            }
        }
        Ok(())
    }

    fn scope_records(&self, scope: &[u8]) -> Result<u64> {
        let read = self.read_txn()?;
        let table = read.open_table(SCOPES).map_err(Error::storage)?;
        let count = table.get(scope).map_err(Error::storage)?;
        Ok(count.map_or(0, |g| g.value()))
    }

    fn counts(&self) -> Result<Counts> {
        let read = self.read_txn()?;
        let records = read.open_table(RECORDS).map_err(Error::storage)?;
        let expiry = read.open_table(EXPIRY).map_err(Error::storage)?;
        Ok(Counts {
            records: records.len().map_err(Error::storage)?,
            expiry_entries: expiry.len().map_err(Error::storage)?,
        })
    }

    fn write(
        &self,
        durable: bool,
        apply: &mut dyn FnMut(&mut dyn Batch) -> Result<()>,
    ) -> Result<bool> {
        let _quiet = self.quiesce.read();
        let mut txn = self.db.begin_write().map_err(Error::storage)?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })
        .map_err(Error::storage)?;
        txn.set_two_phase_commit(self.two_phase_commit);
        let (next_token, wrote) = {
            let mut batch = batch::RedbBatch::open(&txn)?;
            apply(&mut batch)?;
            (batch.next_token(), batch.wrote())
        };
        // A durable batch makes earlier relaxed commits durable, even if it writes nothing.
        let flushes = durable && self.unsynced.load(Ordering::SeqCst);
        if !(wrote || flushes) {
            // Nothing to write and nothing to make durable (a sweep with nothing due, say):
            // no commit, no sync.
            txn.abort().map_err(Error::storage)?;
            return Ok(false);
        }
        if let Some(token) = next_token {
            let mut meta = txn.open_table(META).map_err(Error::storage)?;
            tables::put_u64(&mut meta, META_NEXT_TOKEN, token)?;
        }
        if let Err(e) = txn.commit() {
            self.release_reads();
            return Err(Error::CommitOutcomeUnknown {
                source: Box::new(Error::storage(e)),
            });
        }
        self.unsynced.store(!durable, Ordering::SeqCst);
        // Readers must see this commit before any of its callers hears of it.
        self.refresh_snapshot();
        Ok(true)
    }

    fn release_reads(&self) {
        *self.snapshot.write() = None;
    }
}

/// Writes `layer` into the tables of `txn` and records `lsn` as the write-ahead log's
/// checkpoint (and the layer's next token): a checkpoint's changes, or, in a read-only view
/// of a format-2 store, the log's batches replayed over the view's in-memory copy.
///
/// Scope counts change by what each write finds: one more for a record stored where none was,
/// one less for a removal that found one. The layer's own counts are what the writer saw,
/// which a sweep committed into the file since (see [`sweep::BaseSweep`]) may have changed under it;
/// counted here, the file's counts always match its records.
pub(crate) fn write_layer(txn: &redb::WriteTransaction, layer: &Layer, lsn: u64) -> Result<()> {
    let mut records = txn.open_table(RECORDS).map_err(Error::storage)?;
    // In key order: consecutive changes then mostly touch pages the previous one
    // already brought into the transaction.
    let mut changes: Vec<_> = layer.records.iter().collect();
    changes.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut counted: HashMap<&[u8], i64> = HashMap::new();
    for (key, value) in changes {
        let (found, change) = match value {
            Some(bytes) => (
                records
                    .insert(key.as_slice(), &**bytes)
                    .map_err(Error::storage)?
                    .is_some(),
                1,
            ),
            None => (
                records
                    .remove(key.as_slice())
                    .map_err(Error::storage)?
                    .is_some(),
                -1,
            ),
        };
        // Stored where none was (+1), or removed where one was (-1).
        if found != (change > 0) {
            *counted.entry(scope_of(key)).or_default() += change;
        }
    }
    let mut expiry = txn.open_table(EXPIRY).map_err(Error::storage)?;
    let bulk = layer.swept_upto.as_ref();
    if let Some((upto_at, upto_key)) = bulk {
        // The sweep removed a prefix of the index: clear it in one pass over redb's
        // leaves instead of one tree descent per entry. Only entries this layer
        // removes go; anything else found there stays.
        let mut gone = layer
            .expiry
            .range(..=(*upto_at, upto_key.clone()))
            .filter(|(_, present)| !**present)
            .map(|((at, key), _)| (*at, key.as_slice()))
            .peekable();
        expiry
            .retain_in(..=(*upto_at, upto_key.as_slice()), |entry, ()| {
                while gone.next_if(|g| *g < entry).is_some() {}
                gone.next_if(|g| *g == entry).is_none()
            })
            .map_err(Error::storage)?;
    }
    for ((at, key), present) in &layer.expiry {
        if !*present && bulk.is_some_and(|(b_at, b_key)| (*at, key) <= (*b_at, b_key)) {
            continue;
        }
        let entry = (*at, key.as_slice());
        if *present {
            expiry.insert(entry, ()).map(|_| ())
        } else {
            expiry.remove(entry).map(|_| ())
        }
        .map_err(Error::storage)?;
    }
    let mut scopes = txn.open_table(SCOPES).map_err(Error::storage)?;
    for (scope, change) in counted {
        count_records(&mut scopes, scope, change)?;
    }
    let mut meta = txn.open_table(META).map_err(Error::storage)?;
    if let Some(token) = layer.next_token {
        tables::put_u64(&mut meta, META_NEXT_TOKEN, token)?;
    }
    tables::put_u64(&mut meta, META_WAL_CHECKPOINT_LSN, lsn)?;
    Ok(())
}

/// Adds `change` to the record count of `scope` (a count of 0 is not stored).
fn count_records(
    scopes: &mut redb::Table<&'static [u8], u64>,
    scope: &[u8],
    change: i64,
) -> Result<()> {
    if change == 0 {
        return Ok(());
    }
    let count = scopes
        .get(scope)
        .map_err(Error::storage)?
        .map_or(0, |g| g.value())
        .saturating_add_signed(change);
    if count == 0 {
        scopes.remove(scope).map_err(Error::storage)?;
    } else {
        scopes.insert(scope, count).map_err(Error::storage)?;
    }
    Ok(())
}
