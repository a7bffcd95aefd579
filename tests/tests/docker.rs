//! Edge and agent together on a real Docker engine: sites declared by Traefik labels, health
//! gating, replicas, rolling replacements and engine restarts.
//!
//! Containers are started with `docker run` and the labels Compose sets
//! (`com.docker.compose.project`, `com.docker.compose.service`), which is all the agent reads
//! of a Compose project. `cargo xtask test` starts the engine, builds the `test-backend`
//! image and sets `EDGE_E2E_DOCKER=1`; without it these tests only print that they were
//! skipped.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

mod support;

use support::{binary, Process};

const IMAGE: &str = "edge-test-backend:latest";
/// The same backend with a Docker HEALTHCHECK (`test-backend --check` every 500 ms).
const IMAGE_WITH_HEALTHCHECK: &str = "edge-test-backend:healthcheck";

/// Serialises the tests, because every agent reads every container on the engine, and two cores do
/// not run several stacks well.
static SERIAL: Mutex<()> = Mutex::new(());

fn docker_enabled() -> bool {
    if std::env::var("EDGE_E2E_DOCKER").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: Docker tests run through `cargo xtask test` (EDGE_E2E_DOCKER=1)");
    false
}

fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(
        output.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// An edge and an agent sharing one state directory, and the containers a test started.
struct Stack {
    dir: PathBuf,
    edge: Process,
    agent: Option<Process>,
    http: SocketAddr,
    containers: Vec<String>,
}

impl Stack {
    fn start(name: &str) -> Stack {
        let dir = std::env::temp_dir().join(format!("edge-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (edge, ready) = Process::spawn(
            Command::new(binary("edge"))
                .args(["--http-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0"])
                .args([
                    "--admin-addr",
                    "127.0.0.1:0",
                    "--workers",
                    "2",
                    "--log-format",
                    "json",
                ])
                .arg("--state-dir")
                .arg(&dir)
                .env("EDGE_LOG", "info"),
            "\"edge ready\"",
        );
        let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
        let http = ready["fields"]["http_addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut stack = Stack {
            dir,
            edge,
            agent: None,
            http,
            containers: Vec::new(),
        };
        stack.start_agent();
        stack
    }

    fn start_agent(&mut self) {
        let (agent, _) = Process::spawn(
            Command::new(binary("agent"))
                .arg("--state-dir")
                .arg(&self.dir)
                .args(["--log-format", "json"])
                .env("EDGE_LOG", "info"),
            "agent started",
        );
        self.agent = Some(agent);
    }

    fn restart_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.terminate();
        }
        self.start_agent();
    }

    /// Starts a container of compose `project`/`service` with `labels` and `env`.
    fn run(
        &mut self,
        project: &str,
        service: &str,
        name: &str,
        labels: &[String],
        env: &[&str],
    ) -> String {
        self.run_with(project, service, name, labels, env, &[])
    }

    /// Like [`Stack::run`], with extra `docker run` options placed before the image;
    /// `--healthcheck-image` selects the image with a Docker HEALTHCHECK.
    fn run_with(
        &mut self,
        project: &str,
        service: &str,
        name: &str,
        labels: &[String],
        env: &[&str],
        options: &[&str],
    ) -> String {
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.into()];
        args.extend(options.iter().map(|o| o.to_string()));
        for label in [
            "edge-e2e=1".to_owned(),
            format!("com.docker.compose.project={project}"),
            format!("com.docker.compose.service={service}"),
        ]
        .iter()
        .chain(labels)
        {
            args.push("--label".into());
            args.push(label.clone());
        }
        args.push("-e".into());
        args.push(format!("BACKEND_NAME={name}"));
        for e in env {
            args.push("-e".into());
            args.push((*e).to_owned());
        }
        let image = if options.contains(&"--healthcheck-image") {
            IMAGE_WITH_HEALTHCHECK
        } else {
            IMAGE
        };
        args.retain(|a| a != "--healthcheck-image");
        args.push(image.into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = docker(&refs);
        self.containers.push(name.to_owned());
        id
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

    fn get(&self, host: &str, path: &str) -> Result<(u16, String), String> {
        get(self.http, host, path)
    }

    /// Requests `host` until it answers 200 (for at most [`JOIN_LIMIT`]) and returns each
    /// distinct status in the order seen. `on_first_ok` runs right after the first 200.
    fn statuses_until_ok(&self, host: &str, mut on_first_ok: impl FnMut()) -> Vec<u16> {
        let deadline = Instant::now() + JOIN_LIMIT;
        let mut statuses = Vec::new();
        while Instant::now() < deadline {
            let (status, _) = self.get(host, "/").unwrap();
            if statuses.last() != Some(&status) {
                statuses.push(status);
            }
            if status == 200 {
                on_first_ok();
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        statuses
    }

    /// Waits until `host` answers 200 with `body`.
    fn wait_for_body(&self, host: &str, body: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = Err(String::new());
        while Instant::now() < deadline {
            last = self.get(host, "/");
            if matches!(&last, Ok((200, text)) if text == body) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let agent_logs = self
            .agent
            .as_ref()
            .map(|a| a.logs.lock().unwrap().join("\n"))
            .unwrap_or_default();
        let edge_logs = self.edge.logs.lock().unwrap().join("\n");
        panic!(
            "{host} never answered {body:?}; last {last:?}\nagent logs:\n{agent_logs}\nedge logs:\n{edge_logs}"
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !self.containers.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(self.containers.iter().map(String::as_str));
            let _ = Command::new("docker").args(&args).output();
        }
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One request on a fresh connection; returns the status and the body.
fn get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {response:?}"))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.trim_end().to_owned()))
}

/// Labels of a site: one router `app` for `rule` on the plain-HTTP entry point, probed fast.
fn site_labels(rule: &str) -> Vec<String> {
    vec![
        "traefik.enable=true".into(),
        format!("traefik.http.routers.app.rule={rule}"),
        "traefik.http.routers.app.entrypoints=web".into(),
        "traefik.http.services.app.loadbalancer.server.port=8080".into(),
        "traefik.http.services.app.loadbalancer.healthcheck.interval=300ms".into(),
        "traefik.http.services.app.loadbalancer.healthcheck.timeout=1s".into(),
    ]
}

const JOIN_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn same_names_in_two_projects_stay_apart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_enabled() {
        return;
    }
    let mut stack = Stack::start("projects");
    stack.run(
        "alpha",
        "web",
        "alpha-web-1",
        &site_labels("Host(`alpha.test`)"),
        &[],
    );
    stack.run(
        "beta",
        "web",
        "beta-web-1",
        &site_labels("Host(`beta.test`)"),
        &[],
    );
    stack.wait_for_body("alpha.test", "alpha-web-1", JOIN_LIMIT);
    stack.wait_for_body("beta.test", "beta-web-1", JOIN_LIMIT);
    for _ in 0..10 {
        assert_eq!(
            stack.get("alpha.test", "/").unwrap(),
            (200, "alpha-web-1".to_owned())
        );
        assert_eq!(
            stack.get("beta.test", "/").unwrap(),
            (200, "beta-web-1".to_owned())
        );
    }
    let routes = stack.edgectl(&["routes"]);
    let names: Vec<&str> = routes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        names.contains(&"alpha/app") && names.contains(&"beta/app"),
        "{names:?}"
    );
}

#[test]
fn v2_rule_and_misspelled_key() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_enabled() {
        return;
    }
    let mut stack = Stack::start("labels");
    stack.run(
        "vtwo",
        "web",
        "vtwo-web-1",
        &site_labels("Host(`a.test`,`www.a.test`)"),
        &[],
    );
    let mut broken = site_labels("Host(`broken.test`)");
    broken.push("traefik.http.routers.app.entrypoint=web".into());
    stack.run("broken", "web", "broken-web-1", &broken, &[]);
    stack.wait_for_body("a.test", "vtwo-web-1", JOIN_LIMIT);
    stack.wait_for_body("www.a.test", "vtwo-web-1", JOIN_LIMIT);

    let status = stack.get("broken.test", "/").unwrap().0;
    assert_ne!(status, 200, "the misspelled container must not be routed");
    let errors = stack.edgectl(&["errors"]);
    let error = errors
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["container"] == "broken-web-1")
        .unwrap_or_else(|| panic!("no error for broken-web-1 in {errors}"));
    assert_eq!(error["key"], "traefik.http.routers.app.entrypoint");
    let table = Command::new(binary("edgectl"))
        .arg("--socket")
        .arg(stack.dir.join("agent.sock"))
        .arg("errors")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("broken-web-1"));
}

