//! The one error type of idemstore.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A specialised `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Names the input a size or range check was applied to.
///
/// Carried by [`Error::TooLarge`] and [`Error::TooSmall`], so that a caller can tell which
/// argument to fix without parsing a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Input {
    /// The scope: who owns a key (tenant, account, route namespace).
    Scope,
    /// The client's idempotency key.
    Key,
    /// The request fingerprint.
    Fingerprint,
    /// The outcome bytes stored by `complete`.
    Outcome,
    /// The progress bytes stored by `checkpoint`.
    Checkpoint,
    /// The lease duration of a claim, or the extension of `extend` (milliseconds).
    Lease,
    /// The retention of a record (milliseconds).
    Retention,
    /// The bounded wait of a duplicate claim for its original (milliseconds).
    Wait,
    /// A configuration value given to the store builder.
    Config(&'static str),
    /// A record as the write-ahead log stores it (keys, fingerprint, and the outcome or
    /// checkpoint it holds, which may be one stored earlier under other limits or by
    /// `Store::import`): more than one batch of a log of
    /// [`StoreBuilder::wal_segments`](crate::StoreBuilder::wal_segments) segments can hold.
    Record,
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Scope => f.write_str("scope"),
            Input::Key => f.write_str("key"),
            Input::Fingerprint => f.write_str("fingerprint"),
            Input::Outcome => f.write_str("outcome"),
            Input::Checkpoint => f.write_str("checkpoint"),
            Input::Lease => f.write_str("lease (ms)"),
            Input::Retention => f.write_str("retention (ms)"),
            Input::Wait => f.write_str("wait (ms)"),
            Input::Record => f.write_str("record (bytes in the write-ahead log)"),
            Input::Config(name) => write!(f, "configuration value `{name}`"),
        }
    }
}

