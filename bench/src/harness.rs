//! The harness: starts the backend and every proxy on loopback, measures each scenario with
//! the targets interleaved over several rounds, and writes the results.
//!
//! The harness process itself runs the load generator and the backend, pinned to the client
//! CPUs. The proxies run as child processes pinned to the proxy CPUs. Every child is stopped
//! when the harness returns, on success, on error and after Ctrl-C.

use std::{
    io::{IsTerminal as _, Write as _},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use nix::{
    sched::{sched_getaffinity, sched_setaffinity, CpuSet},
    unistd::Pid,
};

use crate::{
    backend::{self, Backend},
    load::{self, LoadConfig, Mode, Protocol},
    process::ChildProcess,
    procfs::{self, ClockTicks},
    proxies::{self, Common, Ports, ProxyKind, ROUTE_HOST},
    report::{self, PlotFiles, Timestamp},
    results::{Cell, HostInfo, IdleTlsMemory, RunResults, Scenario, Settings, TargetInfo, DIRECT},
    svg,
    tls::{self, CertFiles},
};

/// Time a proxy gets to serve its first request after start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Time between two RSS samples of a proxy during a measured window.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// Connections opened at once while setting up idle connections.
const IDLE_OPEN_CONCURRENCY: usize = 32;

/// HTTP/3 probes of a proxy before its HTTP/3 scenario is skipped.
const H3_PROBE_ATTEMPTS: usize = 3;

/// Pause between two cells, so that connections of the previous one are closed.
const CELL_PAUSE: Duration = Duration::from_millis(100);

/// The error of a run stopped by Ctrl-C or SIGTERM.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Run options. `None` fields take the quick or full defaults.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub rounds: Option<usize>,
    pub warmup: Option<Duration>,
    pub duration: Option<Duration>,
    pub load: LoadSettings,
    /// Scenarios to measure; every one when empty.
    pub scenarios: Vec<Scenario>,
    /// Requests per second of the fixed-rate scenario; by default half of nginx's median
    /// closed-loop HTTP/1.1 rate.
    pub fixed_rate: Option<f64>,
    pub proxies: Vec<ProxyKind>,
    pub edge_bin: PathBuf,
    pub out: PathBuf,
    /// The command line recorded in the results.
    pub command: String,
    pub keep_run_dir: bool,
    /// Idle keep-alive TLS connections opened to each proxy to measure their memory; 0 skips
    /// the measurement.
    pub idle_connections: Option<usize>,
}

impl Options {
    /// Returns whether `scenario` is selected.
    fn selects(&self, scenario: Scenario) -> bool {
        self.scenarios.is_empty() || self.scenarios.contains(&scenario)
    }

    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 2 } else { 5 }).max(1)
    }

    fn warmup(&self) -> Duration {
        self.warmup.unwrap_or(if self.quick {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(1)
        })
    }

    fn idle_connections(&self) -> usize {
        self.idle_connections
            .unwrap_or(if self.quick { 1000 } else { 5000 })
    }

    fn duration(&self) -> Duration {
        // The durations keep a run with every proxy under 3 minutes (quick) and under 20
        // minutes (full) on a 2-CPU machine. This is an estimate: about 60 cells per quick run
        // and 150 per full run, each taking its warm-up and window plus about 0.3 s. The runs of
        // 2026-12-05 took 151 s and 935 s.
        self.duration.unwrap_or(if self.quick {
            Duration::from_millis(1750)
        } else {
            Duration::from_secs(5)
        })
    }
}

/// Connections and streams of each scenario's load, shared by `bench run` and `bench profile`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadSettings {
    /// Connections of the closed-loop keep-alive scenarios.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Concurrent connections of the new-TLS-connection-per-request scenario.
    #[arg(long, default_value_t = 8)]
    pub handshake_connections: usize,
    /// Connections of the fixed-rate (open-loop) scenario.
    #[arg(long, default_value_t = 64)]
    pub fixed_rate_connections: usize,
    /// Connections of the HTTPS HTTP/2 scenario.
    #[arg(long, default_value_t = 4)]
    pub h2_connections: usize,
    /// Concurrent streams on each connection of the HTTPS HTTP/2 scenario. HAProxy allows
    /// 100 by default (2.6) and nginx 128 (1.22).
    #[arg(long, default_value_t = 16)]
    pub h2_streams: usize,
    /// QUIC connections of the HTTP/3 scenario.
    #[arg(long, default_value_t = 4)]
    pub h3_connections: usize,
    /// Concurrent request streams on each connection of the HTTP/3 scenario, as many as in
    /// the HTTP/2 scenario by default.
    #[arg(long, default_value_t = 16)]
    pub h3_streams: usize,
    /// Time allowed for connect, handshake and response of one request.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Shortest time between two wake-ups of the open-loop pacer. Requests that fall due in
    /// between leave together. `0s` releases each request at its own due time, but then the
    /// client's CPU is saturated at half of nginx's rate on a 2-CPU machine.
    #[arg(long, default_value = "50us", value_parser = humantime::parse_duration)]
    pub pacer_resolution: Duration,
}

