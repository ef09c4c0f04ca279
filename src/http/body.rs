//! The request and response bodies of the layer, and their collection.
//!
//! A covered request's body is read in full before anything else happens (it is part of the
//! fingerprint), so the inner service receives it buffered; every other request streams
//! through. A response is either a stored one (replay or problem, in full), a live one streamed
//! through, or a live one whose first bytes were read while trying to store it.

use std::fmt;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

/// The error of a request body, as the inner service's bounds require it.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn into_bytes<D: Buf>(mut data: D) -> Bytes {
    data.copy_to_bytes(data.remaining())
}

pin_project! {
    /// The body the inner service receives from [`Idempotency`](super::Idempotency): the
    /// buffered body of a covered request, or the original body streamed through.
    ///
    /// Axum routes accept it as they are (it is an `http_body::Body` of [`Bytes`]); a plain
    /// hyper or tower service names it in its request type:
    /// `Request<RequestBody<hyper::body::Incoming>>`. Trailers of a covered request are not
    /// forwarded.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Buffered { data: Option<Bytes> },
        Streaming { #[pin] inner: B },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn buffered(data: Bytes) -> Self {
        RequestBody {
            kind: RequestKind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn streaming(inner: B) -> Self {
        RequestBody {
            kind: RequestKind::Streaming { inner },
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            RequestKind::Buffered { .. } => "buffered",
            RequestKind::Streaming { .. } => "streaming",
        };
        f.debug_struct("RequestBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<B: Body> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Buffered { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            RequestKindProj::Streaming { inner } => inner
                .poll_frame(cx)
                .map(|frame| frame.map(|result| result.map(|f| f.map_data(into_bytes)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Buffered { data } => data.is_none(),
            RequestKind::Streaming { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Streaming { inner } => inner.size_hint(),
        }
    }
}

pin_project! {
    /// The body of every response from [`Idempotency`](super::Idempotency): a stored response
    /// (replay or problem) in full, or the inner service's body streamed through (after the
    /// bytes read while trying to store it, if it was too large).
    pub struct ResponseBody<B>
    where
        B: Body,
    {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B>
    where
        B: Body,
    {
        Full { data: Option<Bytes> },
        Streaming { #[pin] inner: B },
        Resumed { prefix: Option<Bytes>, inner: Pin<Box<B>> },
        Failed { prefix: Option<Bytes>, error: Option<B::Error> },
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn full(data: Bytes) -> Self {
        ResponseBody {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn streaming(inner: B) -> Self {
        ResponseBody {
            kind: ResponseKind::Streaming { inner },
        }
    }

    /// `prefix` (already read from `inner`), then the rest of `inner`.
    pub(crate) fn resumed(prefix: Bytes, inner: Pin<Box<B>>) -> Self {
        ResponseBody {
            kind: ResponseKind::Resumed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                inner,
            },
        }
    }

    /// `prefix` (read before the body failed), then the body's error.
    pub(crate) fn failed(prefix: Bytes, error: B::Error) -> Self {
        ResponseBody {
            kind: ResponseKind::Failed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                error: Some(error),
            },
        }
    }
}

impl<B: Body> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            ResponseKind::Full { .. } => "full",
            ResponseKind::Streaming { .. } => "streaming",
            ResponseKind::Resumed { .. } => "resumed",
            ResponseKind::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let map = |frame: Option<Result<Frame<B::Data>, B::Error>>| {
            frame.map(|result| result.map(|f| f.map_data(into_bytes)))
        };
        match self.project().kind.project() {
            ResponseKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseKindProj::Streaming { inner } => inner.poll_frame(cx).map(map),
            ResponseKindProj::Resumed { prefix, inner } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                None => inner.as_mut().poll_frame(cx).map(map),
            },
            ResponseKindProj::Failed { prefix, error } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                None => Poll::Ready(error.take().map(Err)),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full { data } => data.is_none(),
            ResponseKind::Streaming { inner } => inner.is_end_stream(),
            ResponseKind::Resumed { prefix, inner } => prefix.is_none() && inner.is_end_stream(),
            ResponseKind::Failed { prefix, error } => prefix.is_none() && error.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Streaming { inner } => inner.size_hint(),
            ResponseKind::Resumed { prefix, inner } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let hint = inner.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower().saturating_add(extra));
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper.saturating_add(extra));
                }
                out
            }
            ResponseKind::Failed { .. } => SizeHint::default(),
        }
    }
}

/// Why a covered request's body was not read.
pub(crate) enum ReadError {
    /// It is over the limit (declared or read).
    TooLarge,
    /// The body failed.
    Read(BoxError),
}

/// Reads a request body in full, refusing one over `limit` as early as its declared length
/// allows.
pub(crate) async fn read_request_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
) -> Result<Bytes, ReadError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let limit_u64 = limit as u64;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit_u64) || body.size_hint().lower() > limit_u64 {
        return Err(ReadError::TooLarge);
    }
    let mut body = pin!(body);
    let mut chunks = Chunks::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Read(e.into()))?;
        if let Ok(mut data) = frame.into_data() {
            chunks.push(data.copy_to_bytes(data.remaining()));
            if chunks.len > limit {
                return Err(ReadError::TooLarge);
            }
        }
    }
    Ok(chunks.concat())
}

/// Body chunks read so far, joined without a copy when there is only one.
#[derive(Default)]
struct Chunks {
    parts: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, bytes: Bytes) {
        self.len = self.len.saturating_add(bytes.len());
        if !bytes.is_empty() {
            self.parts.push(bytes);
        }
    }

    fn concat(mut self) -> Bytes {
        if self.parts.len() <= 1 {
            return self.parts.pop().unwrap_or_default();
        }
        let mut out = BytesMut::with_capacity(self.len);
        for part in self.parts {
            out.extend_from_slice(&part);
        }
        out.freeze()
    }
}

/// A response body after the attempt to read it for storing.
pub(crate) enum Collected<B: Body> {
    /// Read in full, within the limit.
    Complete(Bytes),
    /// Over the limit: what was read, and the rest still to stream.
    TooLarge { prefix: Bytes, rest: Pin<Box<B>> },
    /// The body failed after `prefix`.
    Failed { prefix: Bytes, error: B::Error },
}

/// Reads a response body for storing, up to `limit` bytes.
pub(crate) async fn collect_response<B: Body>(body: B, limit: usize) -> Collected<B> {
    let mut body = Box::pin(body);
    if body.size_hint().lower() > limit as u64 {
        return Collected::TooLarge {
            prefix: Bytes::new(),
            rest: body,
        };
    }
    let mut chunks = Chunks::default();
    loop {
        match body.frame().await {
            None => return Collected::Complete(chunks.concat()),
            Some(Err(error)) => {
                return Collected::Failed {
                    prefix: chunks.concat(),
                    error,
                };
            }
            Some(Ok(frame)) => {
                // Trailers are neither stored nor forwarded for a stored response.
                if let Ok(mut data) = frame.into_data() {
                    chunks.push(data.copy_to_bytes(data.remaining()));
                    if chunks.len > limit {
                        return Collected::TooLarge {
                            prefix: chunks.concat(),
                            rest: body,
                        };
                    }
                }
            }
        }
    }
}
