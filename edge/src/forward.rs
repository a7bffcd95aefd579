//! Request forwarding shared by the HTTP/1.1 and HTTP/2 front ends. It covers the routing
//! inputs (host and path), the request head and forwarding headers sent to a backend, opening
//! backend connections, and the text of the responses the edge generates itself.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use monoio::net::TcpStream;
use tracing::warn;

use crate::{
    http1::head::BodyFraming,
    metrics::UpstreamErrorKind,
    state::CompiledServer,
    upstream_tls::{self, UpstreamStream},
    worker::{RequestId, WorkerCtx},
};

/// The facts about one request that the backend receives besides its own header fields.
pub struct ForwardInfo<'a> {
    pub method: &'a [u8],
    /// Path and query as the client sent them.
    pub target: &'a [u8],
    /// The `Host` value sent to the backend.
    pub host: &'a [u8],
    /// The client's `Host` (or HTTP/2 `:authority`); empty when it sent none.
    pub raw_host: &'a [u8],
    pub client_ip: IpAddr,
    pub request_id: RequestId,
    pub tls: bool,
    pub local_port: u16,
    /// The peer is a trusted proxy, so its forwarding headers are extended, not replaced.
    pub trusted_peer: bool,
}

/// Writes the HTTP/1.1 request line, `Host`, the client's end-to-end `fields` and the proxy's
/// forwarding headers into `out` (cleared first). The caller has already removed hop-by-hop
/// fields, `Host`, `Content-Length` and `Expect` from `fields`, and appends the framing fields
/// and the final CRLF.
pub fn write_request_head<'h>(
    out: &mut Vec<u8>,
    fwd: &ForwardInfo<'_>,
    fields: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
) {
    out.clear();
    out.extend_from_slice(fwd.method);
    out.push(b' ');
    out.extend_from_slice(if fwd.target.is_empty() {
        b"/"
    } else {
        fwd.target
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    out.extend_from_slice(b"Host: ");
    out.extend_from_slice(fwd.host);
    out.extend_from_slice(b"\r\n");
    forwarded_fields(fwd, fields, |name, value| push_field(out, name, value));
}

/// Passes the client's end-to-end `fields` and then the proxy's forwarding headers to `emit`,
/// in the order they are sent. Forwarding headers from an untrusted peer are dropped and set
/// afresh, so a client can never remove or forge them.
pub fn forwarded_fields<'h>(
    fwd: &ForwardInfo<'_>,
    fields: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
    mut emit: impl FnMut(&[u8], &[u8]),
) {
    let trusted_peer = fwd.trusted_peer;
    let mut prior_xff: Option<&[u8]> = None;
    let mut has_request_id = false;
    let mut trusted_proto = None;
    let mut trusted_fwd_host = None;
    let mut trusted_real_ip = None;
    for (name, value) in fields {
        if is_forwarding_header(name) {
            // From an untrusted peer these are dropped and set afresh below.
            if trusted_peer {
                if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                    prior_xff = Some(value);
                    continue;
                } else if name.eq_ignore_ascii_case(b"x-forwarded-proto") {
                    trusted_proto = Some(value);
                    continue;
                } else if name.eq_ignore_ascii_case(b"x-forwarded-host") {
                    trusted_fwd_host = Some(value);
                    continue;
                } else if name.eq_ignore_ascii_case(b"x-real-ip") {
                    trusted_real_ip = Some(value);
                    continue;
                }
                emit(name, value);
            }
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-request-id") {
            has_request_id = true;
        }
        emit(name, value);
    }

    let mut ip_text = [0u8; 64];
    let ip = format_ip(fwd.client_ip, &mut ip_text);
    match prior_xff {
        Some(prior) => {
            let mut xff = Vec::with_capacity(prior.len() + 2 + ip.len());
            xff.extend_from_slice(prior);
            xff.extend_from_slice(b", ");
            xff.extend_from_slice(ip);
            emit(b"X-Forwarded-For", &xff);
        }
        None => emit(b"X-Forwarded-For", ip),
    }
    emit(
        b"X-Forwarded-Proto",
        trusted_proto.unwrap_or(if fwd.tls { b"https" } else { b"http" }),
    );
    if let Some(fwd_host) = trusted_fwd_host.or((!fwd.raw_host.is_empty()).then_some(fwd.raw_host))
    {
        emit(b"X-Forwarded-Host", fwd_host);
    }
    let mut port_text = [0u8; 5];
    emit(
        b"X-Forwarded-Port",
        format_port(fwd.local_port, &mut port_text),
    );
    emit(b"X-Real-Ip", trusted_real_ip.unwrap_or(ip));
    if !has_request_id {
        emit(b"X-Request-Id", fwd.request_id.as_str().as_bytes());
    }
}

