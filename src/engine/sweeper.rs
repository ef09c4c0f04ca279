//! Sweeping, and the background sweeper: removes expired records in bounded batches, walking
//! the expiry index from the oldest entry. Expiry itself is logical (a record past
//! `expires_at_ms` is absent to every operation); sweeping only reclaims space.
//!
//! With the write-ahead log, a sweep removes the due records only the database file holds
//! from the file itself, in a transaction of its own beside the writer
//! ([`Storage::sweep_base`]); the writer waits only while the sweep logs the removed keys and
//! their scopes' counts and marks the keys removed in the map. Where that cannot be (a due
//! record still in the map, or another storage), the sweep goes through the commit queue.
//!
//! [`Storage::sweep_base`]: crate::engine::storage::Storage::sweep_base

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::core::admin::Swept;
use crate::engine::durability::Durability;
use crate::engine::queue::Command;
use crate::engine::shared::Shared;
use crate::engine::writer;
use crate::error::{Error, Result};

/// Removes up to `limit` due expiry-index entries and their records (see `Store::sweep`):
/// beside the writer where the storage allows it, else through the commit queue.
pub(crate) fn sweep(shared: &Shared, limit: usize) -> Result<Swept> {
    shared.check_writable()?;
    let started = Instant::now();
    match shared
        .storage
        .sweep_base(shared.now_ms(), shared.sweep_limit(limit))
    {
        Ok(Some(swept)) => {
            if swept.removed > 0 {
                // Its removals are logged but not synced. At `Immediate`, the sweep is
                // acknowledged only once a sync of the writer's (shared with the callers'
                // commits it runs meanwhile) covers them, so that a crash cannot bring back
                // what it removed (visible again if the clock were set back); at `Relaxed`,
                // that sync follows at once, well within the window.
                if shared.durability == Durability::Immediate {
                    writer::submit_and_wait(shared, Command::Flush)?;
                } else {
                    shared.queue.submit_quietly(Command::Flush, false)?;
                    shared.queue.wake_writer();
                }
            }
            if swept.visited > 0 {
                let c = &shared.counters;
                c.commits.fetch_add(1, Ordering::Relaxed);
                c.operations.fetch_add(1, Ordering::Relaxed);
                c.largest_batch.fetch_max(1, Ordering::Relaxed);
                c.swept.fetch_add(swept.removed as u64, Ordering::Relaxed);
                shared.telemetry.committed(1, false, started.elapsed());
                shared.telemetry.swept(swept.removed);
            }
            Ok(swept)
        }
        Ok(None) => writer::submit_and_wait(shared, Command::Sweep { limit })?.into_swept(),
        Err(e) => {
            if matches!(e, Error::CommitOutcomeUnknown { .. }) {
                shared.telemetry.commit_failed();
                shared.poison(&e);
            }
            Err(e)
        }
    }
}

/// The running sweeper thread; stopped and joined by [`Sweeper::stop`].
pub(crate) struct Sweeper {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Sweeper {
    /// Starts the sweeper thread.
    ///
    /// # Errors
    /// [`Error::Io`] if the thread cannot be spawned (a process or cgroup thread limit).
    pub(crate) fn start(shared: Arc<Shared>, interval: Duration, batch: usize) -> Result<Sweeper> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("idemstore-sweeper".into())
            .spawn(move || run(&shared, &flag, interval, batch))
            .map_err(Error::from_io)?;
        Ok(Sweeper {
            stop,
            thread: Some(thread),
        })
    }

    pub(crate) fn stop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: &Shared, stop: &(Mutex<bool>, Condvar), interval: Duration, batch: usize) {
    loop {
        {
            // An interval too long to add to the clock is one that never ends.
            let deadline = Instant::now().checked_add(interval);
            let mut stopped = stop.0.lock();
            while !*stopped {
                match deadline {
                    Some(at) => {
                        if stop.1.wait_until(&mut stopped, at).timed_out() {
                            break;
                        }
                    }
                    None => stop.1.wait(&mut stopped),
                }
            }
            if *stopped {
                return;
            }
        }
        // Keep going while whole batches come back due; each batch is one bounded commit that
        // shares the queue with callers.
        loop {
            if *stop.0.lock() {
                return;
            }
            if shared.is_poisoned() {
                // The writer said why when it stopped; nothing can be swept until a reopen.
                tracing::warn!(
                    epoch = shared.epoch,
                    "idemstore: the sweeper stops: the store refuses writes"
                );
                return;
            }
            match sweep(shared, batch) {
                Ok(swept) if swept.more => {}
                Ok(_) => break,
                Err(Error::Closed) => return,
                // A poisoned store is reported once, above, on the next turn.
                Err(Error::Poisoned { .. } | Error::CommitOutcomeUnknown { .. }) => {}
                Err(e) => {
                    // Not fatal (a corrupt page met while sweeping, say): reported, then tried
                    // again at the next interval.
                    tracing::warn!(
                        epoch = shared.epoch,
                        error = %e,
                        "idemstore: a sweep failed; retrying at the next interval"
                    );
                    break;
                }
            }
        }
    }
}
