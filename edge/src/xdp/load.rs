//! Loading the object, preparing bpffs and the pins, and attaching each program.

use std::path::Path;

use anyhow::{bail, Context as _};
use aya::{
    maps::{Array, HashMap, MapInfo, MapType, PerCpuArray, ReusePortSockArray},
    programs::{ProgramError, SkReuseport, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use edge_ebpf::{Limits, PortKey, SteerConfig};
use tracing::{info, warn};

use super::{KernelOptions, ListenerGroups, SteeringArg, XdpModeArg};

/// The object compiled by build.rs, when clang was available.
#[cfg(edge_bpf_object)]
const EMBEDDED_OBJECT: Option<&[u8]> =
    Some(include_bytes!(concat!(env!("OUT_DIR"), "/edge.bpf.o")));
#[cfg(not(edge_bpf_object))]
const EMBEDDED_OBJECT: Option<&[u8]> = None;

/// `f_type` of a bpf filesystem (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Rate limits written to a newly created limits map; the agent replaces them with its own.
pub const DEFAULT_LIMITS: Limits = Limits {
    syn_rate: 200,
    syn_burst: 400,
    quic_rate: 200,
    quic_burst: 400,
    v4_prefix_len: 32,
    v6_prefix_len: 64,
    abuse_rate: 0,
    abuse_burst: 0,
    abuse_block_secs: 0,
};

/// Definition of a pinned map, to tell whether an existing pin can be reused.
struct PinnedDef {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

const PINNED: [PinnedDef; 4] = [
    PinnedDef {
        name: edge_ebpf::MAP_BLOCK_V4,
        map_type: MapType::LpmTrie,
        key_size: size_of::<edge_ebpf::LpmKeyV4>() as u32,
        value_size: size_of::<edge_ebpf::BlockEntry>() as u32,
        max_entries: edge_ebpf::BLOCK_MAX,
    },
    PinnedDef {
        name: edge_ebpf::MAP_BLOCK_V6,
        map_type: MapType::LpmTrie,
        key_size: size_of::<edge_ebpf::LpmKeyV6>() as u32,
        value_size: size_of::<edge_ebpf::BlockEntry>() as u32,
        max_entries: edge_ebpf::BLOCK_MAX,
    },
    PinnedDef {
        name: edge_ebpf::MAP_LIMITS,
        map_type: MapType::Array,
        key_size: 4,
        value_size: size_of::<Limits>() as u32,
        max_entries: 1,
    },
    PinnedDef {
        name: edge_ebpf::MAP_STATS,
        map_type: MapType::PerCpuArray,
        key_size: 4,
        value_size: 8,
        max_entries: edge_ebpf::STATS_MAX,
    },
];

/// The loaded object before anything is attached.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub stats: Option<PerCpuArray<aya::maps::MapData, u64>>,
}

/// Loads the object with its maps, reusing compatible pins.
///
/// # Errors
/// Fails when there is no object, bpffs cannot be prepared, or the kernel rejects the object.
pub fn load(options: &KernelOptions) -> anyhow::Result<Loaded> {
    let owned;
    let object: &[u8] = match &options.object {
        Some(path) => {
            owned = std::fs::read(path)
                .with_context(|| format!("cannot read the eBPF object {}", path.display()))?;
            &owned
        }
        None => EMBEDDED_OBJECT.context(
            "this edge was built without the eBPF object (clang and libbpf-dev were missing at build time); rebuild with them installed or pass --bpf-object",
        )?,
    };
    prepare_pin_dir(&options.pin_dir)?;
    remove_incompatible_pins(&options.pin_dir);
    let limits_existed = options.pin_dir.join(edge_ebpf::MAP_LIMITS).exists();

    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&options.pin_dir)
        .load(object)
        .context("the kernel rejected the eBPF object (loading needs root)")?;

    if !limits_existed {
        let map = ebpf
            .map_mut(edge_ebpf::MAP_LIMITS)
            .context("the object has no limits map")?;
        let mut limits: Array<_, Limits> = Array::try_from(map)?;
        limits.set(0, DEFAULT_LIMITS, 0)?;
        info!(
            ?DEFAULT_LIMITS,
            "wrote the default rate limits to a new limits map"
        );
    }
    let stats = ebpf
        .take_map(edge_ebpf::MAP_STATS)
        .map(PerCpuArray::try_from)
        .transpose()?;
    Ok(Loaded { ebpf, stats })
}

/// The usual mount point of bpffs, which the edge mounts when nothing is mounted there.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Makes sure `pin_dir` is a directory on bpffs, creating it and its missing parents, and
/// mounting bpffs on /sys/fs/bpf when `pin_dir` is below it and nothing is mounted there yet.
fn prepare_pin_dir(pin_dir: &Path) -> anyhow::Result<()> {
    let existing = pin_dir
        .ancestors()
        .find(|dir| dir.exists())
        .with_context(|| format!("invalid pin directory {}", pin_dir.display()))?;
    if !is_bpffs(existing) {
        let root = Path::new(BPFFS_ROOT);
        if !pin_dir.starts_with(root) || existing != root {
            bail!(
                "{} is not on a bpf filesystem; choose a directory under {BPFFS_ROOT}, such as \
                 {BPFFS_ROOT}/edge",
                pin_dir.display(),
            );
        }
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("cannot mount bpffs on {BPFFS_ROOT}"))?;
        if in_private_mount_namespace() {
            // `ip netns exec` and containers give the process its own /sys. A bpffs mounted
            // there is not the host's, so the agent and edgectl outside cannot see the pins.
            warn!(
                path = BPFFS_ROOT,
                "mounted bpffs in a mount namespace of its own: the pinned maps are visible only \
                 inside it and vanish when the edge exits, so run the agent in the same mount \
                 namespace (`nsenter --net` changes only the network namespace)"
            );
        } else {
            info!(path = BPFFS_ROOT, "mounted bpffs");
        }
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(pin_dir)
            .with_context(|| format!("cannot create {}", pin_dir.display()))?;
    }
    Ok(())
}

