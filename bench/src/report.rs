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
        if results.settings.selects(scenario) {
            render_closed_loop(&mut out, results, scenario);
        }
    }
    if results.settings.selects(Scenario::FixedRate) {
        render_fixed_rate(&mut out, results);
    }
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
            "scenarios".to_owned(),
            if settings.scenarios.is_empty() {
                "all".to_owned()
            } else {
                let labels: Vec<&str> = settings.scenarios.iter().map(|s| s.label()).collect();
                format!("only {} (--scenarios)", labels.join(", "))
            },
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
             (h2 only in the HTTP/2 scenario, h3 over QUIC with quinn in the HTTP/3 scenario), \
             session resumption off, certificate chain not validated"
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
        Scenario::Http3 => format!(
            "{} QUIC connections × {} streams",
            results.settings.h3_connections, results.settings.h3_streams
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
    let skipped: Vec<String> = results
        .targets
        .iter()
        .filter(|t| t.skipped.is_none())
        .filter_map(|t| {
            let reason = match scenario {
                Scenario::TlsHttp2 => t.h2_skipped.as_ref(),
                Scenario::Http3 => t.h3_skipped.as_ref(),
                _ => None,
            }?;
            Some(format!("- {} not measured: {reason}\n", t.name))
        })
        .collect();
    if rows.is_empty() {
        out.push_str("Not measured.\n\n");
        out.push_str(&skipped.concat());
        if !skipped.is_empty() {
            out.push('\n');
        }
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
    if !skipped.is_empty() {
        out.push('\n');
        out.push_str(&skipped.concat());
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
         delays the requests queued behind it, while the load generator's own lag is not \
         charged to the target. {} `uncorrected p99` counts from the actual send. `added p99` \
         is the target's p99 minus the direct path's p99. `send lag` is how late requests \
         actually left. Far above 1 ms, the connections fell behind the schedule. `client CPU \
         busy` is the share of the client CPUs that the load generator and the backend used. \
         Near 100 %, queueing on the client adds to every latency. `errors` include requests \
         still unsent at the end.\n",
        settings.fixed_rate_basis,
        pacing_sentence(settings.pacer_resolution_us, settings.fixed_rate_per_s)
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
            "client CPU busy",
            "errors",
        ],
        &rows,
    ));
    out.push('\n');
}

/// Describes how the load generator spaced the requests of the fixed-rate scenario.
fn pacing_sentence(resolution_us: Option<u64>, rate_per_s: f64) -> String {
    let Some(us) = resolution_us else {
        return "The load generator's timer had millisecond resolution, so requests left in \
                bursts at millisecond ticks."
            .to_owned();
    };
    let group = rate_per_s * us as f64 / 1e6;
    if group > 1.0 {
        format!(
            "The load generator's pacer wakes at most every {us} µs (`--pacer-resolution`) and \
             then releases every request that is due, so requests leave in groups of about \
             {group:.1}."
        )
    } else {
        "The load generator releases each request at its due time with a timerfd, so requests \
         leave spread out, not in bursts."
            .to_owned()
    }
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

/// A goal of the edge: a bound on a value computed from one run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Goal {
    /// The value must be at least this.
    AtLeast(f64),
    /// The value must be below this.
    Below(f64),
}

impl Goal {
    fn is_met(self, value: f64) -> bool {
        match self {
            Self::AtLeast(bound) => value >= bound,
            Self::Below(bound) => value < bound,
        }
    }

    /// Describes the goal with `unit` after the bound, except for the ratio sign `×`.
    fn describe(self, unit: &str) -> String {
        let unit = if unit == "×" { "" } else { unit };
        match self {
            Self::AtLeast(bound) => format!("≥ {bound}{unit}"),
            Self::Below(bound) => format!("< {bound}{unit}"),
        }
    }
}

/// Outcome of one check.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Met,
    Missed,
    /// A value the check needs is missing from the run; the reason names it.
    NotMeasured(String),
    /// The value was measured under conditions other than the goal's; the reason describes them.
    NotComparable(String),
}

/// One of the edge's goals, checked against the medians of one run.
#[derive(Debug, Clone, PartialEq)]
struct Check {
    name: String,
    goal: Goal,
    measured: Option<f64>,
    unit: &'static str,
    verdict: Verdict,
}

