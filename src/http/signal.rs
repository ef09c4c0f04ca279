//! The lease-lost signal: set once by the layer when a running request's lease is lost, read
//! and awaited by its handler through [`IdempotentRequest`](super::IdempotentRequest).
//!
//! A one-shot flag with a list of wakers, written here rather than taken from Tokio's `sync`
//! module so that the layer needs no more of Tokio than its runtime and timers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

/// The signal of one lease, shared by the layer (which sets it) and every clone of the
/// request's extension (which read and await it). Once set, it stays set.
#[derive(Clone, Default)]
pub(crate) struct LostSignal {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Set once, under the `waiters` lock, never cleared.
    lost: AtomicBool,
    waiters: Mutex<Waiters>,
}

/// The wakers of the pending [`Lost`] futures: one entry per future that has been polled and
/// not yet dropped or woken, so the list is bounded by the futures alive.
#[derive(Default)]
struct Waiters {
    next_id: u64,
    wakers: Vec<(u64, Waker)>,
}

impl LostSignal {
    /// A signal not set.
    pub(crate) fn new() -> Self {
        LostSignal::default()
    }

    /// Sets the signal and wakes every waiting future. Returns whether this call set it: `false`
    /// if it was set already, so a caller counts each lost lease once.
    pub(crate) fn set(&self) -> bool {
        let woken = {
            let mut waiters = self.shared.waiters.lock();
            if self.shared.lost.swap(true, Ordering::AcqRel) {
                return false;
            }
            std::mem::take(&mut waiters.wakers)
        };
        // Wake outside the lock: a waker may run the woken task at once.
        for (_, waker) in woken {
            waker.wake();
        }
        true
    }

    /// Whether the signal is set.
    pub(crate) fn is_set(&self) -> bool {
        self.shared.lost.load(Ordering::Acquire)
    }

    /// A future that resolves once the signal is set (at once if it is set already).
    pub(crate) fn wait(&self) -> Lost {
        Lost {
            shared: Arc::clone(&self.shared),
            id: None,
        }
    }
}

impl fmt::Debug for LostSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LostSignal")
            .field("lost", &self.is_set())
            .finish()
    }
}

/// Resolves once its [`LostSignal`] is set.
pub(crate) struct Lost {
    shared: Arc<Shared>,
    /// This future's entry in the waiters, once it has been polled while the signal was unset.
    id: Option<u64>,
}

impl Future for Lost {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.shared.lost.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let mut waiters = this.shared.waiters.lock();
        // `set` flips the flag under this lock: checked again here, no wake-up can be missed.
        if this.shared.lost.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let registered = this
            .id
            .and_then(|id| waiters.wakers.iter_mut().find(|(entry, _)| *entry == id));
        match registered {
            Some((_, waker)) => waker.clone_from(cx.waker()),
            None => {
                let id = waiters.next_id;
                waiters.next_id = waiters.next_id.wrapping_add(1);
                waiters.wakers.push((id, cx.waker().clone()));
                this.id = Some(id);
            }
        }
        Poll::Pending
    }
}

impl Drop for Lost {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared
                .waiters
                .lock()
                .wakers
                .retain(|(entry, _)| *entry != id);
        }
    }
}

impl fmt::Debug for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lost")
            .field("lost", &self.shared.lost.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(future: &mut Lost, waker: &Arc<CountingWaker>) -> Poll<()> {
        let waker = Waker::from(Arc::clone(waker));
        Pin::new(future).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_waiting_future_is_woken_once_and_then_ready() {
        let signal = LostSignal::new();
        let counter = Arc::new(CountingWaker::default());
        let mut lost = signal.wait();
        assert_eq!(poll(&mut lost, &counter), Poll::Pending);
        assert_eq!(
            poll(&mut lost, &counter),
            Poll::Pending,
            "a second poll reuses its entry"
        );
        assert!(!signal.is_set());
        assert!(signal.set(), "the first set sets it");
        assert!(!signal.set(), "a second set reports it was set already");
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(signal.is_set());
        assert_eq!(poll(&mut lost, &counter), Poll::Ready(()));
        assert_eq!(
            poll(&mut signal.wait(), &counter),
            Poll::Ready(()),
            "a future made after the set is ready at once"
        );
    }

    #[test]
    fn a_dropped_future_leaves_no_waker_behind() {
        let signal = LostSignal::new();
        let counter = Arc::new(CountingWaker::default());
        for _ in 0..10 {
            let mut lost = signal.wait();
            assert_eq!(poll(&mut lost, &counter), Poll::Pending);
        }
        assert!(signal.shared.waiters.lock().wakers.is_empty());
        let clone = signal.clone();
        let mut lost = clone.wait();
        assert_eq!(poll(&mut lost, &counter), Poll::Pending);
        assert_eq!(signal.shared.waiters.lock().wakers.len(), 1);
        signal.set();
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "only the live future is woken"
        );
        assert!(clone.is_set(), "clones share the signal");
    }
}
