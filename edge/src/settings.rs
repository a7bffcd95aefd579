//! Command-line flags and their environment equivalents, and the validated settings built
//! from them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::xdp::{KernelOptions, SteeringArg, XdpModeArg};

/// Thread-per-core HTTPS reverse proxy with Traefik-compatible routing.
#[derive(Debug, Parser)]
#[command(name = "edge", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a routes file (Traefik file-provider format) and exit non-zero on errors.
    CheckConfig {
        /// Path of the YAML or TOML file.
        file: PathBuf,
    },
    /// Run the edge with built-in example routes to a built-in demo backend, on unprivileged
    /// ports (HTTP 8080, HTTPS 8443, admin 9900 unless overridden).
    Demo,
}

/// Output format of logs and access logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// io driver that each worker requests from monoio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoDriver {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring only; fail when unavailable.
    IoUring,
    /// epoll only.
    Epoll,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Plain-HTTP listener address (Traefik's `web` entry point). `edge demo` uses
    /// 127.0.0.1:8080 unless this is set.
    #[arg(
        long,
        global = true,
        env = "EDGE_HTTP_ADDR",
        default_value = "0.0.0.0:80"
    )]
    pub http_addr: SocketAddr,
    /// HTTPS listener address (Traefik's `websecure` entry point). `edge demo` uses
    /// 127.0.0.1:8443 unless this is set.
    #[arg(
        long,
        global = true,
        env = "EDGE_HTTPS_ADDR",
        default_value = "0.0.0.0:443"
    )]
    pub https_addr: SocketAddr,
    /// Serve HTTP/3 (QUIC) on the HTTPS address's UDP port and advertise it with Alt-Svc.
    #[arg(long, global = true, env = "EDGE_HTTP3", default_value_t = true, action = clap::ArgAction::Set)]
    pub http3: bool,
    /// Admin listener address serving the edge's own /health and /metrics.
    #[arg(
        long,
        global = true,
        env = "EDGE_ADMIN_ADDR",
        default_value = "127.0.0.1:9900"
    )]
    pub admin_addr: SocketAddr,
    /// Routes file in Traefik's file-provider format (YAML or TOML), reloaded on change.
    #[arg(long, global = true, env = "EDGE_ROUTES_FILE")]
    pub routes_file: Option<PathBuf>,
    /// Directory (mode 0700) for the last good snapshot from the agent and its socket.
    #[arg(long, global = true, env = "EDGE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Unix socket on which the agent pushes snapshots [default: STATE_DIR/edge.sock].
    #[arg(long, global = true, env = "EDGE_SNAPSHOT_SOCKET")]
    pub snapshot_socket: Option<PathBuf>,
    /// Number of worker threads, each with its own runtime and listeners [default: one per core].
    #[arg(long, global = true, env = "EDGE_WORKERS")]
    pub workers: Option<usize>,
    /// Pin each worker to one core.
    #[arg(long, global = true, env = "EDGE_PIN_WORKERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub pin_workers: bool,
    /// io driver of the workers.
    #[arg(long, global = true, env = "EDGE_IO_DRIVER", value_enum, default_value_t = IoDriver::Auto)]
    pub io_driver: IoDriver,
    /// Format of the edge's logs (stderr) and access logs (stdout).
    #[arg(long, global = true, env = "EDGE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Write one access log line per request to stdout.
    #[arg(long, global = true, env = "EDGE_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
    /// Peers whose X-Forwarded-* headers are kept and extended (comma-separated CIDRs).
    #[arg(
        long,
        global = true,
        env = "EDGE_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<IpNet>,

    /// Time allowed for a client to send a complete request head, from its first byte.
    #[arg(long, global = true, env = "EDGE_HEADER_READ_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Maximum pause while a request or response body is in transit.
    #[arg(long, global = true, env = "EDGE_BODY_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub body_idle_timeout: Duration,
    /// Time an idle client connection stays open between requests.
    #[arg(long, global = true, env = "EDGE_KEEP_ALIVE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub keep_alive_timeout: Duration,
    /// Time allowed for the TLS handshake.
    #[arg(long, global = true, env = "EDGE_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// Time allowed to open a connection to a backend.
    #[arg(long, global = true, env = "EDGE_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub upstream_connect_timeout: Duration,
    /// Time allowed for a backend to start its response after the request was sent.
    #[arg(long, global = true, env = "EDGE_UPSTREAM_RESPONSE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub upstream_response_timeout: Duration,
    /// How long an idle pooled backend connection is kept. Keep it below the backends' own
    /// keep-alive timeout (Node.js defaults to 5s); a shorter `Keep-Alive: timeout` from the
    /// backend wins.
    #[arg(long, global = true, env = "EDGE_UPSTREAM_IDLE_TIMEOUT", default_value = "4s", value_parser = humantime::parse_duration)]
    pub upstream_idle_timeout: Duration,
    /// Maximum idle pooled connections per backend, per worker and per QUIC thread.
    #[arg(
        long,
        global = true,
        env = "EDGE_UPSTREAM_MAX_IDLE",
        default_value_t = 64
    )]
    pub upstream_max_idle: usize,
    /// Time in-flight requests get to finish after SIGTERM or SIGINT.
    #[arg(long, global = true, env = "EDGE_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Maximum size of a request or response head in bytes (request line and headers).
    #[arg(long, global = true, env = "EDGE_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Maximum request body size in bytes for routes without their own limit; 0 means none.
    #[arg(
        long,
        global = true,
        env = "EDGE_MAX_REQUEST_BODY_BYTES",
        default_value_t = 0
    )]
    pub max_request_body_bytes: u64,
    /// Network interface to attach the XDP abuse filter to (for example eth0); none: no filter.
    #[arg(long, global = true, env = "EDGE_XDP_IFACE")]
    pub xdp_iface: Option<String>,
    /// XDP attach mode: native (driver) with a fallback to generic SKB mode, or one of them.
    #[arg(long, global = true, env = "EDGE_XDP_MODE", value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// Spreading of new connections over the workers' SO_REUSEPORT sockets: `cpu` picks the
    /// worker pinned to the CPU that received the connection, `hash` spreads by the flow hash,
    /// `off` leaves it to the kernel without a program.
    #[arg(long, global = true, env = "EDGE_STEERING", value_enum, default_value_t = SteeringArg::Cpu)]
    pub steering: SteeringArg,
    /// eBPF object to load instead of the one embedded at build time.
    #[arg(long, global = true, env = "EDGE_BPF_OBJECT")]
    pub bpf_object: Option<PathBuf>,
    /// Directory on bpffs where the block lists, limits and counters are pinned; bpffs is
    /// mounted on /sys/fs/bpf when missing.
    #[arg(long, global = true, env = "EDGE_BPF_PIN_DIR", default_value = edge_ebpf::PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// Maximum concurrent streams (requests) per HTTP/2 connection.
    #[arg(
        long,
        global = true,
        env = "EDGE_H2_MAX_CONCURRENT_STREAMS",
        default_value_t = 100
    )]
    pub h2_max_concurrent_streams: u32,
    /// QUIC connection attempts per second from one address after which further ones must
    /// pass address validation (a Retry round trip); 0 validates every attempt.
    #[arg(
        long,
        global = true,
        env = "EDGE_HTTP3_RETRY_AFTER",
        default_value_t = 16
    )]
    pub http3_retry_after: u32,
    /// Interval between checks of the routes file for changes.
    #[arg(long, global = true, env = "EDGE_RELOAD_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
}

