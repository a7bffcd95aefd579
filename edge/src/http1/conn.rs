//! One HTTP/1.1 client connection: read requests, route them, forward them to a backend and
//! stream the responses back, with keep-alive, until either side closes.
//!
//! ```text
//! wait for the first byte (keep-alive timeout) ─> read the head (header timeout) ─> route
//!   ├─ no route / redirect / bad request ─> local response
//!   └─ proxy: pick a backend ─> pooled or new connection ─> head (+ body) ─> response head
//!        ├─ 101 to an Upgrade request ─> byte tunnel until both sides close
//!        └─ response body re-framed to the client ─> connection back to the pool
//! ```
//!
//! Any framing problem closes the client connection after the error response, so the proxy
//! and the backend can never disagree about where the next request starts.

use std::{
    cell::Cell,
    io,
    net::{IpAddr, SocketAddr},
    rc::Rc,
    time::{Duration, Instant},
};

use edge_proto::rule::RequestView;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split, Splitable};
use tracing::{debug, Instrument};

use super::{
    body::{pump_body, OutFraming, PumpError, PumpLimits},
    head::{
        is_hop_by_hop, is_idempotent, parse_request, parse_response, BodyFraming, HeadError,
        HeaderField, RequestHead, ResponseHead, Version,
    },
};
use crate::{
    access_log::Record,
    forward::{
        https_location, local_response_text, normalize_host, open_connection, push_decimal,
        push_field, routing_path, write_framing, write_request_head, ForwardInfo, Opened,
    },
    io::{with_timeout, ReadBuf, WaitReadable},
    metrics::{Protocol, UpstreamErrorKind},
    settings::canonical_ip,
    state::{Compiled, CompiledRouter, EntryPoint},
    upstream::Pick,
    upstream_tls::UpstreamStream,
    worker::{ConnInfo, RequestId, WorkerCtx},
};

mod to_h2c;

/// Initial read buffer per connection and the free space requested for each head read.
const HEAD_READ_BYTES: usize = 8 * 1024;
/// Backends tried for one request, counting retries on a fresh connection.
const MAX_ATTEMPTS: usize = 3;

/// Next step of the connection after an exchange.
enum Next {
    KeepAlive,
    Close,
    /// The backend switched protocols: relay bytes both ways.
    Tunnel(UpstreamStream),
}

/// The outcome of one request, for the access log and metrics.
struct Exchange {
    status: u16,
    bytes: u64,
    upstream: Option<SocketAddr>,
    next: Next,
}

impl Exchange {
    fn local(status: u16, bytes: u64, close: bool) -> Self {
        Self {
            status,
            bytes,
            upstream: None,
            next: if close { Next::Close } else { Next::KeepAlive },
        }
    }
}

/// Buffers of one connection. They are reused while requests follow each other and
/// released whenever the connection waits for the client's next request.
struct ConnBuffers {
    inbuf: ReadBuf,
    head: RequestHead,
    head_bytes: Vec<u8>,
    host: String,
    path: String,
    out: Vec<u8>,
    upbuf: ReadBuf,
    rhead: ResponseHead,
    scratch: Vec<u8>,
}

impl ConnBuffers {
    /// Returns the IO buffers to the worker's pool and frees the others, except for unread
    /// bytes (a pipelined request). Small buffers (the parsed head's field list, host and
    /// path) are kept.
    fn release(&mut self) {
        self.inbuf.release();
        self.upbuf.release();
        self.head_bytes = Vec::new();
        self.out = Vec::new();
        self.scratch = Vec::new();
    }
}

