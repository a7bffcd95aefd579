//! The edge's kernel programs: loading, attaching, the state they run in, and their counters.
//!
//! At start the edge loads the object built from `edge-ebpf/bpf/edge.bpf.c` (embedded at
//! build time, or `--bpf-object`), pins the maps that outlive it under `--bpf-pin-dir`,
//! attaches the XDP filter to `--xdp-iface` and the SO_REUSEPORT selectors to its listeners
//! and its HTTP/3 UDP sockets.
//! Each part that cannot start (no privilege, no interface, no object) is logged and shown in
//! `/metrics`, and the edge serves without it. The programs detach when the edge exits,
//! because the XDP link and the listeners close with the process.

mod load;

use std::{
    net::{TcpListener, UdpSocket},
    path::PathBuf,
};

use aya::maps::{MapData, PerCpuArray};
use clap::ValueEnum;
use tracing::{info, warn};

/// XDP attach mode requested with `--xdp-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    /// Native (driver) mode, else generic SKB mode.
    Auto,
    /// Native mode only.
    Native,
    /// Generic SKB mode only.
    Skb,
}

/// SO_REUSEPORT steering requested with `--steering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SteeringArg {
    /// The kernel's own choice (a hash over the sockets).
    Off,
    /// The program spreads new connections by the flow hash.
    Hash,
    /// The worker pinned to the CPU that received the connection, else by the flow hash.
    Cpu,
}

/// Requested configuration of the kernel programs.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// Object file to load instead of the embedded one.
    pub object: Option<PathBuf>,
    /// bpffs directory for the pinned maps.
    pub pin_dir: PathBuf,
    pub xdp_iface: Option<String>,
    pub xdp_mode: XdpModeArg,
    pub steering: SteeringArg,
    /// Whether workers are pinned to CPUs; CPU steering needs it.
    pub pin_workers: bool,
}

/// The listening sockets of each worker, indexed by worker id.
pub struct ListenerGroups<'a> {
    pub http: &'a [TcpListener],
    pub https: &'a [TcpListener],
    /// The HTTP/3 endpoints' UDP sockets; empty when HTTP/3 is off.
    pub quic: &'a [UdpSocket],
}

/// State of one kernel program, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProgramState {
    /// Not requested by the configuration.
    Off,
    /// Running, in the mode given by the text (XDP mode or steering mode).
    Running(String),
    /// Requested but not running, with the reason.
    Failed(String),
}

impl ProgramState {
    fn label(&self) -> (&'static str, &str) {
        match self {
            ProgramState::Off => ("off", ""),
            ProgramState::Running(mode) => ("running", mode),
            ProgramState::Failed(reason) => ("failed", reason),
        }
    }
}

/// The loaded programs and maps; dropping it detaches the XDP program.
pub struct Kernel {
    /// Keeps the programs, maps and the XDP link alive.
    _ebpf: Option<aya::Ebpf>,
    stats: Option<PerCpuArray<MapData, u64>>,
    pub xdp: ProgramState,
    pub steering: ProgramState,
    /// The QUIC selector, which routes each datagram by its destination connection ID.
    pub quic_steering: ProgramState,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("xdp", &self.xdp)
            .field("steering", &self.steering)
            .field("quic_steering", &self.quic_steering)
            .finish_non_exhaustive()
    }
}

impl Kernel {
    /// Returns a state with nothing loaded, for when no program is requested.
    pub fn off() -> Self {
        Self {
            _ebpf: None,
            stats: None,
            xdp: ProgramState::Off,
            steering: ProgramState::Off,
            quic_steering: ProgramState::Off,
        }
    }

    /// Returns whether every datagram of a QUIC connection reaches the worker that owns it
    /// even after the client's address changes, which connection migration needs.
    pub fn steers_quic_by_connection_id(&self) -> bool {
        matches!(self.quic_steering, ProgramState::Running(_))
    }

