//! The results of a harness run, as written to JSON, and their aggregation over rounds.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::load::{LoadReport, Protocol};

/// Name of the target that sends load straight to the backend, without a proxy.
pub const DIRECT: &str = "direct";

/// A load pattern every target is measured with. The value names select scenarios in
/// `bench run --scenarios`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Scenario {
    /// Plain HTTP/1.1 keep-alive, closed loop.
    #[value(name = "keep-alive")]
    KeepAlive,
    /// HTTPS HTTP/1.1 keep-alive, closed loop.
    #[value(name = "tls-keep-alive")]
    TlsKeepAlive,
    /// A new TLS connection (full handshake) per request, closed loop.
    #[value(name = "tls-handshake")]
    TlsHandshake,
    /// HTTPS HTTP/2 keep-alive with many concurrent streams per connection, closed loop.
    #[value(name = "h2")]
    TlsHttp2,
    /// HTTP/3 over QUIC with many concurrent streams per connection, closed loop.
    #[value(name = "h3")]
    Http3,
    /// Plain HTTP/1.1 keep-alive at a fixed rate, open loop.
    #[value(name = "fixed-rate")]
    FixedRate,
}

impl Scenario {
    pub const CLOSED_LOOP: [Scenario; 5] = [
        Scenario::KeepAlive,
        Scenario::TlsKeepAlive,
        Scenario::TlsHandshake,
        Scenario::TlsHttp2,
        Scenario::Http3,
    ];

    /// Every scenario, in run order: the closed-loop ones, then the fixed rate, which takes
    /// its rate from the closed-loop results.
    pub const ALL: [Scenario; 6] = [
        Scenario::KeepAlive,
        Scenario::TlsKeepAlive,
        Scenario::TlsHandshake,
        Scenario::TlsHttp2,
        Scenario::Http3,
        Scenario::FixedRate,
    ];

    pub fn protocol(self) -> Protocol {
        match self {
            Self::KeepAlive | Self::FixedRate => Protocol::Http1,
            Self::TlsKeepAlive | Self::TlsHandshake => Protocol::Http1Tls,
            Self::TlsHttp2 => Protocol::Http2,
            Self::Http3 => Protocol::Http3,
        }
    }

    /// Short label used in progress lines and plots.
    pub fn label(self) -> &'static str {
        match self {
            Self::KeepAlive => "HTTP/1.1 keep-alive",
            Self::TlsKeepAlive => "HTTPS keep-alive",
            Self::TlsHandshake => "new TLS connection per request",
            Self::TlsHttp2 => "HTTPS HTTP/2",
            Self::Http3 => "HTTP/3",
            Self::FixedRate => "HTTP/1.1 fixed rate",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The machine and how the harness used it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub os: String,
    /// Placement of proxies, load generator and backend on CPUs.
    pub pinning: String,
}

/// Run parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub rounds: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub connections: usize,
    pub handshake_connections: usize,
    pub fixed_rate_connections: usize,
    /// Connections of the HTTP/2 scenario (0 in results from before it existed).
    #[serde(default)]
    pub h2_connections: usize,
    /// Concurrent streams on each HTTP/2 connection.
    #[serde(default)]
    pub h2_streams: usize,
    /// Connections of the HTTP/3 scenario (0 in results from before it existed).
    #[serde(default)]
    pub h3_connections: usize,
    /// Concurrent streams on each HTTP/3 connection.
    #[serde(default)]
    pub h3_streams: usize,
    pub fixed_rate_per_s: f64,
    /// Description of how the fixed rate was chosen.
    pub fixed_rate_basis: String,
    /// Target whose median closed-loop HTTP/1.1 rate was halved to get the fixed rate. It is
    /// `None` when the rate was set by hand or no closed-loop rate was measured.
    #[serde(default)]
    pub fixed_rate_from: Option<String>,
    /// Shortest time between two wake-ups of the open-loop pacer, in microseconds. It is
    /// `None` in results from before the pacer, whose timer had millisecond resolution.
    #[serde(default)]
    pub pacer_resolution_us: Option<u64>,
    /// Scenarios selected with `--scenarios`; empty when every scenario ran.
    #[serde(default)]
    pub scenarios: Vec<Scenario>,
    pub request_timeout_s: f64,
    pub workers: usize,
}

impl Settings {
    /// Returns whether the run measured `scenario`.
    pub fn selects(&self, scenario: Scenario) -> bool {
        self.scenarios.is_empty() || self.scenarios.contains(&scenario)
    }
}

/// One target: a proxy, or the direct path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
    pub version: String,
    pub program: String,
    /// RSS of all the proxy's processes after start-up and one request, before any load.
    pub idle_rss_kib: Option<u64>,
    /// Reason the target was not measured.
    pub skipped: Option<String>,
    /// Reason the HTTP/2 scenario was not measured, such as a proxy that does not select
    /// `h2` in ALPN.
    #[serde(default)]
    pub h2_skipped: Option<String>,
    /// Reason the HTTP/3 scenario was not measured, such as a proxy build without QUIC.
    #[serde(default)]
    pub h3_skipped: Option<String>,
    /// Memory of idle keep-alive TLS connections, measured before any load.
    pub idle_tls: Option<IdleTlsMemory>,
}

/// RSS of a proxy before and while it keeps idle keep-alive TLS connections open.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleTlsMemory {
    pub requested: usize,
    /// Connections that completed one request and were held open.
    pub opened: usize,
    /// Connections that failed, by kind.
    pub errors: std::collections::BTreeMap<String, u64>,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// RSS growth divided by the connections held.
    pub kib_per_connection: Option<f64>,
}

