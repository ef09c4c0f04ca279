//! Where a request's scope comes from: the namespace its keys live in.

use http::HeaderName;
use http::request::Parts;

use super::problem::{Problem, ProblemType};
use crate::SCOPE_LEN_MAX;

/// Extracts the scope of a request: who owns its idempotency key (tenant, account, API
/// principal). Keys never collide across scopes, and one scope can never replay another's
/// record, so the scope must identify the caller, not anything the caller chooses freely.
///
/// Returning `None` answers the request with a 400 problem
/// ([`ProblemType::InvalidScope`](super::ProblemType::InvalidScope)) without running it. A scope
/// is at most [`SCOPE_LEN_MAX`](crate::SCOPE_LEN_MAX) bytes (or the store's
/// [scope limit](crate::Limits::max_scope_len), if lower; a longer one is a 400 too); hash
/// longer identities (and secrets such as API keys, which should not be stored in clear).
///
/// Implemented by [`GlobalScope`] (the default), [`HeaderScope`], and every closure
/// `Fn(&http::request::Parts) -> Option<Vec<u8>>`, for example one that reads the principal an
/// authentication middleware put into the request extensions:
///
/// ```
/// use idemstore::http::IdempotencyLayer;
///
/// #[derive(Clone)]
/// struct Principal { account_id: String }
///
/// let store = idemstore::Store::in_memory()?;
/// let layer = IdempotencyLayer::new(store).scope(|request: &http::request::Parts| {
///     let principal = request.extensions.get::<Principal>()?;
///     Some(principal.account_id.as_bytes().to_vec())
/// });
/// # Ok::<(), idemstore::Error>(())
/// ```
pub trait ScopeExtractor: Send + Sync + 'static {
    /// The scope of the request, or `None` if it has none.
    fn scope(&self, request: &Parts) -> Option<Vec<u8>>;
}

impl<F> ScopeExtractor for F
where
    F: Fn(&Parts) -> Option<Vec<u8>> + Send + Sync + 'static,
{
    fn scope(&self, request: &Parts) -> Option<Vec<u8>> {
        self(request)
    }
}

/// One scope for every request (the empty scope): the default, for services with a single
/// tenant. Multi-tenant services must configure a real extractor.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalScope;

impl ScopeExtractor for GlobalScope {
    fn scope(&self, _request: &Parts) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
}

/// The value of a request header as the scope (for example a tenant header set by a trusted
/// gateway). A request without the header, or with it more than once, has no scope.
#[derive(Debug, Clone)]
pub struct HeaderScope {
    name: HeaderName,
}

impl HeaderScope {
    /// Scopes requests by the header `name`.
    #[must_use]
    pub fn new(name: HeaderName) -> Self {
        HeaderScope { name }
    }
}

impl ScopeExtractor for HeaderScope {
    fn scope(&self, request: &Parts) -> Option<Vec<u8>> {
        let mut values = request.headers.get_all(&self.name).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        Some(value.as_bytes().to_vec())
    }
}

/// The scope of a request, or the problem that refuses it: none found, or longer than any
/// store accepts. A store may accept shorter scopes only: its refusal is a 400 too, decided
/// when the claim is refused.
pub(crate) fn read_scope<X: ScopeExtractor>(
    extractor: &X,
    request: &Parts,
) -> Result<Vec<u8>, Problem> {
    let Some(scope) = extractor.scope(request) else {
        return Err(Problem::new(
            ProblemType::InvalidScope,
            "the request has no scope (for example no authenticated principal), so it cannot be \
             made idempotent",
        ));
    };
    if scope.len() > SCOPE_LEN_MAX {
        return Err(Problem::new(
            ProblemType::InvalidScope,
            format!("the request's scope is longer than {SCOPE_LEN_MAX} bytes"),
        ));
    }
    Ok(scope)
}
