//! Certificates by SNI and Traefik rule routing, checked with real clients (openssl, curl).

mod common;

use std::{path::Path, process::Command};

use common::{curl, request, Backend, Edge};

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
            .push(rcgen::DnType::CommonName, "edge test CA");
        let ca_cert = params.self_signed(&ca_key).unwrap();
        Self { ca_cert, ca_key }
    }

    /// Writes `NAME.pem` and `NAME.key` for a leaf valid for `names`, with common name `cn`.
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

    fn write_ca(&self, dir: &Path) {
        std::fs::write(dir.join("ca.pem"), self.ca_cert.pem()).unwrap();
    }
}

/// Returns the subject line of the certificate the edge presents for `sni` (None: no SNI).
fn served_subject(addr: std::net::SocketAddr, sni: Option<&str>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string()]);
    match sni {
        Some(name) => cmd.args(["-servername", name]),
        None => cmd.arg("-noservername"),
    };
    let output = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl must be installed");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no certificate in openssl output for {sni:?}:\n{text}"))
        .to_owned()
}

fn tls_edge(name: &str, backend: &Backend) -> (Edge, Pki) {
    let dir = common::temp_dir(name);
    let pki = Pki::new();
    pki.write_ca(&dir);
    pki.leaf(&dir, "a", "a-cert", &["a.test"]);
    pki.leaf(&dir, "b", "b-cert", &["b.test", "www.b.test"]);
    pki.leaf(&dir, "wild", "wildcard-cert", &["*.w.test"]);
    let routes = format!(
        r#"
http:
  routers:
    a:
      rule: "Host(`a.test`)"
      service: app
      tls: {{}}
    b:
      rule: "Host(`b.test`, `www.b.test`)"
      service: app
      entryPoints: [websecure]
      tls: {{}}
    w:
      rule: "Host(`*.w.test`)"
      service: app
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
    - certFile: wild.pem
      keyFile: wild.key
"#,
        url = backend.url()
    );
    let routes_file = dir.join("routes.yaml");
    std::fs::write(&routes_file, routes).unwrap();
    (Edge::start_with_file(dir, &routes_file, &[]), pki)
}

#[test]
fn sni_selects_certificate() {
    let backend = Backend::start("b");
    let (edge, _pki) = tls_edge("sni", &backend);
    assert!(served_subject(edge.https, Some("a.test")).contains("a-cert"));
    assert!(served_subject(edge.https, Some("www.b.test")).contains("b-cert"));
    assert!(served_subject(edge.https, Some("B.TEST")).contains("b-cert"));
    assert!(served_subject(edge.https, Some("x.w.test")).contains("wildcard-cert"));
    assert!(served_subject(edge.https, Some("a.test.")).contains("a-cert"));
    assert!(served_subject(edge.https, None).contains("edge default certificate"));
    assert!(served_subject(edge.https, Some("unknown.test")).contains("edge default certificate"));
    assert!(served_subject(edge.https, Some("x.y.w.test")).contains("edge default certificate"));
}

#[test]
fn curl_verifies_chain_for_two_names() {
    let backend = Backend::start("b");
    let (edge, _pki) = tls_edge("curl", &backend);
    let ca = edge.dir.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let port = edge.https.port();
    for host in ["a.test", "b.test", "www.b.test", "x.w.test"] {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/hello");
        let (code, body) = curl(&["--cacert", ca, "--resolve", &resolve, &url]);
        assert_eq!(code, 0, "curl failed for {host}");
        assert_eq!(body, "b /hello 0", "body for {host}");
    }
    let seen = backend.last_request();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
}

#[test]
fn tls_session_resumes() {
    let backend = Backend::start("b");
    let (edge, _pki) = tls_edge("resume", &backend);
    let session = edge.dir.join("session.pem");
    let session = session.to_str().unwrap();
    let addr = edge.https.to_string();
    for tls_version in ["-tls1_3", "-tls1_2"] {
        let first = openssl_request(&addr, tls_version, "-sess_out", session);
        assert!(
            first.contains("b /resume 0"),
            "{tls_version} request failed:\n{first}"
        );
        let second = openssl_request(&addr, tls_version, "-sess_in", session);
        assert!(
            second.contains("Reused,"),
            "{tls_version} session not resumed:\n{second}"
        );
    }
}