impl LoadSettings {
    /// Builds the load of `scenario` against `target`, spread over `threads` threads.
    /// `rate` is the total request rate of the fixed-rate scenario; the others ignore it.
    pub fn config(
        &self,
        scenario: Scenario,
        target: SocketAddr,
        rate: Option<f64>,
        threads: usize,
        warmup: Duration,
        duration: Duration,
    ) -> LoadConfig {
        let mut streams = 1;
        let (mode, connections) = match scenario {
            Scenario::KeepAlive | Scenario::TlsKeepAlive => (Mode::Closed, self.connections),
            Scenario::TlsHttp2 => {
                streams = self.h2_streams;
                (Mode::Closed, self.h2_connections)
            }
            Scenario::Http3 => {
                streams = self.h3_streams;
                (Mode::Closed, self.h3_connections)
            }
            Scenario::TlsHandshake => (Mode::NewConnection, self.handshake_connections),
            Scenario::FixedRate => (
                Mode::Open {
                    rate_per_s: rate.unwrap_or(1000.0),
                },
                self.fixed_rate_connections,
            ),
        };
        LoadConfig {
            target,
            host: ROUTE_HOST.to_owned(),
            path: "/".to_owned(),
            protocol: scenario.protocol(),
            mode,
            connections,
            streams,
            threads,
            warmup,
            duration,
            request_timeout: self.request_timeout,
            pacer_resolution: self.pacer_resolution,
        }
    }
}

/// CPUs for the proxies and for the load generator with the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuPlan {
    pub proxy: Vec<usize>,
    pub client: Vec<usize>,
}

impl CpuPlan {
    /// Splits the allowed CPUs: the first half for the proxies, the rest for the client.
    /// Returns `None` with fewer than 2 CPUs, where nothing can be kept apart.
    pub fn split(allowed: &[usize]) -> Option<CpuPlan> {
        if allowed.len() < 2 {
            return None;
        }
        let half = allowed.len() / 2;
        Some(CpuPlan {
            proxy: allowed[..half].to_vec(),
            client: allowed[half..].to_vec(),
        })
    }

    /// Returns whether the proxy CPUs are `0..n`. The edge pins worker `i` to CPU `i` itself,
    /// which only matches the plan then.
    pub fn proxy_cpus_from_zero(&self) -> bool {
        self.proxy.iter().enumerate().all(|(i, &cpu)| i == cpu)
    }
}

fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The set-up every measurement shares: the split of the CPUs, the bench certificate, and
/// the backend, whose threads run on the client CPUs.
pub struct Testbed {
    /// Number of CPUs this process may use.
    pub cpus: usize,
    pub plan: Option<CpuPlan>,
    /// Placement of proxies, load generator and backend, as recorded in the results.
    pub pinning: String,
    /// Workers of each proxy: one per proxy CPU.
    pub workers: usize,
    /// CPUs of the load generator and the backend.
    pub client_cpus: usize,
    pub cert: CertFiles,
    pub backend: Backend,
}

impl Testbed {
    /// Pins the calling thread to the client CPUs, so that the load generator and backend
    /// threads started later inherit them, writes the bench certificate into `dir` and starts
    /// the backend.
    ///
    /// # Errors
    /// Fails when the affinity cannot be read or set, or the certificate or backend cannot be
    /// set up.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let allowed = allowed_cpus()?;
        let plan = CpuPlan::split(&allowed);
        let workers = plan.as_ref().map_or(1, |p| p.proxy.len());
        let client_cpus = plan.as_ref().map_or(allowed.len(), |p| p.client.len());
        if let Some(plan) = &plan {
            pin_current_thread(&plan.client)?;
        }
        let pinning = match &plan {
            Some(plan) => format!(
                "proxies on CPU {} ({} worker{} each, taskset), load generator and backend on CPU {} \
                 (sched_setaffinity of the harness process)",
                cpu_list(&plan.proxy),
                workers,
                if workers == 1 { "" } else { "s" },
                cpu_list(&plan.client)
            ),
            None => "not pinned: only one CPU is available, so proxies, load generator and \
                     backend share it"
                .to_owned(),
        };
        eprintln!("bench: {pinning}");

