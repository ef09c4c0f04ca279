//! The boxed, object-safe form of [`IdempotencyBackend`]: [`DynBackend`] and [`AnyBackend`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::{Capabilities, IdempotencyBackend};
use crate::core::admin::{Orphan, Swept};
use crate::core::claim::{Claim, ClaimOptions, Lease};
use crate::core::record::Record;
use crate::engine::Store;
use crate::error::{Error, Result};
use crate::limits::Limits;

/// A boxed `Send` future: what [`DynBackend`]'s methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`IdempotencyBackend`] with boxed futures, so that it can be a trait object
/// (`dyn DynBackend`). Every `IdempotencyBackend` is one; use it through [`AnyBackend`].
pub trait DynBackend: Send + Sync + 'static {
    /// [`IdempotencyBackend::claim`].
    fn claim<'a>(
        &'a self,
        scope: &'a [u8],
        key: &'a [u8],
        fingerprint: &'a [u8],
        options: &'a ClaimOptions,
    ) -> BoxFuture<'a, Result<Claim>>;
    /// [`IdempotencyBackend::complete`].
    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: &'a [u8],
        retention: Duration,
    ) -> BoxFuture<'a, Result<()>>;
    /// [`IdempotencyBackend::fail`].
    fn fail<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>>;
    /// [`IdempotencyBackend::extend`].
    fn extend<'a>(&'a self, lease: &'a mut Lease, by: Duration) -> BoxFuture<'a, Result<()>>;
    /// [`IdempotencyBackend::checkpoint`].
    fn checkpoint<'a>(
        &'a self,
        lease: &'a Lease,
        checkpoint: &'a [u8],
    ) -> BoxFuture<'a, Result<()>>;
    /// [`IdempotencyBackend::get`].
    fn get<'a>(&'a self, scope: &'a [u8], key: &'a [u8]) -> BoxFuture<'a, Result<Option<Record>>>;
    /// [`IdempotencyBackend::forget`].
    fn forget<'a>(&'a self, scope: &'a [u8], key: &'a [u8]) -> BoxFuture<'a, Result<bool>>;
    /// [`IdempotencyBackend::orphans`].
    fn orphans(&self, limit: usize) -> BoxFuture<'_, Result<Vec<Orphan>>>;
    /// [`IdempotencyBackend::sweep`].
    fn sweep(&self, limit: usize) -> BoxFuture<'_, Result<Swept>>;
    /// [`IdempotencyBackend::capabilities`].
    fn capabilities(&self) -> Capabilities;
    /// [`IdempotencyBackend::limits`].
    fn limits(&self) -> &Limits;
}

impl<T: IdempotencyBackend> DynBackend for T {
    fn claim<'a>(
        &'a self,
        scope: &'a [u8],
        key: &'a [u8],
        fingerprint: &'a [u8],
        options: &'a ClaimOptions,
    ) -> BoxFuture<'a, Result<Claim>> {
        Box::pin(IdempotencyBackend::claim(
            self,
            scope,
            key,
            fingerprint,
            options,
        ))
    }

    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: &'a [u8],
        retention: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(IdempotencyBackend::complete(
            self, lease, outcome, retention,
        ))
    }

    fn fail<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<()>> {
        Box::pin(IdempotencyBackend::fail(self, lease))
    }

    fn extend<'a>(&'a self, lease: &'a mut Lease, by: Duration) -> BoxFuture<'a, Result<()>> {
        Box::pin(IdempotencyBackend::extend(self, lease, by))
    }

    fn checkpoint<'a>(
        &'a self,
        lease: &'a Lease,
        checkpoint: &'a [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(IdempotencyBackend::checkpoint(self, lease, checkpoint))
    }

    fn get<'a>(&'a self, scope: &'a [u8], key: &'a [u8]) -> BoxFuture<'a, Result<Option<Record>>> {
        Box::pin(IdempotencyBackend::get(self, scope, key))
    }

    fn forget<'a>(&'a self, scope: &'a [u8], key: &'a [u8]) -> BoxFuture<'a, Result<bool>> {
        Box::pin(IdempotencyBackend::forget(self, scope, key))
    }

    fn orphans(&self, limit: usize) -> BoxFuture<'_, Result<Vec<Orphan>>> {
        Box::pin(IdempotencyBackend::orphans(self, limit))
    }

    fn sweep(&self, limit: usize) -> BoxFuture<'_, Result<Swept>> {
        Box::pin(IdempotencyBackend::sweep(self, limit))
    }

    fn capabilities(&self) -> Capabilities {
        IdempotencyBackend::capabilities(self)
    }

    fn limits(&self) -> &Limits {
        IdempotencyBackend::limits(self)
    }
}

