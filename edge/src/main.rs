//! The edge data plane: thread-per-core HTTPS reverse proxy with Traefik-compatible routing.

mod access_log;
mod admin;
mod agent_link;
mod control;
mod demo;
mod forward;
mod http1;
mod http2;
mod http3;
mod io;
mod listen;
mod logging;
mod metrics;
mod settings;
mod state;
mod tls;
mod upstream;
mod upstream_tls;
mod worker;
mod xdp;

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::ExitCode,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use clap::{parser::ValueSource, CommandFactory, FromArgMatches};
use edge_proto::Snapshot;
use tracing::{error, info};

use crate::{
    control::Control,
    metrics::{RouteStats, WorkerMetrics},
    settings::{Cli, Command, RunArgs, Settings},
    state::Shared,
    worker::WorkerListeners,
};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if !matches!(cli.command, Some(Command::CheckConfig { .. })) {
        logging::init(cli.run.log_format);
        std::panic::set_hook(Box::new(|panic| {
            error!(panic = %panic, "panic");
        }));
    }
    let result = match cli.command {
        Some(Command::CheckConfig { file }) => {
            // The errors are already on stdout; only the exit status is left to report.
            return match check_config(&file) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        }
        Some(Command::Demo) => {
            let chosen = |id: &str| chosen_by_user(&matches, id);
            let user_addrs = (chosen("http_addr"), chosen("https_addr"));
            run_demo(cli.run, user_addrs)
        }
        None => run(cli.run, None),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "edge failed");
            eprintln!("edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let snapshot = match control::load_routes(file) {
        Ok(s) => s,
        Err(errors) => {
            for e in &errors {
                println!("{}: {e}", file.display());
            }
            bail!("{} has {} error(s)", file.display(), errors.len());
        }
    };
    let fallback = tls::self_signed_default()?;
    let registry = Mutex::new(HashMap::new());
    let tls_cache = upstream_tls::UpstreamTlsCache::default();
    match state::compile_with(&snapshot, fallback, &registry, 1, &tls_cache) {
        Ok(compiled) => {
            println!(
                "{}: valid: {} router(s), {} service(s), {} certificate name(s)",
                file.display(),
                compiled.routers.len(),
                compiled.services.len(),
                compiled.certs.name_count()
            );
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                println!("{}: {e}", file.display());
            }
            bail!("{} has {} error(s)", file.display(), errors.len());
        }
    }
}

