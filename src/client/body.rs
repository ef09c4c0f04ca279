//! The request body the inner service receives: the buffered body, resent on each attempt, or
//! the caller's own body, streamed once.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::error::{BoxError, RetryError};

/// The body of each request the [`RetryService`](super::RetryService) sends to its inner
/// service.
///
/// A body that fits the [buffer bound](super::RetryLayer::max_body_bytes) is read in full
/// before the first attempt and every attempt sends a copy of it (the copies share one
/// allocation). A larger body, and the body of a request the layer does not retry, is the
/// caller's own, streamed once (after the part read while measuring it). It is `Unpin` and
/// `Send` when `B` is `Send`, as hyper-util's client asks of its bodies.
///
/// It is the body type of the client under the layer:
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::client::legacy::{Client, connect::HttpConnector};
/// use hyper_util::rt::TokioExecutor;
/// use idemstore::client::{ClientBody, RetryLayer, RetryService, DefaultRetryPolicy};
/// use tower::Layer;
///
/// // The caller sends `Request<Full<Bytes>>`; hyper-util sends `Request<ClientBody<Full<Bytes>>>`.
/// let http: Client<HttpConnector, ClientBody<Full<Bytes>>> =
///     Client::builder(TokioExecutor::new()).build_http();
/// let client: RetryService<_, DefaultRetryPolicy> = RetryLayer::new().layer(http);
/// # let _ = client;
/// ```
#[derive(Debug)]
pub struct ClientBody<B> {
    kind: Kind<B>,
}

#[derive(Debug)]
enum Kind<B> {
    Buffered {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Streaming {
        prefix: Option<Bytes>,
        rest: Pin<Box<B>>,
    },
}

impl<B> ClientBody<B> {
    fn streaming(prefix: Option<Bytes>, rest: Pin<Box<B>>) -> Self {
        ClientBody {
            kind: Kind::Streaming { prefix, rest },
        }
    }

    /// The caller's body, passed through as it is.
    pub(super) fn passthrough(body: B) -> Self {
        Self::streaming(None, Box::pin(body))
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Buffered { data, trailers } => {
                if let Some(data) = data.take().filter(|data| !data.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(
                    trailers
                        .take()
                        .map(|trailers| Ok(Frame::trailers(trailers))),
                )
            }
            Kind::Streaming { prefix, rest } => {
                if let Some(prefix) = prefix.take().filter(|prefix| !prefix.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                let frame = ready!(rest.as_mut().poll_frame(cx));
                Poll::Ready(frame.map(|frame| {
                    frame
                        .map(|frame| {
                            frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
                        })
                        .map_err(Into::into)
                }))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered { data, trailers } => {
                data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none()
            }
            Kind::Streaming { prefix, rest } => {
                prefix.as_ref().is_none_or(Bytes::is_empty) && rest.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let len = |bytes: &Option<Bytes>| bytes.as_ref().map_or(0, |bytes| bytes.len() as u64);
        match &self.kind {
            Kind::Buffered { data, .. } => SizeHint::with_exact(len(data)),
            Kind::Streaming { prefix, rest } => {
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(len(prefix)));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(len(prefix)));
                }
                hint
            }
        }
    }
}

/// A request body read in full: what every attempt resends.
#[derive(Debug, Clone)]
pub(super) struct Buffered {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Buffered {
    /// A fresh body for one attempt.
    pub(super) fn body<B>(&self) -> ClientBody<B> {
        ClientBody {
            kind: Kind::Buffered {
                data: Some(self.data.clone()),
                trailers: self.trailers.clone(),
            },
        }
    }
}

/// What [`read`] found.
pub(super) enum Read<B> {
    /// The body fits the bound: it can be resent.
    Whole(Buffered),
    /// The body is larger than the bound: send it once, as it is.
    TooLarge(ClientBody<B>),
}

/// Reads `body` in full if it is at most `limit_bytes` long. Stops reading as soon as it is
/// known to be longer (from its size hint, or once more than `limit_bytes` have arrived), so
/// at most `limit_bytes` plus one chunk are held.
///
/// # Errors
/// [`RetryError::RequestBody`] when the body fails to produce a frame.
pub(super) async fn read<B>(body: B, limit_bytes: usize) -> Result<Read<B>, RetryError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let limit = u64::try_from(limit_bytes).unwrap_or(u64::MAX);
    let mut body = Box::pin(body);
    if body.size_hint().lower() > limit {
        return Ok(Read::TooLarge(ClientBody::streaming(None, body)));
    }
    let mut data = BytesMut::new();
    loop {
        let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await else {
            return Ok(Read::Whole(Buffered {
                data: data.freeze(),
                trailers: None,
            }));
        };
        let frame = frame.map_err(|error| RetryError::RequestBody(error.into()))?;
        match frame.into_data() {
            Ok(chunk) => {
                data.put(chunk);
                if data.len() > limit_bytes {
                    return Ok(Read::TooLarge(ClientBody::streaming(
                        Some(data.freeze()),
                        body,
                    )));
                }
            }
            Err(frame) => {
                // Trailers end a body; any other kind of frame carries nothing to resend.
                if let Ok(trailers) = frame.into_trailers() {
                    return Ok(Read::Whole(Buffered {
                        data: data.freeze(),
                        trailers: Some(trailers),
                    }));
                }
            }
        }
    }
}