#[test]
fn replicas_share_requests() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_enabled() {
        return;
    }
    let mut stack = Stack::start("replicas");
    stack.run(
        "scaled",
        "web",
        "scaled-web-1",
        &site_labels("Host(`scaled.test`)"),
        &[],
    );
    stack.run(
        "scaled",
        "web",
        "scaled-web-2",
        &site_labels("Host(`scaled.test`)"),
        &[],
    );
    let deadline = Instant::now() + JOIN_LIMIT;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 && Instant::now() < deadline {
        if let Ok((200, body)) = stack.get("scaled.test", "/") {
            seen.insert(body);
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["scaled-web-1", "scaled-web-2"]
    );
    // A drain by container name is lifted by the same backend's address.
    stack.edgectl(&["drain", "scaled-web-1"]);
    thread::sleep(Duration::from_millis(500));
    for _ in 0..10 {
        assert_eq!(
            stack.get("scaled.test", "/").unwrap(),
            (200, "scaled-web-2".to_owned())
        );
    }
    let backends = stack.edgectl(&["backends"]);
    let first = backends
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["container"] == "scaled-web-1")
        .unwrap_or_else(|| panic!("no scaled-web-1 in {backends}"));
    assert_eq!(first["state"], "draining");
    let addr = first["addr"].as_str().unwrap().to_owned();
    stack.edgectl(&["undrain", &addr]);
    thread::sleep(Duration::from_millis(500));

    let backends = stack.edgectl(&["backends"]);
    let up = backends
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["service"] == "scaled/app" && b["state"] == "up")
        .count();
    assert_eq!(up, 2, "{backends}");
}

