//! HTTP/1.1 behaviour of the real edge binary: framing rejections, streaming, keep-alive,
//! forwarding headers, upgrades and timeouts.

mod common;

use std::{
    io::{BufReader, Read, Write},
    sync::atomic::Ordering,
    thread,
    time::Duration,
};

use common::{
    connect, is_closed, read_response, request, routes_yaml, Backend, BackendOptions, Edge,
};

fn edge_for(name: &str, backend: &Backend, extra: &[&str]) -> Edge {
    Edge::start(
        name,
        &routes_yaml(&[("app", "Host(`t`)", &backend.url())]),
        extra,
    )
}

#[test]
fn framing_rejections_get_400_and_close() {
    let backend = Backend::start("b");
    let edge = edge_for("framing", &backend, &[]);
    let cases = [
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: t\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 0\r\n\r\nabc",
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n b\r\n\r\n",
        "GET / HTTP/1.1\nHost: t\n\n",
        "GET / HTTP/1.1\r\nHost : t\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: t\r\n:\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1zz\r\nx\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello0\r\n\r\n",
    ];
    for raw in cases {
        let mut stream = connect(edge.http);
        stream.write_all(raw.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let response = read_response(&mut reader, false).unwrap();
        assert_eq!(response.status, 400, "request {raw:?}");
        assert!(
            is_closed(&mut stream, Duration::from_secs(5)),
            "still open after {raw:?}"
        );
    }
    assert!(
        backend
            .requests
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.path != "/admin"),
        "a smuggled request reached the backend"
    );
}

#[test]
fn oversized_head_gets_431() {
    let backend = Backend::start("b");
    let edge = edge_for("oversize", &backend, &["--max-header-bytes", "4096"]);
    let raw = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8000)
    );
    assert_eq!(request(edge.http, &raw).status, 431);
    let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
    let raw = format!("GET / HTTP/1.1\r\nHost: t\r\n{many}\r\n");
    assert_eq!(request(edge.http, &raw).status, 431);
}

#[test]
fn body_limit_gets_413() {
    let backend = Backend::start("b");
    let edge = edge_for("limit", &backend, &["--max-request-body-bytes", "10"]);
    let raw = "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world";
    assert_eq!(request(edge.http, raw).status, 413);
    let raw = "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n";
    assert_eq!(request(edge.http, raw).status, 413);
    let raw = "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(request(edge.http, raw).status, 200);
}

