//! [`ReadOnlyStore`]: a store file opened for reading only.

use std::path::{Path, PathBuf};

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::clock::{Clock, SystemClock};
use crate::core::admin::Orphan;
use crate::core::record::{Record, RecordState, scoped_key, split_scoped_key};
use crate::core::transition::{Ctx, owner_is_gone};
use crate::engine::apply::corrupt_record;
use crate::engine::codec;
use crate::engine::storage::redb::tables::{Adopted, EXPIRY, RECORDS, SCOPES};
use crate::engine::storage::redb::view;
use crate::engine::storage::wal::log_path;
use crate::error::{Error, Result};
use crate::limits::Limits;

/// A store file opened for reading only, for inspection while no process has it open.
///
/// Opening creates nothing and writes nothing, not even to a file that a crash left unclean
/// (redb's repair of it stays in memory), and verifies the checksum of every page of the
/// database first, as [`StoreBuilder::verify_on_open`](crate::StoreBuilder::verify_on_open)
/// does. While it is open, no process can open the file for writing; several read-only opens
/// may share it.
///
/// No process has the file open for writing while it is open, so every live in-flight record
/// has lost its owner: all of them are [`orphans`](ReadOnlyStore::orphans).
///
/// A store with a write-ahead log (format 2) is read with its log (`<path>.wal`): the batches
/// its last checkpoint did not cover (after a crash, or while a process kills it mid-run) are
/// replayed into the view's memory, as the next open for writing would replay them, and
/// neither file is written. A log damaged before batches that were acknowledged is refused
/// with [`Error::Corrupt`], as the store refuses it; a torn unsynced tail is left out.
///
/// ```
/// use idemstore::{ClaimOptions, ReadOnlyStore, Store};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("idem.redb");
/// let store = Store::open(&path)?;
/// store.claim("tenant-1", "key-1", b"fingerprint", &ClaimOptions::default())?;
/// store.close()?;
///
/// let file = ReadOnlyStore::open(&path)?;
/// let summary = file.summary()?;
/// assert_eq!((summary.records, summary.in_flight), (1, 1));
/// assert_eq!(file.orphans(10)?.len(), 1);
/// drop(file);
///
/// // With a write-ahead log: records still in the log are read too.
/// let logged = dir.path().join("logged.redb");
/// let store = Store::builder().write_ahead_log(true).open(&logged)?;
/// store.claim("tenant-1", "key-2", b"fingerprint", &ClaimOptions::default())?;
/// store.close()?;
/// let summary = ReadOnlyStore::open(&logged)?.summary()?;
/// assert_eq!((summary.format_version, summary.in_flight), (2, 1));
/// # Ok::<(), idemstore::Error>(())
/// ```
pub struct ReadOnlyStore {
    db: Database,
    meta: Adopted,
    /// Batches of the write-ahead log replayed at open (format 2).
    log_batches: u64,
    path: PathBuf,
}

impl std::fmt::Debug for ReadOnlyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadOnlyStore")
            .field("path", &self.path)
            .field("epoch", &self.meta.epoch)
            .finish_non_exhaustive()
    }
}

/// Figures of a store file, from [`ReadOnlyStore::summary`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// The database format version: 1, or 2 for a store with a write-ahead log (see
    /// [`FORMAT_VERSION`](crate::FORMAT_VERSION)).
    pub format_version: u64,
    /// The process epoch of the last open for writing.
    pub epoch: u64,
    /// The fencing token the next acquisition will receive.
    pub next_token: u64,
    /// The size of the file in bytes.
    pub file_bytes: u64,
    /// Bytes of the file that no page in use takes, about: space that commits freed and later
    /// ones reuse, which [`Store::compact`](crate::Store::compact) gives back to the file
    /// system.
    pub free_bytes: u64,
    /// The size of the write-ahead log file (`<path>.wal`) in bytes; 0 for format 1.
    pub log_file_bytes: u64,
    /// Batches in the write-ahead log that the last checkpoint did not cover: the view replayed
    /// them over the database file's tables, as the next open for writing will (0 for format 1,
    /// and after a clean close).
    pub log_batches: u64,
    /// Records stored: live, expired but not yet swept, and damaged.
    pub records: u64,
    /// Entries of the expiry index.
    pub expiry_entries: u64,
    /// Scopes holding at least one stored record.
    pub scopes: u64,
    /// Live in-flight records; every one is an orphan (no process has the file open).
    pub in_flight: u64,
    /// Live completed records.
    pub completed: u64,
    /// Live records of retryable failures.
    pub failed: u64,
    /// Records past their expiry that no sweep has removed yet.
    pub expired: u64,
    /// Records whose bytes fail their checks.
    pub damaged: u64,
}

/// One live record found by [`ReadOnlyStore::scan`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Entry {
    /// The record's scope.
    pub scope: Vec<u8>,
    /// The record's key.
    pub key: Vec<u8>,
    /// The record, or [`Error::Corrupt`] if its bytes fail their checks.
    pub record: Result<Record>,
}

