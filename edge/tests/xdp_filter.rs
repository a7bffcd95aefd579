//! The XDP filter on crafted frames, run by the kernel through BPF_PROG_TEST_RUN, and the
//! edge's handling of a pinned map that no longer matches its own.
//!
//! These tests need root and the eBPF object that build.rs compiles when clang and
//! libbpf-dev are installed. `cargo xtask test` installs both and sets `EDGE_E2E_BPF=1`, which
//! turns a missing prerequisite into a failure; without it the tests print that they were
//! skipped.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use aya::{
    maps::HashMap,
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use edge_ebpf::{user::PinnedMaps, Limits, PortKey};

#[cfg(edge_bpf_object)]
const OBJECT: Option<&[u8]> = Some(include_bytes!(concat!(env!("OUT_DIR"), "/edge.bpf.o")));
#[cfg(not(edge_bpf_object))]
const OBJECT: Option<&[u8]> = None;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const OUR_PORT: u16 = 443;
const OTHER_PORT: u16 = 22;

/// Returns whether the tests can run; fails when `EDGE_E2E_BPF=1` demands that they do.
fn bpf_ready() -> bool {
    let required = std::env::var("EDGE_E2E_BPF").as_deref() == Ok("1");
    let problem = if OBJECT.is_none() {
        Some("the eBPF object was not built (install clang-19 and libbpf-dev, then `cargo clean -p edge`)")
    } else if !nix_is_root() {
        Some("loading eBPF programs needs root")
    } else {
        None
    };
    match problem {
        None => true,
        Some(problem) if required => panic!("EDGE_E2E_BPF=1 but {problem}"),
        Some(problem) => {
            eprintln!("skipped: {problem}; `cargo xtask test` runs these tests as root");
            false
        }
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// The loaded object with its maps pinned in a directory of its own.
struct Filter {
    ebpf: Ebpf,
    pins: PinnedMaps,
    dir: PathBuf,
}

impl Filter {
    fn load(name: &str) -> Filter {
        if !std::path::Path::new("/sys/fs/bpf/maps.debug").exists()
            && !std::process::Command::new("mountpoint")
                .args(["-q", "/sys/fs/bpf"])
                .status()
                .is_ok_and(|s| s.success())
        {
            let status = std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status()
                .unwrap();
            assert!(status.success(), "mounting bpffs failed");
        }
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/edge-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(OBJECT.unwrap())
            .expect("loading the object");
        {
            let program: &mut Xdp = ebpf
                .program_mut(edge_ebpf::PROGRAM_XDP)
                .unwrap()
                .try_into()
                .unwrap();
            program
                .load()
                .expect("the verifier accepts the XDP program");
        }
        {
            let mut ports: HashMap<_, PortKey, u32> =
                HashMap::try_from(ebpf.map_mut(edge_ebpf::MAP_PORTS).unwrap()).unwrap();
            ports
                .insert(PortKey::new(OUR_PORT, edge_ebpf::PROTO_TCP), 1, 0)
                .unwrap();
            ports
                .insert(PortKey::new(OUR_PORT, edge_ebpf::PROTO_UDP), 1, 0)
                .unwrap();
        }
        let pins = PinnedMaps::new(&dir);
        pins.set_limits(Limits {
            syn_rate: 1000,
            syn_burst: 1000,
            quic_rate: 1000,
            quic_burst: 1000,
            v4_prefix_len: 32,
            v6_prefix_len: 64,
            ..Limits::default()
        })
        .unwrap();
        Filter { ebpf, pins, dir }
    }

    fn run(&self, frame: &[u8]) -> u32 {
        let program: &Xdp = self
            .ebpf
            .program(edge_ebpf::PROGRAM_XDP)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len().max(64) + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        result.return_value
    }

    fn stat(&self, reason: &str) -> u64 {
        edge_ebpf::user::stat(&self.pins.stats().unwrap(), reason)
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// TCP flag bits.
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn tcp_header(dport: u16, flags: u8) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp
}

fn udp_datagram(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    udp.extend_from_slice(payload);
    udp
}

/// A QUIC version 1 long-header Initial of `len` bytes with an 8-byte connection ID.
fn quic_initial(len: usize) -> Vec<u8> {
    let mut quic = vec![0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0];
    quic.resize(len, 0);
    quic
}

fn ipv4(src: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&[10, 99, 0, 1]);
    ip.extend_from_slice(payload);
    ethernet(0x0800, &ip)
}

fn ipv6_with(src: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[next, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&"fd00:99::1".parse::<Ipv6Addr>().unwrap().octets());
    ip.extend_from_slice(payload);
    ethernet(0x86dd, &ip)
}

fn ipv6(src: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_with(src, next, payload)
}

fn syn_v4(src: &str, dport: u16) -> Vec<u8> {
    ipv4(src.parse().unwrap(), 6, &tcp_header(dport, SYN))
}

fn syn_v6(src: &str, dport: u16) -> Vec<u8> {
    ipv6(src.parse().unwrap(), 6, &tcp_header(dport, SYN))
}

fn arp() -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 10, 99, 0, 2]);
    arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 99, 0, 1]);
    ethernet(0x0806, &arp)
}