#[test]
fn chunked_upload_streams_with_bounded_memory() {
    let backend = Backend::start("b");
    let edge = edge_for("upload", &backend, &[]);
    let before_kib = edge.peak_rss_kib();
    let mut stream = connect(edge.http);
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = vec![b'z'; 64 * 1024];
    let total = 50 * 1024 * 1024;
    let mut sent = 0;
    while sent < total {
        write!(stream, "{:x}\r\n", chunk.len()).unwrap();
        stream.write_all(&chunk).unwrap();
        stream.write_all(b"\r\n").unwrap();
        sent += chunk.len();
    }
    stream.write_all(b"0\r\nX-Upload-Sum: 1\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let response = read_response(&mut reader, false).unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), format!("b /upload {total}"));
    let seen = backend.last_request();
    assert_eq!(
        seen.trailers,
        vec![("X-Upload-Sum".to_owned(), "1".to_owned())]
    );
    let growth_kib = edge.peak_rss_kib().saturating_sub(before_kib);
    assert!(
        growth_kib < 16 * 1024,
        "peak RSS grew by {growth_kib} KiB for a 50 MiB upload"
    );
}

#[test]
fn chunked_response_keeps_trailers() {
    let backend = Backend::start("b");
    let edge = edge_for("trailers", &backend, &[]);
    let response = request(
        edge.http,
        "GET /chunked HTTP/1.1\r\nHost: t\r\nTE: trailers\r\n\r\n",
    );
    assert_eq!(response.text(), "hello world");
    assert_eq!(response.header("trailer:X-Checksum"), Some("42"));
    let response = request(edge.http, "GET /close HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.text(), "until close body");
    let response = request(edge.http, "GET /close HTTP/1.0\r\nHost: t\r\n\r\n");
    assert_eq!(response.text(), "until close body");
}

#[test]
fn head_response_keeps_content_length() {
    let backend = Backend::start("b");
    let edge = edge_for("head", &backend, &[]);
    let mut stream = connect(edge.http);
    stream
        .write_all(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\nGET /y HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let head = read_response(&mut reader, true).unwrap();
    assert_eq!(head.header("content-length"), Some("1234"));
    let next = read_response(&mut reader, false).unwrap();
    assert_eq!(next.text(), "b /y 0");
}

#[test]
fn keep_alive_reuses_backend_connection() {
    let backend = Backend::start("b");
    let edge = edge_for("reuse", &backend, &["--workers", "1"]);
    let mut stream = connect(edge.http);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for i in 0..20 {
        write!(stream, "GET /{i} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let response = read_response(&mut reader, false).unwrap();
        assert_eq!(response.text(), format!("b /{i} 0"));
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn backend_idle_close_causes_no_502() {
    // The backend closes idle connections after 150 ms while the edge would keep them 4 s:
    // every reuse races the close, and none of them may surface as an error.
    let backend = Backend::start_with(BackendOptions {
        idle_close: Some(Duration::from_millis(150)),
        ..BackendOptions::named("b")
    });
    let edge = edge_for("idle-close", &backend, &["--workers", "1"]);
    for i in 0..12 {
        let response = request(edge.http, &format!("GET /{i} HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert_eq!(response.status, 200, "request {i}");
        thread::sleep(Duration::from_millis(140 + (i % 3) * 10));
    }
    let response = request(
        edge.http,
        "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert_eq!(response.status, 200);
}

#[test]
fn keep_alive_timeout_hint_is_respected() {
    // `Keep-Alive: timeout=1` makes the pooled connection expire at once (1 s minus a margin).
    let backend = Backend::start_with(BackendOptions {
        keep_alive_header: Some(1),
        ..BackendOptions::named("b")
    });
    let edge = edge_for("ka-hint", &backend, &["--workers", "1"]);
    request(edge.http, "GET /a HTTP/1.1\r\nHost: t\r\n\r\n");
    request(edge.http, "GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(backend.connections.load(Ordering::SeqCst), 2);
}

#[test]
fn forwarded_headers_replace_client_values() {
    let backend = Backend::start("b");
    let edge = edge_for("xff", &backend, &[]);
    let raw = "GET /h HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: evil\r\nX-Real-Ip: 10.9.9.9\r\nForwarded: for=1.2.3.4\r\nConnection: keep-alive, X-Forwarded-Proto, X-Custom\r\nX-Custom: drop me\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\r\n";
    assert_eq!(request(edge.http, raw).status, 200);
    let seen = backend.last_request();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header_count("x-forwarded-for"), 1);
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host"), Some("t"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("forwarded"), None);
    assert_eq!(seen.header("x-custom"), None);
    assert_eq!(seen.header("keep-alive"), None);
    assert_eq!(seen.header("proxy-connection"), None);
    assert_eq!(seen.header("host"), Some("t"));
    assert_eq!(seen.header("x-request-id").map(str::len), Some(16));
}

#[test]
fn trusted_proxy_extends_forwarded_for() {
    let backend = Backend::start("b");
    let edge = edge_for("trusted", &backend, &["--trusted-proxies", "127.0.0.0/8"]);
    let raw = "GET /h HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n\r\n";
    assert_eq!(request(edge.http, raw).status, 200);
    let seen = backend.last_request();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
}

#[test]
fn expect_continue_gets_interim_response() {
    let backend = Backend::start("b");
    let edge = edge_for("expect", &backend, &[]);
    let mut stream = connect(edge.http);
    stream
        .write_all(
            b"PUT /e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let interim = read_response(&mut reader, false).unwrap();
    assert_eq!(interim.status, 100);
    stream.write_all(b"hello").unwrap();
    let response = read_response(&mut reader, false).unwrap();
    assert_eq!(response.text(), "b /e 5");
    assert_eq!(backend.last_request().header("expect"), None);
}

#[test]
fn upgrade_tunnels_after_101() {
    let backend = Backend::start("b");
    let edge = edge_for("upgrade", &backend, &[]);
    let mut stream = connect(edge.http);
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let response = read_response(&mut reader, false).unwrap();
    assert_eq!(response.status, 101);
    assert_eq!(response.header("upgrade"), Some("websocket"));
    stream.write_all(b"ping-1").unwrap();
    let mut echo = [0u8; 6];
    reader.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping-1");
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(is_closed(&mut stream, Duration::from_secs(5)));
}

#[test]
fn upgrade_refused_keeps_http_framing() {
    let backend = Backend::start("b");
    let edge = edge_for("no-upgrade", &backend, &[]);
    let mut stream = connect(edge.http);
    stream
        .write_all(b"GET /no-upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let first = read_response(&mut reader, false).unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "no upgrade here");
    let second = read_response(&mut reader, false).unwrap();
    assert_eq!(second.text(), "b /after 0");
    let paths: Vec<String> = backend
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(paths, vec!["/no-upgrade", "/after"]);
}

#[test]
fn half_sent_head_is_cut_off() {
    let backend = Backend::start("b");
    let edge = edge_for("slow-head", &backend, &["--header-read-timeout", "500ms"]);
    let mut stream = connect(edge.http);
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow:")
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let response = read_response(&mut reader, false).unwrap();
    assert_eq!(response.status, 408);
    assert!(is_closed(&mut stream, Duration::from_secs(5)));
}

#[test]
fn silent_backend_gives_504() {
    let backend = Backend::start("b");
    let edge = edge_for("never", &backend, &["--upstream-response-timeout", "500ms"]);
    let response = request(edge.http, "GET /never HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(response.status, 504);
    assert!(response.text().contains("did not answer in time"));
}

#[test]
fn refused_backend_gives_502() {
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let edge = Edge::start("refused", &routes_yaml(&[("app", "Host(`t`)", &url)]), &[]);
    let response = request(edge.http, "GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(response.status, 502);
    assert!(response.text().contains("could not be reached"));
}

#[test]
fn failed_connect_retries_other_backend() {
    let backend = Backend::start("good");
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let routes = format!(
        "http:\n  routers:\n    app:\n      rule: Host(`t`)\n      service: app\n      entryPoints: [web]\n  services:\n    app:\n      loadBalancer:\n        servers:\n          - url: {dead}\n          - url: {}\n",
        backend.url()
    );
    let edge = Edge::start("retry", &routes, &["--workers", "1"]);
    for i in 0..6 {
        let raw = format!("POST /{i} HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx");
        let response = request(edge.http, &raw);
        assert_eq!(response.status, 200, "request {i}");
    }
}

#[test]
fn local_response_closes_unread_body() {
    // A request answered by the edge itself (here 404) leaves its body unread, so the
    // connection is closed and the bytes in the body are never parsed as a request.
    let backend = Backend::start("b");
    let edge = edge_for("unread-body", &backend, &[]);
    let mut stream = connect(edge.http);
    let smuggled = "GET /admin HTTP/1.1\r\nHost: t\r\nX: y\r\n\r\n";
    let raw = format!(
        "GET /static.js HTTP/1.1\r\nHost: nowhere\r\nContent-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    stream.write_all(raw.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let response = read_response(&mut reader, false).unwrap();
    assert_eq!(response.status, 308);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(is_closed(&mut stream, Duration::from_secs(5)));
    assert_eq!(backend.request_count(), 0);
}

#[test]
fn route_body_limit_from_middleware() {
    let backend = Backend::start("b");
    let routes = format!(
        "http:\n  routers:\n    small:\n      rule: Host(`t`) && PathPrefix(`/small`)\n      service: app\n      entryPoints: [web]\n      middlewares: [limit]\n    big:\n      rule: Host(`t`)\n      service: app\n      entryPoints: [web]\n  middlewares:\n    limit:\n      buffering:\n        maxRequestBodyBytes: 4\n  services:\n    app:\n      loadBalancer:\n        servers:\n          - url: {}\n",
        backend.url()
    );
    let edge = Edge::start("route-limit", &routes, &[]);
    let body = "POST /small HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(request(edge.http, body).status, 413);
    let body = "POST /other HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(request(edge.http, body).status, 200);
}

#[test]
fn round_robin_spreads_requests() {
    let first = Backend::start("first");
    let second = Backend::start("second");
    let routes = format!(
        "http:\n  routers:\n    app:\n      rule: Host(`t`)\n      service: app\n      entryPoints: [web]\n  services:\n    app:\n      loadBalancer:\n        servers:\n          - url: {}\n          - url: {}\n",
        first.url(),
        second.url()
    );
    let edge = Edge::start("spread", &routes, &["--workers", "1"]);
    let mut stream = connect(edge.http);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for i in 0..10 {
        write!(stream, "GET /{i} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut reader, false).unwrap().status, 200);
    }
    assert_eq!(first.request_count(), 5);
    assert_eq!(second.request_count(), 5);
}
