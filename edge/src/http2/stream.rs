//! One HTTP/2 request stream: route it and hand it to the forwarding for the backend's
//! protocol (`to_http1` or `h2c`), or respond locally.
//!
//! ```text
//! request head ─> route ─> no route / bad request / CONNECT ─> local response
//!   ├─ service with h2c servers ─> h2c::proxy_h2c (WebSocket: 502)
//!   └─ otherwise ─> to_http1::proxy_http1 (WebSocket: HTTP/1.1 upgrade, then a tunnel)
//! ```
//!
//! An extended CONNECT with `:protocol websocket` (RFC 8441) is routed like a GET of its
//! `:authority` and `:path`. A CONNECT without `:protocol`, or with another protocol, gets 405.

use std::{
    net::{IpAddr, SocketAddr},
    rc::Rc,
    time::Instant,
};

use bytes::Bytes;
use edge_proto::rule::RequestView;
use h2::{server::SendResponse, RecvStream, SendStream};
use http::{header, HeaderMap, Request, Response};
use tracing::{debug, Instrument};

use super::{
    conn::H2Conn,
    h2c::proxy_h2c,
    to_http1::proxy_http1,
    websocket::{is_websocket_connect, new_key},
};
use crate::{
    access_log::Record,
    forward::{local_response_text, ForwardInfo, RouteKey},
    metrics::Protocol,
    settings::canonical_ip,
    worker::{RequestId, WorkerCtx},
};

/// Ends the stream's count on its connection when the task ends, however it ends.
struct StreamDone(Rc<H2Conn>);

impl Drop for StreamDone {
    fn drop(&mut self) {
        let conn = &self.0;
        conn.open_streams
            .set(conn.open_streams.get().saturating_sub(1));
        conn.last_active.set(Instant::now());
    }
}

/// The request as the rule matchers see it.
pub(crate) struct View<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub method: &'a str,
    pub headers: &'a HeaderMap,
    pub client_ip: IpAddr,
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
        self.headers
            .get_all(name)
            .iter()
            .any(|value| f(value.as_bytes()))
    }
}

/// The outcome of one stream, for the access log and metrics.
pub(super) struct Outcome {
    pub status: u16,
    pub bytes: u64,
    pub upstream: Option<SocketAddr>,
}

/// Serves one request stream to completion.
pub async fn serve_stream(
    ctx: Rc<WorkerCtx>,
    conn: Rc<H2Conn>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let _done = StreamDone(conn.clone());
    let info = conn.info;
    let started = Instant::now();
    let request_id = ctx.next_request_id();
    let (parts, body) = request.into_parts();

    let RouteKey {
        raw_host,
        host,
        path,
        target,
        valid,
    } = RouteKey::from_parts(&parts);
    let method = parts.method.as_str();
    let websocket = is_websocket_connect(&parts);
    let client_ip = canonical_ip(info.peer.ip());
    let compiled = ctx.snapshot();

    let mut route_name: &str = "";
    let outcome = if !valid {
        send_local(&mut respond, 400)
    } else if parts.method == http::Method::CONNECT && !websocket {
        // A reverse proxy does not open TCP tunnels to arbitrary hosts, and extended
        // CONNECT is served only for WebSocket.
        send_local(&mut respond, 405)
    } else {
        let view = View {
            host: &host,
            path: &path,
            query: parts.uri.query().unwrap_or(""),
            // Rules see a WebSocket CONNECT as the GET an HTTP/1.1 client would send.
            method: if websocket { "GET" } else { method },
            headers: &parts.headers,
            client_ip,
        };
        match compiled.route(info.entrypoint, &view) {
            Some(router) => {
                route_name = &router.name;
                let request = ForwardedRequest {
                    parts: &parts,
                    raw_host,
                    target,
                    request_id,
                    client_ip,
                    websocket_key: websocket.then(new_key),
                };
                let span = tracing::debug_span!(
                    "request",
                    req_id = request_id.as_str(),
                    method,
                    host = %host,
                    route = %router.name,
                );
                // NOTE: the scheme of a service's first server decides the protocol for all
                // of its servers.
                let service = &compiled.services[router.service];
                let h2c = service.servers.first().is_some_and(|s| s.h2c);
                let outcome = if h2c && websocket {
                    // NOTE: WebSocket to h2c backends is not built, as over HTTP/1.1, because
                    // it would need extended CONNECT on the backend connection too.
                    send_local(&mut respond, 502)
                } else if h2c {
                    proxy_h2c(&ctx, &info, &compiled, router, &request, body, respond)
                        .instrument(span)
                        .await
                } else {
                    proxy_http1(&ctx, &info, &compiled, router, &request, body, respond)
                        .instrument(span)
                        .await
                };
                router.stats.record(ctx.id, Protocol::Http2, outcome.status);
                outcome
            }
            None => send_local(&mut respond, 404),
        }
    };
    if route_name.is_empty() {
        ctx.shared
            .unrouted_stats
            .record(ctx.id, Protocol::Http2, outcome.status);
    }
    ctx.access_log.borrow_mut().record(&Record {
        request_id: request_id.as_str(),
        conn_id: info.conn_id,
        client: client_ip,
        tls: info.is_tls(),
        protocol: Protocol::Http2,
        host: &host,
        method: method.as_bytes(),
        path: target,
        status: outcome.status,
        bytes: outcome.bytes,
        duration: started.elapsed(),
        route: route_name,
        upstream: outcome.upstream,
    });
}

/// The parts of a request that forwarding needs.
pub(super) struct ForwardedRequest<'a> {
    pub parts: &'a http::request::Parts,
    pub raw_host: &'a [u8],
    pub target: &'a [u8],
    pub request_id: RequestId,
    pub client_ip: IpAddr,
    /// The `Sec-WebSocket-Key` sent to the backend when the request is a WebSocket CONNECT.
    pub websocket_key: Option<String>,
}

impl ForwardedRequest<'_> {
    /// Returns the facts about this request that the backend receives besides its fields.
    pub fn forward_info<'a>(
        &'a self,
        host: &'a [u8],
        info: &crate::worker::ConnInfo,
        trusted_peer: bool,
    ) -> ForwardInfo<'a> {
        let method = if self.websocket_key.is_some() {
            &b"GET"[..]
        } else {
            self.parts.method.as_str().as_bytes()
        };
        ForwardInfo {
            method,
            target: self.target,
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

/// Sends a response head to the client. Returns the stream for the body, or `None` (logged)
/// when the client has gone.
pub(super) fn send_head(
    respond: &mut SendResponse<Bytes>,
    head: Response<()>,
    end_of_stream: bool,
) -> Option<SendStream<Bytes>> {
    match respond.send_response(head, end_of_stream) {
        Ok(send) => Some(send),
        Err(e) => {
            debug!(error = %e, "sending the response head failed");
            None
        }
    }
}

/// Sends a response generated by the edge and ends the stream.
pub(super) fn send_local(respond: &mut SendResponse<Bytes>, status: u16) -> Outcome {
    let (_, text) = local_response_text(status);
    let response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONTENT_LENGTH, text.len())
        .body(())
        .unwrap_or_default();
    let bytes = match respond.send_response(response, false) {
        Ok(mut stream) => match stream.send_data(Bytes::from_static(text.as_bytes()), true) {
            Ok(()) => text.len() as u64,
            Err(_) => 0,
        },
        Err(_) => 0,
    };
    Outcome {
        status,
        bytes,
        upstream: None,
    }
}
