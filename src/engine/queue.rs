//! The bounded commit queue between callers and the writer thread, and the one-shot reply slot
//! each caller waits on (blocking, or as a future). A full queue blocks blocking callers and
//! parks async ones: back-pressure instead of unbounded memory.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::core::admin::Swept;
use crate::core::transition::{Op, Reply};
use crate::engine::shared::LogRoom;
use crate::error::{Error, Result};

/// The most bytes of commands one drain takes (one commit), unless a single command is larger:
/// keeps a commit's transaction, or its write-ahead-log batch, bounded whatever the queue
/// holds.
pub(crate) const BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;

/// What a caller asks the writer for.
#[derive(Debug)]
pub(crate) enum Command {
    Record { key: Vec<u8>, op: Op },
    Sweep { limit: usize },
    Flush,
}

/// The writer's answer to one command.
#[derive(Debug)]
pub(crate) enum Answer {
    Reply(Reply),
    Swept(Swept),
    Flushed,
}

impl Answer {
    /// The reply to a record operation; any other answer is a broken invariant.
    pub(crate) fn into_reply(self) -> Result<Reply> {
        match self {
            Answer::Reply(reply) => Ok(reply),
            other => Err(unexpected("a record operation", &other)),
        }
    }

    /// The result of a sweep; any other answer is a broken invariant.
    pub(crate) fn into_swept(self) -> Result<Swept> {
        match self {
            Answer::Swept(swept) => Ok(swept),
            other => Err(unexpected("a sweep", &other)),
        }
    }
}

fn unexpected(command: &str, answer: &Answer) -> Error {
    Error::Internal(format!("the writer answered {command} with {answer:?}"))
}

/// A one-shot reply slot, awaited by a blocking caller or a future.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
    /// Whether a blocking caller is sure to [`Slot::wait`] for the answer, so that it may pass
    /// wake-ups on to other callers of its batch ([`answer_batch`]).
    relays: bool,
}

#[derive(Debug, Default)]
struct SlotState {
    result: Option<Result<Answer>>,
    waker: Option<Waker>,
    /// Whether `set` ran (the result may have been taken since).
    answered: bool,
    /// Slots whose answers are set and whose waiters this slot's waiter wakes once it has its
    /// own answer.
    relay: Vec<Arc<Slot>>,
}

