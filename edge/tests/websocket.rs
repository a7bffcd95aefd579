//! WebSocket through the edge: a tungstenite client and server exchange messages over the
//! HTTP/1.1 upgrade tunnel, and the tunnel closes from either side and when idle. Over HTTP/2
//! an h2 client opens the tunnel with extended CONNECT (RFC 8441) and writes WebSocket frames
//! into the stream, which the edge relays to the same tungstenite server over HTTP/1.1.

mod common;

use std::{
    io::Cursor,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{mpsc, Arc},
    thread,
    time::Duration,
};

use bytes::Bytes;
use common::{routes_yaml, Backend, Edge};
use h2::{client::SendRequest, ext::Protocol, RecvStream, SendStream};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, SignatureScheme,
};
use tokio_rustls::TlsConnector;
use tungstenite::{
    client::client,
    handshake::server::{ErrorResponse, Request, Response},
    protocol::{
        frame::{
            coding::{CloseCode, Control, Data, OpCode},
            Frame, FrameHeader,
        },
        CloseFrame,
    },
    Message, WebSocket,
};

/// The request path for which the echo server rejects the handshake with 404.
const MISSING_PATH: &str = "/missing";

/// Starts a WebSocket server that echoes messages and closes with code 1000 when it receives
/// the text `close-me`. Returns its address and a channel that reports how each connection
/// ended.
fn echo_server() -> (SocketAddr, mpsc::Receiver<String>) {
    let (addr, endings, _) = echo_server_with_handshakes();
    (addr, endings)
}

/// The path and header fields of a handshake request the echo server received.
type HandshakeSeen = (String, Vec<(String, String)>);

/// Starts the echo server of [`echo_server`], which also selects the first subprotocol the
/// client offers and rejects the handshake for [`MISSING_PATH`] with 404. Returns its
/// address, the channel of connection endings and a channel of the handshake requests it
/// received (path and header fields).
// tungstenite's handshake callback fixes the large `ErrorResponse` error type.
#[allow(clippy::result_large_err)]
fn echo_server_with_handshakes() -> (
    SocketAddr,
    mpsc::Receiver<String>,
    mpsc::Receiver<HandshakeSeen>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let (handshake_tx, handshake_rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let tx = tx.clone();
            let handshake_tx = handshake_tx.clone();
            thread::spawn(move || {
                let callback = |request: &Request, mut response: Response| {
                    let headers = request
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                        .collect();
                    let _ = handshake_tx.send((request.uri().path().to_owned(), headers));
                    if request.uri().path() == MISSING_PATH {
                        let mut rejection = ErrorResponse::new(Some("no such socket".to_owned()));
                        *rejection.status_mut() = http::StatusCode::NOT_FOUND;
                        return Err(rejection);
                    }
                    let offered = request
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.split(',').next())
                        .map(|v| v.trim().to_owned());
                    if let Some(protocol) = offered {
                        response
                            .headers_mut()
                            .insert("sec-websocket-protocol", protocol.parse().unwrap());
                    }
                    Ok(response)
                };
                let mut ws = match tungstenite::accept_hdr(stream, callback) {
                    Ok(ws) => ws,
                    Err(e) => {
                        let _ = tx.send(format!("handshake failed: {e}"));
                        return;
                    }
                };
                let ending = loop {
                    match ws.read() {
                        Ok(Message::Text(text)) if text.as_str() == "close-me" => {
                            let _ = ws.close(Some(CloseFrame {
                                code: CloseCode::Normal,
                                reason: "server done".into(),
                            }));
                            // Read until the client's close reply ends the connection.
                            while ws.read().is_ok() {}
                            break "server closed".to_owned();
                        }
                        Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                            ws.send(message).unwrap();
                        }
                        Ok(Message::Close(frame)) => {
                            let code = frame.map(|f| u16::from(f.code)).unwrap_or(0);
                            // tungstenite queued the close reply, so flush it out.
                            let _ = ws.flush();
                            break format!("client closed {code}");
                        }
                        Ok(_) => {}
                        Err(e) => break format!("error: {e}"),
                    }
                };
                let _ = tx.send(ending);
            });
        }
    });
    (addr, rx, handshake_rx)
}

fn connect(edge: &Edge) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(edge.http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let (ws, response) = client("ws://ws.test/chat", stream).unwrap();
    assert_eq!(response.status(), 101);
    ws
}

fn ws_edge(name: &str, backend: SocketAddr, extra: &[&str]) -> Edge {
    let url = format!("http://{backend}");
    let routes = routes_yaml(&[("ws", "Host(`ws.test`)", &url)]);
    Edge::start(name, &routes, extra)
}

