//! `edgectl`: the operator's command line for the agent's control socket.
#![forbid(unsafe_code)]

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use edge_agent::ctl::{CtlRequest, CtlResponse, CONTROL_SOCKET_FILE};
use serde_json::Value;

/// Inspect and steer the edge agent through its control socket.
#[derive(Debug, Parser)]
#[command(
    name = "edgectl",
    version,
    about = "Inspect and steer the edge agent through its control socket"
)]
struct Cli {
    /// The agent's control socket [default: $EDGE_STATE_DIR/agent.sock, else /var/lib/edge/agent.sock].
    #[arg(long, env = "EDGE_AGENT_SOCKET")]
    socket: Option<PathBuf>,
    /// Print the raw JSON response instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Versions, snapshot version, Docker and edge connection, counts.
    Status,
    /// Routers the agent built, with their rules and services.
    Routes,
    /// Backends with their state, health and last probe result.
    Backends,
    /// Label problems and conflicts, by container.
    Errors,
    /// Stop new requests to a backend (container name, id prefix or IP:PORT).
    Drain { backend: String },
    /// Return a drained backend to service.
    Undrain { backend: String },
    /// Re-read the routes file and push a fresh snapshot.
    Reload,
    /// Drop all traffic from an address or CIDR in the XDP filter.
    Block {
        /// Address or CIDR, for example 192.0.2.7 or 2001:db8::/32.
        cidr: String,
        /// Lift the block after this long (for example 10m, 1h); default: until unblocked.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Remove the block of exactly this address or CIDR.
    Unblock { cidr: String },
    /// List the blocked networks with the time left on each.
    Blocked,
    /// ACME certificates: names, issuer, expiry, status, last error and next retry.
    Certs,
    /// Order the certificate for a name now, ignoring the backoff (after fixing DNS, say).
    RetryCert { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli.socket.clone().unwrap_or_else(|| {
        std::env::var_os("EDGE_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/edge"))
            .join(CONTROL_SOCKET_FILE)
    });
    let request = match &cli.command {
        Command::Status => CtlRequest::Status,
        Command::Routes => CtlRequest::Routes,
        Command::Backends => CtlRequest::Backends,
        Command::Errors => CtlRequest::Errors,
        Command::Drain { backend } => CtlRequest::Drain {
            backend: backend.clone(),
        },
        Command::Undrain { backend } => CtlRequest::Undrain {
            backend: backend.clone(),
        },
        Command::Reload => CtlRequest::Reload,
        Command::Block { cidr, ttl } => CtlRequest::Block {
            cidr: cidr.clone(),
            ttl_ms: ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        },
        Command::Unblock { cidr } => CtlRequest::Unblock { cidr: cidr.clone() },
        Command::Blocked => CtlRequest::Blocked,
        Command::Certs => CtlRequest::Certs,
        Command::RetryCert { name } => CtlRequest::RetryCert { name: name.clone() },
    };
    let response = match call(&socket, &request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgectl: {e}");
            return ExitCode::from(2);
        }
    };
    if !response.ok {
        eprintln!(
            "edgectl: {}",
            response
                .error
                .as_deref()
                .unwrap_or("the agent reported an error")
        );
        return ExitCode::FAILURE;
    }
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&response.data).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    print!("{}", render(&cli.command, &response.data));
    ExitCode::SUCCESS
}

fn call(socket: &PathBuf, request: &CtlRequest) -> Result<CtlResponse, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the agent at {}: {e}; is the agent running? (set --socket or EDGE_STATE_DIR if it uses another state directory)",
            socket.display()
        )
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("sending the request failed: {e}"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("reading the answer failed: {e}"))?;
    serde_json::from_str(&reply).map_err(|e| format!("invalid answer from the agent: {e}"))
}

fn render(command: &Command, data: &Value) -> String {
    match command {
        Command::Status => render_status(data),
        Command::Routes => table(
            data,
            &["name", "rule", "service", "entrypoints", "priority", "tls"],
        ),
        Command::Backends => table(
            data,
            &[
                "service",
                "container",
                "addr",
                "state",
                "in_flight",
                "docker_health",
                "healthy",
                "last_probe_result",
            ],
        ),
        Command::Errors => {
            if data.as_array().is_some_and(Vec::is_empty) {
                "no label errors\n".to_owned()
            } else {
                table(data, &["container", "key", "value", "message"])
            }
        }
        Command::Drain { .. } => list_lines("draining (no new requests):", &data["drained"]),
        Command::Undrain { .. } => list_lines("back in service:", &data["undrained"]),
        Command::Reload => "routes file reloaded\n".to_owned(),
        Command::Block { ttl, .. } => {
            let mut out = match ttl {
                Some(ttl) => format!(
                    "blocked {} for {}\n",
                    compact(&data["blocked"]),
                    humantime::format_duration(*ttl)
                ),
                None => format!("blocked {} until unblocked\n", compact(&data["blocked"])),
            };
            if !data["pending"].is_null() {
                out.push_str(&format!("note: {}\n", compact(&data["pending"])));
            }
            out
        }
        Command::Unblock { .. } => format!("unblocked {}\n", compact(&data["unblocked"])),
        Command::Blocked => {
            if data.as_array().is_some_and(Vec::is_empty) {
                "nothing is blocked\n".to_owned()
            } else {
                table(data, &["cidr", "expires_in_secs", "origin"])
            }
        }
        Command::Certs => render_certs(data),
        Command::RetryCert { .. } => list_lines("ordering now:", &data["retrying"]),
    }
}

