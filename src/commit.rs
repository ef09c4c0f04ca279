//! The group-commit writer: one thread owns redb's write transaction, drains everything
//! queued while the last commit was syncing, applies it in order in one transaction (each
//! operation sees the effects of the earlier ones), commits once and answers every caller.
//! No caller hears back before its batch's commit has returned.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use redb::{Database, ReadableDatabase, ReadableTable};

use crate::clock::Clock;
use crate::codec;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::record::split_scoped_key;
use crate::schema::{self, EXPIRY, META, META_NEXT_TOKEN, RECORDS, SCOPES};
use crate::transition::{self, Ctx, Op, Reply, Write};
use crate::wait::Waiters;

/// When an acknowledged write is on disk.
///
/// The level is fixed per store, so a reader never mistakes a relaxed write for a durable one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Acknowledged means fsynced: a completion survives `kill -9` and power loss. Concurrent
    /// callers share each fsync (group commit). The default.
    #[default]
    Immediate,
    /// Acknowledged before the fsync: a power loss or kernel crash may lose what was
    /// acknowledged in the last `max_unsynced` before it (a process crash loses it too, since
    /// unsynced commits live in the store's memory). Reads see acknowledged writes at once,
    /// including ones that a crash may take away. The writer makes a durable commit at least
    /// every `max_unsynced` while writes arrive, and [`Store::flush`](crate::Store::flush)
    /// forces one.
    Relaxed {
        /// The longest time an acknowledged write may stay unsynced.
        max_unsynced: Duration,
    },
}

/// What a caller asks the writer for.
#[derive(Debug)]
pub(crate) enum Command {
    Record { key: Vec<u8>, op: Op },
    Sweep { limit: usize },
    Flush,
}

/// The writer's answer to one command.
#[derive(Debug)]
pub(crate) enum Answer {
    Reply(Reply),
    Swept {
        visited: usize,
        removed: usize,
        more: bool,
    },
    Flushed,
}

/// A one-shot reply slot, awaited by a blocking caller or a future.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    result: Option<Result<Answer>>,
    waker: Option<Waker>,
    /// Whether `set` ran (the result may have been taken since).
    answered: bool,
}