#[test]
fn blocked_ipv4_source_dropped() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("block4");
    filter
        .pins
        .block(
            "10.7.0.0/16".parse().unwrap(),
            None,
            edge_ebpf::BLOCK_MANUAL,
        )
        .unwrap();
    assert_eq!(filter.run(&syn_v4("10.7.3.4", OUR_PORT)), XDP_DROP);
    // Blocked means every packet, whatever the port.
    assert_eq!(filter.run(&syn_v4("10.7.3.4", OTHER_PORT)), XDP_DROP);
    assert_eq!(filter.run(&syn_v4("10.8.3.4", OUR_PORT)), XDP_PASS);
    assert_eq!(filter.stat("drop_blocked"), 2);
    assert_eq!(filter.stat("pass_allowed"), 1);
}

#[test]
fn blocked_ipv6_source_dropped() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("block6");
    filter
        .pins
        .block(
            "fd00:bad::/32".parse().unwrap(),
            None,
            edge_ebpf::BLOCK_MANUAL,
        )
        .unwrap();
    assert_eq!(filter.run(&syn_v6("fd00:bad:1::7", OUR_PORT)), XDP_DROP);
    assert_eq!(filter.run(&syn_v6("fd00:600d::7", OUR_PORT)), XDP_PASS);
    assert_eq!(filter.stat("drop_blocked"), 1);
}

#[test]
fn unblock_and_ttl_restore_traffic() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("unblock");
    let net = "10.9.0.1/32".parse().unwrap();
    filter
        .pins
        .block(net, None, edge_ebpf::BLOCK_MANUAL)
        .unwrap();
    assert_eq!(filter.run(&syn_v4("10.9.0.1", OUR_PORT)), XDP_DROP);
    assert!(filter.pins.unblock(net).unwrap());
    assert_eq!(filter.run(&syn_v4("10.9.0.1", OUR_PORT)), XDP_PASS);

    // An expired entry no longer applies, even before anything removes it.
    filter
        .pins
        .block(net, Some(Duration::from_millis(1)), edge_ebpf::BLOCK_MANUAL)
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(filter.run(&syn_v4("10.9.0.1", OUR_PORT)), XDP_PASS);
    assert_eq!(filter.pins.remove_expired().unwrap(), vec![net]);
    assert!(filter.pins.blocked().unwrap().is_empty());
}

#[test]
fn arp_and_icmp_passed() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("arp");
    assert_eq!(filter.run(&arp()), XDP_PASS);
    let echo = [8u8, 0, 0, 0, 0, 1, 0, 1];
    assert_eq!(
        filter.run(&ipv4("10.1.1.1".parse().unwrap(), 1, &echo)),
        XDP_PASS
    );
    // ICMPv6 packet too big, which path MTU discovery depends on.
    let too_big = [2u8, 0, 0, 0, 0, 0, 5, 0x00];
    assert_eq!(
        filter.run(&ipv6("fd00::1".parse().unwrap(), 58, &too_big)),
        XDP_PASS
    );
    assert_eq!(filter.stat("pass_not_ip"), 1);
    assert_eq!(filter.stat("pass_icmp"), 2);
}

#[test]
fn other_ports_passed_untouched() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("other");
    // Even a malformed segment passes when it is not for us.
    let bad = ipv4(
        "10.1.1.1".parse().unwrap(),
        6,
        &tcp_header(OTHER_PORT, SYN | FIN),
    );
    assert_eq!(filter.run(&bad), XDP_PASS);
    assert_eq!(filter.stat("pass_other"), 1);
}

#[test]
fn syn_burst_over_bucket_dropped() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("synflood");
    filter
        .pins
        .set_limits(Limits {
            syn_rate: 1,
            syn_burst: 5,
            quic_rate: 0,
            quic_burst: 0,
            v4_prefix_len: 32,
            v6_prefix_len: 64,
            ..Limits::default()
        })
        .unwrap();
    let frame = syn_v4("10.2.0.9", OUR_PORT);
    let mut dropped = 0u64;
    for _ in 0..50 {
        if filter.run(&frame) == XDP_DROP {
            dropped += 1;
        }
    }
    // The burst of 5 passes; at most a few tokens refill while the loop runs.
    assert!(dropped >= 40, "only {dropped} of 50 SYNs dropped");
    assert_eq!(filter.stat("drop_syn_rate"), dropped);
    // Another source has its own bucket, and segments of open connections are not limited.
    assert_eq!(filter.run(&syn_v4("10.2.0.10", OUR_PORT)), XDP_PASS);
    let ack = ipv4("10.2.0.9".parse().unwrap(), 6, &tcp_header(OUR_PORT, ACK));
    assert_eq!(filter.run(&ack), XDP_PASS);
}