/// Tells whether this process runs in another mount namespace than process 1.
fn in_private_mount_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(own), Ok(init)) => own != init,
        _ => false,
    }
}

// The width of `f_type` differs between architectures; on x86_64 the cast is a no-op.
#[allow(clippy::unnecessary_cast)]
fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Removes each pin whose map no longer matches this edge's definition (an upgrade changed
/// it), so that the loader creates a new one. Compatible pins are kept and reused: they hold
/// the block lists and limits, which must survive a restart or a crash of the edge.
fn remove_incompatible_pins(pin_dir: &Path) {
    for def in &PINNED {
        let path = pin_dir.join(def.name);
        if !path.exists() {
            continue;
        }
        let matches = MapInfo::from_pin(&path).is_ok_and(|info| {
            info.map_type().is_ok_and(|t| t == def.map_type)
                && info.key_size() == def.key_size
                && info.value_size() == def.value_size
                && info.max_entries() == def.max_entries
        });
        if matches {
            info!(path = %path.display(), "reusing the pinned map");
        } else {
            warn!(path = %path.display(), "replacing a pinned map whose definition differs from this edge's; its entries are lost");
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), error = %e, "cannot remove the pinned map");
            }
        }
    }
}

/// Writes the listeners' ports to the ports map: the filter checks and rate-limits only these.
///
/// # Errors
/// Fails when the map is missing or an update fails.
pub fn write_ports(ebpf: &mut Ebpf, listeners: &ListenerGroups<'_>) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(edge_ebpf::MAP_PORTS)
        .context("the object has no ports map")?;
    let mut ports: HashMap<_, PortKey, u32> = HashMap::try_from(map)?;
    let mut keys = Vec::new();
    if let Some(http) = listeners.http.first() {
        keys.push(PortKey::new(
            http.local_addr()?.port(),
            edge_ebpf::PROTO_TCP,
        ));
    }
    if let Some(https) = listeners.https.first() {
        let port = https.local_addr()?.port();
        keys.push(PortKey::new(port, edge_ebpf::PROTO_TCP));
        // HTTP/3 will listen on the same port over UDP; QUIC Initial floods are limited already.
        keys.push(PortKey::new(port, edge_ebpf::PROTO_UDP));
    }
    for key in keys {
        ports.insert(key, 1, 0)?;
    }
    Ok(())
}

