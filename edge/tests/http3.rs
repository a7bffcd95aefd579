//! HTTP/3: a quinn + h3 client gets responses through the edge with the certificate chosen by
//! SNI, unknown hosts get 404, and HTTPS responses over TCP advertise HTTP/3 with Alt-Svc.
//! Backend connections are reused, request bodies stream before their first byte arrives, and
//! a flood of Initials from one source gets Retry packets.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use bytes::{Buf, Bytes};
use common::{
    curl,
    h3client::{self, block_on, Client},
    Backend, BackendOptions, Edge,
};

/// A test CA and leaf certificates signed by it, written as PEM files.
struct Pki {
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edge h3 test CA");
        let ca_cert = params.self_signed(&ca_key).unwrap();
        Self { ca_cert, ca_key }
    }

    /// Writes `FILE.pem` and `FILE.key` for a leaf valid for `names`, with common name `cn`.
    fn leaf(&self, dir: &Path, file: &str, cn: &str, names: &[&str]) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
    }
}

fn h3_edge(name: &str, backend: &Backend, extra: &[&str]) -> (Edge, Pki) {
    let dir = common::temp_dir(name);
    let pki = Pki::new();
    std::fs::write(dir.join("ca.pem"), pki.ca_cert.pem()).unwrap();
    pki.leaf(&dir, "a", "a-cert", &["a.test"]);
    pki.leaf(&dir, "b", "b-cert", &["b.test"]);
    let routes = format!(
        r#"
http:
  routers:
    a:
      rule: "Host(`a.test`)"
      service: app
      tls: {{}}
    b:
      rule: "Host(`b.test`)"
      service: app
      tls: {{}}
  services:
    app:
      loadBalancer:
        servers:
          - url: "{url}"
tls:
  certificates:
    - certFile: a.pem
      keyFile: a.key
    - certFile: b.pem
      keyFile: b.key
"#,
        url = backend.url()
    );
    let routes_file = dir.join("routes.yaml");
    std::fs::write(&routes_file, routes).unwrap();
    (Edge::start_with_file(dir, &routes_file, extra), pki)
}

/// What one HTTP/3 exchange returned.
struct H3Response {
    status: u16,
    body: String,
    /// Common name of the certificate the server presented.
    cert_cn: String,
}

/// Sends `GET https://AUTHORITY/PATH` over HTTP/3 to `addr` with SNI `sni`, trusting only
/// `pki`'s CA.
fn h3_get(
    addr: SocketAddr,
    pki: &Pki,
    sni: &str,
    authority: &str,
    path: &str,
) -> Result<H3Response, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_cert.der().clone()).unwrap();
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
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            endpoint.connect(addr, sni).map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|_| "QUIC handshake timed out".to_string())?
        .map_err(|e| format!("QUIC handshake failed: {e}"))?;
        let certs = conn
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .ok_or("no peer certificate")?;
        let (_, leaf) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
        let cert_cn = leaf
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_owned();

        let (mut driver, mut send_request) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .map_err(|e| e.to_string())?;
        let drive = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let request = http::Request::get(format!("https://{authority}{path}"))
            .body(())
            .unwrap();
        let mut stream = send_request
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        stream.finish().await.map_err(|e| e.to_string())?;
        let response = stream.recv_response().await.map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        drop(stream);
        drop(send_request);
        drive.abort();
        endpoint.close(0u32.into(), b"done");
        Ok(H3Response {
            status: response.status().as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
            cert_cn,
        })
    })
}

