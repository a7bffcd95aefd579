//! Forwarding of one HTTP/3 request to an HTTP/1.1 backend with hyper, over the QUIC thread's
//! pooled connections, with TLS (ALPN `http/1.1`) for `https://` servers.
//!
//! ```text
//! request head ──> backend at once (a request body is pumped by its own task)
//!   <── response head, body and trailers, relayed as the client reads them
//! connection ──> back to the pool once hyper reports it idle
//! ```

use std::{cell::Cell, io, net::SocketAddr, rc::Rc, time::Duration};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use super::{
    body::{self, BodyStart},
    pool::{PoolKey, Sender},
    send_local, upstream_failed, H3Ctx, Outcome, RecvHalf, SendHalf, UpstreamBody,
    DEFAULT_BODY_LIMIT,
};
use crate::{
    forward::{forwarded_fields, ForwardInfo},
    http1::head::{is_hop_by_hop, is_idempotent, parse_keep_alive_timeout},
    metrics::UpstreamErrorKind,
    state::{Compiled, CompiledRouter},
    upstream::Pick,
    upstream_tls::UpstreamTls,
};

/// Backends tried for one request: the first choice and two others when connecting fails.
const MAX_ATTEMPTS: usize = 3;

/// Forwards one request to a backend of the router's service and streams the response back.
///
/// A connection that fails to open is counted against its server and the next server is
/// tried. The backend may close an idle connection just as a request goes out on it. So a
/// request that fails on a reused connection before its response head is sent once more on
/// a fresh connection to the same server, when it is idempotent and has no body.
pub(super) async fn proxy(
    ctx: &Rc<H3Ctx>,
    compiled: &Compiled,
    router: &CompiledRouter,
    parts: &http::request::Parts,
    mut fwd: ForwardInfo<'_>,
    mut recv: RecvHalf,
    send: &mut SendHalf,
) -> Outcome {
    let service = &compiled.services[router.service];
    let settings = &ctx.shared.settings;
    let limit = router
        .max_request_body_bytes
        .or(settings.max_request_body_bytes)
        .unwrap_or(DEFAULT_BODY_LIMIT);
    let idle = settings.body_idle_timeout;
    let start = match body::start(&mut recv, parts, limit, idle).await {
        Ok(start) => start,
        Err(e) => return send_local(send, e.status()).await,
    };

    // The body task starts now, so the request head does not wait for the first piece.
    let too_large = Rc::new(Cell::new(false));
    // NOTE: a request with a body is never sent twice, because its streamed body is not kept.
    let replayable = matches!(start, BodyStart::Empty) && is_idempotent(fwd.method);
    let mut body: Option<UpstreamBody> = match start {
        BodyStart::Empty => None,
        BodyStart::Streamed { first, length } => {
            let (tx, channel) = http_body_util::channel::Channel::<Bytes, io::Error>::new(
                body::BODY_CHANNEL_PIECES,
            );
            tokio::task::spawn_local(body::pump(
                recv,
                tx,
                first,
                length,
                limit,
                idle,
                too_large.clone(),
            ));
            Some(channel.boxed_unsync())
        }
    };
    let Ok(target) = std::str::from_utf8(fwd.target)
        .unwrap_or("/")
        .parse::<http::Uri>()
    else {
        return send_local(send, 400).await;
    };

    let mut tried: [Option<SocketAddr>; MAX_ATTEMPTS] = [None; MAX_ATTEMPTS];
    let mut stale_retried = false;
    let mut last_error = None;
    let mut attempt = 0;
    while attempt < MAX_ATTEMPTS {
        let (index, addr) = match ctx.upstreams.pick(compiled, router.service, &tried) {
            Pick::Server { index, addr } => (index, addr),
            Pick::NoServers | Pick::NoneAvailable if attempt == 0 => {
                return send_local(send, 503).await
            }
            Pick::NoServers | Pick::NoneAvailable => break,
        };
        tried[attempt] = Some(addr);
        attempt += 1;
        let server = &service.servers[index];
        fwd.host = if service.pass_host_header && !fwd.raw_host.is_empty() {
            fwd.raw_host
        } else {
            server.authority.as_bytes()
        };
        let _in_flight = ctx.upstreams.start_request(addr);
        let key = (addr, server.tls_id());
        let (mut sender, reused) = match connection(ctx, key, server.tls.as_deref()).await {
            Ok(pair) => pair,
            Err((kind, message)) => {
                ctx.metrics().upstream_error(kind);
                ctx.upstreams.mark_failed(addr);
                if ctx.should_log_upstream_error() {
                    if kind == UpstreamErrorKind::Tls {
                        let server_name = server.tls.as_ref().map(|tls| tls.server_name.to_str());
                        warn!(upstream = %addr, service = %router.name, server_name = server_name.as_deref().unwrap_or_default(), error = %message, "TLS handshake with the backend failed");
                    } else {
                        warn!(upstream = %addr, service = %router.name, error = %message, "connecting to the backend failed");
                    }
                }
                last_error = Some((kind, addr));
                continue;
            }
        };

        let request_body = match body.take() {
            Some(body) => body,
            None => Empty::new().map_err(|never| match never {}).boxed_unsync(),
        };
        let mut request = Request::new(request_body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = target.clone();
        *request.headers_mut() = upstream_headers(parts, &fwd);
        let exchange = tokio::time::timeout(
            settings.upstream_response_timeout,
            sender.send_request(request),
        );
        match exchange.await {
            Ok(Ok(response)) => {
                ctx.upstreams.mark_ok(addr);
                return relay_response(ctx, key, sender, response, send).await;
            }
            Ok(Err(e)) if reused && replayable && !stale_retried => {
                debug!(upstream = %addr, error = %e, "reused backend connection failed, retrying on a new one");
                stale_retried = true;
                attempt -= 1;
                tried[attempt] = None;
            }
            Ok(Err(e)) => {
                if too_large.get() {
                    return send_local(send, 413).await;
                }
                let kind = if e.is_parse() {
                    UpstreamErrorKind::Protocol
                } else {
                    UpstreamErrorKind::Reset
                };
                return upstream_failed(ctx, send, addr, kind, &e.to_string()).await;
            }
            Err(_) => {
                ctx.metrics()
                    .upstream_error(UpstreamErrorKind::ResponseTimeout);
                let mut outcome = send_local(send, 504).await;
                outcome.upstream = Some(addr);
                return outcome;
            }
        }
    }
    // Each failed attempt was logged where it failed.
    let Some((kind, addr)) = last_error else {
        return send_local(send, 503).await;
    };
    let status = match kind {
        UpstreamErrorKind::ConnectTimeout => 504,
        _ => 502,
    };
    let mut outcome = send_local(send, status).await;
    outcome.upstream = Some(addr);
    outcome
}

/// Returns an idle pooled connection to `addr` (and `true`), or opens a new one (and
/// `false`).
async fn connection(
    ctx: &H3Ctx,
    key: PoolKey,
    tls: Option<&UpstreamTls>,
) -> Result<(Sender, bool), (UpstreamErrorKind, String)> {
    if let Some(sender) = ctx.h1_pool.take(key) {
        return Ok((sender, true));
    }
    let (addr, _) = key;
    let settings = &ctx.shared.settings;
    let limit = settings.upstream_connect_timeout;
    let tcp = match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err((UpstreamErrorKind::Connect, e.to_string())),
        Err(_) => {
            return Err((
                UpstreamErrorKind::ConnectTimeout,
                format!("no answer within {limit:?}"),
            ))
        }
    };
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok((http1_handshake(ctx, addr, tcp).await?, false));
    };
    // NOTE: only `http/1.1` is offered, so a TLS backend that speaks nothing but HTTP/2
    // fails the handshake here.
    let connector = tokio_rustls::TlsConnector::from(tls.http1_config.clone());
    let stream =
        match tokio::time::timeout(limit, connector.connect(tls.server_name.clone(), tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err((UpstreamErrorKind::Tls, e.to_string())),
            Err(_) => {
                return Err((
                    UpstreamErrorKind::ConnectTimeout,
                    format!("no TLS handshake within {limit:?}"),
                ))
            }
        };
    Ok((http1_handshake(ctx, addr, stream).await?, false))
}

