//! Access log records, buffered per worker and written to stdout in whole lines.
//!
//! Each worker formats into its own buffer and flushes it with `write(2)` in pieces of at most
//! `PIPE_BUF` bytes that end on a line boundary, so lines from different workers never
//! interleave on a pipe and no lock is shared between workers.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use crate::{metrics::Protocol, settings::LogFormat};

/// Buffered bytes that trigger a flush before the periodic one.
const FLUSH_THRESHOLD: usize = 16 * 1024;
/// Largest single write; writes up to `PIPE_BUF` (4096 on Linux) are atomic on pipes.
const MAX_WRITE: usize = 4096;

/// The fields of one access log line.
pub struct Record<'a> {
    pub request_id: &'a str,
    pub conn_id: u64,
    pub client: IpAddr,
    pub tls: bool,
    pub protocol: Protocol,
    pub host: &'a str,
    pub method: &'a [u8],
    pub path: &'a [u8],
    pub status: u16,
    pub bytes: u64,
    pub duration: Duration,
    pub route: &'a str,
    pub upstream: Option<SocketAddr>,
}

/// One worker's access log buffer.
pub struct AccessLog {
    enabled: bool,
    format: LogFormat,
    buf: String,
}

impl AccessLog {
    pub fn new(enabled: bool, format: LogFormat) -> Self {
        Self {
            enabled,
            format,
            buf: String::with_capacity(if enabled { FLUSH_THRESHOLD * 2 } else { 0 }),
        }
    }

    pub fn record(&mut self, r: &Record<'_>) {
        if !self.enabled {
            return;
        }
        let time = humantime::format_rfc3339_millis(SystemTime::now());
        let duration_us = r.duration.as_micros();
        match self.format {
            LogFormat::Json => {
                let _ = write!(
                    self.buf,
                    "{{\"time\":\"{time}\",\"request_id\":\"{}\",\"conn_id\":{},\"client\":\"{}\",\"tls\":{},\"protocol\":\"{}\",\"host\":\"",
                    r.request_id, r.conn_id, r.client, r.tls, r.protocol.label()
                );
                push_json_escaped(&mut self.buf, r.host.as_bytes());
                self.buf.push_str("\",\"method\":\"");
                push_json_escaped(&mut self.buf, r.method);
                self.buf.push_str("\",\"path\":\"");
                push_json_escaped(&mut self.buf, r.path);
                let _ = write!(
                    self.buf,
                    "\",\"status\":{},\"bytes\":{},\"duration_us\":{duration_us},\"route\":\"",
                    r.status, r.bytes
                );
                push_json_escaped(&mut self.buf, r.route.as_bytes());
                self.buf.push_str("\",\"upstream\":");
                match r.upstream {
                    Some(addr) => {
                        let _ = write!(self.buf, "\"{addr}\"");
                    }
                    None => self.buf.push_str("null"),
                }
                self.buf.push_str("}\n");
            }
            LogFormat::Text => {
                let _ = write!(self.buf, "{time} {} \"", r.client);
                push_text(&mut self.buf, r.method);
                self.buf.push(' ');
                push_text(&mut self.buf, r.path);
                let _ = write!(
                    self.buf,
                    "\" {} {} {duration_us}us {} host=",
                    r.status,
                    r.bytes,
                    r.protocol.label()
                );
                push_text(&mut self.buf, r.host.as_bytes());
                let _ = write!(self.buf, " route={} upstream=", r.route);
                match r.upstream {
                    Some(addr) => {
                        let _ = write!(self.buf, "{addr}");
                    }
                    None => self.buf.push('-'),
                }
                let _ = writeln!(self.buf, " request_id={}", r.request_id);
            }
        }
        if self.buf.len() >= FLUSH_THRESHOLD {
            self.flush();
        }
    }

    /// Writes the buffered lines to stdout.
    // NOTE: the write is blocking; a stdout consumer that stops reading stalls the worker,
    // as with nginx's access log on a full pipe.
    pub fn flush(&mut self) {
        let mut rest = self.buf.as_bytes();
        while !rest.is_empty() {
            let mut end = rest.len().min(MAX_WRITE);
            if end < rest.len() {
                // Cut after the last complete line inside the limit.
                if let Some(pos) = rest[..end].iter().rposition(|&b| b == b'\n') {
                    end = pos + 1;
                }
            }
            match write_stdout(&rest[..end]) {
                Ok(0) | Err(_) => break,
                Ok(n) => rest = &rest[n..],
            }
        }
        self.buf.clear();
    }
}

fn write_stdout(bytes: &[u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: fd 1 stays open for the life of the process; `bytes` is a valid slice for
        // the duration of the call.
        let n = unsafe { libc::write(1, bytes.as_ptr().cast(), bytes.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Appends `bytes` as the inside of a JSON string: quotes, backslashes, control characters
/// and non-ASCII bytes are escaped, so client-supplied text cannot break the line.
fn push_json_escaped(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
    }
}

/// Appends `bytes` with anything outside printable ASCII (and the double quote) hex-escaped.
fn push_text(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if (0x21..=0x7e).contains(&b) && b != b'"' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{:02x}", b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escaping_of_client_text() {
        let mut out = String::new();
        push_json_escaped(&mut out, b"/a\"b\\c\n\xff");
        assert_eq!(out, "/a\\\"b\\\\c\\u000a\\u00ff");
    }

    #[test]
    fn json_record_is_one_valid_line() {
        let mut log = AccessLog::new(true, LogFormat::Json);
        log.record(&Record {
            request_id: "00ab",
            conn_id: 7,
            client: "127.0.0.1".parse().unwrap(),
            tls: true,
            protocol: Protocol::Http2,
            host: "a.test",
            method: b"GET",
            path: b"/x?\"y\"",
            status: 200,
            bytes: 5,
            duration: Duration::from_micros(1500),
            route: "app",
            upstream: Some("127.0.0.1:3000".parse().unwrap()),
        });
        assert_eq!(log.buf.matches('\n').count(), 1);
        let value: serde_json::Value = serde_json::from_str(log.buf.trim_end()).unwrap();
        assert_eq!(value["path"], "/x?\"y\"");
        assert_eq!(value["status"], 200);
        assert_eq!(value["protocol"], "h2");
        assert_eq!(value["duration_us"], 1500);
        assert_eq!(value["upstream"], "127.0.0.1:3000");
    }
}
