//! The store handle: the blocking and async operations, and shutdown. Opening is in
//! `builder`, reads in `reads`, the writer in `writer`.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::clock::duration_ms;
use crate::core::admin::Swept;
use crate::core::claim::{Claim, ClaimOptions, Lease};
use crate::core::record::scoped_key;
use crate::core::transition::{Op, Reply};
use crate::engine::builder::{BATCH_OPS_MAX, StoreBuilder};
use crate::engine::queue::Command;
use crate::engine::read_pool::ReadPool;
use crate::engine::reads::Reader;
use crate::engine::shared::Shared;
use crate::engine::sweeper::Sweeper;
use crate::engine::waits::{Signal, Timer, Waiters};
use crate::engine::writer;
use crate::error::{Error, Input, Result};
use crate::limits::Limits;

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
    pub(crate) shared: Arc<Shared>,
    pub(crate) limits: Limits,
    pub(crate) timer: Timer,
    pub(crate) read_pool: ReadPool,
    pub(crate) writer: Option<JoinHandle<()>>,
    pub(crate) sweeper: Option<Sweeper>,
    /// `"file"` or `"memory"`: what [`IdempotencyBackend::capabilities`](crate::IdempotencyBackend::capabilities) reports.
    pub(crate) kind: &'static str,
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
    /// A store around a running writer thread; the builder adds the sweeper.
    pub(crate) fn from_parts(
        shared: Arc<Shared>,
        limits: Limits,
        writer: JoinHandle<()>,
        timer: Timer,
        read_pool: ReadPool,
    ) -> Store {
        Store {
            shared,
            limits,
            timer,
            read_pool,
            writer: Some(writer),
            sweeper: None,
            kind: "file",
        }
    }

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
        self.limits.check_claim(scope, key, fingerprint, options)?;
        let lease_ms = duration_ms(options.lease_duration());
        let retention_ms = duration_ms(options.retention_duration());
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
        let claim =
            self.claim_blocking(scope.as_ref(), key.as_ref(), fingerprint.as_ref(), options);
        if let Ok(answer) = &claim {
            self.shared.telemetry.claim_answered(answer);
        }
        claim
    }

    fn claim_blocking(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> Result<Claim> {
        let (sk, op, wait) = self.prepare_claim(scope, key, fingerprint, options)?;
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
            let Some(registration) = registration.filter(|_| now < deadline) else {
                return Ok(result);
            };
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
        let claim = self
            .claim_awaiting(scope.as_ref(), key.as_ref(), fingerprint.as_ref(), options)
            .await;
        if let Ok(answer) = &claim {
            self.shared.telemetry.claim_answered(answer);
        }
        claim
    }

    async fn claim_awaiting(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> Result<Claim> {
        let (sk, op, wait) = self.prepare_claim(scope, key, fingerprint, options)?;
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
            let Some(registration) = registration.filter(|_| now < deadline) else {
                return Ok(result);
            };
            let _wake_up = self
                .timer
                .schedule(deadline.min(now + retry_after), &registration.signal);
            registration.signal.fired().await;
        }
    }

    /// Registers a waiter for `sk`; `None` when the store's waiters are at their cap (the
    /// claim then answers at once instead of waiting).
    fn register<'a>(&'a self, sk: &'a [u8]) -> Option<Registration<'a>> {
        Some(Registration {
            waiters: &self.shared.waiters,
            key: sk,
            signal: self.shared.waiters.register(sk)?,
        })
    }

    fn claim_once(&self, sk: &[u8], op: &Op) -> Result<Claim> {
        if let Some(answer) = self.reader().claim_without_write(sk, op)? {
            return Ok(answer);
        }
        claim_reply(self.run(sk, op.clone())?)
    }

    async fn claim_once_async(&self, sk: &[u8], op: &Op) -> Result<Claim> {
        // The read may go to disk: it runs on the read pool, never on the executor's thread.
        let shared = Arc::clone(&self.shared);
        let (key, claim) = (sk.to_vec(), op.clone());
        let read = move || Reader { shared: &shared }.claim_without_write(&key, &claim);
        if let Some(answer) = self.read_pool.run(read).await? {
            return Ok(answer);
        }
        claim_reply(self.run_async(sk, op.clone()).await?)
    }

    // ----- lease operations -----

    fn complete_op(&self, outcome: &[u8], retention: Duration, lease: &Lease) -> Result<Op> {
        self.limits.check_outcome(outcome)?;
        self.shared
            .check_fits(Input::Outcome, outcome.len(), &lease.scoped_key)?;
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
    /// [`Error::TooLarge`] for an outcome over the limit (or over what the store's
    /// write-ahead log holds, see [`StoreBuilder::wal_segments`]) or a retention over its cap;
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
        self.shared
            .check_fits(Input::Checkpoint, checkpoint.len(), &lease.scoped_key)?;
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
        forgotten(self.run(&sk, Op::Forget)?)
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
        forgotten(self.run_async(&sk, Op::Forget).await?)
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
    /// With the [write-ahead log](crate::StoreBuilder::write_ahead_log), the sweep removes the
    /// due records the database file holds from the file itself, on the calling thread, in a
    /// transaction of its own (up to `limit` entries even under load): the index's due entries
    /// are cleared in one pass and each record with one tree walk, and the writer waits only
    /// while the sweep logs the removed keys and marks them removed in the record map. It
    /// returns once a sync of the log covers them (the writer's next one, shared with the
    /// commits it runs meanwhile), so a crash replays them; the database file's own commit is
    /// made durable by the next checkpoint. Where a due record is still in the map (written
    /// since the last checkpoint), or a checkpoint needs the writer meanwhile, the sweep goes
    /// through the writer as above.
    ///
    /// ```
    /// use std::time::Duration;
    /// use idemstore::{ClaimOptions, Claim, ManualClock, Store};
    ///
    /// let clock = ManualClock::new(1_000_000);
    /// let store = Store::builder().clock(clock.clone()).sweep_interval(None).open_in_memory()?;
    /// let opts = ClaimOptions::default();
    /// let Claim::Acquired(lease) = store.claim("s", "k", b"fp", &opts)? else { unreachable!() };
    /// store.complete(&lease, b"ok", Duration::from_secs(60))?;
    ///
    /// clock.advance(Duration::from_secs(61));
    /// let swept = store.sweep(1024)?;
    /// assert_eq!((swept.removed, swept.more), (1, false));
    /// assert_eq!(store.stats()?.records, 0);
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// The storage errors of [`Store::complete`].
    pub fn sweep(&self, limit: usize) -> Result<Swept> {
        crate::engine::sweeper::sweep(&self.shared, limit.min(BATCH_OPS_MAX))
    }

    /// The async form of [`Store::sweep`].
    ///
    /// # Errors
    /// As [`Store::sweep`].
    pub async fn sweep_async(&self, limit: usize) -> Result<Swept> {
        self.shared.check_writable()?;
        let limit = limit.min(BATCH_OPS_MAX);
        if self.shared.storage.wal_figures().is_some() {
            // A sweep beside the writer reads and removes records in the database file itself:
            // on the read pool, never on the executor's thread.
            let shared = Arc::clone(&self.shared);
            return self
                .read_pool
                .run(move || crate::engine::sweeper::sweep(&shared, limit))
                .await;
        }
        self.shared
            .queue
            .submit_async(Command::Sweep { limit })
            .await?
            .into_swept()
    }

    /// Verifies the checksum of every page of the database file while the store stays open,
    /// as [`StoreBuilder::verify_on_open`](crate::StoreBuilder::verify_on_open) does at open:
    /// a file altered outside idemstore (bit rot, a bad sector) is found before a damaged
    /// page is trusted. Commits wait while it runs (a store with a write-ahead log keeps
    /// taking commits into its record map, and only its checkpoints wait). It reads the whole
    /// file, about 1.3 s per GB on the benchmark machine. Stores with a write-ahead log also do
    /// this in the background ([`StoreBuilder::scrub_interval`](crate::StoreBuilder::scrub_interval)).
    ///
    /// ```
    /// use idemstore::{ClaimOptions, Store};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let store = Store::builder()
    ///     .write_ahead_log(true)
    ///     .open(dir.path().join("idem.redb"))?;
    /// store.claim("s", "k", b"fp", &ClaimOptions::default())?;
    /// let check = store.verify_pages()?;
    /// assert!(check.bytes > 0);
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Corrupt`] if a page checksum does not match; [`Error::Io`] for read errors,
    /// and with [`std::io::ErrorKind::Unsupported`] for a store without a file (in memory, or
    /// on a custom backend).
    pub fn verify_pages(&self) -> Result<crate::PageCheck> {
        match self.shared.storage.verify_pages()? {
            Some((bytes, elapsed)) => Ok(crate::PageCheck { bytes, elapsed }),
            None => Err(Error::from_io(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this store has no database file to verify",
            ))),
        }
    }

    /// Makes every acknowledged write durable now. With [`Durability::Immediate`](crate::Durability::Immediate) it is already;
    /// with [`Durability::Relaxed`](crate::Durability::Relaxed) this closes the loss window.
    ///
    /// # Errors
    /// The storage errors of [`Store::complete`].
    pub fn flush(&self) -> Result<()> {
        self.shared.check_writable()?;
        writer::submit_and_wait(&self.shared, Command::Flush).map(|_| ())
    }

    // ----- plumbing -----

    fn identity(&self, scope: &[u8], key: &[u8]) -> Result<Vec<u8>> {
        self.limits.check_identity(scope, key)?;
        self.shared.check_writable()?;
        Ok(scoped_key(scope, key))
    }

    fn run(&self, sk: &[u8], op: Op) -> Result<Reply> {
        self.shared.check_writable()?;
        writer::submit_and_wait(
            &self.shared,
            Command::Record {
                key: sk.to_vec(),
                op,
            },
        )?
        .into_reply()
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
        answer.into_reply()
    }
}

/// The public answer to a claim the writer decided.
fn claim_reply(reply: Reply) -> Result<Claim> {
    match reply {
        Reply::Claim(claim) => Ok(claim),
        other => Err(Error::Internal(format!(
            "the writer answered a claim with {other:?}"
        ))),
    }
}

/// Whether a `forget` found a live record.
fn forgotten(reply: Reply) -> Result<bool> {
    match reply {
        Reply::Forgotten(existed) => Ok(existed),
        other => Err(Error::Internal(format!(
            "the writer answered a forget with {other:?}"
        ))),
    }
}
