//! What a claim asks for and what it gets: [`ClaimOptions`], [`Claim`], [`Lease`], [`Replay`].

use std::time::Duration;

use crate::core::record::split_scoped_key;

/// How a claim behaves: lease length, record retention, and whether a duplicate waits.
///
/// ```
/// use idemstore::ClaimOptions;
/// use std::time::Duration;
///
/// let options = ClaimOptions::default()
///     .lease(Duration::from_secs(10))
///     .retention(Duration::from_secs(24 * 3600))
///     .wait(Duration::from_secs(2));
/// assert_eq!(options.lease_duration(), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimOptions {
    lease: Duration,
    retention: Duration,
    wait: Option<Duration>,
}

impl Default for ClaimOptions {
    /// A 30 s lease, 24 h retention, no waiting.
    fn default() -> Self {
        ClaimOptions {
            lease: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
            wait: None,
        }
    }
}

impl ClaimOptions {
    /// How long the lease lasts before another claim may take the request over (unless
    /// extended). Must not exceed the retention.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long the record lives after this claim while it is not completed; `complete` sets
    /// the retention of the finished record.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// If the original is still in flight, wait up to `wait` for it to finish and return its
    /// replay (or acquire, if it failed or its owner died) instead of an immediate
    /// [`Claim::InProgress`].
    ///
    /// `wait` is the caller's patience, in real time. Every decision about the lease itself is
    /// made with the store's [`Clock`](crate::Clock): the waiter re-checks when the record
    /// changes and when the original's lease would end by that clock (measured from then in
    /// real time), so with a [`ManualClock`](crate::ManualClock) a lease that ends because the
    /// test advanced the clock is noticed at the next change of the record or re-check.
    /// At most 65,536 claims wait at once per store; past that a claim answers at once.
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// The lease length.
    #[must_use]
    pub fn lease_duration(&self) -> Duration {
        self.lease
    }

    /// The retention.
    #[must_use]
    pub fn retention_duration(&self) -> Duration {
        self.retention
    }

    /// The bounded wait, if any.
    #[must_use]
    pub fn wait_duration(&self) -> Option<Duration> {
        self.wait
    }
}

/// The answer to a claim (DESIGN §2).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// Run the request: the caller holds the lease. Finish with `complete` or `fail`.
    Acquired(Lease),
    /// The request already completed: return its outcome, do not run it again.
    Replay(Replay),
    /// The original is still running under a live lease; retry after the given time.
    InProgress {
        /// Time left on the original's lease.
        retry_after: Duration,
    },
    /// The key is in use by a request with another fingerprint: a client error, never a
    /// replay.
    Mismatch,
}

/// The stored outcome of a completed request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Replay {
    /// The outcome bytes given to `complete`, byte for byte.
    pub outcome: Vec<u8>,
    /// When the request completed (ms since the Unix epoch).
    pub completed_at_ms: u64,
    /// Which attempt completed it.
    pub attempt: u32,
}

/// The right to execute a claimed request, proven by a fencing token.
///
/// Every write made with a lease (`complete`, `fail`, `extend`, `checkpoint`) succeeds only
/// while the record still carries this lease's token, so a slow or resurrected owner can never
/// overwrite its successor. In the embedded engine tokens strictly increase across the whole
/// store, restarts included; the shared backends' tokens increase per key and are unique (see
/// their docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub(crate) scoped_key: Vec<u8>,
    pub(crate) token: u64,
    pub(crate) lease_until_ms: u64,
    pub(crate) attempt: u32,
    pub(crate) checkpoint: Option<Vec<u8>>,
    pub(crate) takeover: bool,
}

impl Lease {
    /// Builds a lease from its parts: for implementors of
    /// [`IdempotencyBackend`](crate::IdempotencyBackend) other than this engine (a PostgreSQL
    /// or Redis backend), which grant leases from their own records and must hand them to the
    /// middleware in this type.
    ///
    /// - `token`: the backend's fencing token for this grant; it must differ from every earlier
    ///   grant's token for the same record and increase per record, so that writes with an
    ///   older lease can be refused.
    /// - `lease_until_ms`: when the lease ends unless extended (ms since the Unix epoch).
    /// - `attempt`: 1 for the first run, + 1 per retry after a failure or a takeover.
    /// - `checkpoint`: the recovery point left by the previous attempt, if any.
    /// - `takeover`: whether the grant took over a record whose owner was gone.
    ///
    /// An implementation's `extend` updates the caller's lease by building it anew with the new
    /// `lease_until_ms` and the other parts read back from the lease's getters.
    ///
    /// A lease built here and given to [`Store`](crate::Store) is fenced like any other: its
    /// writes succeed only if the record carries `token`.
    ///
    /// ```
    /// use idemstore::Lease;
    ///
    /// let lease = Lease::from_parts(b"acct_42", b"order-1001", 7, 1_700_000_030_000, 1, None, false)?;
    /// assert_eq!((lease.scope(), lease.key(), lease.token()), (&b"acct_42"[..], &b"order-1001"[..], 7));
    /// # Ok::<(), idemstore::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::TooLarge`](crate::Error::TooLarge) with [`Input::Scope`](crate::Input::Scope) for
    /// a scope longer than [`SCOPE_LEN_MAX`](crate::SCOPE_LEN_MAX) bytes, which no store accepts.
    pub fn from_parts(
        scope: &[u8],
        key: &[u8],
        token: u64,
        lease_until_ms: u64,
        attempt: u32,
        checkpoint: Option<Vec<u8>>,
        takeover: bool,
    ) -> crate::Result<Lease> {
        if scope.len() > crate::limits::SCOPE_LEN_MAX {
            return Err(crate::Error::TooLarge {
                what: crate::Input::Scope,
                actual: scope.len() as u64,
                limit: crate::limits::SCOPE_LEN_MAX as u64,
            });
        }
        Ok(Lease {
            scoped_key: crate::core::record::scoped_key(scope, key),
            token,
            lease_until_ms,
            attempt,
            checkpoint,
            takeover,
        })
    }

    /// The scope of the claimed record.
    #[must_use]
    pub fn scope(&self) -> &[u8] {
        split_scoped_key(&self.scoped_key).map_or(&[], |(s, _)| s)
    }

    /// The key of the claimed record.
    #[must_use]
    pub fn key(&self) -> &[u8] {
        split_scoped_key(&self.scoped_key).map_or(&[], |(_, k)| k)
    }

    /// The fencing token.
    #[must_use]
    pub fn token(&self) -> u64 {
        self.token
    }

    /// When the lease ends unless extended (ms since the Unix epoch).
    #[must_use]
    pub fn lease_until_ms(&self) -> u64 {
        self.lease_until_ms
    }

    /// Which attempt this is: 1 for the first run, higher after a failure or takeover.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The recovery point left by the previous attempt, if any: resume from it instead of
    /// repeating finished steps.
    #[must_use]
    pub fn checkpoint(&self) -> Option<&[u8]> {
        self.checkpoint.as_deref()
    }

    /// Whether this lease took over an in-flight record whose owner was gone (lease expired or
    /// from an earlier process epoch). The previous owner may have run some or all of the side
    /// effect: reconcile before repeating it.
    #[must_use]
    pub fn is_takeover(&self) -> bool {
        self.takeover
    }
}
