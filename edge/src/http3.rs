//! HTTP/3 front end: one QUIC endpoint per worker on the HTTPS address (UDP), serving requests
//! with the same router, backends, access log and metrics as HTTP/1.1 and HTTP/2.
//!
//! ```text
//! worker N (monoio, TCP)      edge-quic-N (tokio current-thread, same core)
//!                             ├─ quinn endpoint on a SO_REUSEPORT UDP socket
//!                             │    └─ connection task ─> request tasks ─> route
//!                             │         ├─ no route / bad request ─> local response
//!                             │         ├─ HTTP/1.1 backend (hyper, pooled: to_http1.rs)
//!                             │         └─ h2c backend (h2, one connection each: h2c.rs)
//!                             └─ housekeeping (access log flush, pool expiry, in-flight counts)
//! ```
//!
//! quinn needs `Send + Sync` socket and timer types, which monoio's are not, so each worker
//! gets a second thread with a tokio current-thread runtime, pinned to the same core. The
//! worker's monoio upstream pools cannot be used from that thread, so the QUIC thread keeps
//! its own pools and load-balancing state with the same limits.

mod body;
mod h2c;
mod pool;
mod to_http1;

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    rc::Rc,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use arc_swap::{cache::Cache, ArcSwap};
use bytes::Bytes;
use h3::server::RequestStream;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use quinn::{
    crypto::rustls::QuicServerConfig, ConnectionIdGenerator, EndpointConfig, TransportConfig,
    VarInt,
};
use tracing::{debug, info, warn, Instrument};

use crate::{
    access_log::{AccessLog, Record},
    forward::{local_response_text, ForwardInfo, RouteKey},
    http2::stream::View,
    metrics::{bump, Protocol, UpstreamErrorKind},
    settings::canonical_ip,
    state::{Compiled, EntryPoint, Shared},
    tls::{self, SniResolver},
    upstream::Upstreams,
    worker::RequestId,
};

/// Length of the connection IDs the edge issues: one byte of worker id, seven random. The QUIC
/// steering program reads the worker id at this length.
const CID_LEN: usize = edge_ebpf::QUIC_CID_LEN;
/// Open connections per worker above which new clients must prove their address (Retry).
const RETRY_ABOVE_CONNECTIONS: usize = 1024;
/// Open connections per worker above which new clients are rejected.
const MAX_CONNECTIONS: usize = 16 * 1024;
/// Unidirectional streams a client may open: control, QPACK encoder and decoder, and a few
/// reserved (grease) ones.
const MAX_UNI_STREAMS: u32 = 8;
/// Interval of the access log flush.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);
/// Request bodies over HTTP/3 are capped at this size when no limit is configured.
const DEFAULT_BODY_LIMIT: u64 = 1 << 30;

type RecvHalf = RequestStream<h3_quinn::RecvStream, Bytes>;
type SendHalf = RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
type UpstreamBody = UnsyncBoxBody<Bytes, io::Error>;

/// Issues connection IDs whose first byte is the worker id, so that a packet steering program
/// can send every packet of a connection to the worker that owns it.
struct WorkerCids {
    worker: u8,
}

impl ConnectionIdGenerator for WorkerCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        bytes[0] = self.worker;
        fill_random(&mut bytes[1..]);
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Fills `buf` from the kernel's random source.
pub(crate) fn fill_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which getrandom
        // only writes to.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            // NOTE: the rest of the ID stays zero. Without flags, getrandom(2) fails otherwise
            // only on invalid arguments.
            break;
        }
        filled += n as usize;
    }
}

/// Returns the worker id a connection ID issued by this edge carries.
#[cfg(test)]
fn worker_of_cid(cid: &[u8]) -> Option<u8> {
    (cid.len() == CID_LEN).then(|| cid[0])
}

/// State of one QUIC thread.
struct H3Ctx {
    id: usize,
    shared: Arc<Shared>,
    snapshot: RefCell<Cache<Arc<ArcSwap<Compiled>>, Arc<Compiled>>>,
    upstreams: Rc<Upstreams>,
    h1_pool: pool::H1Pool,
    h2c: h2c::H2cPool,
    access_log: RefCell<AccessLog>,
    next_conn: Cell<u64>,
    next_request: Cell<u64>,
    local_port: u16,
    last_upstream_warning: Cell<Option<Instant>>,
}

impl H3Ctx {
    fn snapshot(&self) -> Arc<Compiled> {
        self.snapshot.borrow_mut().load().clone()
    }

    fn metrics(&self) -> &crate::metrics::WorkerMetrics {
        &self.shared.metrics[self.id]
    }