#[test]
fn unready_container_gets_no_traffic() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_enabled() {
        return;
    }
    let mut stack = Stack::start("gating");
    stack.run(
        "slow",
        "web",
        "slow-web-1",
        &site_labels("Host(`slow.test`)"),
        &["STARTUP_DELAY_MS=4000"],
    );
    let statuses = stack.statuses_until_ok("slow.test", || {});
    // Until its /health passes, the route exists but has no backend: 503, never the page.
    assert!(statuses.contains(&503), "statuses seen: {statuses:?}");
    assert_eq!(statuses.last(), Some(&200), "statuses seen: {statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1);
}

#[test]
fn docker_healthcheck_gates_traffic() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_enabled() {
        return;
    }
    let mut stack = Stack::start("healthcheck");
    // /health passes at once, but Docker's HEALTHCHECK only after 3 s: the agent must wait
    // for both.
    stack.run_with(
        "checked",
        "web",
        "checked-web-1",
        &site_labels("Host(`checked.test`)"),
        &["DOCKER_READY_AFTER_MS=3000"],
        &["--healthcheck-image"],
    );
    let statuses = stack.statuses_until_ok("checked.test", || {
        // The first page may only come after Docker itself reports the container healthy;
        // the agent's own probe passed seconds earlier.
        let health = docker(&["inspect", "-f", "{{.State.Health.Status}}", "checked-web-1"]);
        assert_eq!(
            health, "healthy",
            "served while Docker's health check was {health}"
        );
    });
    assert!(statuses.contains(&503), "statuses seen: {statuses:?}");
    assert_eq!(statuses.last(), Some(&200), "statuses seen: {statuses:?}");
    let backends = stack.edgectl(&["backends"]);
    let row = backends
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["container"] == "checked-web-1")
        .unwrap_or_else(|| panic!("no backend checked-web-1 in {backends}"));
    assert_eq!(row["docker_health"], "healthy", "{backends}");
}

