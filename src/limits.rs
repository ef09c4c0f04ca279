//! Size and time limits, checked before anything is queued or written.

use std::time::Duration;

use crate::clock::duration_ms;
use crate::core::claim::ClaimOptions;
use crate::error::{Error, Input, Result};

/// Hard cap on the key length in bytes; [`Limits::max_key_len`] may only lower it.
pub const KEY_LEN_MAX: usize = 255;
/// Hard cap on the scope length in bytes (it is stored behind a one-byte length prefix).
pub const SCOPE_LEN_MAX: usize = 255;
/// Hard cap on the fingerprint length in bytes (room for a SHA-512 digest).
pub const FINGERPRINT_LEN_MAX: usize = 64;
/// Hard cap on the outcome length in bytes.
pub const OUTCOME_LEN_MAX: usize = 16 * 1024 * 1024;
/// Hard cap on the checkpoint length in bytes.
pub const CHECKPOINT_LEN_MAX: usize = 1024 * 1024;
/// Hard cap on a record's retention: ten years.
pub const RETENTION_MS_MAX: u64 = 10 * 366 * 24 * 3600 * 1000;
/// Hard cap on the bounded wait of a duplicate for its original.
pub const WAIT_MS_MAX: u64 = 3600 * 1000;

/// The limits a store enforces on its inputs.
///
/// Every limit is checked before an operation is queued, so a violation writes nothing and
/// comes back as [`Error::TooLarge`], [`Error::TooSmall`] or [`Error::LeaseExceedsRetention`]
/// naming the input, its size and the limit. Defaults: key 1–255 bytes, scope ≤ 255 bytes,
/// fingerprint ≤ 64 bytes, outcome ≤ 1 MiB, checkpoint ≤ 64 KiB, lease 1 ms – 1 hour,
/// retention ≤ 30 days, wait ≤ 60 s. Each can be lowered or raised up to its hard cap
/// (`*_MAX` constants in this module). A per-scope record quota is off unless set.
///
/// ```
/// use idemstore::Limits;
///
/// let limits = Limits::default().max_outcome_len(64 * 1024).max_key_len(64);
/// assert_eq!(limits.outcome_len(), 64 * 1024);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    max_key_len: usize,
    max_scope_len: usize,
    max_fingerprint_len: usize,
    max_outcome_len: usize,
    max_checkpoint_len: usize,
    max_lease_ms: u64,
    max_retention_ms: u64,
    max_wait_ms: u64,
    max_records_per_scope: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_len: KEY_LEN_MAX,
            max_scope_len: SCOPE_LEN_MAX,
            max_fingerprint_len: FINGERPRINT_LEN_MAX,
            max_outcome_len: 1024 * 1024,
            max_checkpoint_len: 64 * 1024,
            max_lease_ms: 3600 * 1000,
            max_retention_ms: 30 * 24 * 3600 * 1000,
            max_wait_ms: 60 * 1000,
            max_records_per_scope: None,
        }
    }
}

impl Limits {
    /// Longest accepted key in bytes (at most [`KEY_LEN_MAX`]).
    #[must_use]
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// Longest accepted scope in bytes (at most [`SCOPE_LEN_MAX`]).
    #[must_use]
    pub fn max_scope_len(mut self, bytes: usize) -> Self {
        self.max_scope_len = bytes;
        self
    }

    /// Longest accepted fingerprint in bytes (at most [`FINGERPRINT_LEN_MAX`]).
    #[must_use]
    pub fn max_fingerprint_len(mut self, bytes: usize) -> Self {
        self.max_fingerprint_len = bytes;
        self
    }

    /// Longest accepted outcome in bytes (at most [`OUTCOME_LEN_MAX`]).
    #[must_use]
    pub fn max_outcome_len(mut self, bytes: usize) -> Self {
        self.max_outcome_len = bytes;
        self
    }

    /// Longest accepted checkpoint in bytes (at most [`CHECKPOINT_LEN_MAX`]).
    #[must_use]
    pub fn max_checkpoint_len(mut self, bytes: usize) -> Self {
        self.max_checkpoint_len = bytes;
        self
    }

    /// Longest accepted lease or lease extension: at most [`max_retention`](Self::max_retention)
    /// as configured (a lowered retention cap needs a lease cap as low; [`Limits::validate`]
    /// names `max_lease` otherwise).
    #[must_use]
    pub fn max_lease(mut self, lease: Duration) -> Self {
        self.max_lease_ms = duration_ms(lease);
        self
    }

