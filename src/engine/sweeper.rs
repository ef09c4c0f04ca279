//! The background sweeper: removes expired records through the commit queue in bounded
//! batches, walking the expiry index from the oldest entry. Expiry itself is logical (a record
//! past `expires_at_ms` is absent to every operation); sweeping only reclaims space.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::engine::queue::Command;
use crate::engine::shared::Shared;
use crate::error::{Error, Result};

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
            let deadline = Instant::now() + interval;
            let mut stopped = stop.0.lock();
            while !*stopped {
                if stop.1.wait_until(&mut stopped, deadline).timed_out() {
                    break;
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
            let swept = shared
                .queue
                .submit(Command::Sweep { limit: batch })
                .and_then(|slot| slot.wait())
                .and_then(|answer| answer.into_swept());
            match swept {
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