/// Any backend, chosen at run time: a cheap-to-clone handle to a boxed [`DynBackend`] that is
/// itself an [`IdempotencyBackend`], so the HTTP layer and application code take it like any
/// other backend. Each call costs one boxed future.
///
/// Build it from a backend with [`AnyBackend::new`], or from a configuration string with
/// [`AnyBackend::open`]:
///
/// ```
/// use idemstore::{AnyBackend, Claim, ClaimOptions, IdempotencyBackend};
///
/// let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
/// runtime.block_on(async {
///     // From configuration, e.g. IDEMSTORE_URL=postgres://db.internal/app in production.
///     let url = std::env::var("IDEMSTORE_URL").unwrap_or_else(|_| "memory:".into());
///     let backend = AnyBackend::open(&url).await?;
///     let claim = backend.claim(b"acct_42", b"order-1", b"fp", &ClaimOptions::default()).await?;
///     assert!(matches!(claim, Claim::Acquired(_)));
///     Ok::<(), idemstore::Error>(())
/// })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct AnyBackend {
    inner: Arc<dyn DynBackend>,
}

impl fmt::Debug for AnyBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnyBackend")
            .field("backend", &self.inner.capabilities().name)
            .finish()
    }
}

/// A configuration string [`AnyBackend::open`] cannot use.
#[derive(Debug)]
struct BadBackendUrl(String);

impl fmt::Display for BadBackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadBackendUrl {}

impl AnyBackend {
    /// Boxes `backend`.
    pub fn new(backend: impl IdempotencyBackend) -> AnyBackend {
        AnyBackend {
            inner: Arc::new(backend),
        }
    }

    /// Opens the backend named by `url`, with default settings:
    ///
    /// - `memory:` — an in-memory [`Store`] (tests, caches);
    /// - `file:PATH` (or a plain path) — a [`Store`] on the file at `PATH`, opened inline
    ///   (open it before serving, not inside a request). A plain path must not start like a
    ///   scheme (`name:`): a misspelt scheme is refused rather than taken for a file name;
    /// - `postgres://…` or `postgresql://…` — a PostgreSQL backend (feature `postgres`) with
    ///   default settings; `PostgresBackend::builder` offers the others;
    /// - `redis://…` or `redis+unix://…` — a Redis or Valkey backend (feature `redis`; read
    ///   what Redis cannot promise in its module docs first).
    ///
    /// Neither server backend speaks TLS: `rediss://` and `postgres://…?sslmode=require` are
    /// refused with [`Error::Backend`] (their module docs, "No TLS").
    ///
    /// # Errors
    /// [`Error::Backend`] for a scheme this build does not know (a feature not enabled) or no
    /// backend has; the errors of opening or connecting to the backend.
    pub async fn open(url: &str) -> Result<AnyBackend> {
        if url == "memory:" || url == "memory" {
            return Ok(AnyBackend::new(Store::in_memory()?));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            #[cfg(feature = "postgres")]
            return Ok(AnyBackend::new(
                crate::backend::postgres::PostgresBackend::connect(url).await?,
            ));
            #[cfg(not(feature = "postgres"))]
            return Err(bad_url(
                "a postgres:// backend needs the `postgres` feature",
            ));
        }
        if url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://")
        {
            #[cfg(feature = "redis")]
            return Ok(AnyBackend::new(
                crate::backend::redis::RedisBackend::connect(url).await?,
            ));
            #[cfg(not(feature = "redis"))]
            return Err(bad_url("a redis:// backend needs the `redis` feature"));
        }
        if let Some(path) = url.strip_prefix("file:") {
            if path.is_empty() {
                return Err(bad_url("file: needs a path (file:PATH)"));
            }
            return Ok(AnyBackend::new(Store::open(path)?));
        }
        if url.contains("://") || has_scheme(url) {
            return Err(bad_url(&format!(
                "unknown backend scheme in {url:?} (known: memory:, file:PATH, postgres://, \
                 postgresql://, redis://, redis+unix://; a path whose first part has a colon \
                 is file:PATH or ./PATH)"
            )));
        }
        Ok(AnyBackend::new(Store::open(url)?))
    }

