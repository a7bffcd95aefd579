//! Flood defences the h2 crate does not provide: a meter of the frames a client sends, read
//! off the byte stream before h2 decodes it, and an IO wrapper that applies it.
//!
//! h2 0.4 already bounds CONTINUATION frames per header block, the decoded header list size
//! (HPACK bombs), streams reset before they are accepted and streams it resets itself. It
//! acknowledges PING and SETTINGS without limit, and a stream reset by the client after it was
//! accepted (Rapid Reset, CVE-2023-44487) costs the proxy a routed request each time. The
//! meter gives each kind of cheap frame a token bucket per connection. A client that empties
//! one is abusive, so its connection is closed with GOAWAY(ENHANCE_YOUR_CALM).

use std::{
    cell::Cell,
    future::Future,
    io,
    pin::Pin,
    rc::Rc,
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface that precedes the first frame (RFC 9113 section 3.4).
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
/// How long a client's remaining bytes are read and discarded after GOAWAY, before the socket
/// is closed.
const LINGER: Duration = Duration::from_secs(1);

const TYPE_DATA: u8 = 0x0;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_PRIORITY: u8 = 0x2;
const TYPE_RST_STREAM: u8 = 0x3;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_PING: u8 = 0x6;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;

/// A kind of frame that costs the server more than the client, with its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    /// RST_STREAM frames: Rapid Reset and reset floods.
    Reset,
    /// PING frames that need an acknowledgement.
    Ping,
    /// SETTINGS frames that need an acknowledgement.
    Settings,
    /// PRIORITY frames, which carry no request.
    Priority,
    /// Frames that carry nothing: empty DATA without END_STREAM and empty HEADERS or
    /// CONTINUATION fragments (a zero-length CONTINUATION flood).
    Empty,
}

impl Flood {
    /// Short name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Flood::Reset => "rst_stream",
            Flood::Ping => "ping",
            Flood::Settings => "settings",
            Flood::Priority => "priority",
            Flood::Empty => "empty_frames",
        }
    }

    /// Burst size and refill rate per second. A browser or gRPC client stays far below
    /// these; an attacker that needs thousands of frames per second to hurt does not.
    fn budget(self) -> (f64, f64) {
        match self {
            Flood::Reset => (100.0, 20.0),
            Flood::Ping => (50.0, 10.0),
            Flood::Settings => (20.0, 2.0),
            Flood::Priority => (200.0, 50.0),
            Flood::Empty => (100.0, 20.0),
        }
    }

    const ALL: [Flood; 5] = [
        Flood::Reset,
        Flood::Ping,
        Flood::Settings,
        Flood::Priority,
        Flood::Empty,
    ];
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The meter's position in the incoming byte stream.
#[derive(Debug, Clone, Copy)]
enum Position {
    Preface { remaining: usize },
    Header { filled: usize },
    Payload { remaining: usize },
}

/// Sans-IO meter of incoming frames. Feed it every byte the client sends, in order.
#[derive(Debug)]
pub struct FrameMeter {
    position: Position,
    header: [u8; FRAME_HEADER_LEN],
    buckets: [Bucket; 5],
}

impl FrameMeter {
    pub fn new(now: Instant) -> Self {
        Self {
            position: Position::Preface {
                remaining: PREFACE_LEN,
            },
            header: [0; FRAME_HEADER_LEN],
            buckets: Flood::ALL.map(|flood| Bucket {
                tokens: flood.budget().0,
                updated: now,
            }),
        }
    }

    /// Accounts for `bytes` received at `now`.
    ///
    /// # Errors
    /// The kind of frame whose budget the client has exhausted.
    pub fn handle_bytes(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), Flood> {
        while !bytes.is_empty() {
            match self.position {
                Position::Preface { remaining } => {
                    let take = remaining.min(bytes.len());
                    bytes = &bytes[take..];
                    self.position = if remaining == take {
                        Position::Header { filled: 0 }
                    } else {
                        Position::Preface {
                            remaining: remaining - take,
                        }
                    };
                }
                Position::Header { filled } => {
                    let take = (FRAME_HEADER_LEN - filled).min(bytes.len());
                    self.header[filled..filled + take].copy_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if filled + take < FRAME_HEADER_LEN {
                        self.position = Position::Header {
                            filled: filled + take,
                        };
                        continue;
                    }
                    let length = usize::from(self.header[0]) << 16
                        | usize::from(self.header[1]) << 8
                        | usize::from(self.header[2]);
                    if let Some(flood) = classify(self.header[3], self.header[4], length) {
                        self.spend(flood, now)?;
                    }
                    self.position = if length == 0 {
                        Position::Header { filled: 0 }
                    } else {
                        Position::Payload { remaining: length }
                    };
                }
                Position::Payload { remaining } => {
                    let take = remaining.min(bytes.len());
                    bytes = &bytes[take..];
                    self.position = if remaining == take {
                        Position::Header { filled: 0 }
                    } else {
                        Position::Payload {
                            remaining: remaining - take,
                        }
                    };
                }
            }
        }
        Ok(())
    }

    fn spend(&mut self, flood: Flood, now: Instant) -> Result<(), Flood> {
        let (burst, rate) = flood.budget();
        let bucket = &mut self.buckets[flood as usize];
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.updated = now;
        if bucket.tokens < 1.0 {
            return Err(flood);
        }
        bucket.tokens -= 1.0;
        Ok(())
    }
}