#[test]
fn websocket_messages_and_client_close() {
    let (backend, endings) = echo_server();
    let edge = ws_edge("ws-client-close", backend, &[]);
    let mut ws = connect(&edge);

    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    let binary = vec![7u8; 100_000];
    ws.send(Message::binary(binary.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(binary));

    ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    }))
    .unwrap();
    // The server's close reply comes back through the tunnel, then the stream ends.
    let reply = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("no close reply: {e}"),
        }
    };
    assert_eq!(reply.map(|f| f.code), Some(CloseCode::Away));
    assert!(matches!(
        ws.read(),
        Err(tungstenite::Error::ConnectionClosed)
    ));
    let ending = endings.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ending, "client closed 1001");
}

#[test]
fn websocket_server_close_reaches_client() {
    let (backend, endings) = echo_server();
    let edge = ws_edge("ws-server-close", backend, &[]);
    let mut ws = connect(&edge);

    ws.send(Message::text("close-me")).unwrap();
    let frame = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("no close frame from the server: {e}"),
        }
    };
    let frame = frame.expect("the close frame has a code");
    assert_eq!(frame.code, CloseCode::Normal);
    assert_eq!(frame.reason.as_str(), "server done");
    // tungstenite replies to the close, and the tunnel then closes from the server side.
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("unexpected error after close: {e}"),
        }
    }
    let ending = endings.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ending, "server closed");
}

#[test]
fn idle_websocket_tunnel_is_closed() {
    let (backend, endings) = echo_server();
    let edge = ws_edge("ws-idle", backend, &["--body-idle-timeout", "1s"]);
    let mut ws = connect(&edge);
    ws.send(Message::text("ping")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("ping"));

    // Nothing is sent either way: the edge closes the tunnel after the idle timeout, which
    // the client sees as the end of the stream, long before its own 15 s read timeout.
    let result = ws.read();
    assert!(
        matches!(
            result,
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake
            )) | Err(tungstenite::Error::ConnectionClosed)
        ),
        "read after idle: {result:?}"
    );
    let ending = endings.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(ending.starts_with("error"), "server saw: {ending}");
}

/// Time a test waits for one WebSocket frame or response before it fails.
const FRAME_WAIT: Duration = Duration::from_secs(10);
/// Mask the client puts on its frames: the example mask of RFC 6455 section 5.7.
const CLIENT_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Returns the ring provider, because the edge uses ring and aws-lc-rs would need a C build.
#[allow(deprecated)]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Runs `future` on a current-thread tokio runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Opens an HTTP/2 connection to the edge's HTTPS listener (TLS with ALPN `h2`) and returns
/// its request handle once the edge's SETTINGS have arrived.
async fn h2_client(edge: &Edge) -> SendRequest<Bytes> {
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(edge.https).await.unwrap();
    let name = ServerName::try_from("ws.test").unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let sender = sender.ready().await.unwrap();
    // The server's SETTINGS frame is read by the connection task after the handshake.
    for _ in 0..500 {
        if sender.is_extended_connect_protocol_enabled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sender
}

/// The client's end of a WebSocket over one HTTP/2 stream.
struct H2WebSocket {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet parsed into frames.
    pending: Vec<u8>,
}

/// Sends an extended CONNECT with `:protocol websocket` for `path`, offering the `chat` and
/// `superchat` subprotocols. Returns the response head and the stream.
async fn open_websocket(
    sender: &mut SendRequest<Bytes>,
    path: &str,
) -> (http::response::Parts, H2WebSocket) {
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://ws.test{path}"))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "chat, superchat")
        .body(())
        .unwrap();
    request
        .extensions_mut()
        .insert(Protocol::from_static("websocket"));
    let (response, send) = sender.send_request(request, false).unwrap();
    let response = tokio::time::timeout(FRAME_WAIT, response)
        .await
        .expect("no response to the extended CONNECT")
        .unwrap();
    let (head, recv) = response.into_parts();
    let socket = H2WebSocket {
        send,
        recv,
        pending: Vec::new(),
    };
    (head, socket)
}

impl H2WebSocket {
    /// Sends one masked, final frame, as a WebSocket client must (RFC 6455 section 5.3).
    fn send_frame(&mut self, mut frame: Frame) {
        frame.header_mut().mask = Some(CLIENT_MASK);
        let mut bytes = Vec::new();
        frame.format(&mut bytes).unwrap();
        self.send.send_data(Bytes::from(bytes), false).unwrap();
    }

    fn send_text(&mut self, text: &str) {
        let frame = Frame::message(text.to_owned(), OpCode::Data(Data::Text), true);
        self.send_frame(frame);
    }

    fn send_close(&mut self, code: CloseCode, reason: &str) {
        self.send_frame(Frame::close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })));
    }

    /// Ends the client's side of the stream with END_STREAM.
    fn finish(&mut self) {
        self.send.send_data(Bytes::new(), true).unwrap();
    }

    /// Reads the next frame from the server. Returns `Ok(None)` when the stream ended with
    /// END_STREAM and the error when the edge reset it.
    async fn read_frame(&mut self) -> Result<Option<(OpCode, Vec<u8>)>, h2::Error> {
        loop {
            let mut cursor = Cursor::new(&self.pending);
            if let Some((header, len)) = FrameHeader::parse(&mut cursor).unwrap() {
                let start = cursor.position() as usize;
                let end = start + len as usize;
                if self.pending.len() >= end {
                    assert_eq!(header.mask, None, "server frames are never masked");
                    let payload = self.pending[start..end].to_vec();
                    self.pending.drain(..end);
                    return Ok(Some((header.opcode, payload)));
                }
            }
            let data = tokio::time::timeout(FRAME_WAIT, self.recv.data())
                .await
                .expect("no WebSocket data in time");
            match data {
                Some(Ok(data)) => {
                    self.pending.extend_from_slice(&data);
                    let _ = self.recv.flow_control().release_capacity(data.len());
                }
                Some(Err(e)) => return Err(e),
                None => {
                    assert!(self.pending.is_empty(), "the stream ended inside a frame");
                    return Ok(None);
                }
            }
        }
    }
}

