//! Markdown rendering of a harness run: run facts, one table per scenario, memory, the
//! edge's ratios against the targets it is built to meet, and errors.

use std::{fmt::Write as _, time::SystemTime};

use crate::{
    proxies::ProxyKind,
    results::{Aggregate, RunResults, Scenario, Spread, DIRECT},
};

/// File names of the two plots a report embeds.
pub struct PlotFiles<'a> {
    pub latency: &'a str,
    pub throughput: &'a str,
}

/// Renders the whole report.
pub fn render_markdown(results: &RunResults, plots: &PlotFiles<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmark results, {}\n", results.started_utc);
    render_facts(&mut out, results);
    let _ = writeln!(
        out,
        "Each cell is the median over rounds with the minimum and maximum in brackets. Latency is \
         from request start to the last byte of the response, in microseconds; `max` is the \
         largest of any round. `proxy CPU busy` and `client CPU busy` are the CPU time of the \
         proxy and of the load generator with the backend, as a share of the CPUs each was \
         pinned to. A client near 100 % means the load generator, not the proxy, set the rate; \
         both well below 100 % means something else limited it, such as too few connections or other \
         processes taking CPU time.\n"
    );
    let _ = writeln!(
        out,
        "![latency percentiles]({})\n\n![throughput]({})\n",
        plots.latency, plots.throughput
    );
    for scenario in Scenario::CLOSED_LOOP {
        render_closed_loop(&mut out, results, scenario);
    }
    render_fixed_rate(&mut out, results);
    render_memory(&mut out, results);
    render_targets(&mut out, results);
    render_errors(&mut out, results);
    out
}

fn render_facts(out: &mut String, results: &RunResults) {
    let host = &results.host;
    let settings = &results.settings;
    let mut rows = vec![
        vec!["command".to_owned(), format!("`{}`", results.command)],
        vec![
            "host".to_owned(),
            format!(
                "{}: {}, {} CPUs, Linux {}, {}",
                host.hostname, host.cpu_model, host.cpus, host.kernel, host.os
            ),
        ],
        vec!["pinning".to_owned(), host.pinning.clone()],
        vec![
            "rounds".to_owned(),
            format!(
                "{} rounds, targets interleaved; per cell {} s warm-up, then {} s measured",
                settings.rounds,
                trim_float(settings.warmup_s),
                trim_float(settings.duration_s)
            ),
        ],
        vec![
            "workers".to_owned(),
            format!(
                "{} per proxy (GOMAXPROCS for Traefik and Caddy)",
                settings.workers
            ),
        ],
        vec![
            "backend".to_owned(),
            "built-in static HTTP/1.1 backend of the bench crate, 34-byte body".to_owned(),
        ],
        vec![
            "TLS".to_owned(),
            "self-signed ECDSA P-256 certificate; client: rustls (ring), ALPN http/1.1 \
             (h2 only in the HTTP/2 scenario), session resumption off, certificate chain not validated"
                .to_owned(),
        ],
        vec![
            "wall time".to_owned(),
            format!("{:.0} s", results.wall_time_s),
        ],
    ];
    for target in &results.targets {
        let state = match &target.skipped {
            Some(reason) => format!(
                "skipped: {} (see Errors)",
                reason.lines().next().unwrap_or_default()
            ),
            None => format!("`{}`", target.program),
        };
        rows.push(vec![
            format!("{} version", target.name),
            format!("{} ({state})", target.version),
        ]);
    }
    out.push_str(&render_table(&["", ""], &rows));
    out.push('\n');
}

