//! The built-in demo: a small backend and routes to it, so a fresh checkout can be tried with
//! one command.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use edge_proto::{Balance, Router, Server, ServerState, Service, Snapshot};
use tracing::debug;

/// Starts the demo backend on an ephemeral loopback port and returns its address.
///
/// # Errors
/// Fails when the port cannot be bound.
pub fn start_backend() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("edge-demo-backend".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = std::thread::Builder::new()
                    .name("edge-demo-conn".into())
                    .spawn(move || serve_backend_conn(stream));
            }
        })?;
    Ok(addr)
}

fn serve_backend_conn(stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end().to_owned();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap_or(0);
                }
                headers.push((name.to_owned(), value.trim().to_owned()));
            }
        }
        let mut body = vec![0u8; content_length.min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
        let header = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map_or("-", |(_, v)| v.as_str())
                .to_owned()
        };
        let text = if path == "/health" {
            "ok\n".to_owned()
        } else {
            format!(
                "Hello from the edge demo backend.\npath: {path}\nhost: {}\nx-forwarded-for: {}\nx-forwarded-proto: {}\nx-request-id: {}\n",
                header("host"),
                header("x-forwarded-for"),
                header("x-forwarded-proto"),
                header("x-request-id"),
            )
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            debug!("demo backend client went away");
            return;
        }
    }
}

/// Routes every HTTPS request, and plain HTTP to `plain.localhost`, to the demo backend.
pub fn snapshot(backend: SocketAddr) -> Snapshot {
    let service = Service {
        name: "demo".into(),
        servers: vec![Server {
            url: format!("http://{backend}"),
            state: ServerState::Up,
        }],
        balance: Balance::RoundRobin,
        pass_host_header: true,
        servers_transport: None,
    };
    Snapshot {
        version: 1,
        routers: vec![
            Router {
                name: "demo".into(),
                rule: "PathPrefix(`/`)".into(),
                priority: None,
                entrypoints: vec!["websecure".into()],
                service: "demo".into(),
                tls: true,
                max_request_body_bytes: None,
            },
            Router {
                name: "demo-plain".into(),
                rule: "Host(`plain.localhost`)".into(),
                priority: None,
                entrypoints: vec!["web".into()],
                service: "demo".into(),
                tls: false,
                max_request_body_bytes: None,
            },
        ],
        services: vec![service],
        certificates: Vec::new(),
        default_certificate: None,
        acme_challenges: Default::default(),
        servers_transports: Vec::new(),
    }
}
