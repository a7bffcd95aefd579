//! Forwarding of one HTTP/3 request to an h2c backend (gRPC): one multiplexed connection per
//! backend address per QUIC thread, both bodies streamed at once, trailers passed through as
//! HTTP/3 trailers, and `grpc-timeout` enforced as on the HTTP/2 path.
//!
//! ```text
//! HTTP/3 request stream ──HEADERS──> h2 stream on the pooled connection
//!   request DATA + trailers ──> pumped by a task as the backend's window allows
//!   <── response HEADERS (a trailers-only gRPC error is one HEADERS frame, then FIN)
//!   <── response DATA, then trailers
//! ```

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{client::SendRequest, Reason, RecvStream, SendStream};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use tracing::debug;

use super::{
    body::{self, BodySink, BodyStart},
    send_local, H3Ctx, Outcome, RecvHalf, SendHalf, DEFAULT_BODY_LIMIT,
};
use crate::{
    forward::{forwarded_fields, ForwardInfo},
    http1::head::is_hop_by_hop,
    http2::{grpc_timeout, is_grpc, send_with_capacity, GRPC_DEADLINE_EXCEEDED},
    metrics::UpstreamErrorKind,
    state::{Compiled, CompiledRouter},
    upstream::Pick,
};

/// Streams the edge opens at once on one backend connection when the backend sets no lower
/// limit.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// One QUIC thread's h2c connections, by backend address.
#[derive(Default)]
pub(super) struct H2cPool {
    senders: RefCell<HashMap<SocketAddr, SendRequest<Bytes>>>,
}

impl H2cPool {
    /// Returns a handle that can open a stream to `addr` now: the pooled connection when it
    /// is still usable, else a new one.
    ///
    /// # Errors
    /// The kind of failure when no connection could be made or the new one failed at once.
    async fn sender(
        &self,
        ctx: &H3Ctx,
        addr: SocketAddr,
    ) -> Result<SendRequest<Bytes>, UpstreamErrorKind> {
        let settings = &ctx.shared.settings;
        let pooled = self.senders.borrow().get(&addr).cloned();
        if let Some(sender) = pooled {
            // Waits while the backend's stream limit is reached, at most the response timeout.
            match tokio::time::timeout(settings.upstream_response_timeout, sender.ready()).await {
                Ok(Ok(sender)) => return Ok(sender),
                Ok(Err(e)) => {
                    debug!(upstream = %addr, error = %e, "pooled h2c connection is closed");
                    self.senders.borrow_mut().remove(&addr);
                }
                Err(_) => return Err(UpstreamErrorKind::ResponseTimeout),
            }
        }

        let limit = settings.upstream_connect_timeout;
        let tcp = match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                ctx.upstreams.mark_failed(addr);
                if ctx.should_log_upstream_error() {
                    tracing::warn!(upstream = %addr, error = %e, "connecting to the h2c backend failed");
                }
                return Err(UpstreamErrorKind::Connect);
            }
            Err(_) => {
                ctx.upstreams.mark_failed(addr);
                return Err(UpstreamErrorKind::ConnectTimeout);
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut builder = h2::client::Builder::new();
        builder
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
        let (sender, connection) =
            match tokio::time::timeout(limit, builder.handshake::<_, Bytes>(tcp)).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => {
                    debug!(upstream = %addr, error = %e, "h2c handshake failed");
                    return Err(UpstreamErrorKind::Protocol);
                }
                Err(_) => return Err(UpstreamErrorKind::ConnectTimeout),
            };
        tokio::task::spawn_local(async move {
            if let Err(e) = connection.await {
                debug!(upstream = %addr, error = %e, "h2c connection ended with an error");
            }
        });
        let sender = match sender.ready().await {
            Ok(sender) => sender,
            Err(e) => {
                debug!(upstream = %addr, error = %e, "new h2c connection failed");
                return Err(UpstreamErrorKind::Reset);
            }
        };
        self.senders.borrow_mut().insert(addr, sender.clone());
        Ok(sender)
    }

    /// Drops every pooled connection (at shutdown); their tasks end when the backends close.
    pub(super) fn clear(&self) {
        self.senders.borrow_mut().clear();
    }
}