/// Sends requests to `host` until stopped; counts failures and keeps the last bodies.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<String>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, host: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let handle = {
            let (stop, failures, requests, bodies) = (
                stop.clone(),
                failures.clone(),
                requests.clone(),
                bodies.clone(),
            );
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    requests.fetch_add(1, Ordering::SeqCst);
                    match get(addr, host, "/") {
                        Ok((200, body)) => bodies.lock().unwrap().push(body),
                        other => {
                            eprintln!("failed request: {other:?}");
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Load {
            stop,
            failures,
            requests,
            bodies,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        let bodies = self.bodies.lock().unwrap().clone();
        (
            self.failures.load(Ordering::SeqCst),
            self.requests.load(Ordering::SeqCst),
            bodies,
        )
    }
}

#[test]
fn rolling_replacement_without_errors() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_enabled() {
        return;
    }
    let mut stack = Stack::start("rolling");
    stack.run(
        "roll",
        "web",
        "roll-web-1",
        &site_labels("Host(`roll.test`)"),
        &["DRAIN_MS=2000"],
    );
    stack.wait_for_body("roll.test", "roll-web-1", JOIN_LIMIT);
    let load = Load::start(stack.http, "roll.test");

    // Start the new version, wait until it serves, then stop the old one.
    stack.run(
        "roll",
        "web",
        "roll-web-2",
        &site_labels("Host(`roll.test`)"),
        &["DRAIN_MS=2000"],
    );
    let deadline = Instant::now() + JOIN_LIMIT;
    while !load
        .bodies
        .lock()
        .unwrap()
        .iter()
        .any(|b| b == "roll-web-2")
    {
        assert!(
            Instant::now() < deadline,
            "the new container never received traffic"
        );
        thread::sleep(Duration::from_millis(50));
    }
    docker(&["stop", "roll-web-1"]);
    thread::sleep(Duration::from_millis(500));

    // Restarting the agent must not disturb traffic either.
    stack.restart_agent();
    thread::sleep(Duration::from_secs(3));

    let (failures, requests, bodies) = load.finish();
    assert!(requests > 100, "only {requests} requests were sent");
    assert_eq!(failures, 0, "{failures} of {requests} requests failed");
    assert!(
        bodies.iter().rev().take(20).all(|b| b == "roll-web-2"),
        "old container still served"
    );
}

#[test]
fn engine_restart_keeps_serving() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !docker_enabled() {
        return;
    }
    let dockerd_args = std::env::var("EDGE_E2E_DOCKERD_ARGS")
        .expect("EDGE_E2E_DOCKERD_ARGS is set by cargo xtask test");
    let mut stack = Stack::start("engine");
    stack.run(
        "steady",
        "web",
        "steady-web-1",
        &site_labels("Host(`steady.test`)"),
        &[],
    );
    stack.wait_for_body("steady.test", "steady-web-1", JOIN_LIMIT);
    let load = Load::start(stack.http, "steady.test");

    let pid_file = dockerd_args
        .split_whitespace()
        .skip_while(|a| *a != "--pidfile")
        .nth(1)
        .expect("--pidfile in the dockerd arguments")
        .to_owned();
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the test engine's PID, which the xtask started for these tests.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    thread::sleep(Duration::from_secs(2));
    let status = stack.edgectl(&["status"]);
    assert_eq!(status["docker"]["connected"], false, "{status}");

    let log = std::env::var("EDGE_E2E_DOCKERD_LOG").unwrap_or_else(|_| "/dev/null".into());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Path::new(&log))
        .unwrap();
    let _ = std::fs::remove_file(&pid_file);
    // The engine outlives this test on purpose: `cargo xtask test` stops it by its pid file.
    #[allow(clippy::zombie_processes)]
    let _engine = Command::new("dockerd")
        .args(dockerd_args.split_whitespace())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("restart dockerd");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = stack.edgectl(&["status"]);
        if status["docker"]["connected"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not reconnect: {status}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    // A container started after the restart is routed: the agent follows events again.
    stack.run(
        "fresh",
        "web",
        "fresh-web-1",
        &site_labels("Host(`fresh.test`)"),
        &[],
    );
    stack.wait_for_body("fresh.test", "fresh-web-1", JOIN_LIMIT);

    let (failures, requests, _) = load.finish();
    assert_eq!(
        failures, 0,
        "{failures} of {requests} requests failed while the engine restarted"
    );
}
