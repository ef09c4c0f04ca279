//! The background sweeper: removes expired records through the commit queue in bounded
//! batches, walking the expiry index from the oldest entry. Expiry itself is logical (a record
//! past `expires_at_ms` is absent to every operation); sweeping only reclaims space.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::commit::{Answer, Command, Shared};

/// The running sweeper thread; stopped and joined by [`Sweeper::stop`].
pub(crate) struct Sweeper {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Sweeper {
    pub(crate) fn start(shared: Arc<Shared>, interval: Duration, batch: usize) -> Sweeper {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("idemstore-sweeper".into())
            .spawn(move || run(&shared, &flag, interval, batch))
            .expect("spawning the sweeper thread needs only memory");
        Sweeper {
            stop,
            thread: Some(thread),
        }
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
            if *stop.0.lock() || shared.is_poisoned() {
                break;
            }
            let more = match shared
                .queue
                .submit(Command::Sweep { limit: batch })
                .and_then(|slot| slot.wait())
            {
                Ok(Answer::Swept { more, .. }) => more,
                _ => break,
            };
            if !more {
                break;
            }
        }
    }
}
