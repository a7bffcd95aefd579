//! The load harness that measures edge against nginx, HAProxy, Traefik and Caddy on loopback
//! (`bench run`), profiles one of them under load with perf (`bench profile`), and runs its
//! parts on their own: the load generator (`bench load`) and the static backend
//! (`bench backend`).
// Only the open-loop pacer allows unsafe code, to register its timerfd with tokio.
#![deny(unsafe_code)]

mod backend;
mod harness;
mod load;
mod process;
mod procfs;
mod profile;
mod proxies;
mod report;
mod response;
mod results;
mod schedule;
mod stats;
mod svg;
mod tls;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    load::{LoadConfig, LoadReport, Mode, Protocol},
    proxies::ProxyKind,
    results::Scenario,
};

/// Benchmark harness for the edge reverse proxy.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the backend and every proxy on 127.0.0.1, measure them interleaved over rounds,
    /// and write Markdown, JSON and SVG results.
    Run(RunArgs),
    /// Record a CPU profile of one proxy under one scenario's load with perf, and write
    /// collapsed stacks, a flame graph and a summary.
    Profile(ProfileArgs),
    /// Send load to one address and print the report.
    Load(LoadArgs),
    /// Serve the static backend until Ctrl-C.
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        addr: SocketAddr,
        /// Threads, each with its own runtime.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Smoke run: 2 rounds of 0.5 s warm-up and 1.75 s measurement per cell (about 2.5
    /// minutes with every proxy). Without it: 5 rounds of 1 s and 5 s (about 16 minutes).
    #[arg(long)]
    quick: bool,
    /// Number of rounds. Each round measures every target in every scenario once.
    #[arg(long)]
    rounds: Option<usize>,
    /// Warm-up before each measured window, for example `500ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Length of each measured window, for example `6s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    #[command(flatten)]
    load: harness::LoadSettings,
    /// Scenarios to measure, comma-separated [default: all]. The fixed rate is half of nginx's
    /// closed-loop rate only when keep-alive runs too.
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Requests per second of the fixed-rate scenario [default: half of nginx's median
    /// closed-loop HTTP/1.1 rate in the same run].
    #[arg(long)]
    fixed_rate: Option<f64>,
    /// Proxies to measure, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "edge,nginx,haproxy,traefik,caddy"
    )]
    proxies: Vec<ProxyKind>,
    #[command(flatten)]
    output: OutputArgs,
    /// Idle keep-alive TLS connections opened to each proxy to measure memory per connection;
    /// 0 skips it [default: 1000 with --quick, else 5000].
    #[arg(long)]
    idle_connections: Option<usize>,
}

#[derive(Debug, clap::Args)]
struct ProfileArgs {
    /// Proxy to profile.
    #[arg(long, value_enum, default_value = "edge")]
    proxy: ProxyKind,
    /// Scenario whose load runs while perf records: keep-alive, tls-keep-alive,
    /// tls-handshake, h2 or h3 (fixed-rate is not supported).
    #[arg(long, value_enum, default_value = "keep-alive")]
    scenario: Scenario,
    /// Load before the recording starts, for example `2s`.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Length of the recording, for example `6s`. With the default frequency and stack size,
    /// perf writes about 60 MB per second of recording into the temporary folder, and deletes
    /// it after folding.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Samples per second on each CPU (perf `-F`). 999 rather than 1000 keeps the sampling
    /// out of step with timers that fire every millisecond.
    #[arg(long, default_value_t = 999)]
    frequency: u32,
    /// Bytes of the sampled thread's stack that perf copies for DWARF unwinding: a multiple
    /// of 8, at most 65528. Deeper user stacks end in an `[unknown]` frame. The edge's
    /// HTTP/2 stacks need more than 32 KiB: with 32768, 31 % of its samples were cut short.
    #[arg(long, default_value_t = 65528)]
    stack_bytes: u32,
    /// Skip resolving inlined functions in `perf script`. It is much faster, but the samples
    /// of inlined code then count for the function it was inlined into.
    #[arg(long)]
    no_inline: bool,
    /// The perf program.
    #[arg(long, default_value = "perf")]
    perf: PathBuf,
    #[command(flatten)]
    load: harness::LoadSettings,
    #[command(flatten)]
    output: OutputArgs,
}

/// The binary under test and where results go, for `run` and `profile`.
#[derive(Debug, clap::Args)]
struct OutputArgs {
    /// The edge binary, built with `cargo build --release -p edge`.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/edge"))]
    edge_bin: PathBuf,
    /// Folder for the results.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
    /// Command line to record in the results [default: this program's arguments].
    #[arg(long)]
    command: Option<String>,
    /// Keep the temporary folder with configurations and the logs of the proxies and perf.
    #[arg(long)]
    keep_run_dir: bool,
}

impl OutputArgs {
    /// Returns the command line to record: `--command`, or this program's arguments.
    fn command_line(&self) -> String {
        self.command.clone().unwrap_or_else(|| {
            let argv: Vec<String> = std::env::args().collect();
            argv.join(" ")
        })
    }
}

