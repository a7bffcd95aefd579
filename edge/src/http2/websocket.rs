//! WebSocket over HTTP/2 (RFC 8441): the HTTP/1.1 handshake fields the edge sends to a backend
//! for an extended CONNECT with `:protocol websocket`, and the tunnel between the h2 stream and
//! the backend connection after the backend's 101.
//!
//! ```text
//! CONNECT :protocol websocket ─> GET + Upgrade: websocket + fresh Sec-WebSocket-Key
//!   ─> 101 with the matching Sec-WebSocket-Accept ─> :status 200 ─> bytes both ways
//!   └─ any other response ─> relayed as a normal response, no tunnel
//! ```
//!
//! RFC 8441 section 5 makes the proxy responsible for the HTTP/1.1 handshake fields, because
//! the client's HTTP/2 request carries no `Sec-WebSocket-Key`, so the edge checks the
//! backend's `Sec-WebSocket-Accept` itself.

use std::{
    cell::Cell,
    future::poll_fn,
    rc::Rc,
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use bytes::Bytes;
use h2::{server::SendResponse, RecvStream, SendStream};
use http::{HeaderName, HeaderValue, Response};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use sha1::{Digest, Sha1};
use tracing::debug;

use super::send_with_capacity;
use crate::{
    http1::head::{trim_ows, ResponseHead},
    io::ReadBuf,
    upstream_tls::UpstreamStream,
};

/// GUID that RFC 6455 section 1.3 appends to the key before hashing it into the accept value.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Bytes read from the backend at once.
const READ_BYTES: usize = 16 * 1024;
/// Response fields of a 101 that the client receives in the 200.
const PASSED_RESPONSE_FIELDS: [&str; 2] = ["sec-websocket-protocol", "sec-websocket-extensions"];

/// Returns whether a request is an extended CONNECT for WebSocket.
pub(super) fn is_websocket_connect(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::CONNECT
        && parts
            .extensions
            .get::<h2::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Returns a fresh `Sec-WebSocket-Key`: 16 random bytes in base64, as RFC 6455 section 4.1
/// requires.
pub(super) fn new_key() -> String {
    let mut nonce = [0u8; 16];
    crate::http3::fill_random(&mut nonce);
    STANDARD.encode(nonce)
}

/// Returns the `Sec-WebSocket-Accept` value a backend must send for `key`.
fn accept_value(key: &str) -> String {
    let mut hasher = Sha1::new();
    hasher.update(key.as_bytes());
    hasher.update(ACCEPT_GUID);
    STANDARD.encode(hasher.finalize())
}

/// Appends the HTTP/1.1 upgrade fields of the handshake to a request head.
pub(super) fn push_handshake_fields(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: websocket\r\n");
    crate::forward::push_field(out, b"Sec-WebSocket-Key", key.as_bytes());
}

/// Returns whether a backend's 101 completes the handshake started with `key`: it upgrades
/// to `websocket` and carries the matching `Sec-WebSocket-Accept`.
pub(super) fn accepts_handshake(head_bytes: &[u8], rhead: &ResponseHead, key: &str) -> bool {
    let field = |wanted: &str| {
        rhead
            .headers
            .iter()
            .find(|f| head_bytes[f.name.clone()].eq_ignore_ascii_case(wanted.as_bytes()))
            .map(|f| trim_ows(&head_bytes[f.value.clone()]))
    };
    let upgrades = field("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"));
    let accepted = field("sec-websocket-accept") == Some(accept_value(key).as_bytes());
    upgrades && accepted
}

/// Builds the `:status 200` response to the extended CONNECT, with the subprotocol and
/// extensions the backend chose.
fn tunnel_head(head_bytes: &[u8], rhead: &ResponseHead) -> Response<()> {
    let mut response = Response::builder().status(200);
    if let Some(headers) = response.headers_mut() {
        for field in &rhead.headers {
            let name = &head_bytes[field.name.clone()];
            if !PASSED_RESPONSE_FIELDS
                .iter()
                .any(|passed| name.eq_ignore_ascii_case(passed.as_bytes()))
            {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_bytes(&head_bytes[field.value.clone()]),
            ) {
                headers.append(name, value);
            }
        }
    }
    response.body(()).unwrap_or_default()
}

/// Sends 200 on the stream and relays bytes both ways between it and the backend until
/// both sides have ended or neither has sent anything for `idle`. `upbuf` contains the 101
/// head (`rhead.head_len` bytes) and any bytes the backend sent after it. Returns the
/// number of bytes sent to the client, or `None` when the client had gone before the 200.
pub(super) async fn relay_tunnel(
    upstream: UpstreamStream,
    mut upbuf: ReadBuf,
    rhead: &ResponseHead,
    body: RecvStream,
    respond: &mut SendResponse<Bytes>,
    idle: Duration,
) -> Option<u64> {
    let head = tunnel_head(&upbuf.data()[..rhead.head_len], rhead);
    upbuf.consume(rhead.head_len);
    let send = super::stream::send_head(respond, head, false)?;

    let (upstream_read, upstream_write) = upstream.into_split();
    let last_activity = Rc::new(Cell::new(Instant::now()));
    let to_backend = client_to_backend(body, upstream_write, idle, last_activity.clone());
    let to_client = backend_to_client(upstream_read, upbuf, send, idle, last_activity);
    let ((), sent) = monoio::join!(to_backend, to_client);
    Some(sent)
}

/// Copies DATA from the client to the backend, releasing flow-control capacity only after
/// the backend took the bytes. The client's END_STREAM half-closes the backend connection.
async fn client_to_backend<W: AsyncWriteRent>(
    mut body: RecvStream,
    mut upstream: W,
    idle: Duration,
    last_activity: Rc<Cell<Instant>>,
) {
    loop {
        match monoio::time::timeout(idle, body.data()).await {
            Ok(Some(Ok(data))) => {
                last_activity.set(Instant::now());
                let len = data.len();
                let written = monoio::time::timeout(idle, upstream.write_all(data)).await;
                if !matches!(written, Ok((Ok(_), _))) {
                    debug!("writing to the WebSocket backend failed or timed out");
                    break;
                }
                let _ = body.flow_control().release_capacity(len);
            }
            Ok(Some(Err(e))) => {
                debug!(error = %e, "the client's WebSocket stream failed");
                break;
            }
            Ok(None) => break,
            Err(_) => {
                if last_activity.get().elapsed() >= idle {
                    debug!("the WebSocket tunnel was idle for the body idle timeout");
                    break;
                }
            }
        }
    }
    let _ = upstream.shutdown().await;
}

/// Copies bytes from the backend to the client as DATA frames while the client's window
/// allows. The backend's close ends the stream with END_STREAM. Returns the bytes sent.
async fn backend_to_client<R: AsyncReadRent>(
    mut upstream: R,
    mut buf: ReadBuf,
    mut send: SendStream<Bytes>,
    idle: Duration,
    last_activity: Rc<Cell<Instant>>,
) -> u64 {
    let mut sent: u64 = 0;
    loop {
        if !buf.is_empty() {
            let data = Bytes::copy_from_slice(buf.data());
            let len = data.len() as u64;
            buf.consume(data.len());
            match send_with_capacity(&mut send, data, idle, monoio::time::sleep).await {
                Ok(()) => sent += len,
                Err(()) => {
                    send.send_reset(h2::Reason::CANCEL);
                    return sent;
                }
            }
        }
        let read = monoio::select! {
            read = monoio::time::timeout(idle, buf.read_from(&mut upstream, READ_BYTES)) => read,
            _ = poll_fn(|cx| send.poll_reset(cx)) => {
                debug!("the client reset the WebSocket stream");
                return sent;
            }
        };
        match read {
            Ok(Ok(0)) => {
                let _ = send.send_data(Bytes::new(), true);
                return sent;
            }
            Ok(Ok(_)) => last_activity.set(Instant::now()),
            Ok(Err(e)) => {
                debug!(error = %e, "reading from the WebSocket backend failed");
                send.send_reset(h2::Reason::CANCEL);
                return sent;
            }
            Err(_) => {
                if last_activity.get().elapsed() >= idle {
                    debug!("the WebSocket tunnel was idle for the body idle timeout");
                    send.send_reset(h2::Reason::CANCEL);
                    return sent;
                }
                // The other direction is active, and the cancelled read lost an empty buffer.
                buf = ReadBuf::with_capacity(READ_BYTES);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_value_matches_rfc_example() {
        // The example handshake of RFC 6455 section 1.3.
        assert_eq!(
            accept_value("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn new_keys_are_16_bytes_and_differ() {
        let first = new_key();
        let second = new_key();
        assert_eq!(STANDARD.decode(&first).unwrap().len(), 16);
        assert_ne!(first, second);
    }
}
