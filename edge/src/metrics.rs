//! Counters kept per worker and their Prometheus text rendering.
//!
//! Each counter has exactly one writer, the worker that owns it, so an increment is a relaxed
//! load and store on a cache line no other core writes. The admin listener sums the workers'
//! values when /metrics is scraped.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use crate::{state::Shared, tls::CertExpiry};

/// Adds one to a counter that only the calling worker writes.
#[inline]
pub fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Relaxed).wrapping_add(1), Relaxed);
}

#[inline]
fn add(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

#[inline]
fn sub(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_sub(n), Relaxed);
}

/// Why a request to a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    ConnectTimeout,
    ResponseTimeout,
    /// Closed or reset before a complete response.
    Reset,
    /// Sent a response that cannot be parsed or framed.
    Protocol,
    /// The TLS handshake with an `https://` backend failed, for example because its
    /// certificate is not trusted or not valid for the server name.
    Tls,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 6] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::ConnectTimeout,
        UpstreamErrorKind::ResponseTimeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Protocol,
        UpstreamErrorKind::Tls,
    ];

    fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::ConnectTimeout => "connect_timeout",
            UpstreamErrorKind::ResponseTimeout => "response_timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Protocol => "protocol",
            UpstreamErrorKind::Tls => "tls",
        }
    }
}

/// The protocol a request arrived with, for access logs and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Http3,
}

impl Protocol {
    const ALL: [Protocol; 3] = [Protocol::Http1, Protocol::Http2, Protocol::Http3];

    /// Returns the ALPN name of the protocol.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2",
            Protocol::Http3 => "h3",
        }
    }
}

/// The counters of one worker.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerMetrics {
    pub active_http: AtomicU64,
    pub active_https: AtomicU64,
    pub connections_total: AtomicU64,
    pub tls_handshakes: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// QUIC connection attempts that got a Retry (address validation).
    pub quic_retries: AtomicU64,
    /// QUIC connections that completed the handshake on this worker.
    pub quic_connections: AtomicU64,
    /// HTTP/3 request streams stopped because their headers did not arrive in time.
    pub h3_header_timeouts: AtomicU64,
    upstream_errors: [AtomicU64; UpstreamErrorKind::ALL.len()],
    h2_connections: AtomicU64,
    h2_abuse_closed: AtomicU64,
}

impl WorkerMetrics {
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        bump(&self.upstream_errors[kind as usize]);
    }

    /// Counts a connection that completed the HTTP/2 handshake.
    pub fn h2_connection_opened(&self) {
        bump(&self.h2_connections);
    }

    /// Counts an HTTP/2 connection closed with GOAWAY(ENHANCE_YOUR_CALM) for abuse.
    pub fn h2_abuse_closed(&self) {
        bump(&self.h2_abuse_closed);
    }

    pub fn connection_opened(&self, https: bool) {
        bump(&self.connections_total);
        add(self.active(https), 1);
    }

    pub fn connection_closed(&self, https: bool) {
        sub(self.active(https), 1);
    }

    fn active(&self, https: bool) -> &AtomicU64 {
        if https {
            &self.active_https
        } else {
            &self.active_http
        }
    }
}

/// Requests of one route by protocol and status class (1xx to 5xx), per worker.
#[derive(Debug)]
pub struct RouteStats {
    per_worker: Box<[StatusCounters]>,
}

/// Counters indexed by protocol, then status class.
#[derive(Debug, Default)]
#[repr(align(64))]
struct StatusCounters([[AtomicU64; 5]; 3]);

impl RouteStats {
    pub fn new(workers: usize) -> Self {
        Self {
            per_worker: (0..workers).map(|_| StatusCounters::default()).collect(),
        }
    }

    /// Counts one response with `status` to a request over `protocol` on `worker`.
    pub fn record(&self, worker: usize, protocol: Protocol, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(counters) = self.per_worker.get(worker) {
            bump(&counters.0[protocol as usize][class]);
        }
    }

    fn totals(&self, protocol: Protocol) -> [u64; 5] {
        let mut sums = [0u64; 5];
        for counters in self.per_worker.iter() {
            for (sum, c) in sums.iter_mut().zip(&counters.0[protocol as usize]) {
                *sum += c.load(Relaxed);
            }
        }
        sums
    }
}