/// Returns the budget a frame draws on, if any.
fn classify(kind: u8, flags: u8, length: usize) -> Option<Flood> {
    match kind {
        TYPE_RST_STREAM => Some(Flood::Reset),
        TYPE_PING if flags & FLAG_ACK == 0 => Some(Flood::Ping),
        TYPE_SETTINGS if flags & FLAG_ACK == 0 => Some(Flood::Settings),
        TYPE_PRIORITY => Some(Flood::Priority),
        TYPE_DATA if length == 0 && flags & FLAG_END_STREAM == 0 => Some(Flood::Empty),
        TYPE_HEADERS | TYPE_CONTINUATION if length == 0 => Some(Flood::Empty),
        // NOTE: WINDOW_UPDATE is not metered: a client that downloads sends one per few DATA
        // frames, and h2 rejects an increment of 0 as a protocol error.
        _ => None,
    }
}

/// The verdict of a [`FrameGuard`], shared with the connection task.
pub type Verdict = Rc<Cell<Option<Flood>>>;

/// An IO wrapper that meters what the client sends. Once the client is found abusive, reads
/// stay pending, so h2 processes nothing more from it while the connection task sends GOAWAY
/// and closes.
///
/// Closing a socket that still has unread bytes makes the kernel send a TCP reset, and a reset
/// can destroy the GOAWAY before the client reads it. So after shutting down its write side,
/// the guard reads and discards until the client closes, for up to [`LINGER`] (a lingering
/// close, as nginx does). This matters most for a flooding client, whose GOAWAY carries the reason.
pub struct FrameGuard<T> {
    io: T,
    meter: FrameMeter,
    verdict: Verdict,
    write_shut: bool,
    linger: Option<Pin<Box<monoio::time::Sleep>>>,
}

impl<T> FrameGuard<T> {
    pub fn new(io: T, verdict: Verdict) -> Self {
        Self {
            io,
            meter: FrameMeter::new(Instant::now()),
            verdict,
            write_shut: false,
            linger: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FrameGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.verdict.get().is_some() {
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let received = &buf.filled()[before..];
            if let Err(flood) = this.meter.handle_bytes(received, Instant::now()) {
                this.verdict.set(Some(flood));
                // Drop what was read: nothing from an abusive client reaches h2.
                buf.set_filled(before);
                return Poll::Pending;
            }
        }
        poll
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FrameGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_shut {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.write_shut = true;
        }
        let linger = this
            .linger
            .get_or_insert_with(|| Box::pin(monoio::time::sleep(LINGER)));
        if linger.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        let mut scratch = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn preface() -> Vec<u8> {
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
    }

    #[test]
    fn reset_flood_exhausts_budget() {
        let now = Instant::now();
        let mut meter = FrameMeter::new(now);
        meter.handle_bytes(&preface(), now).unwrap();
        let rst = frame(TYPE_RST_STREAM, 0, &8u32.to_be_bytes());
        let mut result = Ok(());
        for _ in 0..101 {
            result = meter.handle_bytes(&rst, now);
        }
        assert_eq!(result, Err(Flood::Reset));
    }

    #[test]
    fn budget_refills_over_time() {
        let start = Instant::now();
        let mut meter = FrameMeter::new(start);
        let ping = frame(TYPE_PING, 0, &[0; 8]);
        let mut stream = preface();
        for _ in 0..50 {
            stream.extend_from_slice(&ping);
        }
        meter.handle_bytes(&stream, start).unwrap();
        assert_eq!(meter.handle_bytes(&ping, start), Err(Flood::Ping));
        let later = start + Duration::from_secs(1);
        assert_eq!(meter.handle_bytes(&ping, later), Ok(()));
    }

    #[test]
    fn frames_split_across_reads() {
        let now = Instant::now();
        let mut meter = FrameMeter::new(now);
        let mut stream = preface();
        // A large DATA frame whose payload must be skipped, not read as frame headers.
        stream.extend_from_slice(&frame(TYPE_DATA, 0, &[TYPE_RST_STREAM; 5000]));
        for _ in 0..30 {
            stream.extend_from_slice(&frame(TYPE_CONTINUATION, 0, &[]));
        }
        let mut result = Ok(());
        for piece in stream.chunks(7) {
            result = result.and(meter.handle_bytes(piece, now));
        }
        assert_eq!(result, Ok(()));
        for _ in 0..70 {
            result = result.and(meter.handle_bytes(&frame(TYPE_CONTINUATION, 0, &[]), now));
        }
        assert_eq!(result, Ok(()));
        let extra = meter.handle_bytes(&frame(TYPE_CONTINUATION, 0, &[]), now);
        assert_eq!(extra, Err(Flood::Empty));
    }

    #[test]
    fn acks_are_free() {
        let now = Instant::now();
        let mut meter = FrameMeter::new(now);
        meter.handle_bytes(&preface(), now).unwrap();
        for _ in 0..1000 {
            meter
                .handle_bytes(&frame(TYPE_SETTINGS, FLAG_ACK, &[]), now)
                .unwrap();
            meter
                .handle_bytes(&frame(TYPE_PING, FLAG_ACK, &[0; 8]), now)
                .unwrap();
        }
    }
}
