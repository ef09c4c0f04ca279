//! [`IdempotencyLayer`]: the builder of the configuration, its check, and the tower `Layer`
//! that applies it.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use tower::Layer;

use super::config::{Config, ConfigError};
use super::metrics::Metrics;
use super::policy::{DefaultStorePolicy, StorePolicy};
use super::problem::{ProblemJson, RenderProblem};
use super::scope::{GlobalScope, ScopeExtractor};
use super::service::Idempotency;
use crate::IdempotencyBackend;

/// Makes the requests of a service idempotent: wraps it in [`Idempotency`].
///
/// Generic over the store (`B`, any [`IdempotencyBackend`]), the scope extractor (`X`,
/// [`GlobalScope`] by default) and the store policy (`P`, [`DefaultStorePolicy`] by default).
/// Builder methods consume the layer and return it. Defaults:
///
/// | setting | default |
/// | --- | --- |
/// | [`methods`](Self::methods) covered | `POST`, `PATCH` |
/// | [`require_key`](Self::require_key) | `false`: a covered request without a key passes through |
/// | [`key_header`](Self::key_header) | `Idempotency-Key` |
/// | [`scope`](Self::scope) | [`GlobalScope`]: one scope for all requests |
/// | [`fingerprint_header`](Self::fingerprint_header) | none: method, path, query and body only |
/// | [`lease`](Self::lease) | 30 s, extended every 10 s while the handler runs |
/// | [`retention`](Self::retention) | 24 h |
/// | [`wait_for_original`](Self::wait_for_original) | off: a duplicate of a running request gets 409 |
/// | [`retry_after_max`](Self::retry_after_max) | 1 s |
/// | [`request_body_limit`](Self::request_body_limit) | 1 MiB (413 above) |
/// | [`stored_response_limit`](Self::stored_response_limit) | 1 MiB |
/// | [`deny_headers`](Self::deny_headers) (not replayed) | `Date`, `Set-Cookie` |
/// | [`store_policy`](Self::store_policy) | [`DefaultStorePolicy`]: all but 5xx, 408, 429 |
/// | [`render_errors`](Self::render_errors) | [`ProblemJson`]: `application/problem+json` |
///
/// The configuration is checked once, before the layer serves: [`build`](Self::build)
/// returns a [`ConfigError`] for one that cannot work, and [`Layer::layer`] panics with it, so
/// a layer applied without `build` is refused at start-up too, never on a request.
///
/// Cloning is cheap and shares the [`metrics`](Self::metrics).
#[must_use]
pub struct IdempotencyLayer<B, X = GlobalScope, P = DefaultStorePolicy> {
    pub(crate) backend: Arc<B>,
    pub(crate) scope: Arc<X>,
    pub(crate) policy: Arc<P>,
    pub(crate) config: Arc<Config>,
    pub(crate) renderer: Arc<dyn RenderProblem>,
    pub(crate) metrics: Metrics,
}

impl<B, X, P> Clone for IdempotencyLayer<B, X, P> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            backend: Arc::clone(&self.backend),
            scope: Arc::clone(&self.scope),
            policy: Arc::clone(&self.policy),
            config: Arc::clone(&self.config),
            renderer: Arc::clone(&self.renderer),
            metrics: self.metrics.clone(),
        }
    }
}

impl<B, X, P> std::fmt::Debug for IdempotencyLayer<B, X, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<B: IdempotencyBackend> IdempotencyLayer<B> {
    /// A layer on `backend` with the defaults above (a valid configuration): the embedded
    /// [`Store`](crate::Store) (on a file or in memory), an `Arc` of one, or any other backend.
    pub fn new(backend: B) -> Self {
        IdempotencyLayer {
            backend: Arc::new(backend),
            scope: Arc::new(GlobalScope),
            policy: Arc::new(DefaultStorePolicy),
            config: Arc::new(Config::default()),
            renderer: Arc::new(ProblemJson),
            metrics: Metrics::new(),
        }
    }
}

impl<B, X, P> IdempotencyLayer<B, X, P> {
    fn with_config(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// The methods whose requests are covered (made idempotent); other requests pass through
    /// untouched, even with a key. Default: `POST` and `PATCH`.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with_config(|c| c.methods = methods)
    }

