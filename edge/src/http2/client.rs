//! HTTP/2 towards backends: one multiplexed connection per backend per worker, reused by
//! every request. The transport is plain TCP for `h2c://` servers (prior knowledge, as gRPC
//! servers expect) or TLS for `https://` servers that chose `h2` in ALPN.
//!
//! The pool belongs to one worker (`!Send`). Each connection is driven by its own task on that
//! worker. A connection that fails or is closed by the backend is replaced on the next request.

use std::{cell::RefCell, collections::HashMap, net::SocketAddr};

use bytes::Bytes;
use h2::client::SendRequest;
use monoio_compat::StreamWrapper;
use tracing::{debug, warn};

use crate::{
    forward::connect,
    metrics::UpstreamErrorKind,
    upstream_tls::{UpstreamStream, PLAIN},
    worker::WorkerCtx,
};

/// Streams the edge opens at once on one backend connection when the backend sets no lower
/// limit.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// One worker's HTTP/2 backend connections, by address and TLS settings id.
#[derive(Default)]
pub struct H2Pool {
    senders: RefCell<HashMap<(SocketAddr, u64), SendRequest<Bytes>>>,
}

impl H2Pool {
    /// Returns a handle that can open a stream to the h2c backend `addr` now: the pooled
    /// connection when it is still usable, else a new one.
    ///
    /// # Errors
    /// The kind of failure when no connection could be made or the new one failed at once.
    pub async fn sender(
        &self,
        ctx: &WorkerCtx,
        addr: SocketAddr,
        route: &str,
    ) -> Result<SendRequest<Bytes>, UpstreamErrorKind> {
        let settings = &ctx.shared.settings;
        if let Some(sender) = self.pooled(ctx, addr, PLAIN).await? {
            return Ok(sender);
        }

        let stream = match connect(addr, settings.upstream_connect_timeout).await {
            Ok(stream) => stream,
            Err((kind, message)) => {
                ctx.metrics().upstream_error(kind);
                ctx.upstreams.mark_failed(addr);
                if ctx.should_log_upstream_error() {
                    warn!(upstream = %addr, service = %route, error = %message, "connecting to the h2c backend failed");
                }
                return Err(kind);
            }
        };
        self.handshake(ctx, addr, PLAIN, UpstreamStream::Plain(stream))
            .await
    }

    /// Returns the pooled connection to `addr` with TLS settings `tls_id` once it can open a
    /// stream, or `None` when there is none or it has closed.
    ///
    /// # Errors
    /// `ResponseTimeout` when the backend's stream limit stays reached for the response
    /// timeout.
    pub async fn pooled(
        &self,
        ctx: &WorkerCtx,
        addr: SocketAddr,
        tls_id: u64,
    ) -> Result<Option<SendRequest<Bytes>>, UpstreamErrorKind> {
        let settings = &ctx.shared.settings;
        let key = (addr, tls_id);
        let Some(sender) = self.senders.borrow().get(&key).cloned() else {
            return Ok(None);
        };
        // Waits while the backend's stream limit is reached, at most the response timeout.
        match monoio::time::timeout(settings.upstream_response_timeout, sender.ready()).await {
            Ok(Ok(sender)) => Ok(Some(sender)),
            Ok(Err(e)) => {
                debug!(upstream = %addr, error = %e, "pooled HTTP/2 connection is closed");
                self.senders.borrow_mut().remove(&key);
                Ok(None)
            }
            Err(_) => {
                ctx.metrics()
                    .upstream_error(UpstreamErrorKind::ResponseTimeout);
                Err(UpstreamErrorKind::ResponseTimeout)
            }
        }
    }

    /// Starts HTTP/2 on a new connection to `addr`, drives it with a task of this worker, and
    /// pools it under `tls_id`.
    ///
    /// # Errors
    /// The kind of failure when the HTTP/2 handshake fails or times out.
    pub async fn handshake(
        &self,
        ctx: &WorkerCtx,
        addr: SocketAddr,
        tls_id: u64,
        stream: UpstreamStream,
    ) -> Result<SendRequest<Bytes>, UpstreamErrorKind> {
        let settings = &ctx.shared.settings;
        let mut builder = h2::client::Builder::new();
        builder
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
        let handshake = builder.handshake::<_, Bytes>(StreamWrapper::new(stream));
        let (sender, connection) = match monoio::time::timeout(
            settings.upstream_connect_timeout,
            handshake,
        )
        .await
        {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                debug!(upstream = %addr, error = %e, "HTTP/2 handshake with the backend failed");
                ctx.metrics().upstream_error(UpstreamErrorKind::Protocol);
                return Err(UpstreamErrorKind::Protocol);
            }
            Err(_) => {
                ctx.metrics()
                    .upstream_error(UpstreamErrorKind::ConnectTimeout);
                return Err(UpstreamErrorKind::ConnectTimeout);
            }
        };
        monoio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(upstream = %addr, error = %e, "backend HTTP/2 connection ended with an error");
            }
        });
        let sender = match sender.ready().await {
            Ok(sender) => sender,
            Err(e) => {
                debug!(upstream = %addr, error = %e, "new backend HTTP/2 connection failed");
                ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
                return Err(UpstreamErrorKind::Reset);
            }
        };
        self.senders
            .borrow_mut()
            .insert((addr, tls_id), sender.clone());
        Ok(sender)
    }

    /// Drops every pooled connection (at shutdown); their tasks end when the backends close.
    pub fn clear(&self) {
        self.senders.borrow_mut().clear();
    }
}
