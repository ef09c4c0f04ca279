//! The state one open store shares between its handle, the writer thread and the sweeper:
//! storage, clock, process epoch, queue, waiters, counters, and whether a fatal error has
//! stopped the writer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::clock::Clock;
use crate::core::transition::{Ctx, Op};
use crate::engine::durability::Durability;
use crate::engine::queue::{Command, JOB_OVERHEAD_BYTES, Queue};
use crate::engine::storage::Storage;
use crate::engine::telemetry::Telemetry;
use crate::engine::waits::Waiters;
use crate::engine::writer::WriterState;
use crate::error::{Error, Input, Result};
use crate::limits::Limits;
use std::sync::Arc;

/// Counters kept by the writer, read by `stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub commits: AtomicU64,
    pub operations: AtomicU64,
    pub largest_batch: AtomicU64,
    pub swept: AtomicU64,
    pub next_token: AtomicU64,
}

/// State shared by the store handle, the writer and the sweeper.
pub(crate) struct Shared {
    pub storage: Box<dyn Storage>,
    clock: Arc<dyn Clock>,
    /// The latest time any decision was made at: time never runs backwards inside one open
    /// store, whatever the wall clock does, for the writer and readers alike.
    last_now_ms: AtomicU64,
    pub epoch: u64,
    pub durability: Durability,
    /// The per-scope record quota, if any.
    pub quota: Option<u64>,
    pub queue: Queue,
    /// What commits carry from one to the next; held by whoever commits.
    pub writer: Mutex<WriterState>,
    pub waiters: Waiters,
    pub counters: Counters,
    poisoned: AtomicBool,
    poison_cause: Mutex<Option<String>>,
    /// Where the store's metrics go.
    pub telemetry: Telemetry,
    /// The bound on a batch of a storage that has one ([`LogRoom`]).
    pub log_room: Option<LogRoom>,
}

/// How much one commit may hold where the storage bounds a batch (the write-ahead log, whose
/// file has a fixed size): the writer fills a batch only as far as the log always takes it.
///
/// What a command carries is bounded by the limits of this open; what a record keeps from
/// earlier (its fingerprint and checkpoint) and what a sweep removes are bounded by the hard
/// caps only, since they may have been stored under larger limits or by `Store::import`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogRoom {
    /// The largest batch payload the log always takes.
    pub batch_bytes: usize,
    /// The most bytes one queued command's payload can take beyond its queue weight once
    /// encoded: the scoped key again in the record and in two expiry-index entries, its
    /// scope's count, the stored fingerprint, the envelope and framing.
    pub op_extra: usize,
    /// What a command that keeps a record's stored checkpoint (a claim taking a record over,
    /// `fail`, `extend`) can add beyond that: the longest checkpoint any record can hold.
    pub kept_checkpoint: usize,
    /// The most bytes one removal of a sweep adds to a batch: the record's removal, its
    /// expiry-index entry's and its scope's count, for the longest scoped key.
    pub removal: usize,
}

impl LogRoom {
    /// The room of a storage whose batches hold at most `batch_bytes`, under `limits`.
    pub(crate) fn new(batch_bytes: u64, limits: &Limits) -> LogRoom {
        use crate::limits::{CHECKPOINT_LEN_MAX, FINGERPRINT_LEN_MAX, KEY_LEN_MAX, SCOPE_LEN_MAX};
        let key = limits.scoped_key_len();
        let any_key = SCOPE_LEN_MAX + KEY_LEN_MAX + 1;
        LogRoom {
            batch_bytes: usize::try_from(batch_bytes).unwrap_or(usize::MAX),
            op_extra: 4 * key + FINGERPRINT_LEN_MAX + 512,
            kept_checkpoint: CHECKPOINT_LEN_MAX,
            removal: 3 * any_key + 64,
        }
    }

