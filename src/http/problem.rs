//! The answers the layer makes itself: each condition ([`ProblemType`]) as a [`Problem`], and
//! its rendering into a response by a [`RenderProblem`], by default [`ProblemJson`]
//! (RFC 9457, `application/problem+json`, with a stable `type` per condition).

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body::Body;
use serde::Serialize;
use serde_json::{Map, Value};

use super::body::ResponseBody;
use super::metrics::{Counter, Metrics};

/// The media type of problem bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A condition the layer answers with a problem response instead of running the request.
///
/// Each has a stable `type` URI ([`ProblemType::uri`]: `urn:idemstore:problem:<slug>`, an
/// identifier rather than a web page), a status and a title. Clients branch on the `type`, not
/// on the title or the detail text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemType {
    /// 400: a covered request has no idempotency key and keys are required.
    MissingKey,
    /// 400: the key is empty, longer than 255 bytes (or than the store's
    /// [key limit](crate::Limits::max_key_len)), not visible ASCII, or sent more than once.
    InvalidKey,
    /// 400: the scope extractor found no scope for the request (for example no authenticated
    /// principal), or the scope is longer than [`SCOPE_LEN_MAX`](crate::SCOPE_LEN_MAX) bytes
    /// (or than the store's [scope limit](crate::Limits::max_scope_len)).
    InvalidScope,
    /// 400: the request body could not be read.
    UnreadableBody,
    /// 413: the request body is over the configured limit; nothing was claimed.
    BodyTooLarge,
    /// 409: the original request with this key is still being processed; retry after the
    /// `Retry-After` header.
    InFlight,
    /// 409: the request ran, but lost its lease before its response could be stored: it
    /// outlived the lease and another attempt took the key over (or the record is gone). Its
    /// response was discarded, never stored over the other attempt's record; retry after the
    /// `Retry-After` header to get the answer of the attempt that holds the key.
    LeaseLost,
    /// 422: the key was already used for a request with another fingerprint (method, path,
    /// query, body or fingerprinted headers).
    KeyReused,
    /// 410: the request with this key ran, but its response was too large to store, so it
    /// cannot be replayed. The request is not run again.
    ResponseNotStored,
    /// 429: the scope holds its maximum number of records
    /// ([`Limits::max_records_per_scope`](crate::Limits::max_records_per_scope)).
    QuotaExceeded,
    /// 503: the idempotency store failed; the request was not run.
    StoreUnavailable,
    /// 500: the stored response could not be decoded (written by something else, or by a
    /// newer format); the request is not run again.
    OutcomeUnreadable,
}

impl ProblemType {
    /// The stable `type` member of the problem body.
    #[must_use]
    pub fn uri(self) -> &'static str {
        match self {
            ProblemType::MissingKey => "urn:idemstore:problem:missing-key",
            ProblemType::InvalidKey => "urn:idemstore:problem:invalid-key",
            ProblemType::InvalidScope => "urn:idemstore:problem:invalid-scope",
            ProblemType::UnreadableBody => "urn:idemstore:problem:unreadable-body",
            ProblemType::BodyTooLarge => "urn:idemstore:problem:body-too-large",
            ProblemType::InFlight => "urn:idemstore:problem:in-flight",
            ProblemType::LeaseLost => "urn:idemstore:problem:lease-lost",
            ProblemType::KeyReused => "urn:idemstore:problem:key-reused",
            ProblemType::ResponseNotStored => "urn:idemstore:problem:response-not-stored",
            ProblemType::QuotaExceeded => "urn:idemstore:problem:quota-exceeded",
            ProblemType::StoreUnavailable => "urn:idemstore:problem:store-unavailable",
            ProblemType::OutcomeUnreadable => "urn:idemstore:problem:outcome-unreadable",
        }
    }

    /// The HTTP status of the problem response.
    #[must_use]
    pub fn status(self) -> StatusCode {
        match self {
            ProblemType::MissingKey
            | ProblemType::InvalidKey
            | ProblemType::InvalidScope
            | ProblemType::UnreadableBody => StatusCode::BAD_REQUEST,
            ProblemType::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemType::InFlight | ProblemType::LeaseLost => StatusCode::CONFLICT,
            ProblemType::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemType::ResponseNotStored => StatusCode::GONE,
            ProblemType::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ProblemType::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProblemType::OutcomeUnreadable => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The short, stable human-readable summary (`title`).
    #[must_use]
    pub fn title(self) -> &'static str {
        match self {
            ProblemType::MissingKey => "Idempotency key required",
            ProblemType::InvalidKey => "Invalid idempotency key",
            ProblemType::InvalidScope => "No idempotency scope",
            ProblemType::UnreadableBody => "Unreadable request body",
            ProblemType::BodyTooLarge => "Request body too large",
            ProblemType::InFlight => "Original request still in progress",
            ProblemType::LeaseLost => "Request superseded by another attempt",
            ProblemType::KeyReused => "Idempotency key reused for another request",
            ProblemType::ResponseNotStored => "Original response was not stored",
            ProblemType::QuotaExceeded => "Too many idempotency records",
            ProblemType::StoreUnavailable => "Idempotency store unavailable",
            ProblemType::OutcomeUnreadable => "Stored response unreadable",
        }
    }
}

