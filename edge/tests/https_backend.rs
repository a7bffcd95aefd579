//! Backends behind TLS (`https://` server URLs): a rustls server on tokio with a test CA,
//! offering HTTP/1.1 only or HTTP/2, reached by curl through the edge over HTTP/1.1 and
//! HTTP/2. Covers verification with `rootCAs`, the failure of an untrusted backend,
//! `insecureSkipVerify` and `serverName`.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{curl, Edge};
use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and a backend certificate it signed.
struct TestPki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// Creates a CA and a backend certificate for `names` (DNS names or IP addresses).
fn test_pki(names: &[&str]) -> TestPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    TestPki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// What the TLS backend saw.
#[derive(Default, Debug, Clone)]
struct Seen {
    /// SNI of each handshake (`None` when the client sent none).
    sni: Vec<Option<String>>,
    /// ALPN protocol of each handshake.
    alpn: Vec<Option<String>>,
    /// `:scheme` of each HTTP/2 request.
    schemes: Vec<String>,
}

/// Starts a TLS backend on 127.0.0.1 with `pki`'s certificate. It offers `alpn` and responds
/// to every request with 200 and the body `PROTOCOL PATH` (`http/1.1` or `h2`).
async fn start_backend(pki: &TestPki, alpn: &[&[u8]]) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let chain =
        vec![rustls::pki_types::CertificateDer::from_pem_slice(pki.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let (_, session) = stream.get_ref();
                let sni = session.server_name().map(str::to_owned);
                let alpn = session
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                {
                    let mut seen = record.lock().unwrap();
                    seen.sni.push(sni);
                    seen.alpn.push(alpn.clone());
                }
                if alpn.as_deref() == Some("h2") {
                    serve_h2(stream, record).await;
                } else {
                    serve_http1(stream).await;
                }
            });
        }
    });
    (addr, seen)
}

/// Serves HTTP/1.1 requests without bodies on one keep-alive connection.
async fn serve_http1(mut stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        let body = format!("http/1.1 {path}");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Serves HTTP/2 requests, with a trailer as gRPC servers send.
async fn serve_h2(
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    record: Arc<Mutex<Seen>>,
) {
    let Ok(mut connection) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        let scheme = request.uri().scheme_str().unwrap_or_default().to_owned();
        record.lock().unwrap().schemes.push(scheme);
        let body = format!("h2 {}", request.uri().path());
        let response = http::Response::builder().status(200).body(()).unwrap();
        let Ok(mut send) = respond.send_response(response, false) else {
            continue;
        };
        let _ = send.send_data(bytes::Bytes::from(body), false);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-backend-trailer", http::HeaderValue::from_static("done"));
        let _ = send.send_trailers(trailers);
    }
}

/// Returns a routes file with router `app` for `Host(app.test)` to `url`, using the servers
/// transport `transport` (YAML lines of its settings) when given.
fn routes(url: &str, transport: Option<&str>) -> String {
    let mut out = common::routes_yaml(&[("app", "Host(`app.test`)", url)]);
    if let Some(settings) = transport {
        out.push_str("        serversTransport: backend@file\n");
        out.push_str("  serversTransports:\n    backend:\n");
        out.push_str(settings);
    }
    out
}

/// Starts the edge in a new directory that contains `ca.pem`, with `routes`.
fn start_edge(name: &str, pki: &TestPki, routes: &str) -> Edge {
    let dir = common::temp_dir(name);
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    let routes_file = dir.join("routes.yaml");
    std::fs::write(&routes_file, routes).unwrap();
    Edge::start_with_file(dir, &routes_file, &[])
}