/// Renders all counters in the Prometheus text exposition format.
pub fn render(shared: &Shared) -> String {
    let mut out = String::with_capacity(4096);
    let sum = |f: &dyn Fn(&WorkerMetrics) -> u64| -> u64 { shared.metrics.iter().map(f).sum() };

    out.push_str(
        "# HELP edge_requests_total Responses sent, by route, status class and protocol.\n",
    );
    out.push_str("# TYPE edge_requests_total counter\n");
    let mut write_route = |route: &str, stats: &RouteStats| {
        for protocol in Protocol::ALL {
            for (i, n) in stats.totals(protocol).iter().enumerate() {
                if *n > 0 {
                    let _ = writeln!(
                        out,
                        "edge_requests_total{{route=\"{}\",code=\"{}xx\",protocol=\"{}\"}} {n}",
                        escape_label(route),
                        i + 1,
                        protocol.label()
                    );
                }
            }
        }
    };
    write_route("", &shared.unrouted_stats);
    {
        let registry = shared
            .route_stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut names: Vec<_> = registry.keys().collect();
        names.sort();
        for name in names {
            write_route(name, &registry[name]);
        }
    }

    out.push_str("# HELP edge_connections_active Open client connections.\n");
    out.push_str("# TYPE edge_connections_active gauge\n");
    let _ = writeln!(
        out,
        "edge_connections_active{{listener=\"web\"}} {}",
        sum(&|m| m.active_http.load(Relaxed))
    );
    let _ = writeln!(
        out,
        "edge_connections_active{{listener=\"websecure\"}} {}",
        sum(&|m| m.active_https.load(Relaxed))
    );
    let simple = [
        (
            "edge_connections_total",
            "counter",
            "Client connections accepted.",
            sum(&|m| m.connections_total.load(Relaxed)),
        ),
        (
            "edge_tls_handshakes_total",
            "counter",
            "Completed TLS handshakes.",
            sum(&|m| m.tls_handshakes.load(Relaxed)),
        ),
        (
            "edge_tls_handshake_failures_total",
            "counter",
            "Failed or timed-out TLS handshakes.",
            sum(&|m| m.tls_handshake_failures.load(Relaxed)),
        ),
        (
            "edge_quic_retries_total",
            "counter",
            "QUIC connection attempts sent a Retry to validate the client's address.",
            sum(&|m| m.quic_retries.load(Relaxed)),
        ),
        (
            "edge_h3_header_timeouts_total",
            "counter",
            "HTTP/3 request streams stopped because their headers were incomplete after the header read timeout.",
            sum(&|m| m.h3_header_timeouts.load(Relaxed)),
        ),
        (
            "edge_h2_connections_total",
            "counter",
            "Client connections that completed the HTTP/2 handshake.",
            sum(&|m| m.h2_connections.load(Relaxed)),
        ),
        (
            "edge_h2_abusive_connections_total",
            "counter",
            "HTTP/2 connections closed with GOAWAY(ENHANCE_YOUR_CALM) for floods or abuse.",
            sum(&|m| m.h2_abuse_closed.load(Relaxed)),
        ),
    ];
    for (name, kind, help, value) in simple {
        write_metric(&mut out, name, kind, help, value);
    }
    out.push_str("# HELP edge_worker_connections_total Client connections accepted, by worker.\n");
    out.push_str("# TYPE edge_worker_connections_total counter\n");
    for (worker, metrics) in shared.metrics.iter().enumerate() {
        let _ = writeln!(
            out,
            "edge_worker_connections_total{{worker=\"{worker}\"}} {}",
            metrics.connections_total.load(Relaxed)
        );
    }
    out.push_str("# HELP edge_worker_quic_connections_total QUIC connections that completed the handshake, by worker.\n");
    out.push_str("# TYPE edge_worker_quic_connections_total counter\n");
    for (worker, metrics) in shared.metrics.iter().enumerate() {
        let _ = writeln!(
            out,
            "edge_worker_quic_connections_total{{worker=\"{worker}\"}} {}",
            metrics.quic_connections.load(Relaxed)
        );
    }
    out.push_str("# HELP edge_upstream_errors_total Failed requests to backends, by kind.\n");
    out.push_str("# TYPE edge_upstream_errors_total counter\n");
    for kind in UpstreamErrorKind::ALL {
        let _ = writeln!(
            out,
            "edge_upstream_errors_total{{kind=\"{}\"}} {}",
            kind.label(),
            sum(&|m| m.upstream_errors[kind as usize].load(Relaxed))
        );
    }
    let ready = shared.ready_workers.load(Relaxed) as u64;
    write_metric(
        &mut out,
        "edge_workers_ready",
        "gauge",
        "Workers that have started serving.",
        ready,
    );
    let compiled = shared.current.load();
    let help = "Version of the routes snapshot being served.";
    write_metric(
        &mut out,
        "edge_config_version",
        "gauge",
        help,
        compiled.version,
    );
    shared.kernel.render_metrics(&mut out);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    write_certificate_expiry(&mut out, &compiled.certs.expiries, now);
    out
}

/// Appends the days until each served certificate expires, negative once it has expired.
fn write_certificate_expiry(out: &mut String, expiries: &[CertExpiry], now_unix: i64) {
    out.push_str(
        "# HELP edge_certificate_expiry_days Days until each served certificate expires.\n",
    );
    out.push_str("# TYPE edge_certificate_expiry_days gauge\n");
    for expiry in expiries {
        let days = (expiry.not_after_unix - now_unix) as f64 / 86_400.0;
        let _ = writeln!(
            out,
            "edge_certificate_expiry_days{{name=\"{}\",origin=\"{}\"}} {days:.3}",
            escape_label(&expiry.name),
            escape_label(&expiry.origin),
        );
    }
}

/// Appends one metric without labels, with its HELP and TYPE lines.
fn write_metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

pub(crate) fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_stats_sum_workers() {
        let stats = RouteStats::new(2);
        stats.record(0, Protocol::Http1, 200);
        stats.record(1, Protocol::Http1, 204);
        stats.record(1, Protocol::Http1, 502);
        stats.record(1, Protocol::Http2, 200);
        stats.record(7, Protocol::Http1, 200);
        assert_eq!(stats.totals(Protocol::Http1), [0, 2, 0, 0, 1]);
        assert_eq!(stats.totals(Protocol::Http2), [0, 1, 0, 0, 0]);
    }

    #[test]
    fn certificate_expiry_in_days() {
        let mut out = String::new();
        let expiry = CertExpiry {
            name: "a.test".into(),
            origin: "acme:le".into(),
            not_after_unix: 1_000 + 86_400 * 3 / 2,
        };
        write_certificate_expiry(&mut out, &[expiry], 1_000);
        assert!(
            out.contains(
                "edge_certificate_expiry_days{name=\"a.test\",origin=\"acme:le\"} 1.500\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn label_escaping() {
        assert_eq!(escape_label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