fn render_closed_loop(out: &mut String, results: &RunResults, scenario: Scenario) {
    let connections = match scenario {
        Scenario::TlsHandshake => format!("{} connections", results.settings.handshake_connections),
        Scenario::TlsHttp2 => format!(
            "{} connections × {} streams",
            results.settings.h2_connections, results.settings.h2_streams
        ),
        _ => format!("{} connections", results.settings.connections),
    };
    let _ = writeln!(
        out,
        "## {}, closed loop, {connections}\n",
        capitalize(scenario.label())
    );
    let mut rows = Vec::new();
    let mut session = None;
    for target in results.measured_targets() {
        let Some(agg) = results.aggregate(scenario, target) else {
            continue;
        };
        session = session.or(agg.tls_session.clone());
        rows.push(vec![
            target.to_owned(),
            spread_cell(agg.requests_per_s, 0),
            spread_cell(agg.p50_us, 0),
            spread_cell(agg.p99_us, 0),
            spread_cell(agg.p999_us, 0),
            thousands(agg.max_us as f64),
            optional_spread(agg.cpu_us_per_request, 1),
            optional_percent(agg.proxy_cpu_busy),
            percent_cell(agg.client_cpu_busy),
            error_total(&agg).to_string(),
        ]);
    }
    if rows.is_empty() {
        out.push_str("Not measured.\n\n");
        return;
    }
    out.push_str(&render_table(
        &[
            "target",
            "requests/s",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "proxy CPU µs/request",
            "proxy CPU busy",
            "client CPU busy",
            "errors",
        ],
        &rows,
    ));
    if let Some(session) = session {
        let _ = writeln!(out, "\nTLS session of the first connection: {session}.");
    }
    out.push('\n');
}

fn render_fixed_rate(out: &mut String, results: &RunResults) {
    let settings = &results.settings;
    let _ = writeln!(
        out,
        "## HTTP/1.1 at {} requests/s, open loop, {} connections\n",
        thousands(settings.fixed_rate_per_s),
        settings.fixed_rate_connections
    );
    let _ = writeln!(
        out,
        "Rate: {}. Latency is corrected for coordinated omission: each connection is replayed \
         as if every request had left at its due time, or when the previous response was \
         complete, and had taken the time the target actually needed. So a slow response \
         delays the requests queued behind it, while the load generator's own timer lag (its \
         timer has millisecond resolution) is not charged to the target. `uncorrected p99` counts \
         from the actual send. `added p99` is the target's p99 minus the direct path's p99. \
         `send lag` is how late requests actually left; far above 1 ms, the connections fell \
         behind the schedule. `errors` include requests still unsent at the end.\n",
        settings.fixed_rate_basis
    );
    let direct_p99 = results
        .aggregate(Scenario::FixedRate, DIRECT)
        .map(|a| a.p99_us.median);
    let mut rows = Vec::new();
    for target in results.measured_targets() {
        let Some(agg) = results.aggregate(Scenario::FixedRate, target) else {
            continue;
        };
        let added = match direct_p99 {
            Some(direct) if target != DIRECT => thousands(agg.p99_us.median - direct),
            _ => "–".to_owned(),
        };
        rows.push(vec![
            target.to_owned(),
            spread_cell(agg.requests_per_s, 0),
            spread_cell(agg.p50_us, 0),
            spread_cell(agg.p90_us, 0),
            spread_cell(agg.p99_us, 0),
            spread_cell(agg.p999_us, 0),
            thousands(agg.max_us as f64),
            added,
            optional_spread(agg.uncorrected_p99_us, 0),
            optional_spread(agg.send_lag_p99_us, 0),
            optional_spread(agg.cpu_us_per_request, 1),
            error_total(&agg).to_string(),
        ]);
    }
    if rows.is_empty() {
        out.push_str("Not measured.\n\n");
        return;
    }
    out.push_str(&render_table(
        &[
            "target",
            "achieved req/s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "added p99 µs",
            "uncorrected p99 µs",
            "send lag p99 µs",
            "proxy CPU µs/request",
            "errors",
        ],
        &rows,
    ));
    out.push('\n');
}