impl Slot {
    fn set(&self, result: Result<Answer>) {
        let waker = {
            let mut s = self.state.lock();
            s.result = Some(result);
            s.answered = true;
            s.waker.take()
        };
        self.cv.notify_one();
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub(crate) fn wait(&self) -> Result<Answer> {
        let mut s = self.state.lock();
        loop {
            if let Some(r) = s.result.take() {
                return r;
            }
            self.cv.wait(&mut s);
        }
    }

    fn poll_answer(&self, cx: &mut Context<'_>) -> Poll<Result<Answer>> {
        let mut s = self.state.lock();
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

struct Job {
    command: Command,
    slot: Arc<Slot>,
}

impl Drop for Job {
    /// A job dropped unanswered — the writer panicked while applying its batch — tells its
    /// caller so, instead of leaving it waiting forever. Whether the batch committed is unknown.
    fn drop(&mut self) {
        if !self.slot.state.lock().answered {
            self.slot.set(Err(Error::CommitOutcomeUnknown {
                source: Box::new(Error::Storage(
                    "the writer thread panicked while applying this batch".into(),
                )),
            }));
        }
    }
}

/// The bounded commit queue: a full queue blocks blocking callers and parks async ones.
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    not_empty: Condvar,
    not_full: Condvar,
    capacity: usize,
}

struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
    space_wakers: Vec<Waker>,
}

enum Drained {
    Jobs(Vec<Job>),
    TimedOut,
    Closed,
}

impl Queue {
    pub(crate) fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::with_capacity(capacity.min(4096)),
                closed: false,
                space_wakers: Vec::new(),
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
        }
    }

    /// Queues `command`, blocking while the queue is full.
    pub(crate) fn submit(&self, command: Command) -> Result<Arc<Slot>> {
        let slot = Arc::new(Slot::default());
        let mut s = self.state.lock();
        loop {
            if s.closed {
                return Err(Error::Closed);
            }
            if s.jobs.len() < self.capacity {
                s.jobs.push_back(Job {
                    command,
                    slot: Arc::clone(&slot),
                });
                drop(s);
                self.not_empty.notify_one();
                return Ok(slot);
            }
            self.not_full.wait(&mut s);
        }
    }

    /// Queues `command` without blocking the thread: waits for space as a future.
    pub(crate) fn submit_async(&self, command: Command) -> SubmitFuture<'_> {
        SubmitFuture {
            queue: self,
            command: Some(command),
            slot: None,
        }
    }

    fn try_push(
        &self,
        command: &mut Option<Command>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Arc<Slot>>> {
        let mut s = self.state.lock();
        if s.closed {
            return Poll::Ready(Err(Error::Closed));
        }
        if s.jobs.len() < self.capacity {
            let slot = Arc::new(Slot::default());
            if let Some(command) = command.take() {
                s.jobs.push_back(Job {
                    command,
                    slot: Arc::clone(&slot),
                });
            }
            drop(s);
            self.not_empty.notify_one();
            return Poll::Ready(Ok(slot));
        }
        s.space_wakers.push(cx.waker().clone());
        Poll::Pending
    }

    fn drain(&self, max: usize, deadline: Option<Instant>) -> Drained {
        let mut s = self.state.lock();
        while s.jobs.is_empty() {
            if s.closed {
                return Drained::Closed;
            }
            match deadline {
                Some(d) => {
                    if self.not_empty.wait_until(&mut s, d).timed_out() && s.jobs.is_empty() {
                        return Drained::TimedOut;
                    }
                }
                None => self.not_empty.wait(&mut s),
            }
        }
        let n = s.jobs.len().min(max);
        let jobs: Vec<Job> = s.jobs.drain(..n).collect();
        let wakers = std::mem::take(&mut s.space_wakers);
        drop(s);
        self.not_full.notify_all();
        for w in wakers {
            w.wake();
        }
        Drained::Jobs(jobs)
    }

    pub(crate) fn close(&self) {
        let wakers = {
            let mut s = self.state.lock();
            s.closed = true;
            std::mem::take(&mut s.space_wakers)
        };
        self.not_empty.notify_all();
        self.not_full.notify_all();
        for w in wakers {
            w.wake();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.state.lock().jobs.len()
    }
}

/// Waits for queue space, then for the writer's answer.
pub(crate) struct SubmitFuture<'a> {
    queue: &'a Queue,
    command: Option<Command>,
    slot: Option<Arc<Slot>>,
}

impl Future for SubmitFuture<'_> {
    type Output = Result<Answer>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Answer>> {
        let this = self.get_mut();
        if this.slot.is_none() {
            match this.queue.try_push(&mut this.command, cx) {
                Poll::Ready(Ok(slot)) => this.slot = Some(slot),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        match &this.slot {
            Some(slot) => slot.poll_answer(cx),
            None => Poll::Ready(Err(Error::Closed)),
        }
    }
}

/// Counters kept by the writer, read by `stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub commits: AtomicU64,
    pub operations: AtomicU64,
    pub largest_batch: AtomicU64,
    pub swept: AtomicU64,
    pub next_token: AtomicU64,
}

/// The most expiry entries a sweep visits in a commit it shares with callers' operations, so
/// that sweeping a large backlog adds little to their latency. A sweep alone in its commit
/// visits its whole limit.
pub(crate) const SWEEP_SHARED_MAX: usize = 64;

/// The records table of one committed state, readable from any thread.
pub(crate) type RecordsSnapshot = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