#[test]
fn h3_two_names_two_certificates() {
    let backend = Backend::start("b");
    let (edge, pki) = h3_edge("h3-sni", &backend, &[]);
    for (host, cn) in [("a.test", "a-cert"), ("b.test", "b-cert")] {
        let response = h3_get(edge.https, &pki, host, host, "/hello").unwrap();
        assert_eq!(response.status, 200, "status for {host}");
        assert_eq!(response.cert_cn, cn, "certificate for {host}");
        assert_eq!(response.body, "b /hello 0", "body for {host}");
    }
    let seen = backend.last_request();
    assert_eq!(seen.header("host"), Some("b.test"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    edge.expect_metric("edge_requests_total{route=\"a\",code=\"2xx\",protocol=\"h3\"} 1\n");
    // Two attempts stay under the default per-source limit, so no Retry is sent.
    edge.expect_metric("edge_quic_retries_total 0\n");
    let mut h3_lines = 0;
    for _ in 0..100 {
        h3_lines = edge
            .access
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("\"protocol\":\"h3\"") && l.contains("/hello"))
            .count();
        if h3_lines == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(h3_lines, 2, "one access log line per HTTP/3 request");
}

#[test]
fn h3_unknown_host_404() {
    let backend = Backend::start("b");
    let (edge, pki) = h3_edge("h3-404", &backend, &[]);
    // The SNI picks the certificate and the :authority picks the route, which matches nothing.
    let response = h3_get(edge.https, &pki, "a.test", "nowhere.test", "/").unwrap();
    assert_eq!(response.status, 404);
    assert!(response.body.contains("not found"), "{}", response.body);
    let response = h3_get(edge.https, &pki, "a.test", "a.test", "/").unwrap();
    assert_eq!(response.status, 200);
    // A name without a certificate at the edge gets the default one, which fails verification.
    let err = h3_get(edge.https, &pki, "c.test", "c.test", "/").err();
    assert!(err.is_some_and(|e| e.contains("handshake")));
    assert_eq!(backend.request_count(), 1);
}

#[test]
fn alt_svc_follows_http3_flag() {
    let backend = Backend::start("b");
    let (edge, _pki) = h3_edge("h3-altsvc", &backend, &[]);
    let ca = edge.dir.join("ca.pem");
    let port = edge.https.port();
    let resolve = format!("a.test:{port}:127.0.0.1");
    let url = format!("https://a.test:{port}/hello");
    let (code, out) = curl(&[
        "--http1.1",
        "-sS",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ]);
    assert_eq!(code, 0);

    let expected = format!("alt-svc: h3=\":{port}\"; ma=86400");
    assert!(
        out.to_ascii_lowercase().contains(&expected),
        "no Alt-Svc in:\n{out}"
    );

    let (code, out) = curl(&[
        "--http2",
        "-sS",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ]);
    assert_eq!(code, 0);
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains(&expected),
        "no Alt-Svc over h2 in:\n{out}"
    );

    let (edge_off, _pki) = h3_edge("h3-off", &backend, &["--http3", "false"]);
    let ca = edge_off.dir.join("ca.pem");
    let port = edge_off.https.port();
    let resolve = format!("a.test:{port}:127.0.0.1");
    let url = format!("https://a.test:{port}/hello");
    let (code, out) = curl(&[
        "--http1.1",
        "-sS",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &url,
    ]);
    assert_eq!(code, 0);
    assert!(
        !out.to_ascii_lowercase().contains("alt-svc"),
        "Alt-Svc with HTTP/3 off:\n{out}"
    );
}

/// Returns the Python that has aioquic, from `EDGE_AIOQUIC_PYTHON` (set by `cargo xtask test`),
/// or `None` to skip when it is unset and `EDGE_E2E_AIOQUIC` is not `1`.
fn aioquic_python() -> Option<String> {
    match std::env::var("EDGE_AIOQUIC_PYTHON") {
        Ok(python) if !python.is_empty() => Some(python),
        _ => {
            assert_ne!(
                std::env::var("EDGE_E2E_AIOQUIC").as_deref(),
                Ok("1"),
                "EDGE_E2E_AIOQUIC=1 but EDGE_AIOQUIC_PYTHON is not set"
            );
            eprintln!("skipping: set EDGE_AIOQUIC_PYTHON to a Python with aioquic installed");
            None
        }
    }
}

/// Runs the aioquic client; returns its exit code and output (status line, then body).
fn aioquic_get(python: &str, edge: &Edge, sni: &str, authority: &str) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/aioquic_get.py");
    let output = std::process::Command::new(python)
        .arg(script)
        .args([
            "127.0.0.1",
            &edge.https.port().to_string(),
            sni,
            authority,
            "/hello",
        ])
        .arg(edge.dir.join("ca.pem"))
        .output()
        .expect("the aioquic Python must run");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn aioquic_client_two_names() {
    let Some(python) = aioquic_python() else {
        return;
    };
    let backend = Backend::start("b");
    let (edge, _pki) = h3_edge("h3-aioquic", &backend, &[]);
    for host in ["a.test", "b.test"] {
        let (code, out) = aioquic_get(&python, &edge, host, host);
        assert_eq!(code, 0, "aioquic failed for {host}: {out}");
        assert_eq!(out, "200\nb /hello 0", "response for {host}");
    }

    let (code, out) = aioquic_get(&python, &edge, "a.test", "nowhere.test");
    assert_eq!(code, 0, "aioquic failed: {out}");
    assert!(out.starts_with("404\n"), "{out}");

    // No certificate for c.test at the edge: the default one fails verification.
    let (code, _) = aioquic_get(&python, &edge, "c.test", "c.test");
    assert_ne!(code, 0);
}

#[test]
fn retry_validates_busy_source() {
    let backend = Backend::start("b");
    // With a limit of 0 every connection attempt must first pass a Retry round trip.
    let (edge, pki) = h3_edge("h3-retry", &backend, &["--http3-retry-after", "0"]);
    for round in 0..20 {
        let response = h3_get(edge.https, &pki, "a.test", "a.test", "/hello").unwrap();
        assert_eq!(response.status, 200, "status in round {round}");
    }
    edge.expect_metric("edge_quic_retries_total 20\n");
    edge.expect_metric("edge_requests_total{route=\"a\",code=\"2xx\",protocol=\"h3\"} 20\n");
}

fn get(authority: &str, path: &str) -> http::Request<()> {
    http::Request::get(format!("https://{authority}{path}"))
        .body(())
        .unwrap()
}

fn post(authority: &str, path: &str) -> http::Request<()> {
    http::Request::post(format!("https://{authority}{path}"))
        .body(())
        .unwrap()
}

/// Sends `requests` one after another on one HTTP/3 connection from 127.0.0.1 and returns
/// the statuses and bodies. One connection keeps every request on the same QUIC thread.
fn h3_sequence(
    edge: &Edge,
    pki: &Pki,
    requests: Vec<(http::Request<()>, Option<&'static str>)>,
) -> Vec<(u16, String)> {
    block_on(async {
        let endpoint =
            h3client::endpoint("127.0.0.1:0".parse().unwrap(), pki.ca_cert.der().clone());
        let mut client = Client::connect(&endpoint, edge.https, "a.test")
            .await
            .unwrap();
        let mut out = Vec::new();
        for (request, body) in requests {
            let reply = client
                .request(
                    request,
                    body.map(|b| Bytes::from_static(b.as_bytes())),
                    None,
                )
                .await
                .unwrap();
            out.push((reply.status, reply.text()));
        }
        out
    })
}

#[test]
fn h3_reuses_backend_connection() {
    let backend = Backend::start("b");
    let (edge, pki) = h3_edge("h3-pool", &backend, &[]);
    let mut upload = post("a.test", "/upload");
    upload
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(5));
    let replies = h3_sequence(
        &edge,
        &pki,
        vec![
            (get("a.test", "/one"), None),
            (upload, Some("hello")),
            (get("a.test", "/two"), None),
        ],
    );
    assert_eq!(replies[0], (200, "b /one 0".to_owned()));
    assert_eq!(replies[1], (200, "b /upload 5".to_owned()));
    assert_eq!(replies[2], (200, "b /two 0".to_owned()));
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        1,
        "three requests share one backend connection"
    );
    let requests = backend.requests.lock().unwrap().clone();
    assert_eq!(requests[1].header("content-length"), Some("5"));
    assert_eq!(requests[1].header("transfer-encoding"), None);
    // A GET without a body goes out without any body framing.
    assert_eq!(requests[2].header("content-length"), None);
    assert_eq!(requests[2].header("transfer-encoding"), None);
}