/// Sends GET `path` for `app.test` to the edge's HTTPS listener with curl, forcing `http`
/// (`--http1.1` or `--http2`). Returns the status and the body.
async fn get(edge: &Edge, http: &'static str, path: &str) -> (String, String) {
    let url = format!("https://app.test:{}{path}", edge.https.port());
    let resolve = format!("app.test:{}:127.0.0.1", edge.https.port());
    tokio::task::spawn_blocking(move || {
        let (code, out) = curl(&[
            http,
            "-k",
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_code}",
            &url,
        ]);
        assert_eq!(code, 0, "curl failed: {out}");
        let (body, status) = out.rsplit_once('\n').unwrap();
        (status.to_owned(), body.to_owned())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_backend_verified_with_root_ca() {
    let pki = test_pki(&["127.0.0.1"]);
    let (backend, seen) = start_backend(&pki, &[b"http/1.1"]).await;
    let transport = "      rootCAs: [ca.pem]\n";
    let edge = start_edge(
        "https-http1",
        &pki,
        &routes(&format!("https://{backend}"), Some(transport)),
    );

    for http in ["--http1.1", "--http2"] {
        let (status, body) = get(&edge, http, "/one").await;
        assert_eq!(status, "200", "{http}");
        assert_eq!(body, "http/1.1 /one", "{http}");
    }
    let (status, _) = get(&edge, "--http1.1", "/two").await;
    assert_eq!(status, "200");

    let seen = seen.lock().unwrap().clone();
    // The edge offered h2 and http/1.1, and the backend chose http/1.1.
    assert!(
        seen.alpn.iter().all(|a| a.as_deref() == Some("http/1.1")),
        "{seen:?}"
    );
    // An IP address is never sent in SNI.
    assert!(seen.sni.iter().all(Option::is_none), "{seen:?}");
    // Keep-alive pooling: three requests over at most one connection per worker.
    assert!(seen.sni.len() < 3, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_backend_gets_streams() {
    let pki = test_pki(&["127.0.0.1"]);
    let (backend, seen) = start_backend(&pki, &[b"h2", b"http/1.1"]).await;
    let transport = "      rootCAs: [ca.pem]\n";
    let edge = start_edge(
        "https-h2",
        &pki,
        &routes(&format!("https://{backend}"), Some(transport)),
    );

    for http in ["--http2", "--http1.1", "--http2"] {
        let (status, body) = get(&edge, http, "/grpc").await;
        assert_eq!(status, "200", "{http}");
        assert_eq!(body, "h2 /grpc", "{http}");
    }

    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.alpn.iter().all(|a| a.as_deref() == Some("h2")),
        "{seen:?}"
    );
    assert_eq!(seen.schemes, vec!["https"; 3]);
    // One multiplexed connection per worker carries all requests.
    assert!(seen.alpn.len() < 3, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_backend_gets_502() {
    let pki = test_pki(&["127.0.0.1"]);
    let (backend, _) = start_backend(&pki, &[b"http/1.1"]).await;
    // No rootCAs: the backend is checked against the system's roots, which lack the test CA.
    let edge = start_edge(
        "https-untrusted",
        &pki,
        &routes(&format!("https://{backend}"), None),
    );

    for http in ["--http1.1", "--http2"] {
        let (status, _) = get(&edge, http, "/").await;
        assert_eq!(status, "502", "{http}");
    }
    edge.expect_log(
        "TLS handshake with the backend failed",
        Duration::from_secs(5),
    );
    edge.expect_log("UnknownIssuer", Duration::from_secs(5));
    edge.expect_metric("edge_upstream_errors_total{kind=\"tls\"} 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_accepts_backend() {
    let pki = test_pki(&["somewhere.else"]);
    let (backend, _) = start_backend(&pki, &[b"http/1.1"]).await;
    let transport = "      insecureSkipVerify: true\n";
    let edge = start_edge(
        "https-insecure",
        &pki,
        &routes(&format!("https://{backend}"), Some(transport)),
    );
    let (status, body) = get(&edge, "--http1.1", "/x").await;
    assert_eq!(status, "200");
    assert_eq!(body, "http/1.1 /x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_used_for_sni() {
    let pki = test_pki(&["backend.internal"]);
    let (backend, seen) = start_backend(&pki, &[b"http/1.1"]).await;
    let url = format!("https://{backend}");

    // The certificate does not name 127.0.0.1, so the URL's host fails verification.
    let edge = start_edge(
        "https-no-server-name",
        &pki,
        &routes(&url, Some("      rootCAs: [ca.pem]\n")),
    );
    let (status, _) = get(&edge, "--http1.1", "/").await;
    assert_eq!(status, "502");
    edge.expect_log("not valid for name", Duration::from_secs(5));
    drop(edge);

    let transport = "      rootCAs: [ca.pem]\n      serverName: backend.internal\n";
    let edge = start_edge("https-server-name", &pki, &routes(&url, Some(transport)));
    let (status, body) = get(&edge, "--http1.1", "/named").await;
    assert_eq!(status, "200");
    assert_eq!(body, "http/1.1 /named");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.sni.last(), Some(&Some("backend.internal".to_owned())));
}

/// Connects to the edge over HTTP/3 as `app.test`, trusting `pki`'s CA.
async fn connect_h3(edge: &Edge, pki: &TestPki) -> common::h3client::Client {
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap();
    let endpoint = common::h3client::endpoint("127.0.0.1:0".parse().unwrap(), ca);
    common::h3client::Client::connect(&endpoint, edge.https, "app.test")
        .await
        .unwrap()
}

/// Sends GET `path` for `app.test` on `client`. Returns the status and the body.
async fn get_h3(client: &mut common::h3client::Client, path: &str) -> (u16, String) {
    let request = http::Request::get(format!("https://app.test{path}"))
        .body(())
        .unwrap();
    let reply = client.request(request, None, None).await.unwrap();
    (reply.status, reply.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_reaches_tls_backend() {
    // One certificate for both sides: the backend serves it for 127.0.0.1, the edge for
    // app.test, and the HTTP/3 client and the edge both trust the CA that signed it.
    let pki = test_pki(&["127.0.0.1", "app.test"]);
    let (backend, seen) = start_backend(&pki, &[b"http/1.1"]).await;
    let mut verified = routes(
        &format!("https://{backend}"),
        Some("      rootCAs: [ca.pem]\n"),
    );
    verified.push_str("tls:\n  certificates:\n    - certFile: edge.pem\n      keyFile: edge.key\n");
    let dir = common::temp_dir("https-h3");
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(dir.join("edge.pem"), &pki.cert_pem).unwrap();
    std::fs::write(dir.join("edge.key"), &pki.key_pem).unwrap();
    let routes_file = dir.join("routes.yaml");
    std::fs::write(&routes_file, &verified).unwrap();
    let edge = Edge::start_with_file(dir.clone(), &routes_file, &[]);

    // One QUIC connection, so both requests reach the same QUIC thread and its pool.
    let mut client = connect_h3(&edge, &pki).await;
    for path in ["/one", "/two"] {
        let (status, body) = get_h3(&mut client, path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(body, format!("http/1.1 {path}"));
    }
    let seen_now = seen.lock().unwrap().clone();
    assert!(
        seen_now
            .alpn
            .iter()
            .all(|a| a.as_deref() == Some("http/1.1")),
        "{seen_now:?}"
    );
    // Keep-alive pooling on the QUIC thread: two requests over one TLS connection.
    assert_eq!(seen_now.sni.len(), 1, "{seen_now:?}");

    // Without the CA the backend is not trusted, and the client gets 502.
    let untrusted = verified.replace("        serversTransport: backend@file\n", "");
    std::fs::write(&routes_file, untrusted).unwrap();
    edge.expect_log("routes reloaded", Duration::from_secs(5));
    let (status, _) = get_h3(&mut client, "/three").await;
    assert_eq!(status, 502);
    edge.expect_log(
        "TLS handshake with the backend failed",
        Duration::from_secs(5),
    );
    edge.expect_metric("edge_upstream_errors_total{kind=\"tls\"} 1");
}
