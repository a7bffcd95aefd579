//! HTTP/3: a quinn + h3 client gets responses through the edge with the certificate chosen by
//! SNI, unknown hosts get 404, and HTTPS responses over TCP advertise HTTP/3 with Alt-Svc.

mod common;

use std::{net::SocketAddr, path::Path, sync::Arc};

use bytes::Buf;
use common::{curl, Backend, Edge};

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
