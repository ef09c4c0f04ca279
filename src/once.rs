//! Run a function once per idempotency key, outside HTTP: for job runners and message
//! consumers that see the same work more than once (redelivery, retries, restarts).
//!
//! [`run`] (over a [`Store`], blocking) and [`run_async`] (over any
//! [`IdempotencyBackend`]) claim `(scope, key)`, run the caller's function under the lease,
//! and store its result, serialized with serde, as the record's outcome. Every later call with
//! the same key and fingerprint gets that result back, deserialized into the caller's type,
//! without running the function again. The function says how it failed:
//!
//! - [`JobError::Retry`]: a transient failure; the claim is released (`fail`), nothing is
//!   stored, and the next call runs the function again (as attempt + 1, with the last
//!   checkpoint);
//! - [`JobError::Fatal`]: a final answer; the error is stored like a success and replayed to
//!   every later call as [`OnceError::Fatal`];
//! - [`JobError::Store`] (what `?` on an [`Error`] inside the function makes): released like
//!   `Retry`, returned as [`OnceError::Store`].
//!
//! The function receives a [`Job`] (a [`JobAsync`] for [`run_async`]): the lease's attempt and
//! the previous attempt's checkpoint, a way to store a new checkpoint and to extend the lease.
//! Fencing holds as everywhere: if the lease was lost (another caller took the work over after
//! the lease ran out), `checkpoint` and `extend` fail with [`Error::LeaseLost`] and the result
//! is not stored ([`OnceError::Store`] with `LeaseLost`); the successor's answer stands.
//!
//! A panic in the function releases the claim, as [`JobError::Retry`] does, and then goes on
//! unwinding: the next call runs the function again at once (attempt + 1, with the last
//! checkpoint). A [`run_async`] future dropped before it finishes (a timeout, an aborted task)
//! cannot release anything: the claim stays in flight until its lease ends, as after a crash,
//! and later calls get [`OnceError::InProgress`] until then; the first call after it takes the
//! work over, again as attempt + 1 with the last checkpoint. Keep leases short where jobs are
//! cancelled, or extend them as the work goes ([`JobAsync::extend`]).
//!
//! ```
//! use idemstore::once::{self, JobError, OnceError};
//! use idemstore::{ClaimOptions, Store};
//!
//! let store = Store::in_memory()?;
//! let options = ClaimOptions::default();
//! let mut charged = 0;
//! for _delivery in 0..3 {
//!     // The same message, delivered three times: charged once, the same receipt each time.
//!     let receipt: Result<String, OnceError<String>> =
//!         once::run(&store, "payments-queue", "msg-42", b"charge 100", &options, |job| {
//!             charged += 1;
//!             Ok::<_, JobError<String>>(format!("receipt for attempt {}", job.attempt()))
//!         });
//!     assert_eq!(receipt.map_err(|e| e.to_string())?, "receipt for attempt 1");
//! }
//! assert_eq!(charged, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::task::Poll;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::IdempotencyBackend;
use crate::core::claim::{Claim, ClaimOptions, Lease};
use crate::engine::Store;
use crate::error::Error;

/// How a job's function failed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum JobError<E> {
    /// Transient: release the claim, store nothing; the next call runs the function again.
    Retry(E),
    /// Final: store the error and replay it to every later call.
    Fatal(E),
    /// The job stopped on a store error (a lost lease from `checkpoint` or `extend`, say):
    /// nothing is stored, the claim is released if this lease still holds it, and the error is
    /// returned as [`OnceError::Store`]. `?` on an [`Error`] inside a job makes this.
    Store(Error),
}

impl<E> From<Error> for JobError<E> {
    fn from(e: Error) -> Self {
        JobError::Store(e)
    }
}

/// Why [`run`] or [`run_async`] returned no value.
#[derive(Debug)]
#[non_exhaustive]
pub enum OnceError<E> {
    /// The function failed transiently in this call ([`JobError::Retry`]); the claim was
    /// released, so a later call runs it again.
    Retry(E),
    /// The function failed finally, in this call or (replayed) in an earlier one.
    Fatal(E),
    /// Another call is running the function for this key now; try again after `retry_after`
    /// (or pass [`ClaimOptions::wait`] to wait for it).
    InProgress {
        /// Time left on the other call's lease.
        retry_after: Duration,
    },
    /// The key was used for work with another fingerprint.
    Mismatch,
    /// The function's result could not be serialized (the claim was released), or the stored
    /// result could not be read back as this call's types (they changed since it was
    /// stored).
    Serialization(String),
    /// The store refused or failed: input limits, a lost lease (the result was then not
    /// stored), storage errors.
    Store(Error),
}