        let cert = tls::write_self_signed(dir, &[ROUTE_HOST, "localhost"])?;
        let backend = backend::spawn("127.0.0.1:0".parse()?, client_cpus)?;
        eprintln!("bench: backend listening on {}", backend.addr);
        Ok(Self {
            cpus: allowed.len(),
            plan,
            pinning,
            workers,
            client_cpus,
            cert,
            backend,
        })
    }

    /// Returns the settings every proxy configuration shares, with files under `dir`.
    pub fn common<'a>(&'a self, dir: &'a Path) -> Common<'a> {
        Common {
            dir,
            backend: self.backend.addr,
            cert: &self.cert,
            workers: self.workers,
            edge_pins_workers: self.plan.as_ref().is_none_or(CpuPlan::proxy_cpus_from_zero),
        }
    }

    /// Returns the proxy CPUs in `taskset -c` form, or `None` when nothing is pinned.
    pub fn proxy_cpu_list(&self) -> Option<String> {
        self.plan.as_ref().map(|p| cpu_list(&p.proxy))
    }
}

/// Returns a flag that turns true on SIGINT (Ctrl-C) or SIGTERM.
///
/// # Errors
/// Fails when a signal handler cannot be installed.
pub fn interrupt_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, interrupted.clone())
            .context("installing the Ctrl-C handler")?;
    }
    Ok(interrupted)
}

/// Runs the whole benchmark and returns the path of `latest.md`.
///
/// # Errors
/// Fails when the backend or the certificate cannot be set up, when no proxy starts, when a
/// results file cannot be written, and with [`Interrupted`] after Ctrl-C. A proxy that
/// cannot be found or does not start is skipped and reported, not an error.
pub fn run(options: &Options) -> anyhow::Result<PathBuf> {
    // The edge is what the run is for, so a missing binary ends it before any measurement
    // rather than leaving a report of the other proxies alone.
    if options.proxies.contains(&ProxyKind::Edge) {
        proxies::locate(ProxyKind::Edge, &options.edge_bin)?;
    }
    let interrupted = interrupt_flag()?;
    let run_dir = RunDir::create(options.keep_run_dir)?;
    let result = run_in(options, &run_dir.path, &interrupted);
    // The logs explain a failure, but Ctrl-C is no failure, so they go then.
    if result.as_ref().is_err_and(|e| !e.is::<Interrupted>()) {
        run_dir.keep();
    }
    result
}

