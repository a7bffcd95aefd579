//! Forwarding of one HTTP/2 stream to an HTTP/2 backend (h2c for gRPC, or https that chose
//! `h2`): request and response bodies stream in both directions at once, trailers pass
//! through, and `grpc-timeout` is enforced.
//!
//! ```text
//! client stream ──HEADERS──> backend stream (pooled connection of this worker)
//!   request DATA + trailers ──> pumped by a task, window released as the backend takes them
//!   <── response HEADERS (or trailers-only HEADERS with END_STREAM)
//!   <── response DATA as the client's window allows, then trailers
//! ```

use std::{
    future::poll_fn,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{client::SendRequest, server::SendResponse, Reason, RecvStream, SendStream};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use tracing::debug;

use super::{
    send_with_capacity,
    stream::{send_head, send_local, ForwardedRequest, Outcome},
};
use crate::{
    forward::forwarded_fields,
    http1::head::is_hop_by_hop,
    metrics::UpstreamErrorKind,
    state::{Compiled, CompiledRouter, CompiledServer},
    upstream::Pick,
    worker::{ConnInfo, WorkerCtx},
};

/// gRPC status DEADLINE_EXCEEDED.
pub(crate) const GRPC_DEADLINE_EXCEEDED: &str = "4";

/// Forwards the stream to an h2c server of the router's service.
pub async fn proxy_h2c(
    ctx: &Rc<WorkerCtx>,
    info: &ConnInfo,
    compiled: &Compiled,
    router: &CompiledRouter,
    req: &ForwardedRequest<'_>,
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
) -> Outcome {
    let service = &compiled.services[router.service];
    let (index, addr) = match ctx.upstreams.pick(compiled, router.service, &[]) {
        Pick::Server { index, addr } => (index, addr),
        Pick::NoServers | Pick::NoneAvailable => return send_local(&mut respond, 503),
    };
    let server = &service.servers[index];
    let sender = match ctx.h2_pool.sender(ctx, addr, &router.name).await {
        Ok(sender) => sender,
        Err(kind) => {
            let status = match kind {
                UpstreamErrorKind::ConnectTimeout | UpstreamErrorKind::ResponseTimeout => 504,
                _ => 502,
            };
            return Outcome {
                upstream: Some(addr),
                ..send_local(&mut respond, status)
            };
        }
    };

    let target = H2Target {
        server,
        addr,
        pass_host_header: service.pass_host_header,
    };
    exchange_h2(ctx, info, req, target, sender, body, respond).await
}

/// The backend chosen for an HTTP/2 exchange.
pub struct H2Target<'a> {
    pub server: &'a CompiledServer,
    pub addr: SocketAddr,
    pub pass_host_header: bool,
}

/// Forwards the stream as a stream on `sender`'s connection and relays the response.
pub async fn exchange_h2(
    ctx: &Rc<WorkerCtx>,
    info: &ConnInfo,
    req: &ForwardedRequest<'_>,
    target: H2Target<'_>,
    sender: SendRequest<Bytes>,
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
) -> Outcome {
    let settings = &ctx.shared.settings;
    let grpc = is_grpc(&req.parts.headers);
    let deadline = grpc_timeout(&req.parts.headers).map(|limit| Instant::now() + limit);
    let H2Target { server, addr, .. } = target;
    let _in_flight = ctx.upstreams.start_request(addr);

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
    let request = match build_request(req, scheme, host, info, trusted_peer) {
        Some(request) => request,
        None => return send_local(&mut respond, 400),
    };
    let end_of_stream = body.is_end_stream();
    let mut sender = sender;
    let (response, upstream_send) = match sender.send_request(request, end_of_stream) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(upstream = %addr, error = %e, "opening a stream to the HTTP/2 backend failed");
            ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
            return Outcome {
                upstream: Some(addr),
                ..send_local(&mut respond, 502)
            };
        }
    };
    if !end_of_stream {
        monoio::spawn(pump_request(
            body,
            upstream_send,
            settings.body_idle_timeout,
        ));
    }

    // The response head races the client's reset, the response timeout and the gRPC deadline.
    let head_limit = deadline.map_or(settings.upstream_response_timeout, |at| {
        at.saturating_duration_since(Instant::now())
    });
    let head = monoio::select! {
        head = monoio::time::timeout(head_limit, response) => Some(head),
        _ = poll_fn(|cx| respond.poll_reset(cx)) => None,
    };
    let response = match head {
        None => {
            debug!("the client reset the stream before the response");
            return Outcome {
                status: 499,
                bytes: 0,
                upstream: Some(addr),
            };
        }
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => {
            debug!(upstream = %addr, error = %e, "the HTTP/2 backend failed the stream");
            ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
            return Outcome {
                upstream: Some(addr),
                ..send_local(&mut respond, 502)
            };
        }
        Some(Err(_)) if grpc && deadline.is_some() => {
            return Outcome {
                upstream: Some(addr),
                ..send_deadline_exceeded(&mut respond)
            };
        }
        Some(Err(_)) => {
            ctx.metrics()
                .upstream_error(UpstreamErrorKind::ResponseTimeout);
            return Outcome {
                upstream: Some(addr),
                ..send_local(&mut respond, 504)
            };
        }
    };
    ctx.upstreams.mark_ok(addr);
    relay_response(ctx, addr, response, respond, deadline, grpc).await
}