/// The source of an error reported by a storage engine or a remote store, shared so that an
/// error can be cloned to every caller of a failed batch.
pub type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in idemstore, whichever backend raised it.
///
/// Each variant says what state survives it:
///
/// - Input errors ([`TooLarge`](Error::TooLarge), [`TooSmall`](Error::TooSmall),
///   [`LeaseExceedsRetention`](Error::LeaseExceedsRetention)) are raised before anything is
///   queued, written or sent: the store is unchanged.
/// - [`LeaseLost`](Error::LeaseLost) is a fencing rejection: the operation changed nothing.
/// - [`CommitOutcomeUnknown`](Error::CommitOutcomeUnknown) means the embedded engine's batch
///   holding the operation failed to commit: it is either fully durable or fully absent, and
///   the store refuses further writes ([`Poisoned`](Error::Poisoned)) until it is reopened, at
///   which point a `get` tells which.
/// - [`Corrupt`](Error::Corrupt) reports bytes on disk that failed their checks; nothing is
///   overwritten because of it.
/// - [`Unavailable`](Error::Unavailable) and [`OutcomeUnknown`](Error::OutcomeUnknown) come from
///   a remote store (a lost connection, a timeout): the first means the operation did not take
///   effect, the second that it may have. Neither is fatal: retry the call (a claim retried
///   after `OutcomeUnknown` answers from whatever state the first attempt left).
/// - [`Internal`](Error::Internal) reports a broken invariant of idemstore itself: a bug.
///
/// Errors are cheap to clone (I/O errors and sources are shared), so a failed batch hands the
/// same error to each of its callers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// An input is longer (bytes) or larger (milliseconds) than its limit.
    TooLarge {
        /// Which input.
        what: Input,
        /// Its size: bytes, or milliseconds for durations.
        actual: u64,
        /// The largest accepted size.
        limit: u64,
    },
    /// An input is shorter (bytes) or smaller (milliseconds) than its minimum.
    TooSmall {
        /// Which input.
        what: Input,
        /// Its size: bytes, or milliseconds for durations.
        actual: u64,
        /// The smallest accepted size.
        limit: u64,
    },
    /// A claim asked for a lease that outlives the record's retention.
    LeaseExceedsRetention {
        /// The requested lease.
        lease_ms: u64,
        /// The requested retention.
        retention_ms: u64,
    },
    /// The lease no longer owns its record: another claim took it over, the record was
    /// completed, failed, forgotten or has expired. The operation changed nothing.
    LeaseLost {
        /// The fencing token of the rejected lease.
        token: u64,
    },
    /// The scope already holds its configured maximum of records
    /// ([`Limits::max_records_per_scope`](crate::Limits::max_records_per_scope)); the claim of a
    /// new key wrote nothing. Expired records count until the sweeper removes them.
    QuotaExceeded {
        /// The configured maximum.
        limit: u64,
    },
    /// Bytes read from disk failed a check (CRC, version, encoding, length).
    Corrupt {
        /// Where: the table and, when known, the scoped key.
        location: String,
        /// What failed.
        reason: String,
    },
    /// The file exists but is not an idemstore database. Nothing was written to it.
    NotAnIdemstoreFile {
        /// The path given to `open`.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The file is an idemstore database of a format version this build cannot read.
    UnsupportedFormat {
        /// The version found in the file.
        found: u64,
        /// The version this build reads and writes.
        supported: u64,
    },
    /// Another `Store` (in this or another process) holds the file.
    AlreadyOpen,
    /// The disk is full. Returned as it is when nothing was written: an open, an import, or a
    /// batch that failed while the database file grew before its commit. A commit that meets
    /// a full disk fails as [`Error::CommitOutcomeUnknown`] with this as its source.
    /// [`Error::is_storage_full`] recognises both. A store whose batch failed either way
    /// refuses writes until it is reopened (with space freed); reads keep working, and nothing
    /// acknowledged is lost.
    StorageFull(Arc<io::Error>),
    /// An I/O error from the operating system. Where it concerns one file (opening a store,
    /// its log), the message names it; the error's kind is the operating system's.
    Io(Arc<io::Error>),
    /// The backend could not be reached (connection refused or lost before the request was
    /// sent, pool exhausted): the operation did not take effect. Retryable; not fatal.
    Unavailable {
        /// What the backend's client reported.
        source: Source,
    },
    /// A remote backend may or may not have applied the operation (the connection dropped or
    /// timed out after the request was sent). Retryable and not fatal: a retried claim answers
    /// from the state the first attempt left (a replay, in progress, or an acquisition of its
    /// own), never a second execution under one lease.
    OutcomeUnknown {
        /// What the backend's client reported.
        source: Source,
    },
    /// An error of the storage engine or remote store that is neither I/O, corruption nor a
    /// lost connection (for the embedded engine: redb errors such as a value over its size
    /// limit).
    Backend {
        /// The backend's own error.
        source: Source,
    },
    /// The commit of the batch holding this operation failed: it is durable in full or absent in
    /// full, and which one is unknown until the store is reopened. The store refuses writes from
    /// now on.
    CommitOutcomeUnknown {
        /// The error the commit reported.
        source: Box<Error>,
    },
    /// An earlier fatal storage error stopped the writer; every write is refused until the store
    /// is reopened. Reads of committed state keep working.
    Poisoned {
        /// The error that poisoned the store.
        cause: String,
    },
    /// A broken invariant inside idemstore (a bug): for example the writer thread panicked, or
    /// answered an operation with a reply of another kind. What it did to stored state is
    /// described in the message; please report it.
    Internal(String),
    /// The store has been closed.
    Closed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooLarge {
                what,
                actual,
                limit,
            } => write!(f, "{what} is {actual}, above the limit of {limit}"),
            Error::TooSmall {
                what,
                actual,
                limit,
            } => write!(f, "{what} is {actual}, below the minimum of {limit}"),
            Error::LeaseExceedsRetention {
                lease_ms,
                retention_ms,
            } => write!(
                f,
                "lease of {lease_ms} ms outlives the retention of {retention_ms} ms"
            ),
            Error::LeaseLost { token } => write!(
                f,
                "lease with fencing token {token} no longer owns its record; nothing was changed"
            ),
            Error::QuotaExceeded { limit } => write!(
                f,
                "the scope already holds its maximum of {limit} records; nothing was written"
            ),
            Error::Corrupt { location, reason } => {
                write!(f, "corrupt data at {location}: {reason}")
            }
            Error::NotAnIdemstoreFile { path, reason } => write!(
                f,
                "{} is not an idemstore database ({reason}); it was left untouched",
                path.display()
            ),
            Error::UnsupportedFormat { found, supported } => write!(
                f,
                "database format version {found} is not supported (this build reads version {supported})"
            ),
            Error::AlreadyOpen => f.write_str("the database file is already open in another store"),
            Error::StorageFull(e) => write!(f, "storage full: {e}"),
            Error::Io(e) => write!(f, "I/O error: {e}"),
            Error::Unavailable { source } => write!(
                f,
                "backend unavailable, the operation did not take effect: {source}"
            ),
            Error::OutcomeUnknown { source } => write!(
                f,
                "backend did not answer, the operation may or may not have taken effect: {source}"
            ),
            Error::Backend { source } => write!(f, "backend error: {source}"),
            Error::CommitOutcomeUnknown { source } => write!(
                f,
                "commit failed, outcome unknown until reopen ({source}); the store refuses writes"
            ),
            Error::Poisoned { cause } => write!(
                f,
                "store refuses writes after a fatal error ({cause}); reopen it"
            ),
            Error::Internal(message) => write!(f, "internal error (a bug in idemstore): {message}"),
            Error::Closed => f.write_str("the store is closed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::StorageFull(e) | Error::Io(e) => Some(e.as_ref()),
            Error::Unavailable { source }
            | Error::OutcomeUnknown { source }
            | Error::Backend { source } => Some(source.as_ref()),
            Error::CommitOutcomeUnknown { source } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl Error {
    /// Whether the error left the store refusing writes until it is reopened.
    #[must_use]
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::CommitOutcomeUnknown { .. } | Error::Poisoned { .. }
        )
    }

    /// Whether the same call may succeed if made again later without changing its input: a
    /// remote backend that was unavailable or did not answer. Input errors, fencing
    /// rejections, corruption and fatal errors are not retryable.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::OutcomeUnknown { .. }
        )
    }

    /// Whether the disk was full: [`Error::StorageFull`] itself, or a commit that failed
    /// because of it ([`Error::CommitOutcomeUnknown`] with it as its source).
    ///
    /// ```
    /// use idemstore::Error;
    /// use std::io;
    ///
    /// let full = io::Error::from(io::ErrorKind::StorageFull);
    /// let error = Error::CommitOutcomeUnknown {
    ///     source: Box::new(Error::from(full)),
    /// };
    /// assert!(error.is_storage_full());
    /// assert!(!Error::from(io::Error::from(io::ErrorKind::NotFound)).is_storage_full());
    /// ```
    #[must_use]
    pub fn is_storage_full(&self) -> bool {
        match self {
            Error::StorageFull(_) => true,
            Error::CommitOutcomeUnknown { source } => source.is_storage_full(),
            _ => false,
        }
    }

    /// The I/O error `e` met on the file at `path`, naming it (its kind stays `e`'s).
    pub(crate) fn io_at(e: io::Error, path: &Path) -> Error {
        Error::from_io(io::Error::new(
            e.kind(),
            AtPath {
                path: path.to_path_buf(),
                source: e,
            },
        ))
    }

    /// This error, naming `path` if it is an I/O error that does not name a file yet.
    pub(crate) fn at_path(self, path: &Path) -> Error {
        match self {
            Error::Io(e) | Error::StorageFull(e) if !names_a_file(&e) => {
                let e = Arc::try_unwrap(e)
                    .unwrap_or_else(|shared| io::Error::new(shared.kind(), shared.to_string()));
                Error::io_at(e, path)
            }
            other => other,
        }
    }

    pub(crate) fn corrupt(location: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            location: location.into(),
            reason: reason.into(),
        }
    }

    /// Converts any redb error into the matching variant.
    pub(crate) fn storage(e: impl Into<redb::Error>) -> Error {
        match e.into() {
            redb::Error::Io(io) => Error::from_io(io),
            redb::Error::Corrupted(reason) => Error::corrupt("database file", reason),
            redb::Error::DatabaseAlreadyOpen => Error::AlreadyOpen,
            other => Error::Backend {
                source: Arc::new(other),
            },
        }
    }

    pub(crate) fn from_io(e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::StorageFull {
            Error::StorageFull(Arc::new(e))
        } else {
            Error::Io(Arc::new(e))
        }
    }
}

/// An I/O error on a named file: the payload [`Error::io_at`] gives the `io::Error` it makes.
#[derive(Debug)]
struct AtPath {
    path: PathBuf,
    source: io::Error,
}

impl fmt::Display for AtPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for AtPath {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Whether `e` already names its file.
fn names_a_file(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<AtPath>())
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::from_io(e)
    }
}