/// One measurement: one target, one scenario, one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub scenario: Scenario,
    pub target: String,
    pub round: usize,
    pub load: LoadReport,
    /// CPU time (user + system) of all the proxy's processes during the measured window.
    pub proxy_cpu_s: Option<f64>,
    pub proxy_cpu_us_per_request: Option<f64>,
    /// `proxy_cpu_s` as a fraction of the proxy's CPUs over the window.
    pub proxy_cpu_busy: Option<f64>,
    /// CPU time of the harness process (load generator and backend) as a fraction of the
    /// client CPUs over the window.
    pub client_cpu_busy: f64,
    /// Largest RSS of all the proxy's processes sampled during the window.
    pub rss_load_kib: Option<u64>,
}

/// Everything one harness run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResults {
    pub started_utc: String,
    pub command: String,
    pub wall_time_s: f64,
    pub host: HostInfo,
    pub settings: Settings,
    pub targets: Vec<TargetInfo>,
    pub cells: Vec<Cell>,
}

impl RunResults {
    /// Returns the names of the measured targets, in run order.
    pub fn measured_targets(&self) -> Vec<&str> {
        self.targets
            .iter()
            .filter(|t| t.skipped.is_none())
            .map(|t| t.name.as_str())
            .collect()
    }

    /// Aggregates the rounds of `target` in `scenario`, or `None` when it was not measured.
    pub fn aggregate(&self, scenario: Scenario, target: &str) -> Option<Aggregate> {
        let cells: Vec<&Cell> = self
            .cells
            .iter()
            .filter(|c| c.scenario == scenario && c.target == target)
            .collect();
        Aggregate::of(&cells)
    }
}

/// Median, minimum and maximum of one quantity over rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Returns the spread of `values`, or `None` for no values. The median of an even count
    /// is the mean of the two middle values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len().is_multiple_of(2) {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        } else {
            sorted[mid]
        };
        Some(Spread {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }
}

/// The rounds of one target in one scenario.
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub requests_per_s: Spread,
    pub p50_us: Spread,
    pub p90_us: Spread,
    pub p99_us: Spread,
    pub p999_us: Spread,
    /// Largest latency of any round.
    pub max_us: u64,
    pub uncorrected_p99_us: Option<Spread>,
    pub send_lag_p99_us: Option<Spread>,
    pub cpu_us_per_request: Option<Spread>,
    pub proxy_cpu_busy: Option<Spread>,
    pub client_cpu_busy: Spread,
    /// Failed requests of all rounds, by kind.
    pub errors: Vec<(String, u64)>,
    /// Per-percentile median over rounds of the latency curves.
    pub latency_curve_us: Vec<(f64, f64)>,
    pub tls_session: Option<String>,
}

impl Aggregate {
    fn of(cells: &[&Cell]) -> Option<Aggregate> {
        let first = cells.first()?;
        let spread = |f: &dyn Fn(&Cell) -> f64| -> Spread {
            let values: Vec<f64> = cells.iter().map(|c| f(c)).collect();
            Spread::of(&values).unwrap_or(Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            })
        };
        let optional = |f: &dyn Fn(&Cell) -> Option<f64>| -> Option<Spread> {
            let values: Vec<f64> = cells.iter().filter_map(|c| f(c)).collect();
            Spread::of(&values)
        };
        let mut errors: Vec<(String, u64)> = Vec::new();
        for cell in cells {
            for (kind, count) in &cell.load.errors {
                match errors.iter_mut().find(|(k, _)| k == kind) {
                    Some((_, total)) => *total += count,
                    None => errors.push((kind.clone(), *count)),
                }
            }
        }
        let latency_curve_us = first
            .load
            .latency_curve_us
            .iter()
            .enumerate()
            .map(|(i, &(percentile, _))| {
                let values: Vec<f64> = cells
                    .iter()
                    .filter_map(|c| c.load.latency_curve_us.get(i))
                    .filter(|(p, _)| *p == percentile)
                    .map(|&(_, us)| us as f64)
                    .collect();
                (
                    percentile,
                    Spread::of(&values).map_or(f64::NAN, |s| s.median),
                )
            })
            .collect();
        Some(Aggregate {
            requests_per_s: spread(&|c| c.load.requests_per_s),
            p50_us: spread(&|c| c.load.latency_us.p50_us as f64),
            p90_us: spread(&|c| c.load.latency_us.p90_us as f64),
            p99_us: spread(&|c| c.load.latency_us.p99_us as f64),
            p999_us: spread(&|c| c.load.latency_us.p999_us as f64),
            max_us: cells
                .iter()
                .map(|c| c.load.latency_us.max_us)
                .max()
                .unwrap_or(0),
            uncorrected_p99_us: optional(&|c| {
                c.load.uncorrected_latency_us.map(|s| s.p99_us as f64)
            }),
            send_lag_p99_us: optional(&|c| c.load.send_lag_us.map(|s| s.p99_us as f64)),
            cpu_us_per_request: optional(&|c| c.proxy_cpu_us_per_request),
            proxy_cpu_busy: optional(&|c| c.proxy_cpu_busy),
            client_cpu_busy: spread(&|c| c.client_cpu_busy),
            errors,
            latency_curve_us,
            tls_session: cells.iter().find_map(|c| c.load.tls_session.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_odd_count() {
        let spread = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!(spread.median, 2.0);
        assert_eq!(spread.min, 1.0);
        assert_eq!(spread.max, 3.0);
    }

    #[test]
    fn spread_of_even_count() {
        let spread = Spread::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(spread.median, 3.0);
    }

    #[test]
    fn spread_ignores_non_finite_values() {
        let spread = Spread::of(&[f64::NAN, 5.0]).unwrap();
        assert_eq!(spread.median, 5.0);
        assert!(Spread::of(&[]).is_none());
    }
}