impl ReadOnlyStore {
    /// Opens the store in the file at `path` for reading only, after verifying the checksum of
    /// every page (this reads the whole file).
    ///
    /// # Errors
    /// [`Error::Io`] with [`std::io::ErrorKind::NotFound`] for a missing file (none is
    /// created); [`Error::NotAnIdemstoreFile`] for an empty file, a directory, or a file that
    /// is not an idemstore database (left untouched); [`Error::UnsupportedFormat`];
    /// [`Error::AlreadyOpen`] if a process has the file open for writing;
    /// [`Error::Corrupt`] if a page fails its checksum, or if a format-2 store's write-ahead
    /// log is missing or damaged before batches it acknowledged; other storage errors.
    pub fn open(path: impl AsRef<Path>) -> Result<ReadOnlyStore> {
        let path = path.as_ref();
        let (db, meta, log_batches) = view::open(path, true)?;
        Ok(ReadOnlyStore {
            db,
            meta,
            log_batches,
            path: path.to_path_buf(),
        })
    }

    /// The path the store was opened from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The process epoch of the last open for writing.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }

    /// The fencing token the next acquisition will receive.
    #[must_use]
    pub fn next_token(&self) -> u64 {
        self.meta.next_token
    }

    /// Bytes of the file taken by pages in use. The view's writes stay in memory, so the write
    /// transaction that reads them (aborted) leaves the file untouched.
    fn bytes_in_use(&self) -> Result<u64> {
        bytes_in_use(&self.db)
    }

    pub(super) fn read(&self) -> Result<ReadTransaction> {
        self.db.begin_read().map_err(Error::storage)
    }

    /// The context of a decision made now, as the next open for writing would make it: every
    /// in-flight record belongs to an earlier epoch.
    pub(super) fn ctx(&self) -> Ctx {
        Ctx::new(SystemClock.now_ms(), self.meta.epoch.saturating_add(1))
    }

    /// Counts the records by state. This reads every record.
    ///
    /// ```
    /// use idemstore::{Claim, ClaimOptions, ReadOnlyStore, Store};
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("idem.redb");
    /// let store = Store::open(&path)?;
    /// if let Claim::Acquired(lease) = store.claim("s", "k", b"fp", &ClaimOptions::default())? {
    ///     store.complete(&lease, b"done", Duration::from_secs(60))?;
    /// }
    /// store.close()?;
    ///
    /// let summary = ReadOnlyStore::open(&path)?.summary()?;
    /// assert_eq!((summary.completed, summary.in_flight, summary.damaged), (1, 0, 0));
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// Storage errors while reading the tables.
    pub fn summary(&self) -> Result<Summary> {
        let read = self.read()?;
        let records = read.open_table(RECORDS).map_err(Error::storage)?;
        let expiry = read.open_table(EXPIRY).map_err(Error::storage)?;
        let scopes = read.open_table(SCOPES).map_err(Error::storage)?;
        let ctx = self.ctx();
        let file_bytes = std::fs::metadata(&self.path)?.len();
        let mut summary = Summary {
            format_version: self.meta.format,
            epoch: self.meta.epoch,
            next_token: self.meta.next_token,
            file_bytes,
            free_bytes: file_bytes.saturating_sub(self.bytes_in_use()?),
            log_file_bytes: if self.meta.wal.is_some() {
                std::fs::metadata(log_path(&self.path))?.len()
            } else {
                0
            },
            log_batches: self.log_batches,
            records: records.len().map_err(Error::storage)?,
            expiry_entries: expiry.len().map_err(Error::storage)?,
            scopes: scopes.len().map_err(Error::storage)?,
            in_flight: 0,
            completed: 0,
            failed: 0,
            expired: 0,
            damaged: 0,
        };
        for entry in records.iter().map_err(Error::storage)? {
            let (k, v) = entry.map_err(Error::storage)?;
            let counter = match codec::decode(k.value(), v.value()) {
                Err(_) => &mut summary.damaged,
                Ok(r) if r.is_expired(ctx.now_ms) => &mut summary.expired,
                Ok(r) => match r.state {
                    RecordState::InFlight { .. } => &mut summary.in_flight,
                    RecordState::Completed { .. } => &mut summary.completed,
                    RecordState::Failed { .. } => &mut summary.failed,
                },
            };
            *counter += 1;
        }
        Ok(summary)
    }

