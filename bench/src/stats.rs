//! Latency histograms and error counts of one load run, and their serializable summaries.

use std::{collections::BTreeMap, fmt, time::Duration};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency a histogram tracks exactly; larger values are recorded as this value.
const MAX_TRACKED_US: u64 = 60_000_000;

/// Percentiles written out for the latency-percentile plot.
pub const CURVE_PERCENTILES: &[f64] = &[
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
];

/// Failure kind of a request that did not produce a 2xx response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The TCP connect failed.
    Connect,
    /// The TLS handshake failed.
    TlsHandshake,
    /// No complete response within the request timeout.
    Timeout,
    /// Writing the request failed.
    Write,
    /// Reading the response failed.
    Read,
    /// The server closed the connection before the response was complete.
    ClosedEarly,
    /// The response could not be framed.
    InvalidResponse,
    /// The response status was not 2xx.
    Status(u16),
    /// HTTP/2: the server did not select `h2` in ALPN.
    NoH2,
    /// HTTP/2 or HTTP/3: the server reset the request's stream.
    StreamReset,
    /// HTTP/2 or HTTP/3: the server sent GOAWAY before the response was complete.
    GoAway,
    /// HTTP/2: any other HTTP/2 error, such as a protocol violation seen by the client.
    H2Protocol,
    /// HTTP/3: the QUIC handshake failed, for example because the server did not select `h3`
    /// in ALPN.
    QuicHandshake,
    /// HTTP/3: the QUIC connection closed or failed before the response was complete.
    QuicConnectionLost,
    /// HTTP/3: any other HTTP/3 error, such as a frame or QPACK error seen by the client.
    H3Protocol,
    /// Open loop only: the request's intended send time passed while its connection was still
    /// busy, and the run ended before it could be sent.
    NotSent,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect => f.write_str("connect"),
            Self::TlsHandshake => f.write_str("tls handshake"),
            Self::Timeout => f.write_str("timeout"),
            Self::Write => f.write_str("write"),
            Self::Read => f.write_str("read"),
            Self::ClosedEarly => f.write_str("closed early"),
            Self::InvalidResponse => f.write_str("invalid response"),
            Self::Status(code) => write!(f, "status {code}"),
            Self::NoH2 => f.write_str("alpn not h2"),
            Self::StreamReset => f.write_str("stream reset"),
            Self::GoAway => f.write_str("goaway"),
            Self::H2Protocol => f.write_str("h2 protocol"),
            Self::QuicHandshake => f.write_str("quic handshake"),
            Self::QuicConnectionLost => f.write_str("quic connection lost"),
            Self::H3Protocol => f.write_str("h3 protocol"),
            Self::NotSent => f.write_str("not sent before end"),
        }
    }
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    /// Summarizes a histogram of microsecond values.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Self {
        Self {
            count: histogram.len(),
            mean_us: histogram.mean(),
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        }
    }
}

/// Returns the latency at each of [`CURVE_PERCENTILES`] as `(percentile, microseconds)`.
pub fn percentile_curve(histogram: &Histogram<u64>) -> Vec<(f64, u64)> {
    CURVE_PERCENTILES
        .iter()
        .map(|&p| (p, histogram.value_at_quantile(p / 100.0)))
        .collect()
}

/// Creates an empty microsecond histogram with 3 significant digits from 1 µs to 60 s.
pub fn new_histogram_us() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low,
    // sigfig <= 5), so construction cannot fail.
    Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("constant histogram bounds are valid")
}

