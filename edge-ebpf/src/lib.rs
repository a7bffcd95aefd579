//! Map names, keys, values and limits of the edge's kernel programs, shared with userspace.
//!
//! The programs themselves are C, in `bpf/edge.bpf.c`, compiled by Debian's clang (`clang-19
//! -target bpf`) when the edge is built. Every type here mirrors one in `bpf/edge.h`; both
//! sides assert the sizes, and a test compares the constants with the header.
//!
//! # Why C and not Rust (aya-ebpf)
//!
//! Building aya-ebpf programs needs `-Z build-std=core` for the `bpfel-unknown-none` target,
//! which needs the `rust-src` component of a nightly toolchain. The machine image ships a
//! nightly toolchain without `rust-src`, and toolchain components cannot be downloaded on the
//! machines that build and test the edge, so that build cannot be made reliable there. clang
//! and libbpf's headers come from Debian's packages (`clang-19`, `libbpf-dev`), which `cargo
//! xtask test` installs.
//!
//! With the `user` feature, the types implement [`aya::Pod`] so userspace can read and write
//! the maps.
#![no_std]
#![deny(unsafe_code)]

#[cfg(feature = "user")]
extern crate std;

#[cfg(feature = "user")]
pub mod user;

use core::mem::size_of;

/// Directory on bpffs where the maps that outlive one edge process are pinned.
pub const PIN_DIR: &str = "/sys/fs/bpf/edge";

/// Name of the XDP program.
pub const PROGRAM_XDP: &str = "edge_xdp";
/// Name of the SO_REUSEPORT selector of the plain-HTTP listeners.
pub const PROGRAM_STEER_HTTP: &str = "edge_steer_http";
/// Name of the SO_REUSEPORT selector of the HTTPS listeners.
pub const PROGRAM_STEER_HTTPS: &str = "edge_steer_https";
/// Name of the SO_REUSEPORT selector of the HTTP/3 (QUIC) UDP sockets.
pub const PROGRAM_STEER_QUIC: &str = "edge_steer_quic";

/// IPv4 block list: LPM trie of [`LpmKeyV4`] to [`BlockEntry`]. Pinned.
pub const MAP_BLOCK_V4: &str = "edge_block_v4";
/// IPv6 block list: LPM trie of [`LpmKeyV6`] to [`BlockEntry`]. Pinned.
pub const MAP_BLOCK_V6: &str = "edge_block_v6";
/// Rate limits: array of one [`Limits`]. Pinned.
pub const MAP_LIMITS: &str = "edge_limits";
/// Decision counters: per-CPU array of `u64`, indexed by the `STAT_*` constants. Pinned.
pub const MAP_STATS: &str = "edge_stats";
/// Token buckets: LRU hash of [`BucketKey`] to [`Bucket`].
pub const MAP_BUCKETS: &str = "edge_buckets";
/// Ports the edge serves: hash of [`PortKey`] to `u32` (1).
pub const MAP_PORTS: &str = "edge_ports";
/// Steering settings: array of one [`SteerConfig`].
pub const MAP_STEER: &str = "edge_steer";
/// CPU number to worker id + 1 (0: no worker on that CPU): array of `u32`.
pub const MAP_CPU_WORKER: &str = "edge_cpu_worker";
/// Worker sockets of the plain-HTTP listeners, indexed by worker id.
pub const MAP_SOCKS_HTTP: &str = "edge_socks_http";
/// Worker sockets of the HTTPS listeners, indexed by worker id.
pub const MAP_SOCKS_HTTPS: &str = "edge_socks_https";
/// Worker UDP sockets of the HTTP/3 endpoints, indexed by worker id.
pub const MAP_SOCKS_QUIC: &str = "edge_socks_quic";

/// Maximum entries of each block list.
pub const BLOCK_MAX: u32 = 65536;
/// Maximum tracked sources in the token bucket map.
pub const BUCKETS_MAX: u32 = 65536;
/// Maximum entries of the ports map.
pub const PORTS_MAX: u32 = 64;
/// Maximum workers that steering can address.
pub const WORKERS_MAX: u32 = 256;
/// Maximum CPU number + 1 in the CPU-to-worker map.
pub const CPUS_MAX: u32 = 1024;
/// Entries of the counter map.
pub const STATS_MAX: u32 = 16;
/// Length of the QUIC connection IDs the edge issues. The first byte is the worker id, which
/// `edge_steer_quic` reads from the destination connection ID of every datagram.
pub const QUIC_CID_LEN: usize = 8;

/// [`BlockEntry::origin`] of an operator's block.
pub const BLOCK_MANUAL: u32 = 0;
/// [`BlockEntry::origin`] of an automatic block.
pub const BLOCK_AUTO: u32 = 1;

/// [`BucketKey::kind`] of the SYN bucket.
pub const BUCKET_SYN: u32 = 0;
/// [`BucketKey::kind`] of the QUIC Initial bucket.
pub const BUCKET_QUIC: u32 = 1;
/// [`BucketKey::kind`] of the abuse bucket (malformed packets before an automatic block).
pub const BUCKET_ABUSE: u32 = 2;

