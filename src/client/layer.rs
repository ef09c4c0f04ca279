//! [`RetryLayer`]: the configuration, consumed by builder methods, and the tower `Layer`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use tower::Layer;

use super::policy::{DefaultRetryPolicy, RetryPolicy};
use super::service::RetryService;

/// The default for [`RetryLayer::max_attempts`]: the first attempt and up to three retries.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// The default for [`RetryLayer::base_delay`].
pub const DEFAULT_BASE_DELAY: Duration = Duration::from_millis(100);
/// The default for [`RetryLayer::max_delay`].
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(10);
/// The default for [`RetryLayer::total_time`].
pub const DEFAULT_TOTAL_TIME: Duration = Duration::from_secs(60);
/// The default for [`RetryLayer::max_body_bytes`]: 1 MiB, the server layer's default
/// request body limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// The header the generated keys go in, unless [configured](RetryLayer::key_header)
/// otherwise: `Idempotency-Key`, as in the IETF draft, Stripe's API and the server layer.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A total time above this is taken as this: far enough to mean "no limit", near enough that
/// the deadline stays a representable instant.
const TOTAL_TIME_CEILING: Duration = Duration::from_secs(365 * 24 * 3600);

/// The settings a [`RetryService`] runs with.
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) max_attempts: u32,
    pub(super) base_delay: Duration,
    pub(super) max_delay: Duration,
    pub(super) total_time: Duration,
    pub(super) attempt_timeout: Option<Duration>,
    pub(super) max_body_bytes: usize,
    pub(super) retry_idempotent_methods: bool,
    pub(super) key_header: HeaderName,
    pub(super) jitter_seed: Option<u64>,
}

/// How a request may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resend {
    /// `POST`, `PATCH`: under an `Idempotency-Key`, the server runs it once.
    WithKey,
    /// Idempotent by its method (RFC 9110 §9.2.2), and configured to be retried.
    ByMethod,
    /// Sent once.
    Never,
}

impl Config {
    pub(super) fn resend(&self, method: &Method) -> Resend {
        if *method == Method::POST || *method == Method::PATCH {
            Resend::WithKey
        } else if self.retry_idempotent_methods
            && [
                Method::GET,
                Method::HEAD,
                Method::PUT,
                Method::DELETE,
                Method::OPTIONS,
                Method::TRACE,
            ]
            .contains(method)
        {
            Resend::ByMethod
        } else {
            Resend::Never
        }
    }

    /// The total time, with "no limit" brought down to a representable one.
    pub(super) fn total_time(&self) -> Duration {
        self.total_time.min(TOTAL_TIME_CEILING)
    }
}

/// A tower [`Layer`] for HTTP clients: one `Idempotency-Key` per logical `POST`/`PATCH`,
/// retries with exponential backoff and full jitter. See the [module docs](super) for what it
/// does to a request.
///
/// ```
/// use std::time::Duration;
/// use idemstore::client::RetryLayer;
///
/// let layer = RetryLayer::new()
///     .max_attempts(5)
///     .base_delay(Duration::from_millis(200))
///     .max_delay(Duration::from_secs(5))
///     .total_time(Duration::from_secs(30))
///     .attempt_timeout(Duration::from_secs(10))
///     .max_body_bytes(256 * 1024);
/// # let _ = layer;
/// ```
pub struct RetryLayer<P = DefaultRetryPolicy> {
    config: Config,
    policy: Arc<P>,
}

