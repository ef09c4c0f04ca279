//! Opening a store file for reading only: nothing is created, nothing is written, and no
//! process may open the file for writing while the view is open.
//!
//! redb opens a file read-only only if it was closed cleanly, and never verifies page checksums
//! on such an open. So the view opens the file the way a writer would, but on an [`Overlay`]
//! (every write redb makes, a repair included, stays in memory), with the page check on if
//! asked. The file locks redb takes for that open are taken *shared* on the real file: another
//! reader may open it beside the view, a writer (whose locks are exclusive) is refused, and the
//! view is refused while a writer holds the file.

use std::fs::File;
use std::io;
use std::ops::Bound;
use std::path::Path;

use redb::backends::FileBackend;
use redb::{BackendError, Database, ReadableDatabase, StorageBackend};

use super::overlay::Overlay;
use super::tables::{self, Adopted, WalMeta};
use crate::engine::storage::wal::{self, log::Geometry, log::Log, log_path};
use crate::error::{Error, Result};

/// The file as the [`Overlay`] shows it, with redb's locks taken shared on the real file.
#[derive(Debug)]
struct SharedLockView {
    view: Overlay,
    /// A read-only handle on the file, used only for its locks.
    locks: FileBackend,
}

impl StorageBackend for SharedLockView {
    fn len(&self) -> io::Result<u64> {
        self.view.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.view.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.view.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.view.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.view.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.locks.close()
    }

    // Exclusive requests are taken shared: the view writes nothing to the file, so it only
    // has to keep writers out, and may share the file with other readers.
    fn try_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<bool, BackendError> {
        self.locks.try_lock_shared_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<bool, BackendError> {
        self.locks.try_lock_shared_range(start, end)
    }

    fn lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<(), BackendError> {
        self.locks.lock_shared_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<(), BackendError> {
        self.locks.lock_shared_range(start, end)
    }

    fn unlock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<(), BackendError> {
        self.locks.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<bool, BackendError> {
        self.locks.query_lock_range(start, end)
    }
}

/// Opens the idemstore database in the file at `path` for reading only, verifying every page
/// checksum first if `verify_pages`. A missing file is an I/O error (`NotFound`) and is not
/// created; an empty file, a file that is not a redb database and a redb database without the
/// idemstore tables are [`Error::NotAnIdemstoreFile`]; a file open for writing in another
/// process is [`Error::AlreadyOpen`]. A format-2 store's log is replayed into the view (in
/// memory); a log damaged before acknowledged batches is [`Error::Corrupt`], as for a writer.
/// Returns the database, its meta values, and the number of log batches replayed.
pub(crate) fn open(path: &Path, verify_pages: bool) -> Result<(Database, Adopted, u64)> {
    let meta = std::fs::metadata(path)?;
    let refuse = |reason: &str| Error::NotAnIdemstoreFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    if meta.is_dir() {
        return Err(refuse("it is a directory"));
    }
    if meta.len() == 0 {
        return Err(refuse("it is empty"));
    }
    if !super::open::has_redb_magic(path)? {
        return Err(refuse("it does not start with a redb header"));
    }
    let backend = SharedLockView {
        view: Overlay::open(path)?,
        locks: FileBackend::new(File::open(path)?).map_err(Error::storage)?,
    };
    // redb's reads may panic on a file damaged outside redb (the page check catches that
    // damage first when it is on); nothing is written either way.
    let open = std::panic::AssertUnwindSafe(|| -> Result<(Database, Option<Adopted>, u64)> {
        let db = redb::Builder::new()
            .set_check_integrity_on_open(verify_pages)
            .create_with_backend(backend)
            .map_err(Error::storage)?;
        let adopted = tables::inspect(&db.begin_read().map_err(Error::storage)?, path)?;
        let (adopted, log_batches) = match adopted {
            Some(a) => match a.wal {
                Some(wal) => {
                    let (a, batches) = replay_log(&db, path, a, wal)?;
                    (Some(a), batches)
                }
                None => (Some(a), 0),
            },
            None => (None, 0),
        };
        Ok((db, adopted, log_batches))
    });
    let (db, adopted, log_batches) = std::panic::catch_unwind(open).unwrap_or_else(|_| {
        Err(Error::corrupt(
            "database file",
            "its structures are damaged (the storage engine panicked reading them)",
        ))
    })?;
    let adopted =
        adopted.ok_or_else(|| refuse("it is a redb database without idemstore tables"))?;
    Ok((db, adopted, log_batches))
}

/// Replays the write-ahead log of a format-2 store over the view's in-memory copy of the
/// database, as an open for writing would: what the last checkpoint did not cover is then in
/// the tables the view reads. The log file is read through an [`Overlay`] too, so the erasures
/// a recovery makes (of a torn tail) stay in memory. Returns the meta values with the next
/// token the log carried, and the number of batches replayed.
fn replay_log(
    db: &Database,
    path: &Path,
    adopted: Adopted,
    wal: WalMeta,
) -> Result<(Adopted, u64)> {
    let log = log_path(path);
    let file = match Overlay::open(&log) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(wal::missing_log(&log)),
        Err(e) => return Err(Error::from_io(e)),
    };
    let (_, recovered) = Log::recover(
        Box::new(file),
        Geometry::of(&wal),
        wal.store_id,
        wal.checkpoint_lsn,
    )?;
    // (The view's figures are counted from its tables after the replay, not from the layer.)
    let (layer, next_token) = wal::replay(&recovered, adopted.next_token, &|_, _| Ok(true))?;
    if !recovered.batches.is_empty() {
        let txn = db.begin_write().map_err(Error::storage)?;
        super::write_layer(&txn, &layer, layer.last_lsn)?;
        txn.commit().map_err(Error::storage)?;
    }
    let batches = u64::try_from(recovered.batches.len()).unwrap_or(u64::MAX);
    Ok((
        Adopted {
            next_token,
            ..adopted
        },
        batches,
    ))
}
