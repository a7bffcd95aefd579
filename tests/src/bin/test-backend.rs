//! A tiny HTTP/1.1 backend for the Docker tests, built as a static binary for a `FROM scratch`
//! image. `/` answers with its name; `/health` answers 503 during a start-up delay, then 200,
//! and 503 again from SIGTERM on while it keeps serving for a drain time.
//!
//! Environment: `BACKEND_NAME` (default: the host name), `PORT` (8080), `STARTUP_DELAY_MS`
//! (0), `DRAIN_MS` (2000), `DOCKER_READY_AFTER_MS` (0).
//!
//! `test-backend --check` is a Docker HEALTHCHECK command: it exits 0 once the server has run
//! for `DOCKER_READY_AFTER_MS`, independently of `/health`, so tests can tell the two gates
//! apart.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Marker file the server writes once Docker's health check may pass.
const READY_MARKER: &str = "/tmp/docker-ready";

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--check") {
        let ready = std::path::Path::new(READY_MARKER).exists();
        std::process::exit(if ready { 0 } else { 1 });
    }
    let docker_ready_after = Duration::from_millis(env_u64("DOCKER_READY_AFTER_MS", 0));
    thread::spawn(move || {
        thread::sleep(docker_ready_after);
        let _ = std::fs::create_dir_all("/tmp");
        if let Err(e) = std::fs::write(READY_MARKER, b"ready") {
            eprintln!("test-backend: cannot write {READY_MARKER}: {e}");
        }
    });
    let name = std::env::var("BACKEND_NAME")
        .or_else(|_| std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()))
        .unwrap_or_else(|_| "backend".to_owned());
    let port = env_u64("PORT", 8080);
    let ready_at = Instant::now() + Duration::from_millis(env_u64("STARTUP_DELAY_MS", 0));
    let drain = Duration::from_millis(env_u64("DRAIN_MS", 2000));

    let terminating = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, terminating.clone()) {
            eprintln!("test-backend: cannot handle signal {signal}: {e}");
        }
    }
    let listener = match TcpListener::bind(("0.0.0.0", port as u16)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("test-backend: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("test-backend {name} listening on port {port}");
    {
        let terminating = terminating.clone();
        thread::spawn(move || {
            while !terminating.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
            }
            eprintln!("test-backend: SIGTERM received, draining for {drain:?}");
            thread::sleep(drain);
            std::process::exit(0);
        });
    }
    let name = Arc::new(name);
    for stream in listener.incoming().flatten() {
        let name = name.clone();
        let terminating = terminating.clone();
        thread::spawn(move || serve(stream, &name, ready_at, &terminating));
    }
}

fn serve(stream: TcpStream, name: &str, ready_at: Instant, terminating: &AtomicBool) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((key, value)) = line.split_once(':') {
                if key.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; content_length.min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let path = request_line.split(' ').nth(1).unwrap_or("/");
        let (status, text) = if path == "/health" {
            if terminating.load(Ordering::SeqCst) || Instant::now() < ready_at {
                ("503 Service Unavailable", "not ready\n".to_owned())
            } else {
                ("200 OK", "ok\n".to_owned())
            }
        } else {
            ("200 OK", format!("{name}\n"))
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}
