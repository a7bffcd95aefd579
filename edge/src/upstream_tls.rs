//! TLS towards `https://` backends: the per-server client settings built when a snapshot is
//! compiled, and the backend stream type that the pools hold, plain TCP or TLS over TCP.
//!
//! Settings are cached across snapshots by their inputs, so an unchanged backend keeps the
//! same [`UpstreamTls::id`] and its pooled connections survive a reload. The pools key
//! connections by address and that id, so a connection verified under one set of settings is
//! never reused under another.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use edge_proto::{client_tls, ServersTransport};
use monoio::{
    buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut},
    io::{AsyncReadRent, AsyncWriteRent, Split},
    net::TcpStream,
    BufResult,
};
// NOTE: backend connections still use monoio-rustls, which keeps 32 KiB of buffers per
// connection; client connections use the buffer-pooling stream in `tls::stream`.
use monoio_rustls::{ClientTlsStream, TlsConnector};
use rustls_pki_types::ServerName;

use crate::metrics::UpstreamErrorKind;

/// Pool key part of a plain (`http://` or `h2c://`) backend.
pub const PLAIN: u64 = 0;

/// The TLS client settings of one `https://` server.
pub struct UpstreamTls {
    /// Identity of these settings, never [`PLAIN`] and never reused in the process.
    pub id: u64,
    /// Offers `h2` and `http/1.1` in ALPN, or only `http/1.1` when the transport disables
    /// HTTP/2.
    connector: TlsConnector,
    /// Offers only `http/1.1`, for WebSocket upgrades, which need an HTTP/1.1 connection.
    http1_connector: TlsConnector,
    /// The settings of `http1_connector`, for the QUIC threads' tokio connections.
    pub http1_config: Arc<rustls::ClientConfig>,
    /// Name sent in SNI and checked against the certificate.
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("id", &self.id)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The inputs of one server's TLS settings: its servers transport and its URL host.
type SettingsKey = (Option<ServersTransport>, String);

/// The settings built so far. Locked only while a snapshot is compiled.
#[derive(Default)]
pub struct UpstreamTlsCache {
    entries: Mutex<HashMap<SettingsKey, Arc<UpstreamTls>>>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(PLAIN + 1);

impl UpstreamTlsCache {
    /// Returns the settings for a server whose URL host is `host`, building them when the
    /// cache has none.
    ///
    /// # Errors
    /// The reason the settings cannot be built, such as an invalid root CA.
    pub fn get(
        &self,
        transport: Option<&ServersTransport>,
        host: &str,
    ) -> Result<Arc<UpstreamTls>, client_tls::ClientTlsError> {
        let key = (transport.cloned(), host.to_owned());
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(found) = entries.get(&key) {
            return Ok(found.clone());
        }
        let alpn = if transport.is_some_and(|t| t.disable_http2) {
            client_tls::ALPN_HTTP1
        } else {
            client_tls::ALPN_H2_AND_HTTP1
        };
        let config = client_tls::client_config(transport, alpn)?;
        let http1_config = Arc::new(client_tls::client_config(
            transport,
            client_tls::ALPN_HTTP1,
        )?);
        let built = Arc::new(UpstreamTls {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            connector: TlsConnector::from(Arc::new(config)),
            http1_connector: TlsConnector::from(http1_config.clone()),
            http1_config,
            server_name: client_tls::server_name(transport, host)?,
        });
        entries.insert(key, built.clone());
        Ok(built)
    }

    /// Drops the settings that no server of the current snapshot uses.
    pub fn retain_ids(&self, used: &[u64]) {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, tls| used.contains(&tls.id));
    }
}

/// A connection to a backend.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls {
        stream: Box<ClientTlsStream<TcpStream>>,
        /// The TCP socket under the TLS session, for the pool's liveness check.
        fd: RawFd,
    },
}

impl UpstreamStream {
    /// Returns the descriptor of the TCP socket.
    pub fn raw_fd(&self) -> RawFd {
        match self {
            UpstreamStream::Plain(stream) => stream.as_raw_fd(),
            UpstreamStream::Tls { fd, .. } => *fd,
        }
    }
}

/// Runs the TLS handshake on `stream` within `limit`. Returns the TLS stream and whether the
/// backend chose HTTP/2 in ALPN. `http1_only` offers only `http/1.1`.
///
/// # Errors
/// [`UpstreamErrorKind::Tls`] with rustls' reason (an untrusted or expired certificate, a
/// name mismatch, a failed handshake), or `ConnectTimeout`.
pub async fn handshake(
    tls: &UpstreamTls,
    stream: TcpStream,
    http1_only: bool,
    limit: Duration,
) -> Result<(UpstreamStream, bool), (UpstreamErrorKind, String)> {
    let fd = stream.as_raw_fd();
    let connector = if http1_only {
        &tls.http1_connector
    } else {
        &tls.connector
    };
    let connect = connector.connect(tls.server_name.clone(), stream);
    match monoio::time::timeout(limit, connect).await {
        Ok(Ok(stream)) => {
            let h2 = stream.alpn_protocol().as_deref() == Some(b"h2");
            let stream = UpstreamStream::Tls {
                stream: Box::new(stream),
                fd,
            };
            Ok((stream, h2))
        }
        // monoio-rustls' own message is only "io error" or "rustls error", so the cause
        // (rustls' reason, carried inside the io::Error) is logged instead.
        Ok(Err(e)) => Err((UpstreamErrorKind::Tls, io::Error::from(e).to_string())),
        Err(_) => Err((
            UpstreamErrorKind::ConnectTimeout,
            format!("no TLS handshake within {limit:?}"),
        )),
    }
}

impl AsyncReadRent for UpstreamStream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpstreamStream::Plain(stream) => stream.read(buf).await,
            UpstreamStream::Tls { stream, .. } => stream.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpstreamStream::Plain(stream) => stream.readv(buf).await,
            UpstreamStream::Tls { stream, .. } => stream.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for UpstreamStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpstreamStream::Plain(stream) => stream.write(buf).await,
            UpstreamStream::Tls { stream, .. } => stream.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpstreamStream::Plain(stream) => stream.writev(buf).await,
            UpstreamStream::Tls { stream, .. } => stream.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            UpstreamStream::Plain(stream) => stream.flush().await,
            UpstreamStream::Tls { stream, .. } => stream.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            UpstreamStream::Plain(stream) => stream.shutdown().await,
            UpstreamStream::Tls { stream, .. } => stream.shutdown().await,
        }
    }
}

// SAFETY: `Split` promises that a read half and a write half may be used at the same time.
// Both variants are `Split` themselves (monoio's `TcpStream`, and monoio-rustls' stream over a
// `Split` IO), and the enum only forwards each call to the one variant it holds.
unsafe impl Split for UpstreamStream {}