/// Renders the certificate rows with readable times.
fn render_certs(data: &Value) -> String {
    let rows = data.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        return "no router requests a certificate from an ACME resolver\n".to_owned();
    }
    let now = std::time::SystemTime::now();
    let rows: Vec<Value> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "names": compact(&row["names"]),
                "resolver": row["resolver"],
                "issuer": row["issuer"],
                "expires": unix_time(&row["not_after_unix"], now),
                "status": row["status"],
                "next_retry": unix_time(&row["next_retry_unix"], now),
                "last_error": row["last_error"],
            })
        })
        .collect();
    table(
        &Value::Array(rows),
        &[
            "names",
            "resolver",
            "issuer",
            "expires",
            "status",
            "next_retry",
            "last_error",
        ],
    )
}

/// Formats Unix seconds as UTC time with the distance from `now`, or `-` for null.
fn unix_time(value: &Value, now: std::time::SystemTime) -> Value {
    let Some(seconds) = value.as_i64() else {
        return Value::Null;
    };
    let time = std::time::UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64);
    let distance = match time.duration_since(now) {
        Ok(ahead) => format!("in {}", short_duration(ahead)),
        Err(e) => format!("{} ago", short_duration(e.duration())),
    };
    Value::String(format!(
        "{} ({distance})",
        humantime::format_rfc3339_seconds(time)
    ))
}

/// Formats a duration in its largest whole unit: days, hours, minutes or seconds.
fn short_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86400 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86400),
    }
}

fn render_status(data: &Value) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{label:<20} {value}\n"));
    line("agent version", compact(&data["agent_version"]));
    let pushed = !data["snapshot_version"].is_null();
    line("snapshot version", compact(&data["snapshot_version"]));
    if !pushed {
        line(
            "note",
            "the agent has sent no snapshot yet (it waits until Docker has been read once); the edge serves its own routes meanwhile".to_owned(),
        );
    }
    line("acked by the edge", compact(&data["acked_version"]));
    let edge = &data["edge"];
    if edge["reachable"] == Value::Bool(true) {
        line(
            "edge",
            format!(
                "serving version {}, {} routers, {}/{} workers ready",
                compact(&edge["serving_version"]),
                compact(&edge["routers"]),
                compact(&edge["ready_workers"]),
                compact(&edge["workers"])
            ),
        );
    } else {
        line("edge", format!("unreachable: {}", compact(&edge["error"])));
    }
    if !data["edge_last_error"].is_null() {
        line("edge last error", compact(&data["edge_last_error"]));
    }
    let docker = &data["docker"];
    let docker_text = if docker["enabled"] == Value::Bool(false) {
        "disabled".to_owned()
    } else if docker["connected"] == Value::Bool(true) {
        format!(
            "connected (API {}), {} running containers",
            compact(&docker["api_version"]),
            compact(&docker["containers"])
        )
    } else {
        "not connected, retrying".to_owned()
    };
    line("docker", docker_text);
    line(
        "routes",
        format!(
            "{} routers, {} services, {}/{} backends up",
            compact(&data["routers"]),
            compact(&data["services"]),
            compact(&data["backends_up"]),
            compact(&data["backends"])
        ),
    );
    line("label errors", compact(&data["errors"]));
    let filter = &data["filter"];
    let filter_text = if filter["loaded"] == Value::Bool(true) {
        let limits = &filter["limits"];
        let drops = &filter["drops"];
        format!(
            "{} blocked; SYN {}/s (burst {}), QUIC Initial {}/s (burst {}) per source; dropped: blocked {}, SYN rate {}, QUIC rate {}, malformed {}",
            compact(&filter["blocked"]),
            compact(&limits["syn_rate"]),
            compact(&limits["syn_burst"]),
            compact(&limits["quic_rate"]),
            compact(&limits["quic_burst"]),
            compact(&drops["blocked"]),
            compact(&drops["syn_rate"]),
            compact(&drops["quic_rate"]),
            compact(&drops["malformed"]),
        )
    } else {
        format!(
            "not loaded: no pinned maps in {} (the edge has not loaded its programs, uses \
             another --bpf-pin-dir, or runs in another mount namespace)",
            filter["pin_dir"].as_str().unwrap_or("the pin directory")
        )
    };
    line("xdp filter", filter_text);
    if !data["routes_file_error"].is_null() {
        line("routes file error", compact(&data["routes_file_error"]));
    }
    out
}

/// Renders a title and one indented line per item of a JSON array.
fn list_lines(title: &str, items: &Value) -> String {
    let mut out = format!("{title}\n");
    for item in items.as_array().into_iter().flatten() {
        out.push_str(&format!("  {}\n", compact(item)));
    }
    out
}

/// Renders an array of objects as an aligned table with the given columns.
fn table(data: &Value, columns: &[&str]) -> String {
    let rows: Vec<Vec<String>> = data
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| columns.iter().map(|c| compact(&row[*c])).collect())
                .collect()
        })
        .unwrap_or_default();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Formats a JSON value for a table cell: strings without quotes, null as `-`.
fn compact(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(compact).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}
