//! The store: opening, the blocking and async operations, reads, and shutdown.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::backends::InMemoryBackend;
use redb::{Database, ReadableDatabase, ReadableTable};

use crate::claim::{Claim, ClaimOptions, Lease, Replay};
use crate::clock::{Clock, SystemClock, duration_ms};
use crate::codec;
use crate::commit::{self, Answer, Command, Durability, Shared};
use crate::error::{Error, Input, Result};
use crate::limits::Limits;
use crate::record::{Record, RecordState, scoped_key, split_scoped_key};
use crate::schema::{self, RECORDS};
use crate::sweep::Sweeper;
use crate::transition::{self, ClaimDecision, Ctx, Op, Reply, Write};
use crate::wait::{Signal, Timer, Waiters};

/// Hard cap on the commit queue's capacity.
pub const QUEUE_CAPACITY_MAX: usize = 1 << 20;
/// Hard cap on the operations applied in one transaction.
pub const BATCH_OPS_MAX: usize = 1 << 16;

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
        let db = self.open_file(path)?;
        self.start(db, path)
    }

    /// Opens a store that lives in memory only (redb's in-memory backend): for tests and
    /// caches. Everything is lost when it is dropped.
    ///
    /// # Errors
    /// As [`StoreBuilder::open`], for the configuration.
    pub fn open_in_memory(self) -> Result<Store> {
        self.validate()?;
        let mut builder = redb::Builder::new();
        if let Some(bytes) = self.cache_size_bytes {
            builder.set_cache_size(bytes);
        }
        let db = builder
            .create_with_backend(InMemoryBackend::new())
            .map_err(Error::storage)?;
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
        let mut builder = redb::Builder::new();
        if let Some(bytes) = self.cache_size_bytes {
            builder.set_cache_size(bytes);
        }
        builder.set_check_integrity_on_open(self.verify_on_open);
        let db = builder
            .create_with_backend(backend)
            .map_err(Error::storage)?;
        self.start(db, Path::new("<backend>"))
    }

    fn validate(&self) -> Result<()> {
        self.limits.validate()?;
        let checks = [
            ("queue_capacity", self.queue_capacity, QUEUE_CAPACITY_MAX),
            ("max_batch_ops", self.max_batch_ops, BATCH_OPS_MAX),
            ("sweep_batch", self.sweep_batch, BATCH_OPS_MAX),
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

    fn open_file(&self, path: &Path) -> Result<Database> {
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
        let mut builder = redb::Builder::new();
        if let Some(bytes) = self.cache_size_bytes {
            builder.set_cache_size(bytes);
        }
        builder.set_check_integrity_on_open(self.verify_on_open);
        if existing_len == 0 {
            return builder.create(path).map_err(Error::storage);
        }
        // A writable open marks the file's header, so a foreign database is inspected through a
        // read-only open first and refused untouched. A file that needs crash recovery cannot be
        // opened read-only; the writable open repairs it and `adopt` checks it before writing.
        // redb never verifies checksums on a read-only open (`verify_on_open` applies to the
        // writable open below), and its reads may panic on a file damaged outside redb: such a
        // panic here means the file is corrupt, and nothing has been written to it yet.
        let inspect = || match builder.open_read_only(path) {
            Ok(ro) => {
                let read = ro.begin_read().map_err(Error::storage)?;
                schema::inspect(&read, path).map(|_| ())
            }
            Err(redb::DatabaseError::RepairAborted) => Ok(()),
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

    fn start(self, db: Database, path: &Path) -> Result<Store> {
        let adopted = schema::adopt(&db, path)?;
        let shared = Arc::new(Shared::new(
            db,
            self.clock,
            adopted.epoch,
            adopted.next_token,
            self.durability,
            self.two_phase_commit,
            self.queue_capacity,
            self.limits.records_per_scope(),
        ));
        let writer_shared = Arc::clone(&shared);
        let max_batch = self.max_batch_ops;
        let writer = std::thread::Builder::new()
            .name("idemstore-writer".into())
            .spawn(move || commit::run_writer(&writer_shared, max_batch))
            .map_err(Error::from_io)?;
        let sweeper = self
            .sweep_interval
            .map(|interval| Sweeper::start(Arc::clone(&shared), interval, self.sweep_batch));
        Ok(Store {
            shared,
            limits: self.limits,
            timer: Timer::default(),
            writer: Some(writer),
            sweeper,
        })
    }
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
    let _ = fs::remove_file(&tmp);
    if linked? {
        // Make the new directory entry durable before anything is acknowledged in the file.
        #[cfg(unix)]
        fs::File::open(dir).and_then(|d| d.sync_all())?;
    }
    Ok(())
}

fn has_redb_magic(path: &Path) -> Result<bool> {
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

/// An in-flight record whose owner is gone, listed by [`Store::orphans`] for reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Orphan {
    /// The record's scope.
    pub scope: Vec<u8>,
    /// The record's key.
    pub key: Vec<u8>,
    /// The record (state [`RecordState::InFlight`], with the owner's last checkpoint).
    pub record: Record,
}

/// The result of one [`Store::sweep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Swept {
    /// Expiry-index entries visited (at most the limit).
    pub visited: usize,
    /// Expired records removed.
    pub removed: usize,
    /// Whether due entries remain after this sweep: sweep again while it is true.
    pub more: bool,
}

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
    /// Write transactions committed since open.
    pub commits: u64,
    /// Operations applied since open (always at least `commits` under load: group commit).
    pub operations: u64,
    /// The most operations one commit carried.
    pub largest_batch: u64,
    /// Expired records removed by sweeps since open.
    pub swept: u64,
    /// Operations waiting in the commit queue.
    pub queue_depth: usize,
    /// Duplicate claims currently waiting for their original ([`ClaimOptions::wait`]).
    pub waiting: usize,
    /// Whether a fatal error has stopped writes until reopen.
    pub poisoned: bool,
}

/// An embedded idempotency store.
///
/// Share it between threads behind an `Arc`. Writes go through one group-committing writer
/// thread; reads (`get`, and the replay path of `claim`) run on the caller's thread against
/// committed state. Dropping the store (or [`Store::close`]) stops the sweeper, finishes the
/// queued operations, and releases the file.
///
/// ```
/// use idemstore::{Claim, ClaimOptions, Store};
/// use std::time::Duration;
///
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path().join("idem.redb"))?;
/// let options = ClaimOptions::default();
///
/// let Claim::Acquired(lease) = store.claim("tenant-1", "key-1", b"fingerprint", &options)? else {
///     unreachable!("the first claim of a key acquires it");
/// };
/// // ... charge the card ...
/// store.complete(&lease, b"charge ch_1 ok", Duration::from_secs(86_400))?;
///
/// // A retry of the same request replays the first answer instead of charging again.
/// match store.claim("tenant-1", "key-1", b"fingerprint", &options)? {
///     Claim::Replay(replay) => assert_eq!(replay.outcome, b"charge ch_1 ok"),
///     other => panic!("expected a replay, got {other:?}"),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Store {
    shared: Arc<Shared>,
    limits: Limits,
    timer: Timer,
    writer: Option<JoinHandle<()>>,
    sweeper: Option<Sweeper>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("epoch", &self.shared.epoch)
            .field("durability", &self.shared.durability)
            .finish_non_exhaustive()
    }
}

