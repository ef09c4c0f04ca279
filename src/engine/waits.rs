//! Wake-ups for duplicates that wait for their original: one-shot signals, a per-key registry
//! the writer fires after a commit, and a timer thread that fires signals at deadlines so that
//! async waits are bounded without an async runtime.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

/// A one-shot event that a blocking thread or a future can wait on.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    state: Mutex<SignalState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct SignalState {
    fired: bool,
    waker: Option<Waker>,
}

impl Signal {
    pub(crate) fn fire(&self) {
        let waker = {
            let mut s = self.state.lock();
            s.fired = true;
            s.waker.take()
        };
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Blocks until fired or `deadline`; returns whether it fired.
    pub(crate) fn wait_until(&self, deadline: Instant) -> bool {
        let mut s = self.state.lock();
        while !s.fired {
            if self.cv.wait_until(&mut s, deadline).timed_out() {
                break;
            }
        }
        s.fired
    }

    /// A future that resolves once the signal fires.
    pub(crate) fn fired(self: &Arc<Self>) -> Fired {
        Fired {
            signal: Arc::clone(self),
        }
    }
}

/// Resolves when its [`Signal`] fires.
pub(crate) struct Fired {
    signal: Arc<Signal>,
}

impl Future for Fired {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.signal.state.lock();
        if s.fired {
            Poll::Ready(())
        } else {
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Signals registered per scoped key, fired when a commit changes that key's record.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<Vec<u8>, Vec<Arc<Signal>>>>,
    count: AtomicUsize,
}

impl Waiters {
    pub(crate) fn register(&self, key: &[u8]) -> Arc<Signal> {
        let signal = Arc::new(Signal::default());
        let mut map = self.map.lock();
        map.entry(key.to_vec())
            .or_default()
            .push(Arc::clone(&signal));
        self.count.fetch_add(1, Ordering::SeqCst);
        signal
    }

    pub(crate) fn unregister(&self, key: &[u8], signal: &Arc<Signal>) {
        let mut map = self.map.lock();
        if let Some(list) = map.get_mut(key) {
            let before = list.len();
            list.retain(|s| !Arc::ptr_eq(s, signal));
            self.count.fetch_sub(before - list.len(), Ordering::SeqCst);
            if list.is_empty() {
                map.remove(key);
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many signals are registered.
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Fires and drops every signal registered under `key`.
    pub(crate) fn notify(&self, key: &[u8]) {
        let fired = {
            let mut map = self.map.lock();
            let list = map.remove(key).unwrap_or_default();
            self.count.fetch_sub(list.len(), Ordering::SeqCst);
            list
        };
        for s in fired {
            s.fire();
        }
    }
}

/// Fires signals at deadlines from one thread, started on first use and stopped on drop.
#[derive(Debug, Default)]
pub(crate) struct Timer {
    inner: Arc<TimerInner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct TimerInner {
    state: Mutex<TimerState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct TimerState {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    signals: HashMap<u64, Weak<Signal>>,
    next_id: u64,
    stop: bool,
}

impl Timer {
    /// Fires `signal` at `deadline` unless it has been dropped by then.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) if the timer thread, started on first use, cannot be
    /// spawned (a process or cgroup thread limit).
    pub(crate) fn schedule(&self, deadline: Instant, signal: &Arc<Signal>) -> crate::Result<()> {
        {
            let mut thread = self.thread.lock();
            if thread.is_none() {
                let inner = Arc::clone(&self.inner);
                *thread = Some(
                    std::thread::Builder::new()
                        .name("idemstore-timer".into())
                        .spawn(move || inner.run())
                        .map_err(crate::Error::from_io)?,
                );
            }
        }
        let mut s = self.inner.state.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.heap.push(Reverse((deadline, id)));
        s.signals.insert(id, Arc::downgrade(signal));
        drop(s);
        self.inner.cv.notify_one();
        Ok(())
    }

    pub(crate) fn stop(&self) {
        self.inner.state.lock().stop = true;
        self.inner.cv.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl TimerInner {
    fn run(&self) {
        let mut s = self.state.lock();
        while !s.stop {
            let now = Instant::now();
            while let Some(Reverse((at, id))) = s.heap.peek().copied() {
                if at > now {
                    break;
                }
                s.heap.pop();
                if let Some(signal) = s.signals.remove(&id).and_then(|w| w.upgrade()) {
                    signal.fire();
                }
            }
            match s.heap.peek().copied() {
                Some(Reverse((at, _))) => {
                    self.cv.wait_until(&mut s, at);
                }
                None => self.cv.wait(&mut s),
            }
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.stop();
    }
}
