//! Configuring and opening a store: [`StoreBuilder`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::engine::durability::Durability;
use crate::engine::read_pool::ReadPool;
use crate::engine::shared::{LogRoom, Shared};
use crate::engine::storage::Storage;
use crate::engine::storage::redb::{RedbStorage, WalMeta, open, tables};
use crate::engine::storage::wal::log::{self as wal_log, Geometry};
use crate::engine::storage::wal::{WalConfig, WalStorage, log_path, missing_log};
use crate::engine::store::Store;
use crate::engine::sweeper::Sweeper;
use crate::engine::telemetry::Telemetry;
use crate::engine::waits::Timer;
use crate::engine::writer;
use crate::error::{Error, Input, Result};
use crate::limits::Limits;

/// Hard cap on the commit queue's capacity.
pub const QUEUE_CAPACITY_MAX: usize = 1 << 20;
/// Hard cap on the operations applied in one transaction.
pub const BATCH_OPS_MAX: usize = 1 << 16;
/// Hard cap on [`StoreBuilder::async_read_threads`].
pub const ASYNC_READ_THREADS_MAX: usize = 64;
/// Hard cap on the bytes the commit queue may hold ([`StoreBuilder::queue_capacity_bytes`]).
pub const QUEUE_BYTES_MAX: usize = 1 << 30;
/// Bounds of [`StoreBuilder::wal_segment_bytes`].
pub const WAL_SEGMENT_BYTES_MIN: u64 = 1 << 20;
/// Upper bound of [`StoreBuilder::wal_segment_bytes`].
pub const WAL_SEGMENT_BYTES_MAX: u64 = 1 << 30;
/// Upper bound of [`StoreBuilder::wal_segments`] (at least 2).
pub const WAL_SEGMENTS_MAX: u64 = 256;
/// Lower bound of [`StoreBuilder::map_budget`].
pub const MAP_BUDGET_MIN: usize = 64 * 1024;

/// Where a store's write-ahead log lives, if it may have one.
enum LogSource {
    /// None (a store in memory, or on a caller's backend without a log).
    None,
    /// The file beside the database file.
    File(PathBuf),
    /// A caller's backend (the simulated disks of the tests).
    #[cfg_attr(not(feature = "__testkit"), allow(dead_code))]
    Backend(Box<dyn redb::StorageBackend>),
}

/// Configures and opens a [`Store`]. Obtained from [`Store::builder`].
///
/// ```
/// use idemstore::{Durability, ManualClock, Store};
/// use std::time::Duration;
///
/// let store = Store::builder()
///     .clock(ManualClock::new(1_700_000_000_000))
///     .durability(Durability::Relaxed { max_unsynced: Duration::from_millis(50) })
///     .sweep_interval(None)
///     .open_in_memory()?;
/// # Ok::<(), idemstore::Error>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct StoreBuilder {
    durability: Durability,
    clock: Arc<dyn Clock>,
    limits: Limits,
    sweep_interval: Option<Duration>,
    sweep_batch: usize,
    two_phase_commit: bool,
    queue_capacity: usize,
    queue_capacity_bytes: usize,
    async_read_threads: usize,
    max_batch_ops: usize,
    cache_size_bytes: Option<usize>,
    /// `None`: on for a store without a write-ahead log, off for one with a log.
    verify_on_open: Option<bool>,
    write_ahead_log: bool,
    scrub_interval: Option<Duration>,
    read_cache_bytes: usize,
    checkpoint_interval: Duration,
    map_budget_bytes: usize,
    wal_segment_bytes: u64,
    wal_segments: u64,
    /// The `store` label of the store's metrics; `None`: from the path.
    metrics_label: Option<String>,
}