/// A condition the layer answers itself, before it is rendered into a response: its
/// [`ProblemType`] (and so its status and title), a human-readable `detail`, the extension
/// members of the default body (such as `retry_after`, `max_length`, `limit`), and the
/// idempotency key of the request when the layer had read a valid one.
///
/// A [`RenderProblem`] turns it into the response; [`Problem::new`] and the `with_*` methods
/// build one, for example to test a renderer:
///
/// ```
/// use idemstore::http::{Problem, ProblemType};
///
/// let problem = Problem::new(ProblemType::InFlight, "still running")
///     .with_retry_after(1)
///     .with_key("8e03978e-40d5-43e8-bc93-6894a57f9324");
/// assert_eq!(problem.status(), http::StatusCode::CONFLICT);
/// assert_eq!(problem.retry_after(), Some(1));
/// assert_eq!(problem.members()["retry_after"], 1);
/// assert_eq!(problem.key(), Some("8e03978e-40d5-43e8-bc93-6894a57f9324"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    kind: ProblemType,
    detail: String,
    members: Map<String, Value>,
    retry_after_s: Option<u64>,
    key: Option<String>,
}

impl Problem {
    /// A problem of `kind` with this `detail`, no extension members, no `Retry-After` and no
    /// key.
    #[must_use]
    pub fn new(kind: ProblemType, detail: impl Into<String>) -> Problem {
        Problem {
            kind,
            detail: detail.into(),
            members: Map::new(),
            retry_after_s: None,
            key: None,
        }
    }

    /// Adds (or replaces) an extension member of the body.
    #[must_use]
    pub fn with_member(mut self, name: &str, value: impl Into<Value>) -> Problem {
        self.members.insert(name.to_owned(), value.into());
        self
    }

    /// Sets the `Retry-After` (seconds) and the matching `retry_after` member.
    #[must_use]
    pub fn with_retry_after(mut self, seconds: u64) -> Problem {
        self.retry_after_s = Some(seconds);
        self.with_member("retry_after", seconds)
    }

    /// Sets the idempotency key of the request. It is not a member of the default body; a
    /// renderer may quote it (Stripe's messages do).
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Problem {
        self.key = Some(key.into());
        self
    }

    /// The condition.
    #[must_use]
    pub fn kind(&self) -> ProblemType {
        self.kind
    }

    /// The HTTP status of the condition ([`ProblemType::status`]).
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The short, stable summary of the condition ([`ProblemType::title`]).
    #[must_use]
    pub fn title(&self) -> &'static str {
        self.kind.title()
    }

    /// What happened to this request, in words (not stable: clients branch on the
    /// [`kind`](Self::kind)).
    #[must_use]
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The extension members of the default body (ordered by name): `retry_after` (seconds)
    /// on a 409, `max_length` or `min_length` on an invalid key, `limit` on a 413 or 429,
    /// `original_status` on a 410.
    #[must_use]
    pub fn members(&self) -> &Map<String, Value> {
        &self.members
    }

    /// The `Retry-After` of this answer, in seconds, if it has one (409
    /// [in flight](ProblemType::InFlight) and [lease lost](ProblemType::LeaseLost)). The layer
    /// sets the header itself, whatever the renderer does.
    #[must_use]
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after_s
    }

    /// The idempotency key of the request, when the layer had read a valid one (every
    /// condition but [`MissingKey`](ProblemType::MissingKey) and
    /// [`InvalidKey`](ProblemType::InvalidKey) found by the layer's own check).
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

