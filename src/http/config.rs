//! The layer's plain settings, their defaults, and the check that refuses a configuration
//! that cannot work ([`ConfigError`]) when the layer is built rather than on every request.

use std::fmt;
use std::time::Duration;

use http::header::{DATE, SET_COOKIE};
use http::{HeaderName, Method};

use super::key::IDEMPOTENCY_KEY;
use crate::{ClaimOptions, OUTCOME_LEN_MAX, RETENTION_MS_MAX, WAIT_MS_MAX};

/// Default lease of a running request (extended every third of it while the handler runs).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default retention of a completed request's response: 24 hours, as Stripe keeps keys.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Default limit of a covered request's body: 1 MiB.
pub const DEFAULT_REQUEST_BODY_LIMIT_BYTES: usize = 1024 * 1024;
/// Default limit of a stored response (status, headers and body as encoded): 1 MiB, the
/// engine's default outcome limit.
pub const DEFAULT_STORED_RESPONSE_LIMIT_BYTES: usize = 1024 * 1024;
/// Default cap of the `Retry-After` of a 409: 1 second.
pub const DEFAULT_RETRY_AFTER_MAX: Duration = Duration::from_secs(1);

/// The shortest lease and retention a store accepts: it counts whole milliseconds.
const DURATION_MIN: Duration = Duration::from_millis(1);

/// The settings of a layer that are plain values.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) methods: Vec<Method>,
    pub(crate) require_key: bool,
    pub(crate) key_header: HeaderName,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) claim: ClaimOptions,
    pub(crate) retention: Duration,
    pub(crate) retry_after_max: Duration,
    pub(crate) request_body_limit_bytes: usize,
    pub(crate) stored_response_limit_bytes: usize,
    pub(crate) deny_headers: Vec<HeaderName>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            methods: vec![Method::POST, Method::PATCH],
            require_key: false,
            key_header: IDEMPOTENCY_KEY,
            fingerprint_headers: Vec::new(),
            claim: ClaimOptions::default()
                .lease(DEFAULT_LEASE)
                .retention(DEFAULT_RETENTION),
            retention: DEFAULT_RETENTION,
            retry_after_max: DEFAULT_RETRY_AFTER_MAX,
            request_body_limit_bytes: DEFAULT_REQUEST_BODY_LIMIT_BYTES,
            stored_response_limit_bytes: DEFAULT_STORED_RESPONSE_LIMIT_BYTES,
            deny_headers: vec![DATE, SET_COOKIE],
        }
    }
}

impl Config {
    /// Refuses what no backend accepts. Durations are compared in whole milliseconds, as the
    /// store counts them.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let lease = self.claim.lease_duration();
        let retention = self.retention;
        at_least("lease", lease, DURATION_MIN)?;
        at_least("retention", retention, DURATION_MIN)?;
        at_most(
            "retention",
            retention,
            Duration::from_millis(RETENTION_MS_MAX),
        )?;
        if millis(lease) > millis(retention) {
            return Err(ConfigError::LeaseExceedsRetention { lease, retention });
        }
        if let Some(wait) = self.claim.wait_duration() {
            at_most(
                "wait_for_original",
                wait,
                Duration::from_millis(WAIT_MS_MAX),
            )?;
        }
        if self.stored_response_limit_bytes > OUTCOME_LEN_MAX {
            return Err(ConfigError::TooLarge {
                setting: "stored_response_limit",
                value: self.stored_response_limit_bytes,
                max: OUTCOME_LEN_MAX,
            });
        }
        Ok(())
    }
}

fn millis(duration: Duration) -> u128 {
    duration.as_millis()
}

fn at_least(setting: &'static str, value: Duration, min: Duration) -> Result<(), ConfigError> {
    if millis(value) < millis(min) {
        return Err(ConfigError::TooShort {
            setting,
            value,
            min,
        });
    }
    Ok(())
}

fn at_most(setting: &'static str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if millis(value) > millis(max) {
        return Err(ConfigError::TooLong {
            setting,
            value,
            max,
        });
    }
    Ok(())
}