/// Pacing of `bench load`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// Back-to-back requests on each connection.
    Closed,
    /// Fixed total rate (`--rate`) with coordinated-omission correction.
    Open,
    /// A new connection per request (a full TLS handshake with `h1-tls`).
    NewConnection,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Address to send to; loopback only.
    #[arg(long)]
    target: SocketAddr,
    /// Host header and TLS server name.
    #[arg(long, default_value = proxies::ROUTE_HOST)]
    host: String,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Protocol of the requests.
    #[arg(long, value_enum, default_value = "h1")]
    protocol: Protocol,
    /// Sending pattern: back to back, at a fixed rate, or each request on a new connection.
    #[arg(long, value_enum, default_value = "closed")]
    mode: ModeArg,
    /// Total requests per second of `--mode open`.
    #[arg(long)]
    rate: Option<f64>,
    /// Connections, spread over the threads.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Concurrent streams on each connection, with `--protocol h2` or `h3`.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Load-generator threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Warm-up before the measured window.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Length of the measured window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time allowed for connect, handshake and response of one request.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// With `--mode open`: shortest time between two wake-ups of the pacer, for example
    /// `100us`. Requests that fall due in between leave together. `0s` releases each request
    /// at its own due time, at a higher client CPU cost.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pacer_resolution: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Profile(args) => profile(args),
        Command::Load(args) => load(&args),
        Command::Backend { addr, threads } => serve_backend(addr, threads),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            if e.is::<harness::Interrupted>() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let command = args.output.command_line();
    let options = harness::Options {
        quick: args.quick,
        rounds: args.rounds,
        warmup: args.warmup,
        duration: args.duration,
        load: args.load,
        scenarios: args.scenarios,
        fixed_rate: args.fixed_rate,
        proxies: args.proxies,
        edge_bin: args.output.edge_bin,
        out: args.output.out,
        command,
        keep_run_dir: args.output.keep_run_dir,
        idle_connections: args.idle_connections,
    };
    let latest = harness::run(&options)?;
    println!("{}", std::fs::read_to_string(&latest).unwrap_or_default());
    eprintln!("bench: results written to {}", latest.display());
    Ok(())
}

fn profile(args: ProfileArgs) -> anyhow::Result<()> {
    let command = args.output.command_line();
    let options = profile::Options {
        proxy: args.proxy,
        scenario: args.scenario,
        warmup: args.warmup,
        duration: args.duration,
        frequency_hz: args.frequency,
        stack_bytes: args.stack_bytes,
        inline: !args.no_inline,
        perf: args.perf,
        load: args.load,
        edge_bin: args.output.edge_bin,
        out: args.output.out,
        command,
        keep_run_dir: args.output.keep_run_dir,
    };
    let summary = profile::run(&options)?;
    println!("{}", std::fs::read_to_string(&summary).unwrap_or_default());
    eprintln!("bench: profile written to {}", summary.display());
    Ok(())
}

fn load(args: &LoadArgs) -> anyhow::Result<()> {
    if !args.target.ip().is_loopback() {
        anyhow::bail!(
            "target {} is not a loopback address; the bench only loads 127.0.0.0/8 and ::1",
            args.target
        );
    }
    let mode = match args.mode {
        ModeArg::Closed => Mode::Closed,
        ModeArg::NewConnection => Mode::NewConnection,
        ModeArg::Open => Mode::Open {
            rate_per_s: args
                .rate
                .context("--mode open needs --rate REQUESTS_PER_SECOND")?,
        },
    };
    let config = LoadConfig {
        target: args.target,
        host: args.host.clone(),
        path: args.path.clone(),
        protocol: args.protocol,
        mode,
        connections: args.connections,
        streams: args.streams,
        threads: args.threads,
        warmup: args.warmup,
        duration: args.duration,
        request_timeout: args.timeout,
        pacer_resolution: args.pacer_resolution,
    };
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
        .context("installing the Ctrl-C handler")?;
    let report = load::run(&config, stop)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if report.responses == 0 {
        anyhow::bail!(
            "no request succeeded in the measured window; the errors above say why, and \
             `--target` must be a loopback address where a server is listening"
        );
    }
    Ok(())
}

fn print_report(report: &LoadReport) {
    let latency = &report.latency_us;
    let streams = if report.streams > 1 {
        format!(" × {} streams", report.streams)
    } else {
        String::new()
    };
    println!(
        "{}, {}, {} connections{streams}, {:.1} s measured",
        report.protocol, report.mode, report.connections, report.measured_s
    );
    println!(
        "requests/s {:.0}  responses {}  errors {}",
        report.requests_per_s,
        report.responses,
        report.error_count()
    );
    for (kind, count) in &report.errors {
        println!("  {kind}: {count}");
    }
    println!(
        "latency µs{}: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        if report.co_corrected {
            " (coordinated-omission corrected)"
        } else {
            ""
        },
        latency.p50_us,
        latency.p90_us,
        latency.p99_us,
        latency.p999_us,
        latency.max_us
    );
    if let Some(send_lag) = &report.send_lag_us {
        println!(
            "send lag µs: p50 {}  p99 {}",
            send_lag.p50_us, send_lag.p99_us
        );
    }
    if let Some(session) = &report.tls_session {
        println!("TLS: {session}");
    }
}

fn serve_backend(addr: SocketAddr, threads: usize) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
        .context("installing the Ctrl-C handler")?;
    let backend = backend::spawn(addr, threads)?;
    eprintln!(
        "bench: backend listening on {}; Ctrl-C stops it",
        backend.addr
    );
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