/// Forwards the request to an h2c server of the router's service.
pub(super) async fn proxy(
    ctx: &Rc<H3Ctx>,
    compiled: &Compiled,
    router: &CompiledRouter,
    parts: &http::request::Parts,
    mut fwd: ForwardInfo<'_>,
    mut recv: RecvHalf,
    send: &mut SendHalf,
) -> Outcome {
    let settings = &ctx.shared.settings;
    let service = &compiled.services[router.service];
    let grpc = is_grpc(&parts.headers);
    let deadline = grpc_timeout(&parts.headers).map(|limit| Instant::now() + limit);
    let limit = router
        .max_request_body_bytes
        .or(settings.max_request_body_bytes)
        .unwrap_or(DEFAULT_BODY_LIMIT);
    let idle = settings.body_idle_timeout;

    let (index, addr) = match ctx.upstreams.pick(compiled, router.service, &[]) {
        Pick::Server { index, addr } => (index, addr),
        Pick::NoServers | Pick::NoneAvailable => return send_local(send, 503).await,
    };
    let server = &service.servers[index];
    let _in_flight = ctx.upstreams.start_request(addr);
    fwd.host = if service.pass_host_header && !fwd.raw_host.is_empty() {
        fwd.raw_host
    } else {
        server.authority.as_bytes()
    };
    let Some(request) = build_request(parts, &fwd) else {
        return send_local(send, 400).await;
    };
    let start = match body::start(&mut recv, parts, limit, idle).await {
        Ok(start) => start,
        Err(e) => return send_local(send, e.status()).await,
    };
    let mut sender = match ctx.h2c.sender(ctx, addr).await {
        Ok(sender) => sender,
        Err(kind) => {
            ctx.metrics().upstream_error(kind);
            let status = match kind {
                UpstreamErrorKind::ConnectTimeout | UpstreamErrorKind::ResponseTimeout => 504,
                _ => 502,
            };
            return Outcome {
                upstream: Some(addr),
                ..send_local(send, status).await
            };
        }
    };
    let end_of_stream = matches!(start, BodyStart::Empty);
    let (response, upstream_send) = match sender.send_request(request, end_of_stream) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(upstream = %addr, error = %e, "opening a stream to the h2c backend failed");
            ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
            return Outcome {
                upstream: Some(addr),
                ..send_local(send, 502).await
            };
        }
    };
    let too_large = Rc::new(Cell::new(false));
    if let BodyStart::Streamed { first, length } = start {
        let sink = H2Sink {
            stream: upstream_send,
            idle,
        };
        tokio::task::spawn_local(body::pump(
            recv,
            sink,
            first,
            length,
            limit,
            idle,
            too_large.clone(),
        ));
    }

    // The response head races the response timeout and the gRPC deadline.
    let head_limit = deadline.map_or(settings.upstream_response_timeout, |at| {
        at.saturating_duration_since(Instant::now())
    });
    let response = match tokio::time::timeout(head_limit, response).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) if too_large.get() => return send_local(send, 413).await,
        Ok(Err(e)) => {
            debug!(upstream = %addr, error = %e, "the h2c backend failed the stream");
            ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
            return Outcome {
                upstream: Some(addr),
                ..send_local(send, 502).await
            };
        }
        Err(_) if grpc && deadline.is_some() => {
            return Outcome {
                upstream: Some(addr),
                ..send_deadline_exceeded(send).await
            };
        }
        Err(_) => {
            ctx.metrics()
                .upstream_error(UpstreamErrorKind::ResponseTimeout);
            return Outcome {
                upstream: Some(addr),
                ..send_local(send, 504).await
            };
        }
    };
    ctx.upstreams.mark_ok(addr);
    relay_response(ctx, addr, response, send, deadline, grpc).await
}

/// Builds the backend request: the client's fields without hop-by-hop ones (`te: trailers`
/// is kept, as gRPC requires it), plus the forwarding headers.
fn build_request(parts: &http::request::Parts, fwd: &ForwardInfo<'_>) -> Option<Request<()>> {
    let uri = Uri::builder()
        .scheme("http")
        .authority(std::str::from_utf8(fwd.host).ok()?)
        .path_and_query(std::str::from_utf8(fwd.target).ok()?)
        .build()
        .ok()?;
    let fields = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
        .filter(|(name, value)| {
            let trailers_te = *name == b"te" && value.eq_ignore_ascii_case(b"trailers");
            trailers_te || !(is_hop_by_hop(name) || *name == b"host")
        });
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 6);
    forwarded_fields(fwd, fields, |name, value| {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    });
    let mut request = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .body(())
        .ok()?;
    *request.headers_mut() = headers;
    Some(request)
}

/// The request half of a backend h2 stream, fed by the body pump.
struct H2Sink {
    stream: SendStream<Bytes>,
    idle: Duration,
}

impl BodySink for H2Sink {
    async fn send_data(&mut self, data: Bytes) -> Result<(), ()> {
        send_with_capacity(&mut self.stream, data, self.idle, tokio::time::sleep).await
    }