impl RetryLayer {
    /// A layer with the defaults: [`DefaultRetryPolicy`], [`DEFAULT_MAX_ATTEMPTS`] attempts,
    /// [`DEFAULT_BASE_DELAY`] doubling up to [`DEFAULT_MAX_DELAY`], [`DEFAULT_TOTAL_TIME`] in
    /// all, no attempt timeout, bodies buffered up to [`DEFAULT_MAX_BODY_BYTES`], only
    /// `POST`/`PATCH` retried.
    pub fn new() -> Self {
        RetryLayer {
            config: Config {
                max_attempts: DEFAULT_MAX_ATTEMPTS,
                base_delay: DEFAULT_BASE_DELAY,
                max_delay: DEFAULT_MAX_DELAY,
                total_time: DEFAULT_TOTAL_TIME,
                attempt_timeout: None,
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                retry_idempotent_methods: false,
                key_header: IDEMPOTENCY_KEY,
                jitter_seed: None,
            },
            policy: Arc::new(DefaultRetryPolicy),
        }
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<P> RetryLayer<P> {
    /// The most attempts per logical request, the first included; at least 1 (0 is taken
    /// as 1, which disables retries but still adds keys). Default [`DEFAULT_MAX_ATTEMPTS`].
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts.max(1);
        self
    }

    /// The backoff's base: retry `n` (0 for the first) waits a random time in
    /// `0..=min(max_delay, base_delay * 2^n)` ("full jitter"). Default [`DEFAULT_BASE_DELAY`].
    #[must_use]
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.config.base_delay = delay;
        self
    }

    /// The backoff's cap: no jittered wait is longer. A `Retry-After` from the server is
    /// honoured as sent, beyond this cap, within the [total time](Self::total_time). Default
    /// [`DEFAULT_MAX_DELAY`].
    #[must_use]
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.config.max_delay = delay;
        self
    }

    /// The most time one logical request takes, from its first attempt, waits included. A
    /// wait that would end past it is not taken (the last response or error is returned); an
    /// attempt still in flight when it runs out is abandoned with
    /// [`RetryError::TotalTimeElapsed`](super::RetryError::TotalTimeElapsed). Default
    /// [`DEFAULT_TOTAL_TIME`]; [`Duration::MAX`] means no limit in practice (it is taken as
    /// one year).
    #[must_use]
    pub fn total_time(mut self, total: Duration) -> Self {
        self.config.total_time = total;
        self
    }

    /// The most time one attempt waits for its response head; an attempt over it is abandoned
    /// as [`RetryError::AttemptTimedOut`](super::RetryError::AttemptTimedOut), an error outcome
    /// the policy may retry. Default: none (only the total time bounds an attempt).
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.config.attempt_timeout = Some(timeout);
        self
    }

    /// The largest request body buffered so that it can be resent. A body known (from its
    /// size hint) or found (while reading) to be larger is sent once, streamed, without
    /// retries; at most this many bytes plus one chunk are held while finding out. Default
    /// [`DEFAULT_MAX_BODY_BYTES`].
    #[must_use]
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.config.max_body_bytes = limit;
        self
    }

    /// Whether requests idempotent by their method — `GET`, `HEAD`, `PUT`, `DELETE`,
    /// `OPTIONS`, `TRACE` (RFC 9110 §9.2.2) — are retried too, without a key. Default `false`:
    /// only `POST`/`PATCH`, under their key, are retried; every other request is sent once.
    #[must_use]
    pub fn retry_idempotent_methods(mut self, retry: bool) -> Self {
        self.config.retry_idempotent_methods = retry;
        self
    }

    /// The header that carries the key. Default [`IDEMPOTENCY_KEY`].
    #[must_use]
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.config.key_header = name;
        self
    }

    /// Seeds the jitter: every logical request then draws the same sequence of waits. For
    /// reproducible tests; by default each request's generator is seeded at random.
    #[must_use]
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.config.jitter_seed = Some(seed);
        self
    }

    /// Replaces what is retried: a [`RetryPolicy`], such as a closure
    /// `Fn(&Attempt<'_>) -> bool`. The layer still decides which requests may be resent, how
    /// often and for how long.
    #[must_use]
    pub fn policy<Q: RetryPolicy>(self, policy: Q) -> RetryLayer<Q> {
        RetryLayer {
            config: self.config,
            policy: Arc::new(policy),
        }
    }
}

impl<P> Clone for RetryLayer<P> {
    fn clone(&self) -> Self {
        RetryLayer {
            config: self.config.clone(),
            policy: Arc::clone(&self.policy),
        }
    }
}

impl<P> fmt::Debug for RetryLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("config", &self.config)
            .field("policy", &std::any::type_name::<P>())
            .finish()
    }
}

impl<S, P> Layer<S> for RetryLayer<P> {
    type Service = RetryService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService::new(
            inner,
            Arc::new(self.config.clone()),
            Arc::clone(&self.policy),
        )
    }
}