impl Default for StoreBuilder {
    fn default() -> Self {
        StoreBuilder {
            durability: Durability::Immediate,
            clock: Arc::new(SystemClock),
            limits: Limits::default(),
            sweep_interval: Some(Duration::from_secs(1)),
            sweep_batch: 1024,
            two_phase_commit: false,
            queue_capacity: 16 * 1024,
            queue_capacity_bytes: 64 * 1024 * 1024,
            async_read_threads: 2,
            max_batch_ops: 4096,
            cache_size_bytes: None,
            verify_on_open: None,
            write_ahead_log: false,
            scrub_interval: Some(Duration::from_secs(24 * 3600)),
            read_cache_bytes: 128 * 1024 * 1024,
            checkpoint_interval: Duration::from_secs(1),
            map_budget_bytes: 256 * 1024 * 1024,
            wal_segment_bytes: 32 * 1024 * 1024,
            wal_segments: 4,
            metrics_label: None,
        }
    }
}

impl StoreBuilder {
    /// When acknowledged writes are on disk. Default: [`Durability::Immediate`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The clock for timestamps, leases and expiry. Default: [`SystemClock`].
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The input limits. Default: [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How often the background sweeper looks for expired records; `None` runs no sweeper
    /// (call [`Store::sweep`] yourself). Default: every second. Zero is refused at open
    /// ([`Error::TooSmall`]): the sweeper would spin on an idle store.
    pub fn sweep_interval(mut self, interval: Option<Duration>) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// How many expiry-index entries one sweep commit visits at most. Default: 1024.
    pub fn sweep_batch(mut self, entries: usize) -> Self {
        self.sweep_batch = entries;
        self
    }

    /// Commit with redb's two-phase commit: two fsyncs per commit instead of one. redb
    /// recommends it when an attacker controls much of what is written (keys and outcomes here
    /// are client-controlled) and may also crash the machine at will: with one-phase commit a
    /// crafted payload could in theory make a torn commit pass its checksum. Default: off.
    pub fn two_phase_commit(mut self, enabled: bool) -> Self {
        self.two_phase_commit = enabled;
        self
    }

    /// Capacity of the commit queue; a full queue blocks callers (back-pressure).
    /// Default: 16384, at most [`QUEUE_CAPACITY_MAX`].
    pub fn queue_capacity(mut self, operations: usize) -> Self {
        self.queue_capacity = operations;
        self
    }

    /// The most bytes the commit queue holds: the keys, fingerprints, outcomes and checkpoints
    /// of its operations, plus 128 bytes each. A caller whose operation would pass it waits
    /// (back-pressure), so memory stays bounded however large the outcomes; an empty queue
    /// takes any one operation. The batch the writer is applying comes on top of this.
    /// Default: 64 MiB, at most [`QUEUE_BYTES_MAX`].
    pub fn queue_capacity_bytes(mut self, bytes: usize) -> Self {
        self.queue_capacity_bytes = bytes;
        self
    }

    /// How many threads run the reads of async calls (`claim_async`'s answer from committed
    /// state, which may read the file), so that they never block an executor thread.
    /// Default: 2, at most [`ASYNC_READ_THREADS_MAX`].
    pub fn async_read_threads(mut self, threads: usize) -> Self {
        self.async_read_threads = threads;
        self
    }

    /// The most operations applied in one transaction. Default: 4096, at most
    /// [`BATCH_OPS_MAX`].
    pub fn max_batch_ops(mut self, operations: usize) -> Self {
        self.max_batch_ops = operations;
        self
    }

    /// redb's page cache size in bytes. Default: redb's own.
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size_bytes = Some(bytes);
        self
    }