    /// Whether a covered request without a key is rejected with 400
    /// ([`ProblemType::MissingKey`](super::ProblemType::MissingKey)) instead of passing through
    /// unprotected. Default: `false` (keys are optional, as at Stripe).
    pub fn require_key(self, required: bool) -> Self {
        self.with_config(|c| c.require_key = required)
    }

    /// The request header that carries the key.
    /// Default: [`IDEMPOTENCY_KEY`](super::IDEMPOTENCY_KEY).
    pub fn key_header(self, name: HeaderName) -> Self {
        self.with_config(|c| c.key_header = name)
    }

    /// Adds a request header to the fingerprint: the same key with another value of it is a
    /// mismatch (422). Default: no headers, only method, path, query and body.
    pub fn fingerprint_header(self, name: HeaderName) -> Self {
        self.with_config(|c| c.fingerprint_headers.push(name))
    }

    /// The lease of a running request: if its process dies, a retry may take it over after
    /// this long (at once after a restart of the embedded store). While the handler runs, the
    /// lease is extended every third of it, so a live request is never taken over.
    ///
    /// At least 1 ms and at most the [retention](Self::retention), or [`build`](Self::build)
    /// refuses it. It must also lie within the backend's own lease limit
    /// ([`Limits::max_lease`](crate::Limits::max_lease), 1 hour by default), which only the
    /// backend knows: above it, every covered request is answered 503 (with an `error` event
    /// naming the cause). Default: [`DEFAULT_LEASE`](super::DEFAULT_LEASE).
    pub fn lease(self, lease: Duration) -> Self {
        self.with_config(|c| c.claim = c.claim.clone().lease(lease))
    }

    /// How long a completed request's response is replayed. At least 1 ms and at most
    /// [`RETENTION_MS_MAX`](crate::RETENTION_MS_MAX), or [`build`](Self::build) refuses it;
    /// above the backend's own limit ([`Limits::max_retention`](crate::Limits::max_retention),
    /// 30 days by default) every covered request is answered 503.
    /// Default: [`DEFAULT_RETENTION`](super::DEFAULT_RETENTION).
    pub fn retention(self, retention: Duration) -> Self {
        self.with_config(|c| {
            c.retention = retention;
            c.claim = c.claim.clone().retention(retention);
        })
    }

    /// Lets a duplicate of a running request wait up to `wait` for the original and replay its
    /// response, instead of an immediate 409. If the original is still running after `wait`,
    /// the duplicate gets the 409. At most [`WAIT_MS_MAX`](crate::WAIT_MS_MAX), or
    /// [`build`](Self::build) refuses it; above the backend's own limit
    /// ([`Limits::max_wait`](crate::Limits::max_wait), 60 s by default) every covered request
    /// is answered 503. Default: no waiting.
    pub fn wait_for_original(self, wait: Duration) -> Self {
        self.with_config(|c| c.claim = c.claim.clone().wait(wait))
    }

    /// The largest `Retry-After` of a 409: it is the time left on the original's lease, at
    /// most this, at least 1 second.
    /// Default: [`DEFAULT_RETRY_AFTER_MAX`](super::DEFAULT_RETRY_AFTER_MAX).
    pub fn retry_after_max(self, max: Duration) -> Self {
        self.with_config(|c| c.retry_after_max = max)
    }

    /// The largest body of a covered request; a larger one gets 413
    /// ([`ProblemType::BodyTooLarge`](super::ProblemType::BodyTooLarge)) before anything is
    /// claimed.
    /// Default: [`DEFAULT_REQUEST_BODY_LIMIT_BYTES`](super::DEFAULT_REQUEST_BODY_LIMIT_BYTES).
    pub fn request_body_limit(self, bytes: usize) -> Self {
        self.with_config(|c| c.request_body_limit_bytes = bytes)
    }

    /// The largest response stored for replay (status, headers and body as encoded). Keep it
    /// within the store's outcome limit; above [`OUTCOME_LEN_MAX`](crate::OUTCOME_LEN_MAX),
    /// which no store exceeds, [`build`](Self::build) refuses it. A larger response still goes
    /// to its caller in full, and the claim is completed without the body: every retry with the
    /// key then gets 410
    /// ([`ProblemType::ResponseNotStored`](super::ProblemType::ResponseNotStored), with the
    /// original status in `original_status`) and the request never runs again.
    /// Default:
    /// [`DEFAULT_STORED_RESPONSE_LIMIT_BYTES`](super::DEFAULT_STORED_RESPONSE_LIMIT_BYTES).
    pub fn stored_response_limit(self, bytes: usize) -> Self {
        self.with_config(|c| c.stored_response_limit_bytes = bytes)
    }