#[test]
fn h3_pool_honours_backend_keep_alive() {
    // `Keep-Alive: timeout=1` leaves no time to reuse the connection safely.
    let backend = Backend::start_with(BackendOptions {
        keep_alive_header: Some(1),
        ..BackendOptions::named("b")
    });
    let (edge, pki) = h3_edge("h3-keepalive", &backend, &[]);
    let replies = h3_sequence(
        &edge,
        &pki,
        vec![(get("a.test", "/one"), None), (get("a.test", "/two"), None)],
    );
    assert_eq!(replies[0].0, 200);
    assert_eq!(replies[1].0, 200);
    assert_eq!(backend.connections.load(Ordering::SeqCst), 2);
}

/// Reads one HTTP/1.1 request head from `reader`; returns its request line, or `None` at EOF.
fn read_head(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).ok()? == 0 {
        return None;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line.trim_end().is_empty() {
            return Some(request_line.trim_end().to_owned());
        }
    }
}

/// Starts a backend that responds to the first request of each connection and closes the
/// connection when the second one arrives, as a backend does when its idle timeout races a
/// request. Returns its address, the number of connections and the request lines it served.
fn closing_backend() -> (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(Mutex::new(Vec::new()));
    let (count, seen) = (connections.clone(), answered.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let number = count.fetch_add(1, Ordering::SeqCst) + 1;
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let Some(line) = read_head(&mut reader) else {
                    return;
                };
                let text = format!("conn {number}");
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                );
                writer.write_all(response.as_bytes()).unwrap();
                seen.lock().unwrap().push(line);
                // The second request is read and then dropped with the connection.
                let _ = read_head(&mut reader);
            });
        }
    });
    (addr, connections, answered)
}