/// Appends the field that frames a request body of `framing` for an HTTP/1.1 backend.
pub fn write_framing(out: &mut Vec<u8>, framing: BodyFraming) {
    match framing {
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        BodyFraming::Empty | BodyFraming::UntilClose => {}
    }
}

/// A connection to a backend, ready for one request.
pub enum Opened {
    /// An HTTP/1.1 connection; `reused` when it came from the pool.
    Http1 {
        stream: UpstreamStream,
        reused: bool,
    },
    /// An `https://` backend that speaks HTTP/2: a handle on this worker's multiplexed
    /// connection to it.
    H2(SendRequest<Bytes>),
}

/// Returns a connection to `server` at `addr` for one request. For an `https://` server it is
/// this worker's HTTP/2 connection when the backend chose `h2` in ALPN, else a pooled
/// HTTP/1.1 connection, else a new one whose ALPN result decides. `http1_only` (for
/// WebSocket upgrades) skips HTTP/2 and offers only `http/1.1`. Plain servers get a pooled or
/// new HTTP/1.1 connection.
///
/// A failed connect or TLS handshake is counted, marks the backend as failing on this worker
/// and is logged (rate-limited) with the route name.
///
/// # Errors
/// The kind of failure.
pub async fn open_connection(
    ctx: &WorkerCtx,
    addr: SocketAddr,
    server: &CompiledServer,
    route: &str,
    http1_only: bool,
) -> Result<Opened, UpstreamErrorKind> {
    let tls_id = server.tls_id();
    if server.tls.is_some() && !http1_only {
        if let Some(sender) = ctx.h2_pool.pooled(ctx, addr, tls_id).await? {
            return Ok(Opened::H2(sender));
        }
    }
    if let Some(stream) = ctx.upstreams.take_idle(addr, tls_id) {
        return Ok(Opened::Http1 {
            stream,
            reused: true,
        });
    }

    let limit = ctx.shared.settings.upstream_connect_timeout;
    let connected = match connect(addr, limit).await {
        Ok(stream) => match &server.tls {
            None => Ok((UpstreamStream::Plain(stream), false)),
            Some(tls) => upstream_tls::handshake(tls, stream, http1_only, limit).await,
        },
        Err(failure) => Err(failure),
    };
    match connected {
        Ok((stream, true)) => {
            let sender = ctx.h2_pool.handshake(ctx, addr, tls_id, stream).await?;
            Ok(Opened::H2(sender))
        }
        Ok((stream, false)) => Ok(Opened::Http1 {
            stream,
            reused: false,
        }),
        Err((kind, message)) => {
            ctx.metrics().upstream_error(kind);
            ctx.upstreams.mark_failed(addr);
            if ctx.should_log_upstream_error() {
                if kind == UpstreamErrorKind::Tls {
                    let server_name = server.tls.as_ref().map(|tls| tls.server_name.to_str());
                    warn!(upstream = %addr, service = %route, server_name = server_name.as_deref().unwrap_or_default(), error = %message, "TLS handshake with the backend failed");
                } else {
                    warn!(upstream = %addr, service = %route, error = %message, "connecting to the backend failed");
                }
            }
            Err(kind)
        }
    }
}

