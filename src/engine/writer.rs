//! The group commit: whoever commits drains everything queued while the last commit was
//! syncing, applies it in order in one storage batch (each operation sees the effects of the
//! earlier ones), commits once and answers every caller (blocking callers wake one another,
//! see [`queue::answer_batch`]). No caller hears back before its batch's commit has returned,
//! and readers see the commit before any caller does.
//!
//! A blocking caller whose operation is alone in the queue, with no commit running, commits it
//! on its own thread ([`lead`]): a lone caller then pays no hand-off to the writer thread and
//! back on each operation. Otherwise, and for futures, the writer thread ([`run`]) commits.
//! Either way one commit runs at a time, under [`WriterState`]'s lock, so batches commit one
//! after the other and tokens stay monotonic.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::engine::apply::{Apply, ScopeCounts};
use crate::engine::durability::Durability;
use crate::engine::queue::{self, Answer, Command, Job, Work};
use crate::engine::shared::Shared;
use crate::error::{Error, Result};

/// The most expiry entries a sweep visits in a commit it shares with callers' operations, so
/// that sweeping a large backlog adds little to their latency. A sweep alone in its commit
/// visits its whole limit.
pub(crate) const SWEEP_SHARED_MAX: usize = 64;

/// What a commit carries from one batch to the next; locked by whoever commits.
#[derive(Debug)]
pub(crate) struct WriterState {
    /// The next fencing token to hand out.
    next_token: u64,
    /// Since when acknowledged writes wait for a sync (`Durability::Relaxed`).
    unsynced_since: Option<Instant>,
    /// The most operations in one batch.
    max_batch: usize,
}

impl WriterState {
    pub(crate) fn new(next_token: u64, max_batch: usize) -> WriterState {
        WriterState {
            next_token,
            unsynced_since: None,
            max_batch,
        }
    }

    /// When the writer thread must sync unsynced writes, if any wait.
    fn sync_deadline(&self, durability: Durability) -> Option<Instant> {
        match (durability, self.unsynced_since) {
            // A window too long to add to the clock never closes by itself: syncs then come
            // with `flush`, a durable batch, or the close.
            (Durability::Relaxed { max_unsynced }, Some(since)) => since.checked_add(max_unsynced),
            _ => None,
        }
    }
}

/// Queues `command` and returns its answer once its batch has committed: on this thread if
/// the command is alone in the queue and no commit is running, else by the writer thread.
/// Under concurrency the writer thread commits: it starts each batch as soon as the last one
/// returns, while a caller would first have to answer the others.
pub(crate) fn submit_and_wait(shared: &Shared, command: Command) -> Result<Answer> {
    let (slot, alone) = shared.queue.submit_quietly(command, true)?;
    if !(alone && lead(shared)) {
        shared.queue.wake_writer();
    }
    slot.wait()
}

/// Commits one batch of what is queued on this thread, unless a commit is running; returns
/// whether it ran. Whatever it leaves queued goes to the writer thread.
fn lead(shared: &Shared) -> bool {
    let Some(mut state) = shared.writer.try_lock() else {
        return false;
    };
    let was_synced = state.unsynced_since.is_none();
    Writer {
        shared,
        state: &mut state,
    }
    .process_queued();
    let unsynced = was_synced && state.unsynced_since.is_some();
    drop(state);
    if unsynced {
        // The writer thread sleeps without a deadline while nothing is unsynced: it must
        // learn of this write to sync it within the window.
        shared.queue.recheck_deadline();
    }
    if shared.queue.len() > 0 {
        // More than one batch was queued, or jobs came while this one committed.
        shared.queue.wake_writer();
    }
    true
}

/// The writer thread's loop: commits what callers queued without committing it themselves,
/// and syncs `Relaxed` writes when their window closes. Returns when the queue is closed and
/// drained.
pub(crate) fn run(shared: &Shared) {
    loop {
        let deadline = shared.writer.lock().sync_deadline(shared.durability);
        let work = shared.queue.wait_for_work(deadline);
        let mut state = shared.writer.lock();
        let mut writer = Writer {
            shared,
            state: &mut state,
        };
        match work {
            Work::Jobs => writer.process_queued(),
            Work::TimedOut => {
                // A caller's commit may have synced meanwhile.
                let due = writer
                    .state
                    .sync_deadline(shared.durability)
                    .is_some_and(|d| d <= Instant::now());
                if due {
                    writer.process_guarded(Vec::new());
                }
            }
            Work::Closed => {
                if writer.state.unsynced_since.is_some() {
                    writer.process_guarded(Vec::new());
                }
                shared.storage.release_reads();
                return;
            }
        }
    }
}

struct Writer<'a> {
    shared: &'a Shared,
    state: &'a mut WriterState,
}