/// Settings every worker reads; immutable after start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub workers: usize,
    pub pin_workers: bool,
    pub io_driver: IoDriver,
    pub log_format: LogFormat,
    pub access_log: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub header_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_response_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub upstream_max_idle: usize,
    pub shutdown_grace: Duration,
    pub max_header_bytes: usize,
    pub max_request_body_bytes: Option<u64>,
    pub h2_max_concurrent_streams: u32,
    /// QUIC connection attempts per second per source before Retry is required.
    pub http3_retry_after: u32,
    /// Port in the `Location` of HTTP-to-HTTPS redirects; 443 is left out of the URL.
    pub https_port: u16,
    /// The `Alt-Svc` value advertising HTTP/3 on HTTPS responses; `None` when HTTP/3 is off.
    pub alt_svc: Option<http::HeaderValue>,
}

impl Settings {
    /// Builds the settings from the flags; `https_port` is the bound HTTPS port.
    pub fn from_args(args: &RunArgs, https_port: u16) -> Self {
        let workers = args.workers.filter(|&n| n > 0).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        Self {
            workers,
            pin_workers: args.pin_workers,
            io_driver: args.io_driver,
            log_format: args.log_format,
            access_log: args.access_log,
            trusted_proxies: args.trusted_proxies.clone(),
            header_read_timeout: args.header_read_timeout,
            body_idle_timeout: args.body_idle_timeout,
            keep_alive_timeout: args.keep_alive_timeout,
            tls_handshake_timeout: args.tls_handshake_timeout,
            upstream_connect_timeout: args.upstream_connect_timeout,
            upstream_response_timeout: args.upstream_response_timeout,
            upstream_idle_timeout: args.upstream_idle_timeout,
            upstream_max_idle: args.upstream_max_idle,
            shutdown_grace: args.shutdown_grace,
            max_header_bytes: args.max_header_bytes.max(1024),
            max_request_body_bytes: (args.max_request_body_bytes > 0)
                .then_some(args.max_request_body_bytes),
            h2_max_concurrent_streams: args.h2_max_concurrent_streams.max(1),
            http3_retry_after: args.http3_retry_after,
            https_port,
            alt_svc: args
                .http3
                .then(|| format!("h3=\":{https_port}\"; ma=86400"))
                .and_then(|v| http::HeaderValue::from_str(&v).ok()),
        }
    }

    pub fn is_trusted_proxy(&self, ip: std::net::IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// Maps an IPv4-mapped IPv6 address to its IPv4 form.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

impl RunArgs {
    /// Returns what the kernel programs should do.
    pub fn kernel_options(&self) -> KernelOptions {
        KernelOptions {
            object: self.bpf_object.clone(),
            pin_dir: self.bpf_pin_dir.clone(),
            xdp_iface: self.xdp_iface.clone(),
            xdp_mode: self.xdp_mode,
            steering: self.steering,
            pin_workers: self.pin_workers,
        }
    }
}
