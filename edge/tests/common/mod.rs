//! Test harness: runs the real `edge` binary on loopback ports and a scriptable HTTP/1.1
//! backend built on std sockets.
#![allow(dead_code)]

pub mod h3client;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

/// A running edge process; stopped with SIGKILL when dropped unless stopped before.
pub struct Edge {
    pub child: Child,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    /// stderr lines (JSON logs) read so far.
    pub logs: Arc<Mutex<Vec<String>>>,
    /// stdout lines (access log).
    pub access: Arc<Mutex<Vec<String>>>,
    pub dir: PathBuf,
}

/// Creates a fresh directory under the system temp dir; the test removes it when it passes.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "edge-test-{name}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ (thread_id_hash())
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn thread_id_hash() -> u128 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    thread::current().id().hash(&mut h);
    h.finish() as u128
}

impl Edge {
    /// Starts the edge with `routes` (YAML) written to a file in a new directory, listening on
    /// ephemeral loopback ports, with `extra` flags.
    pub fn start(name: &str, routes: &str, extra: &[&str]) -> Edge {
        let dir = temp_dir(name);
        let routes_file = dir.join("routes.yaml");
        std::fs::write(&routes_file, routes).unwrap();
        Self::start_with_file(dir, &routes_file, extra)
    }

    pub fn start_with_file(dir: PathBuf, routes_file: &Path, extra: &[&str]) -> Edge {
        let mut args: Vec<String> = vec!["--routes-file".into(), routes_file.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_in(dir, &args)
    }

    /// Starts the edge in `dir` with exactly `args` besides the listener addresses.
    pub fn start_in(dir: PathBuf, args: &[String]) -> Edge {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge"));
        cmd.args([
            "--http-addr",
            "127.0.0.1:0",
            "--https-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--reload-interval",
            "100ms",
        ])
        .args(args)
        .env("EDGE_WORKERS", "2")
        .env("EDGE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn edge");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let access = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        {
            let logs = logs.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("\"edge ready\"") {
                        let _ = ready_tx.send(line.clone());
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        {
            let access = access.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    access.lock().unwrap().push(line);
                }
            });
        }
        let ready = match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "edge did not become ready; logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        let value: serde_json::Value = serde_json::from_str(&ready).unwrap();
        let field =
            |name: &str| -> SocketAddr { value["fields"][name].as_str().unwrap().parse().unwrap() };
        Edge {
            http: field("http_addr"),
            https: field("https_addr"),
            admin: field("admin_addr"),
            child,
            logs,
            access,
            dir,
        }
    }

    pub fn routes_file(&self) -> PathBuf {
        self.dir.join("routes.yaml")
    }

    /// Replaces the routes file atomically (write, then rename), as deploy tools do.
    pub fn write_routes(&self, routes: &str) {
        let tmp = self.dir.join("routes.yaml.tmp");
        std::fs::write(&tmp, routes).unwrap();
        std::fs::rename(&tmp, self.routes_file()).unwrap();
    }

    /// Waits until a log line contains `needle`, for at most `limit`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.logs.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits for a log line containing `needle`; fails the test with every log line if none
    /// appears within `limit`.
    pub fn expect_log(&self, needle: &str, limit: Duration) {
        if !self.wait_for_log(needle, limit) {
            panic!(
                "no log line contains {needle:?} after {limit:?}; logs:\n{}",
                self.logs.lock().unwrap().join("\n")
            );
        }
    }

    /// Fetches /metrics until `line` appears in it, or fails the test with the last scrape.
    /// Counters are updated after a response is sent, so a scrape may briefly lag behind.
    pub fn expect_metric(&self, line: &str) {
        let mut last = String::new();
        for _ in 0..100 {
            last = request(self.admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").text();
            if last.contains(line) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("/metrics never contained {line:?}; last scrape:\n{last}");
    }

    pub fn log_count(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with a PID of a child this test spawned and still owns.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Resident memory of the edge process in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }

    /// Peak resident memory of the edge process in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:")
    }
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A parsed HTTP/1.1 response read by [`read_response`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response from `reader` (Content-Length, chunked, or until close).
pub fn read_response<R: BufRead>(reader: &mut R, head_request: bool) -> std::io::Result<Response> {
    let mut status_line = String::new();
    if reader.read_line(&mut status_line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(response);
    }
    if let Some(len) = response.header("content-length") {
        let len: usize = len.parse().unwrap();
        response.body = vec![0; len];
        reader.read_exact(&mut response.body)?;
    } else if response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            let size = usize::from_str_radix(size_line.trim_end(), 16).unwrap();
            if size == 0 {
                // Trailers, then the final CRLF.
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line)?;
                    if line.trim_end().is_empty() {
                        break;
                    }
                    let (k, v) = line.trim_end().split_once(':').unwrap();
                    response
                        .headers
                        .push((format!("trailer:{}", k.trim()), v.trim().to_owned()));
                }
                break;
            }
            let mut chunk = vec![0; size];
            reader.read_exact(&mut chunk)?;
            response.body.extend_from_slice(&chunk);
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf)?;
        }
    } else {
        reader.read_to_end(&mut response.body)?;
    }
    Ok(response)
}