pub async fn connect(
    addr: SocketAddr,
    limit: Duration,
) -> Result<TcpStream, (UpstreamErrorKind, String)> {
    match monoio::time::timeout(limit, TcpStream::connect_addr(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err((UpstreamErrorKind::Connect, e.to_string())),
        Err(_) => Err((
            UpstreamErrorKind::ConnectTimeout,
            format!("no answer within {limit:?}"),
        )),
    }
}

fn is_forwarding_header(name: &[u8]) -> bool {
    name.len() > 12 && name[..12].eq_ignore_ascii_case(b"x-forwarded-")
        || name.eq_ignore_ascii_case(b"forwarded")
        || name.eq_ignore_ascii_case(b"x-real-ip")
}

pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn format_port(port: u16, buf: &mut [u8; 5]) -> &[u8] {
    let mut start = buf.len();
    let mut rest = port;
    loop {
        start -= 1;
        buf[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &buf[start..]
}

fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    use std::io::Write as _;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{ip}");
    let len = cursor.position() as usize;
    &buf[..len]
}

/// Routing key of an HTTP/2 or HTTP/3 request, taken from its pseudo-headers.
pub struct RouteKey<'a> {
    /// The authority, or the Host field when there is none.
    pub raw_host: &'a [u8],
    /// The host normalised by [`normalize_host`].
    pub host: String,
    /// The path decoded by [`routing_path`].
    pub path: String,
    /// Path and query as sent, for redirects and the backend request.
    pub target: &'a [u8],
    /// Whether both host and path are valid.
    pub valid: bool,
}

impl<'a> RouteKey<'a> {
    /// Builds the routing key of a request from its URI and headers.
    pub fn from_parts(parts: &'a http::request::Parts) -> Self {
        let raw_host: &[u8] = match parts.uri.authority() {
            Some(authority) => authority.as_str().as_bytes(),
            None => parts
                .headers
                .get(http::header::HOST)
                .map_or(b"", http::HeaderValue::as_bytes),
        };
        let mut host = String::new();
        let mut path = String::new();
        let host_ok = normalize_host(raw_host, &mut host);
        let path_ok = routing_path(parts.uri.path().as_bytes(), &mut path);
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes();
        RouteKey {
            raw_host,
            host,
            path,
            target,
            valid: host_ok && path_ok,
        }
    }
}

/// Normalises a Host value for routing into `out`: port and IPv6 brackets removed, one
/// trailing dot removed, ASCII lowercase. Returns false when the value is not a valid host.
pub fn normalize_host(raw: &[u8], out: &mut String) -> bool {
    out.clear();
    let host = if let Some(rest) = raw.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let after = &rest[end + 1..];
        if !(after.is_empty() || after[0] == b':' && after[1..].iter().all(u8::is_ascii_digit)) {
            return false;
        }
        &rest[..end]
    } else {
        match raw.iter().rposition(|&b| b == b':') {
            Some(colon) if raw[colon + 1..].iter().all(u8::is_ascii_digit) => &raw[..colon],
            Some(_) => return false,
            None => raw,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    for &b in host {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'%' | b'*') {
            out.push(b.to_ascii_lowercase() as char);
        } else {
            return false;
        }
    }
    true
}

/// Builds the routing path into `out`: percent-escapes of unreserved characters decoded,
/// reserved ones kept, as Traefik matches paths. Returns false for a path that is not UTF-8
/// after decoding.
pub fn routing_path(raw: &[u8], out: &mut String) -> bool {
    out.clear();
    if !raw.contains(&b'%') {
        return match std::str::from_utf8(raw) {
            Ok(s) => {
                out.push_str(s);
                true
            }
            Err(_) => false,
        };
    }
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                let decoded = (h * 16 + l) as u8;
                const RESERVED: &[u8] = b"/?#[]@!$&'()*+,;=:%";
                if !RESERVED.contains(&decoded) {
                    bytes.push(decoded);
                    i += 3;
                    continue;
                }
            }
        }
        bytes.push(raw[i]);
        i += 1;
    }
    match String::from_utf8(bytes) {
        Ok(s) => {
            *out = s;
            true
        }
        Err(_) => false,
    }
}

