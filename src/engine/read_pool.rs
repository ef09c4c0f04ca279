//! Threads that run the reads of async calls, so that a read that goes to disk (a store larger
//! than redb's cache) never blocks an async executor's thread. Runtime-agnostic: a read is a
//! closure run on one of the pool's threads, and its result is awaited as a plain future.
//!
//! The pool's queue is bounded ([`READ_QUEUE_MAX`]): a full queue parks the submitting future
//! until a thread takes a read off it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// The most reads waiting for a pool thread.
pub(crate) const READ_QUEUE_MAX: usize = 4096;

type ReadJob = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<ReadJob>,
    closed: bool,
    space_wakers: Vec<Waker>,
}

#[derive(Default)]
struct PoolInner {
    state: Mutex<PoolState>,
    not_empty: Condvar,
}

/// A fixed set of reader threads.
pub(crate) struct ReadPool {
    inner: Arc<PoolInner>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ReadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPool")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl ReadPool {
    /// Starts `threads` reader threads.
    ///
    /// # Errors
    /// [`Error::Io`] if a thread cannot be spawned (those already started are stopped).
    pub(crate) fn start(threads: usize) -> Result<ReadPool> {
        let mut pool = ReadPool {
            inner: Arc::new(PoolInner::default()),
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let inner = Arc::clone(&pool.inner);
            let thread = std::thread::Builder::new()
                .name(format!("idemstore-reader-{i}"))
                .spawn(move || inner.run())
                .map_err(Error::from_io)?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// Runs `read` on a pool thread; the future resolves to its result.
    pub(crate) fn run<T, F>(&self, read: F) -> PoolRead<'_, T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let answer = Arc::new(Answer::default());
        let sender = Sender(Arc::clone(&answer));
        let job: ReadJob = Box::new(move || sender.send(read()));
        PoolRead {
            pool: self,
            job: Some(job),
            answer,
        }
    }

    /// Stops the threads once the queued reads are done, and joins them.
    pub(crate) fn stop(&mut self) {
        let wakers = {
            let mut s = self.inner.state.lock();
            s.closed = true;
            std::mem::take(&mut s.space_wakers)
        };
        self.inner.not_empty.notify_all();
        for w in wakers {
            w.wake();
        }
        for t in self.threads.drain(..) {
            // A read that panicked already failed its caller (the answer slot was dropped).
            let _ = t.join();
        }
    }
}

impl Drop for ReadPool {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PoolInner {
    fn run(&self) {
        loop {
            let job = {
                let mut s = self.state.lock();
                loop {
                    if let Some(job) = s.jobs.pop_front() {
                        let wakers = std::mem::take(&mut s.space_wakers);
                        drop(s);
                        for w in wakers {
                            w.wake();
                        }
                        break job;
                    }
                    if s.closed {
                        return;
                    }
                    self.not_empty.wait(&mut s);
                }
            };
            // A panicking read drops its sender unanswered, which answers its caller with an
            // error; the thread goes on serving.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
    }
}

/// The one-shot answer of a pool read.
struct Answer<T> {
    state: Mutex<AnswerState<T>>,
}

struct AnswerState<T> {
    result: Option<Result<T>>,
    answered: bool,
    waker: Option<Waker>,
}

/// The pool thread's side of an [`Answer`]: answers with an error if dropped unanswered (the
/// read panicked).
struct Sender<T>(Arc<Answer<T>>);

impl<T> Sender<T> {
    fn send(self, result: Result<T>) {
        self.0.set(result);
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if !self.0.state.lock().answered {
            self.0.set(Err(Error::Internal(
                "a read on the reader pool panicked".into(),
            )));
        }
    }
}

impl<T> Default for Answer<T> {
    fn default() -> Self {
        Answer {
            state: Mutex::new(AnswerState {
                result: None,
                answered: false,
                waker: None,
            }),
        }
    }
}

impl<T> Answer<T> {
    fn set(&self, result: Result<T>) {
        let waker = {
            let mut s = self.state.lock();
            s.result = Some(result);
            s.answered = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Waits for room in the pool's queue, then for the read's result.
pub(crate) struct PoolRead<'a, T> {
    pool: &'a ReadPool,
    job: Option<ReadJob>,
    answer: Arc<Answer<T>>,
}

impl<T> Future for PoolRead<'_, T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        if this.job.is_some() {
            let mut s = this.pool.inner.state.lock();
            if s.closed {
                return Poll::Ready(Err(Error::Closed));
            }
            if s.jobs.len() >= READ_QUEUE_MAX {
                s.space_wakers.push(cx.waker().clone());
                return Poll::Pending;
            }
            if let Some(job) = this.job.take() {
                s.jobs.push_back(job);
            }
            drop(s);
            this.pool.inner.not_empty.notify_one();
        }
        let mut s = this.answer.state.lock();
        if let Some(result) = s.result.take() {
            return Poll::Ready(result);
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        let thread = std::thread::current();
        let waker = Waker::from(Arc::new(Unpark(thread)));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::park();
        }
    }

    struct Unpark(std::thread::Thread);

    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    #[test]
    fn a_read_runs_on_a_pool_thread_and_returns_its_result() -> Result<()> {
        let pool = ReadPool::start(2)?;
        let name = block_on(pool.run(|| Ok(std::thread::current().name().map(str::to_owned))))?;
        assert!(name.is_some_and(|n| n.starts_with("idemstore-reader-")));
        Ok(())
    }

    #[test]
    fn a_panicking_read_is_an_internal_error_and_the_pool_keeps_serving() -> Result<()> {
        let pool = ReadPool::start(1)?;
        let failed = block_on(pool.run(|| -> Result<()> { panic!("read failed") }));
        assert!(matches!(failed, Err(Error::Internal(_))), "{failed:?}");
        assert_eq!(block_on(pool.run(|| Ok(7)))?, 7);
        Ok(())
    }
}