    /// The live record of `(scope, key)`, or `None` if there is none or it has expired.
    ///
    /// ```
    /// use idemstore::{ClaimOptions, ReadOnlyStore, RecordState, Store};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("idem.redb");
    /// let store = Store::open(&path)?;
    /// store.claim("s", "k", b"fp", &ClaimOptions::default())?;
    /// store.close()?;
    ///
    /// let file = ReadOnlyStore::open(&path)?;
    /// let record = file.get("s", "k")?.expect("claimed above");
    /// assert!(matches!(record.state, RecordState::InFlight { .. }));
    /// assert_eq!(file.get("s", "other")?, None);
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// Bad scope or key sizes (as [`Store::get`](crate::Store::get)); [`Error::Corrupt`] if
    /// the stored bytes fail their checks; storage errors.
    pub fn get(&self, scope: impl AsRef<[u8]>, key: impl AsRef<[u8]>) -> Result<Option<Record>> {
        let (scope, key) = (scope.as_ref(), key.as_ref());
        Limits::default().check_identity(scope, key)?;
        let sk = scoped_key(scope, key);
        let read = self.read()?;
        let records = read.open_table(RECORDS).map_err(Error::storage)?;
        let Some(bytes) = records.get(sk.as_slice()).map_err(Error::storage)? else {
            return Ok(None);
        };
        let record = codec::decode(&sk, bytes.value()).map_err(|e| corrupt_record(&sk, &e))?;
        Ok((!record.is_expired(self.ctx().now_ms)).then_some(record))
    }

    /// Calls `visit` with each live record, in key order (scope by scope), until it returns
    /// `false`: all of them, or those of `scope` only. Expired records are skipped; records
    /// whose bytes fail their checks are passed with [`Error::Corrupt`].
    ///
    /// ```
    /// use idemstore::{ClaimOptions, ReadOnlyStore, Store};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("idem.redb");
    /// let store = Store::open(&path)?;
    /// for key in ["a", "b", "c"] {
    ///     store.claim("tenant-1", key, b"fp", &ClaimOptions::default())?;
    /// }
    /// store.claim("tenant-2", "a", b"fp", &ClaimOptions::default())?;
    /// store.close()?;
    ///
    /// let mut keys = Vec::new();
    /// ReadOnlyStore::open(&path)?.scan(Some(b"tenant-1"), |entry| {
    ///     keys.push(entry.key);
    ///     true
    /// })?;
    /// assert_eq!(keys, [b"a", b"b", b"c"]);
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// A scope over its size limit; storage errors.
    pub fn scan(&self, scope: Option<&[u8]>, mut visit: impl FnMut(Entry) -> bool) -> Result<()> {
        let prefix = match scope {
            Some(scope) => {
                Limits::default().check_identity(scope, b"-")?;
                scoped_key(scope, b"")
            }
            None => Vec::new(),
        };
        let now_ms = self.ctx().now_ms;
        let read = self.read()?;
        let records = read.open_table(RECORDS).map_err(Error::storage)?;
        for item in records.range(prefix.as_slice()..).map_err(Error::storage)? {
            let (k, v) = item.map_err(Error::storage)?;
            let sk = k.value();
            if !sk.starts_with(&prefix) {
                break;
            }
            let record = match codec::decode(sk, v.value()) {
                Ok(r) if r.is_expired(now_ms) => continue,
                Ok(r) => Ok(r),
                Err(e) => Err(corrupt_record(sk, &e)),
            };
            let (scope, key) = split_scoped_key(sk).unwrap_or((&[], sk));
            let entry = Entry {
                scope: scope.to_vec(),
                key: key.to_vec(),
                record,
            };
            if !visit(entry) {
                break;
            }
        }
        Ok(())
    }

    /// Live in-flight records, at most `limit`: with no process holding the file, each has
    /// lost its owner (the next open takes it over at the first claim with its fingerprint).
    /// As [`Store::orphans`](crate::Store::orphans), records that fail their checks are
    /// skipped.
    ///
    /// ```
    /// use idemstore::{ClaimOptions, ReadOnlyStore, Store};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("idem.redb");
    /// let store = Store::open(&path)?;
    /// let lease = match store.claim("s", "k", b"fp", &ClaimOptions::default())? {
    ///     idemstore::Claim::Acquired(lease) => lease,
    ///     other => panic!("a first claim acquires, got {other:?}"),
    /// };
    /// store.checkpoint(&lease, b"charged, not yet recorded")?;
    /// store.close()?; // the process "dies" before `complete`
    ///
    /// let orphans = ReadOnlyStore::open(&path)?.orphans(100)?;
    /// assert_eq!(orphans.len(), 1);
    /// assert_eq!(orphans[0].key, b"k");
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// Storage errors.
    pub fn orphans(&self, limit: usize) -> Result<Vec<Orphan>> {
        let ctx = self.ctx();
        let mut out = Vec::new();
        self.scan(None, |entry| {
            if out.len() >= limit {
                return false;
            }
            if let Ok(record) = entry.record
                && matches!(record.state, RecordState::InFlight { .. })
                && owner_is_gone(&record.state, &ctx)
            {
                out.push(Orphan {
                    scope: entry.scope,
                    key: entry.key,
                    record,
                });
            }
            out.len() < limit
        })?;
        Ok(out)
    }
}

/// Bytes of `db`'s file taken by pages in use, from redb's allocator, through a write
/// transaction that is aborted.
pub(super) fn bytes_in_use(db: &Database) -> Result<u64> {
    let txn = db.begin_write().map_err(Error::storage)?;
    let stats = txn.stats().map_err(Error::storage)?;
    txn.abort().map_err(Error::storage)?;
    Ok(stats
        .allocated_pages()
        .saturating_mul(stats.page_size() as u64))
}