/// Returns the close code carried by a close frame's payload.
fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// Returns the value of a header field a handshake request carried.
fn field<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[test]
fn h2_websocket_echo_and_client_close() {
    let (backend, endings, handshakes) = echo_server_with_handshakes();
    let edge = ws_edge("h2-ws-client-close", backend, &[]);
    block_on(async {
        let mut sender = h2_client(&edge).await;
        // SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 from the edge.
        assert!(sender.is_extended_connect_protocol_enabled());
        let (head, mut ws) = open_websocket(&mut sender, "/chat").await;
        assert_eq!(head.status, 200);
        assert_eq!(head.headers["sec-websocket-protocol"], "chat");

        ws.send_text("hello");
        let echo = ws.read_frame().await.unwrap();
        assert_eq!(echo, Some((OpCode::Data(Data::Text), b"hello".to_vec())));
        // Larger than the stream windows (256 KiB at the edge, 64 KiB at the h2 client), so
        // flow control paces it both ways.
        let binary = vec![7u8; 300_000];
        ws.send_frame(Frame::message(
            binary.clone(),
            OpCode::Data(Data::Binary),
            true,
        ));
        let echo = ws.read_frame().await.unwrap();
        assert_eq!(echo, Some((OpCode::Data(Data::Binary), binary)));

        ws.send_close(CloseCode::Away, "bye");
        let (opcode, payload) = ws.read_frame().await.unwrap().expect("no close reply");
        assert_eq!(opcode, OpCode::Control(Control::Close));
        assert_eq!(close_code(&payload), 1001);
        // The server closed its connection after the reply, so the stream ends cleanly.
        assert_eq!(ws.read_frame().await.unwrap(), None);
        ws.finish();
    });
    let ending = endings.recv_timeout(FRAME_WAIT).unwrap();
    assert_eq!(ending, "client closed 1001");

    let (path, headers) = handshakes.recv_timeout(FRAME_WAIT).unwrap();
    assert_eq!(path, "/chat");
    let key = field(&headers, "sec-websocket-key").expect("the edge sent no key");
    assert_eq!(key.len(), 24, "a key is 16 bytes in base64: {key}");
    assert_eq!(field(&headers, "sec-websocket-version"), Some("13"));
    assert_eq!(
        field(&headers, "sec-websocket-protocol"),
        Some("chat, superchat")
    );
    assert_eq!(field(&headers, "x-forwarded-proto"), Some("https"));
    // The routes pass the client's `:authority` on as `Host`.
    assert_eq!(field(&headers, "host"), Some("ws.test"));
}

