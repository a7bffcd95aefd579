//! The server side TLS stream: rustls' `ServerConnection` over a monoio `TcpStream`, holding
//! no IO buffer while the connection waits for the peer.
//!
//! monoio's owned-buffer reads keep their buffer for as long as they wait, so a stream
//! built on them keeps memory allocated on every idle connection. This stream waits for
//! readiness instead, with `TcpStream::readable` (a PollAdd on io_uring, epoll readiness on
//! the legacy driver). Only then does it read, into a buffer borrowed from the worker's pool
//! ([`crate::io::pool`]) that goes back as soon as rustls has taken the bytes. Writes copy
//! rustls' outgoing records into a pooled buffer for one write. Both go through monoio, so
//! on io_uring they cost no syscall of their own.
//!
//! What an idle connection keeps is rustls' own state: the keys and a 4 KiB record buffer
//! (rustls 0.23 shrinks its deframer buffer to 4 KiB whenever it has no partial record).
//!
//! A read or write cancelled while its IO is in flight loses those bytes, so the caller must
//! close the connection then, as with any monoio owned-buffer IO. Waiting for readiness
//! ([`TlsStream::wait_readable`] before any byte arrived) is cancel safe.

use std::{
    io::{self, BufRead, Read, Write},
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
};

use monoio::{
    buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut, RawBuf},
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split},
    net::TcpStream,
    BufResult,
};
use rustls::{ServerConfig, ServerConnection};

use crate::io::pool;

/// A TLS connection accepted by the edge.
pub struct TlsStream {
    io: TcpStream,
    conn: ServerConnection,
    /// Ciphertext received but not yet taken by rustls, with the offset of its first byte.
    /// `None` whenever rustls has taken everything, so the buffer is back in the pool.
    pending: Option<(Vec<u8>, usize)>,
    /// The last `recv` filled the whole buffer, so more bytes may be queued in the socket:
    /// receive again before waiting for readiness.
    maybe_more: bool,
}

// SAFETY: monoio's split halves share one `TlsStream` on one thread. Every method runs the
// rustls state machine only between awaits and keeps no borrow of `conn` or `pending`
// across one, so the read half and the write half interleave but never overlap.
unsafe impl Split for TlsStream {}

/// Performs the server side TLS handshake on `io`.
///
/// # Errors
/// A socket error, a TLS error (sent to the peer as an alert first, when possible), or
/// `UnexpectedEof` if the peer closes during the handshake.
pub async fn accept(io: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let mut stream = TlsStream {
        io,
        conn,
        pending: None,
        maybe_more: false,
    };
    while stream.conn.is_handshaking() {
        stream.flush_tls().await?;
        if !stream.conn.is_handshaking() {
            break;
        }
        if !stream.receive_tls().await? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection during the TLS handshake",
            ));
        }
    }
    // Session tickets and the last handshake flight.
    stream.flush_tls().await?;
    Ok(stream)
}