/// Returns whether the request is gRPC, by its content type.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Parses `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Builds the backend request: the client's fields without hop-by-hop ones (`te: trailers`
/// is kept, as gRPC requires it), plus the forwarding headers.
fn build_request(
    req: &ForwardedRequest<'_>,
    scheme: &str,
    host: &[u8],
    info: &ConnInfo,
    trusted_peer: bool,
) -> Option<Request<()>> {
    let authority = std::str::from_utf8(host).ok()?;
    let uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(std::str::from_utf8(req.target).ok()?)
        .build()
        .ok()?;
    let fwd = req.forward_info(host, info, trusted_peer);
    let fields = req
        .parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
        .filter(|(name, value)| {
            let trailers_te = *name == b"te" && value.eq_ignore_ascii_case(b"trailers");
            trailers_te || !(is_hop_by_hop(name) || *name == b"host")
        });
    let mut headers = HeaderMap::with_capacity(req.parts.headers.len() + 6);
    forwarded_fields(&fwd, fields, |name, value| {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    });
    let mut request = Request::builder()
        .method(req.parts.method.clone())
        .uri(uri)
        .body(())
        .ok()?;
    *request.headers_mut() = headers;
    Some(request)
}

/// Copies the request body and trailers from the client to the backend. Capacity is released
/// to the client only after the backend's window took the data, so a slow backend slows the
/// client down instead of filling the edge's memory.
async fn pump_request(mut body: RecvStream, mut upstream: SendStream<Bytes>, idle: Duration) {
    loop {
        let data = match monoio::time::timeout(idle, body.data()).await {
            Ok(Some(Ok(data))) => data,
            Ok(Some(Err(e))) => {
                debug!(error = %e, "request body stream failed");
                upstream.send_reset(Reason::CANCEL);
                return;
            }
            Ok(None) => break,
            Err(_) => {
                upstream.send_reset(Reason::CANCEL);
                return;
            }
        };
        let len = data.len();
        if send_with_capacity(&mut upstream, data, idle, monoio::time::sleep)
            .await
            .is_err()
        {
            return;
        }
        let _ = body.flow_control().release_capacity(len);
    }
    let ended = match monoio::time::timeout(idle, body.trailers()).await {
        Ok(Ok(Some(trailers))) => upstream.send_trailers(trailers),
        _ => upstream.send_data(Bytes::new(), true),
    };
    if let Err(e) = ended {
        debug!(error = %e, "ending the request stream to the backend failed");
    }
}