    async fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), ()> {
        self.stream.send_trailers(trailers).map_err(drop)
    }

    async fn finish(&mut self) -> Result<(), ()> {
        self.stream.send_data(Bytes::new(), true).map_err(drop)
    }

    fn abort(mut self, reason: &str) {
        debug!(reason, "resetting the request stream to the h2c backend");
        self.stream.send_reset(Reason::CANCEL);
    }
}

/// Sends the backend's response head, body and trailers to the client. A trailers-only
/// response (HEADERS with END_STREAM, as gRPC sends for an immediate error) becomes one
/// HEADERS frame and the end of the stream.
async fn relay_response(
    ctx: &H3Ctx,
    addr: SocketAddr,
    response: Response<RecvStream>,
    send: &mut SendHalf,
    deadline: Option<Instant>,
    grpc: bool,
) -> Outcome {
    let (parts, mut body) = response.into_parts();
    let status = parts.status.as_u16();
    let mut head = Response::new(());
    *head.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str().as_bytes()) {
            head.headers_mut().append(name.clone(), value.clone());
        }
    }
    let mut outcome = Outcome {
        status,
        bytes: 0,
        upstream: Some(addr),
    };
    if let Err(e) = send.send_response(head).await {
        debug!(error = %e, "sending the response head failed");
        return outcome;
    }
    if body.is_end_stream() {
        if let Err(e) = send.finish().await {
            debug!(error = %e, "ending the response stream failed");
        }
        return outcome;
    }

    let idle = ctx.shared.settings.body_idle_timeout;
    let relay = relay_body(&mut body, send, idle, &mut outcome.bytes);
    let result = match deadline {
        Some(at) => {
            let limit = at.saturating_duration_since(Instant::now());
            tokio::time::timeout(limit, relay)
                .await
                .unwrap_or(Err(RelayEnd::Deadline))
        }
        None => relay.await,
    };
    match result {
        Ok(()) => {}
        Err(RelayEnd::Deadline) if grpc => {
            // Dropping the backend stream resets it; the client learns why from the trailers.
            let mut trailers = HeaderMap::new();
            trailers.insert(
                "grpc-status",
                HeaderValue::from_static(GRPC_DEADLINE_EXCEEDED),
            );
            trailers.insert(
                "grpc-message",
                HeaderValue::from_static("deadline exceeded"),
            );
            if send.send_trailers(trailers).await.is_ok() {
                let _ = send.finish().await;
            }
        }
        Err(end) => {
            debug!(?end, "response body relay stopped");
            if end == RelayEnd::Backend {
                ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
            }
            send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
        }
    }
    outcome
}

#[derive(Debug, PartialEq, Eq)]
enum RelayEnd {
    Backend,
    Client,
    Deadline,
}

/// Copies DATA frames and then trailers from the backend stream to the client stream, adding
/// the body bytes sent to `total`.
async fn relay_body(
    body: &mut RecvStream,
    send: &mut SendHalf,
    idle: Duration,
    total: &mut u64,
) -> Result<(), RelayEnd> {
    loop {
        let data = match tokio::time::timeout(idle, body.data()).await {
            Ok(Some(Ok(data))) => data,
            Ok(Some(Err(_))) | Err(_) => return Err(RelayEnd::Backend),
            Ok(None) => break,
        };
        let len = data.len();
        send.send_data(data).await.map_err(|_| RelayEnd::Client)?;
        *total += len as u64;
        let _ = body.flow_control().release_capacity(len);
    }
    match tokio::time::timeout(idle, body.trailers()).await {
        Ok(Ok(Some(trailers))) => send
            .send_trailers(trailers)
            .await
            .map_err(|_| RelayEnd::Client)?,
        Ok(Ok(None)) => {}
        Ok(Err(_)) | Err(_) => return Err(RelayEnd::Backend),
    }
    send.finish().await.map_err(|_| RelayEnd::Client)
}

/// Responds to a gRPC request whose deadline passed before the backend responded: a
/// trailers-only response with status DEADLINE_EXCEEDED.
async fn send_deadline_exceeded(send: &mut SendHalf) -> Outcome {
    let mut response = Response::new(());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        "grpc-status",
        HeaderValue::from_static(GRPC_DEADLINE_EXCEEDED),
    );
    headers.insert(
        "grpc-message",
        HeaderValue::from_static("deadline exceeded"),
    );
    if send.send_response(response).await.is_ok() {
        let _ = send.finish().await;
    }
    Outcome {
        status: 200,
        bytes: 0,
        upstream: None,
    }
}