/// A layer configuration that cannot work, refused by
/// [`IdempotencyLayer::build`](super::IdempotencyLayer::build) (and by
/// [`Layer::layer`](tower::Layer::layer), which panics with it) instead of answering every
/// covered request with 503.
///
/// Each variant names the builder method (`setting`) whose value is refused. The bounds are
/// the ones every backend enforces (the crate's hard caps, [`RETENTION_MS_MAX`],
/// [`WAIT_MS_MAX`], [`OUTCOME_LEN_MAX`]); a backend configured with lower
/// [`Limits`](crate::Limits) refuses more, which only its claims can tell.
///
/// ```
/// use idemstore::http::{ConfigError, IdempotencyLayer};
/// use std::time::Duration;
///
/// let store = idemstore::Store::in_memory()?;
/// let refused = IdempotencyLayer::new(store)
///     .lease(Duration::from_secs(120))
///     .retention(Duration::from_secs(60))
///     .build();
/// assert!(matches!(refused, Err(ConfigError::LeaseExceedsRetention { .. })));
/// # Ok::<(), idemstore::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration is below its minimum: the lease and the retention must be at least 1 ms.
    TooShort {
        /// The builder method that set it.
        setting: &'static str,
        /// The configured value.
        value: Duration,
        /// The smallest accepted value.
        min: Duration,
    },
    /// A duration is above what any backend accepts.
    TooLong {
        /// The builder method that set it.
        setting: &'static str,
        /// The configured value.
        value: Duration,
        /// The largest accepted value.
        max: Duration,
    },
    /// A size in bytes is above what any backend accepts.
    TooLarge {
        /// The builder method that set it.
        setting: &'static str,
        /// The configured value.
        value: usize,
        /// The largest accepted value.
        max: usize,
    },
    /// The lease outlives the retention: a record would expire while its request still runs.
    LeaseExceedsRetention {
        /// The configured lease.
        lease: Duration,
        /// The configured retention.
        retention: Duration,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::TooShort {
                setting,
                value,
                min,
            } => write!(f, "`{setting}` is {value:?}, below the minimum of {min:?}"),
            ConfigError::TooLong {
                setting,
                value,
                max,
            } => write!(f, "`{setting}` is {value:?}, above the maximum of {max:?}"),
            ConfigError::TooLarge {
                setting,
                value,
                max,
            } => write!(
                f,
                "`{setting}` is {value} bytes, above the maximum of {max} bytes"
            ),
            ConfigError::LeaseExceedsRetention { lease, retention } => write!(
                f,
                "the lease of {lease:?} outlives the retention of {retention:?}"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(change: impl FnOnce(&mut Config)) -> Result<(), ConfigError> {
        let mut config = Config::default();
        change(&mut config);
        config.validate()
    }

    fn set_lease(config: &mut Config, lease: Duration) {
        config.claim = config.claim.clone().lease(lease);
    }

    fn set_retention(config: &mut Config, retention: Duration) {
        config.retention = retention;
        config.claim = config.claim.clone().retention(retention);
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn a_lease_or_retention_under_a_millisecond_is_too_short() {
        for lease in [Duration::ZERO, Duration::from_micros(999)] {
            let error = with(|c| set_lease(c, lease)).expect_err("refused");
            assert!(matches!(
                error,
                ConfigError::TooShort {
                    setting: "lease",
                    ..
                }
            ));
        }
        assert_eq!(with(|c| set_lease(c, Duration::from_millis(1))), Ok(()));
        let error = with(|c| set_retention(c, Duration::ZERO)).expect_err("refused");
        assert!(matches!(
            error,
            ConfigError::TooShort {
                setting: "retention",
                ..
            }
        ));
    }

    #[test]
    fn a_lease_longer_than_the_retention_is_refused() {
        let error = with(|c| {
            set_lease(c, Duration::from_secs(61));
            set_retention(c, Duration::from_secs(60));
        })
        .expect_err("refused");
        assert_eq!(
            error,
            ConfigError::LeaseExceedsRetention {
                lease: Duration::from_secs(61),
                retention: Duration::from_secs(60),
            }
        );
        let equal = with(|c| {
            set_lease(c, Duration::from_secs(60));
            set_retention(c, Duration::from_secs(60));
        });
        assert_eq!(
            equal,
            Ok(()),
            "a lease as long as the retention is accepted"
        );
    }

    #[test]
    fn values_over_the_hard_caps_are_refused() {
        let retention = Duration::from_millis(RETENTION_MS_MAX + 1);
        let error = with(|c| set_retention(c, retention)).expect_err("refused");
        assert!(matches!(
            error,
            ConfigError::TooLong {
                setting: "retention",
                ..
            }
        ));

        let wait = Duration::from_millis(WAIT_MS_MAX + 1);
        let error = with(|c| c.claim = c.claim.clone().wait(wait)).expect_err("refused");
        assert!(matches!(
            error,
            ConfigError::TooLong {
                setting: "wait_for_original",
                ..
            }
        ));

        let error =
            with(|c| c.stored_response_limit_bytes = OUTCOME_LEN_MAX + 1).expect_err("refused");
        assert!(matches!(
            error,
            ConfigError::TooLarge {
                setting: "stored_response_limit",
                ..
            }
        ));
        assert_eq!(
            with(|c| c.stored_response_limit_bytes = OUTCOME_LEN_MAX),
            Ok(())
        );
    }

    #[test]
    fn an_error_names_the_setting_and_the_bound() {
        let error = with(|c| set_lease(c, Duration::ZERO)).expect_err("refused");
        assert_eq!(
            error.to_string(),
            "`lease` is 0ns, below the minimum of 1ms"
        );
    }
}