    /// Verify the checksum of every page on open, so that a file altered outside idemstore
    /// (bit rot, a bad sector, a partial restore) fails with [`Error::Corrupt`] instead of
    /// being trusted. This reads the whole file: on the benchmark machine (BENCHMARKS.md), a
    /// store of 1M records (1.1 GB) opens in 1.3 s and one of 10M records (10.7 GB) in 27 s,
    /// from a warm page cache.
    ///
    /// Default: on for a store without a write-ahead log; off for a store with one
    /// ([`write_ahead_log`](Self::write_ahead_log)), which opens in milliseconds whatever its
    /// size and has its pages verified instead in the background
    /// ([`scrub_interval`](Self::scrub_interval)) and on demand ([`Store::verify_pages`]).
    ///
    /// Turning it off makes opening a large file instant, at a price: redb then trusts a file
    /// that was closed cleanly, and on one damaged since, opens and reads may panic, and a
    /// damaged page of its trees may hide a record (a completed request would then run again).
    /// In optimised builds some damage even makes redb panic a second time while unwinding,
    /// which aborts the process. Record envelopes stay checked either way.
    /// tests/corruption.rs measures both modes.
    pub fn verify_on_open(mut self, enabled: bool) -> Self {
        self.verify_on_open = Some(enabled);
        self
    }

    /// With a write-ahead log: how often the checkpointer verifies the checksum of every page
    /// of the database file in the background (the scrub), as [`Store::verify_pages`] does;
    /// the first scrub comes one interval after open. A damaged file is logged as an error
    /// (`tracing`) and counted in [`WalStats::scrubs_failed`](crate::WalStats::scrubs_failed);
    /// the store keeps serving (record envelopes are still checked on every read).
    ///
    /// A scrub reads the whole file (about 1.3 s per GB on the benchmark machine) and no
    /// checkpoint runs meanwhile: commits go on into the record map, and wait if it fills its
    /// [`map_budget`](Self::map_budget) first. `None` turns the scrub off. Without a log
    /// there is no scrub ([`verify_on_open`](Self::verify_on_open) checks instead).
    /// Default: every 24 hours.
    pub fn scrub_interval(mut self, interval: Option<Duration>) -> Self {
        self.scrub_interval = interval;
        self
    }

