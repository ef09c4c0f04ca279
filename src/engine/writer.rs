//! The group-commit writer: one thread drains everything queued while the last commit was
//! syncing, applies it in order in one storage batch (each operation sees the effects of the
//! earlier ones), commits once and answers every caller. No caller hears back before its
//! batch's commit has returned, and readers see the commit before any caller does.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::engine::apply::{Apply, ScopeCounts};
use crate::engine::durability::Durability;
use crate::engine::queue::{Answer, Command, Drained, Job};
use crate::engine::shared::Shared;
use crate::engine::telemetry;
use crate::error::{Error, Result};

/// The most expiry entries a sweep visits in a commit it shares with callers' operations, so
/// that sweeping a large backlog adds little to their latency. A sweep alone in its commit
/// visits its whole limit.
pub(crate) const SWEEP_SHARED_MAX: usize = 64;

/// The writer thread's loop; returns when the queue is closed and drained.
pub(crate) fn run(shared: &Shared, max_batch: usize) {
    let mut writer = Writer {
        shared,
        next_token: shared.counters.next_token.load(Ordering::SeqCst),
        unsynced_since: None,
    };
    loop {
        let deadline = match (shared.durability, writer.unsynced_since) {
            (Durability::Relaxed { max_unsynced }, Some(since)) => Some(since + max_unsynced),
            _ => None,
        };
        match shared.queue.drain(max_batch, deadline) {
            Drained::Jobs(jobs) => {
                telemetry::queue(&shared.queue);
                writer.process_guarded(jobs);
            }
            Drained::TimedOut => writer.process_guarded(Vec::new()),
            Drained::Closed => {
                if writer.unsynced_since.is_some() {
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
    next_token: u64,
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
                        .unsynced_since
                        .is_some_and(|since| since.elapsed() >= max_unsynced)
            }
        };
        let token_before = self.next_token;
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
            Ok(answers) => {
                telemetry::committed(jobs.len(), durable, started.elapsed());
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
                for (job, answer) in jobs.iter().zip(answers) {
                    match &answer {
                        Ok(Answer::Swept(swept)) => {
                            c.swept.fetch_add(swept.removed as u64, Ordering::Relaxed);
                            telemetry::swept(swept.removed);
                        }
                        Err(Error::LeaseLost { .. }) => telemetry::lease_lost(),
                        _ => {}
                    }
                    job.slot.set(answer);
                }
                // Checked after the commit: a waiter that read the old state registered before
                // this commit became visible, so it is seen here.
                if !self.shared.waiters.is_empty() {
                    for key in &changed {
                        self.shared.waiters.notify(key);
                    }
                }
            }
            Err(e) => {
                telemetry::commit_failed();
                self.next_token = token_before;
                self.shared.storage.release_reads();
                self.shared.poison(&e);
                for job in &jobs {
                    job.slot.set(Err(e.clone()));
                }
            }
        }
    }

    /// Applies every command to one storage batch and commits it. Returns each command's
    /// answer and, in `changed`, the keys of the records that changed; an `Err` is a storage
    /// failure that fails the whole batch.
    fn commit(
        &mut self,
        commands: Vec<Command>,
        durable: bool,
        changed: &mut Vec<Vec<u8>>,
    ) -> Result<Vec<Result<Answer>>> {
        let shared = self.shared;
        let n = commands.len();
        let mut commands = Some(commands);
        let mut answers = Vec::with_capacity(n);
        let mut next_token = self.next_token;
        shared.storage.write(durable, &mut |batch| {
            let commands = commands
                .take()
                .ok_or_else(|| Error::Internal("a storage batch was applied twice".into()))?;
            let mut apply = Apply {
                batch,
                scopes: ScopeCounts::default(),
                next_token: self.next_token,
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
            if advanced != self.next_token {
                batch.set_next_token(advanced)?;
            }
            next_token = advanced;
            Ok(())
        })?;
        self.next_token = next_token;
        Ok(answers)
    }
}
