//! The snapshot socket: snapshots pushed by the agent are applied, rejected when invalid, and
//! persisted so that a restarted edge serves at once.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::Path,
};

use common::{request, Backend, Edge};

fn snapshot_json(version: u64, rule: &str, url: &str) -> serde_json::Value {
    serde_json::json!({
        "version": version,
        "routers": [{"name": "site/app", "rule": rule, "service": "site/app", "entrypoints": ["web"]}],
        "services": [{"name": "site/app", "servers": [{"url": url}]}]
    })
}

fn push(socket: &Path, message: serde_json::Value) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    let mut line = serde_json::to_vec(&message).unwrap();
    line.push(b'\n');
    stream.write_all(&line).unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

fn start(dir: &Path) -> Edge {
    Edge::start_in(
        dir.to_owned(),
        &["--state-dir".into(), dir.display().to_string()],
    )
}

#[test]
fn pushed_snapshot_applies_and_persists() {
    let backend = Backend::start("pushed");
    let dir = common::temp_dir("agent-link");
    let socket = dir.join("edge.sock");
    let mut edge = start(&dir);
    assert_eq!(
        request(edge.http, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").status,
        308
    );

    let apply = serde_json::json!({"type": "apply", "snapshot": snapshot_json(5, "Host(`t`)", &backend.url())});
    let reply = push(&socket, apply);
    assert_eq!(reply, serde_json::json!({"type": "applied", "version": 5}));
    assert_eq!(
        request(edge.http, "GET /x HTTP/1.1\r\nHost: t\r\n\r\n").text(),
        "pushed /x 0"
    );

    let invalid = serde_json::json!({"type": "apply", "snapshot": snapshot_json(6, "Host(`t`", &backend.url())});
    let reply = push(&socket, invalid);
    assert_eq!(reply["type"], "rejected");
    assert!(
        reply["errors"][0]
            .as_str()
            .unwrap()
            .contains("routers[site/app].rule"),
        "{reply}"
    );
    assert_eq!(
        request(edge.http, "GET /y HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );

    let status = push(&socket, serde_json::json!({"type": "status"}));
    assert_eq!(status["version"], 5);

    let persisted = dir.join("edge-snapshot.json");
    let mode = std::fs::metadata(&persisted).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let socket_mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(socket_mode, 0o600);

    // A restarted edge serves the persisted snapshot before any agent connects.
    edge.terminate();
    assert_eq!(edge.wait_exit(std::time::Duration::from_secs(10)), Some(0));
    assert!(!socket.exists(), "the stopped edge left its socket behind");
    let restarted = start(&dir);
    assert_eq!(
        request(restarted.http, "GET /z HTTP/1.1\r\nHost: t\r\n\r\n").text(),
        "pushed /z 0"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_counts_requests_in_flight() {
    let backend = Backend::start("busy");
    let dir = common::temp_dir("agent-in-flight");
    let socket = dir.join("edge.sock");
    let edge = start(&dir);
    let apply = serde_json::json!({"type": "apply", "snapshot": snapshot_json(1, "Host(`t`)", &backend.url())});
    assert_eq!(push(&socket, apply)["type"], "applied");

    let http = edge.http;
    let slow =
        std::thread::spawn(move || request(http, "GET /slow/1500 HTTP/1.1\r\nHost: t\r\n\r\n"));
    std::thread::sleep(std::time::Duration::from_millis(600));
    let status = push(&socket, serde_json::json!({"type": "status"}));
    assert_eq!(status["in_flight"][backend.addr.to_string()], 1, "{status}");
    assert_eq!(slow.join().unwrap().status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn garbage_message_gets_error_reply() {
    let dir = common::temp_dir("agent-garbage");
    let _edge = start(&dir);
    let reply = push(
        &dir.join("edge.sock"),
        serde_json::json!({"type": "launch"}),
    );
    assert_eq!(reply["type"], "error");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn routes_file_and_socket_are_exclusive() {
    let dir = common::temp_dir("agent-exclusive");
    let routes = dir.join("routes.yaml");
    std::fs::write(&routes, "").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--https-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .arg("--routes-file")
        .arg(&routes)
        .arg("--state-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot be combined"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn acme_http01_answered_before_redirect() {
    let backend = Backend::start("site");
    let dir = common::temp_dir("agent-acme-http01");
    let edge = start(&dir);
    let mut snapshot = snapshot_json(3, "Host(`t`)", &backend.url());
    // The router is on `websecure` only, so plain HTTP for `t` is redirected.
    snapshot["routers"][0]["entrypoints"] = serde_json::json!(["websecure"]);
    snapshot["routers"][0]["tls"] = serde_json::json!(true);
    snapshot["acme_challenges"] = serde_json::json!({
        "http01": [{"token": "tok-en_1", "key_authorization": "tok-en_1.thumb"}]
    });
    let reply = push(
        &dir.join("edge.sock"),
        serde_json::json!({"type": "apply", "snapshot": snapshot}),
    );
    assert_eq!(reply["type"], "applied", "{reply}");

    let challenge = request(
        edge.http,
        "GET /.well-known/acme-challenge/tok-en_1 HTTP/1.1\r\nHost: any.test\r\n\r\n",
    );
    assert_eq!(challenge.status, 200);
    assert_eq!(challenge.text(), "tok-en_1.thumb");

    let unknown = request(
        edge.http,
        "GET /.well-known/acme-challenge/other HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert_eq!(unknown.status, 308);

    // Over HTTPS the path is routed like any other.
    let (code, body) = common::curl(&[
        "-k",
        "--resolve",
        &format!("t:{}:127.0.0.1", edge.https.port()),
        &format!(
            "https://t:{}/.well-known/acme-challenge/tok-en_1",
            edge.https.port()
        ),
    ]);
    assert_eq!(code, 0, "{body}");
    assert_ne!(body, "tok-en_1.thumb");

    let invalid = serde_json::json!({
        "type": "apply",
        "snapshot": {
            "version": 4, "routers": [], "services": [],
            "acme_challenges": {"http01": [{"token": "a/b", "key_authorization": "x"}]}
        }
    });
    let reply = push(&dir.join("edge.sock"), invalid);
    assert_eq!(reply["type"], "rejected", "{reply}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `openssl s_client` against `addr` with `sni` and `alpn`. Returns whether the server
/// sent a certificate, and the output.
fn tls_handshake(addr: std::net::SocketAddr, sni: &str, alpn: &str) -> (bool, String) {
    let mut child = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            sni,
        ])
        .args(["-alpn", alpn, "-ign_eof"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl must be installed");
    // A request after the handshake shows whether the edge serves HTTP on the connection.
    let request = format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(request.as_bytes());
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (text.contains("BEGIN CERTIFICATE"), text)
}

#[test]
fn acme_tls_alpn01_served_only_to_validation() {
    let dir = common::temp_dir("agent-acme-tls-alpn");
    let edge = start(&dir);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "acme challenge a.test");
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&[1u8; 32])];
    let cert = params.self_signed(&key).unwrap();
    let snapshot = serde_json::json!({
        "version": 1, "routers": [], "services": [],
        "acme_challenges": {"tls_alpn01": [{
            "name": "a.test",
            "certificate": {"chain_pem": cert.pem(), "key_pem": key.serialize_pem()}
        }]}
    });
    let reply = push(
        &dir.join("edge.sock"),
        serde_json::json!({"type": "apply", "snapshot": snapshot}),
    );
    assert_eq!(reply["type"], "applied", "{reply}");

    let (ok, text) = tls_handshake(edge.https, "a.test", "acme-tls/1");
    assert!(ok, "{text}");
    assert!(text.contains("acme challenge a.test"), "{text}");
    assert!(text.contains("ALPN protocol: acme-tls/1"), "{text}");
    // The validation connection is closed after the handshake, never routed.
    assert!(!text.contains("HTTP/1.1 "), "{text}");

    // A normal client for the same name never gets the challenge certificate.
    let (ok, text) = tls_handshake(edge.https, "a.test", "http/1.1");
    assert!(ok, "{text}");
    assert!(!text.contains("acme challenge"), "{text}");
    assert!(text.contains("HTTP/1.1 404"), "{text}");

    // A validation handshake for a name without a pending challenge fails.
    let (ok, text) = tls_handshake(edge.https, "b.test", "acme-tls/1");
    assert!(!ok, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
