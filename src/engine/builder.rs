//! Configuring and opening a store: [`StoreBuilder`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::engine::durability::Durability;
use crate::engine::read_pool::ReadPool;
use crate::engine::shared::Shared;
use crate::engine::storage::redb::{RedbStorage, open};
use crate::engine::store::Store;
use crate::engine::sweeper::Sweeper;
use crate::engine::telemetry;
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
    verify_on_open: bool,
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
            verify_on_open: true,
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
    /// (call [`Store::sweep`] yourself). Default: every second.
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
    /// Default: on.
    ///
    /// Turning it off makes opening a large file instant, at a price: redb then trusts a file
    /// that was closed cleanly, and on one damaged since, opens and reads may panic, and a
    /// damaged page of its trees may hide a record (a completed request would then run again).
    /// In optimised builds some damage even makes redb panic a second time while unwinding,
    /// which aborts the process. Record envelopes stay checked either way.
    /// tests/corruption.rs measures both modes.
    pub fn verify_on_open(mut self, enabled: bool) -> Self {
        self.verify_on_open = enabled;
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
        let db = open::file(path, &self.redb_options())?;
        self.start(db, path)
    }

    /// Opens a store that lives in memory only (redb's in-memory backend): for tests and
    /// caches. Everything is lost when it is dropped.
    ///
    /// # Errors
    /// As [`StoreBuilder::open`], for the configuration.
    pub fn open_in_memory(self) -> Result<Store> {
        self.validate()?;
        let db = open::in_memory(&self.redb_options())?;
        self.start(db, Path::new(":memory:"))
    }

    /// Opens a store on any redb [`StorageBackend`](redb::StorageBackend): a custom file
    /// layer, or a fault-injecting wrapper in tests. The backend must be empty or hold an
    /// idemstore database.
    ///
    /// # Errors
    /// As [`StoreBuilder::open`].
    pub fn open_with_backend(self, backend: impl redb::StorageBackend) -> Result<Store> {
        self.validate()?;
        let db = open::with_backend(backend, &self.redb_options())?;
        self.start(db, Path::new("<backend>"))
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
        Ok(())
    }

    fn redb_options(&self) -> open::Options {
        open::Options {
            cache_size_bytes: self.cache_size_bytes,
            verify_on_open: self.verify_on_open,
            two_phase_commit: self.two_phase_commit,
        }
    }

    /// Adopts the opened database and starts the writer and the sweeper.
    fn start(self, db: redb::Database, path: &Path) -> Result<Store> {
        let (storage, adopted) = RedbStorage::adopt(db, path, &self.redb_options())?;
        let shared = Arc::new(Shared::new(
            Box::new(storage),
            self.clock,
            adopted.epoch,
            adopted.next_token,
            self.durability,
            self.queue_capacity,
            self.queue_capacity_bytes,
            self.limits.records_per_scope(),
        ));
        // Threads that can fail to start come before the writer, which must not be left
        // running without a store to stop it.
        let timer = Timer::start()?;
        let read_pool = ReadPool::start(self.async_read_threads)?;
        let writer_shared = Arc::clone(&shared);
        let max_batch = self.max_batch_ops;
        let writer = std::thread::Builder::new()
            .name("idemstore-writer".into())
            .spawn(move || writer::run(&writer_shared, max_batch))
            .map_err(Error::from_io)?;
        // From here on the writer runs: the store must be built (and dropped on error) so that
        // the writer is stopped and joined.
        telemetry::opened();
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
}