    /// Returns whether a backend failure may be logged now: at most once a second per thread.
    fn should_log_upstream_error(&self) -> bool {
        let now = Instant::now();
        let allowed = self
            .last_upstream_warning
            .get()
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1));
        if allowed {
            self.last_upstream_warning.set(Some(now));
        }
        allowed
    }

    /// Closes expired idle backend connections and publishes this thread's requests in flight
    /// per backend next to the workers' counts.
    fn housekeeping(&self, sweep: bool) {
        self.access_log.borrow_mut().flush();
        let slot = self.shared.settings.workers + self.id;
        if let Some(slot) = self.shared.in_flight.get(slot) {
            *slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                self.upstreams.in_flight_counts();
        }
        if sweep {
            self.h1_pool.sweep();
            self.upstreams.sweep();
        }
    }

    /// Ids share the worker's layout (worker id in the top 16 bits) with bit 47 set, so they
    /// never collide with the TCP ids of the same worker.
    fn next_id(counter: &Cell<u64>, worker: usize) -> u64 {
        let n = counter.get().wrapping_add(1);
        counter.set(n);
        ((worker as u64) << 48) | (1 << 47) | (n & 0x7fff_ffff_ffff)
    }
}

/// Starts the QUIC thread of worker `id` on `socket`. The thread returns after `stop` fires
/// and its connections have finished or the shutdown grace period has passed.
///
/// # Errors
/// Fails when the thread cannot be spawned.
pub fn spawn(
    id: usize,
    shared: Arc<Shared>,
    socket: std::net::UdpSocket,
    stop: futures_channel::oneshot::Receiver<()>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("edge-quic-{id}"))
        .spawn(move || {
            if shared.settings.pin_workers {
                let allowed = crate::worker::allowed_cpus();
                if let Some(&cpu) = allowed.get(id % allowed.len().max(1)) {
                    if let Err(e) = monoio::utils::bind_to_cpu_set(Some(cpu)) {
                        warn!(worker = id, cpu, error = %e, "cannot pin the QUIC thread to a core");
                    }
                }
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    warn!(worker = id, error = %e, "cannot start the QUIC runtime; HTTP/3 is off on this worker");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            if let Err(e) = local.block_on(&runtime, quic_main(id, shared, socket, stop)) {
                warn!(worker = id, error = %e, "HTTP/3 endpoint failed; HTTP/3 is off on this worker");
            }
        })
}

/// Returns whether QUIC connection migration is on. After a client changes its address or
/// port, its datagrams must still reach the worker that owns the connection. The QUIC steering
/// program routes them by connection ID, and with one worker there is no other socket.
/// Otherwise the kernel's SO_REUSEPORT hash of the new 4-tuple would pick a worker that does
/// not know the connection, so migration stays off.
pub fn migration_enabled(shared: &Shared) -> bool {
    shared.kernel.steers_quic_by_connection_id() || shared.settings.workers == 1
}

/// Logs whether QUIC connection migration is on, and why.
pub fn log_migration(shared: &Shared) {
    if shared.kernel.steers_quic_by_connection_id() {
        info!("HTTP/3 connection migration on: QUIC steering routes datagrams by connection ID");
    } else if shared.settings.workers == 1 {
        info!("HTTP/3 connection migration on: one worker owns every QUIC connection");
    } else {
        info!(
            workers = shared.settings.workers,
            "HTTP/3 connection migration off: without QUIC steering by connection ID, a client that changes address or port would reach another worker"
        );
    }
}

/// Builds the QUIC server settings: the TCP listener's certificates (chosen by SNI), ALPN
/// `h3`, no 0-RTT, migration when [`migration_enabled`], and stream limits.
fn server_config(shared: &Shared) -> io::Result<quinn::ServerConfig> {
    let resolver = Arc::new(SniResolver::new(shared.current.clone()));
    let mut tls = tls::server_config(resolver, shared.ticketer.clone())
        .map_err(|e| io::Error::other(format!("invalid TLS settings: {e}")))?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    // 0-RTT stays off: early data could be replayed.
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| io::Error::other(format!("TLS settings unusable for QUIC: {e}")))?;
    let settings = &shared.settings;
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(settings.h2_max_concurrent_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .max_idle_timeout(settings.keep_alive_timeout.try_into().ok());
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    config.migration(migration_enabled(shared));
    Ok(config)
}