impl Slot {
    pub(crate) fn set(&self, result: Result<Answer>) {
        let waker = self.store(result, Vec::new());
        self.cv.notify_one();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Sets the answer without waking the waiter, which learns of it from whoever relays to
    /// it, or finds it when it comes to wait. (Only slots of blocking callers are filled: no
    /// future waits on them.)
    fn fill(&self, result: Result<Answer>, relay: Vec<Arc<Slot>>) {
        if let Some(w) = self.store(result, relay) {
            w.wake();
        }
    }

    /// Stores the answer and the slots to relay to; returns the future's waker, if any.
    fn store(&self, result: Result<Answer>, relay: Vec<Arc<Slot>>) -> Option<Waker> {
        let mut s = self.state.lock();
        s.result = Some(result);
        s.answered = true;
        s.relay = relay;
        s.waker.take()
    }

    pub(crate) fn wait(&self) -> Result<Answer> {
        let (result, relay) = {
            let mut s = self.state.lock();
            loop {
                if let Some(r) = s.result.take() {
                    break (r, std::mem::take(&mut s.relay));
                }
                self.cv.wait(&mut s);
            }
        };
        for slot in relay {
            slot.cv.notify_one();
        }
        result
    }

    fn poll_answer(&self, cx: &mut Context<'_>) -> Poll<Result<Answer>> {
        let mut s = self.state.lock();
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// How many waiters the committing thread wakes itself, and how many each woken blocking
/// caller wakes in turn.
const RELAY_FAN_OUT: usize = 2;

/// Answers a committed batch. Futures and callers that may not wait are answered directly;
/// blocking callers are woken as a tree: the committing thread wakes the first
/// [`RELAY_FAN_OUT`], and each woken caller wakes the next ones before it returns. Waking a
/// batch of dozens of threads one by one would otherwise keep the committing thread from the
/// next batch for most of a sync's time; this way the wake-ups run on every core, and the
/// last caller of a batch waits for a few hops instead of a queue of them.
pub(crate) fn answer_batch(answers: Vec<(Arc<Slot>, Result<Answer>)>) {
    let mut slots = Vec::with_capacity(answers.len());
    let mut results = Vec::with_capacity(answers.len());
    for (slot, answer) in answers {
        if slot.relays {
            slots.push(slot);
            results.push(answer);
        } else {
            slot.set(answer);
        }
    }
    // Children before parents: a waiter that finds its answer (woken or not) relays only to
    // slots whose answers are set already. Node `i` relays to `(i + 1) * F ..= (i + 1) * F + F - 1`.
    for (i, (slot, answer)) in slots.iter().zip(results).enumerate().rev() {
        let first = (i + 1) * RELAY_FAN_OUT;
        let relay = slots
            .get(first..(first + RELAY_FAN_OUT).min(slots.len()))
            .unwrap_or_default()
            .to_vec();
        slot.fill(answer, relay);
    }
    for slot in slots.iter().take(RELAY_FAN_OUT) {
        slot.cv.notify_one();
    }
}

/// A queued command and the slot its answer goes to.
pub(crate) struct Job {
    pub(crate) command: Command,
    pub(crate) slot: Arc<Slot>,
    /// What the command weighs in the queue's byte budget.
    weight: usize,
}

/// The fixed cost counted for each queued command besides its byte fields.
pub(crate) const JOB_OVERHEAD_BYTES: usize = 128;

impl Command {
    /// The bytes the command holds: its key and the byte fields of its operation, plus a fixed
    /// overhead.
    fn weight(&self) -> usize {
        let payload = match self {
            Command::Record { key, op } => {
                key.len()
                    + match op {
                        Op::Claim { fingerprint, .. } => fingerprint.len(),
                        Op::Complete { outcome, .. } => outcome.len(),
                        Op::Checkpoint { checkpoint, .. } => checkpoint.len(),
                        Op::Fail { .. } | Op::Extend { .. } | Op::Forget => 0,
                    }
            }
            Command::Sweep { .. } | Command::Flush => 0,
        };
        payload + JOB_OVERHEAD_BYTES
    }
}

impl Drop for Job {
    /// A job dropped unanswered — the writer panicked while applying its batch — tells its
    /// caller so, instead of leaving it waiting forever. Whether the batch committed is unknown.
    fn drop(&mut self) {
        if !self.slot.state.lock().answered {
            self.slot.set(Err(Error::CommitOutcomeUnknown {
                source: Box::new(Error::Internal(
                    "the writer thread panicked while applying this batch".into(),
                )),
            }));
        }
    }
}

/// The bounded commit queue: a full queue blocks blocking callers and parks async ones. It is
/// full when it holds `capacity` commands or when the next one would take its bytes past
/// `capacity_bytes` (an empty queue takes any one command, so that no single operation within
/// the input limits waits forever).
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    not_empty: Condvar,
    not_full: Condvar,
    capacity: usize,
    capacity_bytes: usize,
}

struct QueueState {
    jobs: VecDeque<Job>,
    /// The summed weight of `jobs`.
    bytes: usize,
    closed: bool,
    space_wakers: Vec<Waker>,
    /// Set by [`Queue::recheck_deadline`], cleared when the writer thread sees it.
    recheck: bool,
}

impl QueueState {
    fn has_room(&self, weight: usize, capacity: usize, capacity_bytes: usize) -> bool {
        self.jobs.is_empty()
            || (self.jobs.len() < capacity && self.bytes.saturating_add(weight) <= capacity_bytes)
    }

    fn push(&mut self, command: Command, weight: usize, relays: bool) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            relays,
            ..Slot::default()
        });
        self.bytes = self.bytes.saturating_add(weight);
        self.jobs.push_back(Job {
            command,
            slot: Arc::clone(&slot),
            weight,
        });
        slot
    }
}