    /// Puts a write-ahead log in front of the database file (format 2): each commit is one
    /// append and one `fdatasync` of a preallocated log file instead of a redb transaction
    /// (about 8 scattered page writes and a sync), and a checkpointer thread writes the changes
    /// into the database file in the background, in one transaction per
    /// [`checkpoint_interval`](Self::checkpoint_interval). Recently written records are served
    /// from memory until then.
    ///
    /// The log is the file `<path>.wal` beside the database (preallocated: `wal_segments` ×
    /// `wal_segment_bytes`, 128 MiB by default). Acknowledgements keep their meaning:
    /// [`Durability::Immediate`] acknowledges after the log's sync. Opening a store with a
    /// log replays what the last checkpoint did not cover; a log damaged before batches that
    /// were acknowledged is refused with [`Error::Corrupt`] rather than truncated.
    ///
    /// Turning it on for an existing format-1 store upgrades it to format 2, which builds that
    /// know only format 1 refuse; a format-2 store always opens with its log, whatever this
    /// setting. [`ReadOnlyStore`](crate::ReadOnlyStore) (and the `idemstore` tool's read-only
    /// commands) replay the log into memory when they open such a store, and write to neither
    /// file. Default: off.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// use idemstore::{Claim, ClaimOptions, Store};
    /// use std::time::Duration;
    ///
    /// let path = dir.path().join("idempotency.redb");
    /// let store = Store::builder().write_ahead_log(true).open(&path)?;
    /// let Claim::Acquired(lease) = store.claim("payments", "order-1", "fp", &ClaimOptions::default())?
    /// else {
    ///     unreachable!("a new key")
    /// };
    /// store.complete(&lease, b"201 Created", Duration::from_secs(86_400))?;
    /// assert!(store.stats()?.wal.is_some());
    /// store.close()?;
    ///
    /// let store = Store::open(&path)?; // format 2: opens with its log
    /// assert!(path.with_extension("redb.wal").exists());
    /// assert!(store.get("payments", "order-1")?.is_some());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_ahead_log(mut self, enabled: bool) -> Self {
        self.write_ahead_log = enabled;
        self
    }

    /// With a write-ahead log: the longest time a change waits in memory before a checkpoint
    /// writes it into the database file (zero: a checkpoint after every commit, for tests).
    /// Longer intervals batch more writes per checkpoint and make the log longer to replay
    /// after a crash. Default: 1 s.
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// With a write-ahead log: the memory the records not yet checkpointed may take (plus one
    /// commit's worth). A checkpoint starts when the changes since the last one reach half of
    /// it; if they reach half again while that checkpoint runs, commits wait for it
    /// (back-pressure). At least [`MAP_BUDGET_MIN`]. Default: 256 MiB.
    pub fn map_budget(mut self, bytes: usize) -> Self {
        self.map_budget_bytes = bytes;
        self
    }

    /// With a write-ahead log: the memory budget of the read cache, which keeps the records
    /// a checkpoint wrote into the database file or a read found there, so that replays of
    /// recently completed or recently read keys are answered from memory (in addition to the
    /// record map's [`map_budget`](Self::map_budget)). Reads of callers fill it; what a sweep
    /// or a write reads on its way to removing or changing a record does not. Evicts in
    /// insertion order. 0 turns it off. At most 1 TiB. Default: 128 MiB.
    pub fn read_cache(mut self, bytes: usize) -> Self {
        self.read_cache_bytes = bytes;
        self
    }

    /// With a write-ahead log: the size of each log segment, used when the log is created
    /// (an existing log keeps its geometry). Between [`WAL_SEGMENT_BYTES_MIN`] and
    /// [`WAL_SEGMENT_BYTES_MAX`], a multiple of 512. Default: 32 MiB.
    pub fn wal_segment_bytes(mut self, bytes: u64) -> Self {
        self.wal_segment_bytes = bytes;
        self
    }

    /// With a write-ahead log: the number of log segments, used when the log is created.
    /// Segments are recycled once a checkpoint covers them; when none is free, commits wait
    /// for a checkpoint. Between 2 and [`WAL_SEGMENTS_MAX`]. Default: 4.
    ///
    /// One commit never holds more than all segments but one can take, so the log's size
    /// also bounds a single record: an outcome or checkpoint longer than
    /// `(wal_segments - 1) × wal_segment_bytes`, less the log's framing (about 1.5 KiB per
    /// segment) and room for the rest of the record (four scoped keys and about 600 bytes),
    /// is refused with [`Error::TooLarge`] before anything is written. With the default
    /// 4 × 32 MiB that is beyond every limit [`Limits`] allows; two segments of 1 MiB hold
    /// outcomes up to about 1,040,000 bytes under the default limits (whose outcome limit is
    /// 1 MiB).
    ///
    /// A claim taking a record over, `fail` and `extend` keep the record's stored checkpoint,
    /// which may be longer than today's limit (stored under larger limits, or by
    /// [`Store::import`](crate::Store::import)): the writer counts each as if it kept the
    /// longest checkpoint there is ([`CHECKPOINT_LEN_MAX`](crate::CHECKPOINT_LEN_MAX)), so a
    /// small log commits few of them at a time, and one whose record no batch can hold is
    /// refused with [`Error::TooLarge`] for [`Input::Record`](crate::Input::Record), the
    /// store going on.
    pub fn wal_segments(mut self, segments: u64) -> Self {
        self.wal_segments = segments;
        self
    }

    /// The value of the `store` label that each of the store's metrics carries (feature
    /// `metrics`; see the crate docs, "Metrics"), so that the stores of one process report
    /// apart. Default: the path given to [`StoreBuilder::open`] (`memory` for
    /// [`StoreBuilder::open_in_memory`], `backend` for [`StoreBuilder::open_with_backend`]).
    /// Without the feature, nothing reads it.
    ///
    /// ```
    /// use idemstore::Store;
    ///
    /// // Reported as idemstore_claims_total{store="payments",answer="acquired"}, ...
    /// let store = Store::builder().metrics_label("payments").open_in_memory()?;
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    pub fn metrics_label(mut self, label: impl Into<String>) -> Self {
        self.metrics_label = Some(label.into());
        self
    }

    /// Opens the database at `path`, creating it if the file is missing or empty.
    ///
    /// Each open starts a new process epoch: in-flight records of earlier epochs have dead
    /// owners and can be taken over at once.
    ///
    /// # Errors
    /// [`Error::NotAnIdemstoreFile`] for a file that is not an idemstore database (left
    /// untouched), [`Error::UnsupportedFormat`], [`Error::AlreadyOpen`] if another store holds
    /// the file, [`Error::Corrupt`], [`Error::Io`], and [`Error::TooLarge`]/[`Error::TooSmall`]
    /// with [`Input::Config`] for a configuration outside its hard caps.
    pub fn open(self, path: impl AsRef<Path>) -> Result<Store> {
        self.validate()?;
        let path = path.as_ref();
        let _span = tracing::info_span!("idemstore.open", path = %path.display()).entered();
        let log = log_path(path);
        let db_is_new = match std::fs::metadata(path) {
            Ok(m) => m.is_file() && m.len() == 0,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            // Unreadable (permissions, say): the open below reports it, naming the file.
            Err(_) => false,
        };
        if db_is_new && may_hold_batches(&log).map_err(|e| e.at_path(&log))? {
            return Err(Error::corrupt(
                "database file",
                format!(
                    "{} is missing or empty while its write-ahead log {} holds batches: the \
                     store's checkpointed records would be lost. Restore the database file, or \
                     move the log away to start an empty store",
                    path.display(),
                    log.display()
                ),
            ));
        }
        let has_log = self.write_ahead_log || looks_like_a_log(&log);
        let db = open::file(path, &self.redb_options(has_log)).map_err(|e| e.at_path(path))?;
        self.start(db, path, LogSource::File(log))
    }

    /// Opens a store that lives in memory only (redb's in-memory backend): for tests and
    /// caches. Everything is lost when it is dropped.
    ///
    /// # Errors
    /// As [`StoreBuilder::open`], for the configuration.
    pub fn open_in_memory(self) -> Result<Store> {
        self.validate()?;
        let db = open::in_memory(&self.redb_options(false))?;
        self.start(db, Path::new(":memory:"), LogSource::None)
    }

    /// Opens a store on any redb [`StorageBackend`](redb::StorageBackend): a custom file
    /// layer, or a fault-injecting wrapper in tests. The backend must be empty or hold an
    /// idemstore database.
    ///
    /// # Errors
    /// As [`StoreBuilder::open`].
    pub fn open_with_backend(self, backend: impl redb::StorageBackend) -> Result<Store> {
        self.validate()?;
        let db = open::with_backend(backend, &self.redb_options(false))?;
        self.start(db, Path::new("<backend>"), LogSource::None)
    }

    /// Opens a store on `backend` with its write-ahead log on `log` (an empty `log` is
    /// preallocated): the simulated disks of the tests.
    #[cfg(feature = "__testkit")]
    #[doc(hidden)]
    pub fn open_with_backends(
        self,
        backend: impl redb::StorageBackend,
        log: impl redb::StorageBackend,
    ) -> Result<Store> {
        self.validate()?;
        let db = open::with_backend(backend, &self.redb_options(true))?;
        self.start(
            db,
            Path::new("<backend>"),
            LogSource::Backend(Box::new(log)),
        )
    }

    fn validate(&self) -> Result<()> {
        self.limits.validate()?;
        let checks = [
            ("queue_capacity", self.queue_capacity, QUEUE_CAPACITY_MAX),
            (
                "queue_capacity_bytes",
                self.queue_capacity_bytes,
                QUEUE_BYTES_MAX,
            ),
            ("max_batch_ops", self.max_batch_ops, BATCH_OPS_MAX),
            ("sweep_batch", self.sweep_batch, BATCH_OPS_MAX),
            (
                "async_read_threads",
                self.async_read_threads,
                ASYNC_READ_THREADS_MAX,
            ),
        ];
        let wal_checks = [
            (
                "wal_segment_bytes",
                self.wal_segment_bytes,
                WAL_SEGMENT_BYTES_MIN,
                WAL_SEGMENT_BYTES_MAX,
            ),
            ("wal_segments", self.wal_segments, 2, WAL_SEGMENTS_MAX),
            (
                "map_budget",
                self.map_budget_bytes as u64,
                MAP_BUDGET_MIN as u64,
                1 << 40,
            ),
        ];
        for (name, value, min, max) in wal_checks {
            if value > max {
                return Err(Error::TooLarge {
                    what: Input::Config(name),
                    actual: value,
                    limit: max,
                });
            }
            if value < min {
                return Err(Error::TooSmall {
                    what: Input::Config(name),
                    actual: value,
                    limit: min,
                });
            }
        }
        if self.read_cache_bytes as u64 > 1 << 40 {
            return Err(Error::TooLarge {
                what: Input::Config("read_cache"),
                actual: self.read_cache_bytes as u64,
                limit: 1 << 40,
            });
        }
        if !self.wal_segment_bytes.is_multiple_of(wal_log::SECTOR) {
            return Err(Error::TooSmall {
                what: Input::Config("wal_segment_bytes (a multiple of 512)"),
                actual: self.wal_segment_bytes,
                limit: self.wal_segment_bytes.div_ceil(wal_log::SECTOR) * wal_log::SECTOR,
            });
        }
        for (name, value, max) in checks {
            if value > max {
                return Err(Error::TooLarge {
                    what: Input::Config(name),
                    actual: value as u64,
                    limit: max as u64,
                });
            }
            if value == 0 {
                return Err(Error::TooSmall {
                    what: Input::Config(name),
                    actual: 0,
                    limit: 1,
                });
            }
        }
        if self.sweep_interval == Some(Duration::ZERO) {
            // A sweeper that never waits spins on an idle store.
            return Err(Error::TooSmall {
                what: Input::Config("sweep_interval (ms)"),
                actual: 0,
                limit: 1,
            });
        }
        Ok(())
    }

    /// The `store` label of the metrics of a store opened at `path`: the one given, else the
    /// path as given (`memory` in memory, `backend` on a caller's backend).
    fn label_for(&self, path: &Path) -> String {
        if let Some(label) = &self.metrics_label {
            return label.clone();
        }
        match path.to_str() {
            Some(":memory:") => "memory".into(),
            Some("<backend>") => "backend".into(),
            _ => path.display().to_string(),
        }
    }

    /// redb's settings. `has_log`: the store has (or gets) a write-ahead log, which decides
    /// the default of [`verify_on_open`](Self::verify_on_open) before the file's format is
    /// read.
    fn redb_options(&self, has_log: bool) -> open::Options {
        open::Options {
            cache_size_bytes: self.cache_size_bytes,
            verify_on_open: self.verify_on_open.unwrap_or(!has_log),
            two_phase_commit: self.two_phase_commit,
        }
    }

    /// Adopts the opened database (behind its write-ahead log, if it has or gets one) and
    /// starts the writer and the sweeper.
    fn start(self, db: redb::Database, path: &Path, log: LogSource) -> Result<Store> {
        let telemetry = Telemetry::new(&self.label_for(path));
        let (storage, epoch, next_token) = self.storage(db, path, log, &telemetry)?;
        let log_room = storage
            .batch_bytes_max()
            .map(|bytes| LogRoom::new(bytes, &self.limits));
        let shared = Arc::new(Shared::new(
            storage,
            self.clock,
            epoch,
            next_token,
            self.durability,
            self.queue_capacity,
            self.queue_capacity_bytes,
            self.limits.records_per_scope(),
            self.max_batch_ops,
            log_room,
            telemetry,
        ));
        // Threads that can fail to start come before the writer, which must not be left
        // running without a store to stop it.
        let timer = Timer::start()?;
        let read_pool = ReadPool::start(self.async_read_threads)?;
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("idemstore-writer".into())
            .spawn(move || writer::run(&writer_shared))
            .map_err(Error::from_io)?;
        // From here on the writer runs: the store must be built (and dropped on error) so that
        // the writer is stopped and joined.
        shared.telemetry.opened();
        let mut store = Store::from_parts(shared, self.limits, writer, timer, read_pool);
        if path == Path::new(":memory:") {
            store.kind = "memory";
        }
        if let Some(interval) = self.sweep_interval {
            let sweeper = Sweeper::start(Arc::clone(&store.shared), interval, self.sweep_batch)?;
            store.sweeper = Some(sweeper);
        }
        Ok(store)
    }

    /// The storage for `db`: redb alone (format 1), or behind its write-ahead log (format 2,
    /// created here on an upgrade). Returns it with the process epoch and the next token.
    fn storage(
        &self,
        db: redb::Database,
        path: &Path,
        log: LogSource,
        telemetry: &Telemetry,
    ) -> Result<(Box<dyn Storage>, u64, u64)> {
        let options = self.redb_options(self.write_ahead_log);
        // I/O errors of the files name them; a store in memory or on a backend has no name.
        let log_file = match &log {
            LogSource::File(log) => Some(log.clone()),
            _ => None,
        };
        let on_file = |file: &Path| {
            let named = log_file.is_some().then(|| file.to_path_buf());
            move |e: Error| match &named {
                Some(file) => e.at_path(file),
                None => e,
            }
        };
        let existing = tables::existing(&db, path).map_err(on_file(path))?;
        let has_log = existing.and_then(|a| a.wal);
        if !self.write_ahead_log && has_log.is_none() || matches!(log, LogSource::None) {
            if has_log.is_some() {
                // The log holds batches the database file may lack.
                return Err(Error::UnsupportedFormat {
                    found: tables::FORMAT_VERSION,
                    supported: tables::FORMAT_REDB_ONLY,
                });
            }
            let (storage, adopted) =
                RedbStorage::adopt(db, path, &options, None).map_err(on_file(path))?;
            return Ok((Box::new(storage), adopted.epoch, adopted.next_token));
        }
        let (file, upgrade): (Box<dyn redb::StorageBackend>, Option<WalMeta>) = match has_log {
            Some(_) => (open_log(log)?, None),
            None => {
                let meta = WalMeta {
                    store_id: wal_log::seed() | 1,
                    segment_bytes: self.wal_segment_bytes,
                    segments: self.wal_segments,
                    checkpoint_lsn: 0,
                };
                (create_log(log, Geometry::of(&meta))?, Some(meta))
            }
        };
        let (base, adopted) =
            RedbStorage::adopt(db, path, &options, upgrade).map_err(on_file(path))?;
        let meta = adopted
            .wal
            .ok_or_else(|| Error::Internal("a format-2 store without log settings".into()))?;
        let config = WalConfig {
            checkpoint_interval: self.checkpoint_interval,
            memory_budget: self.map_budget_bytes,
            scrub_interval: self.scrub_interval,
            read_cache_bytes: self.read_cache_bytes,
            telemetry: telemetry.clone(),
        };
        let (storage, next_token) = WalStorage::open(
            base,
            file,
            Geometry::of(&meta),
            meta.store_id,
            meta.checkpoint_lsn,
            adopted.next_token,
            config,
        )
        .map_err(on_file(log_file.as_deref().unwrap_or(path)))?;
        Ok((Box::new(storage), adopted.epoch, next_token))
    }
}