#[test]
fn quic_initial_burst_dropped() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("quic");
    filter
        .pins
        .set_limits(Limits {
            syn_rate: 0,
            syn_burst: 0,
            quic_rate: 1,
            quic_burst: 3,
            v4_prefix_len: 32,
            v6_prefix_len: 64,
            ..Limits::default()
        })
        .unwrap();
    let initial = udp_datagram(OUR_PORT, &quic_initial(1200));
    let frame = ipv6("fd00:1::5".parse().unwrap(), 17, &initial);
    let results: Vec<u32> = (0..20).map(|_| filter.run(&frame)).collect();
    let dropped = results.iter().filter(|&&r| r == XDP_DROP).count() as u64;
    assert!(dropped >= 15, "only {dropped} of 20 Initials dropped");
    assert_eq!(filter.stat("drop_quic_rate"), dropped);
    // A short-header packet of an established connection is not limited.
    let short = udp_datagram(OUR_PORT, &[0x40, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(
        filter.run(&ipv6("fd00:1::5".parse().unwrap(), 17, &short)),
        XDP_PASS
    );
}

#[test]
fn bucket_covers_source_prefix() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("prefix");
    filter
        .pins
        .set_limits(Limits {
            syn_rate: 1,
            syn_burst: 3,
            quic_rate: 0,
            quic_burst: 0,
            v4_prefix_len: 24,
            v6_prefix_len: 64,
            ..Limits::default()
        })
        .unwrap();
    // Three SYNs from three addresses of one /64 empty the bucket they share.
    for host in 1..=3 {
        let frame = syn_v6(&format!("fd00:5:0:1::{host}"), OUR_PORT);
        assert_eq!(filter.run(&frame), XDP_PASS, "host {host} of the /64");
    }
    assert_eq!(filter.run(&syn_v6("fd00:5:0:1::99", OUR_PORT)), XDP_DROP);
    assert_eq!(filter.run(&syn_v6("fd00:5:0:2::1", OUR_PORT)), XDP_PASS);
    // With a /24 for IPv4, 10.6.0.x addresses share a bucket too.
    for host in 1..=3 {
        let frame = syn_v4(&format!("10.6.0.{host}"), OUR_PORT);
        assert_eq!(filter.run(&frame), XDP_PASS, "host {host} of the /24");
    }
    assert_eq!(filter.run(&syn_v4("10.6.0.200", OUR_PORT)), XDP_DROP);
    assert_eq!(filter.run(&syn_v4("10.6.1.1", OUR_PORT)), XDP_PASS);
}

#[test]
fn malformed_to_our_ports_dropped() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("malformed");
    let src: IpAddr = "10.3.0.1".parse().unwrap();
    let IpAddr::V4(src) = src else { unreachable!() };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("syn+fin", ipv4(src, 6, &tcp_header(OUR_PORT, SYN | FIN))),
        ("syn+rst", ipv4(src, 6, &tcp_header(OUR_PORT, SYN | RST))),
        ("no flags", ipv4(src, 6, &tcp_header(OUR_PORT, 0))),
        ("fin only", ipv4(src, 6, &tcp_header(OUR_PORT, FIN))),
        ("data offset 4", {
            let mut tcp = tcp_header(OUR_PORT, SYN);
            tcp[12] = 4 << 4;
            ipv4(src, 6, &tcp)
        }),
        ("short udp length", {
            let mut udp = udp_datagram(OUR_PORT, &[0x40, 1, 2]);
            udp[4..6].copy_from_slice(&4u16.to_be_bytes());
            ipv4(src, 17, &udp)
        }),
        ("udp length past frame", {
            let mut udp = udp_datagram(OUR_PORT, &[0x40, 1, 2]);
            udp[4..6].copy_from_slice(&500u16.to_be_bytes());
            ipv4(src, 17, &udp)
        }),
        (
            "small quic initial",
            ipv4(src, 17, &udp_datagram(OUR_PORT, &quic_initial(300))),
        ),
        ("quic cid too long", {
            let mut quic = quic_initial(1200);
            quic[5] = 21;
            ipv4(src, 17, &udp_datagram(OUR_PORT, &quic))
        }),
    ];
    for (name, frame) in &cases {
        assert_eq!(filter.run(frame), XDP_DROP, "{name}");
    }
    assert_eq!(filter.stat("drop_malformed"), cases.len() as u64);
}