async fn quic_main(
    id: usize,
    shared: Arc<Shared>,
    socket: std::net::UdpSocket,
    mut stop: futures_channel::oneshot::Receiver<()>,
) -> io::Result<()> {
    let local_port = socket.local_addr()?.port();
    let mut endpoint_config = EndpointConfig::default();
    let worker =
        u8::try_from(id).map_err(|_| io::Error::other("HTTP/3 supports at most 256 workers"))?;
    endpoint_config.cid_generator(move || Box::new(WorkerCids { worker }));
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config(&shared)?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;

    let settings = &shared.settings;
    let ctx = Rc::new(H3Ctx {
        id,
        snapshot: RefCell::new(Cache::new(shared.current.clone())),
        upstreams: Rc::new(Upstreams::new(0, settings.upstream_idle_timeout)),
        h1_pool: pool::H1Pool::new(settings.upstream_max_idle, settings.upstream_idle_timeout),
        h2c: h2c::H2cPool::default(),
        access_log: RefCell::new(AccessLog::new(settings.access_log, settings.log_format)),
        next_conn: Cell::new(0),
        next_request: Cell::new(0),
        local_port,
        last_upstream_warning: Cell::new(None),
        shared: shared.clone(),
    });
    info!(worker = id, port = local_port, "HTTP/3 endpoint started");

    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    let mut ticks: u32 = 0;
    // Connection attempts per source address in the current one-second window.
    // NOTE: spoofed sources can grow this map for up to a second; the XDP filter's per-source
    // limit on QUIC Initials is the first defence.
    let mut attempts: HashMap<IpAddr, u32> = HashMap::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                let new_second = ticks.is_multiple_of(10);
                ctx.housekeeping(new_second);
                if new_second {
                    attempts.clear();
                }
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let open = endpoint.open_connections();
                let from_source = attempts.entry(incoming.remote_address().ip()).or_insert(0);
                *from_source = from_source.saturating_add(1);
                let busy_source = *from_source > settings.http3_retry_after;
                if open >= MAX_CONNECTIONS {
                    debug!(worker = id, peer = %incoming.remote_address(), "too many QUIC connections, rejecting a new one");
                    incoming.refuse();
                } else if (open >= RETRY_ABOVE_CONNECTIONS || busy_source)
                    && !incoming.remote_address_validated()
                {
                    // The client must echo a Retry token before it costs a handshake.
                    bump(&ctx.metrics().quic_retries);
                    if let Err(e) = incoming.retry() {
                        debug!(worker = id, error = %e, "sending a QUIC Retry failed");
                    }
                } else {
                    tokio::task::spawn_local(serve_connection(ctx.clone(), incoming));
                }
            }
        }
    }

    // Stop accepting, and let open connections finish within the grace period.
    endpoint.set_server_config(None);
    let deadline = Instant::now() + settings.shutdown_grace;
    while endpoint.open_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    endpoint.close(VarInt::from_u32(0), b"shutting down");
    ctx.h1_pool.clear();
    ctx.h2c.clear();
    ctx.access_log.borrow_mut().flush();
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    info!(worker = id, "HTTP/3 endpoint stopped");
    Ok(())
}

/// Counts an HTTPS connection as open for as long as it lives.
struct OpenConn(Rc<H3Ctx>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.metrics().connection_closed(true);
    }
}