/// The existing log of a format-2 store.
fn open_log(log: LogSource) -> Result<Box<dyn redb::StorageBackend>> {
    match log {
        LogSource::File(path) => {
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(missing_log(&path));
                }
                Err(e) => return Err(Error::io_at(e, &path)),
            };
            Ok(Box::new(
                redb::backends::FileBackend::new(file).map_err(Error::storage)?,
            ))
        }
        LogSource::Backend(backend) => Ok(backend),
        LogSource::None => Err(Error::Internal("no log to open".into())),
    }
}

/// A new, preallocated log. A file is prepared under a temporary name and renamed into place
/// (the directory synced), so a crash leaves no half-initialised log under the real name; the
/// store is upgraded to format 2 only after this returns. A failed preparation removes its
/// file, and one left by an earlier process (killed while preparing it) is removed first: the
/// database file is locked by this store, so no other open can be preparing one.
fn create_log(log: LogSource, geometry: Geometry) -> Result<Box<dyn redb::StorageBackend>> {
    match log {
        LogSource::File(path) => {
            if may_hold_batches(&path).map_err(|e| e.at_path(&path))? {
                // The log of another state of this store (a database file restored from a
                // copy made before its upgrade, say), or something else: never replaced.
                return Err(Error::io_at(
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "a file that is not an empty log is in the way of the new write-ahead \
                         log (it may hold batches of this store); move it away",
                    ),
                    &path,
                ));
            }
            remove_unfinished_logs(&path);
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(format!(".creating-{}", std::process::id()));
            let tmp = PathBuf::from(tmp);
            let prepare = || -> Result<Box<dyn redb::StorageBackend>> {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)
                    .map_err(|e| Error::io_at(e, &path))?;
                let backend = redb::backends::FileBackend::new(file).map_err(Error::storage)?;
                wal_log::preallocate(&backend, geometry).map_err(|e| e.at_path(&path))?;
                std::fs::rename(&tmp, &path).map_err(|e| Error::io_at(e, &path))?;
                Ok(Box::new(backend))
            };
            let backend = prepare().inspect_err(|_| {
                // Best effort: what cannot be removed now goes at the next creation.
                let _ = std::fs::remove_file(&tmp);
            })?;
            #[cfg(unix)]
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| Error::io_at(e, dir))?;
            }
            Ok(backend)
        }
        LogSource::Backend(backend) => {
            wal_log::preallocate(&*backend, geometry)?;
            Ok(backend)
        }
        LogSource::None => Err(Error::Internal("no log to create".into())),
    }
}