fn render_memory(out: &mut String, results: &RunResults) {
    out.push_str("## Memory\n\n");
    out.push_str(
        "RSS summed over the proxy's processes (shared pages count once per process). Idle: \
         after start-up and one request per listener. Idle TLS connections: keep-alive \
         connections that each completed one HTTPS request and then stayed open, measured \
         before any load; per connection is the RSS growth divided by the connections held. \
         Under load: the largest sample (every 250 ms) in any measured window.\n\n",
    );
    let mut rows = Vec::new();
    for target in &results.targets {
        if target.name == DIRECT || target.skipped.is_some() {
            continue;
        }
        let under_load = results
            .cells
            .iter()
            .filter(|c| c.target == target.name)
            .filter_map(|c| c.rss_load_kib)
            .max();
        let idle_tls = target.idle_tls.as_ref();
        rows.push(vec![
            target.name.clone(),
            target
                .idle_rss_kib
                .map_or_else(|| "–".to_owned(), mebibytes),
            idle_tls.map_or_else(
                || "–".to_owned(),
                |m| {
                    format!(
                        "{} with {}",
                        mebibytes(m.rss_after_kib),
                        thousands(m.opened as f64)
                    )
                },
            ),
            idle_tls
                .and_then(|m| m.kib_per_connection)
                .map_or_else(|| "–".to_owned(), |k| format!("{k:.1} KiB")),
            under_load.map_or_else(|| "–".to_owned(), mebibytes),
        ]);
    }
    out.push_str(&render_table(
        &[
            "proxy",
            "idle RSS",
            "RSS with idle TLS connections",
            "per idle TLS connection",
            "max RSS under load",
        ],
        &rows,
    ));
    out.push('\n');
}

/// A ratio the edge is built to reach, computed from the medians of this run.
struct Check {
    name: String,
    goal: &'static str,
    measured: Option<f64>,
    unit: &'static str,
    is_met: fn(f64) -> bool,
}

fn render_targets(out: &mut String, results: &RunResults) {
    out.push_str("## The edge against its targets\n\n");
    out.push_str(
        "Ratios of medians from this run only. A short or noisy run can flip a verdict, so \
         trust a full run on a quiet machine.\n\n",
    );
    let mut rows: Vec<Vec<String>> = edge_checks(results)
        .iter()
        .map(|check| {
            let (measured, verdict) = match check.measured {
                Some(v) => (
                    format!("{v:.2}{}", check.unit),
                    if (check.is_met)(v) { "yes" } else { "no" }.to_owned(),
                ),
                None => ("–".to_owned(), "not measured".to_owned()),
            };
            vec![check.name.clone(), check.goal.to_owned(), measured, verdict]
        })
        .collect();
    let edge_idle = results
        .targets
        .iter()
        .find(|t| t.name == ProxyKind::Edge.name())
        .and_then(|t| t.idle_tls.as_ref())
        .and_then(|m| m.kib_per_connection);
    rows.push(vec![
        "RSS per idle keep-alive TLS connection, edge".to_owned(),
        "< 16 KiB".to_owned(),
        edge_idle.map_or_else(|| "–".to_owned(), |k| format!("{k:.1} KiB")),
        match edge_idle {
            Some(k) if k < 16.0 => "yes",
            Some(_) => "no",
            None => "not measured",
        }
        .to_owned(),
    ]);
    out.push_str(&render_table(&["check", "goal", "measured", "met"], &rows));
    out.push('\n');
}