    /// Response headers that are neither stored nor replayed, on top of the hop-by-hop headers
    /// (`Connection` and the headers it names, `Keep-Alive`, `Proxy-Authenticate`,
    /// `Proxy-Authorization`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`) and
    /// `Content-Length` (recomputed), which never are. Replaces the list.
    /// Default: `Date` (the server sets a fresh one) and `Set-Cookie`.
    pub fn deny_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let names = names.into_iter().collect();
        self.with_config(|c| c.deny_headers = names)
    }

    /// Where each request's scope comes from. Default: [`GlobalScope`].
    pub fn scope<X2: ScopeExtractor>(self, extractor: X2) -> IdempotencyLayer<B, X2, P> {
        IdempotencyLayer {
            backend: self.backend,
            scope: Arc::new(extractor),
            policy: self.policy,
            config: self.config,
            renderer: self.renderer,
            metrics: self.metrics,
        }
    }

    /// Which responses are stored and which release the claim. Default: [`DefaultStorePolicy`].
    pub fn store_policy<P2: StorePolicy>(self, policy: P2) -> IdempotencyLayer<B, X, P2> {
        IdempotencyLayer {
            backend: self.backend,
            scope: self.scope,
            policy: Arc::new(policy),
            config: self.config,
            renderer: self.renderer,
            metrics: self.metrics,
        }
    }

    /// How the layer's own answers (400 key missing or invalid, 409 in flight or lease lost,
    /// 422 key reused, 410, 413, 429, 500, 503: every [`Problem`](super::Problem)) are
    /// rendered: a [`RenderProblem`], or a closure `|problem: &Problem| -> http::Response<Bytes>`.
    /// The layer still sets `Retry-After` on the answers that have one, whatever the renderer
    /// returns (see [`RenderProblem`]). Responses of the handler, stored or replayed, are never
    /// rendered. Default: [`ProblemJson`].
    pub fn render_errors(mut self, renderer: impl RenderProblem) -> Self {
        self.renderer = Arc::new(renderer);
        self
    }

    /// The counters of this layer's decisions (shared by its clones and services).
    #[must_use]
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// The backend the layer claims requests in.
    #[must_use]
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Checks the configuration and returns the layer, ready to apply: a configuration that
    /// cannot work is refused here, at start-up, instead of answering every covered request
    /// with 503.
    ///
    /// ```
    /// use idemstore::http::IdempotencyLayer;
    /// use std::time::Duration;
    ///
    /// let store = idemstore::Store::in_memory()?;
    /// let layer = IdempotencyLayer::new(store)
    ///     .lease(Duration::from_secs(10))
    ///     .retention(Duration::from_secs(3600))
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`ConfigError`] naming the first setting that no backend accepts: a
    /// [`lease`](Self::lease) or [`retention`](Self::retention) under 1 ms, a lease longer than
    /// the retention, a retention, [`wait`](Self::wait_for_original) or
    /// [`stored_response_limit`](Self::stored_response_limit) above the crate's hard caps.
    /// Limits that a backend sets lower than its hard caps are not known to the layer: those
    /// are still found by the backend, on the first request.
    pub fn build(self) -> Result<Self, ConfigError> {
        self.config.validate()?;
        Ok(self)
    }
}

/// # Panics
/// If the configuration is one that [`IdempotencyLayer::build`] refuses, with its
/// [`ConfigError`]: the layer is applied when the service stack is built, so a configuration
/// that cannot work stops the program at start-up rather than failing every request.
impl<S, B, X, P> Layer<S> for IdempotencyLayer<B, X, P> {
    type Service = Idempotency<S, B, X, P>;

    fn layer(&self, inner: S) -> Self::Service {
        if let Err(error) = self.config.validate() {
            panic!("invalid IdempotencyLayer configuration: {error}");
        }
        Idempotency::new(inner, self.clone())
    }
}