/// What [`Queue::wait_for_work`] found.
pub(crate) enum Work {
    /// At least one job is queued.
    Jobs,
    /// The deadline passed with nothing queued, or the deadline must be computed again
    /// ([`Queue::recheck_deadline`]).
    TimedOut,
    /// The queue is closed and empty.
    Closed,
}

impl Queue {
    pub(crate) fn new(capacity: usize, capacity_bytes: usize) -> Queue {
        Queue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::with_capacity(capacity.min(4096)),
                bytes: 0,
                closed: false,
                space_wakers: Vec::new(),
                recheck: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
            capacity_bytes,
        }
    }

    /// Queues `command`, blocking while the queue is full, without waking the writer thread:
    /// the caller either commits the queue itself or calls [`Queue::wake_writer`]. Returns the
    /// command's slot and whether it is alone in the queue. `waits`: the caller waits for the
    /// answer ([`Slot::wait`]) whatever happens, so it may relay wake-ups.
    pub(crate) fn submit_quietly(
        &self,
        command: Command,
        waits: bool,
    ) -> Result<(Arc<Slot>, bool)> {
        let weight = command.weight();
        let mut s = self.state.lock();
        loop {
            if s.closed {
                return Err(Error::Closed);
            }
            if s.has_room(weight, self.capacity, self.capacity_bytes) {
                let alone = s.jobs.is_empty();
                return Ok((s.push(command, weight, waits), alone));
            }
            self.not_full.wait(&mut s);
        }
    }

    /// Wakes the writer thread if it waits for work.
    pub(crate) fn wake_writer(&self) {
        self.not_empty.notify_one();
    }

    /// Makes the writer thread's [`Queue::wait_for_work`] return (`Work::TimedOut`), so that it
    /// computes its sync deadline again.
    pub(crate) fn recheck_deadline(&self) {
        self.state.lock().recheck = true;
        self.not_empty.notify_one();
    }

    /// Queues `command` without blocking the thread: waits for space as a future.
    pub(crate) fn submit_async(&self, command: Command) -> SubmitFuture<'_> {
        SubmitFuture {
            queue: self,
            command: Some(command),
            slot: None,
        }
    }

    fn try_push(
        &self,
        command: &mut Option<Command>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Arc<Slot>>> {
        let mut s = self.state.lock();
        if s.closed {
            return Poll::Ready(Err(Error::Closed));
        }
        let weight = command.as_ref().map_or(0, Command::weight);
        if s.has_room(weight, self.capacity, self.capacity_bytes) {
            let Some(command) = command.take() else {
                return Poll::Ready(Err(Error::Internal(
                    "a submit future was polled again after queueing its command".into(),
                )));
            };
            let slot = s.push(command, weight, false);
            drop(s);
            self.not_empty.notify_one();
            return Poll::Ready(Ok(slot));
        }
        s.space_wakers.push(cx.waker().clone());
        Poll::Pending
    }

    /// Waits until a job is queued (`Work::Jobs`), the queue is closed and empty
    /// (`Work::Closed`), or `deadline` passes with the queue empty (`Work::TimedOut`); forever
    /// if `deadline` is `None`. Takes nothing: see [`Queue::take`].
    pub(crate) fn wait_for_work(&self, deadline: Option<Instant>) -> Work {
        let mut s = self.state.lock();
        while s.jobs.is_empty() {
            if s.closed {
                return Work::Closed;
            }
            if std::mem::take(&mut s.recheck) {
                return Work::TimedOut;
            }
            match deadline {
                Some(d) => {
                    if self.not_empty.wait_until(&mut s, d).timed_out() && s.jobs.is_empty() {
                        return if s.closed {
                            Work::Closed
                        } else {
                            Work::TimedOut
                        };
                    }
                }
                None => self.not_empty.wait(&mut s),
            }
        }
        Work::Jobs
    }

    /// Takes up to `max` queued jobs and [`BATCH_BYTES_MAX`] bytes (at least one job, if any
    /// is queued), without waiting; with `room`, only as many as its batch holds.
    pub(crate) fn take(&self, max: usize, room: Option<LogRoom>) -> Vec<Job> {
        let mut s = self.state.lock();
        if s.jobs.is_empty() {
            return Vec::new();
        }
        // At most `max` commands and BATCH_BYTES_MAX bytes, and what the log always takes
        // with each command at its largest encoding (but always the first command).
        let log_cap = room.map_or(usize::MAX, |r| r.batch_bytes);
        let mut n = 0;
        let mut drained = 0usize;
        let mut encoded = 0usize;
        for job in s.jobs.iter().take(max) {
            let weight = drained.saturating_add(job.weight);
            let extra = room.map_or(0, |r| r.extra(&job.command));
            let bound = encoded.saturating_add(job.weight).saturating_add(extra);
            if n > 0 && (weight > BATCH_BYTES_MAX || bound > log_cap) {
                break;
            }
            drained = weight;
            encoded = bound;
            n += 1;
        }
        let jobs: Vec<Job> = s.jobs.drain(..n).collect();
        s.bytes = s.bytes.saturating_sub(drained);
        let wakers = std::mem::take(&mut s.space_wakers);
        drop(s);
        self.not_full.notify_all();
        for w in wakers {
            w.wake();
        }
        jobs
    }

    pub(crate) fn close(&self) {
        let wakers = {
            let mut s = self.state.lock();
            s.closed = true;
            std::mem::take(&mut s.space_wakers)
        };
        self.not_empty.notify_all();
        self.not_full.notify_all();
        for w in wakers {
            w.wake();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.state.lock().jobs.len()
    }

    /// The bytes the queued commands hold.
    pub(crate) fn bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

/// Waits for queue space, then for the writer's answer.
pub(crate) struct SubmitFuture<'a> {
    queue: &'a Queue,
    command: Option<Command>,
    slot: Option<Arc<Slot>>,
}

impl Future for SubmitFuture<'_> {
    type Output = Result<Answer>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Answer>> {
        let this = self.get_mut();
        if this.slot.is_none() {
            match this.queue.try_push(&mut this.command, cx) {
                Poll::Ready(Ok(slot)) => this.slot = Some(slot),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        match &this.slot {
            Some(slot) => slot.poll_answer(cx),
            None => Poll::Ready(Err(Error::Closed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(key: &[u8], outcome_len: usize) -> Command {
        Command::Record {
            key: key.to_vec(),
            op: Op::Complete {
                token: 1,
                outcome: vec![0; outcome_len],
                retention_ms: 1,
            },
        }
    }

    fn poll_push(queue: &Queue, command: &mut Option<Command>) -> Poll<Result<Arc<Slot>>> {
        let mut cx = Context::from_waker(Waker::noop());
        queue.try_push(command, &mut cx)
    }

    /// Every caller of a batch hears back, whether it waits before the answers come or after,
    /// whatever the batch's size, with futures' slots among them.
    #[test]
    fn every_waiter_of_an_answered_batch_wakes() {
        for n in [1usize, 2, 3, 7, 64, 200] {
            for early in [true, false] {
                let slots: Vec<Arc<Slot>> = (0..n)
                    .map(|i| {
                        Arc::new(Slot {
                            relays: i % 5 != 3,
                            ..Slot::default()
                        })
                    })
                    .collect();
                let (heard, hearing) = std::sync::mpsc::channel();
                for (i, slot) in slots.iter().enumerate() {
                    let slot = Arc::clone(slot);
                    let heard = heard.clone();
                    std::thread::spawn(move || {
                        if !early {
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                        let answer = slot.wait();
                        let _ = heard.send((i, answer));
                    });
                }
                if early {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                answer_batch(
                    slots
                        .iter()
                        .map(|s| (Arc::clone(s), Ok(Answer::Reply(Reply::Forgotten(true)))))
                        .collect(),
                );
                let mut woken = vec![false; n];
                for _ in 0..n {
                    // A lost wake-up leaves a waiter blocked: it never reports.
                    let (i, answer) = hearing
                        .recv_timeout(std::time::Duration::from_secs(30))
                        .unwrap_or_else(|_| {
                            panic!("batch of {n}, early {early}: a waiter never woke")
                        });
                    assert!(matches!(answer, Ok(Answer::Reply(Reply::Forgotten(true)))));
                    if let Some(w) = woken.get_mut(i) {
                        *w = true;
                    }
                }
                assert!(woken.iter().all(|w| *w));
            }
        }
    }

    #[test]
    fn a_command_that_would_pass_the_byte_budget_waits_for_room() {
        let queue = Queue::new(100, 10_000);
        let mut first = Some(complete(b"a", 9_000));
        assert!(matches!(poll_push(&queue, &mut first), Poll::Ready(Ok(_))));
        let mut second = Some(complete(b"b", 2_000));
        assert!(poll_push(&queue, &mut second).is_pending());
        assert!(queue.bytes() > 9_000);
        assert!(matches!(queue.wait_for_work(None), Work::Jobs));
        let jobs = queue.take(10, None);
        assert_eq!((jobs.len(), queue.bytes()), (1, 0));
        assert!(matches!(poll_push(&queue, &mut second), Poll::Ready(Ok(_))));
        drop(jobs);
    }

    #[test]
    fn an_empty_queue_takes_one_command_larger_than_its_budget() {
        let queue = Queue::new(100, 1_000);
        let mut big = Some(complete(b"a", 5_000));
        assert!(matches!(poll_push(&queue, &mut big), Poll::Ready(Ok(_))));
        let mut small = Some(complete(b"b", 1));
        assert!(poll_push(&queue, &mut small).is_pending());
    }

    #[test]
    fn the_operation_count_still_bounds_the_queue() {
        let queue = Queue::new(2, usize::MAX);
        for key in [b"a", b"b"] {
            let mut c = Some(complete(key, 1));
            assert!(matches!(poll_push(&queue, &mut c), Poll::Ready(Ok(_))));
        }
        let mut third = Some(complete(b"c", 1));
        assert!(poll_push(&queue, &mut third).is_pending());
    }

    #[test]
    fn a_drain_takes_only_what_the_log_holds_but_always_one_command() {
        let queue = Queue::new(100, usize::MAX);
        for key in [b"a", b"b", b"c", b"d"] {
            let mut c = Some(complete(key, 1_000));
            assert!(matches!(poll_push(&queue, &mut c), Poll::Ready(Ok(_))));
        }
        let weight = 1 + 1_000 + JOB_OVERHEAD_BYTES;
        let room = LogRoom {
            batch_bytes: 2 * (weight + 500) + 10,
            op_extra: 500,
            kept_checkpoint: 0,
            removal: 100,
        };
        assert_eq!(queue.take(10, Some(room)).len(), 2);
        assert_eq!(queue.take(10, Some(room)).len(), 2);
        // A sweep counts its removals: 20 of them do not fit beside a command, alone they do.
        let mut e = Some(complete(b"e", 1_000));
        assert!(matches!(poll_push(&queue, &mut e), Poll::Ready(Ok(_))));
        let mut sweep = Some(Command::Sweep { limit: 20 });
        assert!(matches!(poll_push(&queue, &mut sweep), Poll::Ready(Ok(_))));
        assert_eq!(queue.take(10, Some(room)).len(), 1);
        let jobs = queue.take(10, Some(room));
        assert_eq!(jobs.len(), 1);
        assert!(matches!(
            jobs.first().map(|j| &j.command),
            Some(Command::Sweep { .. })
        ));
        for key in [b"f", b"g"] {
            let mut c = Some(complete(key, 1_000));
            assert!(matches!(poll_push(&queue, &mut c), Poll::Ready(Ok(_))));
        }
        let tiny = LogRoom {
            batch_bytes: 10,
            ..room
        };
        assert_eq!(queue.take(10, Some(tiny)).len(), 1);
        assert_eq!(queue.take(10, None).len(), 1);
    }
}
