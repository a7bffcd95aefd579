//! HTTP/2 through the edge: curl and h2load as clients, large bodies with bounded memory, and
//! a raw-frame client that floods the edge while a legitimate client keeps being served.

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    sync::Arc,
    thread,
    time::Duration,
};

use common::{curl, routes_yaml, Backend, Edge};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned,
};

const GOAWAY: u8 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Returns the ring provider, because the edge uses ring and aws-lc-rs would need a C build.
#[allow(deprecated)]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn h2_edge(name: &str, backend: &Backend) -> Edge {
    let routes = routes_yaml(&[("app", "Host(`a.test`)", &backend.url())]);
    // One worker, so the flooding and the legitimate client share it.
    Edge::start(name, &routes, &["--workers", "1"])
}

fn url(edge: &Edge, path: &str) -> (String, String) {
    (
        format!("https://a.test:{}{path}", edge.https.port()),
        format!("a.test:{}:127.0.0.1", edge.https.port()),
    )
}

#[test]
fn curl_gets_200_over_h2() {
    let backend = Backend::start("app");
    let edge = h2_edge("h2-curl", &backend);
    let (target, resolve) = url(&edge, "/x?y=1");
    let (code, out) = curl(&["-k", "--http2", "-i", "--resolve", &resolve, &target]);
    assert_eq!(code, 0);
    assert!(out.starts_with("HTTP/2 200"), "response: {out}");
    assert!(out.ends_with("app /x?y=1 0"), "response: {out}");
    let seen = backend.last_request();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        seen.header("host"),
        Some(&*format!("a.test:{}", edge.https.port()))
    );

    // ALPN keeps HTTP/1.1 for clients that do not offer h2.
    let (code, out) = curl(&["-k", "--http1.1", "-i", "--resolve", &resolve, &target]);
    assert_eq!(code, 0);
    assert!(out.starts_with("HTTP/1.1 200"), "response: {out}");

    edge.expect_metric("edge_requests_total{route=\"app\",code=\"2xx\",protocol=\"h2\"} 1\n");
    edge.expect_metric("edge_requests_total{route=\"app\",code=\"2xx\",protocol=\"http/1.1\"} 1\n");
    let mut protocols = Vec::new();
    for _ in 0..100 {
        protocols = edge
            .access
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("/x?y=1"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["protocol"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>();
        if protocols.len() == 2 {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(protocols, ["h2", "http/1.1"]);
}

#[test]
fn chunked_trailers_reach_h2_client() {
    let backend = Backend::start("app");
    let edge = h2_edge("h2-trailers", &backend);
    let (target, resolve) = url(&edge, "/chunked");
    let (code, out) = curl(&["-k", "--http2", "-i", "--resolve", &resolve, &target]);
    assert_eq!(code, 0);
    assert!(out.contains("hello world"), "response: {out}");
    assert!(out.contains("x-checksum: 42"), "response: {out}");
}

#[test]
fn request_body_and_cookies_forwarded() {
    let backend = Backend::start("app");
    let edge = h2_edge("h2-body", &backend);
    let (target, resolve) = url(&edge, "/upload");
    let (code, out) = curl(&[
        "-k",
        "--http2",
        "--resolve",
        &resolve,
        "-H",
        "Cookie: a=1",
        "-H",
        "Cookie: b=2",
        "--data-binary",
        "twelve bytes",
        &target,
    ]);
    assert_eq!(code, 0);
    assert_eq!(out, "app /upload 12");
    let seen = backend.last_request();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.header_count("cookie"), 1);
    assert_eq!(seen.header("cookie"), Some("a=1; b=2"));
}

#[test]
fn settings_advertise_limits() {
    let backend = Backend::start("app");
    let edge = h2_edge("h2-settings", &backend);
    let mut client = RawClient::connect(edge.https);
    let outcome = client.read_until(|o| !o.settings.is_empty());
    let setting = |id: u16| {
        outcome
            .settings
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| *v)
    };
    // SETTINGS_MAX_CONCURRENT_STREAMS and SETTINGS_MAX_HEADER_LIST_SIZE.
    assert_eq!(setting(0x3), Some(100));
    assert_eq!(setting(0x6), Some(64 * 1024));
    // SETTINGS_ENABLE_CONNECT_PROTOCOL, for WebSocket over HTTP/2.
    assert_eq!(setting(0x8), Some(1));
}

#[test]
fn oversized_headers_refused_connection_kept() {
    let backend = Backend::start("app");
    let edge = h2_edge("h2-header-limit", &backend);
    let mut client = RawClient::connect(edge.https);

    // A 70 KB header list, over the 64 KiB limit, in a HEADERS and four CONTINUATION frames.
    let mut block = get_block("a.test", "/too-big");
    block.extend(literal_header(b"x-big", &vec![b'v'; 70_000]));
    let pieces: Vec<&[u8]> = block.chunks(16_000).collect();
    let mut frames = frame(0x1, 0x1, 1, pieces[0]);
    for (i, piece) in pieces.iter().enumerate().skip(1) {
        let end_headers = if i == pieces.len() - 1 { 0x4 } else { 0 };
        frames.extend(frame(0x9, end_headers, 1, piece));
    }
    // A normal request on the same connection afterwards.
    frames.extend(headers_frame(3, &get_block("a.test", "/after"), true));
    client.send(&frames);

    let outcome = client.read_until(|o| o.answered.contains(&3) || o.goaway.is_some());
    assert_eq!(outcome.goaway, None);
    assert!(
        outcome.answered.contains(&1) || outcome.reset_streams.contains(&1),
        "the oversized request was neither answered nor reset"
    );
    assert!(outcome.answered.contains(&3));
    let paths: Vec<String> = backend
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(paths, ["/after"]);
}

#[test]
fn large_bodies_stream_with_bounded_memory() {
    const SIZE: usize = 64 << 20;
    let backend = Backend::start("app");
    let edge = h2_edge("h2-large", &backend);
    let upload = edge.dir.join("upload.bin");
    std::fs::write(&upload, vec![b'u'; SIZE]).unwrap();
    let before_kib = edge.rss_kib();

    let (target, resolve) = url(&edge, "/upload");
    let data = format!("@{}", upload.display());
    let (code, out) = curl(&[
        "-k",
        "--http2",
        "--resolve",
        &resolve,
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &data,
        &target,
    ]);
    assert_eq!(code, 0);
    assert_eq!(out, format!("app /upload {SIZE}"));

    let (target, _) = url(&edge, &format!("/bytes/{SIZE}"));
    let (code, out) = curl(&[
        "-k",
        "--http2",
        "--resolve",
        &resolve,
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &target,
    ]);
    assert_eq!(code, 0);
    assert_eq!(out, SIZE.to_string());

    // Streaming keeps a few windows and buffers; buffering either body whole would add 64 MiB.
    let growth_kib = edge.peak_rss_kib().saturating_sub(before_kib);
    assert!(growth_kib < 24 * 1024, "memory grew by {growth_kib} KiB");
}

#[test]
fn h2load_requests_all_succeed() {
    let backend = Backend::start("app");
    let edge = h2_edge("h2-h2load", &backend);
    let output = Command::new("h2load")
        .args([
            "-n",
            "2000",
            "-c",
            "4",
            "-m",
            "10",
            "-H",
            ":authority: a.test",
        ])
        .arg(format!("https://127.0.0.1:{}/load", edge.https.port()))
        .output()
        .expect("h2load must be installed (Debian package nghttp2-client)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("2000 succeeded, 0 failed"), "h2load: {text}");
    assert!(text.contains("status codes: 2000 2xx"), "h2load: {text}");
}

#[test]
fn rapid_reset_closed_while_others_served() {
    let backend = Backend::start("app");
    let edge = h2_edge("h2-rapid-reset", &backend);
    let legit = LegitClient::start(&edge, &backend);
    let mut attacker = RawClient::connect(edge.https);
    let mut frames = Vec::new();
    for i in 0..2000u32 {
        let stream = 2 * i + 1;
        frames.extend(headers_frame(stream, &get_block("a.test", "/reset"), true));
        frames.extend(frame(0x3, 0, stream, &8u32.to_be_bytes()));
    }
    attacker.send(&frames);
    assert_eq!(attacker.goaway_code(), Some(ENHANCE_YOUR_CALM));
    legit.expect_all_ok();
    // Far fewer requests reached the backend than the attacker opened.
    assert!(
        backend.request_count() < 1000,
        "backend saw {}",
        backend.request_count()
    );
    edge.expect_metric("edge_h2_abusive_connections_total 1\n");
}

#[test]
fn continuation_floods_closed_while_others_served() {
    let backend = Backend::start("app");
    let edge = h2_edge("h2-continuation", &backend);
    let legit = LegitClient::start(&edge, &backend);

    // Zero-length CONTINUATION frames that never end the header block.
    let mut attacker = RawClient::connect(edge.https);
    let mut frames = headers_frame(1, &get_block("a.test", "/"), false);
    for _ in 0..5000 {
        frames.extend(frame(0x9, 0, 1, &[]));
    }
    attacker.send(&frames);
    assert_eq!(attacker.goaway_code(), Some(ENHANCE_YOUR_CALM));

    // CONTINUATION frames that each carry a header, past the header list limit.
    let mut attacker = RawClient::connect(edge.https);
    let mut frames = headers_frame(1, &get_block("a.test", "/"), false);
    for i in 0..2000 {
        let block = literal_header(format!("x-pad-{i}").as_bytes(), &[b'p'; 100]);
        frames.extend(frame(0x9, 0, 1, &block));
    }
    attacker.send(&frames);
    let outcome = attacker.read_until_closed();
    assert!(
        outcome.goaway.is_some(),
        "no GOAWAY after a CONTINUATION flood: answered {:?}, resets {:?}",
        outcome.answered,
        outcome.reset_streams
    );
    legit.expect_all_ok();
    edge.expect_metric("edge_h2_abusive_connections_total 2\n");
}

#[test]
fn hpack_bomb_rejected_while_others_served() {
    let backend = Backend::start("app");
    let edge = h2_edge("h2-hpack-bomb", &backend);
    let legit = LegitClient::start(&edge, &backend);
    let mut attacker = RawClient::connect(edge.https);
    // Stream 1 puts a 4 KiB header into the dynamic table. Stream 3 refers to it 16,000
    // times in a 16 KB block, which decodes to 64 MiB of headers.
    let mut block = get_block("a.test", "/");
    block.push(0x40);
    block.extend(hpack_string(b"x-bomb"));
    block.extend(hpack_string(&[b'b'; 4000]));
    let mut frames = headers_frame(1, &block, true);
    let mut bomb = get_block("a.test", "/");
    bomb.extend(std::iter::repeat_n(0xbe, 16_000));
    frames.extend(headers_frame(3, &bomb, true));
    attacker.send(&frames);
    let outcome = attacker.read_until(|o| o.goaway.is_some() || o.answered.contains(&3));
    assert!(
        outcome.goaway.is_some() || outcome.answered.contains(&3),
        "the bomb got neither GOAWAY nor an answer"
    );
    // The response, if any, came from the edge: no request with the expanded headers was sent.
    let expanded = backend
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.header_count("x-bomb"))
        .max()
        .unwrap_or(0);
    assert!(
        expanded <= 1,
        "the backend received {expanded} x-bomb headers"
    );
    legit.expect_all_ok();
}

#[test]
fn ping_and_settings_floods_closed() {
    let backend = Backend::start("app");
    let edge = h2_edge("h2-ping-flood", &backend);
    let legit = LegitClient::start(&edge, &backend);
    for (kind, payload) in [(0x6u8, vec![0u8; 8]), (0x4u8, Vec::new())] {
        let mut attacker = RawClient::connect(edge.https);
        let mut frames = Vec::new();
        for _ in 0..5000 {
            frames.extend(frame(kind, 0, 0, &payload));
        }
        attacker.send(&frames);
        assert_eq!(
            attacker.goaway_code(),
            Some(ENHANCE_YOUR_CALM),
            "frame type {kind}"
        );
    }
    legit.expect_all_ok();
    edge.expect_metric("edge_h2_abusive_connections_total 2\n");
}

#[test]
fn slow_reader_holds_bounded_memory() {
    const STREAMS: u32 = 50;
    let backend = Backend::start("app");
    let edge = h2_edge("h2-slow-reader", &backend);
    let before_kib = edge.rss_kib();
    let legit = LegitClient::start(&edge, &backend);

    // Requests for 8 MiB each from a client that never reads: without flow control the edge
    // would buffer 400 MiB for it.
    let mut reader = RawClient::connect(edge.https);
    let mut frames = Vec::new();
    for i in 0..STREAMS {
        frames.extend(headers_frame(
            2 * i + 1,
            &get_block("a.test", "/bytes/8388608"),
            true,
        ));
    }
    reader.send(&frames);
    let forwarded = || {
        let requests = backend.requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| r.path.starts_with("/bytes/"))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while forwarded() < STREAMS as usize && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(forwarded(), STREAMS as usize);
    legit.expect_all_ok();
    let growth_kib = edge.peak_rss_kib().saturating_sub(before_kib);
    assert!(growth_kib < 32 * 1024, "memory grew by {growth_kib} KiB");
    drop(reader);
}

/// A legitimate client: curl fetching many URLs over one HTTP/2 connection while a test
/// floods the same worker.
struct LegitClient {
    handle: thread::JoinHandle<(i32, String)>,
}

impl LegitClient {
    const REQUESTS: usize = 300;

    /// Starts the client and returns once its first requests have reached the backend, so
    /// the flood that follows overlaps with its traffic.
    fn start(edge: &Edge, backend: &Backend) -> Self {
        let (target, resolve) = url(edge, "/legit");
        let handle = thread::spawn(move || {
            let mut args: Vec<String> = ["-k", "--http2", "--resolve", &resolve]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(["-w".into(), "%{http_code}\\n".into()]);
            // Spread the requests over the attack with a small rate limit.
            args.extend(["--rate".into(), "200/s".into()]);
            for _ in 0..Self::REQUESTS {
                args.extend(["-o".into(), "/dev/null".into(), target.clone()]);
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&refs)
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while backend.request_count() < 20 && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        Self { handle }
    }

    fn expect_all_ok(self) {
        let (code, out) = self.handle.join().unwrap();
        assert_eq!(code, 0, "legitimate client failed: {out}");
        let statuses: Vec<&str> = out.lines().collect();
        assert_eq!(statuses.len(), Self::REQUESTS);
        assert!(statuses.iter().all(|s| *s == "200"), "statuses: {out}");
    }
}

/// What a raw client saw before the connection closed.
#[derive(Default)]
struct Outcome {
    goaway: Option<u32>,
    /// Streams the server sent HEADERS on.
    answered: Vec<u32>,
    /// Identifiers and values of the server's SETTINGS frames that are not acknowledgements.
    settings: Vec<(u16, u32)>,
    reset_streams: Vec<u32>,
}

/// A client that writes HTTP/2 frames byte by byte over TLS.
struct RawClient {
    tls: StreamOwned<ClientConnection, TcpStream>,
    /// Received bytes not yet parsed into frames.
    pending: Vec<u8>,
    outcome: Outcome,
}

impl RawClient {
    fn connect(addr: SocketAddr) -> Self {
        let mut config = ClientConfig::builder_with_provider(Arc::new(ring_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from("a.test").unwrap();
        let conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = StreamOwned::new(conn, tcp);
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        tls.write_all(&frame(0x4, 0, 0, &[])).unwrap();
        tls.flush().unwrap();
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"h2"[..]));
        Self {
            tls,
            pending: Vec::new(),
            outcome: Outcome::default(),
        }
    }

    /// Sends `bytes` without reading, stopping early when the server closes. The GOAWAY
    /// must survive this: the edge keeps reading for a while before it closes the socket.
    fn send(&mut self, bytes: &[u8]) {
        for piece in bytes.chunks(16 * 1024) {
            if self.tls.write_all(piece).is_err() || self.tls.flush().is_err() {
                return;
            }
        }
    }

    fn goaway_code(&mut self) -> Option<u32> {
        self.read_until_closed().goaway
    }

    /// Reads frames until the server closes the connection (or the read times out).
    fn read_until_closed(&mut self) -> Outcome {
        self.read_until(|_| false)
    }

    /// Reads frames until `done` holds for what was seen or the connection closes.
    fn read_until(&mut self, done: impl Fn(&Outcome) -> bool) -> Outcome {
        while !done(&self.outcome) && !self.read_frames() {}
        std::mem::take(&mut self.outcome)
    }

    /// Reads once and records complete frames. Returns true when the connection is closed,
    /// failed or timed out.
    fn read_frames(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        let closed = match self.tls.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                false
            }
            Err(_) => true,
        };
        let data = &mut self.pending;
        let outcome = &mut self.outcome;
        while data.len() >= 9 {
            let len =
                (usize::from(data[0]) << 16) | (usize::from(data[1]) << 8) | usize::from(data[2]);
            if data.len() < 9 + len {
                break;
            }
            let kind = data[3];
            let stream = u32::from_be_bytes([data[5], data[6], data[7], data[8]]) & 0x7fff_ffff;
            let payload = &data[9..9 + len];
            match kind {
                GOAWAY if payload.len() >= 8 => {
                    outcome.goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
                0x1 => outcome.answered.push(stream),
                0x4 if data[4] & 0x1 == 0 => {
                    for pair in payload.chunks_exact(6) {
                        let id = u16::from_be_bytes([pair[0], pair[1]]);
                        let value = u32::from_be_bytes([pair[2], pair[3], pair[4], pair[5]]);
                        outcome.settings.push((id, value));
                    }
                }
                0x3 => outcome.reset_streams.push(stream),
                _ => {}
            }
            data.drain(..9 + len);
        }
        closed
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Encodes a HEADERS frame with END_STREAM, and END_HEADERS when `end_headers` is set.
fn headers_frame(stream: u32, block: &[u8], end_headers: bool) -> Vec<u8> {
    let flags = 0x1 | if end_headers { 0x4 } else { 0 };
    frame(0x1, flags, stream, block)
}

/// Encodes an HPACK block for `GET https://HOST/PATH`, without Huffman coding.
fn get_block(host: &str, path: &str) -> Vec<u8> {
    // :method GET (static index 2), :scheme https (index 7).
    let mut block = vec![0x82, 0x87];
    // :path (index 4) and :authority (index 1), literal without indexing.
    block.push(0x04);
    block.extend(hpack_string(path.as_bytes()));
    block.push(0x01);
    block.extend(hpack_string(host.as_bytes()));
    block
}

fn literal_header(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut block = vec![0x00];
    block.extend(hpack_string(name));
    block.extend(hpack_string(value));
    block
}

/// Encodes an HPACK string literal with a 7-bit prefix length (RFC 7541 section 5.1).
fn hpack_string(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let len = value.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        let mut rest = len - 127;
        while rest >= 128 {
            out.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        out.push(rest as u8);
    }
    out.extend_from_slice(value);
    out
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