fn run_in(options: &Options, dir: &Path, interrupted: &Arc<AtomicBool>) -> anyhow::Result<PathBuf> {
    let started = Instant::now();
    let stamp = Timestamp::now();
    let testbed = Testbed::start(dir)?;
    let common = testbed.common(dir);
    let proxy_cpus = testbed.proxy_cpu_list();
    let mut targets = vec![Target {
        info: TargetInfo {
            name: DIRECT.to_owned(),
            version: "no proxy".to_owned(),
            program: "built-in backend".to_owned(),
            idle_rss_kib: None,
            skipped: None,
            h2_skipped: None,
            h3_skipped: None,
            idle_tls: None,
        },
        http: testbed.backend.addr,
        https: None,
        process: None,
    }];
    for &kind in &options.proxies {
        if interrupted.load(Ordering::Relaxed) {
            return Err(Interrupted.into());
        }
        targets.push(start_proxy(
            kind,
            &options.edge_bin,
            options.selects(Scenario::Http3),
            &common,
            proxy_cpus.as_deref(),
        ));
    }
    if targets.iter().all(|t| t.process.is_none()) {
        bail!("no proxy started; see the messages above");
    }

    // Let start-up work (Go runtime, config reloads) settle before the idle reading.
    sleep_checked(Duration::from_secs(1), interrupted)?;
    for target in &mut targets {
        if let Some(process) = &target.process {
            let pids = procfs::group_members(process.pgid());
            target.info.idle_rss_kib = Some(procfs::usage_of(&pids).rss_kib);
        }
    }
    if options.idle_connections() > 0 {
        for target in &mut targets {
            measure_idle_tls(target, options, interrupted)?;
        }
    }

    let settings_base = Settings {
        rounds: options.rounds(),
        warmup_s: options.warmup().as_secs_f64(),
        duration_s: options.duration().as_secs_f64(),
        connections: options.load.connections,
        handshake_connections: options.load.handshake_connections,
        fixed_rate_connections: options.load.fixed_rate_connections,
        h2_connections: options.load.h2_connections,
        h2_streams: options.load.h2_streams,
        h3_connections: options.load.h3_connections,
        h3_streams: options.load.h3_streams,
        fixed_rate_per_s: 0.0,
        fixed_rate_basis: String::new(),
        fixed_rate_from: None,
        pacer_resolution_us: Some(options.load.pacer_resolution.as_micros() as u64),
        scenarios: options.scenarios.clone(),
        request_timeout_s: options.load.request_timeout.as_secs_f64(),
        workers: testbed.workers,
    };
    let mut session = Session {
        options,
        interrupted,
        ticks: ClockTicks::detect(),
        proxy_cpus: testbed.workers,
        client_cpus: testbed.client_cpus,
        progress: Progress::new(total_cells(&targets, options, options.rounds())),
        cells: Vec::new(),
    };

    for round in 1..=options.rounds() {
        for scenario in Scenario::CLOSED_LOOP {
            if !options.selects(scenario) {
                continue;
            }
            for index in round_order(targets.len(), round) {
                if targets[index].runs(scenario) {
                    session.measure(&targets[index], scenario, round, None)?;
                }
            }
        }
    }

    let fixed = fixed_rate(options, &session.cells);
    if options.selects(Scenario::FixedRate) {
        for round in 1..=options.rounds() {
            for index in round_order(targets.len(), round) {
                if targets[index].runs(Scenario::FixedRate) {
                    session.measure(
                        &targets[index],
                        Scenario::FixedRate,
                        round,
                        Some(fixed.rate_per_s),
                    )?;
                }
            }
        }
    }
    session.progress.finish();

    for target in &mut targets {
        if let Some(process) = &mut target.process {
            process.stop();
        }
    }
    let results = RunResults {
        started_utc: stamp.iso.clone(),
        command: options.command.clone(),
        wall_time_s: started.elapsed().as_secs_f64(),
        host: host_info(testbed.cpus, testbed.pinning.clone()),
        settings: Settings {
            fixed_rate_per_s: fixed.rate_per_s,
            fixed_rate_basis: fixed.basis,
            fixed_rate_from: fixed.from,
            ..settings_base
        },
        targets: targets.into_iter().map(|t| t.info).collect(),
        cells: session.cells,
    };
    write_outputs(&results, &options.out, &stamp)
}

/// A target of the measurements: a proxy, or the backend itself.
pub struct Target {
    pub info: TargetInfo,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub process: Option<ChildProcess>,
}

impl Target {
    /// Returns whether the target can be measured in `scenario`.
    pub fn runs(&self, scenario: Scenario) -> bool {
        let protocol_skipped = match scenario.protocol() {
            Protocol::Http2 => self.info.h2_skipped.is_some(),
            Protocol::Http3 => self.info.h3_skipped.is_some(),
            Protocol::Http1 | Protocol::Http1Tls => false,
        };
        if self.info.skipped.is_some() || protocol_skipped {
            return false;
        }
        scenario.protocol() == Protocol::Http1 || self.https.is_some()
    }

    /// Returns the address the load of `scenario` goes to.
    pub fn addr(&self, scenario: Scenario) -> SocketAddr {
        match scenario.protocol() {
            Protocol::Http1 => self.http,
            _ => self.https.unwrap_or(self.http),
        }
    }
}

/// Returns the order of `len` targets in `round` (1-based): each round starts one target
/// later, so that no target always runs right after the same neighbor.
fn round_order(len: usize, round: usize) -> Vec<usize> {
    (0..len).map(|i| (i + round - 1) % len).collect()
}

/// Returns the number of cells the run measures, for the progress bar.
fn total_cells(targets: &[Target], options: &Options, rounds: usize) -> usize {
    let per_round: usize = Scenario::ALL
        .into_iter()
        .filter(|&s| options.selects(s))
        .map(|s| targets.iter().filter(|t| t.runs(s)).count())
        .sum();
    per_round * rounds
}

