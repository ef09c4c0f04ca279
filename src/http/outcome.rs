//! The outcome bytes of a stored HTTP response: a small versioned binary format.
//!
//! ```text
//! magic  "IDH"        3 bytes
//! version 1           u8
//! kind                u8    0 = response with body, 1 = body not stored (too large)
//! status              u16   big-endian
//! header count        u16
//!   name length       u16, name bytes (lowercase, as `http` keeps them)
//!   value length      u32, value bytes
//! body length         u32   (kind 0 only)
//! body                bytes
//! ```
//!
//! The engine already checks a CRC over every record, so decoding only guards against outcomes
//! written by something else (the same store used directly) or by a later format: it checks
//! every length, never panics, and rejects trailing bytes.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 3] = b"IDH";
/// The version written by this build.
const VERSION: u8 = 1;
const KIND_FULL: u8 = 0;
const KIND_BODY_NOT_STORED: u8 = 1;

/// A response as stored for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// `None` when the response was too large to store: only its status and headers were kept.
    pub(crate) body: Option<Bytes>,
}

/// Why stored bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub(crate) &'static str);

/// The number of bytes [`encode`] writes for this response, without writing them.
pub(crate) fn encoded_len(headers: &HeaderMap, body: Option<&[u8]>) -> usize {
    let head = MAGIC.len() + 1 + 1 + 2 + 2;
    let headers: usize = headers
        .iter()
        .map(|(name, value)| 2 + name.as_str().len() + 4 + value.len())
        .sum();
    head + headers + body.map_or(0, |b| 4 + b.len())
}

/// Encodes a response. Headers are written in the map's iteration order (each value of a
/// repeated name in order); `None` for `body` records that the body was not stored.
///
/// Returns `None` if a header name, a value, the header count or the body exceeds its length
/// field (never for responses within the outcome limits).
pub(crate) fn encode(
    status: StatusCode,
    headers: &HeaderMap,
    body: Option<&[u8]>,
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(encoded_len(headers, body));
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(if body.is_some() {
        KIND_FULL
    } else {
        KIND_BODY_NOT_STORED
    });
    out.extend_from_slice(&status.as_u16().to_be_bytes());
    out.extend_from_slice(&u16::try_from(headers.len()).ok()?.to_be_bytes());
    for (name, value) in headers {
        let name = name.as_str().as_bytes();
        out.extend_from_slice(&u16::try_from(name.len()).ok()?.to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&u32::try_from(value.len()).ok()?.to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    if let Some(body) = body {
        out.extend_from_slice(&u32::try_from(body.len()).ok()?.to_be_bytes());
        out.extend_from_slice(body);
    }
    Some(out)
}

/// Decodes an outcome written by [`encode`].
pub(crate) fn decode(bytes: &[u8]) -> Result<StoredResponse, DecodeError> {
    let mut r = Reader(bytes);
    if r.take(MAGIC.len())? != MAGIC {
        return Err(DecodeError("not an HTTP outcome (bad magic)"));
    }
    if r.u8()? != VERSION {
        return Err(DecodeError("unsupported HTTP outcome version"));
    }
    let kind = r.u8()?;
    let status = StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError("invalid status code"))?;
    let count = usize::from(r.u16()?);
    let mut headers = HeaderMap::with_capacity(count);
    for _ in 0..count {
        let name_len = usize::from(r.u16()?);
        let name = HeaderName::from_bytes(r.take(name_len)?)
            .map_err(|_| DecodeError("invalid header name"))?;
        let value_len = r.u32_len()?;
        let value = HeaderValue::from_bytes(r.take(value_len)?)
            .map_err(|_| DecodeError("invalid header value"))?;
        headers.append(name, value);
    }
    let body = match kind {
        KIND_FULL => {
            let len = r.u32_len()?;
            Some(Bytes::copy_from_slice(r.take(len)?))
        }
        KIND_BODY_NOT_STORED => None,
        _ => return Err(DecodeError("unknown HTTP outcome kind")),
    };
    if !r.0.is_empty() {
        return Err(DecodeError("trailing bytes after the HTTP outcome"));
    }
    Ok(StoredResponse {
        status,
        headers,
        body,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or(DecodeError("truncated HTTP outcome"))?;
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(DecodeError("truncated HTTP outcome"))?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32_len(&mut self) -> Result<usize, DecodeError> {
        usize::try_from(u32::from_be_bytes(self.array()?))
            .map_err(|_| DecodeError("length does not fit in memory"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("location", HeaderValue::from_static("/v1/charges/ch_1"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers
    }

    #[test]
    fn a_response_round_trips() {
        let headers = sample_headers();
        let bytes = encode(StatusCode::CREATED, &headers, Some(b"{\"id\":1}")).expect("fits");
        assert_eq!(bytes.len(), encoded_len(&headers, Some(b"{\"id\":1}")));
        let decoded = decode(&bytes).expect("decodes");
        assert_eq!(decoded.status, StatusCode::CREATED);
        assert_eq!(decoded.headers, headers);
        assert_eq!(decoded.body.as_deref(), Some(&b"{\"id\":1}"[..]));
    }

    #[test]
    fn a_response_without_body_round_trips() {
        let bytes = encode(StatusCode::OK, &sample_headers(), None).expect("fits");
        assert_eq!(decode(&bytes).expect("decodes").body, None);
    }

    #[test]
    fn every_truncation_and_extension_is_rejected() {
        let bytes = encode(StatusCode::CREATED, &sample_headers(), Some(b"body")).expect("fits");
        for len in 0..bytes.len() {
            assert!(decode(bytes.get(..len).expect("in range")).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        assert!(decode(b"not an outcome at all").is_err());
    }
}