impl Writer<'_> {
    /// Takes up to a batch of what is queued and commits it, if anything is queued.
    fn process_queued(&mut self) {
        let jobs = self
            .shared
            .queue
            .take(self.state.max_batch, self.shared.log_room);
        if !jobs.is_empty() {
            self.shared.telemetry.queue(&self.shared.queue);
            self.process_guarded(jobs);
        }
    }

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
            self.shared.storage.release_reads();
            self.shared.poison(&Error::Internal(format!(
                "the writer thread panicked: {message}"
            )));
        }
    }

    /// Applies one batch in one commit; an empty batch is a durable flush.
    fn process(&mut self, mut jobs: Vec<Job>) {
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
                        .state
                        .unsynced_since
                        .is_some_and(|since| since.elapsed() >= max_unsynced)
            }
        };
        let token_before = self.state.next_token;
        // The commands move into the batch (an outcome is never copied); each job keeps its
        // reply slot.
        let commands: Vec<Command> = jobs
            .iter_mut()
            .map(|job| std::mem::replace(&mut job.command, Command::Flush))
            .collect();
        let mut changed: Vec<Vec<u8>> = Vec::new();
        let started = Instant::now();
        let span = tracing::debug_span!("idemstore.commit", operations = jobs.len(), durable);
        let committed = span.in_scope(|| self.commit(commands, durable, &mut changed));
        match committed {
            Ok((answers, wrote)) => {
                let c = &self.shared.counters;
                if durable {
                    self.state.unsynced_since = None;
                } else if wrote {
                    self.state.unsynced_since.get_or_insert_with(Instant::now);
                }
                if wrote {
                    self.shared
                        .telemetry
                        .committed(jobs.len(), durable, started.elapsed());
                    c.commits.fetch_add(1, Ordering::Relaxed);
                    c.largest_batch
                        .fetch_max(jobs.len() as u64, Ordering::Relaxed);
                }
                c.operations.fetch_add(jobs.len() as u64, Ordering::Relaxed);
                c.next_token.store(self.state.next_token, Ordering::SeqCst);
                let mut answered = Vec::with_capacity(jobs.len());
                for (job, answer) in jobs.iter().zip(answers) {
                    match &answer {
                        Ok(Answer::Swept(swept)) => {
                            c.swept.fetch_add(swept.removed as u64, Ordering::Relaxed);
                            self.shared.telemetry.swept(swept.removed);
                        }
                        Err(Error::LeaseLost { .. }) => self.shared.telemetry.lease_lost(),
                        _ => {}
                    }
                    answered.push((Arc::clone(&job.slot), answer));
                }
                queue::answer_batch(answered);
                // Checked after the commit: a waiter that read the old state registered before
                // this commit became visible, so it is seen here.
                if !self.shared.waiters.is_empty() {
                    for key in &changed {
                        self.shared.waiters.notify(key);
                    }
                }
            }
            Err(e @ Error::TooLarge { .. }) => {
                // Refused before anything was written (a batch the storage cannot hold):
                // nothing changed, and the store goes on.
                self.state.next_token = token_before;
                for job in &jobs {
                    job.slot.set(Err(e.clone()));
                }
            }
            Err(e) => {
                self.shared.telemetry.commit_failed();
                self.state.next_token = token_before;
                self.shared.storage.release_reads();
                self.shared.poison(&e);
                for job in &jobs {
                    job.slot.set(Err(e.clone()));
                }
            }
        }
    }

    /// Applies every command to one storage batch and commits it. Returns each command's
    /// answer and whether anything was committed ([`Storage::write`]), and, in `changed`, the
    /// keys of the records that changed; an `Err` is a storage failure that fails the whole
    /// batch.
    ///
    /// [`Storage::write`]: crate::engine::storage::Storage::write
    fn commit(
        &mut self,
        commands: Vec<Command>,
        durable: bool,
        changed: &mut Vec<Vec<u8>>,
    ) -> Result<(Vec<Result<Answer>>, bool)> {
        let shared = self.shared;
        let n = commands.len();
        let mut commands = Some(commands);
        let mut answers = Vec::with_capacity(n);
        let mut next_token = self.state.next_token;
        let wrote = shared.storage.write(durable, &mut |batch| {
            let commands = commands
                .take()
                .ok_or_else(|| Error::Internal("a storage batch was applied twice".into()))?;
            let mut apply = Apply {
                batch,
                scopes: ScopeCounts::default(),
                next_token: self.state.next_token,
                quota: shared.quota,
            };
            for command in commands {
                let answer = match command {
                    Command::Record { key, op } => {
                        let (reply, wrote) = apply.record(&key, op, shared.ctx())?;
                        if wrote {
                            changed.push(key);
                        }
                        reply.map(Answer::Reply)
                    }
                    Command::Sweep { limit } => {
                        // Sharing the commit with callers, a sweep takes a bounded share of it.
                        let limit = if n > 1 {
                            limit.min(SWEEP_SHARED_MAX)
                        } else {
                            limit
                        };
                        let limit = shared.sweep_limit(limit);
                        Ok(Answer::Swept(apply.sweep(shared.now_ms(), limit)?))
                    }
                    Command::Flush => Ok(Answer::Flushed),
                };
                answers.push(answer);
            }
            let Apply {
                batch,
                scopes,
                next_token: advanced,
                ..
            } = apply;
            scopes.flush(batch)?;
            if advanced != self.state.next_token {
                batch.set_next_token(advanced)?;
            }
            next_token = advanced;
            Ok(())
        })?;
        self.state.next_token = next_token;
        Ok((answers, wrote))
    }
}