/// Serves HTTP/1.1 on `client` until it closes, times out, or the worker shuts down.
pub async fn serve<S>(ctx: Rc<WorkerCtx>, mut client: S, info: ConnInfo)
where
    S: AsyncReadRent + AsyncWriteRent + WaitReadable + Split + 'static,
{
    let settings = &ctx.shared.settings;
    let mut bufs = ConnBuffers {
        inbuf: ReadBuf::lazy(HEAD_READ_BYTES),
        head: RequestHead::default(),
        head_bytes: Vec::new(),
        host: String::new(),
        path: String::new(),
        out: Vec::new(),
        upbuf: ReadBuf::lazy(HEAD_READ_BYTES),
        rhead: ResponseHead::default(),
        scratch: Vec::new(),
    };
    let mut first = true;
    loop {
        if bufs.inbuf.is_empty() {
            let wait = if first {
                settings.header_read_timeout
            } else {
                settings.keep_alive_timeout
            };
            // Wait with no buffer held, then read with one from the worker's pool.
            bufs.release();
            let ready = monoio::select! {
                _ = ctx.shutdown.wait() => return,
                ready = with_timeout(wait, client.wait_readable()) => ready,
            };
            if ready.is_err() {
                return;
            }
            let read = monoio::select! {
                _ = ctx.shutdown.wait() => return,
                read = with_timeout(wait, bufs.inbuf.read_from(&mut client, HEAD_READ_BYTES)) => read,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        first = false;

        match read_head(&ctx, &mut client, &mut bufs).await {
            Ok(()) => {}
            Err(HeadOutcome::Closed) => return,
            Err(HeadOutcome::Rejected(status)) => {
                let bytes = respond_local(&mut client, status, None, true, &mut bufs.out).await;
                ctx.shared
                    .unrouted_stats
                    .record(ctx.id, Protocol::Http1, status);
                log_rejected(&ctx, &info, status, bytes);
                return;
            }
        }

        // Boxed, so that the connection's own future stays small while it waits: the request
        // handling future is several KiB.
        let exchange = Box::pin(handle_request(&ctx, &mut client, &mut bufs, &info));
        let exchange = exchange.await;
        match exchange {
            Next::KeepAlive if !ctx.shutdown.is_triggered() => {}
            Next::KeepAlive | Next::Close => return,
            Next::Tunnel(upstream) => {
                let idle = settings.body_idle_timeout;
                let relayed = Box::pin(tunnel(client, upstream, bufs.inbuf, bufs.upbuf, idle));
                relayed.await;
                return;
            }
        }
    }
}

enum HeadOutcome {
    Closed,
    Rejected(u16),
}

/// Reads until a complete, valid request head is in `bufs.inbuf`, then moves it into
/// `bufs.head_bytes`.
async fn read_head<S: AsyncReadRent>(
    ctx: &WorkerCtx,
    client: &mut S,
    bufs: &mut ConnBuffers,
) -> Result<(), HeadOutcome> {
    let settings = &ctx.shared.settings;
    let deadline = Instant::now() + settings.header_read_timeout;
    loop {
        match parse_request(bufs.inbuf.data(), settings.max_header_bytes, &mut bufs.head) {
            Ok(Some(())) => break,
            Ok(None) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match with_timeout(remaining, bufs.inbuf.read_from(client, HEAD_READ_BYTES)).await {
                    Ok(0) => return Err(HeadOutcome::Closed),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        debug!("request head not received in time");
                        return Err(HeadOutcome::Rejected(408));
                    }
                    Err(_) => return Err(HeadOutcome::Closed),
                }
            }
            Err(e) => {
                debug!(error = %e, "invalid request head");
                return Err(HeadOutcome::Rejected(match e {
                    HeadError::TooLarge => 431,
                    HeadError::MethodNotAllowed(_) => 405,
                    HeadError::Invalid(_) | HeadError::Framing(_) => 400,
                }));
            }
        }
    }
    let head_len = bufs.head.head_len;
    bufs.head_bytes.clear();
    bufs.head_bytes
        .extend_from_slice(&bufs.inbuf.data()[..head_len]);
    bufs.inbuf.consume(head_len);
    Ok(())
}

/// The request as the rule matchers see it.
struct View<'a> {
    host: &'a str,
    path: &'a str,
    query: &'a str,
    method: &'a str,
    head_bytes: &'a [u8],
    headers: &'a [HeaderField],
    client_ip: IpAddr,
}

impl RequestView for View<'_> {
    fn host(&self) -> &str {
        self.host
    }
    fn path(&self) -> &str {
        self.path
    }
    fn method(&self) -> &str {
        self.method
    }
    fn query(&self) -> &str {
        self.query
    }
    fn client_ip(&self) -> IpAddr {
        self.client_ip
    }
    fn header_values<'a>(&'a self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.headers.iter().any(|h| {
            self.head_bytes[h.name.clone()].eq_ignore_ascii_case(name.as_bytes())
                && f(&self.head_bytes[h.value.clone()])
        })
    }
}

