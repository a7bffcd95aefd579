//! Request bodies over HTTP/3: whether a request has one, and the task that pumps it from
//! the QUIC stream to the backend request.

use std::{cell::Cell, future::poll_fn, io, rc::Rc, task::Poll, time::Duration};

use bytes::{Buf, Bytes};
use http::{header, request::Parts, HeaderMap, Method};
use http_body_util::channel::Sender as ChannelSender;
use tracing::debug;

use super::RecvHalf;

/// Pieces of the request body buffered between the QUIC stream and the backend.
pub(super) const BODY_CHANNEL_PIECES: usize = 4;

/// Request body state when the request head arrives.
pub(super) enum BodyStart {
    /// The client ended the stream after the head, or sent `content-length: 0`.
    Empty,
    /// A body follows. `first` is a piece that had already arrived, `length` the client's
    /// `content-length`.
    Streamed {
        first: Option<Bytes>,
        length: Option<u64>,
    },
}

/// Reason a request body cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodyError {
    /// `content-length` is not one decimal number.
    InvalidLength,
    /// The body is larger than the route's limit.
    TooLarge,
    /// The stream failed or stayed open without data for the body idle timeout.
    Failed,
}

impl BodyError {
    /// Returns the status sent to the client for this error.
    pub(super) fn status(self) -> u16 {
        match self {
            BodyError::InvalidLength | BodyError::Failed => 400,
            BodyError::TooLarge => 413,
        }
    }
}

/// Finds out whether the request has a body, without waiting for it when the request head
/// already shows it.
///
/// A `content-length` decides at once. Without one, data or the end of the stream that have
/// already arrived decide. Otherwise methods that usually carry a body (POST, PUT, PATCH and
/// unknown ones) are treated as having one, so the head goes to the backend before the client
/// sends any body byte. For GET, HEAD, DELETE, OPTIONS and TRACE the edge waits for the first
/// piece or the end of the stream, at most `idle`, so that a body-less request goes out
/// without framing.
pub(super) async fn start(
    recv: &mut RecvHalf,
    parts: &Parts,
    limit: u64,
    idle: Duration,
) -> Result<BodyStart, BodyError> {
    if let Some(length) = content_length(&parts.headers)? {
        if length > limit {
            return Err(BodyError::TooLarge);
        }
        if length == 0 {
            return Ok(BodyStart::Empty);
        }
        return Ok(BodyStart::Streamed {
            first: None,
            length: Some(length),
        });
    }
    let arrived = poll_fn(|cx| Poll::Ready(recv.poll_recv_data(cx).map(into_bytes))).await;
    let piece = match arrived {
        Poll::Ready(piece) => piece,
        Poll::Pending if !usually_without_body(&parts.method) => {
            return Ok(BodyStart::Streamed {
                first: None,
                length: None,
            });
        }
        Poll::Pending => match tokio::time::timeout(idle, recv.recv_data()).await {
            Ok(piece) => into_bytes(piece),
            Err(_) => return Err(BodyError::Failed),
        },
    };
    match piece {
        Ok(None) => Ok(BodyStart::Empty),
        Ok(Some(first)) => Ok(BodyStart::Streamed {
            first: Some(first),
            length: None,
        }),
        Err(e) => {
            debug!(error = %e, "reading the request body failed");
            Err(BodyError::Failed)
        }
    }
}

/// Copies a received body piece into `Bytes`.
fn into_bytes<B: Buf, E>(piece: Result<Option<B>, E>) -> Result<Option<Bytes>, E> {
    piece.map(|piece| piece.map(|mut data| data.copy_to_bytes(data.remaining())))
}

/// Returns the request's `content-length`, if it has one.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, BodyError> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(BodyError::InvalidLength);
    }
    let text = value.to_str().map_err(|_| BodyError::InvalidLength)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BodyError::InvalidLength);
    }
    text.parse().map(Some).map_err(|_| BodyError::InvalidLength)
}