async fn serve_connection(ctx: Rc<H3Ctx>, incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
    let conn_id = H3Ctx::next_id(&ctx.next_conn, ctx.id);
    let span =
        tracing::debug_span!("conn", conn_id, core = ctx.id, peer.addr = %peer, proto = "h3");
    async move {
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(e) => {
                bump(&ctx.metrics().tls_handshake_failures);
                debug!(error = %e, "QUIC handshake failed");
                return;
            }
        };
        bump(&ctx.metrics().tls_handshakes);
        ctx.metrics().connection_opened(true);
        bump(&ctx.metrics().quic_connections);
        let _open = OpenConn(ctx.clone());
        let built = h3::server::builder()
            .max_field_section_size(ctx.shared.settings.max_header_bytes as u64)
            .build::<_, Bytes>(h3_quinn::Connection::new(conn))
            .await;
        let mut h3_conn = match built {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "HTTP/3 connection setup failed");
                return;
            }
        };
        loop {
            match h3_conn.accept().await {
                Ok(Some(resolver)) => {
                    let ctx = ctx.clone();
                    let header_timeout = ctx.shared.settings.header_read_timeout;
                    tokio::task::spawn_local(
                        async move {
                            // A stream whose HEADERS frame never completes would otherwise stay
                            // open for as long as the client keeps the connection alive.
                            // Dropping the resolver stops the stream; the connection goes on.
                            match tokio::time::timeout(header_timeout, resolver.resolve_request())
                                .await
                            {
                                Ok(Ok((request, stream))) => {
                                    serve_request(ctx, peer, conn_id, request, stream).await;
                                }
                                Ok(Err(e)) => debug!(error = %e, "invalid HTTP/3 request"),
                                Err(_) => {
                                    bump(&ctx.metrics().h3_header_timeouts);
                                    debug!("HTTP/3 request headers timed out");
                                }
                            }
                        }
                        .in_current_span(),
                    );
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "HTTP/3 connection ended");
                    break;
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// The outcome of one request, for the access log and metrics.
struct Outcome {
    status: u16,
    bytes: u64,
    upstream: Option<SocketAddr>,
}

async fn serve_request(
    ctx: Rc<H3Ctx>,
    peer: SocketAddr,
    conn_id: u64,
    request: Request<()>,
    stream: RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
) {
    let started = Instant::now();
    let request_id = RequestId::new(H3Ctx::next_id(&ctx.next_request, ctx.id));
    let (parts, ()) = request.into_parts();
    let (mut send, recv) = stream.split();
    let RouteKey {
        raw_host,
        host,
        path,
        target,
        valid,
    } = RouteKey::from_parts(&parts);
    let method = parts.method.as_str();
    let client_ip = canonical_ip(peer.ip());
    let compiled = ctx.snapshot();

    let mut route_name: &str = "";
    let outcome = if !valid || host.is_empty() {
        send_local(&mut send, 400).await
    } else if parts.method == http::Method::CONNECT {
        send_local(&mut send, 405).await
    } else {
        let view = View {
            host: &host,
            path: &path,
            query: parts.uri.query().unwrap_or(""),
            method,
            headers: &parts.headers,
            client_ip,
        };
        match compiled.route(EntryPoint::WebSecure, &view) {
            Some(router) => {
                route_name = &router.name;
                let span = tracing::debug_span!(
                    "request",
                    req_id = request_id.as_str(),
                    method,
                    host = %host,
                    route = %router.name,
                );
                let fwd = ForwardInfo {
                    method: method.as_bytes(),
                    target,
                    host: b"",
                    raw_host,
                    client_ip,
                    request_id,
                    tls: true,
                    local_port: ctx.local_port,
                    trusted_peer: ctx.shared.settings.is_trusted_proxy(peer.ip()),
                };
                // NOTE: the scheme of a service's first server decides the protocol for all of
                // them, as on TCP.
                let service = &compiled.services[router.service];
                let outcome = if service.servers.first().is_some_and(|s| s.h2c) {
                    h2c::proxy(&ctx, &compiled, router, &parts, fwd, recv, &mut send)
                        .instrument(span)
                        .await
                } else {
                    to_http1::proxy(&ctx, &compiled, router, &parts, fwd, recv, &mut send)
                        .instrument(span)
                        .await
                };
                router.stats.record(ctx.id, Protocol::Http3, outcome.status);
                outcome
            }
            None => send_local(&mut send, 404).await,
        }
    };
    if route_name.is_empty() {
        ctx.shared
            .unrouted_stats
            .record(ctx.id, Protocol::Http3, outcome.status);
    }
    ctx.access_log.borrow_mut().record(&Record {
        request_id: request_id.as_str(),
        conn_id,
        client: client_ip,
        tls: true,
        protocol: Protocol::Http3,
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

/// Counts and logs a failed backend exchange, then responds with 502.
async fn upstream_failed(
    ctx: &H3Ctx,
    send: &mut SendHalf,
    addr: SocketAddr,
    kind: UpstreamErrorKind,
    message: &str,
) -> Outcome {
    ctx.metrics().upstream_error(kind);
    ctx.upstreams.mark_failed(addr);
    if ctx.should_log_upstream_error() {
        warn!(upstream = %addr, error = %message, "HTTP/3 request to the backend failed");
    }
    let mut outcome = send_local(send, 502).await;
    outcome.upstream = Some(addr);
    outcome
}

/// Sends a response generated by the edge and ends the stream.
async fn send_local(send: &mut SendHalf, status: u16) -> Outcome {
    let (_, text) = local_response_text(status);
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    let mut bytes = 0;
    if send.send_response(response).await.is_ok()
        && send
            .send_data(Bytes::from_static(text.as_bytes()))
            .await
            .is_ok()
    {
        bytes = text.len() as u64;
        let _ = send.finish().await;
    }
    Outcome {
        status,
        bytes,
        upstream: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_carry_the_worker() {
        let mut generator = WorkerCids { worker: 7 };
        let a = generator.generate_cid();
        let b = generator.generate_cid();
        assert_eq!(
            a.len(),
            edge_ebpf::QUIC_CID_LEN,
            "the length the steering reads"
        );
        assert_eq!(worker_of_cid(&a), Some(7));
        assert_eq!(worker_of_cid(&b), Some(7));
        assert_ne!(a, b, "the random part differs between IDs");
    }
}