/// Loads the XDP program and attaches it to `iface`; returns the mode it runs in.
///
/// # Errors
/// Fails when the interface does not exist or no requested mode attaches.
pub fn attach_xdp(ebpf: &mut Ebpf, iface: &str, mode: XdpModeArg) -> anyhow::Result<&'static str> {
    let program: &mut Xdp = ebpf
        .program_mut(edge_ebpf::PROGRAM_XDP)
        .context("the object has no XDP program")?
        .try_into()?;
    program
        .load()
        .context("the kernel rejected the XDP program")?;
    // NOTE: aya attaches through a BPF link, which detaches when the edge dies. On kernels
    // before 5.9 it falls back to netlink, and a crashed edge's program then stays attached.
    match mode {
        XdpModeArg::Native => {
            program
                .attach(iface, XdpMode::Driver)
                .with_context(|| format!("cannot attach XDP to {iface} in native mode"))?;
            Ok("native")
        }
        XdpModeArg::Skb => {
            program
                .attach(iface, XdpMode::Skb)
                .with_context(|| format!("cannot attach XDP to {iface} in SKB mode"))?;
            Ok("skb")
        }
        XdpModeArg::Auto => match program.attach(iface, XdpMode::Driver) {
            Ok(_) => Ok("native"),
            Err(e @ ProgramError::UnknownInterface { .. }) => {
                Err(e).with_context(|| format!("cannot attach XDP to {iface}"))
            }
            Err(ProgramError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::EEXIST | libc::EBUSY)) =>
            {
                bail!(
                    "cannot attach XDP to {iface}: another XDP program is attached to it \
                     ({}); see `ip link show {iface}`",
                    e.io_error
                )
            }
            Err(native) => {
                // aya's message names only the failed call, so the OS error goes into the log.
                let cause = std::error::Error::source(&native)
                    .map_or_else(String::new, |source| format!(": {source}"));
                warn!(iface, error = %format!("{native}{cause}"), "native XDP unavailable, attaching in SKB (generic) mode");
                program.attach(iface, XdpMode::Skb).with_context(|| {
                    format!("cannot attach XDP to {iface} in native mode ({native}) or SKB mode")
                })?;
                Ok("skb")
            }
        },
    }
}

