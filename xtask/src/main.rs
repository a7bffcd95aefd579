//! Project tasks: `cargo xtask test` (the full test suite, installing what it needs),
//! `cargo xtask bench` (the benchmark harness), `cargo xtask profile` (a CPU profile under
//! the harness's load), `cargo xtask run` and `cargo xtask tidy` (repository conventions).
#![forbid(unsafe_code)]

mod bench;
mod docker;
mod run;
mod tidy;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _};

/// Debian packages the test suite runs: real TLS and HTTP clients.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("h2load", "nghttp2-client"),
    ("dockerd", "docker.io"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("python3", "python3"),
    // The ACME tests run pebble and pebble-challtestsrv, which come in one package.
    ("pebble", "pebble"),
];

/// aioquic from PyPI: the independent HTTP/3 client of the tests, pinned to the version the
/// tests were written against.
const AIOQUIC: &str = "aioquic==1.7.2";

/// Debian packages that build the eBPF programs: the compiler and libbpf's headers
/// (`bpf/bpf_helpers.h`), checked by file because libbpf-dev has no command.
const BPF_PACKAGES: &[(&str, &str)] = &[
    ("/usr/bin/clang-19", "clang-19"),
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
];

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_default();
    let task_args: Vec<String> = std::env::args().skip(2).collect();
    let result = match task.as_str() {
        "test" => test(),
        "tidy" => tidy::check(&workspace_root()),
        "run" => run::run(&workspace_root()),
        "bench" => bench::bench(&workspace_root(), &task_args),
        "profile" => bench::profile(&workspace_root(), &task_args),
        _ => {
            eprintln!("usage: cargo xtask <test|tidy|run|bench|profile>\n  test     install test dependencies, then run tidy, every test and clippy\n  tidy     check repository conventions\n  run      build and run the edge (demo routes) and the agent together\n  bench    install the proxies to compare, build in release mode and run the benchmark;\n           `--quick` for a smoke run; `target/release/bench run --help` lists the other options\n  profile  record a CPU profile with perf under one scenario's load and write a flame graph;\n           `--proxy nginx`, `--scenario h2`; `target/release/bench profile --help` lists the others");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns a `cargo` command without the variables that `cargo run` set for this xtask
/// binary (`CARGO_PKG_NAME` and the like). Build scripts that read them would otherwise see
/// other values than in a plain `cargo build` and rebuild their crates every time.
fn cargo() -> Command {
    let mut command = Command::new("cargo");
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let set_by_cargo_run = name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                name,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            );
        if set_by_cargo_run {
            command.env_remove(name);
        }
    }
    command
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn test() -> anyhow::Result<()> {
    let root = workspace_root();
    install_packages(TEST_PACKAGES)?;
    install_bpf_packages()?;
    let aioquic_python = install_aioquic(&root)?;
    tidy::check(&root)?;
    // The end-to-end tests start the edge and agent binaries themselves. EDGE_BPF_REQUIRED
    // makes the edge's build script fail rather than leave the eBPF object out.
    run(cargo()
        .current_dir(&root)
        .args(["build", "--locked", "-p", "edge", "-p", "agent"])
        .env("EDGE_BPF_REQUIRED", "1"))?;
    let log = root.join("target").join("edge-test-dockerd.log");
    let engine = docker::TestEngine::start(&log)?;
    docker::build_test_image(&root)?;
    let tested = run(cargo()
        .current_dir(&root)
        .args(["test", "--workspace", "--locked"])
        .env("EDGE_BPF_REQUIRED", "1")
        .env("EDGE_E2E_BPF", "1")
        .env("EDGE_E2E_DOCKER", "1")
        .env("EDGE_E2E_PEBBLE", "1")
        .env("EDGE_E2E_AIOQUIC", "1")
        .env("EDGE_AIOQUIC_PYTHON", &aioquic_python)
        .env("DOCKER_HOST", docker::docker_host())
        .env("EDGE_E2E_DOCKERD_ARGS", docker::dockerd_args().join(" "))
        .env("EDGE_E2E_DOCKERD_LOG", &log));
    drop(engine);
    tested?;
    run(cargo()
        .current_dir(&root)
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ])
        .env("EDGE_BPF_REQUIRED", "1"))?;
    Ok(())
}

/// Installs clang and libbpf-dev when missing, so that the edge's build script compiles the
/// eBPF programs. Needs root and apt-get.
fn install_bpf_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = BPF_PACKAGES
        .iter()
        .filter(|(path, _)| !Path::new(path).exists())
        .map(|(_, package)| *package)
        .collect();
    apt_install(&missing)
}

/// Creates a Python virtual environment under `target/` with aioquic and returns its
/// interpreter. Debian's `python3 -m venv` needs the python3-venv package, installed when the
/// first attempt fails.
fn install_aioquic(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = root.join("target").join("aioquic-venv");
    let python = venv.join("bin").join("python");
    let has_aioquic = Command::new(&python)
        .args(["-c", "import aioquic"])
        .status()
        .is_ok_and(|s| s.success());
    if has_aioquic {
        return Ok(python);
    }
    if run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))
    .is_err()
    {
        apt_install(&["python3-venv"])?;
        run(Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv))?;
    }
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", AIOQUIC]))?;
    Ok(python)
}

/// Returns whether the eBPF programs can be built here.
fn bpf_packages_present() -> bool {
    BPF_PACKAGES
        .iter()
        .all(|(path, _)| Path::new(path).exists())
}

/// Installs the Debian packages whose commands are missing. Needs root and apt-get.
fn install_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(command, _)| !command_exists(command))
        .map(|(_, package)| *package)
        .collect();
    apt_install(&missing)
}

/// Installs `missing` Debian packages, if any.
fn apt_install(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !command_exists("apt-get") {
        bail!("missing commands from packages {missing:?}, and apt-get is not available to install them");
    }
    eprintln!("xtask: installing {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing test packages (run as root)")
}

fn command_exists(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
