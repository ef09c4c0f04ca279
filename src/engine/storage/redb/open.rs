//! Opening a redb database for a store: on a file (created atomically, a foreign file refused
//! untouched), in memory, or on any `redb::StorageBackend`.

use std::fs;
use std::io;
use std::path::Path;

use redb::backends::InMemoryBackend;
use redb::{Database, ReadableDatabase};

use super::overlay::Overlay;
use super::tables;
use crate::error::{Error, Result};

/// The redb settings a store is opened with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    /// redb's page cache size in bytes; `None` for redb's own default.
    pub cache_size_bytes: Option<usize>,
    /// Verify every page checksum when opening.
    pub verify_on_open: bool,
    /// Commit with redb's two-phase commit.
    pub two_phase_commit: bool,
}

impl Options {
    fn builder(&self) -> redb::Builder {
        let mut builder = redb::Builder::new();
        if let Some(bytes) = self.cache_size_bytes {
            builder.set_cache_size(bytes);
        }
        builder.set_check_integrity_on_open(self.verify_on_open);
        builder
    }
}

/// A database in memory only.
pub(crate) fn in_memory(options: &Options) -> Result<Database> {
    options
        .builder()
        .create_with_backend(InMemoryBackend::new())
        .map_err(Error::storage)
}

/// A database on `backend`, which must be empty or hold an idemstore database.
pub(crate) fn with_backend(
    backend: impl redb::StorageBackend,
    options: &Options,
) -> Result<Database> {
    options
        .builder()
        .create_with_backend(backend)
        .map_err(Error::storage)
}

/// The database in the file at `path`, created if the file is missing or empty.
pub(crate) fn file(path: &Path, options: &Options) -> Result<Database> {
    let mut existing = file_len(path)?;
    if existing.is_none() {
        create_file(path)?;
        existing = file_len(path)?;
    }
    let existing_len = existing.unwrap_or(0);
    if existing_len > 0 && !has_redb_magic(path)? {
        return Err(Error::NotAnIdemstoreFile {
            path: path.to_path_buf(),
            reason: "it does not start with a redb header".into(),
        });
    }
    let builder = options.builder();
    if existing_len == 0 {
        return builder.create(path).map_err(Error::storage);
    }
    // A writable open marks the file's header (and repairs a file left unclean by a crash),
    // so a foreign database is inspected first and refused untouched: through a read-only
    // open, or, for a file that needs repair (which a read-only open cannot do), through a
    // view whose writes stay in memory (`Overlay`), where redb repairs it without touching the
    // file. redb never verifies checksums on a read-only open (`verify_on_open` applies to the
    // writable open below), and its reads may panic on a file damaged outside redb: such a
    // panic here means the file is corrupt, and nothing has been written to it yet.
    let inspect = || match builder.open_read_only(path) {
        Ok(ro) => {
            let read = ro.begin_read().map_err(Error::storage)?;
            tables::inspect(&read, path).map(|_| ())
        }
        Err(redb::DatabaseError::RepairAborted) => {
            let _span = tracing::info_span!("idemstore.inspect_unclean_file").entered();
            tracing::info!("the file was not closed cleanly: inspecting it before repairing it");
            let view = Overlay::open(path).map_err(Error::from_io)?;
            // The configured cache size, not redb's default (1 GiB): memory a repair touched
            // here tends to stay with the process after the view is dropped.
            let db = builder.create_with_backend(view).map_err(Error::storage)?;
            let read = db.begin_read().map_err(Error::storage)?;
            tables::inspect(&read, path).map(|_| ())
        }
        Err(e) => Err(Error::storage(e)),
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(inspect)).unwrap_or_else(|_| {
        Err(Error::corrupt(
            "database file",
            "its structures are damaged (the storage engine panicked reading them)",
        ))
    })?;
    builder.open(path).map_err(Error::storage)
}

/// The length of the file at `path`, `None` if there is none; a directory is refused.
fn file_len(path: &Path) -> Result<Option<u64>> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(Error::NotAnIdemstoreFile {
            path: path.to_path_buf(),
            reason: "it is a directory".into(),
        }),
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::from_io(e)),
    }
}

/// Creates a new database file at `path` so that a crash at any moment leaves either no file
/// there or a complete redb database. redb initialises a file in place and writes its magic
/// number last, so a process killed during that (two fsyncs) left a file without it, which
/// every later open refused as not a database. Here redb initialises a temporary file in the
/// same directory, which is then hard-linked into place (atomically, never replacing a file
/// another process created meanwhile) and the directory synced. A kill before the link leaves
/// only the temporary file (`.<name>.creating-<pid>-<nanos>`, never opened again). Where hard
/// links are unsupported, nothing is created here and the caller creates the file in place.
fn create_file(path: &Path) -> Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{}.creating-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let created = redb::Builder::new().create(&tmp).map_err(Error::storage);
    let linked = created.map(|db| {
        drop(db);
        // Fails if another process created the file first (then that one is opened) or if the
        // file system has no hard links (then the caller creates the file in place).
        fs::hard_link(&tmp, path).is_ok()
    });
    // The temporary name is ours alone; if it cannot be removed it stays as litter that no
    // open ever reads, which is no reason to fail the open.
    let _ = fs::remove_file(&tmp);
    if linked? {
        // Make the new directory entry durable before anything is acknowledged in the file.
        #[cfg(unix)]
        fs::File::open(dir).and_then(|d| d.sync_all())?;
    }
    Ok(())
}

pub(super) fn has_redb_magic(path: &Path) -> Result<bool> {
    use std::io::Read;
    const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
    let mut head = [0u8; 9];
    let mut file = fs::File::open(path)?;
    match file.read_exact(&mut head) {
        Ok(()) => Ok(head == REDB_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::from_io(e)),
    }
}
