//! A Docker engine for the end-to-end tests, installed from Debian when missing.
//!
//! It has its own socket, data root and pid file, so it never touches another engine on the
//! machine. It is kept off outside networks and stopped again after the tests.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

/// Image the Docker tests run, built from the workspace's `test-backend` binary.
pub const TEST_IMAGE: &str = "edge-test-backend:latest";
/// The same image with a Docker HEALTHCHECK that runs `test-backend --check`.
pub const TEST_IMAGE_WITH_HEALTHCHECK: &str = "edge-test-backend:healthcheck";

/// Socket, state and pid file locations of the test engine.
const SOCKET: &str = "/run/edge-test-docker.sock";
const DATA_ROOT: &str = "/var/lib/edge-test-docker";
const PID_FILE: &str = "/run/edge-test-docker.pid";
const EXEC_ROOT: &str = "/run/edge-test-docker";

/// Returns the engine's command line. `--ip-forward=false --ip-masq=false` keep containers
/// off any outside network. `--live-restore` keeps containers running while the engine
/// restarts, which the reconnect test relies on.
pub fn dockerd_args() -> Vec<String> {
    [
        "--host",
        &format!("unix://{SOCKET}"),
        "--data-root",
        DATA_ROOT,
        "--exec-root",
        EXEC_ROOT,
        "--pidfile",
        PID_FILE,
        "--ip-forward=false",
        "--ip-masq=false",
        "--iptables=false",
        "--storage-driver=overlay2",
        "--exec-opt",
        "native.cgroupdriver=cgroupfs",
        "--live-restore",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A running test engine; stopped when dropped.
pub struct TestEngine {
    child: Child,
}

impl TestEngine {
    /// Starts the engine and waits until it responds.
    ///
    /// # Errors
    /// Fails when dockerd is missing, does not start, or does not respond within 60s.
    pub fn start(log: &Path) -> anyhow::Result<Self> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("dockerd")
            .args(dockerd_args())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting dockerd (install docker.io, and run as root)")?;
        let engine = Self { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if docker()
                .args(["info", "--format", "{{.ServerVersion}}"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return Ok(engine);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("dockerd did not respond within 60s; see {}", log.display())
    }
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        // The reconnect test may have restarted the engine: stop whichever process the pid
        // file names, then the one this task started.
        remove_test_containers();
        if let Some(pid) = std::fs::read_to_string(PID_FILE)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            wait_gone(pid);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes every container the tests created (they carry the label `edge-e2e=1`).
pub fn remove_test_containers() {
    let Ok(output) = docker()
        .args(["ps", "-aq", "--filter", "label=edge-e2e=1"])
        .output()
    else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !ids.is_empty() {
        let _ = docker()
            .args(["rm", "-f"])
            .args(&ids)
            .stdout(Stdio::null())
            .status();
    }
}

/// Returns a `docker` command aimed at the test engine.
pub fn docker() -> Command {
    let mut cmd = Command::new("docker");
    cmd.env("DOCKER_HOST", docker_host());
    cmd
}

pub fn docker_host() -> String {
    format!("unix://{SOCKET}")
}

/// Builds the static `test-backend` binary and the `FROM scratch` image around it.
///
/// # Errors
/// Fails when the build or `docker build` fails.
pub fn build_test_image(root: &Path) -> anyhow::Result<()> {
    let target = "x86_64-unknown-linux-gnu";
    super::run(
        super::cargo()
            .current_dir(root)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args([
                "build",
                "--release",
                "--locked",
                "-p",
                "edge-e2e",
                "--bin",
                "test-backend",
                "--target",
                target,
            ]),
    )?;
    let binary: PathBuf = root
        .join("target")
        .join(target)
        .join("release")
        .join("test-backend");
    let context = root.join("target").join("edge-test-image");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(&binary, context.join("test-backend"))
        .with_context(|| format!("copying {}", binary.display()))?;
    std::fs::write(
        context.join("Dockerfile"),
        "FROM scratch\nCOPY test-backend /test-backend\nEXPOSE 8080\nENTRYPOINT [\"/test-backend\"]\n",
    )?;
    super::run(
        docker()
            .args(["build", "--quiet", "--tag", TEST_IMAGE])
            .arg(&context),
    )?;
    let checked = root.join("target").join("edge-test-image-healthcheck");
    std::fs::create_dir_all(&checked)?;
    std::fs::write(
        checked.join("Dockerfile"),
        format!(
            "FROM {TEST_IMAGE}\nHEALTHCHECK --interval=500ms --timeout=2s --retries=1 CMD [\"/test-backend\", \"--check\"]\n"
        ),
    )?;
    super::run(
        docker()
            .args(["build", "--quiet", "--tag", TEST_IMAGE_WITH_HEALTHCHECK])
            .arg(&checked),
    )
}