/// Starts `kind` pinned to `cpus` and waits until it serves the route. The edge runs from
/// `edge_bin`. With `probe_http3`, a proxy that does not respond to an HTTP/3 request skips
/// that scenario. A proxy that cannot start is returned with the reason in `info.skipped`.
pub fn start_proxy(
    kind: ProxyKind,
    edge_bin: &Path,
    probe_http3: bool,
    common: &Common<'_>,
    cpus: Option<&str>,
) -> Target {
    let mut target = Target {
        info: TargetInfo {
            name: kind.name().to_owned(),
            version: "unknown".to_owned(),
            program: String::new(),
            idle_rss_kib: None,
            skipped: None,
            h2_skipped: None,
            h3_skipped: None,
            idle_tls: None,
        },
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        https: None,
        process: None,
    };
    match try_start_proxy(kind, edge_bin, probe_http3, common, cpus, &mut target) {
        Ok(()) => eprintln!("bench: {kind} {} ready", target.info.version),
        Err(e) => {
            eprintln!("bench: skipping {kind}: {e:#}");
            target.info.skipped = Some(format!("{e:#}"));
            if let Some(mut process) = target.process.take() {
                process.stop();
            }
        }
    }
    target
}

fn try_start_proxy(
    kind: ProxyKind,
    edge_bin: &Path,
    probe_http3: bool,
    common: &Common<'_>,
    cpus: Option<&str>,
    target: &mut Target,
) -> anyhow::Result<()> {
    let program = proxies::locate(kind, edge_bin)?;
    target.info.program = program.display().to_string();
    target.info.version = proxies::version(kind, &program);
    if kind == ProxyKind::Edge {
        if let Some(source) = edge_source_state() {
            target.info.version = format!("{} ({source})", target.info.version);
        }
    }
    let ports = Ports {
        http: free_port()?,
        https: free_port()?,
        admin: free_port()?,
    };
    let launch = proxies::configure(kind, &program, ports, common)?;
    let log = common.dir.join(format!("{kind}.log"));
    let mut process = ChildProcess::spawn(
        kind.name(),
        &launch.program,
        &launch.args,
        &launch.env,
        cpus,
        &log,
    )?;
    target.http = SocketAddr::from(([127, 0, 0, 1], ports.http));
    target.https = Some(SocketAddr::from(([127, 0, 0, 1], ports.https)));
    let ready = wait_ready(&mut process, target.http, target.https);
    target.process = Some(process);
    ready?;
    if let Some(https) = target.https {
        // A proxy without HTTP/2 or HTTP/3 on its TLS port skips that scenario only.
        if let Err(reason) = probe_h2(https) {
            eprintln!("bench: {kind} skips {}: {reason}", Scenario::TlsHttp2);
            target.info.h2_skipped = Some(reason);
        }
        if probe_http3 {
            let support = match kind.http3_unsupported() {
                Some(reason) => Err(reason.to_owned()),
                None => probe_h3(https),
            };
            if let Err(reason) = support {
                eprintln!("bench: {kind} skips {}: {reason}", Scenario::Http3);
                target.info.h3_skipped = Some(reason);
            }
        }
    }
    Ok(())
}

/// Checks that `https` returns status 200 for an HTTP/3 request over UDP. A proxy can open
/// its UDP socket a little after its TCP listeners, so a failed probe is retried.
fn probe_h3(https: SocketAddr) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..H3_PROBE_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        match load::probe(https, ROUTE_HOST, Protocol::Http3, Duration::from_secs(2)) {
            Ok(200) => return Ok(()),
            Ok(status) => return Err(format!("HTTP/3 request answered status {status}")),
            Err(e) => last = format!("no HTTP/3 response on UDP port {}: {e:#}", https.port()),
        }
    }
    Err(last)
}

