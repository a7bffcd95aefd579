//! The side agent (control plane): turns Docker labels and a routes file into route
//! snapshots for the edge, probes backends, and serves the ops control socket.
#![forbid(unsafe_code)]

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use clap::Parser;
use edge_agent::{
    acme::{self, ChallengeKind, KeyType, ResolverConfig},
    ctl,
    desired::AgentOptions,
    docker::{self, DockerView},
    edge_link::EdgeLink,
    filter::{self, FilterSettings},
    health::Thresholds,
    reconcile::{LoopSettings, Reconciler},
};
use edge_ebpf::Limits;
use tokio::sync::{mpsc, watch};
use tracing::{error, info};

/// Routes Docker containers with Traefik labels through the edge.
#[derive(Debug, Parser)]
#[command(name = "agent", version, about)]
struct Args {
    /// State directory shared with the edge: snapshot socket, persisted snapshot, control socket.
    #[arg(long, env = "EDGE_STATE_DIR", default_value = "/var/lib/edge")]
    state_dir: PathBuf,
    /// The edge's snapshot socket [default: STATE_DIR/edge.sock].
    #[arg(long, env = "EDGE_SNAPSHOT_SOCKET")]
    edge_socket: Option<PathBuf>,
    /// The control socket for edgectl [default: STATE_DIR/agent.sock].
    #[arg(long, env = "EDGE_AGENT_SOCKET")]
    control_socket: Option<PathBuf>,
    /// Docker engine address, for example unix:///var/run/docker.sock or tcp://127.0.0.1:2375.
    #[arg(long, env = "DOCKER_HOST")]
    docker_host: Option<String>,
    /// Read containers from Docker.
    #[arg(long, env = "EDGE_DOCKER", default_value_t = true, action = clap::ArgAction::Set)]
    docker: bool,
    /// Docker network used to reach containers that have no traefik.docker.network label.
    #[arg(long, env = "EDGE_DOCKER_NETWORK")]
    docker_network: Option<String>,
    /// Route containers without a traefik.enable label (Traefik's exposedByDefault).
    #[arg(long, env = "EDGE_EXPOSED_BY_DEFAULT", default_value_t = true, action = clap::ArgAction::Set)]
    exposed_by_default: bool,
    /// Ignore unknown label keys with a warning instead of skipping the container.
    #[arg(long, env = "EDGE_LENIENT_LABELS")]
    lenient_labels: bool,
    /// A routes file in Traefik's file-provider format, combined with Docker's routes.
    #[arg(long, env = "EDGE_AGENT_ROUTES_FILE")]
    routes_file: Option<PathBuf>,
    /// Passing probes before a backend receives traffic.
    #[arg(long, env = "EDGE_PROBE_RISE", default_value_t = 2)]
    probe_rise: u32,
    /// Failing probes before a backend stops receiving traffic.
    #[arg(long, env = "EDGE_PROBE_FALL", default_value_t = 3)]
    probe_fall: u32,
    /// Directory on bpffs where the edge pins the XDP filter's maps.
    #[arg(long, env = "EDGE_BPF_PIN_DIR", default_value = edge_ebpf::PIN_DIR)]
    bpf_pin_dir: PathBuf,
    /// New TCP connections (SYN without ACK) per second that one source address may open;
    /// 0 disables the limit.
    #[arg(long, env = "EDGE_SYN_RATE", default_value_t = 200)]
    syn_rate: u32,
    /// SYNs one source may send at once before --syn-rate applies.
    #[arg(long, env = "EDGE_SYN_BURST", default_value_t = 400)]
    syn_burst: u32,
    /// QUIC Initial packets per second from one source address; 0 disables the limit.
    #[arg(long, env = "EDGE_QUIC_RATE", default_value_t = 200)]
    quic_rate: u32,
    /// QUIC Initial packets one source may send at once before --quic-rate applies.
    #[arg(long, env = "EDGE_QUIC_BURST", default_value_t = 400)]
    quic_burst: u32,
    /// Length of the IPv4 prefix that the rate limits treat as one source (32: each address).
    #[arg(long, env = "EDGE_RATE_LIMIT_PREFIX_V4", default_value_t = 32, value_parser = clap::value_parser!(u32).range(0..=32))]
    rate_limit_prefix_v4: u32,
    /// Length of the IPv6 prefix that the rate limits treat as one source; 64 because one
    /// host often owns a whole /64.
    #[arg(long, env = "EDGE_RATE_LIMIT_PREFIX_V6", default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=128))]
    rate_limit_prefix_v6: u32,
    /// Block an address automatically after this many malformed packets to the edge's ports
    /// (beyond --auto-block-rate per second); 0 turns automatic blocking off. A spoofed source
    /// address can get blocked too.
    #[arg(long, env = "EDGE_AUTO_BLOCK_AFTER", default_value_t = 0)]
    auto_block_after: u32,
    /// Malformed packets per second forgiven to each address when automatic blocking is on.
    #[arg(long, env = "EDGE_AUTO_BLOCK_RATE", default_value_t = 1)]
    auto_block_rate: u32,
    /// Duration of an automatic block.
    #[arg(long, env = "EDGE_AUTO_BLOCK_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    auto_block_ttl: std::time::Duration,
    /// Name of the ACME certificate resolver that routers name in tls.certresolver.
    #[arg(long, env = "ACME_RESOLVER", default_value = "le")]
    acme_resolver: String,
    /// ACME directory URL; without it no certificate is ordered. Let's Encrypt:
    /// https://acme-v02.api.letsencrypt.org/directory
    #[arg(long, env = "ACME_DIRECTORY_URL")]
    acme_directory_url: Option<String>,
    /// Contact email of the ACME account.
    #[arg(long, env = "ACME_EMAIL")]
    acme_email: Option<String>,
    /// Challenge type: http-01 (port 80) or tls-alpn-01 (port 443).
    #[arg(long, env = "ACME_CHALLENGE", default_value = "http-01")]
    acme_challenge: ChallengeKind,
    /// Key type of ordered certificates: ec256 (ECDSA P-256) or ec384.
    #[arg(long, env = "ACME_KEY_TYPE", default_value = "ec256")]
    acme_key_type: KeyType,
    /// Extra trusted CA certificates (PEM) for the ACME directory's HTTPS, for test CAs.
    #[arg(long, env = "ACME_CA_BUNDLE")]
    acme_ca_bundle: Option<PathBuf>,
    /// A TOML file of more named ACME resolvers ([resolvers.NAME] with directory_url, email,
    /// challenge, key_type, ca_bundle), besides the one the ACME_* settings define.
    #[arg(long, env = "ACME_RESOLVERS_FILE")]
    acme_resolvers_file: Option<PathBuf>,
    /// ACME storage: account and certificates [default: STATE_DIR/acme].
    #[arg(long, env = "ACME_STORAGE")]
    acme_storage: Option<PathBuf>,
    /// Wait after a failed ACME order; it doubles with each further failure.
    #[arg(long, env = "ACME_RETRY_BASE", default_value = "5m", value_parser = humantime::parse_duration)]
    acme_retry_base: std::time::Duration,
    /// Maximum wait between ACME orders after failures.
    #[arg(long, env = "ACME_RETRY_MAX", default_value = "6h", value_parser = humantime::parse_duration)]
    acme_retry_max: std::time::Duration,
    /// Log format on stderr.
    #[arg(long, env = "EDGE_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "agent failed");
            eprintln!("agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: Args) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
        .map_err(|e| {
            format!(
                "cannot create the state directory {}: {e}",
                args.state_dir.display()
            )
        })?;
    if let Some(host) = &args.docker_host {
        // bollard reads DOCKER_HOST from the environment; no other thread runs yet.
        std::env::set_var("DOCKER_HOST", host);
    }
    let edge_socket = args
        .edge_socket
        .clone()
        .unwrap_or_else(|| args.state_dir.join("edge.sock"));
    let control_path = args
        .control_socket
        .clone()
        .unwrap_or_else(|| args.state_dir.join(ctl::CONTROL_SOCKET_FILE));
    let listener = ctl::bind(&control_path).map_err(|e| {
        format!(
            "cannot listen on the control socket {}: {e}",
            control_path.display()
        )
    })?;

    let (changed_tx, changed_rx) = watch::channel(0u64);
    let docker_view = Arc::new(Mutex::new(DockerView::default()));
    if args.docker {
        tokio::spawn(docker::watch_docker(
            docker_view.clone(),
            changed_tx.clone(),
        ));
    } else {
        info!("Docker is disabled: only the routes file is served");
    }
    let (calls_tx, calls_rx) = mpsc::channel(16);
    tokio::spawn(ctl::serve(listener, calls_tx));

    let filter = FilterSettings {
        pin_dir: args.bpf_pin_dir.clone(),
        limits: Limits {
            syn_rate: args.syn_rate,
            syn_burst: args.syn_burst,
            quic_rate: args.quic_rate,
            quic_burst: args.quic_burst,
            v4_prefix_len: args.rate_limit_prefix_v4,
            v6_prefix_len: args.rate_limit_prefix_v6,
            ..auto_block_limits(&args)
        },
        blocks_file: Some(args.state_dir.join("agent-blocks.json")),
    };
    tokio::spawn(filter::maintain(filter.clone()));
    let settings = LoopSettings {
        options: AgentOptions {
            exposed_by_default: args.exposed_by_default,
            default_network: args.docker_network.clone(),
            lenient: args.lenient_labels,
            ..AgentOptions::default()
        },
        thresholds: Thresholds {
            rise: args.probe_rise.max(1),
            fall: args.probe_fall.max(1),
        },
        routes_file: args.routes_file.clone(),
        seed_file: Some(args.state_dir.join("edge-snapshot.json")),
        docker_enabled: args.docker,
        drains_file: Some(args.state_dir.join("agent-drains.json")),
        filter,
    };
    info!(
        edge_socket = %edge_socket.display(),
        control_socket = %control_path.display(),
        "agent started"
    );
    let acme = acme::start(acme_resolvers(&args)?, changed_tx.clone());
    let reconciler = Reconciler::new(
        settings,
        docker_view,
        EdgeLink::new(edge_socket),
        changed_tx,
        acme,
    );
    tokio::select! {
        () = reconciler.run(changed_rx, calls_rx) => {}
        _ = shutdown_signal() => info!("agent stopping; the edge keeps serving the last snapshot"),
    }
    let _ = std::fs::remove_file(&control_path);
    Ok(())
}

/// Returns the abuse fields of the limits: all 0 while automatic blocking is off.
fn auto_block_limits(args: &Args) -> Limits {
    if args.auto_block_after == 0 {
        return Limits::default();
    }
    Limits {
        abuse_rate: args.auto_block_rate.max(1),
        abuse_burst: args.auto_block_after,
        abuse_block_secs: u32::try_from(args.auto_block_ttl.as_secs())
            .unwrap_or(u32::MAX)
            .max(1),
        ..Limits::default()
    }
}

/// Collects the ACME resolvers of the `ACME_*` settings and of the resolvers file.
fn acme_resolvers(args: &Args) -> Result<Vec<ResolverConfig>, String> {
    let mut named = Vec::new();
    if let Some(directory_url) = &args.acme_directory_url {
        named.push(acme::config::NamedResolver {
            name: args.acme_resolver.clone(),
            directory_url: directory_url.clone(),
            email: args.acme_email.clone().filter(|e| !e.is_empty()),
            challenge: args.acme_challenge,
            key_type: args.acme_key_type,
            ca_bundle: args.acme_ca_bundle.clone(),
        });
    }
    if let Some(path) = &args.acme_resolvers_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the ACME resolvers file {}: {e}",
                path.display()
            )
        })?;
        let from_file = acme::config::parse(&text).map_err(|errors| {
            format!(
                "invalid ACME resolvers file {}: {}",
                path.display(),
                errors.join("; ")
            )
        })?;
        for resolver in from_file {
            if named.iter().any(|r| r.name == resolver.name) {
                return Err(format!(
                    "ACME resolver {:?} is defined twice: by the ACME_* settings and in {}",
                    resolver.name,
                    path.display()
                ));
            }
            named.push(resolver);
        }
    }
    let storage = args
        .acme_storage
        .clone()
        .unwrap_or_else(|| args.state_dir.join("acme"));
    let resolvers = named
        .into_iter()
        .map(|resolver| {
            info!(
                resolver = %resolver.name,
                directory = %resolver.directory_url,
                challenge = resolver.challenge.name(),
                "ACME certificate resolver configured"
            );
            ResolverConfig {
                name: resolver.name,
                directory_url: resolver.directory_url,
                email: resolver.email,
                challenge: resolver.challenge,
                key_type: resolver.key_type,
                ca_bundle: resolver.ca_bundle,
                storage: storage.clone(),
                retry_base: args.acme_retry_base,
                retry_max: args.acme_retry_max.max(args.acme_retry_base),
            }
        })
        .collect();
    Ok(resolvers)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    let Ok(mut int) = signal(SignalKind::interrupt()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