impl<E: fmt::Display> fmt::Display for OnceError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnceError::Retry(e) => write!(f, "the job failed and may be retried: {e}"),
            OnceError::Fatal(e) => write!(f, "the job failed: {e}"),
            OnceError::InProgress { retry_after } => {
                write!(
                    f,
                    "the job is running elsewhere; retry after {retry_after:?}"
                )
            }
            OnceError::Mismatch => f.write_str("the key was used for other work"),
            OnceError::Serialization(why) => write!(f, "the job's result: {why}"),
            OnceError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for OnceError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OnceError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl<E> From<Error> for OnceError<E> {
    fn from(e: Error) -> Self {
        OnceError::Store(e)
    }
}

/// The lease a blocking job's function runs under ([`run`]).
#[derive(Debug)]
pub struct Job<'a> {
    store: &'a Store,
    lease: Lease,
}

impl Job<'_> {
    /// Which attempt this is: 1 for the first run, higher after a retry or a takeover.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.lease.attempt()
    }

    /// The checkpoint the previous attempt stored, if any: resume from it instead of
    /// repeating finished steps.
    #[must_use]
    pub fn previous_checkpoint(&self) -> Option<&[u8]> {
        self.lease.checkpoint()
    }

    /// The lease (its token, its end).
    #[must_use]
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Stores a recovery point: a later attempt receives it.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] once another call owns the work: stop, the result will not be
    /// stored. The errors of [`Store::checkpoint`].
    pub fn checkpoint(&self, bytes: &[u8]) -> Result<(), Error> {
        self.store.checkpoint(&self.lease, bytes)
    }

    /// Extends the lease to `by` from now, for work that outlasts it.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] once another call owns the work. The errors of [`Store::extend`].
    pub fn extend(&mut self, by: Duration) -> Result<(), Error> {
        self.store.extend(&mut self.lease, by)
    }

    /// Whether this lease still owns the work: `false` once another call took it over (this
    /// one's lease ran out) or the record was forgotten. A long job checks it between steps
    /// and stops early; its result would not be stored anyway.
    ///
    /// # Errors
    /// The errors of [`Store::get`].
    pub fn owns(&self) -> Result<bool, Error> {
        let record = self.store.get(self.lease.scope(), self.lease.key())?;
        Ok(held_by(record, &self.lease))
    }
}

/// Whether `record` (the live record of the lease's key, if any) is still in flight under
/// `lease`.
fn held_by(record: Option<crate::Record>, lease: &Lease) -> bool {
    matches!(
        record.map(|r| r.state),
        Some(crate::RecordState::InFlight { token, .. }) if token == lease.token()
    )
}

/// The lease an async job's function runs under ([`run_async`]).
#[derive(Debug)]
pub struct JobAsync<'a, B> {
    backend: &'a B,
    lease: Lease,
}

impl<B: IdempotencyBackend> JobAsync<'_, B> {
    /// Which attempt this is: 1 for the first run, higher after a retry or a takeover.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.lease.attempt()
    }

    /// The checkpoint the previous attempt stored, if any.
    #[must_use]
    pub fn previous_checkpoint(&self) -> Option<&[u8]> {
        self.lease.checkpoint()
    }

    /// The lease (its token, its end).
    #[must_use]
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Extends the lease to `by` from now.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] once another call owns the work; the backend's errors.
    pub async fn extend(&mut self, by: Duration) -> Result<(), Error> {
        self.backend.extend(&mut self.lease, by).await
    }

    /// Stores a recovery point: a later attempt receives it.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] once another call owns the work; the backend's errors.
    pub async fn checkpoint(&self, bytes: &[u8]) -> Result<(), Error> {
        self.backend.checkpoint(&self.lease, bytes).await
    }

    /// Whether this lease still owns the work (see [`Job::owns`]).
    ///
    /// # Errors
    /// The backend's errors.
    pub async fn owns(&self) -> Result<bool, Error> {
        let record = self
            .backend
            .get(self.lease.scope(), self.lease.key())
            .await?;
        Ok(held_by(record, &self.lease))
    }
}

/// The stored outcome: a format byte, whether it is a success, then the bincode payload.
const OUTCOME_FORMAT: u8 = 1;
const TAG_OK: u8 = 1;
const TAG_FATAL: u8 = 2;