/// Starts HTTP/1.1 on a new backend connection and drives it in its own task.
async fn http1_handshake<T>(
    ctx: &H3Ctx,
    addr: SocketAddr,
    io: T,
) -> Result<Sender, (UpstreamErrorKind, String)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let handshake = hyper::client::conn::http1::Builder::new()
        .max_buf_size(ctx.shared.settings.max_header_bytes.max(8192) + 64 * 1024)
        .handshake(TokioIo::new(io))
        .await;
    let (sender, connection) =
        handshake.map_err(|e| (UpstreamErrorKind::Protocol, e.to_string()))?;
    tokio::task::spawn_local(async move {
        if let Err(e) = connection.await {
            debug!(upstream = %addr, error = %e, "backend connection ended with an error");
        }
    });
    Ok(sender)
}

/// Builds the backend request's header fields: the client's without hop-by-hop ones and
/// `host`, then `Host` and the forwarding headers.
fn upstream_headers(parts: &http::request::Parts, fwd: &ForwardInfo<'_>) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 6);
    if let Ok(value) = HeaderValue::from_bytes(fwd.host) {
        headers.insert(header::HOST, value);
    }
    let fields = parts.headers.iter().filter_map(|(name, value)| {
        let name = name.as_str().as_bytes();
        (!(is_hop_by_hop(name) || name == b"host")).then_some((name, value.as_bytes()))
    });
    forwarded_fields(fwd, fields, |name, value| {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    });
    headers
}

