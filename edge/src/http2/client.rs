//! HTTP/2 without TLS (h2c, prior knowledge) towards backends, as gRPC servers expect: one
//! multiplexed connection per backend address per worker, reused by every request.
//!
//! The pool belongs to one worker (`!Send`). Each connection is driven by its own task on that
//! worker. A connection that fails or is closed by the backend is replaced on the next request.

use std::{cell::RefCell, collections::HashMap, net::SocketAddr};

use bytes::Bytes;
use h2::client::SendRequest;
use monoio_compat::StreamWrapper;
use tracing::{debug, warn};

use crate::{forward::connect, metrics::UpstreamErrorKind, worker::WorkerCtx};

/// Streams the edge opens at once on one backend connection when the backend sets no lower
/// limit.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// One worker's h2c connections, by backend address.
#[derive(Default)]
pub struct H2cPool {
    senders: RefCell<HashMap<SocketAddr, SendRequest<Bytes>>>,
}

impl H2cPool {
    /// Returns a handle that can open a stream to `addr` now: the pooled connection when it
    /// is still usable, else a new one.
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
        let pooled = self.senders.borrow().get(&addr).cloned();
        if let Some(sender) = pooled {
            // Waits while the backend's stream limit is reached, at most the response timeout.
            match monoio::time::timeout(settings.upstream_response_timeout, sender.ready()).await {
                Ok(Ok(sender)) => return Ok(sender),
                Ok(Err(e)) => {
                    debug!(upstream = %addr, error = %e, "pooled h2c connection is closed");
                    self.senders.borrow_mut().remove(&addr);
                }
                Err(_) => {
                    ctx.metrics()
                        .upstream_error(UpstreamErrorKind::ResponseTimeout);
                    return Err(UpstreamErrorKind::ResponseTimeout);
                }
            }
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
        let mut builder = h2::client::Builder::new();
        builder
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
        let handshake = builder.handshake::<_, Bytes>(StreamWrapper::new(stream));
        let (sender, connection) =
            match monoio::time::timeout(settings.upstream_connect_timeout, handshake).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => {
                    debug!(upstream = %addr, error = %e, "h2c handshake failed");
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
                debug!(upstream = %addr, error = %e, "h2c connection ended with an error");
            }
        });
        let sender = match sender.ready().await {
            Ok(sender) => sender,
            Err(e) => {
                debug!(upstream = %addr, error = %e, "new h2c connection failed");
                ctx.metrics().upstream_error(UpstreamErrorKind::Reset);
                return Err(UpstreamErrorKind::Reset);
            }
        };
        self.senders.borrow_mut().insert(addr, sender.clone());
        Ok(sender)
    }

    /// Drops every pooled connection (at shutdown); their tasks end when the backends close.
    pub fn clear(&self) {
        self.senders.borrow_mut().clear();
    }
}