fn encode<V: Serialize>(tag: u8, value: &V) -> Result<Vec<u8>, String> {
    let payload = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(2 + payload.len());
    out.extend_from_slice(&[OUTCOME_FORMAT, tag]);
    out.extend_from_slice(&payload);
    Ok(out)
}

fn decode_value<V: DeserializeOwned>(payload: &[u8]) -> Result<V, String> {
    // Bounded by the largest outcome a store keeps: a stored value read as another type must
    // not make the decoder allocate what a length it misreads declares.
    let config = bincode::config::standard().with_limit::<{ crate::OUTCOME_LEN_MAX }>();
    let (value, used) =
        bincode::serde::decode_from_slice::<V, _>(payload, config).map_err(|e| e.to_string())?;
    if used != payload.len() {
        return Err(format!("{} bytes after the value", payload.len() - used));
    }
    Ok(value)
}

/// The stored result, as this call's types.
fn decode<T: DeserializeOwned, E: DeserializeOwned>(bytes: &[u8]) -> Result<T, OnceError<E>> {
    let Some((head, payload)) = bytes.split_at_checked(2) else {
        return Err(OnceError::Serialization(
            "the stored result is shorter than its header".into(),
        ));
    };
    match head {
        [OUTCOME_FORMAT, TAG_OK] => decode_value(payload).map_err(OnceError::Serialization),
        [OUTCOME_FORMAT, TAG_FATAL] => match decode_value(payload) {
            Ok(e) => Err(OnceError::Fatal(e)),
            Err(why) => Err(OnceError::Serialization(why)),
        },
        other => Err(OnceError::Serialization(format!(
            "the stored result has an unknown header {other:?}"
        ))),
    }
}

/// The lease to run under, or the answer that needs no run (a replay is decoded by the caller).
fn lease_of<E>(claim: Claim) -> Result<Lease, OnceError<E>> {
    match claim {
        Claim::Acquired(lease) => Ok(lease),
        Claim::InProgress { retry_after } => Err(OnceError::InProgress { retry_after }),
        Claim::Mismatch => Err(OnceError::Mismatch),
        other => Err(OnceError::Store(Error::Internal(format!(
            "a claim answer a job cannot use: {other:?}"
        )))),
    }
}

/// What to do with the claim once the function returned.
enum Settle {
    /// Complete the claim with these bytes.
    Store(Vec<u8>),
    /// Release the claim (`fail`).
    Release,
}

/// Splits a function's result into what to do with the claim and what to return.
fn settle<T: Serialize, E: Serialize>(
    result: Result<T, JobError<E>>,
) -> (Settle, Result<T, OnceError<E>>) {
    match result {
        Ok(value) => match encode(TAG_OK, &value) {
            Ok(bytes) => (Settle::Store(bytes), Ok(value)),
            Err(why) => (Settle::Release, Err(OnceError::Serialization(why))),
        },
        Err(JobError::Fatal(e)) => match encode(TAG_FATAL, &e) {
            Ok(bytes) => (Settle::Store(bytes), Err(OnceError::Fatal(e))),
            Err(why) => (Settle::Release, Err(OnceError::Serialization(why))),
        },
        Err(JobError::Retry(e)) => (Settle::Release, Err(OnceError::Retry(e))),
        Err(JobError::Store(e)) => (Settle::Release, Err(OnceError::Store(e))),
    }
}

/// Whether a refused completion left the claim in flight (its input was refused before
/// anything was written): it must then be released.
fn refused_input(e: &Error) -> bool {
    matches!(e, Error::TooLarge { .. } | Error::TooSmall { .. })
}