#[test]
fn repeated_malformed_blocks_source() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("autoblock");
    let limits = Limits {
        abuse_rate: 1,
        abuse_burst: 3,
        abuse_block_secs: 600,
        ..filter.pins.limits().unwrap()
    };
    filter.pins.set_limits(limits).unwrap();
    let bad = ipv4(
        "10.5.0.66".parse().unwrap(),
        6,
        &tcp_header(OUR_PORT, SYN | FIN),
    );
    for _ in 0..10 {
        assert_eq!(filter.run(&bad), XDP_DROP);
    }
    assert!(filter.stat("auto_blocked") >= 1);
    // The block covers every packet of that address, and only that address.
    assert_eq!(filter.run(&syn_v4("10.5.0.66", OUR_PORT)), XDP_DROP);
    assert_eq!(filter.run(&syn_v4("10.5.0.67", OUR_PORT)), XDP_PASS);
    let blocked = filter.pins.blocked().unwrap();
    let entry = blocked
        .iter()
        .find(|b| b.net == "10.5.0.66/32".parse().unwrap())
        .expect("automatic block listed");
    assert_eq!(entry.origin, edge_ebpf::BLOCK_AUTO);
    assert!(entry
        .remaining
        .is_some_and(|left| left <= Duration::from_secs(600)));
}

#[test]
fn malformed_without_autoblock_only_dropped() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("noautoblock");
    let bad = ipv4(
        "10.5.1.66".parse().unwrap(),
        6,
        &tcp_header(OUR_PORT, SYN | FIN),
    );
    for _ in 0..10 {
        assert_eq!(filter.run(&bad), XDP_DROP);
    }
    assert_eq!(filter.stat("auto_blocked"), 0);
    assert!(filter.pins.blocked().unwrap().is_empty());
    assert_eq!(filter.run(&syn_v4("10.5.1.66", OUR_PORT)), XDP_PASS);
}

#[test]
fn ipv6_extension_headers_walked() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("ext");
    // Hop-by-hop options (8 bytes, next header TCP) before a SYN+FIN to our port.
    let mut payload = vec![6u8, 0, 1, 4, 0, 0, 0, 0];
    payload.extend_from_slice(&tcp_header(OUR_PORT, SYN | FIN));
    let frame = ipv6_with("fd00:2::1".parse().unwrap(), 0, &payload);
    assert_eq!(filter.run(&frame), XDP_DROP);
    assert_eq!(filter.stat("drop_malformed"), 1);
}

#[test]
fn truncated_headers_handled() {
    if !bpf_ready() {
        return;
    }
    let filter = Filter::load("truncated");
    let frames = [
        syn_v4("10.4.0.1", OUR_PORT),
        syn_v6("fd00:4::1", OUR_PORT),
        ipv4(
            "10.4.0.1".parse().unwrap(),
            17,
            &udp_datagram(OUR_PORT, &quic_initial(1200)),
        ),
    ];
    // Every prefix from a bare Ethernet header on must get a verdict, never an error.
    for frame in &frames {
        for len in 14..frame.len() {
            let verdict = filter.run(&frame[..len]);
            assert!(
                verdict == XDP_PASS || verdict == XDP_DROP,
                "length {len}: verdict {verdict}"
            );
        }
    }
    // Cut inside the IPv4 header: the destination is unknown, so the kernel decides.
    assert_eq!(
        filter.run(&syn_v4("10.4.0.1", OUR_PORT)[..14 + 12]),
        XDP_PASS
    );
    // Cut after the ports of a TCP header to our port: malformed.
    assert_eq!(
        filter.run(&syn_v4("10.4.0.1", OUR_PORT)[..14 + 20 + 8]),
        XDP_DROP
    );
    assert!(filter.stat("pass_unparsed") > 0);
}

#[test]
fn incompatible_pin_replaced_by_edge() {
    if !bpf_ready() {
        return;
    }
    // A hash map pinned where the edge expects its limits array, as after an upgrade that
    // changed the map.
    let source = Filter::load("stalepin-source");
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/edge-test-stalepin-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    source
        .ebpf
        .map(edge_ebpf::MAP_PORTS)
        .unwrap()
        .pin(dir.join(edge_ebpf::MAP_LIMITS))
        .unwrap();

    let backend = common::Backend::start("b");
    let edge = common::Edge::start(
        "stalepin",
        &common::routes_yaml(&[("app", "Host(`t`)", &backend.url())]),
        &["--bpf-pin-dir", dir.to_str().unwrap()],
    );
    edge.expect_log("replacing a pinned map", Duration::from_secs(5));
    edge.expect_metric(r#"edge_ebpf_program_state{program="steering",state="running""#);
    let limits = PinnedMaps::new(&dir).limits().expect("a new limits map");
    assert_eq!(limits.syn_rate, 200, "default limits in the new map");
    drop(edge);
    let _ = std::fs::remove_dir_all(&dir);
}
