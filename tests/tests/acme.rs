//! Certificates by ACME against a real ACME server: Debian's `pebble`, with
//! `pebble-challtestsrv` as its DNS server answering every name with 127.0.0.1, so that each
//! validation really connects to the edge on loopback.
//!
//! Each test runs its own pebble, its own edge and its own agent on a routes file, so no Docker
//! is needed. pebble makes a new root at every start, which the test fetches from its
//! management port.
//! Issued certificates are verified by curl and openssl against pebble's root, never with
//! `-k`. `cargo xtask test` installs pebble and sets `EDGE_E2E_PEBBLE=1`; without pebble and
//! without that variable these tests only print that they were skipped.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{mpsc, Mutex},
    thread,
    time::{Duration, Instant},
};

mod support;

use support::{binary, Process};

/// Maximum wait for an order to complete or a state to show.
const ISSUE_LIMIT: Duration = Duration::from_secs(90);

/// Serialises the tests: each runs pebble, an edge and an agent, and two cores do not run
/// several such stacks well.
static SERIAL: Mutex<()> = Mutex::new(());

fn pebble_enabled() -> bool {
    let installed = Command::new("sh")
        .args(["-c", "command -v pebble && command -v pebble-challtestsrv"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if std::env::var("EDGE_E2E_PEBBLE").as_deref() == Ok("1") {
        assert!(installed, "EDGE_E2E_PEBBLE=1 but pebble is not installed");
        return true;
    }
    if !installed {
        eprintln!("skipped: pebble is not installed (`cargo xtask test` installs it)");
    }
    installed
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) -> String {
    let output = cmd.output().expect("spawn");
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// pebble and pebble-challtestsrv.
struct Pebble {
    server: Process,
    _dns: Process,
    directory_url: String,
    /// The CA certificate of pebble's own HTTPS listener, for the agent's ACME_CA_BUNDLE.
    https_ca: PathBuf,
    /// pebble's root for issued certificates.
    root: PathBuf,
    dns_management: u16,
}

impl Pebble {
    /// Starts pebble validating on the edge's ports; `validity` sets the lifetime of issued
    /// certificates.
    fn start(dir: &Path, edge: &Edge, validity: Option<Duration>) -> Pebble {
        let dir = dir.join("pebble");
        std::fs::create_dir_all(&dir).unwrap();
        let https_ca = make_https_certificate(&dir);

        let dns_port = free_port();
        let dns_management = free_port();
        let (dns, _) = Process::spawn(
            Command::new("pebble-challtestsrv")
                .args([
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                    "-dns01",
                    &format!("127.0.0.1:{dns_port}"),
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-management",
                    &format!("127.0.0.1:{dns_management}"),
                ])
                // pebble-challtestsrv writes its pid file into its working directory.
                .current_dir(&dir),
            "Starting management server",
        );

        let listen = free_port();
        let management = free_port();
        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": dir.join("https.pem"),
                "privateKey": dir.join("https.key"),
                "httpPort": edge.http.port(),
                "tlsPort": edge.https.port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        if let Some(validity) = validity {
            config["pebble"]["certificateValidityPeriod"] = validity.as_secs().into();
        }
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let (server, _) = Process::spawn(
            Command::new("pebble")
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0"),
            "ACME directory available",
        );

        // pebble logs its addresses just before it binds them, so poll both until they respond.
        let cacert = https_ca.display().to_string();
        let directory_url = format!("https://127.0.0.1:{listen}/dir");
        curl_until_ok(&["--cacert", &cacert, &directory_url]);
        let root = dir.join("root.pem");
        let roots_url = format!("https://127.0.0.1:{management}/roots/0");
        let fetched = curl_until_ok(&["--cacert", &cacert, &roots_url]);
        std::fs::write(&root, fetched).unwrap();
        Pebble {
            server,
            _dns: dns,
            directory_url,
            https_ca,
            root,
            dns_management,
        }
    }

    /// Returns how many orders pebble has received.
    fn orders(&self) -> usize {
        self.server.count("Added order")
    }

    /// Makes DNS answer `host` with `address`, so that validations of `host` go there.
    fn set_address(&self, host: &str, address: &str) {
        self.dns_request(
            "add-a",
            serde_json::json!({ "host": host, "addresses": [address] }),
        );
    }

    /// Makes DNS answer `host` with the default address, 127.0.0.1, again.
    fn clear_address(&self, host: &str) {
        self.dns_request("clear-a", serde_json::json!({ "host": host }));
    }

    fn dns_request(&self, path: &str, body: serde_json::Value) {
        let url = format!("http://127.0.0.1:{}/{path}", self.dns_management);
        curl_until_ok(&["--data", &body.to_string(), &url]);
    }
}

/// Runs curl with `args` until it succeeds, for at most 10 seconds, and returns its output.
fn curl_until_ok(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--max-time", "5"])
            .args(args)
            .output()
            .expect("curl must be installed");
        if output.status.success() {
            return String::from_utf8_lossy(&output.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "curl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Makes a CA and a certificate for pebble's HTTPS listener (`localhost`, `127.0.0.1`) with
/// openssl, and returns the CA certificate's path.
fn make_https_certificate(dir: &Path) -> PathBuf {
    let ca = dir.join("https-ca.pem");
    let ca_key = dir.join("https-ca.key");
    let key = dir.join("https.key");
    let csr = dir.join("https.csr");
    let cert = dir.join("https.pem");
    let ext = dir.join("https.ext");
    std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];

    run(Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca)
        .args(["-days", "2", "-subj", "/CN=edge test pebble HTTPS CA"]));

    run(Command::new("openssl")
        .arg("req")
        .args(ec)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .args(["-subj", "/CN=localhost"]));

    run(Command::new("openssl")
        .args(["x509", "-req", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-CAcreateserial")
        .arg("-out")
        .arg(&cert)
        .args(["-days", "2", "-extfile"])
        .arg(&ext));
    ca
}

/// Starts a backend that returns its name for every request.
fn start_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || serve_backend(stream, name));
        }
    });
    addr
}

fn serve_backend(stream: TcpStream, name: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let mut line = String::new();
        // Read one request head; the tests send no bodies.
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
            name.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

struct Edge {
    process: Process,
    http: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
}

/// An edge, an agent and pebble sharing one state directory.
struct Stack {
    dir: PathBuf,
    edge: Edge,
    agent: Option<Process>,
    agent_env: Vec<(String, String)>,
    pebble: Option<Pebble>,
}

impl Stack {
    fn start(name: &str) -> Stack {
        let dir = std::env::temp_dir().join(format!("edge-acme-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (process, ready) = Process::spawn(
            Command::new(binary("edge"))
                .args(["--http-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0"])
                .args(["--admin-addr", "127.0.0.1:0", "--workers", "2"])
                .args(["--log-format", "json", "--keep-alive-timeout", "300s"])
                .arg("--state-dir")
                .arg(&dir)
                .env("EDGE_LOG", "info,edge::worker=debug"),
            "\"edge ready\"",
        );
        let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
        let field =
            |name: &str| -> SocketAddr { ready["fields"][name].as_str().unwrap().parse().unwrap() };
        let edge = Edge {
            http: field("http_addr"),
            https: field("https_addr"),
            admin: field("admin_addr"),
            process,
        };
        Stack {
            dir,
            edge,
            agent: None,
            agent_env: Vec::new(),
            pebble: None,
        }
    }

    fn start_pebble(&mut self, validity: Option<Duration>) -> &Pebble {
        let pebble = Pebble::start(&self.dir, &self.edge, validity);
        self.agent_env = vec![
            ("ACME_DIRECTORY_URL".into(), pebble.directory_url.clone()),
            (
                "ACME_CA_BUNDLE".into(),
                pebble.https_ca.display().to_string(),
            ),
            ("ACME_EMAIL".into(), "ops@example.test".into()),
        ];
        self.pebble.insert(pebble)
    }

    fn pebble(&self) -> &Pebble {
        self.pebble.as_ref().unwrap()
    }

    fn write_routes(&self, routes: &str) {
        let tmp = self.dir.join("routes.yaml.tmp");
        std::fs::write(&tmp, routes).unwrap();
        std::fs::rename(&tmp, self.dir.join("routes.yaml")).unwrap();
    }

    fn start_agent(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(binary("agent"));
        cmd.arg("--state-dir")
            .arg(&self.dir)
            .arg("--routes-file")
            .arg(self.dir.join("routes.yaml"))
            .args(["--docker", "false", "--log-format", "json"])
            .env("EDGE_LOG", "info")
            .env("ACME_RETRY_BASE", "1h");
        for (key, value) in &self.agent_env {
            cmd.env(key, value);
        }
        for (key, value) in env {
            cmd.env(key, value);
        }
        let (agent, _) = Process::spawn(&mut cmd, "agent started");
        self.agent = Some(agent);
    }

    fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.terminate();
        }
    }

    fn edgectl(&self, args: &[&str]) -> serde_json::Value {
        let output = Command::new(binary("edgectl"))
            .arg("--socket")
            .arg(self.dir.join("agent.sock"))
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "edgectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Waits until `edgectl certs` has a row for `main` for which `check` holds, and returns it.
    fn wait_for_cert(
        &self,
        main: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + ISSUE_LIMIT;
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            last = self.edgectl(&["certs"]);
            let row = last
                .as_array()
                .into_iter()
                .flatten()
                .find(|row| row["names"][0] == main);
            if let Some(row) = row.filter(|row| check(row)) {
                return row.clone();
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{}",
            self.failure(&format!(
                "certificate {main} never reached the expected state; last certs: {last:#}"
            ))
        );
    }

    /// Waits until the edge serves `host` over HTTPS with a certificate that verifies against
    /// pebble's root, and returns the body.
    fn wait_for_verified(&self, host: &str) -> String {
        let deadline = Instant::now() + ISSUE_LIMIT;
        let mut last = (0, String::new());
        while Instant::now() < deadline {
            last = self.curl_verified(host);
            if last.0 == 0 {
                return last.1;
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{}",
            self.failure(&format!(
                "{host} never served a verified certificate; last curl: {last:?}"
            ))
        );
    }

    /// Runs curl against `host` on the edge's HTTPS port, verifying against pebble's root.
    /// Returns curl's exit code and the body (or the error).
    fn curl_verified(&self, host: &str) -> (i32, String) {
        let port = self.edge.https.port();
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
            .arg(&self.pebble().root)
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .arg(format!("https://{host}:{port}/"))
            .output()
            .unwrap();
        let code = output.status.code().unwrap_or(-1);
        let text = if code == 0 {
            String::from_utf8_lossy(&output.stdout).into_owned()
        } else {
            String::from_utf8_lossy(&output.stderr).into_owned()
        };
        (code, text)
    }

    /// Returns the subject, issuer and serial of the certificate the edge serves for `host`.
    fn served_certificate(&self, host: &str) -> String {
        let script = format!(
            "openssl s_client -connect {} -servername {host} </dev/null 2>/dev/null | openssl x509 -noout -subject -issuer -serial",
            self.edge.https
        );
        run(Command::new("sh").args(["-c", &script]))
    }

    /// Returns the body of `GET /` for `host` over plain HTTP, or an empty string on failure.
    fn get_plain(&self, host: &str) -> String {
        let port = self.edge.http.port();
        let output = Command::new("curl")
            .args(["--silent", "--max-time", "5", "--resolve"])
            .arg(format!("{host}:{port}:127.0.0.1"))
            .arg(format!("http://{host}:{port}/"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(self.edge.admin).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }

    /// Describes a failure with every process's output.
    fn failure(&self, message: &str) -> String {
        let agent = self.agent.as_ref().map(Process::output).unwrap_or_default();
        let pebble = self
            .pebble
            .as_ref()
            .map(|p| p.server.output())
            .unwrap_or_default();
        format!(
            "{message}\nagent:\n{agent}\nedge:\n{}\npebble:\n{pebble}",
            self.edge.process.output()
        )
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Builds a routes file. Each site is (router, rule, backend, TLS resolver or none for plain
/// HTTP).
fn routes(sites: &[(&str, &str, SocketAddr, Option<&str>)]) -> String {
    let mut routers = String::new();
    let mut services = String::new();
    for (name, rule, backend, resolver) in sites {
        routers.push_str(&format!(
            "    {name}:\n      rule: \"{rule}\"\n      service: {name}\n"
        ));
        match resolver {
            Some(resolver) => {
                routers.push_str(&format!("      tls:\n        certResolver: {resolver}\n"))
            }
            None => routers.push_str("      entryPoints: [web]\n"),
        }
        services.push_str(&format!(
            "    {name}:\n      loadBalancer:\n        servers:\n          - url: \"http://{backend}\"\n"
        ));
    }
    format!("http:\n  routers:\n{routers}  services:\n{services}")
}

/// Issues a certificate for a router with two hosts with `challenge`, checks that curl
/// verifies it for both hosts, and returns the stack.
fn issue_for_two_hosts(name: &str, challenge: &str) -> Stack {
    let mut stack = Stack::start(name);
    stack.start_pebble(None);
    let backend = start_backend("shop");
    stack.write_routes(&routes(&[(
        "shop",
        "Host(`shop.test`) || Host(`www.shop.test`)",
        backend,
        Some("le"),
    )]));
    stack.start_agent(&[("ACME_CHALLENGE", challenge)]);

    assert_eq!(stack.wait_for_verified("shop.test"), "shop");
    assert_eq!(stack.wait_for_verified("www.shop.test"), "shop");
    let row = stack.wait_for_cert("shop.test", |row| row["status"] == "valid");
    assert_eq!(
        row["names"],
        serde_json::json!(["shop.test", "www.shop.test"])
    );
    assert!(
        row["issuer"]
            .as_str()
            .is_some_and(|i| i.starts_with("Pebble")),
        "{row}"
    );
    assert!(row["not_after_unix"].as_i64().is_some(), "{row}");
    stack
}

#[test]
fn http01_issues_for_two_hosts() {
    if !pebble_enabled() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let stack = issue_for_two_hosts("http01", "http-01");
    let metrics = stack.metrics();
    let expiry = metrics
        .lines()
        .find(|l| l.starts_with("edge_certificate_expiry_days{name=\"shop.test\""));
    let days: f64 = expiry
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no expiry metric for shop.test:\n{metrics}"));
    assert!(days > 1.0, "{days}");
    // An SNI that no router declares gets the default certificate and starts no order.
    let served = stack.served_certificate("random.test");
    assert!(served.contains("edge default certificate"), "{served}");
    assert_eq!(stack.pebble().orders(), 1);
    assert_eq!(stack.edgectl(&["certs"]).as_array().map(Vec::len), Some(1));

    // The CA validated both names over HTTP.
    let pebble = stack.pebble().server.output();
    assert!(
        pebble.contains("validate w/ HTTP: http://shop.test:"),
        "{pebble}"
    );
    assert!(
        pebble.contains("validate w/ HTTP: http://www.shop.test:"),
        "{pebble}"
    );
}

#[test]
fn tls_alpn01_issues_for_two_hosts() {
    if !pebble_enabled() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let stack = issue_for_two_hosts("tlsalpn", "tls-alpn-01");
    // openssl verifies the chain against pebble's root too.
    let script = format!(
        "openssl s_client -connect {} -servername shop.test -CAfile {} -verify_return_error </dev/null",
        stack.edge.https,
        stack.pebble().root.display()
    );
    let output = run(Command::new("sh").args(["-c", &script]));
    assert!(output.contains("Verify return code: 0 (ok)"), "{output}");
    // The CA validated both names with acme-tls/1 handshakes, which the edge closed.
    let validations = stack.edge.process.count("ACME TLS-ALPN-01 handshake done");
    assert!(
        validations >= 2,
        "{}",
        stack.failure("too few TLS-ALPN-01 handshakes")
    );
}

#[test]
fn restart_reuses_stored_certificate() {
    if !pebble_enabled() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut stack = issue_for_two_hosts("restart", "http-01");
    let orders = stack.pebble().orders();
    assert_eq!(orders, 1);
    let served = stack.served_certificate("shop.test");

    stack.stop_agent();
    stack.start_agent(&[]);
    stack.wait_for_cert("shop.test", |row| row["status"] == "valid");
    let agent = stack.agent.as_ref().unwrap();
    assert_eq!(
        agent.count("stored certificate reused"),
        1,
        "{}",
        agent.output()
    );
    assert_eq!(
        agent.count("ordering a certificate"),
        0,
        "{}",
        agent.output()
    );
    assert_eq!(stack.pebble().orders(), orders);
    assert_eq!(stack.served_certificate("shop.test"), served);
    assert_eq!(stack.wait_for_verified("shop.test"), "shop");

    // The stored key is readable by its owner only.
    let storage = stack.dir.join("acme").join("le").join("certs");
    let cert_dir = std::fs::read_dir(&storage)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cert_dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let account = stack.dir.join("acme").join("le").join("account.json");
    let mode = std::fs::metadata(account).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// A TLS connection kept open through openssl s_client.
struct OpenConnection {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl OpenConnection {
    fn open(stack: &Stack, host: &str) -> OpenConnection {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-connect",
                &stack.edge.https.to_string(),
            ])
            .args(["-servername", host, "-CAfile"])
            .arg(&stack.pebble().root)
            .arg("-verify_return_error")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0
                    || tx
                        .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                        .is_err()
                {
                    return;
                }
            }
        });
        OpenConnection {
            child,
            stdin,
            lines,
        }
    }

    /// Sends a request on the open connection and waits for a response that ends with `body`.
    fn request(&mut self, host: &str, body: &str) -> String {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        self.stdin.write_all(request.as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut text = String::new();
        while Instant::now() < deadline {
            if let Ok(chunk) = self.lines.recv_timeout(Duration::from_millis(200)) {
                text.push_str(&chunk);
                if text.ends_with(body) {
                    return text;
                }
            }
        }
        panic!("no response on the open connection; got {text:?}");
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn short_lived_certificate_is_renewed() {
    if !pebble_enabled() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut stack = Stack::start("renew");
    // Renewal starts two thirds into the 30 seconds.
    stack.start_pebble(Some(Duration::from_secs(30)));
    let backend = start_backend("shop");
    stack.write_routes(&routes(&[(
        "shop",
        "Host(`shop.test`)",
        backend,
        Some("le"),
    )]));
    stack.start_agent(&[]);
    assert_eq!(stack.wait_for_verified("shop.test"), "shop");
    let first = stack.served_certificate("shop.test");

    let mut open = OpenConnection::open(&stack, "shop.test");
    let response = open.request("shop.test", "shop");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let deadline = Instant::now() + ISSUE_LIMIT;
    let mut current = first.clone();
    while Instant::now() < deadline && current == first {
        thread::sleep(Duration::from_millis(500));
        current = stack.served_certificate("shop.test");
    }
    assert_ne!(
        current,
        first,
        "{}",
        stack.failure("the certificate was never renewed")
    );
    assert_eq!(stack.wait_for_verified("shop.test"), "shop");
    assert!(stack.pebble().orders() >= 2);

    // The connection opened before the renewal still serves requests.
    let response = open.request("shop.test", "shop");
    assert!(response.contains("HTTP/1.1 200"), "{response}");
}

#[test]
fn failed_validation_leaves_other_sites_serving() {
    if !pebble_enabled() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut stack = Stack::start("failed");
    stack.start_pebble(None);
    // Nothing listens on 127.0.0.2, so validations of bad.test fail.
    stack.pebble().set_address("bad.test", "127.0.0.2");
    let good = start_backend("good");
    let bad = start_backend("bad");
    stack.write_routes(&routes(&[
        ("good", "Host(`good.test`)", good, Some("le")),
        ("bad", "Host(`bad.test`)", bad, Some("le")),
    ]));
    stack.start_agent(&[]);

    assert_eq!(stack.wait_for_verified("good.test"), "good");
    let row = stack.wait_for_cert("bad.test", |row| row["status"] == "failed");
    let error = row["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("bad.test"), "{row}");
    assert!(row["next_retry_unix"].as_i64().is_some(), "{row}");
    // bad.test is still served, with the self-signed default certificate.
    let served = stack.served_certificate("bad.test");
    assert!(served.contains("edge default certificate"), "{served}");
    assert_eq!(stack.wait_for_verified("good.test"), "good");

    // Once DNS is fixed, an operator's retry orders at once.
    stack.pebble().clear_address("bad.test");
    let retry = stack.edgectl(&["retry-cert", "bad.test"]);
    assert_eq!(retry["retrying"], serde_json::json!(["bad.test"]));
    assert_eq!(stack.wait_for_verified("bad.test"), "bad");
    let row = stack.wait_for_cert("bad.test", |row| row["status"] == "valid");
    assert!(row["last_error"].is_null(), "{row}");
}

#[test]
fn unreachable_ca_does_not_block_routes() {
    if !pebble_enabled() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut stack = Stack::start("unreachable");
    stack.start_pebble(None);
    // Resolver `down` points at a port where nothing listens, so every request to it fails.
    let closed = free_port();
    let resolvers = stack.dir.join("resolvers.toml");
    std::fs::write(
        &resolvers,
        format!("[resolvers.down]\ndirectory_url = \"https://127.0.0.1:{closed}/dir\"\n"),
    )
    .unwrap();
    let good = start_backend("good");
    let site = start_backend("site");
    let plain = start_backend("plain");
    let mut sites = vec![
        ("good", "Host(`good.test`)", good, Some("le")),
        ("site", "Host(`site.test`)", site, Some("down")),
        ("plain", "Host(`plain.test`)", plain, None),
    ];
    stack.write_routes(&routes(&sites));
    let resolvers = resolvers.display().to_string();
    let env = [
        ("ACME_RESOLVERS_FILE", resolvers.as_str()),
        ("ACME_RETRY_BASE", "1h"),
    ];
    stack.start_agent(&env);

    let row = stack.wait_for_cert("site.test", |row| row["status"] == "failed");
    let error = row["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("Connection refused"), "{row}");
    let next_retry = row["next_retry_unix"].as_i64().unwrap();
    assert_eq!(stack.wait_for_verified("good.test"), "good");
    assert_eq!(stack.get_plain("plain.test"), "plain");

    // Routes keep updating while the CA is down.
    let added = start_backend("added");
    sites.push(("added", "Host(`added.test`)", added, None));
    stack.write_routes(&routes(&sites));
    stack.edgectl(&["reload"]);
    let deadline = Instant::now() + ISSUE_LIMIT;
    let mut body = String::new();
    while Instant::now() < deadline && body != "added" {
        body = stack.get_plain("added.test");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        body,
        "added",
        "{}",
        stack.failure("the new route was not served")
    );

    // A restarted agent keeps the backoff and the issued certificate: it orders nothing.
    stack.stop_agent();
    stack.start_agent(&env);
    let row = stack.wait_for_cert("site.test", |row| row["status"] == "failed");
    assert_eq!(row["next_retry_unix"].as_i64(), Some(next_retry), "{row}");
    stack.wait_for_cert("good.test", |row| row["status"] == "valid");
    let agent = stack.agent.as_ref().unwrap();
    assert_eq!(
        agent.count("ordering a certificate"),
        0,
        "{}",
        agent.output()
    );
}
