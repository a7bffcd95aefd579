//! Forwarding of one HTTP/2 stream to an HTTP/1.1 backend from the worker's pools: the
//! request head and body go out as HTTP/1.1, and the response comes back as HEADERS, DATA as
//! the client's window allows, and trailers.
//!
//! ```text
//! pick a backend ─> pooled or new connection ─> head + body (chunked or length)
//!   ─> response head ─> HEADERS ─> DATA as the client's window allows ─> trailers
//! ```
//!
//! A client that resets the stream while the backend is still working cancels the backend
//! exchange at once, so a Rapid Reset costs the backend no more than the requests that were
//! really sent to it.
//!
//! A WebSocket CONNECT goes out as an HTTP/1.1 upgrade GET on a connection that offers only
//! `http/1.1`, and the backend's 101 turns the stream into a tunnel (`websocket.rs`).

use std::{
    future::poll_fn,
    io,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{client::SendRequest, server::SendResponse, RecvStream};
use http::{header, HeaderName, HeaderValue, Response};
use monoio::io::AsyncWriteRentExt;
use tracing::debug;

use super::{
    body::{parse_trailers, H2Sink},
    h2c::{exchange_h2, H2Target},
    stream::{send_head, send_local, ForwardedRequest, Outcome},
    websocket::{accepts_handshake, push_handshake_fields, relay_tunnel},
};
use crate::{
    forward::{open_connection, write_framing, write_request_head, Opened},
    http1::{
        body::{pump_body, OutFraming, PumpError, PumpLimits},
        chunked::encode_chunk_header,
        head::{is_hop_by_hop, is_idempotent, parse_response, BodyFraming, ResponseHead},
    },
    io::{with_timeout, ReadBuf},
    metrics::UpstreamErrorKind,
    state::{Compiled, CompiledRouter},
    upstream::Pick,
    upstream_tls::UpstreamStream,
    worker::{ConnInfo, WorkerCtx},
};

/// Backends tried for one request, counting retries on a fresh connection.
const MAX_ATTEMPTS: usize = 3;
/// Free space requested for each read of a backend response head.
const HEAD_READ_BYTES: usize = 8 * 1024;

/// A failure to forward the request, mapped to a local response status.
#[derive(Debug)]
enum ForwardError {
    /// The client reset the stream; nothing more is sent.
    Cancelled,
    /// Respond to the client with this status.
    Status(u16, Option<SocketAddr>),
    /// The chosen `https://` backend speaks HTTP/2: forward the stream on this connection
    /// instead. Nothing has been sent to the backend yet.
    SpeaksH2 {
        server_index: usize,
        addr: SocketAddr,
        sender: SendRequest<Bytes>,
    },
}

/// A backend connection with a parsed response head waiting in `upbuf`.
struct Answered {
    upstream: UpstreamStream,
    addr: SocketAddr,
    /// Pool key part of `upstream`.
    tls_id: u64,
    upbuf: ReadBuf,
    rhead: ResponseHead,
}

/// Forwards the stream to an HTTP/1.1 server of the router's service.
pub(super) async fn proxy_http1(
    ctx: &Rc<WorkerCtx>,
    info: &ConnInfo,
    compiled: &Compiled,
    router: &CompiledRouter,
    req: &ForwardedRequest<'_>,
    mut body: RecvStream,
    mut respond: SendResponse<Bytes>,
) -> Outcome {
    let settings = &ctx.shared.settings;
    let length = match req.parts.headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(value) => match value.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
            Some(n) => Some(n),
            None => return send_local(&mut respond, 400),
        },
    };
    let body_limit = router
        .max_request_body_bytes
        .or(settings.max_request_body_bytes);
    if let (Some(n), Some(max)) = (length, body_limit) {
        if n > max {
            return send_local(&mut respond, 413);
        }
    }

    // The exchange up to the response head races the client's reset, so a reset stream stops
    // the backend work at once.
    let exchange = forward(
        ctx, info, compiled, router, req, &mut body, length, body_limit,
    );
    let result = monoio::select! {
        result = exchange => result,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => Err(ForwardError::Cancelled),
    };
    let answered = match result {
        Ok(answered) => answered,
        Err(ForwardError::Cancelled) => {
            debug!("the client reset the stream before the response");
            return Outcome {
                status: 499,
                bytes: 0,
                upstream: None,
            };
        }
        Err(ForwardError::Status(status, upstream)) => {
            return Outcome {
                upstream,
                ..send_local(&mut respond, status)
            };
        }
        Err(ForwardError::SpeaksH2 {
            server_index,
            addr,
            sender,
        }) => {
            let service = &compiled.services[router.service];
            let target = H2Target {
                server: &service.servers[server_index],
                addr,
                pass_host_header: service.pass_host_header,
            };
            return exchange_h2(ctx, info, req, target, sender, body, respond).await;
        }
    };
    let addr = answered.addr;
    let _in_flight = ctx.upstreams.start_request(addr);
    match &req.websocket_key {
        Some(key) if answered.rhead.status == 101 => {
            let head_bytes = &answered.upbuf.data()[..answered.rhead.head_len];
            if !accepts_handshake(head_bytes, &answered.rhead, key) {
                debug!(upstream = %addr, "the backend's 101 does not complete the WebSocket handshake");
                ctx.metrics().upstream_error(UpstreamErrorKind::Protocol);
                return Outcome {
                    upstream: Some(addr),
                    ..send_local(&mut respond, 502)
                };
            }
            let idle = ctx.shared.settings.body_idle_timeout;
            let Answered {
                upstream,
                upbuf,
                rhead,
                ..
            } = answered;
            let sent = relay_tunnel(upstream, upbuf, &rhead, body, &mut respond, idle).await;
            Outcome {
                status: 200,
                bytes: sent.unwrap_or(0),
                upstream: Some(addr),
            }
        }
        _ => relay_response(ctx, answered, respond).await,
    }
}