/// Computes the edge's ratios against nginx, Traefik and the direct path from the medians.
fn edge_checks(results: &RunResults) -> Vec<Check> {
    let median = |scenario: Scenario, target: &str, f: fn(&Aggregate) -> Option<f64>| {
        results.aggregate(scenario, target).and_then(|a| f(&a))
    };
    let cpu = |a: &Aggregate| a.cpu_us_per_request.map(|s| s.median);
    let rps = |a: &Aggregate| Some(a.requests_per_s.median);
    let p99 = |a: &Aggregate| Some(a.p99_us.median);
    let edge = ProxyKind::Edge.name();
    let nginx = ProxyKind::Nginx.name();
    let traefik = ProxyKind::Traefik.name();
    let ratio = |num: Option<f64>, den: Option<f64>| match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    };

    let mut checks = Vec::new();
    for scenario in [
        Scenario::KeepAlive,
        Scenario::TlsKeepAlive,
        Scenario::TlsHttp2,
    ] {
        checks.push(Check {
            name: format!("CPU per request, {scenario}: nginx / edge"),
            goal: "≥ 2",
            measured: ratio(median(scenario, nginx, cpu), median(scenario, edge, cpu)),
            unit: "×",
            is_met: |v| v >= 2.0,
        });
        checks.push(Check {
            name: format!("CPU per request, {scenario}: Traefik / edge"),
            goal: "≥ 4",
            measured: ratio(median(scenario, traefik, cpu), median(scenario, edge, cpu)),
            unit: "×",
            is_met: |v| v >= 4.0,
        });
    }
    checks.push(Check {
        name: "requests/s, HTTP/1.1 keep-alive: edge / nginx".to_owned(),
        goal: "≥ 1.3",
        measured: ratio(
            median(Scenario::KeepAlive, edge, rps),
            median(Scenario::KeepAlive, nginx, rps),
        ),
        unit: "×",
        is_met: |v| v >= 1.3,
    });
    checks.push(Check {
        name: "requests/s, HTTP/1.1 keep-alive: edge / direct".to_owned(),
        goal: "≥ 0.8",
        measured: ratio(
            median(Scenario::KeepAlive, edge, rps),
            median(Scenario::KeepAlive, DIRECT, rps),
        ),
        unit: "×",
        is_met: |v| v >= 0.8,
    });
    checks.push(Check {
        name: "new TLS handshakes/s: edge / nginx".to_owned(),
        goal: "≥ 1.2",
        measured: ratio(
            median(Scenario::TlsHandshake, edge, rps),
            median(Scenario::TlsHandshake, nginx, rps),
        ),
        unit: "×",
        is_met: |v| v >= 1.2,
    });
    checks.push(Check {
        name: "p99 added latency at the fixed rate: edge − direct".to_owned(),
        goal: "< 150",
        measured: match (
            median(Scenario::FixedRate, edge, p99),
            median(Scenario::FixedRate, DIRECT, p99),
        ) {
            (Some(e), Some(d)) => Some(e - d),
            _ => None,
        },
        unit: " µs",
        is_met: |v| v < 150.0,
    });
    checks
}

fn render_errors(out: &mut String, results: &RunResults) {
    out.push_str("## Errors\n\n");
    let mut lines = Vec::new();
    for cell in &results.cells {
        for (kind, count) in &cell.load.errors {
            lines.push(format!(
                "- {}, {}, round {}: {kind} × {count}",
                cell.target, cell.scenario, cell.round
            ));
        }
    }
    for target in &results.targets {
        if let Some(reason) = &target.h2_skipped {
            lines.push(format!(
                "- {} skipped {}: {reason}",
                target.name,
                Scenario::TlsHttp2
            ));
        }
        if let Some(reason) = &target.skipped {
            // The reason can contain the proxy's last log lines, so it becomes a code block.
            let block: Vec<String> = reason.lines().map(|l| format!("      {l}")).collect();
            lines.push(format!(
                "- {} skipped:\n\n{}\n",
                target.name,
                block.join("\n")
            ));
        }
    }
    if lines.is_empty() {
        out.push_str("None.\n");
    } else {
        out.push_str(&lines.join("\n"));
        out.push('\n');
    }
}

fn error_total(aggregate: &Aggregate) -> u64 {
    aggregate.errors.iter().map(|(_, n)| n).sum()
}

/// Renders a Markdown table. Every row must have as many cells as `headers`.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    out.push_str(&table_line(headers.iter().copied()));
    out.push_str(&table_line(headers.iter().map(|_| "---")));
    for row in rows {
        out.push_str(&table_line(row.iter().map(String::as_str)));
    }
    out
}

fn table_line<'a>(cells: impl Iterator<Item = &'a str>) -> String {
    let cells: Vec<String> = cells.map(|c| c.replace('|', "\\|")).collect();
    format!("| {} |\n", cells.join(" | "))
}

/// Formats a spread as `median (min–max)`, or the median alone when all rounds agree.
pub fn spread_cell(spread: Spread, decimals: usize) -> String {
    let median = number(spread.median, decimals);
    let min = number(spread.min, decimals);
    let max = number(spread.max, decimals);
    if min == max {
        median
    } else {
        format!("{median} ({min}–{max})")
    }
}

fn optional_spread(spread: Option<Spread>, decimals: usize) -> String {
    spread.map_or_else(|| "–".to_owned(), |s| spread_cell(s, decimals))
}