/// Runs `f` at most once per `(scope, key)` and returns its result; later calls with the same
/// key and `fingerprint` return the stored result without running `f`. See the module docs.
///
/// # Errors
/// [`OnceError::Retry`] / [`OnceError::Fatal`] as `f` failed (a stored `Fatal` is replayed);
/// [`OnceError::InProgress`] while another call runs it; [`OnceError::Mismatch`];
/// [`OnceError::Serialization`] for a result that cannot be serialized (the claim is
/// released) or a stored one of other types; [`OnceError::Store`] for the store's errors,
/// including [`Error::TooLarge`] for a serialized result over the store's outcome limit (the
/// claim is released) and [`Error::LeaseLost`] when the lease was lost before the result could
/// be stored (the successor's answer stands).
pub fn run<T, E, F>(
    store: &Store,
    scope: impl AsRef<[u8]>,
    key: impl AsRef<[u8]>,
    fingerprint: impl AsRef<[u8]>,
    options: &ClaimOptions,
    f: F,
) -> Result<T, OnceError<E>>
where
    T: Serialize + DeserializeOwned,
    E: Serialize + DeserializeOwned,
    F: FnOnce(&mut Job<'_>) -> Result<T, JobError<E>>,
{
    let claim = store.claim(scope, key, fingerprint, options)?;
    if let Claim::Replay(replay) = &claim {
        return decode(&replay.outcome);
    }
    let mut job = Job {
        store,
        lease: lease_of(claim)?,
    };
    let result = match std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut job))) {
        Ok(result) => result,
        Err(panic) => {
            // Released for the next call, as a `Retry`; a release that fails leaves the claim
            // to its lease, which is what a crash would have done.
            let _ = store.fail(&job.lease);
            std::panic::resume_unwind(panic);
        }
    };
    let (settle, answer) = settle(result);
    match settle {
        Settle::Store(bytes) => {
            if let Err(e) = store.complete(&job.lease, &bytes, options.retention_duration()) {
                if refused_input(&e) {
                    store.fail(&job.lease)?;
                }
                return Err(OnceError::Store(e));
            }
        }
        Settle::Release => release(store.fail(&job.lease), &answer)?,
    }
    answer
}

/// The async form of [`run`], over any [`IdempotencyBackend`]: `f` is an async closure that
/// gets a [`JobAsync`].
///
/// ```
/// use idemstore::once::{self, JobError};
/// use idemstore::{ClaimOptions, Store};
///
/// let store = Store::in_memory()?;
/// let runtime = tokio::runtime::Builder::new_current_thread().build()?;
/// let options = ClaimOptions::default();
/// let run = once::run_async(&store, "jobs", "nightly-2026-12-01", b"v1", &options, async |job| {
///     assert_eq!(job.attempt(), 1);
///     Ok::<u64, JobError<String>>(42)
/// });
/// assert_eq!(runtime.block_on(run)?, 42);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// As [`run`].
pub async fn run_async<B, T, E, F>(
    backend: &B,
    scope: impl AsRef<[u8]>,
    key: impl AsRef<[u8]>,
    fingerprint: impl AsRef<[u8]>,
    options: &ClaimOptions,
    f: F,
) -> Result<T, OnceError<E>>
where
    B: IdempotencyBackend,
    T: Serialize + DeserializeOwned,
    E: Serialize + DeserializeOwned,
    F: AsyncFnOnce(&mut JobAsync<'_, B>) -> Result<T, JobError<E>>,
{
    let claim = backend
        .claim(scope.as_ref(), key.as_ref(), fingerprint.as_ref(), options)
        .await?;
    if let Claim::Replay(replay) = &claim {
        return decode(&replay.outcome);
    }
    let mut job = JobAsync {
        backend,
        lease: lease_of(claim)?,
    };
    let outcome = {
        let mut running = std::pin::pin!(f(&mut job));
        std::future::poll_fn(|cx| {
            match std::panic::catch_unwind(AssertUnwindSafe(|| running.as_mut().poll(cx))) {
                Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
                Ok(Poll::Pending) => Poll::Pending,
                Err(panic) => Poll::Ready(Err(panic)),
            }
        })
        .await
    };
    let result = match outcome {
        Ok(result) => result,
        Err(panic) => {
            // As in `run`.
            let _ = backend.fail(&job.lease).await;
            std::panic::resume_unwind(panic);
        }
    };
    let (settle, answer) = settle(result);
    match settle {
        Settle::Store(bytes) => {
            let stored = backend
                .complete(&job.lease, &bytes, options.retention_duration())
                .await;
            if let Err(e) = stored {
                if refused_input(&e) {
                    backend.fail(&job.lease).await?;
                }
                return Err(OnceError::Store(e));
            }
        }
        Settle::Release => release(backend.fail(&job.lease).await, &answer)?,
    }
    answer
}

/// The result of releasing a claim after a failed job: a lease that is already lost has
/// nothing to release, which is no error of its own when the job already reports a store
/// error (the loss itself, typically).
fn release<T, E>(
    released: Result<(), Error>,
    answer: &Result<T, OnceError<E>>,
) -> Result<(), Error> {
    match (released, answer) {
        (Err(Error::LeaseLost { .. }), Err(OnceError::Store(_))) => Ok(()),
        (released, _) => released,
    }
}
