//! Closing a store: stop the sweeper, let the writer finish and sync what is queued, stop the
//! timer and the reader threads, release the file. On every path: `close`, `close_async`, drop.

use std::sync::Arc;

use crate::engine::store::Store;
use crate::engine::waits::Signal;
use crate::error::{Error, Result};

impl Store {
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

    /// The async form of [`Store::close`]: the shutdown (which waits for the writer's last
    /// commit, an fsync) runs on a thread of its own while the caller awaits it, so an async
    /// executor's thread is never blocked by it. Dropping a store inside an async task blocks
    /// that task's thread for the same shutdown; close it this way instead.
    ///
    /// # Errors
    /// As [`Store::close`]. If no thread can be spawned for it, the shutdown runs on the
    /// caller's thread.
    pub async fn close_async(self) -> Result<()> {
        type Shared<T> = Arc<parking_lot::Mutex<Option<T>>>;
        let store: Shared<Store> = Arc::new(parking_lot::Mutex::new(Some(self)));
        let result: Shared<Result<()>> = Arc::default();
        let done = Arc::new(Signal::default());
        let spawned = std::thread::Builder::new()
            .name("idemstore-close".into())
            .spawn({
                let (store, result, done) =
                    (Arc::clone(&store), Arc::clone(&result), Arc::clone(&done));
                move || {
                    let close = || store.lock().take().map_or(Ok(()), Store::close);
                    let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(close))
                        .unwrap_or_else(|_| {
                            Err(Error::Internal("closing the store panicked".into()))
                        });
                    *result.lock() = Some(closed);
                    done.fire();
                }
            });
        if spawned.is_err() {
            // The closure, and its handle on the store, is gone with the failed spawn.
            let inline = store.lock().take();
            return inline.map_or(Ok(()), Store::close);
        }
        done.fired().await;
        result
            .lock()
            .take()
            .unwrap_or_else(|| Err(Error::Internal("the close thread gave no answer".into())))
    }

    pub(crate) fn shutdown(&mut self) {
        if let Some(mut s) = self.sweeper.take() {
            s.stop();
        }
        self.shared.queue.close();
        if let Some(w) = self.writer.take()
            && w.join().is_err()
        {
            // The writer catches panics while it applies a batch; one anywhere else is a
            // bug, and nothing is left to report it to.
            tracing::error!(
                epoch = self.shared.epoch,
                "idemstore: the writer thread panicked outside a batch"
            );
        }
        self.timer.stop();
        self.read_pool.stop();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}
