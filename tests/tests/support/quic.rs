//! An HTTP/3 client (quinn and h3) that runs inside a network namespace the test created, and
//! can move its connection to a new UDP socket as a client behind a NAT rebinding would.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};

/// Time allowed for a handshake or one request. A request to a worker that does not know the
/// connection gets no response at all, so this bounds how long such a failure takes.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `task` on a new thread inside the network namespace `/run/netns/NS`. The sockets it
/// creates stay in that namespace. Needs root.
pub fn in_netns<T: Send + 'static>(ns: &str, task: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    let namespace = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    std::thread::spawn(move || {
        // SAFETY: setns(2) takes an open namespace file descriptor and a namespace type. It
        // moves only the calling thread, which this closure owns until it returns.
        let rc = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns failed: {}", std::io::Error::last_os_error());
        task()
    })
    .join()
    .expect("the namespace thread panicked")
}

/// Accepts any server certificate: the demo edge presents a self-signed one, and the client
/// only ever talks to the edge in the test's own namespace.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> quinn::ClientConfig {
    // The edge uses ring too; the deprecation is about post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .expect("a TLS 1.3 config suits QUIC");
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// One HTTP/3 connection. Must be used inside a tokio runtime.
pub struct H3Client {
    endpoint: quinn::Endpoint,
    send_request: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    driver: tokio::task::JoinHandle<()>,
    local_ip: IpAddr,
}

impl H3Client {
    /// Connects from a new UDP port on `local_ip` to the edge at `server`.
    pub async fn connect(local_ip: IpAddr, server: SocketAddr) -> Result<Self, String> {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::new(local_ip, 0))
            .map_err(|e| format!("cannot bind the client endpoint: {e}"))?;
        endpoint.set_default_client_config(client_config());
        let connecting = endpoint
            .connect(server, "localhost")
            .map_err(|e| format!("cannot start the handshake: {e}"))?;
        let connection = tokio::time::timeout(EXCHANGE_TIMEOUT, connecting)
            .await
            .map_err(|_| "QUIC handshake timed out".to_string())?
            .map_err(|e| format!("QUIC handshake failed: {e}"))?;
        let (mut driver, send_request) = h3::client::new(h3_quinn::Connection::new(connection))
            .await
            .map_err(|e| format!("HTTP/3 setup failed: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(Self {
            endpoint,
            send_request,
            driver,
            local_ip,
        })
    }

    /// Sends `GET PATH` and returns the response status after reading the whole body.
    pub async fn get(&mut self, path: &str) -> Result<u16, String> {
        let exchange = async {
            let request = http::Request::get(format!("https://localhost{path}"))
                .body(())
                .map_err(|e| e.to_string())?;
            let mut stream = self
                .send_request
                .send_request(request)
                .await
                .map_err(|e| format!("sending the request failed: {e}"))?;
            stream
                .finish()
                .await
                .map_err(|e| format!("finishing the request failed: {e}"))?;
            let response = stream
                .recv_response()
                .await
                .map_err(|e| format!("receiving the response failed: {e}"))?;
            while stream
                .recv_data()
                .await
                .map_err(|e| format!("receiving the body failed: {e}"))?
                .is_some()
            {}
            Ok(response.status().as_u16())
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no response within {EXCHANGE_TIMEOUT:?}"))?
    }

    /// Moves the connection to a new UDP socket on a new port, as a NAT rebinding would.
    /// Returns the new local address.
    pub fn rebind(&self) -> Result<SocketAddr, String> {
        let socket = UdpSocket::bind(SocketAddr::new(self.local_ip, 0))
            .map_err(|e| format!("cannot bind a new client socket: {e}"))?;
        let local = socket.local_addr().map_err(|e| e.to_string())?;
        self.endpoint
            .rebind(socket)
            .map_err(|e| format!("rebinding the endpoint failed: {e}"))?;
        Ok(local)
    }

    /// Closes the connection and waits briefly for the edge to learn of it.
    pub async fn close(self) {
        self.driver.abort();
        self.endpoint.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}