#[test]
fn h3_retries_stale_pooled_connection() {
    let (addr, connections, answered) = closing_backend();
    let backend = Backend {
        addr,
        connections: connections.clone(),
        requests: Default::default(),
    };
    let (edge, pki) = h3_edge("h3-stale", &backend, &[]);
    let mut upload = post("a.test", "/upload");
    upload
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(1));
    let replies = h3_sequence(
        &edge,
        &pki,
        vec![
            (get("a.test", "/first"), None),
            (get("a.test", "/second"), None),
            (upload, Some("x")),
        ],
    );
    assert_eq!(replies[0], (200, "conn 1".to_owned()));
    // The pooled connection closes under the GET, which is sent again on a new one.
    assert_eq!(replies[1], (200, "conn 2".to_owned()));
    // A POST is not idempotent, so the same failure is not retried.
    assert_eq!(replies[2].0, 502);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert_eq!(
        *answered.lock().unwrap(),
        vec!["GET /first HTTP/1.1", "GET /second HTTP/1.1"]
    );
}

/// Starts a backend that responds to the request head at once with a chunked body, then
/// echoes each chunk of the chunked request body as it arrives. Returns its address and the
/// request heads.
fn echo_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line.trim_end().is_empty() {
                        break;
                    }
                    head.push_str(&line.to_ascii_lowercase());
                }
                seen.lock().unwrap().push(head);
                writer
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .unwrap();
                loop {
                    let mut size_line = String::new();
                    if reader.read_line(&mut size_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let size = usize::from_str_radix(size_line.trim_end(), 16).unwrap();
                    let mut chunk = vec![0; size + 2];
                    reader.read_exact(&mut chunk).unwrap();
                    chunk.truncate(size);
                    let echo = format!("{size:x}\r\n{}\r\n", String::from_utf8(chunk).unwrap());
                    writer.write_all(echo.as_bytes()).unwrap();
                    if size == 0 {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads)
}

#[test]
fn h3_body_streams_before_first_byte() {
    let (addr, heads) = echo_backend();
    let backend = Backend {
        addr,
        connections: Default::default(),
        requests: Default::default(),
    };
    let (edge, pki) = h3_edge("h3-stream-body", &backend, &[]);
    let echoed = block_on(async {
        let endpoint =
            h3client::endpoint("127.0.0.1:0".parse().unwrap(), pki.ca_cert.der().clone());
        let mut client = Client::connect(&endpoint, edge.https, "a.test")
            .await
            .unwrap();
        let mut stream = client.open(post("a.test", "/echo")).await.unwrap();
        // No body byte has been sent: the response head must come anyway.
        let response = tokio::time::timeout(h3client::STEP_LIMIT, stream.recv_response())
            .await
            .expect("no response head before the request body")
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut echoed = Vec::new();
        for word in ["ping", "pong"] {
            stream
                .send_data(Bytes::from_static(word.as_bytes()))
                .await
                .unwrap();
            let mut piece = tokio::time::timeout(h3client::STEP_LIMIT, stream.recv_data())
                .await
                .expect("no echo of the request body piece")
                .unwrap()
                .expect("the response ended early");
            echoed
                .push(String::from_utf8(piece.copy_to_bytes(piece.remaining()).to_vec()).unwrap());
        }
        stream.finish().await.unwrap();
        let end = tokio::time::timeout(h3client::STEP_LIMIT, stream.recv_data())
            .await
            .expect("the response did not end")
            .unwrap();
        assert!(end.is_none(), "data after the echo");
        echoed
    });
    assert_eq!(echoed, vec!["ping", "pong"]);
    let heads = heads.lock().unwrap();
    assert!(
        heads[0].contains("transfer-encoding: chunked"),
        "a body of unknown length goes out chunked:\n{}",
        heads[0]
    );
}

/// Reads one counter from the edge's /metrics.
fn metric_value(edge: &Edge, name: &str) -> u64 {
    let text = common::request(edge.admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").text();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

#[test]
fn h3_initial_flood_gets_retry() {
    const FLOOD: usize = 64;
    let backend = Backend::start("b");
    let (edge, pki) = h3_edge("h3-flood", &backend, &[]);
    let ca = pki.ca_cert.der().clone();
    let before = metric_value(&edge, "edge_quic_retries_total");

    let (flood_statuses, legit_statuses) = block_on(async {
        // Every connection attempt sends real Initials from one address and port, far more
        // than the default limit of attempts per second from one source.
        let flooder = h3client::endpoint("127.0.0.1:0".parse().unwrap(), ca.clone());
        let attempts: Vec<_> = (0..FLOOD)
            .map(|_| {
                let flooder = flooder.clone();
                let server = edge.https;
                tokio::spawn(async move {
                    let mut client = Client::connect(&flooder, server, "a.test").await?;
                    let reply = client.request(get("a.test", "/flood"), None, None).await?;
                    Ok::<u16, String>(reply.status)
                })
            })
            .collect();

        // Another source keeps being served while the flood is handled.
        let legit = h3client::endpoint("127.0.0.2:0".parse().unwrap(), ca.clone());
        let mut legit_statuses = Vec::new();
        for _ in 0..3 {
            let mut client = Client::connect(&legit, edge.https, "a.test").await.unwrap();
            let reply = client
                .request(get("a.test", "/legit"), None, None)
                .await
                .unwrap();
            legit_statuses.push(reply.status);
        }

        let mut flood_statuses = Vec::new();
        for attempt in attempts {
            flood_statuses.push(attempt.await.unwrap());
        }
        (flood_statuses, legit_statuses)
    });

    let retries = metric_value(&edge, "edge_quic_retries_total") - before;
    assert!(retries > 0, "no Retry for {FLOOD} attempts from one source");
    assert_eq!(
        legit_statuses,
        vec![200; 3],
        "the other source was not served"
    );
    // Connections that had to echo a Retry token completed their handshake and got served.
    let served = flood_statuses.iter().filter(|s| **s == Ok(200)).count();
    assert_eq!(served, FLOOD, "flood results: {flood_statuses:?}");
}

#[test]
fn h3_incomplete_headers_stream_stopped() {
    let backend = Backend::start("b");
    let (edge, pki) = h3_edge(
        "h3-slow-headers",
        &backend,
        &["--header-read-timeout", "1s"],
    );
    let status = block_on(async {
        let endpoint =
            h3client::endpoint("127.0.0.1:0".parse().unwrap(), pki.ca_cert.der().clone());
        let conn = endpoint
            .connect(edge.https, "a.test")
            .unwrap()
            .await
            .unwrap();
        let (mut driver, mut send_request) =
            h3::client::new(h3_quinn::Connection::new(conn.clone()))
                .await
                .unwrap();
        let drive = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });

        // A request stream with the start of a HEADERS frame (type 0x01, 100 bytes announced)
        // and only 10 of its bytes, then silence.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut partial = vec![0x01, 0x40, 0x64];
        partial.extend_from_slice(&[0u8; 10]);
        send.write_all(&partial).await.unwrap();
        let ended =
            tokio::time::timeout(std::time::Duration::from_secs(30), recv.read_to_end(1024)).await;
        assert!(
            ended.is_ok(),
            "the edge kept a stream with incomplete headers open"
        );

        // The connection itself keeps serving.
        let mut stream = send_request
            .send_request(get("a.test", "/after"))
            .await
            .unwrap();
        stream.finish().await.unwrap();
        let response = stream.recv_response().await.unwrap();
        drive.abort();
        response.status().as_u16()
    });
    assert_eq!(status, 200);
    assert_eq!(metric_value(&edge, "edge_h3_header_timeouts_total"), 1);
}