/// Picks a backend, sends the request head and body and reads the response head, retrying
/// on another connection when that is safe.
#[allow(clippy::too_many_arguments)]
async fn forward(
    ctx: &Rc<WorkerCtx>,
    info: &ConnInfo,
    compiled: &Compiled,
    router: &CompiledRouter,
    req: &ForwardedRequest<'_>,
    body: &mut RecvStream,
    length: Option<u64>,
    body_limit: Option<u64>,
) -> Result<Answered, ForwardError> {
    let settings = &ctx.shared.settings;
    let service = &compiled.services[router.service];
    // The DATA of a WebSocket CONNECT belongs to the tunnel, not to the upgrade request.
    let has_body = req.websocket_key.is_none() && !body.is_end_stream();
    let replayable = !has_body
        && (req.websocket_key.is_some() || is_idempotent(req.parts.method.as_str().as_bytes()));
    let framing = match (has_body, length) {
        (_, Some(n)) => BodyFraming::Length(n),
        (false, None) => BodyFraming::Empty,
        (true, None) => BodyFraming::Chunked,
    };

    let mut tried: [Option<SocketAddr>; MAX_ATTEMPTS] = [None; MAX_ATTEMPTS];
    let mut last_error = UpstreamErrorKind::Connect;
    let mut last_addr = None;
    let mut out = Vec::new();
    for attempt in 0..MAX_ATTEMPTS {
        let (server_index, addr) = match ctx.upstreams.pick(compiled, router.service, &tried) {
            Pick::Server { index, addr } => (index, addr),
            Pick::NoServers | Pick::NoneAvailable if attempt == 0 => {
                return Err(ForwardError::Status(503, None));
            }
            Pick::NoServers | Pick::NoneAvailable => break,
        };
        tried[attempt] = Some(addr);
        last_addr = Some(addr);
        let server = &service.servers[server_index];
        let host: &[u8] = if service.pass_host_header && !req.raw_host.is_empty() {
            req.raw_host
        } else {
            server.authority.as_bytes()
        };
        build_upstream_head(
            &mut out,
            req,
            host,
            info,
            framing,
            settings.is_trusted_proxy(info.peer.ip()),
        );

        let http1_only = req.websocket_key.is_some();
        let opened = open_connection(ctx, addr, server, &router.name, http1_only).await;
        let (mut upstream, reused) = match opened {
            Ok(Opened::Http1 { stream, reused }) => (stream, reused),
            Ok(Opened::H2(sender)) => {
                return Err(ForwardError::SpeaksH2 {
                    server_index,
                    addr,
                    sender,
                })
            }
            Err(kind) => {
                last_error = kind;
                continue;
            }
        };
        let _in_flight = ctx.upstreams.start_request(addr);
        let (written, returned) = upstream.write_all(std::mem::take(&mut out)).await;
        out = returned;
        if written.is_err() {
            if replayable {
                if reused {
                    tried[attempt] = None;
                }
                last_error = UpstreamErrorKind::Reset;
                continue;
            }
            ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
            return Err(ForwardError::Status(502, Some(addr)));
        }
        // NOTE: the request body is sent in full before the response is read, as for
        // HTTP/1.1, so bidirectional streaming (gRPC) to an HTTP/1.1 backend is not possible.
        if has_body {
            send_request_body(ctx, body, &mut upstream, framing, body_limit, &mut out)
                .await
                .map_err(|status| ForwardError::Status(status, Some(addr)))?;
        }
        match read_response_head(ctx, &mut upstream, req).await {
            Ok((upbuf, rhead)) => {
                ctx.upstreams.mark_ok(addr);
                return Ok(Answered {
                    upstream,
                    addr,
                    tls_id: server.tls_id(),
                    upbuf,
                    rhead,
                });
            }
            Err(HeadError::Retryable) if replayable => {
                if reused {
                    tried[attempt] = None;
                } else {
                    ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
                    ctx.upstreams.mark_failed(addr);
                }
                debug!(upstream = %addr, reused, "retrying the request");
                last_error = UpstreamErrorKind::Reset;
            }
            Err(HeadError::Retryable) => {
                ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
                return Err(ForwardError::Status(502, Some(addr)));
            }
            Err(HeadError::Fatal(status, kind)) => {
                ctx.metrics().upstream_error(kind);
                return Err(ForwardError::Status(status, Some(addr)));
            }
        }
    }
    let status = match last_error {
        UpstreamErrorKind::ConnectTimeout | UpstreamErrorKind::ResponseTimeout => 504,
        _ => 502,
    };
    Err(ForwardError::Status(status, last_addr))
}