async fn handle_request<S>(
    ctx: &Rc<WorkerCtx>,
    client: &mut S,
    bufs: &mut ConnBuffers,
    info: &ConnInfo,
) -> Next
where
    S: AsyncReadRent + AsyncWriteRent,
{
    let started = Instant::now();
    let request_id = ctx.next_request_id();
    let settings = &ctx.shared.settings;
    let head_bytes = std::mem::take(&mut bufs.head_bytes);
    let head = std::mem::take(&mut bufs.head);

    let raw_host = head.host.clone().map_or(&b""[..], |r| &head_bytes[r]);
    let host_ok = normalize_host(raw_host, &mut bufs.host);
    let target = &head_bytes[head.path_and_query.clone()];
    let (raw_path, raw_query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (&target[..q], &target[q + 1..]),
        None => (target, &b""[..]),
    };
    let raw_path: &[u8] = if raw_path.is_empty() { b"/" } else { raw_path };
    let path_ok = routing_path(raw_path, &mut bufs.path);
    let method = std::str::from_utf8(&head_bytes[head.method.clone()]).unwrap_or("");
    let client_ip = canonical_ip(info.peer.ip());

    let compiled = ctx.snapshot();
    let mut route_name: &str = "";
    let exchange = if !host_ok || !path_ok {
        let close = head.framing() != BodyFraming::Empty;
        let bytes = respond_local(client, 400, None, close, &mut bufs.out).await;
        Exchange::local(400, bytes, true)
    } else {
        let view = View {
            host: &bufs.host,
            path: &bufs.path,
            query: std::str::from_utf8(raw_query).unwrap_or(""),
            method,
            head_bytes: &head_bytes,
            headers: &head.headers,
            client_ip,
        };
        // A local response leaves any request body unread, so close rather than drain it.
        let close_after_local = head.framing() != BodyFraming::Empty || !head.keep_alive;
        let acme_key_authorization = match (info.entrypoint, method) {
            (EntryPoint::Web, "GET" | "HEAD") => acme_http_challenge(&compiled, raw_path),
            _ => None,
        };
        let router = match acme_key_authorization {
            Some(_) => None,
            None => compiled.route(info.entrypoint, &view),
        };
        let redirect = info.entrypoint == EntryPoint::Web && !router.is_some_and(|r| r.plain_http);
        if let Some(key_authorization) = acme_key_authorization {
            debug!(req_id = request_id.as_str(), host = %bufs.host, "responding to an ACME HTTP-01 challenge");
            let bytes = respond_acme_http(
                client,
                key_authorization.as_bytes(),
                method == "HEAD",
                close_after_local,
                &mut bufs.out,
            )
            .await;
            Exchange::local(200, bytes, close_after_local)
        } else if redirect {
            let location = https_location(&bufs.host, raw_host, target, settings.https_port);
            let bytes = respond_local(
                client,
                308,
                Some(&location),
                close_after_local,
                &mut bufs.out,
            )
            .await;
            Exchange::local(308, bytes, close_after_local)
        } else if let Some(router) = router {
            route_name = &router.name;
            let request = Request {
                head: &head,
                head_bytes: &head_bytes,
                raw_host,
                method: method.as_bytes(),
                request_id,
                client_ip,
                tls: info.is_tls(),
            };
            let span = tracing::debug_span!(
                "request",
                req_id = request_id.as_str(),
                method,
                host = %bufs.host,
                route = %router.name,
            );
            let exchange = proxy(ctx, client, bufs, info, &compiled, router, &request)
                .instrument(span)
                .await;
            router
                .stats
                .record(ctx.id, Protocol::Http1, exchange.status);
            exchange
        } else {
            let bytes = respond_local(client, 404, None, close_after_local, &mut bufs.out).await;
            Exchange::local(404, bytes, close_after_local)
        }
    };
    if route_name.is_empty() {
        ctx.shared
            .unrouted_stats
            .record(ctx.id, Protocol::Http1, exchange.status);
    }

    ctx.access_log.borrow_mut().record(&Record {
        request_id: request_id.as_str(),
        conn_id: info.conn_id,
        client: client_ip,
        tls: info.is_tls(),
        protocol: Protocol::Http1,
        host: &bufs.host,
        method: method.as_bytes(),
        path: target,
        status: exchange.status,
        bytes: exchange.bytes,
        duration: started.elapsed(),
        route: route_name,
        upstream: exchange.upstream,
    });

    bufs.head_bytes = head_bytes;
    bufs.head = head;
    let keep_alive = bufs.head.keep_alive;
    match exchange.next {
        Next::KeepAlive if keep_alive => Next::KeepAlive,
        Next::KeepAlive => Next::Close,
        other => other,
    }
}

/// The parts of a parsed request that forwarding needs.
struct Request<'a> {
    head: &'a RequestHead,
    head_bytes: &'a [u8],
    raw_host: &'a [u8],
    method: &'a [u8],
    request_id: RequestId,
    client_ip: IpAddr,
    /// The request came over TLS, so HTTP/3 may be advertised.
    tls: bool,
}

