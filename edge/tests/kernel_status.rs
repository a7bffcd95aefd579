//! The edge without its kernel programs: it serves, and its log and /metrics give the reason
//! the XDP filter or the steering is not running. Runs as any user.

mod common;

use std::time::Duration;

use common::{request, routes_yaml, Backend, Edge};

#[test]
fn missing_interface_reported_and_served() {
    let backend = Backend::start("b");
    let pin_dir = format!("/sys/fs/bpf/edge-test-status-{}", std::process::id());
    let edge = Edge::start(
        "xdp-missing-iface",
        &routes_yaml(&[("app", "Host(`t`)", &backend.url())]),
        &["--xdp-iface", "edgenosuch0", "--bpf-pin-dir", &pin_dir],
    );
    assert_eq!(
        request(edge.http, "GET /x HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
    edge.expect_metric(r#"edge_ebpf_program_state{program="xdp",state="failed""#);
    edge.expect_log("running without the XDP filter", Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&pin_dir);
}

#[test]
fn programs_off_reported() {
    let backend = Backend::start("b");
    let edge = Edge::start(
        "xdp-off",
        &routes_yaml(&[("app", "Host(`t`)", &backend.url())]),
        &["--steering", "off"],
    );
    assert_eq!(
        request(edge.http, "GET /x HTTP/1.1\r\nHost: t\r\n\r\n").status,
        200
    );
    edge.expect_metric(r#"edge_ebpf_program_state{program="xdp",state="off",detail=""} 1"#);
    edge.expect_metric(r#"edge_ebpf_program_state{program="steering",state="off",detail=""} 1"#);
}

#[test]
fn quic_migration_off_without_steering() {
    let backend = Backend::start("b");
    let routes = routes_yaml(&[("app", "Host(`t`)", &backend.url())]);
    let edge = Edge::start(
        "quic-steering-off",
        &routes,
        &["--steering", "off", "--workers", "2"],
    );
    edge.expect_metric(
        r#"edge_ebpf_program_state{program="quic_steering",state="off",detail=""} 1"#,
    );
    edge.expect_log("HTTP/3 connection migration off", Duration::from_secs(5));

    // One worker owns every QUIC connection, so migration needs no steering.
    let single = Edge::start(
        "quic-one-worker",
        &routes,
        &["--steering", "off", "--workers", "1"],
    );
    single.expect_log(
        "HTTP/3 connection migration on: one worker",
        Duration::from_secs(5),
    );
}
