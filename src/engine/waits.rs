//! Wake-ups for duplicates that wait for their original: one-shot signals, a per-key registry
//! the writer fires after a commit, and a timer thread that fires signals at deadlines so that
//! async waits are bounded without an async runtime.

use std::collections::{BTreeMap, HashMap};
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

/// The most duplicate claims that wait for their originals at once, per store.
pub(crate) const WAITERS_MAX: usize = 65_536;

/// Signals registered per scoped key, fired when a commit changes that key's record. At most
/// `capacity` at once: a claim that finds no room does not wait (it answers in progress at
/// once, as without [`ClaimOptions::wait`](crate::ClaimOptions::wait)).
#[derive(Debug)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<Vec<u8>, Vec<Arc<Signal>>>>,
    count: AtomicUsize,
    capacity: usize,
}

impl Default for Waiters {
    fn default() -> Self {
        Waiters::with_capacity(WAITERS_MAX)
    }
}

impl Waiters {
    pub(crate) fn with_capacity(capacity: usize) -> Waiters {
        Waiters {
            map: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
            capacity,
        }
    }

    /// A signal fired when `key`'s record changes, or `None` when `capacity` waiters are
    /// registered already.
    pub(crate) fn register(&self, key: &[u8]) -> Option<Arc<Signal>> {
        let mut map = self.map.lock();
        if self.count.load(Ordering::SeqCst) >= self.capacity {
            return None;
        }
        let signal = Arc::new(Signal::default());
        map.entry(key.to_vec())
            .or_default()
            .push(Arc::clone(&signal));
        self.count.fetch_add(1, Ordering::SeqCst);
        Some(signal)
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

/// Fires signals at deadlines from one thread, started with the store (never from inside an
/// async call) and stopped on drop. A scheduled wake-up is removed as soon as its waiter
/// stops waiting ([`Scheduled`]'s drop), so a cancelled wait leaves nothing behind.
#[derive(Debug)]
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
    /// Wake-ups by deadline; the id keeps equal deadlines apart.
    due: BTreeMap<(Instant, u64), Weak<Signal>>,
    next_id: u64,
    stop: bool,
}

/// A wake-up scheduled on the [`Timer`]; dropping it cancels the wake-up.
pub(crate) struct Scheduled<'a> {
    timer: &'a Timer,
    entry: (Instant, u64),
}

impl Drop for Scheduled<'_> {
    fn drop(&mut self) {
        self.timer.inner.state.lock().due.remove(&self.entry);
    }
}

impl Timer {
    /// Starts the timer thread.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) if the thread cannot be spawned (a process or cgroup
    /// thread limit).
    pub(crate) fn start() -> crate::Result<Timer> {
        let inner = Arc::new(TimerInner::default());
        let runner = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("idemstore-timer".into())
            .spawn(move || runner.run())
            .map_err(crate::Error::from_io)?;
        Ok(Timer {
            inner,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Fires `signal` at `deadline` unless the returned guard or the signal is dropped first.
    pub(crate) fn schedule(&self, deadline: Instant, signal: &Arc<Signal>) -> Scheduled<'_> {
        let mut s = self.inner.state.lock();
        let entry = (deadline, s.next_id);
        s.next_id = s.next_id.wrapping_add(1);
        s.due.insert(entry, Arc::downgrade(signal));
        drop(s);
        self.inner.cv.notify_one();
        Scheduled { timer: self, entry }
    }

    /// How many wake-ups are scheduled.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.state.lock().due.len()
    }

    pub(crate) fn stop(&self) {
        self.inner.state.lock().stop = true;
        self.inner.cv.notify_all();
        if let Some(t) = self.thread.lock().take() {
            // The timer thread only fires signals; a panic there has nothing left to report.
            let _ = t.join();
        }
    }
}

impl TimerInner {
    fn run(&self) {
        let mut s = self.state.lock();
        while !s.stop {
            let now = Instant::now();
            while let Some(entry) = s.due.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                if let Some(signal) = entry.remove().upgrade() {
                    signal.fire();
                }
            }
            match s.due.keys().next().copied() {
                Some((at, _)) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_cancelled_wake_up_leaves_nothing_scheduled() -> crate::Result<()> {
        let timer = Timer::start()?;
        let signal = Arc::new(Signal::default());
        let far = Instant::now() + Duration::from_secs(3600);
        {
            let _a = timer.schedule(far, &signal);
            let _b = timer.schedule(far, &signal);
            assert_eq!(timer.len(), 2);
        }
        assert_eq!(timer.len(), 0);
        Ok(())
    }

    #[test]
    fn a_wake_up_fires_at_its_deadline() -> crate::Result<()> {
        let timer = Timer::start()?;
        let signal = Arc::new(Signal::default());
        let _scheduled = timer.schedule(Instant::now() + Duration::from_millis(5), &signal);
        assert!(signal.wait_until(Instant::now() + Duration::from_secs(10)));
        Ok(())
    }

    #[test]
    fn registrations_past_the_cap_are_refused() {
        let waiters = Waiters::with_capacity(2);
        let a = waiters.register(b"k");
        let b = waiters.register(b"k");
        assert!(a.is_some() && b.is_some());
        assert!(waiters.register(b"other").is_none());
        if let Some(a) = &a {
            waiters.unregister(b"k", a);
        }
        assert!(waiters.register(b"other").is_some());
    }
}