/// Writes the HTTP/1.1 request head for the backend. HTTP/2 has no hop-by-hop fields except
/// `te: trailers`, which is dropped like any `TE`. Split `cookie` fields are joined with
/// "; ", as RFC 9113 section 8.2.3 requires for HTTP/1.1. A WebSocket CONNECT becomes an
/// upgrade GET with the edge's own `Sec-WebSocket-Key`, and the client's
/// `Sec-WebSocket-Version`, `-Protocol` and `-Extensions` pass through.
fn build_upstream_head(
    out: &mut Vec<u8>,
    req: &ForwardedRequest<'_>,
    host: &[u8],
    info: &ConnInfo,
    framing: BodyFraming,
    trusted_peer: bool,
) {
    let fwd = req.forward_info(host, info, trusted_peer);
    let mut cookie: Vec<u8> = Vec::new();
    for value in req.parts.headers.get_all(header::COOKIE) {
        if !cookie.is_empty() {
            cookie.extend_from_slice(b"; ");
        }
        cookie.extend_from_slice(value.as_bytes());
    }
    let fields = req
        .parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
        .filter(|(name, _)| {
            !(is_hop_by_hop(name)
                || *name == b"host"
                || *name == b"content-length"
                || *name == b"expect"
                || *name == b"cookie"
                || *name == b"sec-websocket-key")
        })
        .chain((!cookie.is_empty()).then_some((&b"cookie"[..], &cookie[..])));
    write_request_head(out, &fwd, fields);
    if let Some(key) = &req.websocket_key {
        push_handshake_fields(out, key);
    }
    write_framing(out, framing);
    out.extend_from_slice(b"\r\n");
}