/// Opens a plain TCP connection with a read timeout.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Sends `raw` on a new connection and reads one response.
pub fn request(addr: SocketAddr, raw: &str) -> Response {
    let mut stream = connect(addr);
    stream.write_all(raw.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    read_response(&mut reader, raw.starts_with("HEAD ")).unwrap()
}

/// Returns whether the peer has closed `stream` (EOF within `limit`).
pub fn is_closed(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + limit;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

/// Runs curl with `args` and returns (exit code, stdout).
pub fn curl(args: &[&str]) -> (i32, String) {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl must be installed");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// A request as the test backend saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    pub trailers: Vec<(String, String)>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    }
}

/// How the test backend behaves.
#[derive(Clone)]
pub struct BackendOptions {
    pub name: String,
    /// Close a keep-alive connection after this much idle time.
    pub idle_close: Option<Duration>,
    /// Advertise `Keep-Alive: timeout=N`.
    pub keep_alive_header: Option<u64>,
}

impl BackendOptions {
    pub fn named(name: &str) -> Self {
        Self {
            name: name.into(),
            idle_close: None,
            keep_alive_header: None,
        }
    }
}

/// A scriptable HTTP/1.1 backend. Paths select the behaviour:
/// `/slow/MS` answers after MS milliseconds; `/never` never answers; `/chunked` answers with a
/// chunked body and a trailer; `/close` answers without Content-Length and closes;
/// `/bytes/N` responds with N bytes written in pieces; `/ws` accepts an Upgrade with 101 and then echoes bytes; `/no-upgrade` answers 200 to an
/// Upgrade request; `/health` answers 200; anything else answers `NAME PATH`, with the body
/// length for requests that have one.
pub struct Backend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<Mutex<Vec<SeenRequest>>>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Self::start_with(BackendOptions::named(name))
    }

    pub fn start_with(options: BackendOptions) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        {
            let connections = connections.clone();
            let requests = requests.clone();
            thread::spawn(move || {
                for stream in listener.incoming().map_while(Result::ok) {
                    connections.fetch_add(1, Ordering::SeqCst);
                    let options = options.clone();
                    let requests = requests.clone();
                    thread::spawn(move || serve_backend(stream, &options, &requests));
                }
            });
        }
        Backend {
            addr,
            connections,
            requests,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn last_request(&self) -> SeenRequest {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request reached the backend")
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

fn serve_backend(stream: TcpStream, options: &BackendOptions, requests: &Mutex<Vec<SeenRequest>>) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        reader
            .get_ref()
            .set_read_timeout(options.idle_close)
            .unwrap();
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let header = |n: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let mut body_len = 0usize;
        let mut trailers = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        if let Some(len) = header("content-length") {
            let mut left: usize = len.parse().unwrap();
            while left > 0 {
                let n = reader.read(&mut buf[..left.min(64 * 1024)]).unwrap_or(0);
                if n == 0 {
                    return;
                }
                left -= n;
                body_len += n;
            }
        } else if header("transfer-encoding").is_some() {
            loop {
                let mut size_line = String::new();
                if reader.read_line(&mut size_line).unwrap_or(0) == 0 {
                    return;
                }
                let size = usize::from_str_radix(size_line.trim_end(), 16).unwrap();
                if size == 0 {
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).unwrap();
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        let (k, v) = line.split_once(':').unwrap();
                        trailers.push((k.trim().to_owned(), v.trim().to_owned()));
                    }
                    break;
                }
                let mut left = size;
                while left > 0 {
                    let n = reader.read(&mut buf[..left.min(64 * 1024)]).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    left -= n;
                    body_len += n;
                }
                let mut crlf = [0u8; 2];
                reader.read_exact(&mut crlf).unwrap();
            }
        }
        let upgrade = header("upgrade");
        requests.lock().unwrap().push(SeenRequest {
            method: method.clone(),
            path: path.clone(),
            headers: headers.clone(),
            body_len,
            trailers,
        });

        let keep_alive = match options.keep_alive_header {
            Some(secs) => format!("Keep-Alive: timeout={secs}\r\n"),
            None => String::new(),
        };
        let simple = |text: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{keep_alive}\r\n{text}",
                text.len()
            )
        };
        if let Some(ms) = path.strip_prefix("/slow/") {
            thread::sleep(Duration::from_millis(ms.parse().unwrap()));
        }
        let response = match path.as_str() {
            "/never" => {
                thread::sleep(Duration::from_secs(60));
                return;
            }
            "/chunked" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n".to_owned(),
            "/close" => {
                let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close body");
                return;
            }
            "/ws" if upgrade.is_some() => {
                let _ = writer.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
                let mut buf = [0u8; 4096];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if writer.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            _ if path.starts_with("/bytes/") => {
                // A large body written in pieces, so the proxy must stream it.
                let total: usize = path["/bytes/".len()..].parse().unwrap();
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n");
                if writer.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let piece = vec![b'b'; 64 * 1024];
                let mut left = total;
                while left > 0 {
                    let n = left.min(piece.len());
                    if writer.write_all(&piece[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
                continue;
            }
            "/no-upgrade" => simple("no upgrade here"),
            "/health" => simple("ok"),
            "/big" => {
                let body = "x".repeat(1 << 20);
                simple(&body)
            }
            _ if method == "HEAD" => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n{keep_alive}\r\n"
            ),
            _ => simple(&format!("{} {} {}", options.name, path, body_len)),
        };
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// Returns a YAML routes file with one router per `(name, rule, backend url)`, served on both
/// listeners (plain HTTP is not redirected).
pub fn routes_yaml(routes: &[(&str, &str, &str)]) -> String {
    let mut out = String::from("http:\n  routers:\n");
    for (name, rule, _) in routes {
        out.push_str(&format!(
            "    {name}:\n      rule: \"{}\"\n      service: {name}\n      entryPoints: [web, websecure]\n",
            rule.replace('"', "\\\"")
        ));
    }
    out.push_str("  services:\n");
    for (name, _, url) in routes {
        out.push_str(&format!(
            "    {name}:\n      loadBalancer:\n        servers:\n          - url: \"{url}\"\n"
        ));
    }
    out
}