/// State shared by the store handle, the writer and the sweeper.
pub(crate) struct Shared {
    /// The records table as of the latest commit, shared by every reader so that a read needs
    /// no transaction of its own. The writer replaces it after each commit and before
    /// answering that commit's callers, so a read that starts after an acknowledgement sees
    /// the acknowledged state or a newer one. `None` (readers open their own transaction)
    /// until the first refresh and after a failed commit or refresh.
    /// Declared before `db` so that it is dropped first.
    snapshot: RwLock<Option<Arc<RecordsSnapshot>>>,
    pub db: Database,
    pub clock: Arc<dyn Clock>,
    pub epoch: u64,
    pub durability: Durability,
    pub two_phase_commit: bool,
    /// The per-scope record quota, if any.
    pub quota: Option<u64>,
    pub queue: Queue,
    pub waiters: Waiters,
    pub counters: Counters,
    poisoned: AtomicBool,
    poison_cause: Mutex<Option<String>>,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        db: Database,
        clock: Arc<dyn Clock>,
        epoch: u64,
        next_token: u64,
        durability: Durability,
        two_phase_commit: bool,
        queue_capacity: usize,
        quota: Option<u64>,
    ) -> Shared {
        let counters = Counters::default();
        counters.next_token.store(next_token, Ordering::SeqCst);
        let shared = Shared {
            db,
            snapshot: RwLock::new(None),
            clock,
            epoch,
            durability,
            two_phase_commit,
            quota,
            queue: Queue::new(queue_capacity),
            waiters: Waiters::default(),
            counters,
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
        };
        shared.refresh_snapshot();
        shared
    }

    /// The record stored under `sk` in committed state: from the shared snapshot of the latest
    /// commit, or through a read transaction of its own while there is none.
    pub(crate) fn read_record(&self, sk: &[u8]) -> Result<Option<Record>> {
        let decode = |bytes: &[u8]| codec::decode(sk, bytes).map_err(|e| corrupt_record(sk, &e));
        let snapshot = self.snapshot.read().clone();
        if let Some(table) = snapshot {
            return match table.get(sk).map_err(Error::storage)? {
                Some(guard) => decode(guard.value()).map(Some),
                None => Ok(None),
            };
        }
        let read = self.db.begin_read().map_err(Error::storage)?;
        let table = read.open_table(RECORDS).map_err(Error::storage)?;
        match table.get(sk).map_err(Error::storage)? {
            Some(guard) => decode(guard.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Replaces the shared snapshot with the latest committed state; clears it if that cannot
    /// be read (readers then open their own transactions, and see the error themselves).
    pub(crate) fn refresh_snapshot(&self) {
        let open = std::panic::AssertUnwindSafe(|| {
            let read = self.db.begin_read().ok()?;
            read.open_table(RECORDS).ok().map(Arc::new)
        });
        let fresh = std::panic::catch_unwind(open).ok().flatten();
        *self.snapshot.write() = fresh;
    }

    /// Drops the shared snapshot: after a failed commit, or when the writer stops.
    pub(crate) fn clear_snapshot(&self) {
        *self.snapshot.write() = None;
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

    fn poisoned_error(&self) -> Error {
        Error::Poisoned {
            cause: self
                .poison_cause
                .lock()
                .clone()
                .unwrap_or_else(|| "unknown".into()),
        }
    }

    fn poison(&self, cause: &Error) {
        let mut c = self.poison_cause.lock();
        if c.is_none() {
            *c = Some(cause.to_string());
        }
        self.poisoned.store(true, Ordering::SeqCst);
    }
}

/// The writer thread's loop; returns when the queue is closed and drained.
pub(crate) fn run_writer(shared: &Shared, max_batch: usize) {
    let mut writer = Writer {
        shared,
        next_token: shared.counters.next_token.load(Ordering::SeqCst),
        last_now_ms: 0,
        unsynced_since: None,
    };
    loop {
        let deadline = match (shared.durability, writer.unsynced_since) {
            (Durability::Relaxed { max_unsynced }, Some(since)) => Some(since + max_unsynced),
            _ => None,
        };
        match shared.queue.drain(max_batch, deadline) {
            Drained::Jobs(jobs) => writer.process_guarded(jobs),
            Drained::TimedOut => writer.process_guarded(Vec::new()),
            Drained::Closed => {
                if writer.unsynced_since.is_some() {
                    writer.process_guarded(Vec::new());
                }
                shared.clear_snapshot();
                return;
            }
        }
    }
}

struct Writer<'a> {
    shared: &'a Shared,
    next_token: u64,
    last_now_ms: u64,
    unsynced_since: Option<Instant>,
}

impl Writer<'_> {
    /// [`Writer::process`], surviving a panic in it (redb may panic on a file damaged outside
    /// it when opened without `verify_on_open`): the batch's callers hear that its outcome is
    /// unknown (`Job`'s drop), the store is poisoned, and the writer keeps answering every
    /// later caller with `Poisoned` instead of leaving them blocked on a dead thread.
    fn process_guarded(&mut self, jobs: Vec<Job>) {
        let run = std::panic::AssertUnwindSafe(|| self.process(jobs));
        if let Err(panic) = std::panic::catch_unwind(run) {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            self.shared.poison(&Error::Storage(format!(
                "the writer thread panicked: {message}"
            )));
        }
    }

    /// Applies one batch in one transaction; an empty batch is a durable flush.
    fn process(&mut self, jobs: Vec<Job>) {
        if self.shared.is_poisoned() {
            for job in jobs {
                job.slot.set(Err(self.shared.poisoned_error()));
            }
            return;
        }
        let durable = match self.shared.durability {
            Durability::Immediate => true,
            Durability::Relaxed { max_unsynced } => {
                jobs.is_empty()
                    || jobs.iter().any(|j| matches!(j.command, Command::Flush))
                    || self
                        .unsynced_since
                        .is_some_and(|since| since.elapsed() >= max_unsynced)
            }
        };
        let token_before = self.next_token;
        let mut changed: Vec<usize> = Vec::new();
        match self.commit(&jobs, durable, &mut changed) {
            Ok(answers) => {
                self.unsynced_since = if durable {
                    None
                } else {
                    self.unsynced_since.or_else(|| Some(Instant::now()))
                };
                let c = &self.shared.counters;
                c.commits.fetch_add(1, Ordering::Relaxed);
                c.operations.fetch_add(jobs.len() as u64, Ordering::Relaxed);
                c.largest_batch
                    .fetch_max(jobs.len() as u64, Ordering::Relaxed);
                c.next_token.store(self.next_token, Ordering::SeqCst);
                // Readers must see this commit before any of its callers hears of it.
                self.shared.refresh_snapshot();
                for (job, answer) in jobs.iter().zip(answers) {
                    if let Ok(Answer::Swept { removed, .. }) = &answer {
                        c.swept.fetch_add(*removed as u64, Ordering::Relaxed);
                    }
                    job.slot.set(answer);
                }
                // Checked after the commit: a waiter that read the old state registered before
                // this commit became visible, so it is seen here.
                if !self.shared.waiters.is_empty() {
                    for i in changed {
                        if let Some(Job {
                            command: Command::Record { key, .. },
                            ..
                        }) = jobs.get(i)
                        {
                            self.shared.waiters.notify(key);
                        }
                    }
                }
            }
            Err(e) => {
                self.next_token = token_before;
                self.shared.clear_snapshot();
                self.shared.poison(&e);
                for job in &jobs {
                    job.slot.set(Err(e.duplicate()));
                }
            }
        }
    }

    fn now_ms(&mut self) -> u64 {
        // Never let time run backwards inside one process, whatever the wall clock does.
        self.last_now_ms = self.last_now_ms.max(self.shared.clock.now_ms());
        self.last_now_ms
    }

    fn commit(
        &mut self,
        jobs: &[Job],
        durable: bool,
        changed: &mut Vec<usize>,
    ) -> Result<Vec<Result<Answer>>> {
        let mut txn = self.shared.db.begin_write().map_err(Error::storage)?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })
        .map_err(|e| Error::Storage(e.to_string()))?;
        txn.set_two_phase_commit(self.shared.two_phase_commit);
        let mut answers = Vec::with_capacity(jobs.len());
        {
            let mut records = txn.open_table(RECORDS).map_err(Error::storage)?;
            let mut expiry = txn.open_table(EXPIRY).map_err(Error::storage)?;
            let mut scopes = txn.open_table(SCOPES).map_err(Error::storage)?;
            let mut tables = Tables {
                records: &mut records,
                expiry: &mut expiry,
                scopes: &mut scopes,
            };
            let token_before = self.next_token;
            for (i, job) in jobs.iter().enumerate() {
                let answer = match &job.command {
                    Command::Record { key, op } => {
                        let now_ms = self.now_ms();
                        let (answer, wrote) = self.apply(&mut tables, key, op.clone(), now_ms)?;
                        if wrote {
                            changed.push(i);
                        }
                        answer
                    }
                    Command::Sweep { limit } => {
                        let now_ms = self.now_ms();
                        // Sharing the commit with callers, a sweep takes a bounded share of it.
                        let limit = if jobs.len() > 1 {
                            (*limit).min(SWEEP_SHARED_MAX)
                        } else {
                            *limit
                        };
                        let (visited, removed, more) = sweep(&mut tables, now_ms, limit)?;
                        Ok(Answer::Swept {
                            visited,
                            removed,
                            more,
                        })
                    }
                    Command::Flush => Ok(Answer::Flushed),
                };
                answers.push(answer);
            }
            if self.next_token != token_before {
                let mut meta = txn.open_table(META).map_err(Error::storage)?;
                schema::put_u64(&mut meta, META_NEXT_TOKEN, self.next_token)?;
            }
        }
        txn.commit().map_err(|e| Error::CommitOutcomeUnknown {
            source: Box::new(Error::storage(e)),
        })?;
        Ok(answers)
    }

    /// Applies one record operation. The outer `Result` is a storage failure (fatal to the
    /// batch); the inner one is the caller's answer. Also says whether the record changed.
    fn apply(
        &mut self,
        tables: &mut Tables<'_, '_>,
        key: &[u8],
        op: Op,
        now_ms: u64,
    ) -> Result<(Result<Answer>, bool)> {
        let Tables {
            records,
            expiry,
            scopes,
        } = tables;
        let stored: Option<std::result::Result<Record, codec::DecodeError>> = records
            .get(key)
            .map_err(Error::storage)?
            .map(|g| codec::decode(key, g.value()));
        let stored = match stored {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                // `forget` is the way out of a corrupt record; everything else reports it.
                if matches!(op, Op::Forget) {
                    records.remove(key).map_err(Error::storage)?;
                    adjust_scope_count(scopes, key, -1)?;
                    return Ok((Ok(Answer::Reply(Reply::Forgotten(true))), true));
                }
                return Ok((Err(corrupt_record(key, &e)), false));
            }
        };
        // Only a claim that would create a new stored record can exceed the quota; one that
        // reuses an expired record's slot does not add to the count.
        let scope_full = match (self.shared.quota, &stored, &op) {
            (Some(limit), None, Op::Claim { .. }) => {
                (scope_count(scopes, key)? >= limit).then_some(limit)
            }
            _ => None,
        };
        let ctx = Ctx {
            now_ms,
            epoch: self.shared.epoch,
            next_token: self.next_token,
            scope_full,
        };
        let step = transition::apply(stored.as_ref(), op, &ctx);
        if step.token_used {
            self.next_token = self
                .next_token
                .checked_add(1)
                .ok_or_else(|| Error::corrupt("meta/next_token", "fencing tokens exhausted"))?;
        }
        let wrote = step.write != Write::Keep;
        match step.write {
            Write::Keep => {}
            Write::Put(next) => {
                let old_expiry = stored.as_ref().map(|r| r.expires_at_ms);
                if old_expiry != Some(next.expires_at_ms) {
                    if let Some(old) = old_expiry {
                        expiry.remove((old, key)).map_err(Error::storage)?;
                    }
                    expiry
                        .insert((next.expires_at_ms, key), ())
                        .map_err(Error::storage)?;
                }
                records
                    .insert(key, codec::encode(key, &next).as_slice())
                    .map_err(Error::storage)?;
                if stored.is_none() {
                    adjust_scope_count(scopes, key, 1)?;
                }
            }
            Write::Delete => {
                if let Some(old) = &stored {
                    expiry
                        .remove((old.expires_at_ms, key))
                        .map_err(Error::storage)?;
                }
                records.remove(key).map_err(Error::storage)?;
                adjust_scope_count(scopes, key, -1)?;
            }
        }
        Ok((step.reply.map(Answer::Reply), wrote))
    }
}