/// Returns whether requests with `method` rarely carry a body (RFC 9110 section 9.3 gives
/// their content no defined meaning, and TRACE must not have one).
fn usually_without_body(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// Destination of the body pump: the backend side of the request.
pub(super) trait BodySink {
    /// Sends one piece; an error means the backend side is gone.
    async fn send_data(&mut self, data: Bytes) -> Result<(), ()>;
    /// Sends the trailers, which end the body.
    async fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), ()>;
    /// Ends the body without trailers.
    async fn finish(&mut self) -> Result<(), ()>;
    /// Ends the body with an error, so the backend gets an incomplete request.
    fn abort(self, reason: &str);
}

impl BodySink for ChannelSender<Bytes, io::Error> {
    async fn send_data(&mut self, data: Bytes) -> Result<(), ()> {
        ChannelSender::send_data(self, data).await.map_err(drop)
    }

    async fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), ()> {
        ChannelSender::send_trailers(self, trailers)
            .await
            .map_err(drop)
    }

    async fn finish(&mut self) -> Result<(), ()> {
        Ok(())
    }

    fn abort(self, reason: &str) {
        ChannelSender::abort(self, io::Error::other(reason.to_owned()));
    }
}

/// Copies the request body (`first`, then the rest of the stream, then trailers) into `sink`.
/// Stops the copy with an error when the body exceeds `limit` (and then sets `too_large`),
/// differs from `length`, fails, or sends nothing for `idle`.
pub(super) async fn pump<S: BodySink>(
    mut recv: RecvHalf,
    mut sink: S,
    first: Option<Bytes>,
    length: Option<u64>,
    limit: u64,
    idle: Duration,
    too_large: Rc<Cell<bool>>,
) {
    let mut sent: u64 = 0;
    let mut next = first;
    loop {
        let data = match next.take() {
            Some(data) => data,
            None => match tokio::time::timeout(idle, recv.recv_data()).await {
                Ok(Ok(Some(mut piece))) => piece.copy_to_bytes(piece.remaining()),
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    debug!(error = %e, "request body stream failed");
                    sink.abort("request body stream failed");
                    return;
                }
                Err(_) => {
                    sink.abort("request body idle timeout");
                    return;
                }
            },
        };
        sent += data.len() as u64;
        if sent > limit {
            too_large.set(true);
            sink.abort("request body too large");
            return;
        }
        if length.is_some_and(|length| sent > length) {
            sink.abort("request body longer than its content-length");
            return;
        }
        if sink.send_data(data).await.is_err() {
            return;
        }
    }
    if length.is_some_and(|length| sent != length) {
        sink.abort("request body shorter than its content-length");
        return;
    }
    let ended = match tokio::time::timeout(idle, recv.recv_trailers()).await {
        Ok(Ok(Some(trailers))) => sink.send_trailers(trailers).await,
        Ok(Ok(None)) => sink.finish().await,
        Ok(Err(e)) => {
            debug!(error = %e, "reading the request trailers failed");
            sink.abort("request trailers failed");
            return;
        }
        Err(_) => {
            sink.abort("request body idle timeout");
            return;
        }
    };
    if ended.is_err() {
        debug!("the backend stopped reading the request body");
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn content_length_values() {
        let mut headers = HeaderMap::new();
        assert_eq!(content_length(&headers), Ok(None));
        for (value, expected) in [
            ("0", Ok(Some(0))),
            ("1234", Ok(Some(1234))),
            ("", Err(BodyError::InvalidLength)),
            ("+5", Err(BodyError::InvalidLength)),
            ("5, 5", Err(BodyError::InvalidLength)),
            ("99999999999999999999999", Err(BodyError::InvalidLength)),
        ] {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static(value));
            assert_eq!(
                content_length(&headers),
                expected,
                "content-length {value:?}"
            );
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert_eq!(content_length(&headers), Err(BodyError::InvalidLength));
    }
}