    /// Loads and attaches the programs that `options` requests. A part that cannot start is
    /// logged and recorded in its [`ProgramState`] instead of failing the edge.
    pub fn start(options: &KernelOptions, listeners: &ListenerGroups<'_>) -> Self {
        let wants_xdp = options.xdp_iface.is_some();
        let wants_steering = options.steering != SteeringArg::Off;
        if !wants_xdp && !wants_steering {
            info!("eBPF programs off: no --xdp-iface and --steering off; QUIC steering by connection ID is off");
            return Self::off();
        }
        let mut kernel = match load::load(options) {
            Ok(loaded) => loaded,
            Err(e) => {
                let reason = format!("{e:#}");
                warn!(error = %reason, "running without the XDP filter and SO_REUSEPORT steering");
                let failed = |wanted: bool| {
                    if wanted {
                        ProgramState::Failed(reason.clone())
                    } else {
                        ProgramState::Off
                    }
                };
                return Self {
                    _ebpf: None,
                    stats: None,
                    xdp: failed(wants_xdp),
                    steering: failed(wants_steering),
                    quic_steering: failed(wants_steering && !listeners.quic.is_empty()),
                };
            }
        };
        let mut this = Self {
            stats: kernel.stats.take(),
            xdp: ProgramState::Off,
            steering: ProgramState::Off,
            quic_steering: ProgramState::Off,
            _ebpf: None,
        };
        if let Err(e) = load::write_ports(&mut kernel.ebpf, listeners) {
            warn!(error = %format!("{e:#}"), "cannot write the edge's ports: the filter checks no port");
        }
        if let Some(iface) = &options.xdp_iface {
            this.xdp = match load::attach_xdp(&mut kernel.ebpf, iface, options.xdp_mode) {
                Ok(mode) => {
                    info!(iface, mode, "XDP filter attached");
                    ProgramState::Running(mode.to_owned())
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    warn!(iface, error = %reason, "running without the XDP filter");
                    ProgramState::Failed(reason)
                }
            };
        } else {
            info!("XDP filter off: no --xdp-iface given");
        }
        if wants_steering {
            this.steering = match load::attach_steering(
                &mut kernel.ebpf,
                listeners,
                options.steering,
                options.pin_workers,
            ) {
                Ok(mode) => {
                    info!(mode, "SO_REUSEPORT steering attached");
                    ProgramState::Running(mode.to_owned())
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    warn!(error = %reason, "running without SO_REUSEPORT steering");
                    ProgramState::Failed(reason)
                }
            };
            this.quic_steering =
                Self::start_quic_steering(&mut kernel.ebpf, listeners, &this.steering);
        } else {
            info!("QUIC steering by connection ID off: --steering off");
        }
        this._ebpf = Some(kernel.ebpf);
        this
    }

    /// Attaches the QUIC selector when HTTP/3 is on and the TCP steering, which writes the
    /// settings it shares, is running.
    fn start_quic_steering(
        ebpf: &mut aya::Ebpf,
        listeners: &ListenerGroups<'_>,
        steering: &ProgramState,
    ) -> ProgramState {
        if listeners.quic.is_empty() {
            info!("QUIC steering by connection ID off: HTTP/3 is off");
            return ProgramState::Off;
        }
        if let ProgramState::Failed(reason) = steering {
            let reason = format!("SO_REUSEPORT steering failed: {reason}");
            warn!(error = %reason, "running without QUIC steering by connection ID");
            return ProgramState::Failed(reason);
        }
        match load::attach_quic_steering(ebpf, listeners) {
            Ok(()) => {
                info!("QUIC steering by connection ID attached to the HTTP/3 sockets");
                ProgramState::Running("connection_id".to_owned())
            }
            Err(e) => {
                let reason = format!("{e:#}");
                warn!(error = %reason, "running without QUIC steering by connection ID");
                ProgramState::Failed(reason)
            }
        }
    }

    /// Appends the programs' state and counters in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;

        out.push_str("# HELP edge_ebpf_program_state State of a kernel program (1 for the current state); `detail` gives the mode or the reason it is not running.\n");
        out.push_str("# TYPE edge_ebpf_program_state gauge\n");
        for (program, state) in [
            ("xdp", &self.xdp),
            ("steering", &self.steering),
            ("quic_steering", &self.quic_steering),
        ] {
            let (name, detail) = state.label();
            let _ = writeln!(
                out,
                "edge_ebpf_program_state{{program=\"{program}\",state=\"{name}\",detail=\"{}\"}} 1",
                crate::metrics::escape_label(detail)
            );
        }
        let Some(stats) = &self.stats else {
            return;
        };
        let values = match edge_ebpf::user::read_stats(stats) {
            Ok(values) => values,
            Err(e) => {
                warn!(error = %e, "cannot read the eBPF counters");
                return;
            }
        };
        out.push_str("# HELP edge_xdp_packets_total Packets seen by the XDP filter, connections seen by the TCP SO_REUSEPORT selectors and datagrams seen by the QUIC selector, by decision.\n");
        out.push_str("# TYPE edge_xdp_packets_total counter\n");
        for (index, reason) in edge_ebpf::STAT_REASONS {
            let value = values.get(index as usize).copied().unwrap_or(0);
            let _ = writeln!(out, "edge_xdp_packets_total{{reason=\"{reason}\"}} {value}");
        }
    }
}