/// The tables a batch writes, opened once per transaction.
struct Tables<'a, 't> {
    records: &'a mut redb::Table<'t, &'static [u8], &'static [u8]>,
    expiry: &'a mut redb::Table<'t, (u64, &'static [u8]), ()>,
    scopes: &'a mut redb::Table<'t, &'static [u8], u64>,
}

fn scope_of(key: &[u8]) -> &[u8] {
    split_scoped_key(key).map_or(&[], |(scope, _)| scope)
}

fn scope_count(scopes: &redb::Table<&'static [u8], u64>, key: &[u8]) -> Result<u64> {
    Ok(scopes
        .get(scope_of(key))
        .map_err(Error::storage)?
        .map_or(0, |g| g.value()))
}

/// Adds `delta` (±1) to the stored-record count of `key`'s scope; a count of 0 is removed.
fn adjust_scope_count(
    scopes: &mut redb::Table<&'static [u8], u64>,
    key: &[u8],
    delta: i64,
) -> Result<()> {
    let scope = scope_of(key);
    let count = scope_count(scopes, key)?.saturating_add_signed(delta);
    if count == 0 {
        scopes.remove(scope).map_err(Error::storage)?;
    } else {
        scopes.insert(scope, count).map_err(Error::storage)?;
    }
    Ok(())
}

pub(crate) fn corrupt_record(key: &[u8], e: &codec::DecodeError) -> Error {
    Error::corrupt(
        format!("records/{}", crate::record::display_key(key)),
        e.to_string(),
    )
}

/// Removes up to `limit` entries of the expiry index that are due at `now_ms`, oldest first,
/// with the records they name. Returns (index entries visited, records removed, whether due
/// entries remain).
fn sweep(tables: &mut Tables<'_, '_>, now_ms: u64, limit: usize) -> Result<(usize, usize, bool)> {
    let Tables {
        records,
        expiry,
        scopes,
    } = tables;
    let empty: &[u8] = &[];
    let due_range = || (0u64, empty)..(now_ms.saturating_add(1), empty);
    let due: Vec<(u64, Vec<u8>)> = expiry
        .range(due_range())
        .map_err(Error::storage)?
        .take(limit)
        .map(|entry| {
            let (k, _) = entry.map_err(Error::storage)?;
            let (at, key) = k.value();
            Ok((at, key.to_vec()))
        })
        .collect::<Result<_>>()?;
    let mut removed = 0;
    // Per-scope record counts change once per sweep, not once per record.
    let mut per_scope: std::collections::BTreeMap<Vec<u8>, u64> = Default::default();
    for (at, key) in &due {
        expiry
            .remove((*at, key.as_slice()))
            .map_err(Error::storage)?;
        // Removed first and put back if it must stay (one tree walk for the common case).
        // Only a record that is itself due goes; a stale index entry or a corrupt record
        // (reported by reads, removed by `forget`) stays in place.
        let Some(old) = records.remove(key.as_slice()).map_err(Error::storage)? else {
            continue;
        };
        let goes = matches!(
            codec::decode(key, old.value()),
            Ok(r) if r.expires_at_ms == *at && r.is_expired(now_ms)
        );
        if goes {
            drop(old);
            *per_scope.entry(scope_of(key).to_vec()).or_default() += 1;
            removed += 1;
        } else {
            let bytes = old.value().to_vec();
            drop(old);
            records
                .insert(key.as_slice(), bytes.as_slice())
                .map_err(Error::storage)?;
        }
    }
    for (scope, gone) in per_scope {
        let count = scopes
            .get(scope.as_slice())
            .map_err(Error::storage)?
            .map_or(0, |g| g.value())
            .saturating_sub(gone);
        if count == 0 {
            scopes.remove(scope.as_slice()).map_err(Error::storage)?;
        } else {
            scopes
                .insert(scope.as_slice(), count)
                .map_err(Error::storage)?;
        }
    }
    let more = expiry
        .range(due_range())
        .map_err(Error::storage)?
        .next()
        .is_some();
    Ok((due.len(), removed, more))
}
