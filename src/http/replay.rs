//! Replays: which response headers are stored, and the response built from a stored one,
//! marked `Idempotent-Replayed: true`.

use http::header::{
    CONNECTION, CONTENT_LENGTH, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, Response};
use http_body::Body;

use super::body::ResponseBody;
use super::metrics::{Counter, Metrics};
use super::outcome;
use super::problem::{Problem, ProblemType, RenderProblem, problem_response};

/// The response header that marks a replay: `Idempotent-Replayed: true`.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Hop-by-hop headers (RFC 9110 §7.6.1) and `Content-Length` (recomputed on replay).
const NEVER_STORED: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    CONTENT_LENGTH,
];

/// The response headers to store: all but hop-by-hop ones, those named by `Connection`, and
/// the deny list.
pub(crate) fn replayable_headers(headers: &HeaderMap, deny: &[HeaderName]) -> HeaderMap {
    let named_by_connection: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let skip = NEVER_STORED.contains(name)
            || deny.contains(name)
            || named_by_connection.iter().any(|n| n == name.as_str());
        if !skip {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The response for a replay: the stored status, headers and body, marked as a replay.
pub(crate) fn replay_response<ResBody: Body>(
    metrics: &Metrics,
    renderer: &dyn RenderProblem,
    key: &str,
    stored: &[u8],
) -> Response<ResponseBody<ResBody>> {
    let stored = match outcome::decode(stored) {
        Ok(stored) => stored,
        Err(error) => {
            metrics.inc(Counter::StoreError);
            tracing::error!(reason = error.0, "stored response unreadable");
            return problem_response(
                renderer,
                &Problem::new(
                    ProblemType::OutcomeUnreadable,
                    "the stored response of this request cannot be read; the request is not run \
                     again",
                )
                .with_key(key),
            );
        }
    };
    metrics.inc(Counter::Replayed);
    tracing::debug!(status = stored.status.as_u16(), "replayed");
    let mut response = match stored.body {
        Some(body) => {
            let mut response = Response::new(ResponseBody::full(body));
            *response.status_mut() = stored.status;
            *response.headers_mut() = stored.headers;
            response
        }
        None => problem_response(
            renderer,
            &Problem::new(
                ProblemType::ResponseNotStored,
                "the request with this idempotency key ran, but its response was too large to \
                 store; it is not run again",
            )
            .with_member("original_status", stored.status.as_u16())
            .with_key(key),
        ),
    };
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_denied_headers_are_not_stored() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("close, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("3"));
        headers.insert("set-cookie", HeaderValue::from_static("a=b"));
        let kept = replayable_headers(&headers, &[http::header::SET_COOKIE]);
        assert_eq!(kept.len(), 1);
        assert!(kept.contains_key("x-kept"));
    }
}
