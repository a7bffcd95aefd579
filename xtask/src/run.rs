//! `cargo xtask run`: the edge and the agent together, as on a host, with the edge's built-in
//! demo routes serving until the agent has read Docker.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::Context as _;

/// Builds both binaries in release mode, starts them on one state directory under `target/`,
/// and returns when the edge exits (Ctrl-C stops both).
///
/// # Errors
/// Fails when the build fails or a process cannot be started.
pub fn run(root: &Path) -> anyhow::Result<()> {
    // The edge embeds the eBPF object only when clang and libbpf-dev are there at build time.
    if !super::bpf_packages_present() {
        if let Err(e) = super::install_bpf_packages() {
            eprintln!("xtask: cannot install clang-19 and libbpf-dev ({e:#}); the edge runs without the XDP filter and steering");
        }
    }
    super::run(super::cargo().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "edge",
        "-p",
        "agent",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let release = target.join("release");
    let state_dir = target.join("edge-run-state");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)?;
    }
    let mut edge = Command::new(release.join("edge"))
        .arg("demo")
        .arg("--state-dir")
        .arg(&state_dir)
        .args(["--log-format", "text"])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", release.join("edge").display()))?;
    // Give the edge a moment to bind its snapshot socket before the agent connects.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut agent = Command::new(release.join("agent"))
        .arg("--state-dir")
        .arg(&state_dir)
        .args(["--log-format", "text"])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", release.join("agent").display()))?;
    eprintln!(
        "xtask: edge and agent running with state directory {}; `EDGE_STATE_DIR={} target/release/edgectl status` shows the agent's view",
        state_dir.display(),
        state_dir.display()
    );
    let status = edge.wait()?;
    let _ = agent.kill();
    let _ = agent.wait();
    eprintln!("xtask: the edge exited with {status}");
    Ok(())
}
