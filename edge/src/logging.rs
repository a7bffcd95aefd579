//! Installs the tracing subscriber: JSON or text on stderr, level from `EDGE_LOG`.

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// Environment variable holding the log filter (for example `info` or `edge=debug`).
pub const LOG_FILTER_ENV: &str = "EDGE_LOG";

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env(LOG_FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_thread_names(true)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}