/// Checks that `https` selects `h2` and returns status 200 for an HTTP/2 request.
fn probe_h2(https: SocketAddr) -> Result<(), String> {
    match load::probe(https, ROUTE_HOST, Protocol::Http2, Duration::from_secs(2)) {
        Ok(200) => Ok(()),
        Ok(status) => Err(format!("HTTP/2 request answered status {status}")),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Waits until both listeners return status 200 for a request to the route host.
fn wait_ready(
    process: &mut ChildProcess,
    http: SocketAddr,
    https: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_problem = String::from("no attempt yet");
    let checks: Vec<(SocketAddr, Protocol)> = std::iter::once((http, Protocol::Http1))
        .chain(https.map(|addr| (addr, Protocol::Http1Tls)))
        .collect();
    let mut next = 0;
    while Instant::now() < deadline {
        if let Some(status) = process.exit_status() {
            bail!(
                "exited during start-up with {status}; last log lines:\n{}",
                process.log_tail(15)
            );
        }
        let (addr, protocol) = checks[next];
        match load::probe(addr, ROUTE_HOST, protocol, Duration::from_secs(1)) {
            Ok(200) => {
                next += 1;
                if next == checks.len() {
                    return Ok(());
                }
                continue;
            }
            Ok(status) => last_problem = format!("{protocol} on {addr} answered status {status}"),
            Err(e) => last_problem = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "not ready within {} s: {last_problem}; last log lines:\n{}",
        READY_TIMEOUT.as_secs(),
        process.log_tail(15)
    )
}

/// Describes the edge sources the binary was most likely built from: the commit, and whether
/// `edge/` had uncommitted changes. `None` outside a git checkout.
fn edge_source_state() -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let git = |args: &[&str]| -> Option<String> {
        let output = std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let changes = git(&["status", "--porcelain", "--", "edge"])?;
    Some(if changes.is_empty() {
        format!("commit {commit}")
    } else {
        format!("commit {commit} with uncommitted changes in edge/")
    })
}

fn free_port() -> anyhow::Result<u16> {
    // NOTE: the port is free when this returns, but another process could take it before the
    // proxy binds it. The proxy then fails to start and is reported as skipped.
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// State of the measuring phase.
struct Session<'a> {
    options: &'a Options,
    interrupted: &'a Arc<AtomicBool>,
    ticks: ClockTicks,
    proxy_cpus: usize,
    client_cpus: usize,
    progress: Progress,
    cells: Vec<Cell>,
}

impl Session<'_> {
    fn measure(
        &mut self,
        target: &Target,
        scenario: Scenario,
        round: usize,
        rate: Option<f64>,
    ) -> anyhow::Result<()> {
        let options = self.options;
        self.progress
            .begin(round, options.rounds(), scenario, &target.info.name);
        let config = options.load.config(
            scenario,
            target.addr(scenario),
            rate,
            self.client_cpus,
            options.warmup(),
            options.duration(),
        );
        let pids = target
            .process
            .as_ref()
            .map(|p| procfs::group_members(p.pgid()))
            .unwrap_or_default();

        let running = load::start(&config, self.interrupted.clone())?;
        let window = running.window();
        sleep_until_checked(window.measure_from, self.interrupted);
        let proxy_before = procfs::usage_of(&pids);
        let client_before = procfs::self_cpu_ticks();
        let measured_from = Instant::now();
        let mut rss_max = proxy_before.rss_kib;
        while Instant::now() < window.end && !self.interrupted.load(Ordering::Relaxed) {
            let left = window.end.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(RSS_SAMPLE_INTERVAL));
            rss_max = rss_max.max(procfs::usage_of(&pids).rss_kib);
        }
        let proxy_after = procfs::usage_of(&pids);
        let client_after = procfs::self_cpu_ticks();
        let wall = measured_from.elapsed().as_secs_f64();
        let load = running.join()?;
        if self.interrupted.load(Ordering::Relaxed) {
            return Err(Interrupted.into());
        }

        let client_cpu_s = self
            .ticks
            .to_duration(client_after.saturating_sub(client_before))
            .as_secs_f64();
        let (proxy_cpu_s, proxy_cpu_us_per_request, proxy_cpu_busy, rss_load_kib) =
            if pids.is_empty() {
                (None, None, None, None)
            } else {
                let cpu_s = self
                    .ticks
                    .to_duration(proxy_after.cpu_ticks.saturating_sub(proxy_before.cpu_ticks))
                    .as_secs_f64();
                let per_request = (load.responses > 0).then(|| cpu_s * 1e6 / load.responses as f64);
                (
                    Some(cpu_s),
                    per_request,
                    Some(cpu_s / wall / self.proxy_cpus as f64),
                    Some(rss_max),
                )
            };
        let cell = Cell {
            scenario,
            target: target.info.name.clone(),
            round,
            load,
            proxy_cpu_s,
            proxy_cpu_us_per_request,
            proxy_cpu_busy,
            client_cpu_busy: client_cpu_s / wall / self.client_cpus as f64,
            rss_load_kib,
        };
        self.progress.end(&cell);
        self.cells.push(cell);
        sleep_checked(CELL_PAUSE, self.interrupted)
    }
}

/// Opens idle keep-alive TLS connections to a proxy and records how much its RSS grows.
/// A failure is reported and leaves the measurement out. Only Ctrl-C is an error.
fn measure_idle_tls(
    target: &mut Target,
    options: &Options,
    interrupted: &AtomicBool,
) -> anyhow::Result<()> {
    let (Some(process), Some(https)) = (&target.process, target.https) else {
        return Ok(());
    };
    if target.info.skipped.is_some() {
        return Ok(());
    }

    let pgid = process.pgid();
    let count = options.idle_connections();
    let rss_before_kib = procfs::usage_of(&procfs::group_members(pgid)).rss_kib;
    let held = match load::hold_idle_connections(
        https,
        ROUTE_HOST,
        Protocol::Http1Tls,
        count,
        IDLE_OPEN_CONCURRENCY,
        options.load.request_timeout,
    ) {
        Ok(held) => held,
        Err(e) => {
            eprintln!(
                "bench: cannot hold idle connections to {}: {e:#}",
                target.info.name
            );
            return Ok(());
        }
    };

    // Let the proxy finish the work of the last handshakes before reading its RSS.
    sleep_checked(Duration::from_millis(500), interrupted)?;
    let rss_after_kib = procfs::usage_of(&procfs::group_members(pgid)).rss_kib;
    let opened = held.opened;
    let errors = held.errors.clone();
    drop(held);

    let kib_per_connection =
        (opened > 0).then(|| rss_after_kib.saturating_sub(rss_before_kib) as f64 / opened as f64);
    eprintln!(
        "bench: {}: {opened} of {count} idle TLS connections held, RSS {} → {} KiB ({} KiB each)",
        target.info.name,
        rss_before_kib,
        rss_after_kib,
        kib_per_connection.map_or_else(|| "–".to_owned(), |k| format!("{k:.1}"))
    );
    target.info.idle_tls = Some(IdleTlsMemory {
        requested: count,
        opened,
        errors,
        rss_before_kib,
        rss_after_kib,
        kib_per_connection,
    });
    Ok(())
}

/// The rate of the fixed-rate scenario and how it was chosen.
#[derive(Debug, Clone, PartialEq)]
struct FixedRate {
    rate_per_s: f64,
    basis: String,
    /// Target whose closed-loop rate was halved.
    from: Option<String>,
}

/// Chooses the rate of the fixed-rate scenario: `--fixed-rate`, or else half of the median
/// closed-loop HTTP/1.1 rate of nginx, the edge or the direct path, the first one measured.
fn fixed_rate(options: &Options, cells: &[Cell]) -> FixedRate {
    if let Some(rate) = options.fixed_rate {
        return FixedRate {
            rate_per_s: rate,
            basis: "set with --fixed-rate".to_owned(),
            from: None,
        };
    }
    for name in [ProxyKind::Nginx.name(), ProxyKind::Edge.name(), DIRECT] {
        let rates: Vec<f64> = cells
            .iter()
            .filter(|c| c.scenario == Scenario::KeepAlive && c.target == name)
            .map(|c| c.load.requests_per_s)
            .collect();
        if let Some(spread) = crate::results::Spread::of(&rates) {
            if spread.median > 0.0 {
                return FixedRate {
                    rate_per_s: (spread.median / 2.0).round().max(1.0),
                    basis: format!(
                        "half of {name}'s median closed-loop HTTP/1.1 keep-alive rate ({} req/s) in this run",
                        report::thousands(spread.median)
                    ),
                    from: Some(name.to_owned()),
                };
            }
        }
    }
    FixedRate {
        rate_per_s: 1000.0,
        basis: "1,000 req/s, because no closed-loop rate was measured".to_owned(),
        from: None,
    }
}

/// Sleeps for `duration`, and fails with [`Interrupted`] when `interrupted` is set.
pub fn sleep_checked(duration: Duration, interrupted: &AtomicBool) -> anyhow::Result<()> {
    sleep_until_checked(Instant::now() + duration, interrupted);
    if interrupted.load(Ordering::Relaxed) {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Sleeps until `deadline` or until `interrupted` is set, whichever comes first.
pub fn sleep_until_checked(deadline: Instant, interrupted: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= deadline || interrupted.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}

fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("reading the CPU affinity")?;
    Ok((0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect())
}

/// Pins the calling thread. Threads it spawns later inherit the affinity.
fn pin_current_thread(cpus: &[usize]) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)
            .with_context(|| format!("CPU {cpu} is out of range"))?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)
        .with_context(|| format!("pinning the load generator to CPUs {}", cpu_list(cpus)))
}

