//! Forwarding of one HTTP/1.1 request to an HTTP/2 backend (h2c, or https that chose `h2`).
//! The request becomes an HTTP/2 stream on the worker's pooled connection. The response comes
//! back re-framed as HTTP/1.1, with the backend's trailers in the last chunk.
//!
//! ```text
//! request head ─> HEADERS ─> body as DATA (client window) ─> trailers or END_STREAM
//!   <─ response HEADERS ─> status line and fields ─> body (length, chunked or until close)
//! ```

use std::io;

use std::net::SocketAddr;

use bytes::Bytes;
use h2::{client::SendRequest, RecvStream};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use tracing::debug;

use super::{respond_local, ConnBuffers, Exchange, Next, Request};
use crate::{
    forward::{forwarded_fields, push_decimal, push_field},
    http1::{
        body::{pump_body, OutFraming, PumpError, PumpLimits},
        chunked::{encode_chunk_header, encode_last_chunk},
        head::{is_hop_by_hop, BodyFraming, Version},
    },
    http2::body::{parse_trailers, H2Sink},
    io::write_all_vec,
    metrics::UpstreamErrorKind,
    state::{Compiled, CompiledRouter, CompiledServer},
    upstream::Pick,
    worker::{ConnInfo, WorkerCtx},
};

/// Forwards the request to an h2c server of the router's service.
pub(super) async fn proxy_h2c<S>(
    ctx: &WorkerCtx,
    client: &mut S,
    bufs: &mut ConnBuffers,
    info: &ConnInfo,
    compiled: &Compiled,
    router: &CompiledRouter,
    req: &Request<'_>,
) -> Exchange
where
    S: AsyncReadRent + AsyncWriteRent,
{
    let service = &compiled.services[router.service];
    let has_body = req.head.framing() != BodyFraming::Empty;
    if req.head.upgrade {
        // NOTE: an upgrade (WebSocket) would need extended CONNECT over h2c, which is not built.
        let bytes = respond_local(client, 502, None, true, &mut bufs.out).await;
        return Exchange::local(502, bytes, true);
    }

    let (index, addr) = match ctx.upstreams.pick(compiled, router.service, &[]) {
        Pick::Server { index, addr } => (index, addr),
        Pick::NoServers | Pick::NoneAvailable => {
            let bytes = respond_local(client, 503, None, has_body, &mut bufs.out).await;
            return Exchange::local(503, bytes, has_body);
        }
    };
    let server = &service.servers[index];
    let sender = match ctx.h2_pool.sender(ctx, addr, &router.name).await {
        Ok(sender) => sender,
        Err(kind) => {
            let status = match kind {
                UpstreamErrorKind::ConnectTimeout | UpstreamErrorKind::ResponseTimeout => 504,
                _ => 502,
            };
            let bytes = respond_local(client, status, None, true, &mut bufs.out).await;
            return Exchange {
                status,
                bytes,
                upstream: Some(addr),
                next: Next::Close,
            };
        }
    };
    let target = H2Target {
        server,
        addr,
        pass_host_header: service.pass_host_header,
    };
    exchange_h2(ctx, client, bufs, info, router, req, target, sender).await
}

/// The backend chosen for an HTTP/2 exchange.
pub(super) struct H2Target<'a> {
    pub server: &'a CompiledServer,
    pub addr: SocketAddr,
    pub pass_host_header: bool,
}