/// Sends the backend's response head, body and trailers to the client. A trailers-only
/// response (HEADERS with END_STREAM, as gRPC sends for an immediate error) stays one frame.
async fn relay_response(
    ctx: &WorkerCtx,
    addr: SocketAddr,
    response: Response<RecvStream>,
    mut respond: SendResponse<Bytes>,
    deadline: Option<Instant>,
    grpc: bool,
) -> Outcome {
    let (parts, mut body) = response.into_parts();
    let status = parts.status.as_u16();
    let mut head = Response::builder()
        .status(parts.status)
        .body(())
        .unwrap_or_default();
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name.as_str().as_bytes()) {
            head.headers_mut().append(name.clone(), value.clone());
        }
    }
    if let Some(alt_svc) = &ctx.shared.settings.alt_svc {
        head.headers_mut().insert(header::ALT_SVC, alt_svc.clone());
    }
    let trailers_only = body.is_end_stream();
    let Some(mut send) = send_head(&mut respond, head, trailers_only) else {
        return Outcome {
            status,
            bytes: 0,
            upstream: Some(addr),
        };
    };
    if trailers_only {
        return Outcome {
            status,
            bytes: 0,
            upstream: Some(addr),
        };
    }

    let idle = ctx.shared.settings.body_idle_timeout;
    let relay = relay_body(&mut body, &mut send, idle);
    let result = match deadline {
        Some(at) => {
            let limit = at.saturating_duration_since(Instant::now());
            match monoio::time::timeout(limit, relay).await {
                Ok(result) => result,
                Err(_) => Err(RelayEnd::Deadline),
            }
        }
        None => relay.await,
    };
    let bytes = match result {
        Ok(bytes) => bytes,
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
            let _ = send.send_trailers(trailers);
            0
        }
        Err(end) => {
            debug!(?end, "response body relay stopped");
            if end == RelayEnd::Backend {
                ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
            }
            send.send_reset(Reason::INTERNAL_ERROR);
            0
        }
    };
    Outcome {
        status,
        bytes,
        upstream: Some(addr),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RelayEnd {
    Backend,
    Client,
    Deadline,
}

/// Copies DATA frames and then trailers from the backend stream to the client stream.
async fn relay_body(
    body: &mut RecvStream,
    send: &mut SendStream<Bytes>,
    idle: Duration,
) -> Result<u64, RelayEnd> {
    let mut total = 0;
    loop {
        let data = match monoio::time::timeout(idle, body.data()).await {
            Ok(Some(Ok(data))) => data,
            Ok(Some(Err(_))) | Err(_) => return Err(RelayEnd::Backend),
            Ok(None) => break,
        };
        let len = data.len();
        total += len as u64;
        send_with_capacity(send, data, idle, monoio::time::sleep)
            .await
            .map_err(|()| RelayEnd::Client)?;
        let _ = body.flow_control().release_capacity(len);
    }
    let ended = match monoio::time::timeout(idle, body.trailers()).await {
        Ok(Ok(Some(trailers))) => send.send_trailers(trailers),
        Ok(Ok(None)) => send.send_data(Bytes::new(), true),
        Ok(Err(_)) | Err(_) => return Err(RelayEnd::Backend),
    };
    ended.map(|()| total).map_err(|_| RelayEnd::Client)
}

/// Responds to a gRPC request whose deadline passed before the backend responded: a
/// trailers-only response with status DEADLINE_EXCEEDED.
fn send_deadline_exceeded(respond: &mut SendResponse<Bytes>) -> Outcome {
    let response = Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("grpc-status", GRPC_DEADLINE_EXCEEDED)
        .header("grpc-message", "deadline exceeded")
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(response, true);
    Outcome {
        status: 200,
        bytes: 0,
        upstream: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let mut headers = HeaderMap::new();
        for (value, expected) in [
            ("5S", Some(Duration::from_secs(5))),
            ("100m", Some(Duration::from_millis(100))),
            ("2H", Some(Duration::from_secs(7200))),
            ("7u", Some(Duration::from_micros(7))),
            ("123456789S", None),
            ("S", None),
            ("5x", None),
        ] {
            headers.insert("grpc-timeout", HeaderValue::from_static(value));
            assert_eq!(grpc_timeout(&headers), expected, "grpc-timeout {value}");
        }
    }
}