/// [`SteerConfig::mode`]: spread new connections by the flow hash.
pub const STEER_HASH: u32 = 0;
/// [`SteerConfig::mode`]: the worker of the receiving CPU, else by the flow hash.
pub const STEER_CPU: u32 = 1;

/// Counter: frames that are not IPv4 or IPv6 (ARP, ...), passed.
pub const STAT_PASS_NOT_IP: u32 = 0;
/// Counter: ICMP and ICMPv6, passed.
pub const STAT_PASS_ICMP: u32 = 1;
/// Counter: other protocols and ports, passed untouched.
pub const STAT_PASS_OTHER: u32 = 2;
/// Counter: headers too short to tell the destination, or later fragments, passed to the kernel.
pub const STAT_PASS_UNPARSED: u32 = 3;
/// Counter: packets to our ports that passed every check.
pub const STAT_PASS_ALLOWED: u32 = 4;
/// Counter: dropped because the source is blocked.
pub const STAT_DROP_BLOCKED: u32 = 5;
/// Counter: SYNs dropped by the source's token bucket.
pub const STAT_DROP_SYN_RATE: u32 = 6;
/// Counter: QUIC Initial packets dropped by the source's token bucket.
pub const STAT_DROP_QUIC_RATE: u32 = 7;
/// Counter: malformed packets to our ports, dropped.
pub const STAT_DROP_MALFORMED: u32 = 8;
/// Counter: connections steered to the receiving CPU's worker.
pub const STAT_STEER_CPU: u32 = 9;
/// Counter: connections steered by the flow hash.
pub const STAT_STEER_HASH: u32 = 10;
/// Counter: connections left to the kernel's own choice (no settings, or the worker is gone).
pub const STAT_STEER_DEFAULT: u32 = 11;
/// Counter: sources blocked automatically after malformed packets.
pub const STAT_AUTO_BLOCKED: u32 = 12;
/// Counter: QUIC datagrams steered to the worker named by their destination connection ID.
pub const STAT_STEER_QUIC_CID: u32 = 13;
/// Counter: QUIC datagrams without one of the edge's connection IDs (a client's first
/// Initial), steered by the flow hash.
pub const STAT_STEER_QUIC_HASH: u32 = 14;
/// Counter: QUIC datagrams left to the kernel's own choice (no settings, or no worker socket).
pub const STAT_STEER_QUIC_DEFAULT: u32 = 15;

/// Counter indexes with the `reason` label used in metrics, in index order.
pub const STAT_REASONS: [(u32, &str); 16] = [
    (STAT_PASS_NOT_IP, "pass_not_ip"),
    (STAT_PASS_ICMP, "pass_icmp"),
    (STAT_PASS_OTHER, "pass_other"),
    (STAT_PASS_UNPARSED, "pass_unparsed"),
    (STAT_PASS_ALLOWED, "pass_allowed"),
    (STAT_DROP_BLOCKED, "drop_blocked"),
    (STAT_DROP_SYN_RATE, "drop_syn_rate"),
    (STAT_DROP_QUIC_RATE, "drop_quic_rate"),
    (STAT_DROP_MALFORMED, "drop_malformed"),
    (STAT_STEER_CPU, "steer_cpu"),
    (STAT_STEER_HASH, "steer_hash"),
    (STAT_STEER_DEFAULT, "steer_default"),
    (STAT_AUTO_BLOCKED, "auto_blocked"),
    (STAT_STEER_QUIC_CID, "steer_quic_cid"),
    (STAT_STEER_QUIC_HASH, "steer_quic_hash"),
    (STAT_STEER_QUIC_DEFAULT, "steer_quic_default"),
];

/// Key of the IPv4 block list.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LpmKeyV4 {
    /// Prefix length in bits, 0 to 32 (host byte order).
    pub prefixlen: u32,
    /// Address, network byte order.
    pub addr: [u8; 4],
}

/// Key of the IPv6 block list.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LpmKeyV6 {
    /// Prefix length in bits, 0 to 128 (host byte order).
    pub prefixlen: u32,
    /// Address, network byte order.
    pub addr: [u8; 16],
}

/// Value of both block lists.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockEntry {
    /// CLOCK_MONOTONIC time in ns after which the entry no longer applies; 0 means never.
    pub expires_ns: u64,
    /// [`BLOCK_MANUAL`] or [`BLOCK_AUTO`].
    pub origin: u32,
    pub pad: u32,
}