/// Results collected by the connections of one load-generator thread.
pub struct Recorder {
    /// Latency of each 2xx response; from the intended send time in open-loop runs.
    pub latency_us: Histogram<u64>,
    /// Open loop only: latency from the actual send time, without coordinated-omission
    /// correction.
    pub uncorrected_latency_us: Histogram<u64>,
    /// Open loop only: how late each request was sent compared with its intended time.
    pub send_lag_us: Histogram<u64>,
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Negotiated TLS version, cipher suite and key exchange of the first handshake.
    pub tls_session: Option<String>,
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            latency_us: new_histogram_us(),
            uncorrected_latency_us: new_histogram_us(),
            send_lag_us: new_histogram_us(),
            errors: BTreeMap::new(),
            tls_session: None,
        }
    }

    pub fn record_latency(&mut self, latency: Duration) {
        self.latency_us.saturating_record(duration_us(latency));
    }

    pub fn record_error(&mut self, kind: ErrorKind) {
        self.add_errors(kind, 1);
    }

    pub fn add_errors(&mut self, kind: ErrorKind, count: u64) {
        if count > 0 {
            *self.errors.entry(kind).or_default() += count;
        }
    }

    /// Adds the counts of `other`, a recorder of another thread of the same run.
    pub fn merge(&mut self, other: &Recorder) {
        // Both histograms come from `new_histogram_us`, so their bounds match and `add`
        // cannot fail; saturating values were clamped on record.
        let _ = self.latency_us.add(&other.latency_us);
        let _ = self
            .uncorrected_latency_us
            .add(&other.uncorrected_latency_us);
        let _ = self.send_lag_us.add(&other.send_lag_us);
        for (&kind, &count) in &other.errors {
            self.add_errors(kind, count);
        }
        if self.tls_session.is_none() {
            self.tls_session.clone_from(&other.tls_session);
        }
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Converts a duration to whole microseconds, rounding down and saturating.
pub fn duration_us(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform_1_to_1000() -> Histogram<u64> {
        let mut histogram = new_histogram_us();
        for value in 1..=1000 {
            histogram.record(value).unwrap();
        }
        histogram
    }

    #[test]
    fn summary_percentiles_of_uniform_values() {
        let summary = LatencySummary::from_histogram(&uniform_1_to_1000());
        assert_eq!(summary.count, 1000);
        assert_eq!(summary.p50_us, 500);
        assert_eq!(summary.p90_us, 900);
        assert_eq!(summary.p99_us, 990);
        assert_eq!(summary.p999_us, 999);
        assert_eq!(summary.max_us, 1000);
        assert!(
            (summary.mean_us - 500.5).abs() < 0.01,
            "{}",
            summary.mean_us
        );
    }

    #[test]
    fn curve_starts_at_min_ends_at_max() {
        let curve = percentile_curve(&uniform_1_to_1000());
        assert_eq!(curve.len(), CURVE_PERCENTILES.len());
        assert_eq!(curve.first(), Some(&(0.0, 1)));
        assert_eq!(curve.last(), Some(&(100.0, 1000)));
    }

    #[test]
    fn huge_latency_saturates_not_panics() {
        let mut recorder = Recorder::new();
        recorder.record_latency(Duration::from_secs(3600));
        assert_eq!(recorder.latency_us.len(), 1);
        assert!(recorder.latency_us.max() >= MAX_TRACKED_US);
    }

    #[test]
    fn merge_adds_histograms_and_errors() {
        let mut left = Recorder::new();
        left.record_latency(Duration::from_micros(100));
        left.record_error(ErrorKind::Status(502));
        let mut right = Recorder::new();
        right.record_latency(Duration::from_micros(300));
        right.record_error(ErrorKind::Status(502));
        right.record_error(ErrorKind::Timeout);
        right.tls_session = Some("TLSv1_3".to_owned());
        left.merge(&right);
        assert_eq!(left.latency_us.len(), 2);
        assert_eq!(left.errors.get(&ErrorKind::Status(502)), Some(&2));
        assert_eq!(left.errors.get(&ErrorKind::Timeout), Some(&1));
        assert_eq!(left.tls_session.as_deref(), Some("TLSv1_3"));
    }

    #[test]
    fn error_kind_labels_are_readable() {
        assert_eq!(ErrorKind::Status(503).to_string(), "status 503");
        assert_eq!(ErrorKind::ClosedEarly.to_string(), "closed early");
        assert_eq!(ErrorKind::NotSent.to_string(), "not sent before end");
        assert_eq!(ErrorKind::QuicHandshake.to_string(), "quic handshake");
        assert_eq!(
            ErrorKind::QuicConnectionLost.to_string(),
            "quic connection lost"
        );
    }
}