/// Builds the `Location` of a redirect to HTTPS, keeping path and query.
pub fn https_location(host: &str, raw_host: &[u8], target: &[u8], https_port: u16) -> String {
    let mut location = String::with_capacity(16 + host.len() + target.len());
    location.push_str("https://");
    if raw_host.starts_with(b"[") {
        location.push('[');
        location.push_str(host);
        location.push(']');
    } else {
        location.push_str(host);
    }
    if https_port != 443 {
        location.push(':');
        location.push_str(&https_port.to_string());
    }
    match std::str::from_utf8(target) {
        Ok(t) if t.starts_with('/') => location.push_str(t),
        _ => location.push('/'),
    }
    location
}

pub fn local_response_text(status: u16) -> (&'static str, &'static str) {
    match status {
        308 => ("Permanent Redirect", "redirecting to HTTPS\n"),
        400 => (
            "Bad Request",
            "bad request: the request is malformed or its framing is ambiguous\n",
        ),
        404 => (
            "Not Found",
            "not found: no route matches this host and path\n",
        ),
        405 => ("Method Not Allowed", "method not allowed\n"),
        408 => (
            "Request Timeout",
            "request timeout: the request was not received in time\n",
        ),
        413 => (
            "Content Too Large",
            "content too large: the request body exceeds the limit of this route\n",
        ),
        431 => (
            "Request Header Fields Too Large",
            "request header fields too large\n",
        ),
        502 => (
            "Bad Gateway",
            "bad gateway: the backend could not be reached or sent an invalid response\n",
        ),
        503 => (
            "Service Unavailable",
            "service unavailable: no healthy backend for this route\n",
        ),
        504 => (
            "Gateway Timeout",
            "gateway timeout: the backend did not answer in time\n",
        ),
        _ => ("Error", "error\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_normalization() {
        let mut out = String::new();
        assert!(normalize_host(b"SHOP.Example.COM:8443", &mut out));
        assert_eq!(out, "shop.example.com");
        assert!(normalize_host(b"[2001:DB8::1]:443", &mut out));
        assert_eq!(out, "2001:db8::1");
        assert!(normalize_host(b"app.example.com.", &mut out));
        assert_eq!(out, "app.example.com");
        assert!(!normalize_host(b"a b", &mut out));
        assert!(!normalize_host(b"a:x", &mut out));
    }

    #[test]
    fn routing_path_decodes_unreserved() {
        let mut out = String::new();
        assert!(routing_path(b"/foo%20bar%2Fbaz", &mut out));
        assert_eq!(out, "/foo bar%2Fbaz");
        assert!(routing_path(b"/%7euser", &mut out));
        assert_eq!(out, "/~user");
        assert!(!routing_path(b"/%ff", &mut out));
    }

    #[test]
    fn redirect_location_keeps_target() {
        assert_eq!(
            https_location("a.test", b"a.test:8080", b"/x?y=1", 8443),
            "https://a.test:8443/x?y=1"
        );
        assert_eq!(
            https_location("a.test", b"a.test", b"/", 443),
            "https://a.test/"
        );
    }

    #[test]
    fn port_formatting() {
        let mut buf = [0u8; 5];
        assert_eq!(format_port(0, &mut buf), b"0");
        assert_eq!(format_port(443, &mut buf), b"443");
        assert_eq!(format_port(65535, &mut buf), b"65535");
    }

    #[test]
    fn decimal_formatting() {
        let mut out = Vec::new();
        push_decimal(&mut out, 0);
        push_decimal(&mut out, 18446744073709551615);
        assert_eq!(out, b"018446744073709551615");
    }
}
