//! Offline compaction: gives a store's database file back the space its removed records left.
//!
//! The database file grows and never shrinks by itself: a checkpoint or a commit writes changed
//! pages to new places (copy-on-write) and frees the old ones only once it is durable, so a
//! commit that changes much of the tree (a large sweep most of all) makes the file grow, and
//! the space freed later stays inside it, reused by later writes. Compaction moves the pages in
//! use towards the start of the file and cuts the free end off.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::engine::store::Store;
use crate::error::{Error, Result};

/// What [`Store::compact`] did to a store's database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Compaction {
    /// The database file's length before, in bytes (after the store's own open and close).
    pub bytes_before: u64,
    /// The database file's length after, in bytes.
    pub bytes_after: u64,
    /// Whether the file was compacted: `false` if the compacted file would grow back to its
    /// length or beyond at the store's next write (see [`Store::compact`]). Its length can
    /// change either way: the store's own open and close (a new epoch, the log's checkpoint)
    /// come first, and the storage engine trims free pages at the end of the file when it
    /// commits and when it closes it.
    pub compacted: bool,
    /// Time taken, the store's open and close included.
    pub elapsed: Duration,
}

impl Compaction {
    /// Bytes given back to the file system.
    pub fn bytes_freed(&self) -> u64 {
        self.bytes_before.saturating_sub(self.bytes_after)
    }
}

impl Store {
    /// Compacts the database file of the store at `path`, which no process may have open:
    /// moves the pages in use to the start of the file and gives the free space after them
    /// back to the file system. Records, tokens and epochs are unchanged; a format-2 store's
    /// log stays as it is (nothing in it refers to where pages lie).
    ///
    /// The file grows when commits rewrite much of it (copy-on-write) and does not shrink by
    /// itself: after a sweep removed most of the records, most of the file can be free space.
    /// [`Summary::free_bytes`](crate::Summary::free_bytes) (from
    /// [`ReadOnlyStore::summary`](crate::ReadOnlyStore::summary), or `idemstore stats`) tells
    /// how much; `idemstore compact` runs this.
    ///
    /// A compacted file has no free page left, so the store's next write (its next open, which
    /// records a new process epoch, is one) makes redb grow it: to twice its length below 4
    /// GiB, else to the end of the next 4-GiB region. So a file is compacted only if it would
    /// stay shorter than it is even then (below 4 GiB: once more than half of it is free);
    /// otherwise it is left as it is and [`Compaction::compacted`] is `false`.
    ///
    /// The store is first opened and closed as [`Store::open`] would (recovering it after a
    /// crash, replaying and checkpointing its log), then compacted in a series of commits, each
    /// durable before the next begins: a crash or a kill at any moment leaves a store that opens
    /// with every record, at worst less compact. It takes about as long as reading and writing
    /// the pages in use once.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idemstore::{Claim, ClaimOptions, ManualClock, Store};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("store.redb");
    /// let clock = ManualClock::new(1_700_000_000_000);
    /// let store = Store::builder().clock(clock.clone()).open(&path)?;
    /// let options = ClaimOptions::default();
    /// for i in 0..2_000 {
    ///     let key = format!("order-{i}");
    ///     let Claim::Acquired(lease) = store.claim("payments", &key, b"fp", &options)? else {
    ///         unreachable!("a new key")
    ///     };
    ///     let retention = Duration::from_secs(if i == 0 { 86_400 } else { 60 });
    ///     store.complete(&lease, &[7u8; 2048], retention)?;
    /// }
    /// clock.advance(Duration::from_secs(120));
    /// while store.sweep(1_024)?.more {} // all but order-0 expired: removed
    /// store.close()?;
    ///
    /// let compaction = Store::compact(&path)?;
    /// assert!(compaction.compacted);
    /// assert!(compaction.bytes_after < compaction.bytes_before);
    ///
    /// let store = Store::builder().clock(clock).open(&path)?;
    /// assert!(store.get("payments", "order-0")?.is_some());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Io`] with [`std::io::ErrorKind::NotFound`] if there is no file at `path` (nothing
    /// is created); [`Error::NotAnIdemstoreFile`] for an empty file or one that is not a store
    /// (left untouched); [`Error::AlreadyOpen`] if a process has the store open; the errors of
    /// [`StoreBuilder::open`](crate::StoreBuilder::open) and [`Store::close`]; storage errors
    /// while compacting (the store then opens as it was, or partly compacted).
    pub fn compact(path: impl AsRef<Path>) -> Result<Compaction> {
        let path = path.as_ref();
        let _span = tracing::info_span!("idemstore.compact", path = %path.display()).entered();
        let began = Instant::now();
        // An open creates a store at a missing or empty path; compaction must not.
        if file_len(path)? == 0 {
            return Err(Error::NotAnIdemstoreFile {
                path: path.to_path_buf(),
                reason: "it is empty".into(),
            });
        }
        // The store's own open refuses a foreign file, recovers a crashed store and replays
        // its log; its close checkpoints everything, so the compaction below starts from a
        // cleanly closed file.
        Store::builder().sweep_interval(None).open(path)?.close()?;
        let bytes_before = file_len(path)?;
        let mut db = redb::Builder::new().open(path).map_err(Error::storage)?;
        let in_use = super::read_only::bytes_in_use(&db)?;
        let compacted = length_once_written(in_use) < bytes_before;
        if compacted {
            db.compact().map_err(Error::storage)?;
        }
        drop(db);
        let compaction = Compaction {
            bytes_before,
            bytes_after: file_len(path)?,
            compacted,
            elapsed: began.elapsed(),
        };
        tracing::info!(
            bytes_before = compaction.bytes_before,
            bytes_after = compaction.bytes_after,
            bytes_in_use = in_use,
            compacted,
            elapsed_ms = compaction.elapsed.as_millis() as u64,
            "idemstore: compaction of the database file"
        );
        Ok(compaction)
    }
}

/// Redb's region: a database file with no free page left grows by doubling below it, and by
/// filling its last region (and beginning the next) above it.
const REDB_REGION_BYTES: u64 = 4 << 30;

/// About how long a database file holding `in_use` bytes of pages and nothing free is once a
/// commit has made redb grow it.
fn length_once_written(in_use: u64) -> u64 {
    if in_use < REDB_REGION_BYTES {
        in_use.saturating_mul(2)
    } else {
        (in_use / REDB_REGION_BYTES + 1).saturating_mul(REDB_REGION_BYTES)
    }
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).map_err(Error::from_io)?.len())
}
