//! HTTP/3 test client on quinn and h3: connects from a chosen local address, trusting one CA,
//! and sends requests with optional bodies and trailers.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Buf, Bytes};
use h3::client::{RequestStream, SendRequest};
use http::HeaderMap;
use rustls_pki_types::CertificateDer;

/// A request stream of the test client.
pub type Stream = RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// How long a test waits for one step of an exchange before it fails.
pub const STEP_LIMIT: Duration = Duration::from_secs(10);

/// Returns a quinn client endpoint bound to `bind` that trusts only `ca` and offers ALPN `h3`.
pub fn endpoint(bind: SocketAddr, ca: CertificateDer<'static>) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    // The edge uses ring too; the deprecation is about post-quantum key exchange.
    #[allow(deprecated)]
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(bind).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// What one HTTP/3 exchange returned.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/3 connection.
pub struct Client {
    send_request: SendRequest<h3_quinn::OpenStreams, Bytes>,
    driver: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects to `server` with SNI `sni` over `endpoint`.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        server: SocketAddr,
        sni: &str,
    ) -> Result<Client, String> {
        let connecting = endpoint.connect(server, sni).map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(STEP_LIMIT, connecting)
            .await
            .map_err(|_| "QUIC handshake timed out".to_string())?
            .map_err(|e| format!("QUIC handshake failed: {e}"))?;
        let (mut driver, send_request) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(Client {
            send_request,
            driver,
        })
    }

    /// Sends the head of `request` and returns its stream, leaving the body to the caller.
    pub async fn open(&mut self, request: http::Request<()>) -> Result<Stream, String> {
        self.send_request
            .send_request(request)
            .await
            .map_err(|e| format!("sending the request failed: {e}"))
    }

    /// Sends `request` with `body` and `trailers`, then reads the whole response.
    pub async fn request(
        &mut self,
        request: http::Request<()>,
        body: Option<Bytes>,
        trailers: Option<HeaderMap>,
    ) -> Result<Reply, String> {
        let mut stream = self.open(request).await?;
        if let Some(body) = body {
            stream.send_data(body).await.map_err(|e| e.to_string())?;
        }
        if let Some(trailers) = trailers {
            stream
                .send_trailers(trailers)
                .await
                .map_err(|e| e.to_string())?;
        }
        stream.finish().await.map_err(|e| e.to_string())?;
        read_reply(&mut stream).await
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Reads a response head, body and trailers from `stream`.
pub async fn read_reply(stream: &mut Stream) -> Result<Reply, String> {
    let response = tokio::time::timeout(STEP_LIMIT, stream.recv_response())
        .await
        .map_err(|_| "no response head in time".to_string())?
        .map_err(|e| format!("receiving the response failed: {e}"))?;
    let (body, trailers) = read_reply_rest(stream).await?;
    Ok(Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body,
        trailers,
    })
}

/// Reads the rest of a response body and its trailers from `stream`.
pub async fn read_reply_rest(stream: &mut Stream) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
    let mut body = Vec::new();
    loop {
        let piece = tokio::time::timeout(STEP_LIMIT, stream.recv_data())
            .await
            .map_err(|_| "no response body in time".to_string())?
            .map_err(|e| format!("receiving the body failed: {e}"))?;
        let Some(mut piece) = piece else { break };
        body.extend_from_slice(&piece.copy_to_bytes(piece.remaining()));
    }
    let trailers = tokio::time::timeout(STEP_LIMIT, stream.recv_trailers())
        .await
        .map_err(|_| "no response trailers in time".to_string())?
        .map_err(|e| format!("receiving the trailers failed: {e}"))?;
    Ok((body, trailers))
}

/// Runs `future` on a new current-thread tokio runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}