fn percent_cell(spread: Spread) -> String {
    format!("{:.0} %", spread.median * 100.0)
}

fn optional_percent(spread: Option<Spread>) -> String {
    spread.map_or_else(|| "–".to_owned(), percent_cell)
}

fn number(value: f64, decimals: usize) -> String {
    if decimals == 0 {
        thousands(value)
    } else {
        format!("{value:.decimals$}")
    }
}

/// Formats a value rounded to an integer with comma thousands separators.
pub fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "–".to_owned();
    }
    let rounded = value.round();
    let digits = format!("{}", rounded.abs() as u64);
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if rounded < 0.0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

fn mebibytes(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn trim_float(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// UTC time of a run, in the two forms the results use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamp {
    /// ISO 8601, for example `2026-12-04T22:31:05Z`.
    pub iso: String,
    /// For file names, for example `20261204T223105Z`.
    pub file: String,
}

impl Timestamp {
    pub fn now() -> Self {
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self::from_unix(secs)
    }

    /// Converts seconds since the Unix epoch to a UTC date and time on the proleptic
    /// Gregorian calendar.
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
        Self {
            iso: format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z"),
            file: format!("{year:04}{month:02}{day:02}T{hour:02}{minute:02}{second:02}Z"),
        }
    }
}

/// Converts days since 1970-01-01 to `(year, month, day)`, counting in 400-year eras of
/// 146 097 days that start on 1 March, so that the leap day ends each year of the era.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn table_renders_header_and_rows() {
        let table = render_table(
            &["target", "requests/s"],
            &[vec!["edge".to_owned(), "1|2".to_owned()]],
        );
        assert_eq!(
            table,
            "| target | requests/s |\n| --- | --- |\n| edge | 1\\|2 |\n"
        );
    }

    fn sample_results() -> RunResults {
        use crate::{
            load::{LoadReport, Mode, Protocol},
            results::{Cell, HostInfo, Settings, TargetInfo},
            stats::LatencySummary,
        };
        let target = |name: &str| TargetInfo {
            name: name.to_owned(),
            version: "1.0".to_owned(),
            program: format!("/usr/bin/{name}"),
            idle_rss_kib: Some(2048),
            skipped: None,
            h2_skipped: None,
            idle_tls: None,
        };
        let cell = |name: &str, round: usize, rps: f64, cpu_us: Option<f64>| Cell {
            scenario: Scenario::KeepAlive,
            target: name.to_owned(),
            round,
            load: LoadReport {
                protocol: Protocol::Http1,
                mode: Mode::Closed,
                connections: 32,
                streams: 1,
                measured_s: 2.0,
                responses: (rps * 2.0) as u64,
                requests_per_s: rps,
                errors: BTreeMap::new(),
                co_corrected: false,
                latency_us: LatencySummary {
                    count: 10,
                    mean_us: 500.0,
                    p50_us: 400,
                    p90_us: 600,
                    p99_us: 900,
                    p999_us: 1200,
                    max_us: 1500,
                },
                latency_curve_us: vec![(50.0, 400), (99.0, 900)],
                uncorrected_latency_us: None,
                send_lag_us: None,
                tls_session: None,
            },
            proxy_cpu_s: cpu_us.map(|us| us * rps * 2.0 / 1e6),
            proxy_cpu_us_per_request: cpu_us,
            proxy_cpu_busy: cpu_us.map(|_| 0.9),
            client_cpu_busy: 0.5,
            rss_load_kib: cpu_us.map(|_| 4096),
        };
        RunResults {
            started_utc: "2026-12-04T22:31:05Z".to_owned(),
            command: "cargo xtask bench --quick".to_owned(),
            wall_time_s: 100.0,
            host: HostInfo {
                hostname: "vm".to_owned(),
                cpu_model: "AMD EPYC".to_owned(),
                cpus: 2,
                kernel: "6.18".to_owned(),
                os: "Debian".to_owned(),
                pinning: "proxies on CPU 0".to_owned(),
            },
            settings: Settings {
                rounds: 2,
                warmup_s: 0.5,
                duration_s: 2.0,
                connections: 32,
                handshake_connections: 8,
                fixed_rate_connections: 64,
                h2_connections: 4,
                h2_streams: 16,
                fixed_rate_per_s: 1000.0,
                fixed_rate_basis: "set with --fixed-rate".to_owned(),
                request_timeout_s: 2.0,
                workers: 1,
            },
            targets: vec![target(DIRECT), target("edge"), target("nginx")],
            cells: vec![
                cell(DIRECT, 1, 80_000.0, None),
                cell("edge", 1, 40_000.0, Some(10.0)),
                cell("edge", 2, 44_000.0, Some(12.0)),
                cell("nginx", 1, 30_000.0, Some(25.0)),
                cell("nginx", 2, 30_000.0, Some(25.0)),
            ],
        }
    }

    #[test]
    fn markdown_has_median_and_range() {
        let markdown = render_markdown(
            &sample_results(),
            &PlotFiles {
                latency: "l.svg",
                throughput: "t.svg",
            },
        );
        assert!(
            markdown.contains("| edge | 42,000 (40,000–44,000) | 400 | 900 |"),
            "{markdown}"
        );
        assert!(markdown.contains("| nginx | 30,000 | 400 |"), "{markdown}");
        assert!(
            markdown.contains("![latency percentiles](l.svg)"),
            "{markdown}"
        );
    }

    #[test]
    fn markdown_names_h2_streams_and_skip_reason() {
        let mut results = sample_results();
        results.targets[2].h2_skipped = Some("alpn not h2".to_owned());
        let markdown = render_markdown(
            &results,
            &PlotFiles {
                latency: "l.svg",
                throughput: "t.svg",
            },
        );
        assert!(
            markdown.contains("## HTTPS HTTP/2, closed loop, 4 connections × 16 streams"),
            "{markdown}"
        );
        assert!(
            markdown.contains("- nginx skipped HTTPS HTTP/2: alpn not h2"),
            "{markdown}"
        );
    }

    #[test]
    fn markdown_checks_cpu_ratio() {
        let markdown = render_markdown(
            &sample_results(),
            &PlotFiles {
                latency: "l.svg",
                throughput: "t.svg",
            },
        );
        // nginx 25 µs / edge 11 µs (median of 10 and 12) per request.
        assert!(
            markdown.contains(
                "| CPU per request, HTTP/1.1 keep-alive: nginx / edge | ≥ 2 | 2.27× | yes |"
            ),
            "{markdown}"
        );
        assert!(
            markdown.contains(
                "| requests/s, HTTP/1.1 keep-alive: edge / direct | ≥ 0.8 | 0.53× | no |"
            ),
            "{markdown}"
        );
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.6), "1,234,568");
        assert_eq!(thousands(-45_000.0), "-45,000");
        assert_eq!(thousands(f64::NAN), "–");
    }

    #[test]
    fn spread_cell_shows_min_max() {
        let spread = Spread {
            median: 35_120.0,
            min: 34_900.0,
            max: 35_400.0,
        };
        assert_eq!(spread_cell(spread, 0), "35,120 (34,900–35,400)");
    }

    #[test]
    fn spread_cell_collapses_equal_rounds() {
        let spread = Spread {
            median: 2.5,
            min: 2.5,
            max: 2.5,
        };
        assert_eq!(spread_cell(spread, 1), "2.5");
    }

    #[test]
    fn timestamp_of_epoch_and_leap_day() {
        assert_eq!(Timestamp::from_unix(0).iso, "1970-01-01T00:00:00Z");
        // 2024-02-29 12:34:56 UTC
        let stamp = Timestamp::from_unix(1_709_210_096);
        assert_eq!(stamp.iso, "2024-02-29T12:34:56Z");
        assert_eq!(stamp.file, "20240229T123456Z");
    }

    #[test]
    fn timestamp_at_year_end() {
        // 2026-12-31 23:59:59 UTC
        assert_eq!(
            Timestamp::from_unix(1_798_761_599).iso,
            "2026-12-31T23:59:59Z"
        );
    }

    #[test]
    fn capitalize_first_letter_only() {
        assert_eq!(capitalize("new TLS connection"), "New TLS connection");
    }
}
