//! `bench profile`: a CPU profile of one proxy under the load of one scenario. The harness
//! starts the backend and the proxy as `bench run` does, runs the load generator, and has
//! `perf record` sample the proxy's processes with kernel and user call stacks during a
//! window after the warm-up. The samples are folded into collapsed stacks, drawn as a flame
//! graph and summarised in Markdown.
//!
//! The collapsed stacks are written gzip-compressed (`zcat FILE.folded.gz` gives the text).
//! With the inlined Rust frames, the plain text of a 6 s profile of the edge took 1.7 to
//! 4.2 MB, and gzip made it 50 to 60 times smaller.

mod flamegraph;
mod fold;
mod summary;

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use flate2::{write::GzEncoder, Compression};

use crate::{
    harness::{self, Interrupted, LoadSettings, RunDir, Target, Testbed},
    load::{self, LoadReport},
    procfs::{self, ClockTicks},
    proxies::{self, ProxyKind},
    report::{thousands, Timestamp},
    results::Scenario,
};

use fold::{FoldedStacks, Folder};

/// How to get perf, for the error when it is missing.
const PERF_INSTALL_HINT: &str = "install it with `apt-get install linux-perf` (Debian) or \
     `apt-get install linux-tools-common linux-tools-$(uname -r)` (Ubuntu), or pass its path \
     with --perf";

/// Largest stack copy perf accepts for DWARF unwinding, in bytes (perf 6.1 `record --help`).
const MAX_STACK_BYTES: u32 = 65_528;

/// Load added after the recording window, so that the load still runs when perf stops.
/// perf starts its `sleep` only after it has attached to the processes, so the recording
/// ends late: perf ran 7.2 s for a 6 s sleep of the edge.
const LOAD_TAIL: Duration = Duration::from_secs(2);

/// Time between two checks of whether perf has exited or Ctrl-C was pressed.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Fields of `perf script` that the folder reads.
const PERF_SCRIPT_FIELDS: &str = "comm,pid,tid,event,ip,sym,dso";

/// Options of one profile.
#[derive(Debug, Clone)]
pub struct Options {
    pub proxy: ProxyKind,
    pub scenario: Scenario,
    pub warmup: Duration,
    /// Length of the recording.
    pub duration: Duration,
    /// Samples per second and CPU.
    pub frequency_hz: u32,
    /// Bytes of each sampled thread's stack that perf copies for DWARF unwinding.
    pub stack_bytes: u32,
    /// Whether `perf script` resolves inlined functions, which took 9.5 s for 5,900 samples
    /// of the edge.
    pub inline: bool,
    /// The perf program.
    pub perf: PathBuf,
    pub load: LoadSettings,
    pub edge_bin: PathBuf,
    pub out: PathBuf,
    /// The command line recorded in the summary.
    pub command: String,
    pub keep_run_dir: bool,
}

/// Records the profile and returns the path of its Markdown summary.
///
/// # Errors
/// Fails on invalid options, when perf is missing or fails, when the proxy does not start or
/// does not serve the scenario's protocol, when no sample was recorded, when a file cannot be
/// written, and with [`Interrupted`] after Ctrl-C.
pub fn run(options: &Options) -> anyhow::Result<PathBuf> {
    validate(options)?;
    // A proxy that is not installed fails here, before a run folder with nothing to explain.
    proxies::locate(options.proxy, &options.edge_bin)?;
    let perf_version = perf_version(&options.perf)?;
    let interrupted = harness::interrupt_flag()?;
    let run_dir = RunDir::create(options.keep_run_dir)?;
    let result = run_in(options, &perf_version, &run_dir.path, &interrupted);
    // The logs explain a failure, but Ctrl-C is no failure, so they go then.
    if result.as_ref().is_err_and(|e| !e.is::<Interrupted>()) {
        run_dir.keep();
    }
    result
}

fn validate(options: &Options) -> anyhow::Result<()> {
    if options.scenario == Scenario::FixedRate {
        bail!(
            "the fixed-rate scenario cannot be profiled, because its rate comes from a full \
             `bench run`; choose keep-alive, tls-keep-alive, tls-handshake, h2 or h3"
        );
    }
    if options.duration.is_zero() {
        bail!("--duration must be longer than 0 s");
    }
    if options.frequency_hz == 0 {
        bail!("--frequency must be at least 1 Hz");
    }
    if options.stack_bytes == 0
        || !options.stack_bytes.is_multiple_of(8)
        || options.stack_bytes > MAX_STACK_BYTES
    {
        bail!(
            "--stack-bytes {} is invalid: perf needs a multiple of 8 from 8 to {MAX_STACK_BYTES}",
            options.stack_bytes
        );
    }
    Ok(())
}