/// Rate limits per source prefix; a rate of 0 disables that limit.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// New TCP connections (SYN without ACK) per second.
    pub syn_rate: u32,
    /// SYNs a source may send at once before the rate applies.
    pub syn_burst: u32,
    /// QUIC Initial packets per second.
    pub quic_rate: u32,
    /// QUIC Initial packets a source may send at once.
    pub quic_burst: u32,
    /// Length of the IPv4 prefix that counts as one source (32: each address; 0: all share
    /// one bucket).
    pub v4_prefix_len: u32,
    /// Length of the IPv6 prefix that counts as one source. 64 gives a host that owns a /64
    /// one bucket, not one per address.
    pub v6_prefix_len: u32,
    /// Malformed packets per second that one address may send to our ports before it is
    /// blocked automatically; 0 turns automatic blocking off.
    pub abuse_rate: u32,
    /// Malformed packets one address may send at once before `abuse_rate` applies.
    pub abuse_burst: u32,
    /// Duration of an automatic block in seconds (0: 60).
    pub abuse_block_secs: u32,
}

/// Key of the token buckets.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketKey {
    /// Source prefix with the host bits cleared, network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// [`BUCKET_SYN`], [`BUCKET_QUIC`] or [`BUCKET_ABUSE`].
    pub kind: u32,
}

/// A token bucket.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens left, in thousandths.
    pub tokens_milli: u64,
    /// CLOCK_MONOTONIC time in ns of the last refill.
    pub last_ns: u64,
}

/// Key of the ports map.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortKey {
    /// Port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` (6) or `IPPROTO_UDP` (17).
    pub proto: u8,
    pub pad: u8,
}

impl PortKey {
    /// Builds the key of `port` (host byte order) for `proto`.
    pub const fn new(port: u16, proto: u8) -> Self {
        Self {
            port: port.to_be(),
            proto,
            pad: 0,
        }
    }
}

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// Steering settings.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SteerConfig {
    /// [`STEER_HASH`] or [`STEER_CPU`].
    pub mode: u32,
    /// Number of worker sockets in each socket array (TCP and UDP alike).
    pub workers: u32,
}

const _: () = assert!(size_of::<LpmKeyV4>() == 8);
const _: () = assert!(size_of::<LpmKeyV6>() == 20);
const _: () = assert!(size_of::<BlockEntry>() == 16);
const _: () = assert!(size_of::<Limits>() == 36);
const _: () = assert!(size_of::<BucketKey>() == 20);
const _: () = assert!(size_of::<Bucket>() == 16);
const _: () = assert!(size_of::<PortKey>() == 4);
const _: () = assert!(size_of::<SteerConfig>() == 8);

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    use super::*;

    // SAFETY: each type is `repr(C)`, made of fixed-width integers and byte arrays with no
    // implicit padding (the sizes are asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for LpmKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LpmKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BlockEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Limits {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BucketKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SteerConfig {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{collections::HashMap, string::String, vec::Vec};

    use super::*;

    const HEADER: &str = include_str!("../bpf/edge.h");

    fn header_defines() -> HashMap<String, u64> {
        let mut defines = HashMap::new();
        for line in HEADER.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["#define", name, value] = words[..] {
                if let Ok(value) = value.parse() {
                    defines.insert(name.into(), value);
                }
            }
        }
        defines
    }

    #[test]
    fn constants_match_header() {
        let defines = header_defines();
        let expected: &[(&str, u64)] = &[
            ("EDGE_BLOCK_MAX", BLOCK_MAX.into()),
            ("EDGE_BUCKETS_MAX", BUCKETS_MAX.into()),
            ("EDGE_PORTS_MAX", PORTS_MAX.into()),
            ("EDGE_WORKERS_MAX", WORKERS_MAX.into()),
            ("EDGE_CPUS_MAX", CPUS_MAX.into()),
            ("EDGE_STATS_MAX", STATS_MAX.into()),
            ("EDGE_QUIC_CID_LEN", QUIC_CID_LEN as u64),
            ("EDGE_BLOCK_MANUAL", BLOCK_MANUAL.into()),
            ("EDGE_BLOCK_AUTO", BLOCK_AUTO.into()),
            ("EDGE_BUCKET_SYN", BUCKET_SYN.into()),
            ("EDGE_BUCKET_QUIC", BUCKET_QUIC.into()),
            ("EDGE_BUCKET_ABUSE", BUCKET_ABUSE.into()),
            ("EDGE_STEER_HASH", STEER_HASH.into()),
            ("EDGE_STEER_CPU", STEER_CPU.into()),
        ];
        for (name, value) in expected {
            assert_eq!(defines.get(*name), Some(value), "{name}");
        }
    }

    #[test]
    fn stat_reasons_match_header() {
        let defines = header_defines();
        for (index, reason) in STAT_REASONS {
            let name = std::format!("EDGE_STAT_{}", reason.to_uppercase());
            assert_eq!(defines.get(&name), Some(&u64::from(index)), "{name}");
        }
        assert!(STAT_REASONS.len() as u32 <= STATS_MAX);
    }

    #[test]
    fn port_key_is_network_order() {
        let key = PortKey::new(443, PROTO_TCP);
        assert_eq!(key.port.to_ne_bytes(), [1, 187]);
    }
}