impl TlsStream {
    /// Returns the protocol chosen by ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Waits until decrypted bytes are ready to read, or the peer closed. Holds no buffer
    /// while it waits.
    ///
    /// # Errors
    /// A socket or TLS error.
    ///
    /// # Cancel safety
    /// Cancel safe while it waits for readiness. A cancel during the read that follows
    /// readiness loses the bytes of that read.
    pub async fn wait_readable(&mut self) -> io::Result<()> {
        loop {
            match self.conn.reader().fill_buf() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The read that follows reports it.
                Err(_) => return Ok(()),
            }
            if !self.receive_tls().await? {
                return Ok(());
            }
        }
    }

    /// Hands ciphertext to rustls: the pending rest of the last `recv`, or new bytes from the
    /// socket. Returns `false` at the end of the TCP stream.
    async fn receive_tls(&mut self) -> io::Result<bool> {
        loop {
            if self.pending.is_some() {
                self.feed_pending()?;
                return Ok(true);
            }
            if !self.maybe_more {
                self.shrink_record_buffer();
                self.io.readable(false).await?;
            }
            // The socket is readable, so this read completes at once. It goes through
            // monoio (an io_uring read, batched with the worker's other submissions) because
            // a recv(2) of our own would cost a syscall per request.
            let (result, buf) = self.io.read(pool::take()).await;
            match result {
                Ok(0) => {
                    pool::give(buf);
                    // An empty read marks the end of the stream for rustls, so a missing
                    // close_notify turns into an `UnexpectedEof` from the reader.
                    let _ = self.conn.read_tls(&mut io::empty());
                    self.process_packets()?;
                    return Ok(false);
                }
                Ok(n) => {
                    self.maybe_more = n == buf.capacity();
                    self.pending = Some((buf, 0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pool::give(buf);
                    self.maybe_more = false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => pool::give(buf),
                Err(e) => {
                    pool::give(buf);
                    return Err(e);
                }
            }
        }
    }

    /// Gives rustls as much of `pending` as it takes and processes the complete records.
    fn feed_pending(&mut self) -> io::Result<()> {
        let Some((buf, mut start)) = self.pending.take() else {
            return Ok(());
        };
        let mut plaintext_ready = false;
        // rustls takes at most 4 KiB per call and refuses more while its plaintext buffer is
        // full, so feed it in rounds, decrypting after each.
        while start < buf.len() {
            let mut rest = &buf[start..];
            match self.conn.read_tls(&mut rest) {
                // After close_notify rustls takes nothing more, so the rest is dropped.
                Ok(0) => start = buf.len(),
                Ok(n) => start += n,
                // The plaintext buffer is full: the rest waits for the application to read.
                Err(_) if plaintext_ready => break,
                Err(e) => {
                    pool::give(buf);
                    return Err(e);
                }
            }
            match self.conn.process_new_packets() {
                Ok(state) => plaintext_ready = state.plaintext_bytes_to_read() > 0,
                Err(e) => {
                    pool::give(buf);
                    self.send_alert();
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
        }
        if start < buf.len() {
            self.pending = Some((buf, start));
        } else {
            pool::give(buf);
        }
        Ok(())
    }

    fn process_packets(&mut self) -> io::Result<()> {
        match self.conn.process_new_packets() {
            Ok(_) => Ok(()),
            Err(e) => {
                self.send_alert();
                Err(io::Error::new(io::ErrorKind::InvalidData, e))
            }
        }
    }

    /// Sends a queued alert without waiting, before the connection is dropped for a TLS error.
    fn send_alert(&mut self) {
        let mut socket = SocketWriter(self.io.as_raw_fd());
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut socket).is_err() {
                break;
            }
        }
    }

    /// Lets rustls shrink its record buffer back to 4 KiB before an idle wait: rustls resizes
    /// it at the start of each `read_tls`, and a reader that would block brings no bytes.
    fn shrink_record_buffer(&mut self) {
        let _ = self.conn.read_tls(&mut WouldBlockReader);
    }

    /// Sends every encrypted byte rustls has queued: copied into a buffer from the worker's
    /// pool and written with one owned-buffer write, which monoio batches into its io_uring
    /// submissions, where a `sendmsg(2)` per response would cost a syscall of its own.
    ///
    /// # Cancel safety
    /// Not cancel safe: bytes of a cancelled write are lost, so the caller must close.
    async fn flush_tls(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            let mut buf = pool::take();
            while self.conn.wants_write() && buf.len() < pool::BUFFER_BYTES {
                self.conn.write_tls(&mut buf)?;
            }
            let (written, buf) = self.io.write_all(buf).await;
            pool::give(buf);
            written?;
        }
        Ok(())
    }

    /// Encrypts `data` and sends it. Returns how much of `data` was taken.
    async fn write_slice(&mut self, data: &[u8]) -> io::Result<usize> {
        // Earlier records first, so rustls' outgoing buffer limit never stops this write.
        self.flush_tls().await?;
        let n = self.conn.writer().write(data)?;
        self.flush_tls().await?;
        Ok(n)
    }
}

impl AsyncReadRent for TlsStream {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        let capacity = buf.bytes_total();
        loop {
            match self.conn.reader().fill_buf() {
                Ok(plaintext) => {
                    let n = plaintext.len().min(capacity);
                    // SAFETY: `write_ptr` points at `capacity` writable bytes of `buf`, and
                    // `plaintext` is rustls' own buffer, so the ranges do not overlap.
                    unsafe {
                        std::ptr::copy_nonoverlapping(plaintext.as_ptr(), buf.write_ptr(), n);
                        buf.set_init(n);
                    }
                    self.conn.reader().consume(n);
                    return (Ok(n), buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return (Err(e), buf),
            }
            match self.receive_tls().await {
                Ok(_) => {}
                Err(e) => return (Err(e), buf),
            }
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer borrows the first iovec of `buf`, which outlives the read.
        let n = match unsafe { RawBuf::new_from_iovec_mut(&mut buf) } {
            Some(raw) => self.read(raw).await.0,
            None => Ok(0),
        };
        if let Ok(n) = n {
            // SAFETY: `n` bytes of the first iovec were written by the read above.
            unsafe { buf.set_init(n) };
        }
        (n, buf)
    }
}

impl AsyncWriteRent for TlsStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: `read_ptr` points at `bytes_init` initialized bytes that `buf` owns until
        // it is returned below.
        let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let result = self.write_slice(data).await;
        (result, buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer borrows the first iovec of `buf`, which outlives the write.
        let result = match unsafe { RawBuf::new_from_iovec(&buf) } {
            Some(raw) => self.write(raw).await.0,
            None => Ok(0),
        };
        (result, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.flush_tls().await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.conn.send_close_notify();
        self.flush_tls().await?;
        self.io.shutdown().await
    }
}

/// Sends on a socket without blocking: `WouldBlock` when its buffer is full.
struct SocketWriter(RawFd);

impl Write for SocketWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(data)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: a zeroed msghdr is valid; the iovec array is `bufs`, which `IoSlice`
        // guarantees to be ABI compatible with `struct iovec`, and it outlives the call.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
            libc::sendmsg(self.0, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader with no bytes yet.
struct WouldBlockReader;

impl Read for WouldBlockReader {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpStream as StdTcpStream,
        sync::Arc,
        thread::JoinHandle,
        time::Duration,
    };

    use monoio::{
        io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt},
        net::TcpListener,
        IoUringDriver, LegacyDriver, RuntimeBuilder,
    };
    use rustls::{pki_types::ServerName, ClientConfig, ClientConnection, ServerConfig};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    use super::{accept, TlsStream};
    use crate::io::{pool, ReadBuf};

    /// Returns a server and a client configuration. The client trusts the server's
    /// self-signed certificate.
    fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key_pair)
            .unwrap();
        let cert_der: CertificateDer<'static> = cert.der().clone();
        let key_der = PrivateKeyDer::try_from(key_pair.serialize_der()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key_der)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// Runs `test` on a runtime of each driver this kernel offers.
    fn on_each_driver<F, Fut>(test: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        if let Ok(mut runtime) = RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .build()
        {
            runtime.block_on(test());
        }
        let mut runtime = RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        runtime.block_on(test());
    }

    /// Starts `client` on a thread with a TLS client connection to `port` whose handshake is
    /// done, and accepts that connection on `listener`.
    async fn connect<C>(
        listener: &TcpListener,
        client_config: Arc<ClientConfig>,
        server_config: Arc<ServerConfig>,
        client: C,
    ) -> (TlsStream, JoinHandle<()>)
    where
        C: FnOnce(rustls::StreamOwned<ClientConnection, StdTcpStream>) + Send + 'static,
    {
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            let socket = StdTcpStream::connect(("127.0.0.1", port)).unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let mut conn = ClientConnection::new(client_config, name).unwrap();
            let mut socket = socket;
            while conn.is_handshaking() {
                conn.complete_io(&mut socket).unwrap();
            }
            client(rustls::StreamOwned::new(conn, socket));
        });
        let (socket, _) = listener.accept().await.unwrap();
        let stream = accept(socket, server_config).await.unwrap();
        (stream, thread)
    }

    /// Waits for a client thread without blocking the runtime, which may still have to
    /// submit the close of a dropped socket (io_uring closes asynchronously).
    async fn join<T>(thread: JoinHandle<T>) -> T {
        while !thread.is_finished() {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
        thread.join().unwrap()
    }

    fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").unwrap()
    }

    /// Reads from `stream` until `len` bytes have arrived or it ends.
    async fn read_len(stream: &mut TlsStream, len: usize) -> Vec<u8> {
        let mut buf = ReadBuf::with_capacity(16 * 1024);
        let mut out = Vec::new();
        while out.len() < len {
            let n = buf.read_from(stream, 16 * 1024).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(buf.data());
            let all = buf.len();
            buf.consume(all);
        }
        out
    }

    #[test]
    fn echo_then_idle_holds_no_buffer() {
        on_each_driver(|| async {
            let (server_config, client_config) = configs();
            let listener = listener();
            let (mut stream, client) =
                connect(&listener, client_config, server_config, |mut tls| {
                    tls.write_all(b"ping").unwrap();
                    let mut reply = [0u8; 4];
                    tls.read_exact(&mut reply).unwrap();
                    assert_eq!(&reply, b"pong");
                    // Stay idle while the server checks its buffers, then send a last message.
                    std::thread::sleep(Duration::from_millis(200));
                    tls.write_all(b"bye").unwrap();
                    tls.conn.send_close_notify();
                    tls.flush().unwrap();
                })
                .await;
            assert_eq!(read_len(&mut stream, 4).await, b"ping");
            let (written, _) = stream.write_all(&b"pong"[..]).await;
            written.unwrap();

            let lent_while_active = pool::lent();
            let waiting = monoio::spawn(async move {
                stream.wait_readable().await.unwrap();
                stream
            });
            // Let the waiting task reach its readiness wait.
            monoio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(lent_while_active, 0, "buffers lent after a drained read");
            assert_eq!(pool::lent(), 0, "buffers lent while idle");
            let mut stream = waiting.await;
            assert!(stream.pending.is_none());

            assert_eq!(read_len(&mut stream, 3).await, b"bye");
            assert!(
                read_len(&mut stream, 1).await.is_empty(),
                "close_notify is EOF"
            );
            join(client).await;
            assert_eq!(pool::lent(), 0);
        });
    }

    #[test]
    fn half_record_then_rest() {
        on_each_driver(|| async {
            let (server_config, client_config) = configs();
            let listener = listener();
            let (mut stream, client) =
                connect(&listener, client_config, server_config, |mut tls| {
                    tls.conn.writer().write_all(b"split record").unwrap();
                    let mut record = Vec::new();
                    tls.conn.write_tls(&mut record).unwrap();
                    let half = record.len() / 2;
                    tls.sock.write_all(&record[..half]).unwrap();
                    tls.sock.flush().unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                    tls.sock.write_all(&record[half..]).unwrap();
                    let mut reply = [0u8; 2];
                    tls.read_exact(&mut reply).unwrap();
                    assert_eq!(&reply, b"ok");
                })
                .await;
            assert_eq!(read_len(&mut stream, 12).await, b"split record");
            let (written, _) = stream.write_all(&b"ok"[..]).await;
            written.unwrap();
            join(client).await;
        });
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn large_bodies_both_ways() {
        const LEN: usize = 3 * 1024 * 1024 + 17;
        on_each_driver(|| async {
            let (server_config, client_config) = configs();
            let listener = listener();
            let (mut stream, client) =
                connect(&listener, client_config, server_config, |mut tls| {
                    let body = pattern(LEN);
                    tls.write_all(&body).unwrap();
                    let mut echoed = vec![0u8; LEN];
                    tls.read_exact(&mut echoed).unwrap();
                    assert!(echoed == body, "echoed body differs");
                })
                .await;
            let received = read_len(&mut stream, LEN).await;
            assert_eq!(received.len(), LEN);
            assert!(received == pattern(LEN), "received body differs");
            // Partial writes: the body goes out in pieces of uneven sizes.
            let mut sent = 0;
            for piece in received.chunks(100_003) {
                let (written, _) = stream.write_all(piece.to_vec()).await;
                written.unwrap();
                sent += piece.len();
            }
            assert_eq!(sent, LEN);
            join(client).await;
            assert_eq!(pool::lent(), 0);
        });
    }

    #[test]
    fn eof_without_close_notify_is_an_error() {
        on_each_driver(|| async {
            let (server_config, client_config) = configs();
            let listener = listener();
            let (mut stream, client) =
                connect(&listener, client_config, server_config, |mut tls| {
                    // End the TCP stream without close_notify, then drain what the server
                    // sent (its session tickets) until it closes.
                    tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut rest = Vec::new();
                    let _ = tls.sock.read_to_end(&mut rest);
                })
                .await;
            let buf = Vec::with_capacity(64);
            let (result, _) = stream.read(buf).await;
            let error = result.unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
            drop(stream);
            join(client).await;
        });
    }

    #[test]
    fn shutdown_sends_close_notify() {
        on_each_driver(|| async {
            let (server_config, client_config) = configs();
            let listener = listener();
            let (mut stream, client) =
                connect(&listener, client_config, server_config, |mut tls| {
                    let mut out = Vec::new();
                    tls.read_to_end(&mut out).unwrap();
                    assert_eq!(out, b"last words");
                })
                .await;
            let (written, _) = stream.write_all(&b"last words"[..]).await;
            written.unwrap();
            stream.shutdown().await.unwrap();
            join(client).await;
        });
    }

    #[test]
    fn malformed_client_hello_rejected() {
        on_each_driver(|| async {
            let (server_config, _) = configs();
            let listener = listener();
            let port = listener.local_addr().unwrap().port();
            let client = std::thread::spawn(move || {
                let mut socket = StdTcpStream::connect(("127.0.0.1", port)).unwrap();
                // A handshake record holding a ClientHello of one byte, which cannot parse.
                socket
                    .write_all(&[0x16, 3, 1, 0, 5, 0x01, 0, 0, 1, 0])
                    .unwrap();
                let mut reply = Vec::new();
                let _ = socket.read_to_end(&mut reply);
                reply
            });
            let (socket, _) = listener.accept().await.unwrap();
            let error = accept(socket, server_config).await.err().unwrap();
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
            let reply = join(client).await;
            // A TLS alert record: content type 21.
            assert_eq!(reply.first(), Some(&21), "reply {reply:?}");
            assert_eq!(pool::lent(), 0);
        });
    }
}