/// Unregisters a waiter when dropped, so a cancelled async wait leaves nothing behind.
struct Registration<'a> {
    waiters: &'a Waiters,
    key: &'a [u8],
    signal: Arc<Signal>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.waiters.unregister(self.key, &self.signal);
    }
}

impl Store {
    /// A builder with the defaults: immediate durability, system clock, default limits,
    /// sweeper every second.
    pub fn builder() -> StoreBuilder {
        StoreBuilder::default()
    }

    /// Opens (or creates) the database at `path` with the default configuration.
    ///
    /// # Errors
    /// As [`StoreBuilder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        StoreBuilder::default().open(path)
    }

    /// Opens an in-memory store with the default configuration.
    ///
    /// # Errors
    /// As [`StoreBuilder::open_in_memory`].
    pub fn in_memory() -> Result<Store> {
        StoreBuilder::default().open_in_memory()
    }

    /// The limits this store enforces.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The process epoch of this open (1 for a new database, +1 per open).
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    // ----- claim -----

    fn prepare_claim(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> Result<(Vec<u8>, Op, Option<Duration>)> {
        self.limits.check_identity(scope, key)?;
        self.limits.check_fingerprint(fingerprint)?;
        let lease_ms = duration_ms(options.lease_duration());
        let retention_ms = duration_ms(options.retention_duration());
        self.limits.check_lease(lease_ms)?;
        self.limits.check_retention(retention_ms)?;
        if lease_ms > retention_ms {
            return Err(Error::LeaseExceedsRetention {
                lease_ms,
                retention_ms,
            });
        }
        if let Some(wait) = options.wait_duration() {
            self.limits.check_wait(duration_ms(wait))?;
        }
        let op = Op::Claim {
            fingerprint: fingerprint.to_vec(),
            lease_ms,
            retention_ms,
        };
        Ok((scoped_key(scope, key), op, options.wait_duration()))
    }

    /// Claims `(scope, key)` for the request identified by `fingerprint` (DESIGN §2):
    ///
    /// - no live record, a retryable failure, or an in-flight record whose owner is gone →
    ///   [`Claim::Acquired`] (run the request);
    /// - completed → [`Claim::Replay`] (return the stored outcome);
    /// - in flight under a live lease → [`Claim::InProgress`], or with
    ///   [`ClaimOptions::wait`] the result once the original finishes (or the wait ends);
    /// - another fingerprint → [`Claim::Mismatch`].
    ///
    /// Replays, mismatches and in-progress answers are read from committed state without a
    /// write; acquisitions are durable (at the store's durability) before they return.
    ///
    /// # Errors
    /// [`Error::TooLarge`]/[`Error::TooSmall`]/[`Error::LeaseExceedsRetention`] for bad input
    /// (nothing written); [`Error::Corrupt`] if the stored record fails its checks (it is left
    /// as it is); [`Error::CommitOutcomeUnknown`], [`Error::Poisoned`], [`Error::Io`],
    /// [`Error::StorageFull`], [`Error::Closed`].
    pub fn claim(
        &self,
        scope: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: impl AsRef<[u8]>,
        options: &ClaimOptions,
    ) -> Result<Claim> {
        let (sk, op, wait) =
            self.prepare_claim(scope.as_ref(), key.as_ref(), fingerprint.as_ref(), options)?;
        let Some(wait) = wait else {
            return self.claim_once(&sk, &op);
        };
        let deadline = Instant::now() + wait;
        loop {
            let registration = self.register(&sk);
            let result = self.claim_once(&sk, &op)?;
            let Claim::InProgress { retry_after } = result else {
                return Ok(result);
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(result);
            }
            registration
                .signal
                .wait_until(deadline.min(now + retry_after));
        }
    }

    /// The async form of [`Store::claim`]: awaits the writer and any wait without blocking the
    /// executor thread, on any async runtime.
    ///
    /// # Errors
    /// As [`Store::claim`].
    pub async fn claim_async(
        &self,
        scope: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
        fingerprint: impl AsRef<[u8]>,
        options: &ClaimOptions,
    ) -> Result<Claim> {
        let (sk, op, wait) =
            self.prepare_claim(scope.as_ref(), key.as_ref(), fingerprint.as_ref(), options)?;
        let Some(wait) = wait else {
            return self.claim_once_async(&sk, &op).await;
        };
        let deadline = Instant::now() + wait;
        loop {
            let registration = self.register(&sk);
            let result = self.claim_once_async(&sk, &op).await?;
            let Claim::InProgress { retry_after } = result else {
                return Ok(result);
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(result);
            }
            self.timer
                .schedule(deadline.min(now + retry_after), &registration.signal);
            registration.signal.fired().await;
        }
    }

    fn register<'a>(&'a self, sk: &'a [u8]) -> Registration<'a> {
        Registration {
            waiters: &self.shared.waiters,
            key: sk,
            signal: self.shared.waiters.register(sk),
        }
    }

    fn claim_once(&self, sk: &[u8], op: &Op) -> Result<Claim> {
        if let Some(answer) = self.claim_read_only(sk, op)? {
            return Ok(answer);
        }
        let reply = self.run(sk, op.clone())?;
        self.claim_answer(sk, reply)
    }

    async fn claim_once_async(&self, sk: &[u8], op: &Op) -> Result<Claim> {
        if let Some(answer) = self.claim_read_only(sk, op)? {
            return Ok(answer);
        }
        let reply = self.run_async(sk, op.clone()).await?;
        self.claim_answer(sk, reply)
    }

    /// Decides a claim from committed state when the decision writes nothing (replay,
    /// mismatch, in progress); `None` when it needs the writer.
    fn claim_read_only(&self, sk: &[u8], op: &Op) -> Result<Option<Claim>> {
        let Some(stored) = self.read_record(sk)? else {
            return Ok(None);
        };
        let ctx = Ctx {
            now_ms: self.shared.clock.now_ms(),
            epoch: self.shared.epoch,
            next_token: 0,
            scope_full: None,
        };
        let step = transition::apply(Some(&stored), op.clone(), &ctx);
        if step.write != Write::Keep {
            return Ok(None);
        }
        Ok(Some(self.claim_answer(sk, step.reply?)?))
    }

    fn claim_answer(&self, sk: &[u8], reply: Reply) -> Result<Claim> {
        let Reply::Claim(decision) = reply else {
            return Err(Error::Storage(format!(
                "unexpected reply to a claim: {reply:?}"
            )));
        };
        Ok(match decision {
            ClaimDecision::Acquired {
                token,
                lease_until_ms,
                attempt,
                checkpoint,
                takeover,
            } => Claim::Acquired(Lease {
                scoped_key: sk.to_vec(),
                token,
                lease_until_ms,
                attempt,
                checkpoint,
                takeover,
            }),
            ClaimDecision::Replay {
                outcome,
                completed_at_ms,
                attempt,
            } => Claim::Replay(Replay {
                outcome,
                completed_at_ms,
                attempt,
            }),
            ClaimDecision::InProgress { lease_until_ms } => {
                let now = self.shared.clock.now_ms();
                Claim::InProgress {
                    retry_after: Duration::from_millis(lease_until_ms.saturating_sub(now).max(1)),
                }
            }
            ClaimDecision::Mismatch => Claim::Mismatch,
        })
    }

    // ----- lease operations -----

    fn complete_op(&self, outcome: &[u8], retention: Duration, lease: &Lease) -> Result<Op> {
        self.limits.check_outcome(outcome)?;
        let retention_ms = duration_ms(retention);
        self.limits.check_retention(retention_ms)?;
        Ok(Op::Complete {
            token: lease.token,
            outcome: outcome.to_vec(),
            retention_ms,
        })
    }

    /// Completes the leased request with `outcome`, replayed byte for byte to every later
    /// duplicate for `retention`. A terminal failure is a completion too: store the error
    /// response as the outcome.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the lease no longer owns the record (nothing changed);
    /// [`Error::TooLarge`] for an outcome over the limit or a retention over its cap;
    /// [`Error::CommitOutcomeUnknown`], [`Error::Poisoned`], [`Error::Corrupt`],
    /// [`Error::Io`], [`Error::StorageFull`], [`Error::Closed`].
    pub fn complete(&self, lease: &Lease, outcome: &[u8], retention: Duration) -> Result<()> {
        let op = self.complete_op(outcome, retention, lease)?;
        self.run(&lease.scoped_key, op).map(|_| ())
    }

    /// The async form of [`Store::complete`].
    ///
    /// # Errors
    /// As [`Store::complete`].
    pub async fn complete_async(
        &self,
        lease: &Lease,
        outcome: &[u8],
        retention: Duration,
    ) -> Result<()> {
        let op = self.complete_op(outcome, retention, lease)?;
        self.run_async(&lease.scoped_key, op).await.map(|_| ())
    }

    /// Releases the leased request as a retryable failure: the next claim with the same
    /// fingerprint acquires it again (attempt + 1) and receives the last checkpoint.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] (nothing changed), and the storage errors of [`Store::complete`].
    pub fn fail(&self, lease: &Lease) -> Result<()> {
        self.run(&lease.scoped_key, Op::Fail { token: lease.token })
            .map(|_| ())
    }

    /// The async form of [`Store::fail`].
    ///
    /// # Errors
    /// As [`Store::fail`].
    pub async fn fail_async(&self, lease: &Lease) -> Result<()> {
        self.run_async(&lease.scoped_key, Op::Fail { token: lease.token })
            .await
            .map(|_| ())
    }

    fn extend_op(&self, lease: &Lease, by: Duration) -> Result<Op> {
        let by_ms = duration_ms(by);
        self.limits.check_lease(by_ms)?;
        Ok(Op::Extend {
            token: lease.token,
            by_ms,
        })
    }

    fn apply_extension(lease: &mut Lease, reply: &Reply) {
        if let Reply::Extended { lease_until_ms } = reply {
            lease.lease_until_ms = *lease_until_ms;
        }
    }

    /// Extends the lease to `by` from now (a slow request keeps its claim). The record's expiry
    /// moves out too if the lease would outlive it.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] (nothing changed), [`Error::TooLarge`]/[`Error::TooSmall`] for `by`
    /// outside the lease limits, and the storage errors of [`Store::complete`].
    pub fn extend(&self, lease: &mut Lease, by: Duration) -> Result<()> {
        let op = self.extend_op(lease, by)?;
        let reply = self.run(&lease.scoped_key, op)?;
        Self::apply_extension(lease, &reply);
        Ok(())
    }

    /// The async form of [`Store::extend`].
    ///
    /// # Errors
    /// As [`Store::extend`].
    pub async fn extend_async(&self, lease: &mut Lease, by: Duration) -> Result<()> {
        let op = self.extend_op(lease, by)?;
        let reply = self.run_async(&lease.scoped_key, op).await?;
        Self::apply_extension(lease, &reply);
        Ok(())
    }

    fn checkpoint_op(&self, lease: &Lease, checkpoint: &[u8]) -> Result<Op> {
        self.limits.check_checkpoint(checkpoint)?;
        Ok(Op::Checkpoint {
            token: lease.token,
            checkpoint: checkpoint.to_vec(),
        })
    }

    /// Stores a recovery point of a multi-step operation. Whoever takes the record over (after
    /// this owner's lease ends or its process dies) or retries it after `fail` receives it in
    /// [`Lease::checkpoint`], and resumes instead of repeating finished steps.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] (nothing changed), [`Error::TooLarge`] for a checkpoint over the
    /// limit, and the storage errors of [`Store::complete`].
    pub fn checkpoint(&self, lease: &Lease, checkpoint: &[u8]) -> Result<()> {
        let op = self.checkpoint_op(lease, checkpoint)?;
        self.run(&lease.scoped_key, op).map(|_| ())
    }

    /// The async form of [`Store::checkpoint`].
    ///
    /// # Errors
    /// As [`Store::checkpoint`].
    pub async fn checkpoint_async(&self, lease: &Lease, checkpoint: &[u8]) -> Result<()> {
        let op = self.checkpoint_op(lease, checkpoint)?;
        self.run_async(&lease.scoped_key, op).await.map(|_| ())
    }

    // ----- administration -----

    /// Removes the record of `(scope, key)` whatever its state (also a corrupt one). Returns
    /// whether a live record was there. An in-flight owner's later writes then fail with
    /// [`Error::LeaseLost`].
    ///
    /// # Errors
    /// Bad scope or key sizes, and the storage errors of [`Store::complete`].
    pub fn forget(&self, scope: impl AsRef<[u8]>, key: impl AsRef<[u8]>) -> Result<bool> {
        let sk = self.identity(scope.as_ref(), key.as_ref())?;
        match self.run(&sk, Op::Forget)? {
            Reply::Forgotten(existed) => Ok(existed),
            _ => Ok(true),
        }
    }

    /// The async form of [`Store::forget`].
    ///
    /// # Errors
    /// As [`Store::forget`].
    pub async fn forget_async(
        &self,
        scope: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
    ) -> Result<bool> {
        let sk = self.identity(scope.as_ref(), key.as_ref())?;
        match self.run_async(&sk, Op::Forget).await? {
            Reply::Forgotten(existed) => Ok(existed),
            _ => Ok(true),
        }
    }

    /// Removes up to `limit` expiry-index entries that are due, oldest first, with their
    /// records, in one commit. The cost is proportional to `limit`, never to the store's size.
    /// Space freed is reused by later writes.
    ///
    /// When other operations share the commit, the sweep visits at most 64 entries, so that
    /// sweeping a large backlog adds little to their latency; [`Swept::more`] says whether due
    /// entries remain. To drain a backlog, sweep while it is true (the background sweeper
    /// does).
    ///
    /// # Errors
    /// The storage errors of [`Store::complete`].
    pub fn sweep(&self, limit: usize) -> Result<Swept> {
        self.shared.check_writable()?;
        let limit = limit.min(BATCH_OPS_MAX);
        Ok(swept(
            self.shared.queue.submit(Command::Sweep { limit })?.wait()?,
        ))
    }

    /// The async form of [`Store::sweep`].
    ///
    /// # Errors
    /// As [`Store::sweep`].
    pub async fn sweep_async(&self, limit: usize) -> Result<Swept> {
        self.shared.check_writable()?;
        let limit = limit.min(BATCH_OPS_MAX);
        let answer = self
            .shared
            .queue
            .submit_async(Command::Sweep { limit })
            .await?;
        Ok(swept(answer))
    }

    /// Makes every acknowledged write durable now. With [`Durability::Immediate`] it is already;
    /// with [`Durability::Relaxed`] this closes the loss window.
    ///
    /// # Errors
    /// The storage errors of [`Store::complete`].
    pub fn flush(&self) -> Result<()> {
        self.shared.check_writable()?;
        self.shared.queue.submit(Command::Flush)?.wait().map(|_| ())
    }

    // ----- reads -----

    /// The live record of `(scope, key)`, or `None` if there is none or it has expired.
    ///
    /// # Errors
    /// Bad scope or key sizes; [`Error::Corrupt`] if the stored bytes fail their checks;
    /// [`Error::Io`].
    pub fn get(&self, scope: impl AsRef<[u8]>, key: impl AsRef<[u8]>) -> Result<Option<Record>> {
        self.limits.check_identity(scope.as_ref(), key.as_ref())?;
        let sk = scoped_key(scope.as_ref(), key.as_ref());
        let now = self.shared.clock.now_ms();
        Ok(self.read_record(&sk)?.filter(|r| !r.is_expired(now)))
    }

    fn read_record(&self, sk: &[u8]) -> Result<Option<Record>> {
        self.shared.read_record(sk)
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
        let read = self.shared.db.begin_read().map_err(Error::storage)?;
        let table = read.open_table(RECORDS).map_err(Error::storage)?;
        let ctx = Ctx {
            now_ms: self.shared.clock.now_ms(),
            epoch: self.shared.epoch,
            next_token: 0,
            scope_full: None,
        };
        let mut out = Vec::new();
        for entry in table.iter().map_err(Error::storage)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(Error::storage)?;
            let Ok(record) = codec::decode(k.value(), v.value()) else {
                continue;
            };
            let gone = matches!(record.state, RecordState::InFlight { .. })
                && !record.is_expired(ctx.now_ms)
                && transition::owner_is_gone(&record.state, &ctx);
            if let (true, Some((scope, key))) = (gone, split_scoped_key(k.value())) {
                out.push(Orphan {
                    scope: scope.to_vec(),
                    key: key.to_vec(),
                    record,
                });
            }
        }
        Ok(out)
    }

    /// How many records `scope` holds, counting expired ones not yet swept: the figure the
    /// per-scope quota ([`Limits::max_records_per_scope`]) is checked against.
    ///
    /// # Errors
    /// A scope over its size limit; [`Error::Io`] and other storage errors.
    pub fn scope_records(&self, scope: impl AsRef<[u8]>) -> Result<u64> {
        let scope = scope.as_ref();
        self.limits.check_identity(scope, b"-")?;
        let read = self.shared.db.begin_read().map_err(Error::storage)?;
        let table = read.open_table(schema::SCOPES).map_err(Error::storage)?;
        Ok(table
            .get(scope)
            .map_err(Error::storage)?
            .map_or(0, |g| g.value()))
    }

    /// Counters and sizes.
    ///
    /// # Errors
    /// [`Error::Io`] and other storage errors while counting the tables.
    pub fn stats(&self) -> Result<Stats> {
        use std::sync::atomic::Ordering::Relaxed;
        let (records, expiry_entries) = schema::table_lens(&self.shared.db)?;
        let c = &self.shared.counters;
        Ok(Stats {
            records,
            expiry_entries,
            epoch: self.shared.epoch,
            next_token: c.next_token.load(Relaxed),
            commits: c.commits.load(Relaxed),
            operations: c.operations.load(Relaxed),
            largest_batch: c.largest_batch.load(Relaxed),
            swept: c.swept.load(Relaxed),
            queue_depth: self.shared.queue.len(),
            waiting: self.shared.waiters.len(),
            poisoned: self.shared.is_poisoned(),
        })
    }

    // ----- plumbing -----

    fn identity(&self, scope: &[u8], key: &[u8]) -> Result<Vec<u8>> {
        self.limits.check_identity(scope, key)?;
        self.shared.check_writable()?;
        Ok(scoped_key(scope, key))
    }

    fn run(&self, sk: &[u8], op: Op) -> Result<Reply> {
        self.shared.check_writable()?;
        let slot = self.shared.queue.submit(Command::Record {
            key: sk.to_vec(),
            op,
        })?;
        expect_reply(slot.wait()?)
    }

    async fn run_async(&self, sk: &[u8], op: Op) -> Result<Reply> {
        self.shared.check_writable()?;
        let answer = self
            .shared
            .queue
            .submit_async(Command::Record {
                key: sk.to_vec(),
                op,
            })
            .await?;
        expect_reply(answer)
    }

    /// Stops the sweeper, lets the writer finish every queued operation (and, at a relaxed
    /// durability, sync them), and releases the file.
    ///
    /// # Errors
    /// [`Error::Poisoned`] if the store stopped on a fatal error (at a relaxed durability,
    /// acknowledged writes since the last sync may then be lost); storage errors from closing
    /// the file.
    pub fn close(mut self) -> Result<()> {
        self.shutdown();
        if self.shared.is_poisoned() {
            return self.shared.check_writable();
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        if let Some(mut s) = self.sweeper.take() {
            s.stop();
        }
        self.shared.queue.close();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        self.timer.stop();
    }
}

fn swept(answer: Answer) -> Swept {
    match answer {
        Answer::Swept {
            visited,
            removed,
            more,
        } => Swept {
            visited,
            removed,
            more,
        },
        _ => Swept::default(),
    }
}

fn expect_reply(answer: Answer) -> Result<Reply> {
    match answer {
        Answer::Reply(r) => Ok(r),
        other => Err(Error::Storage(format!(
            "unexpected writer answer {other:?}"
        ))),
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}