    /// Longest accepted retention (at most [`RETENTION_MS_MAX`] ms).
    #[must_use]
    pub fn max_retention(mut self, retention: Duration) -> Self {
        self.max_retention_ms = duration_ms(retention);
        self
    }

    /// Longest accepted wait of a duplicate for its original (at most [`WAIT_MS_MAX`] ms).
    #[must_use]
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait_ms = duration_ms(wait);
        self
    }

    /// The most records one scope may hold; a claim of a new key beyond it fails with
    /// [`Error::QuotaExceeded`]. Keeps one tenant from filling the store. Default: unlimited.
    #[must_use]
    pub fn max_records_per_scope(mut self, records: u64) -> Self {
        self.max_records_per_scope = Some(records);
        self
    }

    /// The configured per-scope record quota, if any.
    #[must_use]
    pub fn records_per_scope(&self) -> Option<u64> {
        self.max_records_per_scope
    }

    /// The configured key limit in bytes.
    #[must_use]
    pub fn key_len(&self) -> usize {
        self.max_key_len
    }

    /// The configured outcome limit in bytes.
    #[must_use]
    pub fn outcome_len(&self) -> usize {
        self.max_outcome_len
    }

    /// The longest scoped key (scope, key and the scope's length byte) these limits accept.
    pub(crate) fn scoped_key_len(&self) -> usize {
        self.max_scope_len + self.max_key_len + 1
    }

    /// Checks the configured limits against the hard caps. Every backend calls it once when it
    /// is built, so a bad configuration is refused before anything is opened or sent.
    ///
    /// # Errors
    /// [`Error::TooLarge`]/[`Error::TooSmall`] naming the configuration value
    /// ([`Input::Config`]).
    pub fn validate(&self) -> Result<()> {
        let caps: [(&'static str, u64, u64, u64); 8] = [
            (
                "max_key_len",
                self.max_key_len as u64,
                1,
                KEY_LEN_MAX as u64,
            ),
            (
                "max_scope_len",
                self.max_scope_len as u64,
                0,
                SCOPE_LEN_MAX as u64,
            ),
            (
                "max_fingerprint_len",
                self.max_fingerprint_len as u64,
                0,
                FINGERPRINT_LEN_MAX as u64,
            ),
            (
                "max_outcome_len",
                self.max_outcome_len as u64,
                0,
                OUTCOME_LEN_MAX as u64,
            ),
            (
                "max_checkpoint_len",
                self.max_checkpoint_len as u64,
                0,
                CHECKPOINT_LEN_MAX as u64,
            ),
            // The retention first: the lease's bound is the retention as configured.
            ("max_retention", self.max_retention_ms, 1, RETENTION_MS_MAX),
            ("max_lease", self.max_lease_ms, 1, self.max_retention_ms),
            ("max_wait", self.max_wait_ms, 0, WAIT_MS_MAX),
        ];
        for (name, value, min, max) in caps {
            check_range(Input::Config(name), value, min, max)?;
        }
        Ok(())
    }

    // The checks below are what every backend runs before it queues, writes or sends anything,
    // so that the embedded engine, PostgreSQL and Redis refuse exactly the same inputs with
    // exactly the same errors.

    /// Checks everything a claim carries: scope, key, fingerprint, lease, retention (and that
    /// the lease does not outlive it) and the wait.
    ///
    /// ```
    /// use idemstore::{ClaimOptions, Error, Input, Limits};
    /// use std::time::Duration;
    ///
    /// let limits = Limits::default();
    /// let options = ClaimOptions::default();
    /// assert!(limits.check_claim(b"acct_42", b"order-1", b"fp", &options).is_ok());
    /// let too_long = [b'k'; 256];
    /// assert!(matches!(
    ///     limits.check_claim(b"acct_42", &too_long, b"fp", &options),
    ///     Err(Error::TooLarge { what: Input::Key, actual: 256, limit: 255 })
    /// ));
    /// let backwards = options.lease(Duration::from_secs(10)).retention(Duration::from_secs(5));
    /// assert!(matches!(
    ///     limits.check_claim(b"", b"k", b"fp", &backwards),
    ///     Err(Error::LeaseExceedsRetention { .. })
    /// ));
    /// ```
    ///
    /// # Errors
    /// [`Error::TooLarge`]/[`Error::TooSmall`] naming the input; [`Error::LeaseExceedsRetention`].
    pub fn check_claim(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> Result<()> {
        self.check_identity(scope, key)?;
        self.check_fingerprint(fingerprint)?;
        let lease_ms = duration_ms(options.lease_duration());
        let retention_ms = duration_ms(options.retention_duration());
        self.check_lease(lease_ms)?;
        self.check_retention(retention_ms)?;
        if lease_ms > retention_ms {
            return Err(Error::LeaseExceedsRetention {
                lease_ms,
                retention_ms,
            });
        }
        if let Some(wait) = options.wait_duration() {
            self.check_wait(duration_ms(wait))?;
        }
        Ok(())
    }

    /// Checks the outcome and retention of a `complete`.
    ///
    /// # Errors
    /// [`Error::TooLarge`]/[`Error::TooSmall`] for the outcome or the retention.
    pub fn check_complete(&self, outcome: &[u8], retention: Duration) -> Result<()> {
        self.check_outcome(outcome)?;
        self.check_retention(duration_ms(retention))
    }

    /// Checks the extension of an `extend` against the lease limits.
    ///
    /// # Errors
    /// [`Error::TooLarge`]/[`Error::TooSmall`] with [`Input::Lease`].
    pub fn check_extend(&self, by: Duration) -> Result<()> {
        self.check_lease(duration_ms(by))
    }

    /// Checks a scope and key (`get`, `forget`, and every claim).
    ///
    /// # Errors
    /// [`Error::TooLarge`] for a scope or key over its limit; [`Error::TooSmall`] for an empty
    /// key.
    pub fn check_identity(&self, scope: &[u8], key: &[u8]) -> Result<()> {
        check_len(Input::Scope, scope.len(), 0, self.max_scope_len)?;
        check_len(Input::Key, key.len(), 1, self.max_key_len)
    }

    /// Checks a fingerprint's length.
    ///
    /// # Errors
    /// [`Error::TooLarge`] with [`Input::Fingerprint`].
    pub fn check_fingerprint(&self, fingerprint: &[u8]) -> Result<()> {
        check_len(
            Input::Fingerprint,
            fingerprint.len(),
            0,
            self.max_fingerprint_len,
        )
    }

    /// Checks an outcome's length.
    ///
    /// # Errors
    /// [`Error::TooLarge`] with [`Input::Outcome`].
    pub fn check_outcome(&self, outcome: &[u8]) -> Result<()> {
        check_len(Input::Outcome, outcome.len(), 0, self.max_outcome_len)
    }

    /// Checks a checkpoint's length.
    ///
    /// # Errors
    /// [`Error::TooLarge`] with [`Input::Checkpoint`].
    pub fn check_checkpoint(&self, checkpoint: &[u8]) -> Result<()> {
        check_len(
            Input::Checkpoint,
            checkpoint.len(),
            0,
            self.max_checkpoint_len,
        )
    }

    /// Checks a lease or lease extension in milliseconds (1 ms up to the configured maximum).
    ///
    /// # Errors
    /// [`Error::TooLarge`]/[`Error::TooSmall`] with [`Input::Lease`].
    pub fn check_lease(&self, lease_ms: u64) -> Result<()> {
        check_range(Input::Lease, lease_ms, 1, self.max_lease_ms)
    }

    /// Checks a retention in milliseconds (1 ms up to the configured maximum).
    ///
    /// # Errors
    /// [`Error::TooLarge`]/[`Error::TooSmall`] with [`Input::Retention`].
    pub fn check_retention(&self, retention_ms: u64) -> Result<()> {
        check_range(Input::Retention, retention_ms, 1, self.max_retention_ms)
    }

    /// Checks a duplicate's bounded wait in milliseconds.
    ///
    /// # Errors
    /// [`Error::TooLarge`] with [`Input::Wait`].
    pub fn check_wait(&self, wait_ms: u64) -> Result<()> {
        check_range(Input::Wait, wait_ms, 0, self.max_wait_ms)
    }
}

fn check_len(what: Input, len: usize, min: usize, max: usize) -> Result<()> {
    check_range(what, len as u64, min as u64, max as u64)
}

fn check_range(what: Input, actual: u64, min: u64, max: u64) -> Result<()> {
    if actual > max {
        return Err(Error::TooLarge {
            what,
            actual,
            limit: max,
        });
    }
    if actual < min {
        return Err(Error::TooSmall {
            what,
            actual,
            limit: min,
        });
    }
    Ok(())
}