impl Request<'_> {
    /// Returns the facts about this request that the backend receives besides its fields.
    fn forward_info<'a>(
        &'a self,
        host: &'a [u8],
        info: &ConnInfo,
        trusted_peer: bool,
    ) -> ForwardInfo<'a> {
        ForwardInfo {
            method: self.method,
            target: &self.head_bytes[self.head.path_and_query.clone()],
            host,
            raw_host: self.raw_host,
            client_ip: self.client_ip,
            request_id: self.request_id,
            tls: info.is_tls(),
            local_port: info.local_port,
            trusted_peer,
        }
    }
}

/// Failure of one attempt to exchange with a backend.
enum AttemptError {
    /// Nothing was consumed from the client; another backend or connection may be tried.
    Retryable(UpstreamErrorKind),
    /// The exchange cannot be repeated; answer with this status (or close if the response
    /// head was already sent) and close the client connection.
    Fatal {
        status: u16,
        kind: Option<UpstreamErrorKind>,
    },
}

async fn proxy<S>(
    ctx: &Rc<WorkerCtx>,
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
    let settings = &ctx.shared.settings;
    let service = &compiled.services[router.service];
    let framing = req.head.framing();
    let body_limit = router
        .max_request_body_bytes
        .or(settings.max_request_body_bytes);
    if let (BodyFraming::Length(n), Some(max)) = (framing, body_limit) {
        if n > max {
            let bytes = respond_local(client, 413, None, true, &mut bufs.out).await;
            return Exchange::local(413, bytes, true);
        }
    }
    // NOTE: the scheme of a service's first server decides the protocol for all of them.
    if service.servers.first().is_some_and(|s| s.h2c) {
        let forwarded = to_h2c::proxy_h2c(ctx, client, bufs, info, compiled, router, req);
        return forwarded.await;
    }

    // A body that arrived with the head is sent with it and can be sent again on retry.
    let inline_body = match framing {
        BodyFraming::Length(n) if n <= bufs.inbuf.len() as u64 => Some(n as usize),
        _ => None,
    };
    let replayable =
        is_idempotent(req.method) && (framing == BodyFraming::Empty || inline_body.is_some());

    let mut tried: [Option<SocketAddr>; MAX_ATTEMPTS] = [None; MAX_ATTEMPTS];
    let mut last_error = UpstreamErrorKind::Connect;
    let mut last_addr = None;
    for attempt in 0..MAX_ATTEMPTS {
        let (server_index, addr) = match ctx.upstreams.pick(compiled, router.service, &tried) {
            Pick::Server { index, addr } => (index, addr),
            Pick::NoServers | Pick::NoneAvailable if attempt == 0 => {
                let close = framing != BodyFraming::Empty;
                let bytes = respond_local(client, 503, None, close, &mut bufs.out).await;
                return Exchange::local(503, bytes, close);
            }
            Pick::NoServers | Pick::NoneAvailable => break,
        };
        tried[attempt] = Some(addr);
        let server = &service.servers[server_index];
        let host_value: &[u8] = if service.pass_host_header && !req.raw_host.is_empty() {
            req.raw_host
        } else {
            server.authority.as_bytes()
        };
        build_upstream_head(
            &mut bufs.out,
            req,
            host_value,
            info,
            settings.is_trusted_proxy(info.peer.ip()),
        );
        if let Some(n) = inline_body {
            bufs.out.extend_from_slice(&bufs.inbuf.data()[..n]);
        }

        let opened = open_connection(ctx, addr, server, &router.name, req.head.upgrade).await;
        let (mut upstream, reused) = match opened {
            Ok(Opened::Http1 { stream, reused }) => (stream, reused),
            Ok(Opened::H2(sender)) => {
                let target = to_h2c::H2Target {
                    server,
                    addr,
                    pass_host_header: service.pass_host_header,
                };
                let forwarded =
                    to_h2c::exchange_h2(ctx, client, bufs, info, router, req, target, sender);
                return forwarded.await;
            }
            Err(kind) => {
                last_error = kind;
                last_addr = Some(addr);
                continue;
            }
        };
        let _in_flight = ctx.upstreams.start_request(addr);
        match exchange_with(
            ctx,
            client,
            bufs,
            req,
            &mut upstream,
            inline_body,
            body_limit,
        )
        .await
        {
            Ok(done) => {
                ctx.upstreams.mark_ok(addr);
                if let Some(n) = inline_body {
                    bufs.inbuf.consume(n);
                }
                let next = match done.upstream_reusable {
                    UpstreamAfter::Pool(keep_alive) => {
                        ctx.upstreams
                            .put_idle(addr, server.tls_id(), upstream, keep_alive);
                        done.client_next
                    }
                    UpstreamAfter::Close => done.client_next,
                    UpstreamAfter::Tunnel => Next::Tunnel(upstream),
                };
                return Exchange {
                    status: done.status,
                    bytes: done.bytes,
                    upstream: Some(addr),
                    next,
                };
            }
            Err(AttemptError::Retryable(kind)) if replayable => {
                if reused {
                    // A pooled connection closed by the backend: try a fresh one to the same
                    // server without counting it as a failure of the server.
                    tried[attempt] = None;
                } else {
                    ctx.metrics().upstream_error(kind);
                    ctx.upstreams.mark_failed(addr);
                }
                debug!(upstream = %addr, reused, error = ?kind, "retrying the request");
                last_error = kind;
            }
            Err(AttemptError::Retryable(kind)) => {
                ctx.metrics().upstream_error(kind);
                let bytes = respond_local(client, 502, None, true, &mut bufs.out).await;
                return Exchange {
                    status: 502,
                    bytes,
                    upstream: Some(addr),
                    next: Next::Close,
                };
            }
            Err(AttemptError::Fatal { status, kind }) => {
                if let Some(kind) = kind {
                    ctx.metrics().upstream_error(kind);
                }
                let bytes = if status > 0 {
                    respond_local(client, status, None, true, &mut bufs.out).await
                } else {
                    0
                };
                return Exchange {
                    status: if status > 0 { status } else { 502 },
                    bytes,
                    upstream: Some(addr),
                    next: Next::Close,
                };
            }
        }
    }
    let status = match last_error {
        UpstreamErrorKind::ConnectTimeout | UpstreamErrorKind::ResponseTimeout => 504,
        _ => 502,
    };
    let close = framing != BodyFraming::Empty;
    let bytes = respond_local(client, status, None, close, &mut bufs.out).await;
    Exchange {
        upstream: last_addr,
        ..Exchange::local(status, bytes, close)
    }
}