/// Returns the output of `perf --version`, or how to install perf when it cannot run.
fn perf_version(perf: &Path) -> anyhow::Result<String> {
    let output = match Command::new(perf).arg("--version").output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("perf not found ({}); {PERF_INSTALL_HINT}", perf.display())
        }
        Err(e) => bail!("cannot run {}: {e}; {PERF_INSTALL_HINT}", perf.display()),
    };
    if !output.status.success() {
        // Debian's /usr/bin/perf is a wrapper that fails when no perf matches the kernel.
        bail!(
            "{} --version failed with {}: {}; {PERF_INSTALL_HINT}",
            perf.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn run_in(
    options: &Options,
    perf_version: &str,
    dir: &Path,
    interrupted: &Arc<AtomicBool>,
) -> anyhow::Result<PathBuf> {
    let stamp = Timestamp::now();
    let testbed = Testbed::start(dir)?;
    let mut target = start_target(options, &testbed, dir)?;
    let pgid = target
        .process
        .as_ref()
        .map(|p| p.pgid())
        .context("the proxy has no process")?;
    // Let start-up work (Go runtime, config reloads) settle, as before a benchmark.
    harness::sleep_checked(Duration::from_secs(1), interrupted)?;
    let pids = procfs::group_members(pgid);
    if pids.is_empty() {
        bail!("{} has no running process to record", options.proxy);
    }

    let config = options.load.config(
        options.scenario,
        target.addr(options.scenario),
        None,
        testbed.client_cpus,
        options.warmup,
        options.duration + LOAD_TAIL,
    );
    let running = load::start(&config, interrupted.clone())?;
    harness::sleep_until_checked(running.window().measure_from, interrupted);
    let perf_data = RemoveOnDrop(dir.join("perf.data"));
    let recording = if interrupted.load(Ordering::Relaxed) {
        Err(Interrupted.into())
    } else {
        record(
            options,
            &pids,
            &perf_data.0,
            &dir.join("perf-record.log"),
            interrupted,
        )
    };
    let load_report = running.join();
    if interrupted.load(Ordering::Relaxed) {
        return Err(Interrupted.into());
    }
    let recording = recording?;
    let load_report = load_report?;
    // The samples are on disk, so the proxy can stop before the long `perf script`.
    if let Some(mut process) = target.process.take() {
        process.stop();
    }

    eprintln!("bench: folding the samples with `perf script`");
    let folded = fold_samples(
        options,
        &perf_data.0,
        &dir.join("perf-script.log"),
        interrupted,
    )?;
    drop(perf_data);
    if folded.total_samples() == 0 {
        bail!(
            "perf recorded no samples of {} (pids {})",
            options.proxy,
            pid_list(&pids)
        );
    }

    let host = harness::host_info(testbed.cpus, testbed.pinning.clone());
    let base = format!(
        "{}-profile-{}-{}",
        stamp.file,
        options.proxy,
        scenario_slug(options.scenario)
    );
    let info = summary::ProfileInfo {
        proxy: format!("{} {}", options.proxy, target.info.version),
        scenario: options.scenario.label().to_owned(),
        load: describe_load(&load_report),
        requests_per_s: load_report.requests_per_s,
        load_measured_s: load_report.measured_s,
        load_errors: load_report.error_count(),
        started_utc: stamp.iso.clone(),
        command: options.command.clone(),
        host: format!(
            "{}, {} CPUs, Linux {}",
            host.cpu_model, host.cpus, host.kernel
        ),
        pinning: host.pinning,
        perf_record: recording.command,
        perf_version: perf_version.to_owned(),
        warmup_s: options.warmup.as_secs_f64(),
        window_s: options.duration.as_secs_f64(),
        perf_run_s: recording.wall.as_secs_f64(),
        frequency_hz: options.frequency_hz,
        proxy_cpu_s: recording.proxy_cpu.as_secs_f64(),
        flame_graph_file: format!("{base}.svg"),
        folded_file: format!("{base}.folded.gz"),
    };
    write_results(&options.out, &base, &info, &folded)
}

/// Starts the proxy of `options` and checks that it serves the scenario's protocol.
fn start_target(options: &Options, testbed: &Testbed, dir: &Path) -> anyhow::Result<Target> {
    let common = testbed.common(dir);
    let proxy_cpus = testbed.proxy_cpu_list();
    let target = harness::start_proxy(
        options.proxy,
        &options.edge_bin,
        options.scenario == Scenario::Http3,
        &common,
        proxy_cpus.as_deref(),
    );
    if let Some(reason) = &target.info.skipped {
        bail!("{} did not start: {reason}", options.proxy);
    }
    if !target.runs(options.scenario) {
        let reason = target
            .info
            .h2_skipped
            .as_ref()
            .or(target.info.h3_skipped.as_ref())
            .map_or("it has no HTTPS listener", String::as_str);
        bail!(
            "{} cannot be profiled in the {} scenario: {reason}",
            options.proxy,
            options.scenario
        );
    }
    Ok(target)
}

/// Writes the collapsed stacks, the flame graph and the summary as `<base>.*` into `out`, and
/// returns the path of the summary.
fn write_results(
    out: &Path,
    base: &str,
    info: &summary::ProfileInfo,
    folded: &FoldedStacks,
) -> anyhow::Result<PathBuf> {
    let title = format!("CPU profile of {}, {}", info.proxy, info.scenario);
    let subtitle = format!(
        "{}: {} samples at {} Hz over {:.1} s, {} requests/s, recorded {}",
        info.load,
        thousands(folded.total_samples() as f64),
        info.frequency_hz,
        info.window_s,
        thousands(info.requests_per_s),
        info.started_utc
    );
    let summary_path = out.join(format!("{base}.md"));
    let files = [
        (
            out.join(&info.folded_file),
            gzip(&folded.to_text()).context("compressing the collapsed stacks")?,
        ),
        (
            out.join(&info.flame_graph_file),
            flamegraph::render_svg(&title, &subtitle, folded).into_bytes(),
        ),
        (
            summary_path.clone(),
            summary::render_markdown(info, folded).into_bytes(),
        ),
    ];
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (path, bytes) in &files {
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary_path)
}

/// A finished `perf record`.
struct Recording {
    /// The command line, for the summary.
    command: String,
    /// Time from the start of perf to its exit.
    wall: Duration,
    /// CPU time of the proxy's processes meanwhile, from `/proc`.
    proxy_cpu: Duration,
}

/// Runs `perf record` on `pids` for the recording window and writes the samples to `output`.
fn record(
    options: &Options,
    pids: &[u32],
    output: &Path,
    log_path: &Path,
    interrupted: &AtomicBool,
) -> anyhow::Result<Recording> {
    let args = vec![
        "record".to_owned(),
        "-e".to_owned(),
        "cpu-clock".to_owned(),
        "-F".to_owned(),
        options.frequency_hz.to_string(),
        "-g".to_owned(),
        "--call-graph".to_owned(),
        format!("dwarf,{}", options.stack_bytes),
        "-p".to_owned(),
        pid_list(pids),
    ];
    let duration = format!("{:.3}", options.duration.as_secs_f64());
    let command = format!("perf {} -- sleep {duration}", args.join(" "));
    let log = File::create(log_path)
        .with_context(|| format!("creating the log file {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("opening {} for stderr", log_path.display()))?;
    eprintln!("bench: recording: {command}");

    let ticks = ClockTicks::detect();
    let before = procfs::usage_of(pids);
    let started = Instant::now();
    // perf inherits this thread's affinity, so it runs on the client CPUs, not the proxy's.
    let mut child = Command::new(&options.perf)
        .args(&args)
        .arg("-o")
        .arg(output)
        .args(["--", "sleep", &duration])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .with_context(|| format!("starting {}", options.perf.display()))?;
    let status = wait_or_kill(&mut child, interrupted)?;
    let wall = started.elapsed();
    let after = procfs::usage_of(pids);
    let log_text = std::fs::read_to_string(log_path).unwrap_or_default();
    if !status.success() {
        bail!(
            "perf record failed with {status}: {}\nRecording kernel call stacks of another \
             process needs root, or kernel.perf_event_paranoid at most 1.",
            tail(&log_text, 15)
        );
    }
    for line in log_text.lines() {
        eprintln!("bench: {line}");
    }
    Ok(Recording {
        command,
        wall,
        proxy_cpu: ticks.to_duration(after.cpu_ticks.saturating_sub(before.cpu_ticks)),
    })
}

/// Waits for `child` to exit. After Ctrl-C, kills it (by its pid) and fails with
/// [`Interrupted`].
fn wait_or_kill(
    child: &mut std::process::Child,
    interrupted: &AtomicBool,
) -> anyhow::Result<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().context("waiting for perf")? {
            return Ok(status);
        }
        if interrupted.load(Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Interrupted.into());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Runs `perf script` on `data` and folds its output as it streams in.
fn fold_samples(
    options: &Options,
    data: &Path,
    log_path: &Path,
    interrupted: &AtomicBool,
) -> anyhow::Result<FoldedStacks> {
    let log = File::create(log_path)
        .with_context(|| format!("creating the log file {}", log_path.display()))?;

    let mut command = Command::new(&options.perf);
    command
        .arg("script")
        .arg("-i")
        .arg(data)
        .args(["-F", PERF_SCRIPT_FIELDS]);
    if !options.inline {
        command.arg("--no-inline");
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} script", options.perf.display()))?;

    let stdout = child
        .stdout
        .take()
        .context("perf script has no standard output")?;
    let mut reader = BufReader::new(stdout);
    let mut folder = Folder::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .context("reading the output of perf script")?;
        if read == 0 {
            break;
        }
        if interrupted.load(Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Interrupted.into());
        }
        // perf prints symbols as raw bytes, and a stray invalid byte must not stop the profile.
        let text = String::from_utf8_lossy(&line);
        folder.push_line(text.trim_end_matches(['\n', '\r']));
    }

    let status = child.wait().context("waiting for perf script")?;
    if interrupted.load(Ordering::Relaxed) {
        return Err(Interrupted.into());
    }
    let log_text = std::fs::read_to_string(log_path).unwrap_or_default();
    if !status.success() {
        bail!("perf script failed with {status}: {}", tail(&log_text, 15));
    }
    if !log_text.trim().is_empty() {
        eprintln!("bench: perf script reported:\n{}", tail(&log_text, 10));
    }
    Ok(folder.finish())
}

/// Compresses `text` with gzip at the highest level.
fn gzip(text: &str) -> std::io::Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder.write_all(text.as_bytes())?;
    encoder.finish()
}

/// A file that is removed when this value is dropped, on success and on every error.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        // A missing file is fine, because perf may have failed before creating it.
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pid_list(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Returns the name of `scenario` on the command line, for example `tls-keep-alive`.
fn scenario_slug(scenario: Scenario) -> String {
    clap::ValueEnum::to_possible_value(&scenario)
        .map_or_else(|| format!("{scenario:?}"), |v| v.get_name().to_owned())
}

/// Describes the load, for example `HTTPS HTTP/2, closed loop, 4 connections × 16 streams`.
fn describe_load(report: &LoadReport) -> String {
    let streams = if report.streams > 1 {
        format!(" × {} streams", report.streams)
    } else {
        String::new()
    };
    format!(
        "{}, {}, {} connections{streams}",
        report.protocol, report.mode, report.connections
    )
}

/// Returns the last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            proxy: ProxyKind::Edge,
            scenario: Scenario::KeepAlive,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(2),
            frequency_hz: 999,
            stack_bytes: 16_384,
            inline: true,
            perf: PathBuf::from("perf"),
            load: LoadSettings {
                connections: 1,
                handshake_connections: 1,
                fixed_rate_connections: 1,
                h2_connections: 1,
                h2_streams: 1,
                h3_connections: 1,
                h3_streams: 1,
                request_timeout: Duration::from_secs(1),
                pacer_resolution: Duration::ZERO,
            },
            edge_bin: PathBuf::from("edge"),
            out: PathBuf::from("out"),
            command: "bench profile".to_owned(),
            keep_run_dir: false,
        }
    }

    #[test]
    fn fixed_rate_is_rejected() {
        let error = validate(&Options {
            scenario: Scenario::FixedRate,
            ..options()
        })
        .unwrap_err();
        assert!(error.to_string().contains("fixed-rate"), "{error}");
    }

    #[test]
    fn stack_bytes_must_suit_perf() {
        for bytes in [0, 12, 65_536] {
            let error = validate(&Options {
                stack_bytes: bytes,
                ..options()
            })
            .unwrap_err();
            assert!(
                error.to_string().contains("multiple of 8"),
                "{bytes}: {error}"
            );
        }
        assert!(validate(&options()).is_ok());
    }

    #[test]
    fn missing_perf_says_how_to_install() {
        let error = perf_version(Path::new("/nonexistent/perf")).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("perf not found"), "{message}");
        assert!(message.contains("apt-get install linux-perf"), "{message}");
    }

    #[test]
    fn scenario_slug_is_the_value_name() {
        assert_eq!(scenario_slug(Scenario::TlsKeepAlive), "tls-keep-alive");
        assert_eq!(scenario_slug(Scenario::TlsHttp2), "h2");
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read as _;
        let text = "edge-worker-0;edge::worker::run;tcp_sendmsg_[k] 3\n".repeat(100);
        let compressed = gzip(&text).unwrap();
        assert!(compressed.len() < text.len() / 10);
        let mut decoded = String::new();
        flate2::read::GzDecoder::new(compressed.as_slice())
            .read_to_string(&mut decoded)
            .unwrap();
        assert_eq!(decoded, text);
    }

    #[test]
    fn perf_data_is_removed_on_drop() {
        let path = std::env::temp_dir().join(format!("bench-remove-{}", std::process::id()));
        std::fs::write(&path, b"samples").unwrap();
        drop(RemoveOnDrop(path.clone()));
        assert!(!path.exists());
    }
}