#[test]
fn h2_websocket_server_close_ends_stream() {
    let (backend, endings) = echo_server();
    let edge = ws_edge("h2-ws-server-close", backend, &[]);
    block_on(async {
        let mut sender = h2_client(&edge).await;
        let (head, mut ws) = open_websocket(&mut sender, "/chat").await;
        assert_eq!(head.status, 200);

        ws.send_text("close-me");
        let (opcode, payload) = ws.read_frame().await.unwrap().expect("no close frame");
        assert_eq!(opcode, OpCode::Control(Control::Close));
        assert_eq!(close_code(&payload), 1000);
        assert_eq!(&payload[2..], b"server done");
        ws.send_close(CloseCode::Normal, "");
        assert_eq!(ws.read_frame().await.unwrap(), None);
        ws.finish();
    });
    let ending = endings.recv_timeout(FRAME_WAIT).unwrap();
    assert_eq!(ending, "server closed");
}

#[test]
fn h2_websocket_idle_tunnel_reset() {
    let (backend, endings) = echo_server();
    let edge = ws_edge("h2-ws-idle", backend, &["--body-idle-timeout", "1s"]);
    block_on(async {
        let mut sender = h2_client(&edge).await;
        let (_, mut ws) = open_websocket(&mut sender, "/chat").await;
        ws.send_text("ping");
        let echo = ws.read_frame().await.unwrap();
        assert_eq!(echo, Some((OpCode::Data(Data::Text), b"ping".to_vec())));

        // Nothing is sent either way, so the edge ends the tunnel after the idle timeout,
        // well before the 10 s this read waits.
        let error = ws
            .read_frame()
            .await
            .expect_err("the idle stream was not reset");
        assert_eq!(error.reason(), Some(h2::Reason::CANCEL));
    });
    let ending = endings.recv_timeout(FRAME_WAIT).unwrap();
    assert!(ending.starts_with("error"), "server saw: {ending}");
}

#[test]
fn h2_websocket_client_reset_closes_backend() {
    let (backend, endings) = echo_server();
    let edge = ws_edge("h2-ws-reset", backend, &[]);
    block_on(async {
        let mut sender = h2_client(&edge).await;
        let (_, mut ws) = open_websocket(&mut sender, "/chat").await;
        ws.send_text("ping");
        let echo = ws.read_frame().await.unwrap();
        assert_eq!(echo, Some((OpCode::Data(Data::Text), b"ping".to_vec())));
        ws.send.send_reset(h2::Reason::CANCEL);
        // Keep the connection open while the edge closes the backend side.
        let ending = tokio::task::spawn_blocking(move || endings.recv_timeout(FRAME_WAIT))
            .await
            .unwrap()
            .expect("the backend connection stayed open after the reset");
        assert!(ending.starts_with("error"), "server saw: {ending}");
    });
}

#[test]
fn h2_websocket_backend_404_relayed() {
    let (backend, endings) = echo_server();
    let edge = ws_edge("h2-ws-404", backend, &[]);
    block_on(async {
        let mut sender = h2_client(&edge).await;
        let (head, mut ws) = open_websocket(&mut sender, MISSING_PATH).await;
        assert_eq!(head.status, 404);
        assert!(head.headers.get("sec-websocket-protocol").is_none());
        let mut body = Vec::new();
        while let Some(data) = ws.recv.data().await {
            body.extend_from_slice(&data.unwrap());
        }
        assert_eq!(body, b"no such socket");
    });
    let ending = endings.recv_timeout(FRAME_WAIT).unwrap();
    assert!(
        ending.starts_with("handshake failed"),
        "server saw: {ending}"
    );
}

#[test]
fn h2_websocket_wrong_accept_gets_502() {
    // The test backend's `/ws` responds with 101 without `Sec-WebSocket-Accept`.
    let backend = Backend::start("ws");
    let routes = routes_yaml(&[("ws", "Host(`ws.test`)", &backend.url())]);
    let edge = Edge::start("h2-ws-no-accept", &routes, &[]);
    block_on(async {
        let mut sender = h2_client(&edge).await;
        let (head, _ws) = open_websocket(&mut sender, "/ws").await;
        assert_eq!(head.status, 502);
    });
    let seen = backend.last_request();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, "/ws");
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(seen.header("connection"), Some("Upgrade"));
    assert_eq!(seen.header_count("sec-websocket-key"), 1);
}

#[test]
fn h2_plain_connect_gets_405() {
    let (backend, _endings) = echo_server();
    let edge = ws_edge("h2-plain-connect", backend, &[]);
    block_on(async {
        let mut sender = h2_client(&edge).await;
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("ws.test:443")
            .body(())
            .unwrap();
        let (response, _send) = sender.send_request(request, false).unwrap();
        let response = tokio::time::timeout(FRAME_WAIT, response)
            .await
            .expect("no response to the CONNECT")
            .unwrap();
        assert_eq!(response.status(), 405);
    });
}

/// Accepts any server certificate: the tests talk to their own edge on loopback.
#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ring_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
