//! Problem responses (RFC 9457, `application/problem+json`) for every condition the layer
//! answers itself, each with a stable `type`.

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

/// A problem response under construction.
#[derive(Debug)]
pub(crate) struct Problem {
    kind: ProblemType,
    detail: String,
    members: Map<String, Value>,
    retry_after_s: Option<u64>,
}

impl Problem {
    pub(crate) fn new(kind: ProblemType, detail: impl Into<String>) -> Problem {
        Problem {
            kind,
            detail: detail.into(),
            members: Map::new(),
            retry_after_s: None,
        }
    }

    /// Adds an extension member to the body.
    pub(crate) fn member(mut self, name: &str, value: impl Into<Value>) -> Problem {
        self.members.insert(name.to_owned(), value.into());
        self
    }

    /// Sets the `Retry-After` header (seconds) and the matching `retry_after` member.
    pub(crate) fn retry_after(mut self, seconds: u64) -> Problem {
        self.retry_after_s = Some(seconds);
        self.member("retry_after", seconds)
    }

    pub(crate) fn kind(&self) -> ProblemType {
        self.kind
    }

    pub(crate) fn into_response(self) -> Response<Bytes> {
        let status = self.kind.status();
        let body = ProblemBody {
            kind: self.kind.uri(),
            title: self.kind.title(),
            status: status.as_u16(),
            detail: &self.detail,
            members: &self.members,
        };
        // Serialising strings and numbers cannot fail; an empty body is the fallback.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::new(Bytes::from(bytes));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(seconds) = self.retry_after_s {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A problem as a response of the layer.
pub(crate) fn problem_response<B: Body>(problem: Problem) -> Response<ResponseBody<B>> {
    problem.into_response().map(ResponseBody::full)
}

/// Answers a request the client got wrong with a problem, without running it, counting it as
/// a rejection.
pub(crate) fn reject<B: Body>(metrics: &Metrics, problem: Problem) -> Response<ResponseBody<B>> {
    metrics.inc(Counter::Rejected);
    tracing::debug!(problem = problem.kind().uri(), "rejected");
    problem_response(problem)
}