/// Turns the layer's own answers ([`Problem`]s) into HTTP responses: status, headers and body.
///
/// Set with [`IdempotencyLayer::render_errors`](super::IdempotencyLayer::render_errors); the
/// default is [`ProblemJson`]. Implemented by [`ProblemJson`] and by every closure (or `fn`)
/// `Fn(&Problem) -> http::Response<bytes::Bytes>` that is `Send + Sync + 'static`; a closure
/// names its argument's type (`|problem: &Problem|`), as closures taking references must.
///
/// What the layer does around the renderer, whatever it returns:
/// - **`Retry-After`**: on an answer that has one ([`Problem::retry_after`]: 409
///   [in flight](ProblemType::InFlight), [lease lost](ProblemType::LeaseLost)), the layer sets
///   the header after rendering, replacing any the renderer set, so that no renderer can
///   drop it; the renderer only puts the value into its body if it wants to.
/// - **`Idempotent-Replayed: true`** is added to the 410
///   ([`ResponseNotStored`](ProblemType::ResponseNotStored)), which answers a replay.
/// - `Content-Length` follows from the body; nothing else is added or checked. The status is
///   the renderer's choice: a renderer may answer a condition with another status than
///   [`Problem::status`] (Stripe answers a reused key with 400, not 422).
///
/// Rendering runs on the request's task, once per answer; it should not block.
///
/// ```
/// use bytes::Bytes;
/// use idemstore::http::{IdempotencyLayer, Problem, ProblemType};
///
/// let store = idemstore::Store::in_memory()?;
/// let layer = IdempotencyLayer::new(store).render_errors(|problem: &Problem| {
///     let status = match problem.kind() {
///         ProblemType::KeyReused => http::StatusCode::BAD_REQUEST,
///         _ => problem.status(),
///     };
///     let body = serde_json::json!({ "error": { "message": problem.detail() } });
///     http::Response::builder()
///         .status(status)
///         .header(http::header::CONTENT_TYPE, "application/json")
///         .body(Bytes::from(body.to_string()))
///         .expect("a valid response")
/// });
/// # let _ = layer;
/// # Ok::<(), idemstore::Error>(())
/// ```
pub trait RenderProblem: Send + Sync + 'static {
    /// The response for `problem`.
    fn render(&self, problem: &Problem) -> Response<Bytes>;
}

impl<F> RenderProblem for F
where
    F: Fn(&Problem) -> Response<Bytes> + Send + Sync + 'static,
{
    fn render(&self, problem: &Problem) -> Response<Bytes> {
        self(problem)
    }
}

/// The default renderer: `application/problem+json` (RFC 9457), with the members `type`
/// ([`ProblemType::uri`]), `title`, `status`, `detail`, then the extension members, and the
/// condition's own status.
///
/// ```
/// use idemstore::http::{Problem, ProblemJson, ProblemType, RenderProblem};
///
/// let response = ProblemJson.render(&Problem::new(ProblemType::KeyReused, "use a new key"));
/// assert_eq!(response.status(), 422);
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// assert_eq!(
///     response.body(),
///     r#"{"type":"urn:idemstore:problem:key-reused","title":"Idempotency key reused for another request","status":422,"detail":"use a new key"}"#
/// );
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ProblemJson;

/// The JSON body, members in the order RFC 9457 lists them, then the extension members.
#[derive(Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    #[serde(flatten)]
    members: &'a Map<String, Value>,
}

impl RenderProblem for ProblemJson {
    fn render(&self, problem: &Problem) -> Response<Bytes> {
        let status = problem.status();
        let body = ProblemBody {
            kind: problem.kind.uri(),
            title: problem.title(),
            status: status.as_u16(),
            detail: &problem.detail,
            members: &problem.members,
        };
        // Serialising strings and numbers cannot fail; an empty body is the fallback.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::new(Bytes::from(bytes));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

/// A problem as a response of the layer: rendered, then given the headers the layer always sets
/// (see [`RenderProblem`]).
pub(crate) fn problem_response<B: Body>(
    renderer: &dyn RenderProblem,
    problem: &Problem,
) -> Response<ResponseBody<B>> {
    let mut response = renderer.render(problem);
    if let Some(seconds) = problem.retry_after() {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    response.map(ResponseBody::full)
}

/// Answers a request the client got wrong with a problem, without running it, counting it as
/// a rejection.
pub(crate) fn reject<B: Body>(
    metrics: &Metrics,
    renderer: &dyn RenderProblem,
    problem: &Problem,
) -> Response<ResponseBody<B>> {
    metrics.inc(Counter::Rejected);
    tracing::debug!(problem = problem.kind().uri(), "rejected");
    problem_response(renderer, problem)
}