    /// The boxed backend.
    #[must_use]
    pub fn as_dyn(&self) -> &dyn DynBackend {
        self.inner.as_ref()
    }
}

/// Whether `url` starts like a URL scheme (`name:`, a name of two or more letters, digits,
/// `+`, `-` or `.`, the first a letter), so that a misspelt one is not taken for a file name.
/// (A one-letter prefix stays a path: `C:` is a drive.)
fn has_scheme(url: &str) -> bool {
    let Some((scheme, _)) = url.split_once(':') else {
        return false;
    };
    scheme.len() >= 2
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn bad_url(message: &str) -> Error {
    Error::Backend {
        source: Arc::new(BadBackendUrl(message.to_owned())),
    }
}

impl IdempotencyBackend for AnyBackend {
    async fn claim(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: &[u8],
        options: &ClaimOptions,
    ) -> Result<Claim> {
        self.inner.claim(scope, key, fingerprint, options).await
    }

    async fn complete(&self, lease: &Lease, outcome: &[u8], retention: Duration) -> Result<()> {
        self.inner.complete(lease, outcome, retention).await
    }

    async fn fail(&self, lease: &Lease) -> Result<()> {
        self.inner.fail(lease).await
    }

    async fn extend(&self, lease: &mut Lease, by: Duration) -> Result<()> {
        self.inner.extend(lease, by).await
    }

    async fn checkpoint(&self, lease: &Lease, checkpoint: &[u8]) -> Result<()> {
        self.inner.checkpoint(lease, checkpoint).await
    }

    async fn get(&self, scope: &[u8], key: &[u8]) -> Result<Option<Record>> {
        self.inner.get(scope, key).await
    }

    async fn forget(&self, scope: &[u8], key: &[u8]) -> Result<bool> {
        self.inner.forget(scope, key).await
    }

    async fn orphans(&self, limit: usize) -> Result<Vec<Orphan>> {
        self.inner.orphans(limit).await
    }

    async fn sweep(&self, limit: usize) -> Result<Swept> {
        self.inner.sweep(limit).await
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn limits(&self) -> &Limits {
        self.inner.limits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_scheme_is_refused_rather_than_taken_for_a_file_name() -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(Error::from_io)?;
        for url in [
            "memroy:",
            "bogus:x",
            "postgres:/localhost/db",
            "redis:localhost",
            "s3://bucket/key",
            "file:",
        ] {
            let opened = runtime.block_on(AnyBackend::open(url));
            assert!(
                matches!(opened, Err(Error::Backend { .. })),
                "{url}: {opened:?}"
            );
            assert!(!std::path::Path::new(url).exists(), "{url} was created");
        }
        // A path with a colon further on, or after a one-letter prefix (a drive), is a path.
        let dir = tempfile::tempdir().map_err(Error::from_io)?;
        let odd = dir.path().join("odd:name.redb");
        let odd = odd.to_str().ok_or(Error::Closed)?;
        assert!(!has_scheme(odd));
        assert!(!has_scheme("C:\\stores\\idem.redb"));
        assert!(has_scheme("file:x") && has_scheme("memory:"));
        runtime.block_on(AnyBackend::open(odd))?;
        runtime.block_on(AnyBackend::open(&format!("file:{odd}")))?;
        Ok(())
    }

    /// A URL that asks for TLS is a configuration error, found before connecting.
    #[cfg(any(feature = "postgres", feature = "redis"))]
    #[test]
    fn urls_that_ask_for_tls_are_refused_as_configuration_errors() -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::from_io)?;
        let mut urls = Vec::new();
        if cfg!(feature = "postgres") {
            urls.push("postgres://app@127.0.0.1:1/app?sslmode=require");
        }
        if cfg!(feature = "redis") {
            urls.push("rediss://127.0.0.1:1/");
        }
        for url in urls {
            let opened = runtime.block_on(AnyBackend::open(url));
            let Err(Error::Backend { source }) = opened else {
                panic!("{url}: {opened:?}");
            };
            assert!(source.to_string().contains("TLS"), "{url}: {source}");
        }
        Ok(())
    }
}