/// Returns whether the user set argument `id` on the command line or in its environment
/// variable, at the top level or after the subcommand.
fn chosen_by_user(matches: &clap::ArgMatches, id: &str) -> bool {
    let from_user = |m: &clap::ArgMatches| {
        matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    from_user(matches) || matches.subcommand().is_some_and(|(_, sub)| from_user(sub))
}

/// Runs the edge with the demo routes. `user_addrs` is true for each of the HTTP and HTTPS
/// addresses that the user chose. The others become unprivileged loopback ports.
fn run_demo(mut args: RunArgs, user_addrs: (bool, bool)) -> anyhow::Result<()> {
    if !user_addrs.0 {
        args.http_addr = "127.0.0.1:8080".parse()?;
    }
    if !user_addrs.1 {
        args.https_addr = "127.0.0.1:8443".parse()?;
    }
    let backend = demo::start_backend().context("starting the demo backend")?;
    let snapshot = demo::snapshot(backend);
    run(args, Some(snapshot))
}

fn run(args: RunArgs, fixed_snapshot: Option<Snapshot>) -> anyhow::Result<()> {
    let workers = Settings::from_args(&args, 443).workers;
    let https = listen::bind_reuseport(args.https_addr, workers)?;
    let http = listen::bind_reuseport(args.http_addr, workers)?;
    let https_addr = https[0].local_addr()?;
    let http_addr = http[0].local_addr()?;
    let quic = if args.http3 {
        listen::bind_udp_reuseport(https_addr, workers)?
    } else {
        Vec::new()
    };
    let admin = std::net::TcpListener::bind(args.admin_addr)
        .with_context(|| format!("cannot listen on the admin address {}", args.admin_addr))?;
    let admin_addr = admin.local_addr()?;
    let settings = Settings::from_args(&args, https_addr.port());
    let kernel = xdp::Kernel::start(
        &args.kernel_options(),
        &xdp::ListenerGroups {
            http: &http,
            https: &https,
            quic: &quic,
        },
    );

    let socket_path = args.snapshot_socket.clone().or_else(|| {
        args.state_dir
            .as_ref()
            .map(|dir| dir.join(agent_link::SOCKET_FILE))
    });
    if args.routes_file.is_some() && socket_path.is_some() {
        bail!("--routes-file cannot be combined with the agent's snapshot socket (--state-dir or --snapshot-socket): give the routes file to the agent instead");
    }
    if let Some(dir) = &args.state_dir {
        agent_link::ensure_state_dir(dir)?;
    }
    let store = args
        .state_dir
        .as_deref()
        .map(agent_link::SnapshotStore::in_dir);

    // Taken before loading, so a file replaced while the edge starts is reloaded.
    let routes_fingerprint = args.routes_file.as_deref().and_then(control::fingerprint);
    let initial = match (&fixed_snapshot, &args.routes_file, &store) {
        (Some(snapshot), _, _) => snapshot.clone(),
        (None, Some(path), _) => control::load_routes(path).map_err(|errors| {
            anyhow::anyhow!(
                "invalid routes file {}:\n  {}",
                path.display(),
                errors.join("\n  ")
            )
        })?,
        (None, None, Some(store)) => match store.load() {
            Ok(Some(snapshot)) => {
                info!(
                    version = snapshot.version,
                    "serving the persisted snapshot until the agent sends a new one"
                );
                snapshot
            }
            Ok(None) => {
                info!("no persisted snapshot: every request gets 404 until the agent sends one");
                Snapshot::default()
            }
            Err(e) => {
                error!(error = %e, "ignoring the persisted snapshot");
                Snapshot::default()
            }
        },
        (None, None, None) => {
            info!("no routes file given: every request gets 404 until one is configured");
            Snapshot::default()
        }
    };

    let fallback_cert = tls::self_signed_default()?;
    let route_stats = Mutex::new(HashMap::new());
    let upstream_tls = upstream_tls::UpstreamTlsCache::default();
    let compiled = state::compile_with(
        &initial,
        fallback_cert.clone(),
        &route_stats,
        settings.workers,
        &upstream_tls,
    )
    .map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid routes:\n  {}", lines.join("\n  "))
    })?;
    let shared = Arc::new(Shared {
        current: Arc::new(ArcSwap::from_pointee(compiled)),
        metrics: (0..settings.workers)
            .map(|_| WorkerMetrics::default())
            .collect(),
        route_stats,
        unrouted_stats: Arc::new(RouteStats::new(settings.workers)),
        ready_workers: Default::default(),
        // One list per worker, then one per QUIC thread.
        in_flight: (0..settings.workers * 2)
            .map(|_| Mutex::new(Vec::new()))
            .collect(),
        fallback_cert,
        upstream_tls,
        ticketer: rustls::crypto::ring::Ticketer::new().context("creating the TLS ticket key")?,
        settings,
        kernel,
    });

    if !quic.is_empty() {
        http3::log_migration(&shared);
    }

    let mut stops = Vec::new();
    let mut handles = Vec::new();
    for (id, (http, https)) in http.into_iter().zip(https).enumerate() {
        let (stop_tx, stop_rx) = futures_channel::oneshot::channel();
        stops.push(stop_tx);
        handles.push(worker::spawn(
            id,
            shared.clone(),
            WorkerListeners { http, https },
            stop_rx,
        )?);
    }
    for (id, socket) in quic.into_iter().enumerate() {
        let (stop_tx, stop_rx) = futures_channel::oneshot::channel();
        stops.push(stop_tx);
        handles.push(http3::spawn(id, shared.clone(), socket, stop_rx)?);
    }
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("edge-admin".into())
            .spawn(move || admin::serve(admin, shared))?;
    }
    if let Some(path) = &socket_path {
        let listener = agent_link::bind(path)?;
        info!(path = %path.display(), "listening for snapshots from the agent");
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("edge-snapshots".into())
            .spawn(move || agent_link::serve(listener, shared, store))?;
    }

    let started = Instant::now();
    while shared.ready_workers.load(Ordering::SeqCst) < shared.settings.workers {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("workers did not start within 30s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    info!(
        http_addr = %http_addr,
        https_addr = %https_addr,
        admin_addr = %admin_addr,
        workers = shared.settings.workers,
        "edge ready"
    );
    if fixed_snapshot.is_some() {
        print_demo_help(http_addr, https_addr, admin_addr);
    }

    let version = shared.current.load().version;
    let signal = Control::new(
        shared.clone(),
        args.routes_file.clone(),
        routes_fingerprint,
        version,
        args.reload_interval,
    )
    .run()?;
    info!(signal, grace = ?shared.settings.shutdown_grace, "stopping: no new connections, finishing in-flight requests");
    for stop in stops {
        let _ = stop.send(());
    }
    for handle in handles {
        let _ = handle.join();
    }
    if let Some(path) = &socket_path {
        // A later edge would replace a stale socket anyway; removing it keeps the state
        // directory honest about what runs.
        let _ = std::fs::remove_file(path);
    }
    info!("edge stopped");
    Ok(())
}

fn print_demo_help(http: SocketAddr, https: SocketAddr, admin: SocketAddr) {
    eprintln!(
        "\nedge demo is running. Try:\n  curl -k https://localhost:{}/hello\n  curl -i http://localhost:{}/hello          (redirects to HTTPS)\n  curl -H 'Host: plain.localhost' http://127.0.0.1:{}/   (a plain-HTTP route)\n  curl http://{admin}/metrics\nStop it with Ctrl-C.\n",
        https.port(),
        http.port(),
        http.port(),
    );
}