/// Fate of the backend connection after a successful exchange.
enum UpstreamAfter {
    /// Reusable; the backend's `Keep-Alive: timeout`, if any.
    Pool(Option<Duration>),
    Close,
    Tunnel,
}

struct Done {
    status: u16,
    bytes: u64,
    client_next: Next,
    upstream_reusable: UpstreamAfter,
}

/// Sends the prepared head in `bufs.out` (and the request body) to `upstream`, then relays
/// the response to `client`.
async fn exchange_with<S>(
    ctx: &WorkerCtx,
    client: &mut S,
    bufs: &mut ConnBuffers,
    req: &Request<'_>,
    upstream: &mut UpstreamStream,
    inline_body: Option<usize>,
    body_limit: Option<u64>,
) -> Result<Done, AttemptError>
where
    S: AsyncReadRent + AsyncWriteRent,
{
    let settings = &ctx.shared.settings;
    let idle = settings.body_idle_timeout;

    let out = std::mem::take(&mut bufs.out);
    let (written, out) = upstream.write_all(out).await;
    bufs.out = out;
    if written.is_err() {
        return Err(AttemptError::Retryable(UpstreamErrorKind::Reset));
    }

    let framing = req.head.framing();
    if framing != BodyFraming::Empty && inline_body.is_none() {
        if req.head.expect_continue && req.head.version() == Version::Http11 {
            let (sent, _) = client
                .write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
                .await;
            if sent.is_err() {
                return Err(AttemptError::Fatal {
                    status: 0,
                    kind: None,
                });
            }
        }
        let out = if framing == BodyFraming::Chunked {
            OutFraming::Chunked
        } else {
            OutFraming::Length
        };
        let limits = PumpLimits {
            idle,
            max_bytes: body_limit,
        };
        // NOTE: the body is sent in full before the response is read, so a backend that
        // answers early (for example 413) and stops reading makes the upload fail with 502.
        if let Err(e) = pump_body(
            client,
            upstream,
            &mut bufs.inbuf,
            framing,
            out,
            limits,
            &mut bufs.scratch,
        )
        .await
        {
            debug!(error = %e, "request body transfer failed");
            return Err(match e {
                PumpError::SourceFraming(_) => AttemptError::Fatal {
                    status: 400,
                    kind: None,
                },
                PumpError::Source(ref io) if io.kind() == io::ErrorKind::TimedOut => {
                    AttemptError::Fatal {
                        status: 408,
                        kind: None,
                    }
                }
                PumpError::Source(_) | PumpError::SourceEof => AttemptError::Fatal {
                    status: 0,
                    kind: None,
                },
                PumpError::TooLarge => AttemptError::Fatal {
                    status: 413,
                    kind: None,
                },
                PumpError::Destination(_) => AttemptError::Fatal {
                    status: 502,
                    kind: Some(UpstreamErrorKind::Reset),
                },
            });
        }
    }

    // Read the response head, skipping interim 1xx responses other than 101.
    bufs.upbuf.consume(bufs.upbuf.len());
    let deadline = Instant::now() + settings.upstream_response_timeout;
    let head_request = req.method == b"HEAD";
    let mut received_any = false;
    loop {
        match parse_response(
            bufs.upbuf.data(),
            settings.max_header_bytes,
            head_request,
            &mut bufs.rhead,
        ) {
            Ok(Some(())) => {
                let status = bufs.rhead.status;
                if (100..200).contains(&status) && status != 101 {
                    bufs.upbuf.consume(bufs.rhead.head_len);
                    continue;
                }
                break;
            }
            Ok(None) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let read =
                    with_timeout(remaining, bufs.upbuf.read_from(upstream, HEAD_READ_BYTES)).await;
                match read {
                    Ok(n) if n > 0 => received_any = true,
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        return Err(AttemptError::Fatal {
                            status: 504,
                            kind: Some(UpstreamErrorKind::ResponseTimeout),
                        });
                    }
                    // Closed or reset before any response byte: the request may be sent again
                    // if it is replayable (the caller decides).
                    _ if !received_any => {
                        return Err(AttemptError::Retryable(UpstreamErrorKind::Reset));
                    }
                    _ => {
                        return Err(AttemptError::Fatal {
                            status: 502,
                            kind: Some(UpstreamErrorKind::Reset),
                        });
                    }
                }
            }
            Err(e) => {
                debug!(error = %e, "invalid response head from the backend");
                return Err(AttemptError::Fatal {
                    status: 502,
                    kind: Some(UpstreamErrorKind::Protocol),
                });
            }
        }
    }

    let rhead = std::mem::take(&mut bufs.rhead);
    let result = relay_response(ctx, client, bufs, req, upstream, &rhead).await;
    bufs.rhead = rhead;
    result
}

