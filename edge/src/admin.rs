//! The admin listener: the edge's own `GET /health` and `GET /metrics`, on a separate address
//! so they never shadow a site's paths.
//!
//! Scrapes are rare and tiny, so one blocking thread serves them one connection at a time.

use std::{
    io::{Read, Write},
    net::TcpListener,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tracing::warn;

use crate::{metrics, state::Shared};

/// Serves admin requests on `listener` until the process exits.
pub fn serve(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 2048];
        let mut len = 0;
        while len < buf.len() {
            match stream.read(&mut buf[len..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => len += n,
            }
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let request_line = buf[..len].split(|&b| b == b'\r').next().unwrap_or_default();
        let (status, content_type, body) = route(request_line, &shared);
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes());
    }
}

fn route(request_line: &[u8], shared: &Shared) -> (&'static str, &'static str, String) {
    let mut parts = request_line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    if method != b"GET" && method != b"HEAD" {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match path {
        b"/health" => {
            let ready = shared.ready_workers.load(Ordering::SeqCst);
            if ready >= shared.settings.workers {
                ("200 OK", "text/plain", "ok\n".into())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    format!(
                        "starting: {ready} of {} workers ready\n",
                        shared.settings.workers
                    ),
                )
            }
        }
        b"/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics::render(shared),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}