/// Sends the request as a stream on `sender`'s connection and relays the response.
#[allow(clippy::too_many_arguments)]
pub(super) async fn exchange_h2<S>(
    ctx: &WorkerCtx,
    client: &mut S,
    bufs: &mut ConnBuffers,
    info: &ConnInfo,
    router: &CompiledRouter,
    req: &Request<'_>,
    target: H2Target<'_>,
    mut sender: SendRequest<Bytes>,
) -> Exchange
where
    S: AsyncReadRent + AsyncWriteRent,
{
    let settings = &ctx.shared.settings;
    let body_limit = router
        .max_request_body_bytes
        .or(settings.max_request_body_bytes);
    let framing = req.head.framing();
    let has_body = framing != BodyFraming::Empty;
    let H2Target { server, addr, .. } = target;
    let _in_flight = ctx.upstreams.start_request(addr);
    let failed = |status: u16| Exchange {
        status,
        bytes: 0,
        upstream: Some(addr),
        next: Next::Close,
    };

    let host: &[u8] = if target.pass_host_header && !req.raw_host.is_empty() {
        req.raw_host
    } else {
        server.authority.as_bytes()
    };
    let scheme = if server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let trusted_peer = settings.is_trusted_proxy(info.peer.ip());
    let Some(request) = build_request(req, scheme, host, info, trusted_peer) else {
        let bytes = respond_local(client, 400, None, true, &mut bufs.out).await;
        return Exchange {
            bytes,
            ..failed(400)
        };
    };
    let (response, mut send) = match sender.send_request(request, !has_body) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(upstream = %addr, error = %e, "opening a stream to the HTTP/2 backend failed");
            ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
            let bytes = respond_local(client, 502, None, true, &mut bufs.out).await;
            return Exchange {
                bytes,
                ..failed(502)
            };
        }
    };

    if has_body {
        if req.head.expect_continue && req.head.version() == Version::Http11 {
            let (sent, _) = monoio::io::AsyncWriteRentExt::write_all(
                client,
                &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
            )
            .await;
            if sent.is_err() {
                return failed(502);
            }
        }
        let limits = PumpLimits {
            idle: settings.body_idle_timeout,
            max_bytes: body_limit,
        };
        // NOTE: the body is sent in full before the response is read, as for HTTP/1.1
        // backends.
        let mut sink = H2Sink { stream: &mut send };
        let pumped = pump_body(
            client,
            &mut sink,
            &mut bufs.inbuf,
            framing,
            OutFraming::Frames,
            limits,
            &mut bufs.scratch,
        )
        .await;
        if let Err(e) = pumped {
            debug!(error = %e, "request body transfer failed");
            send.send_reset(h2::Reason::CANCEL);
            let status = match e {
                PumpError::SourceFraming(_) => 400,
                PumpError::Source(ref io) if io.kind() == io::ErrorKind::TimedOut => 408,
                PumpError::TooLarge => 413,
                PumpError::Source(_) | PumpError::SourceEof => return failed(400),
                PumpError::Destination(_) => 502,
            };
            let bytes = respond_local(client, status, None, true, &mut bufs.out).await;
            return Exchange {
                bytes,
                ..failed(status)
            };
        }
        let trailers = parse_trailers(&bufs.scratch);
        let ended = if trailers.is_empty() {
            send.send_data(Bytes::new(), true)
        } else {
            send.send_trailers(trailers)
        };
        if ended.is_err() {
            let bytes = respond_local(client, 502, None, true, &mut bufs.out).await;
            return Exchange {
                bytes,
                ..failed(502)
            };
        }
    }

    let response = match monoio::time::timeout(settings.upstream_response_timeout, response).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            debug!(upstream = %addr, error = %e, "the HTTP/2 backend failed the stream");
            ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
            let bytes = respond_local(client, 502, None, true, &mut bufs.out).await;
            return Exchange {
                bytes,
                ..failed(502)
            };
        }
        Err(_) => {
            ctx.metrics()
                .upstream_error(UpstreamErrorKind::ResponseTimeout);
            let bytes = respond_local(client, 504, None, true, &mut bufs.out).await;
            return Exchange {
                bytes,
                ..failed(504)
            };
        }
    };
    ctx.upstreams.mark_ok(addr);
    relay_response(ctx, client, bufs, req, addr, response).await
}