/// Writes the response head and body from `upstream` to `client`.
async fn relay_response<S>(
    ctx: &WorkerCtx,
    client: &mut S,
    bufs: &mut ConnBuffers,
    req: &Request<'_>,
    upstream: &mut UpstreamStream,
    rhead: &ResponseHead,
) -> Result<Done, AttemptError>
where
    S: AsyncReadRent + AsyncWriteRent,
{
    let settings = &ctx.shared.settings;
    let status = rhead.status;
    let switching = status == 101;
    if switching && !(req.head.upgrade && rhead.has_upgrade) {
        return Err(AttemptError::Fatal {
            status: 502,
            kind: Some(UpstreamErrorKind::Protocol),
        });
    }
    let client_http11 = req.head.version() == Version::Http11;
    let framing = rhead.framing();
    let (out_framing, must_close) = match framing {
        BodyFraming::Empty => (None, false),
        BodyFraming::Length(_) => (Some(OutFraming::Length), false),
        BodyFraming::Chunked | BodyFraming::UntilClose if client_http11 => {
            (Some(OutFraming::Chunked), false)
        }
        BodyFraming::Chunked | BodyFraming::UntilClose => (Some(OutFraming::Raw), true),
    };
    let keep_client =
        !switching && !must_close && req.head.keep_alive && !ctx.shutdown.is_triggered();

    let head_bytes = &bufs.upbuf.data()[..rhead.head_len];
    let out = &mut bufs.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(&head_bytes[rhead.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    for field in &rhead.headers {
        let name = &head_bytes[field.name.clone()];
        let keep_length =
            framing == BodyFraming::Empty && name.eq_ignore_ascii_case(b"content-length");
        if !keep_length
            && (is_hop_by_hop(name)
                || name.eq_ignore_ascii_case(b"content-length")
                || listed_in_connection(head_bytes, &rhead.connection_names, name))
        {
            continue;
        }
        push_field(out, name, &head_bytes[field.value.clone()]);
    }
    match (framing, out_framing) {
        (BodyFraming::Length(n), _) => {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        (_, Some(OutFraming::Chunked)) => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        _ => {}
    }
    if switching {
        out.extend_from_slice(b"Connection: Upgrade\r\n");
        for field in &rhead.headers {
            if head_bytes[field.name.clone()].eq_ignore_ascii_case(b"upgrade") {
                push_field(out, b"Upgrade", &head_bytes[field.value.clone()]);
            }
        }
    } else if !keep_client {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if !client_http11 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    if let Some(alt_svc) = settings.alt_svc.as_ref().filter(|_| req.tls && !switching) {
        push_field(out, b"Alt-Svc", alt_svc.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let head_len = out.len() as u64;
    bufs.upbuf.consume(rhead.head_len);

    // A body that already arrived whole goes out in the same write as the head: one write
    // per small response instead of two.
    let mut body_bytes = 0;
    let mut out_framing = out_framing;
    if let BodyFraming::Length(n) = framing {
        if n <= bufs.upbuf.len() as u64 && !switching {
            let n = n as usize;
            bufs.out.extend_from_slice(&bufs.upbuf.data()[..n]);
            bufs.upbuf.consume(n);
            body_bytes = n as u64;
            out_framing = None;
        }
    }

    let out = std::mem::take(&mut bufs.out);
    let (written, out) = with_timeout_pair(settings.body_idle_timeout, client.write_all(out)).await;
    bufs.out = out;
    if written.is_err() {
        return Err(AttemptError::Fatal {
            status: 0,
            kind: None,
        });
    }
    if switching {
        return Ok(Done {
            status,
            bytes: head_len,
            client_next: Next::Close,
            upstream_reusable: UpstreamAfter::Tunnel,
        });
    }

    if let Some(out_framing) = out_framing {
        let limits = PumpLimits {
            idle: settings.body_idle_timeout,
            max_bytes: None,
        };
        match pump_body(
            upstream,
            client,
            &mut bufs.upbuf,
            framing,
            out_framing,
            limits,
            &mut bufs.scratch,
        )
        .await
        {
            Ok(n) => body_bytes = n,
            Err(e) => {
                debug!(error = %e, "response body transfer failed");
                let kind = match e {
                    PumpError::Destination(_) => None,
                    PumpError::SourceFraming(_) => Some(UpstreamErrorKind::Protocol),
                    _ => Some(UpstreamErrorKind::Reset),
                };
                // The head is out: the only signal left is closing the connection.
                return Err(AttemptError::Fatal { status: 0, kind });
            }
        }
    }
    let reusable = rhead.keep_alive && !req.head.upgrade && bufs.upbuf.is_empty();
    Ok(Done {
        status,
        bytes: head_len + body_bytes,
        client_next: if keep_client {
            Next::KeepAlive
        } else {
            Next::Close
        },
        upstream_reusable: if reusable {
            UpstreamAfter::Pool(rhead.keep_alive_timeout_secs.map(Duration::from_secs))
        } else {
            UpstreamAfter::Close
        },
    })
}

async fn with_timeout_pair<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = (io::Result<usize>, T)>,
) -> (io::Result<usize>, T)
where
    T: Default,
{
    match monoio::time::timeout(limit, fut).await {
        Ok(pair) => pair,
        Err(_) => (
            Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
            T::default(),
        ),
    }
}

/// Writes the request head for the backend into `out`: hop-by-hop headers and those named in
/// `Connection` removed first, then the proxy's own forwarding headers added, so a client can
/// never remove them.
fn build_upstream_head(
    out: &mut Vec<u8>,
    req: &Request<'_>,
    host: &[u8],
    info: &ConnInfo,
    trusted_peer: bool,
) {
    let head = req.head;
    let bytes = req.head_bytes;
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
                || listed_in_connection(bytes, &head.connection_names, name))
        });
    write_request_head(out, &fwd, fields);
    write_framing(out, head.framing());
    if head.upgrade {
        out.extend_from_slice(b"Connection: Upgrade\r\n");
        for field in &head.headers {
            if bytes[field.name.clone()].eq_ignore_ascii_case(b"upgrade") {
                push_field(out, b"Upgrade", &bytes[field.value.clone()]);
            }
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn listed_in_connection(bytes: &[u8], names: &[std::ops::Range<usize>], name: &[u8]) -> bool {
    names
        .iter()
        .any(|r| bytes[r.clone()].eq_ignore_ascii_case(name))
}

/// Returns the key authorization when `raw_path` is `/.well-known/acme-challenge/TOKEN` for a
/// pending HTTP-01 challenge. The edge responds to it before routing and redirects, whatever
/// its host, because the CA validates over plain HTTP.
fn acme_http_challenge(compiled: &Compiled, raw_path: &[u8]) -> Option<std::sync::Arc<str>> {
    if compiled.acme_http.is_empty() {
        return None;
    }
    let token = raw_path.strip_prefix(edge_proto::ACME_HTTP_CHALLENGE_PREFIX.as_bytes())?;
    let token = std::str::from_utf8(token).ok()?;
    compiled.acme_http.get(token).cloned()
}

/// Sends the key authorization of an HTTP-01 challenge, without the body for HEAD. Returns
/// the bytes written (0 if writing failed).
async fn respond_acme_http<S: AsyncWriteRent>(
    client: &mut S,
    key_authorization: &[u8],
    head_only: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> u64 {
    out.clear();
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: ",
    );
    push_decimal(out, key_authorization.len() as u64);
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(key_authorization);
    }
    let len = out.len() as u64;
    let buf = std::mem::take(out);
    let (written, buf) = client.write_all(buf).await;
    *out = buf;
    if written.is_ok() {
        len
    } else {
        0
    }
}

/// Sends a response generated by the edge. Returns the bytes written (0 if writing failed).
async fn respond_local<S: AsyncWriteRent>(
    client: &mut S,
    status: u16,
    location: Option<&str>,
    close: bool,
    out: &mut Vec<u8>,
) -> u64 {
    let (reason, body) = local_response_text(status);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ");
    push_decimal(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if let Some(location) = location {
        push_field(out, b"Location", location.as_bytes());
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    let len = out.len() as u64;
    let buf = std::mem::take(out);
    let (written, buf) = client.write_all(buf).await;
    *out = buf;
    if written.is_ok() {
        len
    } else {
        0
    }
}

fn log_rejected(ctx: &WorkerCtx, info: &ConnInfo, status: u16, bytes: u64) {
    let request_id = ctx.next_request_id();
    ctx.access_log.borrow_mut().record(&Record {
        request_id: request_id.as_str(),
        conn_id: info.conn_id,
        client: canonical_ip(info.peer.ip()),
        tls: info.is_tls(),
        protocol: Protocol::Http1,
        host: "",
        method: b"",
        path: b"",
        status,
        bytes,
        duration: Duration::ZERO,
        route: "",
        upstream: None,
    });
}

/// Relays bytes in both directions after a 101 response until both sides have closed or
/// neither side has sent anything for `idle`.
async fn tunnel<S>(
    client: S,
    upstream: UpstreamStream,
    client_early: ReadBuf,
    upstream_early: ReadBuf,
    idle: Duration,
) where
    S: AsyncReadRent + AsyncWriteRent + Split + 'static,
{
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let last_activity = Rc::new(Cell::new(Instant::now()));
    let to_upstream = copy_half(
        &mut client_read,
        &mut upstream_write,
        client_early,
        idle,
        last_activity.clone(),
    );
    let to_client = copy_half(
        &mut upstream_read,
        &mut client_write,
        upstream_early,
        idle,
        last_activity,
    );
    monoio::join!(to_upstream, to_client);
}

async fn copy_half<R, W>(
    src: &mut R,
    dst: &mut W,
    mut early: ReadBuf,
    idle: Duration,
    last_activity: Rc<Cell<Instant>>,
) where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    if !early.is_empty() {
        let len = early.len();
        if early.write_range_to(dst, len).await.is_err() {
            return;
        }
        early.consume(len);
    }
    let mut buf = early;
    loop {
        match monoio::time::timeout(idle, buf.read_from(src, 16 * 1024)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {
                last_activity.set(Instant::now());
                let len = buf.len();
                if buf.write_range_to(dst, len).await.is_err() {
                    break;
                }
                buf.consume(len);
            }
            Err(_) => {
                if last_activity.get().elapsed() >= idle {
                    break;
                }
                // The other direction is active; the cancelled read lost an empty buffer.
                buf = ReadBuf::with_capacity(16 * 1024);
            }
        }
    }
    let _ = dst.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_frees_idle_buffers() {
        let mut bufs = ConnBuffers {
            inbuf: ReadBuf::with_capacity(HEAD_READ_BYTES),
            head: RequestHead::default(),
            head_bytes: Vec::with_capacity(512),
            host: String::new(),
            path: String::new(),
            out: Vec::with_capacity(512),
            upbuf: ReadBuf::with_capacity(HEAD_READ_BYTES),
            rhead: ResponseHead::default(),
            scratch: Vec::with_capacity(512),
        };
        bufs.release();
        assert_eq!(bufs.inbuf.capacity(), 0);
        assert_eq!(bufs.upbuf.capacity(), 0);
        assert_eq!(bufs.head_bytes.capacity(), 0);
        assert_eq!(bufs.out.capacity(), 0);
        assert_eq!(bufs.scratch.capacity(), 0);
    }
}