/// Sends one request through `openssl s_client` and returns its output. The request keeps the
/// connection open until the response, so TLS 1.3 session tickets arrive before it closes.
fn openssl_request(addr: &str, tls_version: &str, session_flag: &str, session: &str) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            addr,
            "-servername",
            "a.test",
            "-ign_eof",
            tls_version,
            session_flag,
            session,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"GET /resume HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            .unwrap();
    }
    let output = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn old_tls_versions_rejected() {
    let backend = Backend::start("b");
    let (edge, _pki) = tls_edge("old-tls", &backend);
    let output = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &edge.https.to_string(),
            "-servername",
            "a.test",
            "-tls1_1",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        !text.contains("subject="),
        "a TLS 1.1 handshake succeeded:\n{text}"
    );
}

#[test]
fn routing_by_host_path_and_priority() {
    let one = Backend::start("one");
    let two = Backend::start("two");
    let three = Backend::start("three");
    let routes = format!(
        r#"
http:
  routers:
    site:
      rule: "Host(`shop.test`)"
      service: one
      entryPoints: [web]
    api:
      rule: "Host(`shop.test`) && PathPrefix(`/api`)"
      service: two
      entryPoints: [web]
    admin:
      rule: "Host(`shop.test`) && PathPrefix(`/api/admin`)"
      priority: 1
      service: three
      entryPoints: [web]
    legacy:
      rule: "Host(`a.test`,`www.a.test`) && (Method(`GET`) || Method(`HEAD`))"
      service: three
      entryPoints: [web]
    regex:
      rule: "HostRegexp(`^[a-z]+\\.re\\.test$`) && !Path(`/hidden`)"
      service: two
      entryPoints: [web]
    header:
      rule: "Host(`h.test`) && Header(`X-Version`, `2`)"
      service: two
      entryPoints: [web]
    header-default:
      rule: "Host(`h.test`)"
      service: one
      entryPoints: [web]
    unquoted:
      rule: "Host(bare.test)"
      service: one
      entryPoints: [web]
  services:
    one:
      loadBalancer:
        servers: [{{url: "{}"}}]
    two:
      loadBalancer:
        servers: [{{url: "{}"}}]
    three:
      loadBalancer:
        servers: [{{url: "{}"}}]
"#,
        one.url(),
        two.url(),
        three.url()
    );
    let edge = Edge::start("routing", &routes, &[]);
    let get = |host: &str, path: &str| {
        request(
            edge.http,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        )
        .text()
    };
    assert_eq!(get("shop.test", "/"), "one / 0");
    assert_eq!(get("SHOP.test:80", "/cart"), "one /cart 0");
    assert_eq!(get("shop.test", "/api/items"), "two /api/items 0");
    // An explicit low priority loses against the longer rule's default priority.
    assert_eq!(get("shop.test", "/api/admin"), "two /api/admin 0");
    assert_eq!(get("a.test", "/"), "three / 0");
    assert_eq!(get("www.a.test.", "/"), "three / 0");
    assert_eq!(get("x.re.test", "/"), "two / 0");
    let post = request(
        edge.http,
        "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(
        post.status, 308,
        "a plain-HTTP route that does not match redirects"
    );
    let version2 = request(
        edge.http,
        "GET / HTTP/1.1\r\nHost: h.test\r\nX-Version: 2\r\n\r\n",
    );
    assert_eq!(version2.text(), "two / 0");
    assert_eq!(get("h.test", "/"), "one / 0");
    assert_eq!(get("bare.test", "/"), "one / 0");
}

#[test]
fn unknown_host_gets_404_on_https() {
    let backend = Backend::start("b");
    let (edge, _pki) = tls_edge("404", &backend);
    let ca = edge.dir.join("ca.pem");
    let port = edge.https.port();
    let resolve = format!("nobody.test:{port}:127.0.0.1");
    let url = format!("https://nobody.test:{port}/");
    let (code, _) = curl(&[
        "-k",
        "--resolve",
        &resolve,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert_eq!(code, 0);
    let (_, status) = curl(&[
        "-k",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert_eq!(status, "404");
}

#[test]
fn plain_http_redirects_to_https() {
    let backend = Backend::start("b");
    let (edge, _pki) = tls_edge("redirect", &backend);
    let response = request(
        edge.http,
        "GET /x/y?q=1&r=2 HTTP/1.1\r\nHost: a.test\r\n\r\n",
    );
    assert_eq!(response.status, 308);
    let expected = format!("https://a.test:{}/x/y?q=1&r=2", edge.https.port());
    assert_eq!(response.header("location"), Some(expected.as_str()));
    assert_eq!(backend.request_count(), 0);
}