/// Fills the socket arrays with the workers' listeners and attaches a selector to each
/// SO_REUSEPORT group; returns the mode.
///
/// # Errors
/// Fails when a map update, the program load or the attach fails.
pub fn attach_steering(
    ebpf: &mut Ebpf,
    listeners: &ListenerGroups<'_>,
    steering: SteeringArg,
    pin_workers: bool,
) -> anyhow::Result<&'static str> {
    let workers = listeners.http.len().min(listeners.https.len());
    if workers as u32 > edge_ebpf::WORKERS_MAX {
        bail!(
            "{workers} workers are more than steering supports ({})",
            edge_ebpf::WORKERS_MAX
        );
    }
    let (mode, label) = match steering {
        SteeringArg::Cpu if pin_workers => (edge_ebpf::STEER_CPU, "cpu"),
        SteeringArg::Cpu => {
            warn!("CPU steering needs pinned workers (--pin-workers true); spreading by hash");
            (edge_ebpf::STEER_HASH, "hash")
        }
        SteeringArg::Hash | SteeringArg::Off => (edge_ebpf::STEER_HASH, "hash"),
    };
    if mode == edge_ebpf::STEER_CPU {
        let map = ebpf
            .map_mut(edge_ebpf::MAP_CPU_WORKER)
            .context("the object has no CPU map")?;
        let mut cpu_worker: Array<_, u32> = Array::try_from(map)?;
        let allowed = crate::worker::allowed_cpus();
        // The same CPU choice as worker::spawn; the first worker of a CPU takes its traffic.
        for id in (0..workers).rev() {
            if let Some(&cpu) = allowed.get(id % allowed.len().max(1)) {
                if (cpu as u32) < edge_ebpf::CPUS_MAX {
                    cpu_worker.set(cpu as u32, id as u32 + 1, 0)?;
                }
            }
        }
    }
    for (name, group) in [
        (edge_ebpf::MAP_SOCKS_HTTP, listeners.http),
        (edge_ebpf::MAP_SOCKS_HTTPS, listeners.https),
    ] {
        let map = ebpf
            .map_mut(name)
            .with_context(|| format!("the object has no map {name}"))?;
        let mut sockets: ReusePortSockArray<_> = ReusePortSockArray::try_from(map)?;
        for (id, listener) in group.iter().enumerate().take(workers) {
            sockets
                .set(id as u32, listener, 0)
                .with_context(|| format!("cannot add worker {id}'s socket to {name}"))?;
        }
    }
    {
        let map = ebpf
            .map_mut(edge_ebpf::MAP_STEER)
            .context("the object has no steering map")?;
        let mut config: Array<_, SteerConfig> = Array::try_from(map)?;
        config.set(
            0,
            SteerConfig {
                mode,
                workers: workers as u32,
            },
            0,
        )?;
    }
    for (name, group) in [
        (edge_ebpf::PROGRAM_STEER_HTTP, listeners.http),
        (edge_ebpf::PROGRAM_STEER_HTTPS, listeners.https),
    ] {
        let program: &mut SkReuseport = ebpf
            .program_mut(name)
            .with_context(|| format!("the object has no program {name}"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the kernel rejected {name}"))?;
        if let Some(first) = group.first() {
            program
                .attach(first)
                .with_context(|| format!("cannot attach {name} to its listeners"))?;
        }
    }
    Ok(label)
}

/// Fills the QUIC socket array with the workers' UDP sockets and attaches the QUIC selector
/// to their SO_REUSEPORT group. Runs after [`attach_steering`], which writes the number of
/// workers that the selector's hash fallback uses.
///
/// # Errors
/// Fails when there are fewer UDP sockets than workers, or a map update, the program load or
/// the attach fails.
pub fn attach_quic_steering(ebpf: &mut Ebpf, listeners: &ListenerGroups<'_>) -> anyhow::Result<()> {
    let workers = listeners.http.len().min(listeners.https.len());
    if listeners.quic.len() < workers {
        bail!(
            "only {} HTTP/3 sockets for {workers} workers, which need one each",
            listeners.quic.len()
        );
    }
    let map = ebpf
        .map_mut(edge_ebpf::MAP_SOCKS_QUIC)
        .with_context(|| format!("the object has no map {}", edge_ebpf::MAP_SOCKS_QUIC))?;
    let mut sockets: ReusePortSockArray<_> = ReusePortSockArray::try_from(map)?;
    for (id, socket) in listeners.quic.iter().enumerate().take(workers) {
        sockets.set(id as u32, socket, 0).with_context(|| {
            format!(
                "cannot add worker {id}'s UDP socket to {}",
                edge_ebpf::MAP_SOCKS_QUIC
            )
        })?;
    }
    let name = edge_ebpf::PROGRAM_STEER_QUIC;
    let program: &mut SkReuseport = ebpf
        .program_mut(name)
        .with_context(|| format!("the object has no program {name}"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("the kernel rejected {name}"))?;
    if let Some(first) = listeners.quic.first() {
        program
            .attach(first)
            .with_context(|| format!("cannot attach {name} to the HTTP/3 sockets"))?;
    }
    Ok(())
}