/// Builds the HTTP/2 request: the client's end-to-end fields (without hop-by-hop fields, those
/// named in `Connection`, `Host`, `Expect` and the framing fields) and the forwarding headers.
fn build_request(
    req: &Request<'_>,
    scheme: &str,
    host: &[u8],
    info: &ConnInfo,
    trusted_peer: bool,
) -> Option<http::Request<()>> {
    let head = req.head;
    let bytes = req.head_bytes;
    let target = &bytes[head.path_and_query.clone()];
    let target = if target.is_empty() { &b"/"[..] } else { target };
    let uri = Uri::builder()
        .scheme(scheme)
        .authority(std::str::from_utf8(host).ok()?)
        .path_and_query(std::str::from_utf8(target).ok()?)
        .build()
        .ok()?;

    let fwd = req.forward_info(host, info, trusted_peer);
    let fields = head
        .headers
        .iter()
        .map(|field| (&bytes[field.name.clone()], &bytes[field.value.clone()]))
        .filter(|(name, _)| {
            !(is_hop_by_hop(name)
                || name.eq_ignore_ascii_case(b"host")
                || name.eq_ignore_ascii_case(b"content-length")
                || name.eq_ignore_ascii_case(b"expect")
                || super::listed_in_connection(bytes, &head.connection_names, name))
        });

    let mut headers = HeaderMap::with_capacity(head.headers.len() + 6);
    forwarded_fields(&fwd, fields, |name, value| {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    });
    if let BodyFraming::Length(n) = head.framing() {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    // `te` is hop-by-hop, but HTTP/2 allows `te: trailers`, and gRPC servers built on
    // grpc-core reject a call without it.
    let client_accepts_trailers = head.headers.iter().any(|field| {
        bytes[field.name.clone()].eq_ignore_ascii_case(b"te")
            && bytes[field.value.clone()]
                .split(|&byte| byte == b',')
                .any(|item| item.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    });
    if client_accepts_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }

    let mut request = http::Request::builder()
        .method(Method::from_bytes(req.method).ok()?)
        .uri(uri)
        .body(())
        .ok()?;
    *request.headers_mut() = headers;
    Some(request)
}

/// Writes the backend's response to the client as HTTP/1.1: the status line and fields, then
/// the body with a length, chunked (with the trailers in the last chunk), or until close for
/// an HTTP/1.0 client.
async fn relay_response<S>(
    ctx: &WorkerCtx,
    client: &mut S,
    bufs: &mut ConnBuffers,
    req: &Request<'_>,
    addr: std::net::SocketAddr,
    response: http::Response<RecvStream>,
) -> Exchange
where
    S: AsyncReadRent + AsyncWriteRent,
{
    let idle = ctx.shared.settings.body_idle_timeout;
    let (parts, mut body) = response.into_parts();
    let status = parts.status.as_u16();
    let no_body = req.method == b"HEAD" || status == 204 || status == 304;
    let length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let client_http11 = req.head.version() == Version::Http11;
    let chunked = !no_body && length.is_none() && client_http11;
    let until_close = !no_body && length.is_none() && !client_http11;
    let keep_client = req.head.keep_alive && !until_close && !ctx.shutdown.is_triggered();

    let out = &mut bufs.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Over TLS the edge's Alt-Svc replaces the backend's, as on the other paths.
    let alt_svc = ctx.shared.settings.alt_svc.as_ref().filter(|_| req.tls);
    for (name, value) in &parts.headers {
        let replaced = alt_svc.is_some() && name == http::header::ALT_SVC;
        if !is_hop_by_hop(name.as_str().as_bytes()) && !replaced {
            push_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if let Some(alt_svc) = alt_svc {
        push_field(out, b"Alt-Svc", alt_svc.as_bytes());
    }
    if chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if !keep_client {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if !client_http11 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let mut sent = out.len() as u64;
    let failed = Exchange {
        status,
        bytes: 0,
        upstream: Some(addr),
        next: Next::Close,
    };
    let (written, out) = write_all_vec(client, std::mem::take(&mut bufs.out)).await;
    bufs.out = out;
    if written.is_err() {
        return failed;
    }

    if !no_body {
        loop {
            let data = match monoio::time::timeout(idle, body.data()).await {
                Ok(Some(Ok(data))) => data,
                Ok(None) => break,
                Ok(Some(Err(_))) | Err(_) => {
                    ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
                    return Exchange {
                        bytes: sent,
                        ..failed
                    };
                }
            };
            let len = data.len();
            if len == 0 {
                continue;
            }
            let out = &mut bufs.out;
            if chunked {
                encode_chunk_header(len, out);
            }
            out.extend_from_slice(&data);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            let write = write_all_vec(client, std::mem::take(&mut bufs.out));
            let (written, out) = match monoio::time::timeout(idle, write).await {
                Ok(pair) => pair,
                Err(_) => {
                    return Exchange {
                        bytes: sent,
                        ..failed
                    }
                }
            };
            bufs.out = out;
            if written.is_err() {
                return Exchange {
                    bytes: sent,
                    ..failed
                };
            }
            sent += len as u64;
            let _ = body.flow_control().release_capacity(len);
        }
    }
    if chunked {
        let mut trailer_lines = Vec::new();
        if let Ok(Ok(Some(trailers))) = monoio::time::timeout(idle, body.trailers()).await {
            for (name, value) in &trailers {
                push_field(
                    &mut trailer_lines,
                    name.as_str().as_bytes(),
                    value.as_bytes(),
                );
            }
        }
        encode_last_chunk(&trailer_lines, &mut bufs.out);
        let (written, out) = write_all_vec(client, std::mem::take(&mut bufs.out)).await;
        bufs.out = out;
        if written.is_err() {
            return Exchange {
                bytes: sent,
                ..failed
            };
        }
    }
    Exchange {
        status,
        bytes: sent,
        upstream: Some(addr),
        next: if keep_client {
            Next::KeepAlive
        } else {
            Next::Close
        },
    }
}