/// Sends the backend's response to the client, then returns the connection to the pool when
/// the whole response was read.
async fn relay_response(
    ctx: &Rc<H3Ctx>,
    key: PoolKey,
    sender: Sender,
    response: Response<Incoming>,
    send: &mut SendHalf,
) -> Outcome {
    let (head, mut body) = response.into_parts();
    let keep_alive = head
        .headers
        .get("keep-alive")
        .and_then(|value| parse_keep_alive_timeout(value.as_bytes()))
        .map(Duration::from_secs);
    let mut client_head = Response::new(());
    *client_head.status_mut() = head.status;
    *client_head.headers_mut() = response_headers(&head.headers);
    let mut outcome = Outcome {
        status: head.status.as_u16(),
        bytes: 0,
        upstream: Some(key.0),
    };
    if let Err(e) = send.send_response(client_head).await {
        debug!(error = %e, "sending the response head failed");
        return outcome;
    }
    loop {
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    outcome.bytes += data.len() as u64;
                    if let Err(e) = send.send_data(data).await {
                        debug!(error = %e, "client stopped reading the response");
                        return outcome;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        if let Err(e) = send.send_trailers(trailers).await {
                            debug!(error = %e, "sending the response trailers failed");
                            return outcome;
                        }
                    }
                }
            },
            Some(Err(e)) => {
                debug!(error = %e, "backend response body failed");
                ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return outcome;
            }
            None => break,
        }
    }
    release_connection(ctx, key, sender, keep_alive).await;
    if let Err(e) = send.finish().await {
        debug!(error = %e, "ending the response stream failed");
    }
    outcome
}

/// Puts the connection back into the pool once hyper reports it idle, which is after the
/// request body has been sent too. hyper closes it instead when either side asked for a
/// close. This runs before the client sees the end of the response, so its next request
/// finds the connection in the pool.
async fn release_connection(
    ctx: &Rc<H3Ctx>,
    key: PoolKey,
    mut sender: Sender,
    keep_alive: Option<Duration>,
) {
    if !sender.is_ready() {
        // The connection task may not have processed the end of the response yet.
        tokio::task::yield_now().await;
    }
    if sender.is_ready() {
        ctx.h1_pool.put(key, sender, keep_alive);
        return;
    }
    let pool_ctx = ctx.clone();
    let limit = ctx.shared.settings.upstream_idle_timeout;
    tokio::task::spawn_local(async move {
        if let Ok(Ok(())) = tokio::time::timeout(limit, sender.ready()).await {
            pool_ctx.h1_pool.put(key, sender, keep_alive);
        }
    });
}

/// Copies the response fields for the client, without hop-by-hop ones, fields listed in
/// `Connection`, and `Transfer-Encoding`.
fn response_headers(headers: &HeaderMap) -> HeaderMap {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if is_hop_by_hop(name.as_str().as_bytes())
            || listed.contains(name)
            || name == header::TRANSFER_ENCODING
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}
