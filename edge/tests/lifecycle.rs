//! Process lifecycle: reloads, graceful shutdown, the port guard, the admin listener and
//! `check-config`.

mod common;

use std::{
    io::{BufReader, Write},
    process::Command,
    thread,
    time::Duration,
};

use common::{connect, read_response, request, routes_yaml, Backend, Edge};

#[test]
fn broken_reload_keeps_old_routes() {
    let old = Backend::start("old");
    let new = Backend::start("new");
    let edge = Edge::start(
        "reload",
        &routes_yaml(&[("app", "Host(`t`)", &old.url())]),
        &[],
    );

    // A keep-alive connection opened before the reloads must survive them.
    let mut stream = connect(edge.http);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    stream
        .write_all(b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_response(&mut reader, false).unwrap().text(),
        "old /1 0"
    );

    edge.write_routes(
        "http:\n  routers:\n    app:\n      rule: \"Host(`t`\"\n      service: app\n",
    );
    edge.expect_log("routes file rejected", Duration::from_secs(10));
    stream
        .write_all(b"GET /2 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_response(&mut reader, false).unwrap().text(),
        "old /2 0"
    );

    edge.write_routes(&routes_yaml(&[("app", "Host(`t`)", &new.url())]));
    edge.expect_log("routes reloaded", Duration::from_secs(10));
    stream
        .write_all(b"GET /3 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_response(&mut reader, false).unwrap().text(),
        "new /3 0"
    );
}

#[test]
fn reload_error_names_key_path() {
    let backend = Backend::start("b");
    let edge = Edge::start(
        "reload-key",
        &routes_yaml(&[("app", "Host(`t`)", &backend.url())]),
        &[],
    );
    edge.write_routes(
        "http:\n  routers:\n    app:\n      rule: \"Host(`t`)\"\n      service: missing\n",
    );
    edge.expect_log("routes file rejected", Duration::from_secs(10));
    edge.expect_log("http.routers.app.service", Duration::from_secs(1));
    assert_eq!(
        request(edge.http, "GET / HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
}

#[test]
fn shutdown_finishes_inflight_request() {
    let backend = Backend::start("b");
    let mut edge = Edge::start(
        "shutdown",
        &routes_yaml(&[("app", "Host(`t`)", &backend.url())]),
        &[],
    );
    let http = edge.http;
    let slow = thread::spawn(move || request(http, "GET /slow/1500 HTTP/1.1\r\nHost: t\r\n\r\n"));
    thread::sleep(Duration::from_millis(300));
    edge.terminate();
    let response = slow.join().unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "b /slow/1500 0");
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(edge.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        std::net::TcpStream::connect(http).is_err(),
        "still accepting after shutdown"
    );
}

#[test]
fn occupied_port_refuses_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_edge"))
        .args([
            "--http-addr",
            &addr,
            "--https-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already in use"), "stderr: {stderr}");
}

#[test]
fn admin_health_and_metrics() {
    let backend = Backend::start("b");
    let edge = Edge::start(
        "admin",
        &routes_yaml(&[("app", "Host(`t`)", &backend.url())]),
        &[],
    );
    assert_eq!(
        request(edge.http, "GET /x HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
    assert_eq!(
        request(edge.http, "GET /x HTTP/1.1\r\nHost: other\r\n\r\n").status,
        308
    );
    // The site's own /health goes to the site, not to the edge.
    let site_health = request(edge.http, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(site_health.text(), "ok");
    assert_eq!(backend.last_request().path, "/health");

    let health = request(edge.admin, "GET /health HTTP/1.1\r\nHost: admin\r\n\r\n");
    assert_eq!(health.status, 200);
    edge.expect_metric("edge_requests_total{route=\"app\",code=\"2xx\",protocol=\"http/1.1\"} 2");
    edge.expect_metric("edge_requests_total{route=\"\",code=\"3xx\",protocol=\"http/1.1\"} 1");
    edge.expect_metric("edge_connections_active{listener=\"web\"}");
    edge.expect_metric("edge_tls_handshakes_total 0");
    edge.expect_metric("edge_upstream_errors_total{kind=\"connect\"} 0");
}

#[test]
fn access_log_is_json_per_request() {
    let backend = Backend::start("b");
    let edge = Edge::start(
        "access",
        &routes_yaml(&[("app", "Host(`t`)", &backend.url())]),
        &[],
    );
    assert_eq!(
        request(edge.http, "GET /logged?a=1 HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
    let mut line = None;
    for _ in 0..100 {
        line = edge
            .access
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("/logged"))
            .cloned();
        if line.is_some() {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let value: serde_json::Value =
        serde_json::from_str(&line.expect("no access log line")).unwrap();
    assert_eq!(value["host"], "t");
    assert_eq!(value["method"], "GET");
    assert_eq!(value["path"], "/logged?a=1");
    assert_eq!(value["status"], 200);
    assert_eq!(value["route"], "app");
    assert_eq!(value["upstream"], backend.addr.to_string());
    assert_eq!(value["request_id"].as_str().map(str::len), Some(16));
}

#[test]
fn check_config_reports_errors() {
    let dir = common::temp_dir("check");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "http:\n  routers:\n    app:\n      rule: \"Host(`t`\"\n      service: nope\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_edge"))
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("http.routers.app.rule"), "stdout: {stdout}");

    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[http.routers.app]\nrule = \"Host(`t`)\"\nservice = \"app\"\n[http.services.app.loadBalancer]\nservers = [{ url = \"http://127.0.0.1:9\" }]\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_edge"))
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let _ = std::fs::remove_dir_all(dir);
}