impl Check {
    /// Checks `measured` against `goal`; an `Err` is the reason it is missing.
    fn new(name: String, goal: Goal, unit: &'static str, measured: Result<f64, String>) -> Self {
        match measured {
            Ok(value) => Self {
                name,
                goal,
                measured: Some(value),
                unit,
                verdict: if goal.is_met(value) {
                    Verdict::Met
                } else {
                    Verdict::Missed
                },
            },
            Err(reason) => Self {
                name,
                goal,
                measured: None,
                unit,
                verdict: Verdict::NotMeasured(reason),
            },
        }
    }
}

fn render_targets(out: &mut String, results: &RunResults) {
    out.push_str("## The edge against its targets\n\n");
    out.push_str(
        "Ratios of medians from this run only, on this machine. A short or noisy run can flip \
         a verdict, so trust a full run on a quiet machine. CPU per request is the proxy's CPU \
         time divided by its responses. The added latency is the edge's p99 minus the direct \
         path's p99 in the fixed-rate scenario, which counts only when that rate is half of \
         nginx's closed-loop rate.\n\n",
    );
    let checks = edge_checks(results);
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|check| {
            let measured = check
                .measured
                .map_or_else(|| "–".to_owned(), |v| measured_text(v, check.unit));
            let verdict = match &check.verdict {
                Verdict::Met => "yes".to_owned(),
                Verdict::Missed => "no".to_owned(),
                Verdict::NotMeasured(reason) => format!("not measured: {reason}"),
                Verdict::NotComparable(reason) => format!("no verdict: {reason}"),
            };
            vec![
                check.name.clone(),
                check.goal.describe(check.unit),
                measured,
                verdict,
            ]
        })
        .collect();
    out.push_str(&render_table(&["check", "goal", "measured", "met"], &rows));
    let _ = writeln!(out, "\n{}\n", summarize(&checks));
}

/// Counts the verdicts, for example `3 of 14 checks met, 9 missed, 2 without a verdict.`
fn summarize(checks: &[Check]) -> String {
    let met = checks.iter().filter(|c| c.verdict == Verdict::Met).count();
    let missed = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Missed)
        .count();
    let open = checks.len() - met - missed;
    format!(
        "{met} of {} checks met, {missed} missed, {open} without a verdict.",
        checks.len()
    )
}

/// Computes the edge's goals from the medians of one run: ratios against nginx, Traefik and
/// the direct path, the added p99 latency, and the memory per idle TLS connection.
fn edge_checks(results: &RunResults) -> Vec<Check> {
    let edge = ProxyKind::Edge.name();
    let nginx = ProxyKind::Nginx.name();
    let traefik = ProxyKind::Traefik.name();
    let median = |scenario: Scenario,
                  target: &str,
                  what: &str,
                  f: fn(&Aggregate) -> Option<f64>|
     -> Result<f64, String> {
        results
            .aggregate(scenario, target)
            .and_then(|a| f(&a))
            .ok_or_else(|| format!("no {what} of {target} in {scenario}"))
    };
    let cpu = |a: &Aggregate| a.cpu_us_per_request.map(|s| s.median);
    let rps = |a: &Aggregate| Some(a.requests_per_s.median);
    let p99 = |a: &Aggregate| Some(a.p99_us.median);
    let ratio = |num: Result<f64, String>, den: Result<f64, String>, den_name: &str| {
        let (num, den) = (num?, den?);
        if den > 0.0 {
            Ok(num / den)
        } else {
            Err(format!("{den_name}'s value is 0"))
        }
    };

    let mut checks = Vec::new();
    for scenario in [
        Scenario::KeepAlive,
        Scenario::TlsKeepAlive,
        Scenario::TlsHttp2,
    ] {
        let edge_cpu = median(scenario, edge, "CPU per request", cpu);
        for (anchor, label, bound) in [(nginx, "nginx", 2.0), (traefik, "Traefik", 4.0)] {
            checks.push(Check::new(
                format!("CPU per request, {scenario}: {label} / edge"),
                Goal::AtLeast(bound),
                "×",
                ratio(
                    median(scenario, anchor, "CPU per request", cpu),
                    edge_cpu.clone(),
                    edge,
                ),
            ));
        }
    }
    checks.push(Check::new(
        "requests/s, HTTP/1.1 keep-alive: edge / nginx".to_owned(),
        Goal::AtLeast(1.3),
        "×",
        ratio(
            median(Scenario::KeepAlive, edge, "requests/s", rps),
            median(Scenario::KeepAlive, nginx, "requests/s", rps),
            nginx,
        ),
    ));
    checks.push(Check::new(
        "requests/s, HTTP/1.1 keep-alive: edge / direct".to_owned(),
        Goal::AtLeast(0.8),
        "×",
        ratio(
            median(Scenario::KeepAlive, edge, "requests/s", rps),
            median(Scenario::KeepAlive, DIRECT, "requests/s", rps),
            DIRECT,
        ),
    ));
    checks.push(Check::new(
        "new TLS handshakes/s: edge / nginx".to_owned(),
        Goal::AtLeast(1.2),
        "×",
        ratio(
            median(Scenario::TlsHandshake, edge, "requests/s", rps),
            median(Scenario::TlsHandshake, nginx, "requests/s", rps),
            nginx,
        ),
    ));
    checks.push(added_latency_check(results, |target| {
        median(Scenario::FixedRate, target, "p99", p99)
    }));
    let edge_idle = results
        .targets
        .iter()
        .find(|t| t.name == edge)
        .and_then(|t| t.idle_tls.as_ref())
        .and_then(|m| m.kib_per_connection)
        .ok_or_else(|| "no idle TLS connections held by edge".to_owned());
    checks.push(Check::new(
        "RSS per idle keep-alive TLS connection, edge".to_owned(),
        Goal::Below(16.0),
        " KiB",
        edge_idle,
    ));
    checks
}