/// Streams the request body from the client to the backend, releasing flow-control
/// capacity as each piece is written, so the client sends only as fast as the backend reads.
/// Request trailers are passed on in the last chunk when the body is chunked.
///
/// # Errors
/// The status to respond with: 400 for a body that does not match its length, 408 when the
/// client stalls, 413 over the limit, 502 when the backend stops reading.
async fn send_request_body(
    ctx: &WorkerCtx,
    body: &mut RecvStream,
    upstream: &mut UpstreamStream,
    framing: BodyFraming,
    body_limit: Option<u64>,
    out: &mut Vec<u8>,
) -> Result<(), u16> {
    let idle = ctx.shared.settings.body_idle_timeout;
    let chunked = framing == BodyFraming::Chunked;
    let mut total: u64 = 0;
    loop {
        let data = match monoio::time::timeout(idle, body.data()).await {
            Ok(Some(Ok(data))) => data,
            Ok(Some(Err(e))) => {
                debug!(error = %e, "request body stream failed");
                return Err(400);
            }
            Ok(None) => break,
            Err(_) => return Err(408),
        };
        let len = data.len();
        total += len as u64;
        if body_limit.is_some_and(|max| total > max) {
            return Err(413);
        }
        out.clear();
        if chunked {
            if len == 0 {
                continue;
            }
            encode_chunk_header(len, out);
        }
        out.extend_from_slice(&data);
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        write_upstream(upstream, out, idle).await?;
        let _ = body.flow_control().release_capacity(len);
    }
    if chunked {
        out.clear();
        out.extend_from_slice(b"0\r\n");
        if let Ok(Ok(Some(trailers))) = monoio::time::timeout(idle, body.trailers()).await {
            for (name, value) in &trailers {
                crate::forward::push_field(out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
        write_upstream(upstream, out, idle).await?;
    }
    Ok(())
}

async fn write_upstream(
    upstream: &mut UpstreamStream,
    out: &mut Vec<u8>,
    idle: Duration,
) -> Result<(), u16> {
    let buf = std::mem::take(out);
    match monoio::time::timeout(idle, upstream.write_all(buf)).await {
        Ok((Ok(_), buf)) => {
            *out = buf;
            Ok(())
        }
        Ok((Err(_), buf)) => {
            *out = buf;
            Err(502)
        }
        Err(_) => Err(504),
    }
}

enum HeadError {
    /// Closed or reset before any response byte.
    Retryable,
    Fatal(u16, UpstreamErrorKind),
}

/// Reads the backend's response head, skipping interim 1xx responses.
async fn read_response_head(
    ctx: &WorkerCtx,
    upstream: &mut UpstreamStream,
    req: &ForwardedRequest<'_>,
) -> Result<(ReadBuf, ResponseHead), HeadError> {
    let settings = &ctx.shared.settings;
    let deadline = Instant::now() + settings.upstream_response_timeout;
    let head_request = req.parts.method == http::Method::HEAD;
    let mut upbuf = ReadBuf::with_capacity(HEAD_READ_BYTES);
    let mut rhead = ResponseHead::default();
    let mut received_any = false;
    loop {
        match parse_response(
            upbuf.data(),
            settings.max_header_bytes,
            head_request,
            &mut rhead,
        ) {
            Ok(Some(())) if rhead.status == 101 && req.websocket_key.is_some() => {
                return Ok((upbuf, rhead));
            }
            Ok(Some(())) if (100..200).contains(&rhead.status) => {
                // Only a WebSocket CONNECT requests an upgrade.
                if rhead.status == 101 {
                    return Err(HeadError::Fatal(502, UpstreamErrorKind::Protocol));
                }
                upbuf.consume(rhead.head_len);
            }
            Ok(Some(())) => return Ok((upbuf, rhead)),
            Ok(None) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match with_timeout(remaining, upbuf.read_from(upstream, HEAD_READ_BYTES)).await {
                    Ok(n) if n > 0 => received_any = true,
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        return Err(HeadError::Fatal(504, UpstreamErrorKind::ResponseTimeout));
                    }
                    _ if !received_any => return Err(HeadError::Retryable),
                    _ => return Err(HeadError::Fatal(502, UpstreamErrorKind::Reset)),
                }
            }
            Err(e) => {
                debug!(error = %e, "invalid response head from the backend");
                return Err(HeadError::Fatal(502, UpstreamErrorKind::Protocol));
            }
        }
    }
}

/// Sends the response head as HEADERS, then the body as DATA frames as the client's window
/// allows, then the backend's chunked trailers as a trailing HEADERS frame.
async fn relay_response(
    ctx: &WorkerCtx,
    answered: Answered,
    mut respond: SendResponse<Bytes>,
) -> Outcome {
    let Answered {
        mut upstream,
        addr,
        tls_id,
        mut upbuf,
        rhead,
    } = answered;
    let settings = &ctx.shared.settings;
    let status = rhead.status;
    let framing = rhead.framing();
    let head_bytes = &upbuf.data()[..rhead.head_len];

    let mut response = Response::builder().status(status);
    if let Some(headers) = response.headers_mut() {
        for field in &rhead.headers {
            let name = &head_bytes[field.name.clone()];
            let value = &head_bytes[field.value.clone()];
            let keep_length = name.eq_ignore_ascii_case(b"content-length")
                && !matches!(framing, BodyFraming::Chunked | BodyFraming::UntilClose);
            let listed = rhead
                .connection_names
                .iter()
                .any(|r| head_bytes[r.clone()].eq_ignore_ascii_case(name));
            if !keep_length
                && (is_hop_by_hop(name) || listed || name.eq_ignore_ascii_case(b"content-length"))
            {
                continue;
            }
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                headers.append(name, value);
            }
        }
    }
    let mut response = response.body(()).unwrap_or_default();
    if let Some(alt_svc) = &ctx.shared.settings.alt_svc {
        response
            .headers_mut()
            .insert(header::ALT_SVC, alt_svc.clone());
    }
    let head_len = rhead.head_len;
    upbuf.consume(head_len);
    let no_body = framing == BodyFraming::Empty;
    let Some(mut send) = send_head(&mut respond, response, no_body) else {
        return Outcome {
            status,
            bytes: 0,
            upstream: Some(addr),
        };
    };
    if no_body {
        if rhead.keep_alive && upbuf.is_empty() {
            let keep_alive = rhead.keep_alive_timeout_secs.map(Duration::from_secs);
            ctx.upstreams.put_idle(addr, tls_id, upstream, keep_alive);
        }
        return Outcome {
            status,
            bytes: 0,
            upstream: Some(addr),
        };
    }

    let limits = PumpLimits {
        idle: settings.body_idle_timeout,
        max_bytes: None,
    };
    // NOTE: while the body streams, a client reset is noticed at the next DATA write, so a
    // stalled backend keeps its connection until the body idle timeout.
    let mut trailers = Vec::new();
    let mut sink = H2Sink { stream: &mut send };
    let pumped = pump_body(
        &mut upstream,
        &mut sink,
        &mut upbuf,
        framing,
        OutFraming::Frames,
        limits,
        &mut trailers,
    )
    .await;
    let bytes = match pumped {
        Ok(n) => n,
        Err(e) => {
            debug!(error = %e, "response body transfer failed");
            if !matches!(e, PumpError::Destination(_)) {
                ctx.metrics().upstream_error(match e {
                    PumpError::SourceFraming(_) => UpstreamErrorKind::Protocol,
                    _ => UpstreamErrorKind::Reset,
                });
            }
            // The head is out, so only a stream reset can signal that the body is incomplete.
            send.send_reset(h2::Reason::INTERNAL_ERROR);
            return Outcome {
                status,
                bytes: 0,
                upstream: Some(addr),
            };
        }
    };
    let trailer_map = parse_trailers(&trailers);
    let ended = if trailer_map.is_empty() {
        send.send_data(Bytes::new(), true)
    } else {
        send.send_trailers(trailer_map)
    };
    if ended.is_ok() && rhead.keep_alive && upbuf.is_empty() {
        let keep_alive = rhead.keep_alive_timeout_secs.map(Duration::from_secs);
        ctx.upstreams.put_idle(addr, tls_id, upstream, keep_alive);
    }
    Outcome {
        status,
        bytes,
        upstream: Some(addr),
    }
}