/// Whether something at `log` may hold a log's batches: anything there but a regular file of
/// zeros (what a creation killed after putting the preallocated log in place, before the
/// database file recorded it, leaves).
fn may_hold_batches(log: &Path) -> Result<bool> {
    use std::io::Read;
    let meta = match std::fs::symlink_metadata(log) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::from_io(e)),
    };
    if !meta.is_file() {
        return Ok(true);
    }
    let mut file = std::fs::File::open(log)?;
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(false);
        }
        if chunk.iter().take(n).any(|b| *b != 0) {
            return Ok(true);
        }
    }
}

/// Removes the files `<log>.creating-<pid>` that creations of this store's log left behind
/// (a process killed while preallocating one). Best effort: a file that cannot be listed or
/// removed is left, and costs only its space.
fn remove_unfinished_logs(log: &Path) {
    let (Some(dir), Some(name)) = (log.parent(), log.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut prefix = name.to_owned();
    prefix.push(".creating-");
    let prefix = prefix.as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let unfinished = file_name
            .as_encoded_bytes()
            .strip_prefix(prefix)
            .is_some_and(|pid| !pid.is_empty() && pid.iter().all(u8::is_ascii_digit));
        if unfinished {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether the file at `log` can be a store's write-ahead log (preallocated: at least one
/// segment, whole sectors). A stray file beside a format-1 store (an empty one, say) does not
/// turn off that store's page verification on open.
pub(crate) fn looks_like_a_log(log: &Path) -> bool {
    std::fs::metadata(log).is_ok_and(|m| {
        m.is_file()
            && m.len() >= WAL_SEGMENT_BYTES_MIN
            && m.len() % crate::engine::storage::wal::log::SECTOR == 0
    })
}