/// Formats a check's measured value: microseconds as whole numbers with grouped digits, as
/// in the latency tables, and ratios and sizes with two decimals.
fn measured_text(value: f64, unit: &str) -> String {
    if unit == " µs" {
        format!("{}{unit}", thousands(value))
    } else {
        format!("{value:.2}{unit}")
    }
}

/// Checks the edge's p99 minus the direct path's p99 at the fixed rate. The goal is set at half
/// of nginx's maximum rate, so a rate chosen otherwise gets no verdict.
fn added_latency_check(results: &RunResults, p99: impl Fn(&str) -> Result<f64, String>) -> Check {
    let added = p99(ProxyKind::Edge.name()).and_then(|edge| Ok(edge - p99(DIRECT)?));
    let mut check = Check::new(
        "p99 added latency at half of nginx's rate: edge − direct".to_owned(),
        Goal::Below(150.0),
        " µs",
        added,
    );
    let from_nginx = results.settings.fixed_rate_from.as_deref() == Some(ProxyKind::Nginx.name());
    if check.measured.is_some() && !from_nginx {
        check.verdict = Verdict::NotComparable(format!(
            "the rate was not half of nginx's but {}",
            results.settings.fixed_rate_basis
        ));
    }
    check
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
        if let Some(reason) = &target.h3_skipped {
            lines.push(format!(
                "- {} skipped {}: {reason}",
                target.name,
                Scenario::Http3
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
    use crate::results::TargetInfo;

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
            results::{Cell, HostInfo, Settings},
            stats::LatencySummary,
        };
        let target = |name: &str| TargetInfo {
            name: name.to_owned(),
            version: "1.0".to_owned(),
            program: format!("/usr/bin/{name}"),
            idle_rss_kib: Some(2048),
            skipped: None,
            h2_skipped: None,
            h3_skipped: None,
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
                h3_connections: 4,
                h3_streams: 16,
                fixed_rate_per_s: 1000.0,
                fixed_rate_basis: "set with --fixed-rate".to_owned(),
                fixed_rate_from: None,
                pacer_resolution_us: Some(0),
                scenarios: Vec::new(),
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

    /// Adds a round of `target` in `scenario` to `results`, copied from the first cell.
    fn add_cell(
        results: &mut RunResults,
        scenario: Scenario,
        target: &str,
        requests_per_s: f64,
        cpu_us: Option<f64>,
        p99_us: u64,
    ) {
        let mut cell = results.cells[0].clone();
        cell.scenario = scenario;
        cell.target = target.to_owned();
        cell.load.requests_per_s = requests_per_s;
        cell.load.latency_us.p99_us = p99_us;
        cell.proxy_cpu_us_per_request = cpu_us;
        results.cells.push(cell);
    }

    fn check<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name:?} in {checks:?}"))
    }

    #[test]
    fn checks_cpu_ratios_per_scenario() {
        let mut results = sample_results();
        add_cell(
            &mut results,
            Scenario::TlsHttp2,
            "edge",
            9e4,
            Some(10.0),
            900,
        );
        add_cell(
            &mut results,
            Scenario::TlsHttp2,
            "nginx",
            6e4,
            Some(18.0),
            900,
        );
        results.targets.push(TargetInfo {
            name: "traefik".to_owned(),
            ..results.targets[1].clone()
        });
        add_cell(
            &mut results,
            Scenario::TlsHttp2,
            "traefik",
            1e4,
            Some(45.0),
            900,
        );
        let checks = edge_checks(&results);

        let h2_nginx = check(&checks, "CPU per request, HTTPS HTTP/2: nginx / edge");
        assert_eq!(h2_nginx.measured, Some(1.8));
        assert_eq!(h2_nginx.verdict, Verdict::Missed);
        let h2_traefik = check(&checks, "CPU per request, HTTPS HTTP/2: Traefik / edge");
        assert_eq!(h2_traefik.measured, Some(4.5));
        assert_eq!(h2_traefik.verdict, Verdict::Met);
        let h1_traefik = check(
            &checks,
            "CPU per request, HTTP/1.1 keep-alive: Traefik / edge",
        );
        assert_eq!(
            h1_traefik.verdict,
            Verdict::NotMeasured("no CPU per request of traefik in HTTP/1.1 keep-alive".to_owned())
        );
        let tls_nginx = check(&checks, "CPU per request, HTTPS keep-alive: nginx / edge");
        assert_eq!(tls_nginx.measured, None);
    }

    #[test]
    fn checks_rates_against_nginx_and_direct() {
        let mut results = sample_results();
        add_cell(
            &mut results,
            Scenario::TlsHandshake,
            "edge",
            3000.0,
            Some(240.0),
            4000,
        );
        add_cell(
            &mut results,
            Scenario::TlsHandshake,
            "nginx",
            2400.0,
            Some(400.0),
            4000,
        );
        let checks = edge_checks(&results);

        // Keep-alive medians: edge 42,000, nginx 30,000, direct 80,000 requests/s.
        let nginx = check(&checks, "requests/s, HTTP/1.1 keep-alive: edge / nginx");
        assert_eq!(nginx.measured, Some(1.4));
        assert_eq!(nginx.verdict, Verdict::Met);
        let direct = check(&checks, "requests/s, HTTP/1.1 keep-alive: edge / direct");
        assert_eq!(direct.measured, Some(0.525));
        assert_eq!(direct.verdict, Verdict::Missed);
        let handshakes = check(&checks, "new TLS handshakes/s: edge / nginx");
        assert_eq!(handshakes.measured, Some(1.25));
        assert_eq!(handshakes.verdict, Verdict::Met);
    }

    #[test]
    fn ratio_with_zero_denominator_is_not_measured() {
        let mut results = sample_results();
        for cell in &mut results.cells {
            if cell.target == "nginx" {
                cell.load.requests_per_s = 0.0;
            }
        }
        let checks = edge_checks(&results);
        let nginx = check(&checks, "requests/s, HTTP/1.1 keep-alive: edge / nginx");
        assert_eq!(
            nginx.verdict,
            Verdict::NotMeasured("nginx's value is 0".to_owned())
        );
    }

    const ADDED_LATENCY: &str = "p99 added latency at half of nginx's rate: edge − direct";

    #[test]
    fn added_latency_needs_nginx_based_rate() {
        let mut results = sample_results();
        add_cell(
            &mut results,
            Scenario::FixedRate,
            "edge",
            1.5e4,
            Some(12.0),
            1100,
        );
        add_cell(&mut results, Scenario::FixedRate, DIRECT, 1.5e4, None, 1000);

        results.settings.fixed_rate_from = Some("nginx".to_owned());
        let added = check(&edge_checks(&results), ADDED_LATENCY).clone();
        assert_eq!(added.measured, Some(100.0));
        assert_eq!(added.verdict, Verdict::Met);

        results.cells.last_mut().unwrap().load.latency_us.p99_us = 900;
        let added = check(&edge_checks(&results), ADDED_LATENCY).clone();
        assert_eq!(added.measured, Some(200.0));
        assert_eq!(added.verdict, Verdict::Missed);

        results.settings.fixed_rate_from = Some("edge".to_owned());
        results.settings.fixed_rate_basis = "half of edge's median".to_owned();
        let added = check(&edge_checks(&results), ADDED_LATENCY).clone();
        assert_eq!(added.measured, Some(200.0));
        assert_eq!(
            added.verdict,
            Verdict::NotComparable(
                "the rate was not half of nginx's but half of edge's median".to_owned()
            )
        );
    }

    #[test]
    fn added_latency_without_direct_is_not_measured() {
        let mut results = sample_results();
        results.settings.fixed_rate_from = Some("nginx".to_owned());
        add_cell(
            &mut results,
            Scenario::FixedRate,
            "edge",
            1.5e4,
            Some(12.0),
            1100,
        );
        let added = check(&edge_checks(&results), ADDED_LATENCY).clone();
        assert_eq!(
            added.verdict,
            Verdict::NotMeasured("no p99 of direct in HTTP/1.1 fixed rate".to_owned())
        );
    }

    #[test]
    fn checks_idle_tls_memory_below_16_kib() {
        let mut results = sample_results();
        let name = "RSS per idle keep-alive TLS connection, edge";
        assert_eq!(
            check(&edge_checks(&results), name).verdict,
            Verdict::NotMeasured("no idle TLS connections held by edge".to_owned())
        );
        for (kib, verdict) in [(15.9, Verdict::Met), (16.0, Verdict::Missed)] {
            results.targets[1].idle_tls = Some(crate::results::IdleTlsMemory {
                requested: 1000,
                opened: 1000,
                errors: BTreeMap::new(),
                rss_before_kib: 6000,
                rss_after_kib: 6000 + (kib * 1000.0) as u64,
                kib_per_connection: Some(kib),
            });
            let idle = check(&edge_checks(&results), name).clone();
            assert_eq!(idle.measured, Some(kib));
            assert_eq!(idle.verdict, verdict, "{kib} KiB");
        }
    }

    #[test]
    fn summary_counts_verdicts() {
        let checks = edge_checks(&sample_results());
        // Measured in the sample: CPU nginx / edge on HTTP/1.1, edge / nginx and edge / direct.
        assert_eq!(checks.len(), 11);
        assert_eq!(
            summarize(&checks),
            "2 of 11 checks met, 1 missed, 8 without a verdict."
        );
    }

    #[test]
    fn markdown_lists_http3_skips_under_its_table() {
        let mut results = sample_results();
        results.targets[2].h3_skipped = Some("nginx 1.22 has no HTTP/3".to_owned());
        add_cell(&mut results, Scenario::Http3, "edge", 2e4, Some(40.0), 3000);
        let markdown = render_markdown(
            &results,
            &PlotFiles {
                latency: "l.svg",
                throughput: "t.svg",
            },
        );
        let section = markdown
            .split("## HTTP/3, closed loop, 4 QUIC connections × 16 streams\n")
            .nth(1)
            .unwrap_or_else(|| panic!("no HTTP/3 section in {markdown}"));
        let section = section.split("\n## ").next().unwrap();
        assert!(section.contains("| edge | 20,000 |"), "{section}");
        assert!(
            section.contains("- nginx not measured: nginx 1.22 has no HTTP/3"),
            "{section}"
        );
        assert!(
            markdown.contains("- nginx skipped HTTP/3: nginx 1.22 has no HTTP/3"),
            "{markdown}"
        );
    }

    #[test]
    fn markdown_omits_unselected_scenarios() {
        let mut results = sample_results();
        results.settings.scenarios = vec![Scenario::KeepAlive];
        let markdown = render_markdown(
            &results,
            &PlotFiles {
                latency: "l.svg",
                throughput: "t.svg",
            },
        );
        assert!(
            markdown.contains("## HTTP/1.1 keep-alive, closed loop"),
            "{markdown}"
        );
        assert!(!markdown.contains("## HTTP/3"), "{markdown}");
        assert!(!markdown.contains("open loop"), "{markdown}");
        assert!(
            markdown.contains("| RSS per idle keep-alive TLS connection, edge | < 16 KiB | – |"),
            "{markdown}"
        );
    }

    #[test]
    fn measured_text_groups_microseconds() {
        assert_eq!(measured_text(2447.0, " µs"), "2,447 µs");
        assert_eq!(measured_text(12.214, " KiB"), "12.21 KiB");
        assert_eq!(measured_text(1.5, "×"), "1.50×");
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

    #[test]
    fn pacing_sentence_names_the_timer() {
        assert!(pacing_sentence(None, 30_000.0).contains("millisecond resolution"));
        assert!(pacing_sentence(Some(0), 30_000.0).contains("at its due time"));
        // 100 µs at 1,000 requests/s is shorter than the 1 ms between requests.
        assert!(pacing_sentence(Some(100), 1000.0).contains("at its due time"));
        let grouped = pacing_sentence(Some(100), 30_000.0);
        assert!(grouped.contains("every 100 µs"), "{grouped}");
        assert!(grouped.contains("groups of about 3.0"), "{grouped}");
    }
}
