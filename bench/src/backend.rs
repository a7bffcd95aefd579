//! The static backend behind every proxy. It responds to each HTTP/1.1 request with the same
//! small 200 response over keep-alive connections, so that the proxy, not the backend, limits
//! throughput.

use std::{
    net::{SocketAddr, TcpListener},
    thread::JoinHandle,
};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Body of every response.
pub const BODY: &str = "hello from the edge bench backend\n";

/// Largest request head the backend buffers before it responds with 431 and closes.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Maximum number of header lines in one request.
const MAX_HEADERS: usize = 64;

/// A running backend. Its threads stop when the process exits.
pub struct Backend {
    pub addr: SocketAddr,
    _threads: Vec<JoinHandle<()>>,
}

/// Binds `addr` (port 0 picks a free port) and serves it on `threads` threads, each with its
/// own current-thread tokio runtime accepting from the shared listener.
///
/// # Errors
/// Fails when the address cannot be bound or a thread cannot start.
pub fn spawn(addr: SocketAddr, threads: usize) -> anyhow::Result<Backend> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("binding the backend to {addr}"))?;
    listener
        .set_nonblocking(true)
        .context("making the backend listener non-blocking")?;
    let bound = listener
        .local_addr()
        .context("reading the backend address")?;
    let mut handles = Vec::new();
    for index in 0..threads.max(1) {
        let listener = listener
            .try_clone()
            .context("cloning the backend listener")?;
        let handle = std::thread::Builder::new()
            .name(format!("backend-{index}"))
            .spawn(move || {
                if let Err(e) = serve_listener(listener) {
                    eprintln!("bench backend: thread {index} stopped: {e:#}");
                }
            })
            .context("spawning a backend thread")?;
        handles.push(handle);
    }
    Ok(Backend {
        addr: bound,
        _threads: handles,
    })
}

fn serve_listener(listener: TcpListener) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the backend runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let listener = tokio::net::TcpListener::from_std(listener)
            .context("registering the backend listener")?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::task::spawn_local(serve_connection(stream));
                }
                // NOTE: accept fails transiently under fd exhaustion (EMFILE). Pausing instead
                // of spinning lets the other threads keep serving.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    })
}

async fn serve_connection(mut stream: tokio::net::TcpStream) {
    let mut buf = Vec::with_capacity(8 * 1024);
    let mut out = Vec::with_capacity(1024);
    loop {
        let mut close = false;
        // Respond to every complete request in the buffer, pipelined ones included.
        loop {
            match next_request(&buf) {
                Ok(Some(request)) => {
                    buf.drain(..request.len);
                    out.extend_from_slice(response(request.close).as_bytes());
                    if request.close {
                        close = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(rejection) => {
                    out.extend_from_slice(rejection.as_bytes());
                    close = true;
                    break;
                }
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            return;
        }
        if buf.len() >= MAX_HEAD_BYTES {
            let _ = stream.write_all(TOO_LARGE.as_bytes()).await;
            return;
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A complete request at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    /// Bytes of head and body.
    len: usize,
    /// The client asked to close the connection after the response.
    close: bool,
}

const BAD_REQUEST: &str =
    "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const CHUNKED_UNSUPPORTED: &str =
    "HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const TOO_LARGE: &str =
    "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Finds the first complete request in `buf`. Returns the response to send before closing when
/// the request is invalid or uses a chunked body, which the backend does not read.
fn next_request(buf: &[u8]) -> Result<Option<Request>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(BAD_REQUEST),
    };
    let mut close = request.version == Some(0);
    let mut body_len = 0usize;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("");
        if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            body_len = value.trim().parse().map_err(|_| BAD_REQUEST)?;
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(CHUNKED_UNSUPPORTED);
        }
    }
    let len = head_len.saturating_add(body_len);
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Request { len, close }))
}

fn response(close: bool) -> String {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{BODY}",
        BODY.len()
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    #[test]
    fn get_without_body_is_complete() {
        let buf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET";
        assert_eq!(
            next_request(buf),
            Ok(Some(Request {
                len: buf.len() - 3,
                close: false
            }))
        );
    }

    #[test]
    fn body_waits_for_all_bytes() {
        let buf = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab";
        assert_eq!(next_request(buf), Ok(None));
    }

    #[test]
    fn http10_request_closes() {
        let request = next_request(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(request.close);
    }

    #[test]
    fn chunked_request_is_rejected() {
        let buf = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(next_request(buf), Err(CHUNKED_UNSUPPORTED));
    }

    #[test]
    fn pipelined_requests_get_two_responses() {
        let backend = spawn("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let mut client = std::net::TcpStream::connect(backend.addr).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
        assert!(answer.ends_with(BODY), "{answer}");
    }
}