/// Describes the machine: host name, CPU model, kernel and OS, with the CPU count and pinning
/// given.
pub fn host_info(cpus: usize, pinning: String) -> HostInfo {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned())
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split(':').nth(1))
        .map_or_else(|| "unknown".to_owned(), |m| m.trim().to_owned());
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let os = os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or_else(|| "unknown".to_owned(), |v| v.trim_matches('"').to_owned());
    HostInfo {
        hostname: read("/proc/sys/kernel/hostname"),
        cpu_model,
        cpus,
        kernel: read("/proc/sys/kernel/osrelease"),
        os,
        pinning,
    }
}

/// Writes the timestamped Markdown, JSON and SVG files and their `latest` copies. Returns the
/// path of `latest.md`.
fn write_outputs(results: &RunResults, out: &Path, stamp: &Timestamp) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(results).context("serializing the results")?;
    let latency = svg::latency_plot(results);
    let throughput = svg::throughput_plot(results);
    let mut latest = PathBuf::new();
    for prefix in [stamp.file.as_str(), "latest"] {
        let latency_name = format!("{prefix}-latency.svg");
        let throughput_name = format!("{prefix}-throughput.svg");
        let markdown = report::render_markdown(
            results,
            &PlotFiles {
                latency: &latency_name,
                throughput: &throughput_name,
            },
        );
        let files = [
            (latency_name.clone(), &latency),
            (throughput_name.clone(), &throughput),
            (format!("{prefix}.json"), &json),
            (format!("{prefix}.md"), &markdown),
        ];
        for (name, text) in files {
            let path = out.join(&name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        latest = out.join(format!("{prefix}.md"));
    }
    Ok(latest)
}

/// The temporary folder with certificates, configurations and proxy logs. It is removed at the
/// end unless kept for inspection.
pub struct RunDir {
    pub path: PathBuf,
    keep: std::cell::Cell<bool>,
}

impl RunDir {
    /// Creates the folder under the system's temporary folder.
    ///
    /// # Errors
    /// Fails when the folder cannot be created.
    pub fn create(keep: bool) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("edge-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path,
            keep: std::cell::Cell::new(keep),
        })
    }

    /// Keeps the folder after the run, for example to read the logs after a failure.
    pub fn keep(&self) {
        self.keep.set(true);
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep.get() {
            eprintln!(
                "bench: configurations and proxy logs kept in {}",
                self.path.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The progress line: one line updated in place on a terminal, one line per cell otherwise.
struct Progress {
    total: usize,
    done: usize,
    started: Instant,
    terminal: bool,
    current: String,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            done: 0,
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            current: String::new(),
        }
    }

    fn begin(&mut self, round: usize, rounds: usize, scenario: Scenario, target: &str) {
        self.current = format!("round {round}/{rounds}, {scenario}, {target}");
        if self.terminal {
            self.draw("");
        }
    }

    fn end(&mut self, cell: &Cell) {
        self.done += 1;
        let summary = format!(
            "{} req/s, p99 {} µs, {} errors",
            report::thousands(cell.load.requests_per_s),
            report::thousands(cell.load.latency_us.p99_us as f64),
            cell.load.error_count()
        );
        if self.terminal {
            self.draw(&summary);
        } else {
            eprintln!("[{}/{}] {}: {summary}", self.done, self.total, self.current);
        }
    }

    fn draw(&self, summary: &str) {
        const BAR: usize = 24;
        let filled = (BAR * self.done).checked_div(self.total).unwrap_or(BAR);
        let eta = if self.done == 0 {
            String::from("?")
        } else {
            let per_cell = self.started.elapsed().as_secs_f64() / self.done as f64;
            format!("{:.0} s", per_cell * (self.total - self.done) as f64)
        };
        let mut stderr = std::io::stderr();
        let _ = write!(
            stderr,
            "\r\x1b[2K[{}{}] {}/{} ETA {eta} | {} {summary}",
            "#".repeat(filled),
            "-".repeat(BAR - filled),
            self.done,
            self.total,
            self.current
        );
        let _ = stderr.flush();
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_cpus_split_one_each() {
        let plan = CpuPlan::split(&[0, 1]).unwrap();
        assert_eq!(plan.proxy, vec![0]);
        assert_eq!(plan.client, vec![1]);
        assert!(plan.proxy_cpus_from_zero());
    }

    #[test]
    fn one_cpu_is_not_pinned() {
        assert_eq!(CpuPlan::split(&[3]), None);
    }

    #[test]
    fn offset_cpus_are_not_from_zero() {
        let plan = CpuPlan::split(&[2, 3, 4, 5]).unwrap();
        assert_eq!(plan.proxy, vec![2, 3]);
        assert!(!plan.proxy_cpus_from_zero());
    }

    #[test]
    fn rounds_start_one_target_later() {
        assert_eq!(round_order(3, 1), vec![0, 1, 2]);
        assert_eq!(round_order(3, 2), vec![1, 2, 0]);
        assert_eq!(round_order(3, 4), vec![0, 1, 2]);
    }

    #[test]
    fn cpu_list_joins_with_commas() {
        assert_eq!(cpu_list(&[0, 2, 3]), "0,2,3");
    }
}
