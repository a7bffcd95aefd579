//! One HTTP/2 client connection: the h2 server handshake, the accept loop that spawns a task
//! per stream, and the connection-level defences.
//!
//! ```text
//! TLS (ALPN h2) ─> FrameGuard (frame meter) ─> h2 handshake ─> accept loop
//!   ├─ stream ─> spawned task (stream::serve_stream): route, forward, relay
//!   ├─ frame budget exhausted ─> GOAWAY(ENHANCE_YOUR_CALM), close
//!   ├─ idle with no open stream for the keep-alive timeout ─> GOAWAY(NO_ERROR), close
//!   └─ worker shutdown ─> graceful GOAWAY, open streams finish, close
//! ```
//!
//! Everything here runs on the worker that accepted the TCP connection; stream tasks share
//! the connection's state through `Rc`.

use std::{
    cell::Cell,
    future::poll_fn,
    rc::Rc,
    task::Poll,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{server::SendResponse, Reason, RecvStream};
use http::Request;
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio_compat::StreamWrapper;
use tracing::{debug, info};

use super::{
    guard::{FrameGuard, Verdict},
    stream::serve_stream,
};
use crate::worker::{ConnInfo, WorkerCtx};

/// Per-stream receive window: how much of a request body the edge buffers per stream before
/// the client must wait.
const STREAM_WINDOW_BYTES: u32 = 256 * 1024;
/// Connection receive window, shared by all streams.
const CONNECTION_WINDOW_BYTES: u32 = 1024 * 1024;
/// Response bytes buffered per stream before the stream waits for the client to read.
const SEND_BUFFER_BYTES: usize = 64 * 1024;
/// Streams reset by the client before they were accepted, queued at once, before the
/// connection is closed with ENHANCE_YOUR_CALM.
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the edge may reset because of client protocol errors before it closes the
/// connection with ENHANCE_YOUR_CALM.
const MAX_LOCAL_ERROR_RESETS: usize = 100;
/// Time allowed to send GOAWAY and close after the edge decided to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Interval at which an idle connection checks its keep-alive timeout.
const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// State shared by a connection and its stream tasks.
pub struct H2Conn {
    pub info: ConnInfo,
    /// Streams whose task is still running.
    pub open_streams: Cell<usize>,
    /// When the last stream task ended.
    pub last_active: Cell<Instant>,
}

enum Event {
    Stream(Box<(Request<RecvStream>, SendResponse<Bytes>)>),
    Closed,
    Error(h2::Error),
    Abusive,
    Shutdown,
    IdleCheck,
}

/// Serves HTTP/2 on a TLS stream that negotiated `h2`, until the client or the edge closes it.
pub async fn serve<S>(ctx: Rc<WorkerCtx>, stream: S, info: ConnInfo)
where
    S: AsyncReadRent + AsyncWriteRent + Unpin + 'static,
{
    let settings = &ctx.shared.settings;
    let verdict: Verdict = Rc::new(Cell::new(None));
    let io = FrameGuard::new(StreamWrapper::new(stream), verdict.clone());
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(settings.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .initial_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_send_buffer_size(SEND_BUFFER_BYTES)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        // SETTINGS_ENABLE_CONNECT_PROTOCOL: lets clients send WebSocket over HTTP/2 (RFC 8441).
        .enable_connect_protocol();
    let handshake = monoio::time::timeout(settings.header_read_timeout, builder.handshake(io));
    let mut conn = match handshake.await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            debug!(error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            debug!("HTTP/2 preface not received in time");
            return;
        }
    };
    ctx.metrics().h2_connection_opened();

    let state = Rc::new(H2Conn {
        info,
        open_streams: Cell::new(0),
        last_active: Cell::new(Instant::now()),
    });
    loop {
        let accept = poll_fn(|cx| {
            if verdict.get().is_some() {
                return Poll::Ready(Event::Abusive);
            }
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((request, respond)))) => {
                    Poll::Ready(Event::Stream(Box::new((request, respond))))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Event::Error(e)),
                Poll::Ready(None) => Poll::Ready(Event::Closed),
                // The guard may have found a flood while h2 read from it.
                Poll::Pending if verdict.get().is_some() => Poll::Ready(Event::Abusive),
                Poll::Pending => Poll::Pending,
            }
        });
        let event = monoio::select! {
            event = accept => event,
            _ = ctx.shutdown.wait() => Event::Shutdown,
            _ = monoio::time::sleep(IDLE_CHECK_INTERVAL) => Event::IdleCheck,
        };
        match event {
            Event::Stream(accepted) => {
                let (request, respond) = *accepted;
                state.open_streams.set(state.open_streams.get() + 1);
                monoio::spawn(serve_stream(ctx.clone(), state.clone(), request, respond));
            }
            Event::Closed => {
                // The client closed or sent GOAWAY; streams already accepted may still be
                // sending their responses.
                let grace = settings.body_idle_timeout;
                let _ = monoio::time::timeout(grace, poll_fn(|cx| conn.poll_closed(cx))).await;
                break;
            }
            Event::Error(e) => {
                if e.reason() == Some(Reason::ENHANCE_YOUR_CALM) {
                    ctx.metrics().h2_abuse_closed();
                    info!(peer.addr = %state.info.peer, error = %e, "closed an abusive HTTP/2 connection");
                } else {
                    debug!(error = %e, "HTTP/2 connection error");
                }
                break;
            }
            Event::Abusive => {
                let flood = verdict.get().map_or("unknown", |f| f.name());
                ctx.metrics().h2_abuse_closed();
                info!(peer.addr = %state.info.peer, flood, "closing an abusive HTTP/2 connection with GOAWAY");
                conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                let _ =
                    monoio::time::timeout(CLOSE_TIMEOUT, poll_fn(|cx| conn.poll_closed(cx))).await;
                break;
            }
            Event::Shutdown => {
                conn.graceful_shutdown();
                let grace = settings.shutdown_grace;
                let _ = monoio::time::timeout(grace, poll_fn(|cx| conn.poll_closed(cx))).await;
                break;
            }
            Event::IdleCheck => {
                let idle = state.open_streams.get() == 0
                    && state.last_active.get().elapsed() >= settings.keep_alive_timeout;
                if idle {
                    conn.graceful_shutdown();
                    let _ =
                        monoio::time::timeout(CLOSE_TIMEOUT, poll_fn(|cx| conn.poll_closed(cx)))
                            .await;
                    break;
                }
            }
        }
    }
}