    /// The most bytes `command`'s encoding can take in a batch beyond its queue weight.
    pub(crate) fn extra(&self, command: &Command) -> usize {
        match command {
            Command::Record { op, .. } => match op {
                // The record written holds what the command carries (an outcome replaces
                // the checkpoint, a checkpoint the previous one), or nothing.
                Op::Complete { .. } | Op::Checkpoint { .. } | Op::Forget => self.op_extra,
                Op::Claim { .. } | Op::Fail { .. } | Op::Extend { .. } => {
                    self.op_extra + self.kept_checkpoint
                }
            },
            Command::Sweep { limit } => self.op_extra.max(limit.saturating_mul(self.removal)),
            Command::Flush => self.op_extra,
        }
    }

    /// The longest outcome or checkpoint one command can carry, for a scoped key of
    /// `key_len` bytes, and still fit a batch.
    pub(crate) fn field_max(&self, key_len: usize) -> usize {
        self.batch_bytes
            .saturating_sub(self.op_extra + key_len + JOB_OVERHEAD_BYTES)
    }
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        storage: Box<dyn Storage>,
        clock: Arc<dyn Clock>,
        epoch: u64,
        next_token: u64,
        durability: Durability,
        queue_capacity: usize,
        queue_capacity_bytes: usize,
        quota: Option<u64>,
        max_batch: usize,
        log_room: Option<LogRoom>,
        telemetry: Telemetry,
    ) -> Shared {
        let counters = Counters::default();
        counters.next_token.store(next_token, Ordering::SeqCst);
        Shared {
            storage,
            clock,
            last_now_ms: AtomicU64::new(0),
            epoch,
            durability,
            quota,
            queue: Queue::new(queue_capacity, queue_capacity_bytes),
            writer: Mutex::new(WriterState::new(next_token, max_batch)),
            waiters: Waiters::default(),
            counters,
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
            log_room,
            telemetry,
        }
    }

    /// Refuses a command carrying `len` bytes of `what` for the scoped key `key` that no
    /// batch of the storage could hold ([`Error::TooLarge`], nothing queued).
    pub(crate) fn check_fits(&self, what: Input, len: usize, key: &[u8]) -> Result<()> {
        let Some(room) = self.log_room else {
            return Ok(());
        };
        let limit = room.field_max(key.len());
        if len > limit {
            return Err(Error::TooLarge {
                what,
                actual: len as u64,
                limit: limit as u64,
            });
        }
        Ok(())
    }

    /// `limit`, lowered so that one sweep's removals fit a batch of the storage.
    pub(crate) fn sweep_limit(&self, limit: usize) -> usize {
        match self.log_room {
            Some(room) => limit.min((room.batch_bytes / room.removal).max(1)),
            None => limit,
        }
    }

    /// The time of a decision made now: the clock, never earlier than an earlier decision.
    pub(crate) fn now_ms(&self) -> u64 {
        let now = self.clock.now_ms();
        self.last_now_ms.fetch_max(now, Ordering::SeqCst).max(now)
    }

    /// The clock's reading as it is, unclamped.
    pub(crate) fn clock_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The context of a state-machine decision made now (the one place a context is built
    /// from the store's state; the writer adds the next token and the quota state).
    pub(crate) fn ctx(&self) -> Ctx {
        Ctx::new(self.now_ms(), self.epoch)
    }

    /// `Err(Poisoned)` once a fatal error has stopped the writer.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(self.poisoned_error());
        }
        Ok(())
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    pub(crate) fn poisoned_error(&self) -> Error {
        Error::Poisoned {
            cause: self
                .poison_cause
                .lock()
                .clone()
                .unwrap_or_else(|| "unknown".into()),
        }
    }

    /// Stops all writes after a fatal error; says so once, through `tracing`.
    pub(crate) fn poison(&self, cause: &Error) {
        let mut c = self.poison_cause.lock();
        if c.is_none() {
            tracing::error!(
                epoch = self.epoch,
                cause = %cause,
                "idemstore: the store refuses writes from now on; reopen it"
            );
            *c = Some(cause.to_string());
        }
        self.poisoned.store(true, Ordering::SeqCst);
    }
}
