//! The load generator: closed-loop, open-loop and new-connection-per-request runs of HTTP/1.1
//! GET requests, plain or over TLS, and closed-loop runs of HTTP/2 over TLS and of HTTP/3 over
//! QUIC with many streams per connection, on one current-thread tokio runtime per thread.
//!
//! Every run is bounded: connections stop sending at the end of the window, and a request in
//! flight then is abandoned after the request timeout.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{client::TlsStream, TlsConnector};

mod http3;
mod pacer;

use crate::{
    response::{frame_response, Framing, ResponseHead},
    schedule::{IdealQueue, Pacer, Schedule},
    stats::{duration_us, percentile_curve, ErrorKind, LatencySummary, Recorder},
    tls::SignatureCheck,
};

/// Largest response the load generator buffers.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Pause after a failed connect before the next attempt of a closed-loop connection, so that
/// a stopped server is not hammered in a tight loop.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Time between creating the runtimes and the start of the run, so every thread is ready.
const START_DELAY: Duration = Duration::from_millis(50);

/// Application protocol of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Protocol {
    /// HTTP/1.1 over plain TCP.
    #[value(name = "h1")]
    #[serde(rename = "h1")]
    Http1,
    /// HTTP/1.1 over TLS.
    #[value(name = "h1-tls")]
    #[serde(rename = "h1-tls")]
    Http1Tls,
    /// HTTP/2 over TLS (ALPN `h2`), closed loop only.
    #[value(name = "h2")]
    #[serde(rename = "h2")]
    Http2,
    /// HTTP/3 over QUIC (ALPN `h3`), closed loop only.
    #[value(name = "h3")]
    #[serde(rename = "h3")]
    Http3,
}

impl Protocol {
    /// Returns the only ALPN protocol the client offers.
    fn alpn(self) -> &'static [u8] {
        match self {
            Self::Http2 => b"h2",
            Self::Http3 => b"h3",
            Self::Http1 | Self::Http1Tls => b"http/1.1",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http1 => "HTTP/1.1",
            Self::Http1Tls => "HTTPS HTTP/1.1",
            Self::Http2 => "HTTPS HTTP/2",
            Self::Http3 => "HTTP/3",
        })
    }
}

/// Pacing of the requests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Mode {
    /// Each connection sends its next request as soon as the previous response is complete.
    Closed,
    /// Requests are due at a fixed total rate (requests per second), and latency is measured
    /// from the due time with coordinated-omission correction (see [`IdealQueue`]).
    Open { rate_per_s: f64 },
    /// Each request opens a new connection (a full TLS handshake without resumption, for TLS)
    /// and sends `Connection: close`. The connections run closed-loop.
    NewConnection,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("closed loop"),
            Self::Open { rate_per_s } => write!(f, "open loop at {rate_per_s} requests/s"),
            Self::NewConnection => f.write_str("new connection per request"),
        }
    }
}

/// Target, protocol and pacing of one run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: SocketAddr,
    /// Value of the `Host` header, and the TLS server name.
    pub host: String,
    pub path: String,
    pub protocol: Protocol,
    pub mode: Mode,
    pub connections: usize,
    /// Concurrent streams on each connection; HTTP/2 and HTTP/3 only, HTTP/1.1 uses one per
    /// connection.
    pub streams: usize,
    /// Load-generator threads, each with its own runtime. Connections are spread over them.
    pub threads: usize,
    /// Time before the measured window, whose requests are not recorded.
    pub warmup: Duration,
    /// Length of the measured window.
    pub duration: Duration,
    /// Time allowed for connect, handshake and response of one request.
    pub request_timeout: Duration,
    /// Open loop only: shortest time between two wake-ups of a thread's pacer. Requests that
    /// fall due in between leave together at the next wake-up. Zero releases every request at
    /// its own due time.
    pub pacer_resolution: Duration,
}

/// When a run starts, starts recording and stops sending.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub measure_from: Instant,
    pub end: Instant,
}

/// Results of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    pub protocol: Protocol,
    pub mode: Mode,
    pub connections: usize,
    /// Concurrent streams per connection (1 for HTTP/1.1).
    #[serde(default = "one")]
    pub streams: usize,
    pub measured_s: f64,
    /// 2xx responses to requests started (or due, in open loop) in the measured window.
    pub responses: u64,
    pub requests_per_s: f64,
    /// Failed requests in the measured window, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Whether `latency_us` counts from the due time of each request (open loop).
    pub co_corrected: bool,
    pub latency_us: LatencySummary,
    /// `(percentile, microseconds)` points of `latency_us`.
    pub latency_curve_us: Vec<(f64, u64)>,
    /// Open loop only: latency from the actual send time.
    pub uncorrected_latency_us: Option<LatencySummary>,
    /// Open loop only: delay between due time and send time.
    pub send_lag_us: Option<LatencySummary>,
    /// Negotiated TLS version, cipher suite and key exchange.
    pub tls_session: Option<String>,
}

fn one() -> usize {
    1
}

impl LoadReport {
    /// Returns the total number of failed requests.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A run in progress on its own threads.
pub struct RunningLoad {
    window: Window,
    config: LoadConfig,
    threads: Vec<JoinHandle<anyhow::Result<Recorder>>>,
}

impl RunningLoad {
    pub fn window(&self) -> Window {
        self.window
    }

    /// Waits for every thread and merges their results.
    ///
    /// # Errors
    /// Fails when a thread could not build its runtime or panicked.
    pub fn join(self) -> anyhow::Result<LoadReport> {
        let mut total = Recorder::new();
        for thread in self.threads {
            let recorder = thread
                .join()
                .map_err(|_| anyhow::anyhow!("a load-generator thread panicked"))??;
            total.merge(&recorder);
        }
        Ok(report(&self.config, self.window, &total))
    }
}

/// Starts a run on `config.threads` new threads. Setting `stop` ends it early.
///
/// # Errors
/// Fails for protocols the load generator does not speak yet, for invalid settings, and when
/// a thread cannot be spawned.
pub fn start(config: &LoadConfig, stop: Arc<AtomicBool>) -> anyhow::Result<RunningLoad> {
    match (config.protocol, config.mode) {
        (Protocol::Http1 | Protocol::Http1Tls, _)
        | (Protocol::Http2 | Protocol::Http3, Mode::Closed) => {}
        (Protocol::Http2 | Protocol::Http3, mode) => bail!(
            "{} runs closed loop only; {mode} is not supported by the load generator yet",
            config.protocol
        ),
    }
    if config.connections == 0 {
        bail!("connections must be at least 1");
    }
    if config.streams == 0 {
        bail!("streams must be at least 1");
    }
    if let Mode::Open { rate_per_s } = config.mode {
        if !(rate_per_s.is_finite() && rate_per_s > 0.0) {
            bail!(
                "open-loop rate must be a positive number of requests per second, not {rate_per_s}"
            );
        }
    }
    if config.pacer_resolution > MAX_PACER_RESOLUTION {
        bail!(
            "pacer resolution must be at most {} so that requests still leave close to their due \
             times, not {}; use microseconds, for example 50us",
            humantime::format_duration(MAX_PACER_RESOLUTION),
            humantime::format_duration(config.pacer_resolution)
        );
    }
    let (tls, quic) = client_tls(config.protocol, signature_check(config.mode), &config.host)?;
    let start = Instant::now() + START_DELAY;
    let measure_from = start + config.warmup;
    let window = Window {
        start,
        measure_from,
        end: measure_from + config.duration,
    };
    let shared = Arc::new(Shared {
        request: request_bytes(&config.host, &config.path, false),
        closing_request: request_bytes(&config.host, &config.path, true),
        h2_uri: h2_uri(&config.host, &config.path)?,
        config: config.clone(),
        window,
        tls,
        quic,
        stop,
    });

    let thread_count = config.threads.clamp(1, config.connections);
    let mut threads = Vec::with_capacity(thread_count);
    for thread_index in 0..thread_count {
        let ids: Vec<usize> = (thread_index..config.connections)
            .step_by(thread_count)
            .collect();
        let shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("load-{thread_index}"))
            .spawn(move || run_thread(&shared, &ids))
            .context("spawning a load-generator thread")?;
        threads.push(handle);
    }
    Ok(RunningLoad {
        window,
        config: config.clone(),
        threads,
    })
}

/// Runs `config` to the end and returns its report.
///
/// # Errors
/// As [`start`] and [`RunningLoad::join`].
pub fn run(config: &LoadConfig, stop: Arc<AtomicBool>) -> anyhow::Result<LoadReport> {
    start(config, stop)?.join()
}

/// Sends one GET with `Connection: close` to `target` on a new connection and returns the
/// response status, to check that a server is up and routes `host`.
///
/// # Errors
/// Fails with the kind of failure when no complete response arrives within `timeout`.
pub fn probe(
    target: SocketAddr,
    host: &str,
    protocol: Protocol,
    timeout: Duration,
) -> anyhow::Result<u16> {
    let shared = single_connection_shared(target, host, protocol, timeout)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the probe runtime")?;
    let recorder = RefCell::new(Recorder::new());
    let result = if protocol == Protocol::Http3 {
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            tokio::time::timeout(timeout, http3::probe(&shared))
                .await
                .unwrap_or(Err(ErrorKind::Timeout))
        })
    } else if protocol == Protocol::Http2 {
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let exchange = async {
                let client = h2_open(&shared, &recorder).await?;
                h2_exchange(client, &shared.h2_uri).await
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or(Err(ErrorKind::Timeout))
                .and_then(status_result)
        })
    } else {
        let mut conn = None;
        runtime.block_on(send_request(
            &shared,
            &mut conn,
            &shared.closing_request,
            &recorder,
        ))
    };
    match result {
        Ok(status) | Err(ErrorKind::Status(status)) => Ok(status),
        Err(kind) => bail!("probe of {target} failed: {kind}"),
    }
}

/// Keep-alive connections held open, idle, by a background thread until this is dropped.
pub struct IdleConnections {
    /// Connections that completed their request and are held.
    pub opened: usize,
    /// Connections that failed, by kind.
    pub errors: BTreeMap<String, u64>,
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for IdleConnections {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread, which then closes every connection.
        self.release.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens `count` keep-alive connections to `target`, at most `concurrency` at a time, sends one
/// request on each so that the server has set up its per-connection state, and keeps them
/// open and idle until the returned value is dropped.
///
/// # Errors
/// Fails for protocols other than HTTP/1.1 and when the TLS configuration or the thread
/// cannot be set up. Connections that fail are counted in [`IdleConnections::errors`], not returned as an error.
pub fn hold_idle_connections(
    target: SocketAddr,
    host: &str,
    protocol: Protocol,
    count: usize,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<IdleConnections> {
    if !matches!(protocol, Protocol::Http1 | Protocol::Http1Tls) {
        bail!("idle connections speak HTTP/1.1 only, not {protocol}");
    }
    let shared = single_connection_shared(target, host, protocol, timeout)?;
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("idle-connections".to_owned())
        .spawn(move || {
            let outcome = (|| -> anyhow::Result<()> {
                let shared = Rc::new(shared);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building the idle-connection runtime")?;
                let local = tokio::task::LocalSet::new();
                let recorder = Rc::new(RefCell::new(Recorder::new()));
                let held = Rc::new(RefCell::new(Vec::with_capacity(count)));
                local.block_on(&runtime, async {
                    let workers = concurrency.clamp(1, count.max(1));
                    let mut tasks = Vec::with_capacity(workers);
                    for worker in 0..workers {
                        let shared = shared.clone();
                        let recorder = recorder.clone();
                        let held = held.clone();
                        let share = count / workers + usize::from(worker < count % workers);
                        tasks.push(tokio::task::spawn_local(async move {
                            for _ in 0..share {
                                let mut conn = None;
                                match send_request(&shared, &mut conn, &shared.request, &recorder)
                                    .await
                                {
                                    Ok(_) => held.borrow_mut().extend(conn),
                                    Err(kind) => recorder.borrow_mut().record_error(kind),
                                }
                            }
                        }));
                    }
                    for task in tasks {
                        let _ = task.await;
                    }
                });
                let errors = recorder
                    .borrow()
                    .errors
                    .iter()
                    .map(|(kind, n)| (kind.to_string(), *n))
                    .collect();
                let _ = opened_tx.send((held.borrow().len(), errors));
                // Returns when the caller drops its `IdleConnections`.
                let _ = release_rx.recv();
                // The connections must be dropped while their runtime still exists.
                held.borrow_mut().clear();
                drop(runtime);
                Ok(())
            })();
            if let Err(e) = outcome {
                eprintln!("bench: idle connections failed: {e:#}");
            }
        })
        .context("spawning the idle-connection thread")?;
    let (opened, errors) = opened_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the idle-connection thread stopped before opening"))?;
    Ok(IdleConnections {
        opened,
        errors,
        release: Some(release_tx),
        thread: Some(thread),
    })
}

/// Builds the state for requests outside a timed run: probes and idle connections.
fn single_connection_shared(
    target: SocketAddr,
    host: &str,
    protocol: Protocol,
    timeout: Duration,
) -> anyhow::Result<Shared> {
    let config = LoadConfig {
        target,
        host: host.to_owned(),
        path: "/".to_owned(),
        protocol,
        mode: Mode::NewConnection,
        connections: 1,
        streams: 1,
        threads: 1,
        warmup: Duration::ZERO,
        duration: Duration::ZERO,
        request_timeout: timeout,
        pacer_resolution: Duration::ZERO,
    };
    let (tls, quic) = client_tls(protocol, SignatureCheck::Verify, host)?;
    let now = Instant::now();
    Ok(Shared {
        request: request_bytes(host, "/", false),
        closing_request: request_bytes(host, "/", true),
        h2_uri: h2_uri(host, "/")?,
        config,
        window: Window {
            start: now,
            measure_from: now,
            end: now,
        },
        tls,
        quic,
        stop: Arc::new(AtomicBool::new(false)),
    })
}

/// TLS settings of a client: a connector for TLS over TCP, or a QUIC configuration for
/// HTTP/3.
type ClientTls = (
    Option<(TlsConnector, ServerName<'static>)>,
    Option<quinn::ClientConfig>,
);

/// Returns the signature check of a timed run. With a new connection per request, the
/// client skips it to spend less CPU per handshake (see [`SignatureCheck`]).
fn signature_check(mode: Mode) -> SignatureCheck {
    match mode {
        Mode::NewConnection => SignatureCheck::Skip,
        Mode::Closed | Mode::Open { .. } => SignatureCheck::Verify,
    }
}

/// Builds the TLS settings `protocol` needs, with `host` as the server name.
fn client_tls(
    protocol: Protocol,
    signatures: SignatureCheck,
    host: &str,
) -> anyhow::Result<ClientTls> {
    let server_name = || {
        ServerName::try_from(host.to_owned())
            .with_context(|| format!("invalid TLS server name {host:?}"))
    };
    Ok(match protocol {
        Protocol::Http1 => (None, None),
        Protocol::Http3 => {
            server_name()?;
            (None, Some(crate::tls::quic_client_config()?))
        }
        Protocol::Http1Tls | Protocol::Http2 => (
            Some((
                TlsConnector::from(crate::tls::client_config(protocol.alpn(), signatures)?),
                server_name()?,
            )),
            None,
        ),
    })
}

/// Longest accepted time between two wake-ups of the open-loop pacer. Groups of requests
/// released this far apart are already bursts, not an open-loop load.
const MAX_PACER_RESOLUTION: Duration = Duration::from_millis(1);

/// State every connection task of a run reads.
struct Shared {
    config: LoadConfig,
    window: Window,
    request: Vec<u8>,
    /// The request with `Connection: close`, for new-connection runs.
    closing_request: Vec<u8>,
    /// Absolute URI of HTTP/2 and HTTP/3 requests, which carries `:authority`.
    h2_uri: http::Uri,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// QUIC client settings of HTTP/3 runs.
    quic: Option<quinn::ClientConfig>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn request_bytes(host: &str, path: &str, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: edge-bench\r\n{connection}\r\n")
        .into_bytes()
}

fn run_thread(shared: &Arc<Shared>, connection_ids: &[usize]) -> anyhow::Result<Recorder> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a load-generator runtime")?;
    let local = tokio::task::LocalSet::new();
    let recorder = Rc::new(RefCell::new(Recorder::new()));
    local.block_on(&runtime, async {
        // One QUIC endpoint (one UDP socket) per thread carries all its HTTP/3 connections.
        let endpoint = match shared.config.protocol {
            Protocol::Http3 => Some(http3::client_endpoint(shared.config.target)?),
            _ => None,
        };
        // In open loop, one pacer per thread releases the requests of the thread's connections.
        let permits: Rc<[pacer::Permits]> = connection_ids
            .iter()
            .map(|_| pacer::Permits::default())
            .collect();
        let pacer_task = match shared.config.mode {
            Mode::Open { rate_per_s } => {
                let timer =
                    pacer::DeadlineTimer::new().context("creating the open-loop pacer timer")?;
                let pacer = Pacer::new(
                    connection_ids.to_vec(),
                    shared.config.connections,
                    rate_per_s,
                );
                let shared = shared.clone();
                let permits = permits.clone();
                Some(tokio::task::spawn_local(async move {
                    let resolution = shared.config.pacer_resolution;
                    pacer::release_requests(
                        pacer,
                        timer,
                        &permits,
                        shared.window,
                        resolution,
                        || shared.stopped(),
                    )
                    .await
                }))
            }
            _ => None,
        };
        let mut tasks = Vec::with_capacity(connection_ids.len());
        for (slot, &id) in connection_ids.iter().enumerate() {
            let shared = shared.clone();
            let recorder = recorder.clone();
            let endpoint = endpoint.clone();
            let permits = permits.clone();
            tasks.push(tokio::task::spawn_local(async move {
                tokio::time::sleep_until(shared.window.start.into()).await;
                match shared.config.mode {
                    Mode::Closed if shared.config.protocol == Protocol::Http2 => {
                        h2_closed_loop(&shared, &recorder).await;
                    }
                    Mode::Closed if shared.config.protocol == Protocol::Http3 => {
                        if let Some(endpoint) = &endpoint {
                            http3::closed_loop(&shared, endpoint, &recorder).await;
                        }
                    }
                    Mode::Closed => closed_loop(&shared, &recorder).await,
                    Mode::Open { rate_per_s } => {
                        let schedule = Schedule::new(id, shared.config.connections, rate_per_s);
                        open_loop(&shared, schedule, &permits[slot], &recorder).await;
                    }
                    Mode::NewConnection => new_connection_loop(&shared, &recorder).await,
                }
            }));
        }
        for task in tasks {
            // A task that panicked loses its in-flight request only. The recorder keeps
            // everything recorded before.
            let _ = task.await;
        }
        if let Some(endpoint) = endpoint {
            endpoint.close(0u32.into(), b"run done");
        }
        if let Some(pacer_task) = pacer_task {
            pacer_task
                .await
                .context("the open-loop pacer panicked")?
                .context("the open-loop pacer timer failed")?;
        }
        anyhow::Ok(())
    })?;
    let total = std::mem::take(&mut *recorder.borrow_mut());
    Ok(total)
}

async fn closed_loop(shared: &Shared, recorder: &RefCell<Recorder>) {
    let mut conn = None;
    loop {
        let started = Instant::now();
        if started >= shared.window.end || shared.stopped() {
            break;
        }
        let result = send_request(shared, &mut conn, &shared.request, recorder).await;
        let done = Instant::now();
        if started >= shared.window.measure_from {
            record(recorder, result, done - started);
        }
        if result == Err(ErrorKind::Connect) {
            tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
        }
    }
}

async fn new_connection_loop(shared: &Shared, recorder: &RefCell<Recorder>) {
    loop {
        let started = Instant::now();
        if started >= shared.window.end || shared.stopped() {
            break;
        }
        let mut conn = None;
        let result = send_request(shared, &mut conn, &shared.closing_request, recorder).await;
        let done = Instant::now();
        drop(conn);
        if started >= shared.window.measure_from {
            record(recorder, result, done - started);
        }
        if result == Err(ErrorKind::Connect) {
            tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
        }
    }
}

/// Sends the requests of one open-loop connection, each when the pacer releases it and the
/// previous response is complete.
async fn open_loop(
    shared: &Shared,
    schedule: Schedule,
    permits: &pacer::Permits,
    recorder: &RefCell<Recorder>,
) {
    let window = shared.window;
    let run_len = window.end - window.start;
    let warmup_len = window.measure_from - window.start;
    let mut conn = None;
    let mut previous_done: Option<Instant> = None;
    let mut ideal = IdealQueue::default();
    let mut k = 0;
    loop {
        let due_offset = schedule.due(k);
        if due_offset >= run_len || shared.stopped() {
            break;
        }
        let due = window.start + due_offset;
        let behind = previous_done.is_some_and(|done| done > due);
        if behind && Instant::now() >= window.end {
            // The connection fell behind: the requests still due in the window were never
            // sent. They count as errors so that an overloaded server cannot look fast. A
            // request that is only late because the load generator was busy is still sent,
            // even after the end.
            let unsent = schedule
                .due_before(k, run_len)
                .saturating_sub(schedule.due_before(k, warmup_len));
            recorder.borrow_mut().add_errors(ErrorKind::NotSent, unsent);
            break;
        }
        if !permits.wait_for(k).await {
            // The pacer ended early: the run was stopped, or its timer failed.
            break;
        }
        let sent = Instant::now();
        let result = send_request(shared, &mut conn, &shared.request, recorder).await;
        let done = Instant::now();
        // Every request, failed and warm-up ones included, occupies the ideal connection for
        // as long as the server took, so later requests queue behind it.
        let corrected = ideal.latency(due, done - sent);
        if due >= window.measure_from {
            match result {
                Ok(_) => {
                    let mut recorder = recorder.borrow_mut();
                    recorder.record_latency(corrected);
                    recorder
                        .uncorrected_latency_us
                        .saturating_record(duration_us(done - sent));
                    recorder
                        .send_lag_us
                        .saturating_record(duration_us(sent.saturating_duration_since(due)));
                }
                Err(kind) => recorder.borrow_mut().record_error(kind),
            }
        }
        previous_done = Some(done);
        k += 1;
    }
}

fn record(recorder: &RefCell<Recorder>, result: Result<u16, ErrorKind>, latency: Duration) {
    let mut recorder = recorder.borrow_mut();
    match result {
        Ok(_) => recorder.record_latency(latency),
        Err(kind) => recorder.record_error(kind),
    }
}

/// Sends `request` on `conn`, connecting first when it is `None`, and returns the 2xx status.
/// Leaves `conn` as `None` after any error and after a response that closes the connection.
async fn send_request(
    shared: &Shared,
    conn: &mut Option<Conn>,
    request: &[u8],
    recorder: &RefCell<Recorder>,
) -> Result<u16, ErrorKind> {
    let exchange = async {
        let stream = match conn {
            Some(stream) => stream,
            None => conn.insert(Conn::open(shared, recorder).await?),
        };
        stream.exchange(request).await
    };
    let result = match tokio::time::timeout(shared.config.request_timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ErrorKind::Timeout),
    };
    match result {
        Ok(head) => {
            if head.closes {
                *conn = None;
            }
            if (200..300).contains(&head.status) {
                Ok(head.status)
            } else {
                Err(ErrorKind::Status(head.status))
            }
        }
        Err(kind) => {
            *conn = None;
            Err(kind)
        }
    }
}

/// One client connection and its read buffer.
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    async fn open(shared: &Shared, recorder: &RefCell<Recorder>) -> Result<Self, ErrorKind> {
        let tcp = TcpStream::connect(shared.config.target)
            .await
            .map_err(|_| ErrorKind::Connect)?;
        // NOTE: without TCP_NODELAY, a request written right after a response could wait
        // for Nagle's algorithm and add 40 ms of delayed-ACK latency.
        let _ = tcp.set_nodelay(true);
        let stream = match &shared.tls {
            None => Stream::Plain(tcp),
            Some((connector, server_name)) => {
                let tls = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|_| ErrorKind::TlsHandshake)?;
                let mut recorder = recorder.borrow_mut();
                if recorder.tls_session.is_none() {
                    recorder.tls_session = Some(crate::tls::describe_session(tls.get_ref().1));
                }
                Stream::Tls(Box::new(tls))
            }
        };
        Ok(Self {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Writes `request` and reads one whole response.
    async fn exchange(&mut self, request: &[u8]) -> Result<ResponseHead, ErrorKind> {
        let written = match &mut self.stream {
            Stream::Plain(s) => s.write_all(request).await,
            Stream::Tls(s) => s.write_all(request).await,
        };
        written.map_err(|_| ErrorKind::Write)?;
        self.buf.clear();
        loop {
            match frame_response(&self.buf).map_err(|_| ErrorKind::InvalidResponse)? {
                Framing::Complete(head, len) => {
                    // Without pipelining nothing may follow the response, so drop anything that does.
                    self.buf.drain(..len);
                    return Ok(head);
                }
                Framing::Incomplete => {
                    if self.read_more().await? == 0 {
                        return Err(ErrorKind::ClosedEarly);
                    }
                }
                Framing::UntilClose(head) => {
                    while self.read_more().await? > 0 {}
                    return Ok(head);
                }
            }
        }
    }

    async fn read_more(&mut self) -> Result<usize, ErrorKind> {
        if self.buf.len() >= MAX_RESPONSE_BYTES {
            return Err(ErrorKind::InvalidResponse);
        }
        let read = match &mut self.stream {
            Stream::Plain(s) => s.read_buf(&mut self.buf).await,
            Stream::Tls(s) => s.read_buf(&mut self.buf).await,
        };
        read.map_err(|_| ErrorKind::Read)
    }
}

fn h2_uri(host: &str, path: &str) -> anyhow::Result<http::Uri> {
    format!("https://{host}{path}")
        .parse()
        .with_context(|| format!("invalid host {host:?} or path {path:?} for an HTTP/2 request"))
}

/// The side of a connection that starts HTTP/2 requests.
type H2Client = h2::client::SendRequest<&'static [u8]>;

/// Runs one closed-loop HTTP/2 connection: opens it, runs `streams` request loops on it, and opens
/// a new one when it fails, until the window ends.
async fn h2_closed_loop(shared: &Arc<Shared>, recorder: &Rc<RefCell<Recorder>>) {
    loop {
        let started = Instant::now();
        if started >= shared.window.end || shared.stopped() {
            break;
        }
        let opened = tokio::time::timeout(shared.config.request_timeout, h2_open(shared, recorder))
            .await
            .unwrap_or(Err(ErrorKind::Timeout));
        let client = match opened {
            Ok(client) => client,
            Err(kind) => {
                // The first request of every stream fails with the connection.
                if started >= shared.window.measure_from {
                    recorder
                        .borrow_mut()
                        .add_errors(kind, shared.config.streams as u64);
                }
                if kind == ErrorKind::Connect {
                    tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                }
                continue;
            }
        };
        let mut streams = tokio::task::JoinSet::new();
        for _ in 0..shared.config.streams {
            let shared = shared.clone();
            let recorder = recorder.clone();
            let client = client.clone();
            streams.spawn_local(async move { h2_stream_loop(&shared, &recorder, client).await });
        }
        drop(client);
        while streams.join_next().await.is_some() {}
    }
}

/// Sends requests one after another on new streams of `client` until the window ends or the
/// connection fails.
async fn h2_stream_loop(shared: &Shared, recorder: &RefCell<Recorder>, client: H2Client) {
    loop {
        let started = Instant::now();
        if started >= shared.window.end || shared.stopped() {
            break;
        }
        let result = tokio::time::timeout(
            shared.config.request_timeout,
            h2_exchange(client.clone(), &shared.h2_uri),
        )
        .await
        .unwrap_or(Err(ErrorKind::Timeout))
        .and_then(status_result);
        let done = Instant::now();
        if started >= shared.window.measure_from {
            record(recorder, result, done - started);
        }
        if let Err(kind) = result {
            if stream_error_ends_connection(kind) {
                break;
            }
        }
    }
}

fn status_result(status: u16) -> Result<u16, ErrorKind> {
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(ErrorKind::Status(status))
    }
}

/// Returns whether a failed HTTP/2 or HTTP/3 request means that its connection is unusable. A
/// reset stream, a bad status or an oversized body leave the connection open, and a timed-out
/// request is reset by dropping it.
fn stream_error_ends_connection(kind: ErrorKind) -> bool {
    !matches!(
        kind,
        ErrorKind::StreamReset
            | ErrorKind::Status(_)
            | ErrorKind::InvalidResponse
            | ErrorKind::Timeout
    )
}

/// Maps an error of the h2 crate to the kind counted in the report.
fn h2_error_kind(error: &h2::Error) -> ErrorKind {
    if error.is_reset() {
        ErrorKind::StreamReset
    } else if error.is_go_away() {
        ErrorKind::GoAway
    } else if error.is_io() {
        ErrorKind::Read
    } else {
        ErrorKind::H2Protocol
    }
}

/// Connects, completes a TLS handshake that must select `h2`, and starts the HTTP/2
/// connection on a local task.
async fn h2_open(shared: &Shared, recorder: &RefCell<Recorder>) -> Result<H2Client, ErrorKind> {
    let Some((connector, server_name)) = &shared.tls else {
        return Err(ErrorKind::NoH2);
    };
    let tcp = TcpStream::connect(shared.config.target)
        .await
        .map_err(|_| ErrorKind::Connect)?;
    let _ = tcp.set_nodelay(true);
    let tls = connector
        .connect(server_name.clone(), tcp)
        .await
        .map_err(|_| ErrorKind::TlsHandshake)?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(ErrorKind::NoH2);
    }
    {
        let mut recorder = recorder.borrow_mut();
        if recorder.tls_session.is_none() {
            recorder.tls_session = Some(crate::tls::describe_session(tls.get_ref().1));
        }
    }
    let (client, connection) = h2::client::Builder::new()
        .handshake::<_, &'static [u8]>(tls)
        .await
        .map_err(|e| h2_error_kind(&e))?;
    // The connection ends when every client handle and stream is dropped, or when it fails;
    // its streams then see the error.
    tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Sends one GET on a new stream of `client` and reads the whole response body. Returns the
/// status, whatever it is.
async fn h2_exchange(client: H2Client, uri: &http::Uri) -> Result<u16, ErrorKind> {
    let mut client = client.ready().await.map_err(|e| h2_error_kind(&e))?;
    let request = http::Request::get(uri.clone())
        .header(http::header::USER_AGENT, "edge-bench")
        .body(())
        .map_err(|_| ErrorKind::H2Protocol)?;
    let (response, _) = client
        .send_request(request, true)
        .map_err(|e| h2_error_kind(&e))?;
    let response = response.await.map_err(|e| h2_error_kind(&e))?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| h2_error_kind(&e))?;
        received += chunk.len();
        if received > MAX_RESPONSE_BYTES {
            return Err(ErrorKind::InvalidResponse);
        }
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(status)
}

fn report(config: &LoadConfig, window: Window, total: &Recorder) -> LoadReport {
    let measured_s = (window.end - window.measure_from).as_secs_f64();
    let responses = total.latency_us.len();
    let open_loop = matches!(config.mode, Mode::Open { .. });
    LoadReport {
        protocol: config.protocol,
        mode: config.mode,
        connections: config.connections,
        streams: if matches!(config.protocol, Protocol::Http2 | Protocol::Http3) {
            config.streams
        } else {
            1
        },
        measured_s,
        responses,
        requests_per_s: if measured_s > 0.0 {
            responses as f64 / measured_s
        } else {
            0.0
        },
        errors: total
            .errors
            .iter()
            .map(|(kind, count)| (kind.to_string(), *count))
            .collect(),
        co_corrected: open_loop,
        latency_us: LatencySummary::from_histogram(&total.latency_us),
        latency_curve_us: percentile_curve(&total.latency_us),
        uncorrected_latency_us: open_loop
            .then(|| LatencySummary::from_histogram(&total.uncorrected_latency_us)),
        send_lag_us: open_loop.then(|| LatencySummary::from_histogram(&total.send_lag_us)),
        tls_session: total.tls_session.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_have_host_header() {
        let request = String::from_utf8(request_bytes("bench.local", "/x", false)).unwrap();
        assert_eq!(
            request,
            "GET /x HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: edge-bench\r\n\r\n"
        );
    }

    #[test]
    fn closing_request_asks_for_close() {
        let request = String::from_utf8(request_bytes("a", "/", true)).unwrap();
        assert!(request.ends_with("Connection: close\r\n\r\n"), "{request}");
    }

    fn config(protocol: Protocol, mode: Mode) -> LoadConfig {
        LoadConfig {
            target: "127.0.0.1:9".parse().unwrap(),
            host: "bench.local".to_owned(),
            path: "/".to_owned(),
            protocol,
            mode,
            connections: 1,
            streams: 1,
            threads: 1,
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            request_timeout: Duration::from_secs(1),
            pacer_resolution: Duration::ZERO,
        }
    }

    fn start_error(config: &LoadConfig) -> String {
        start(config, Arc::new(AtomicBool::new(false)))
            .err()
            .unwrap()
            .to_string()
    }

    /// Runs open-loop HTTP/1.1 load at 2048 requests/s on 5 connections and 2 threads against
    /// the crate's own backend on loopback. Requests 256 to 767 are due in the measured window.
    fn open_loop_run(stop: bool) -> LoadReport {
        let backend = crate::backend::spawn("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let config = LoadConfig {
            target: backend.addr,
            connections: 5,
            threads: 2,
            warmup: Duration::from_millis(125),
            duration: Duration::from_millis(250),
            ..config(Protocol::Http1, Mode::Open { rate_per_s: 2048.0 })
        };
        run(&config, Arc::new(AtomicBool::new(stop))).unwrap()
    }

    #[test]
    fn open_loop_sends_every_due_request() {
        let report = open_loop_run(false);
        // A connection that fell behind at the end counts its unsent requests as errors, which
        // a busy test machine can cause. Every other error is a failure.
        let not_sent = ErrorKind::NotSent.to_string();
        let other_errors: Vec<_> = report.errors.keys().filter(|k| **k != not_sent).collect();
        assert!(other_errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.responses + report.error_count(), 512);
        assert!(report.co_corrected);
        assert!(report.send_lag_us.is_some());
    }

    #[test]
    fn open_loop_stop_ends_run() {
        let report = open_loop_run(true);
        assert_eq!(report.responses, 0);
        assert_eq!(report.error_count(), 0);
    }

    #[test]
    fn coarse_pacer_resolution_is_rejected() {
        let config = LoadConfig {
            pacer_resolution: Duration::from_millis(2),
            ..config(Protocol::Http1, Mode::Open { rate_per_s: 10.0 })
        };
        let error = start_error(&config);
        assert!(
            error.starts_with("pacer resolution must be at most 1ms"),
            "{error}"
        );
    }

    #[test]
    fn http3_runs_closed_loop_only() {
        assert_eq!(
            start_error(&config(Protocol::Http3, Mode::Open { rate_per_s: 10.0 })),
            "HTTP/3 runs closed loop only; open loop at 10 requests/s is not supported by the \
             load generator yet"
        );
    }

    #[test]
    fn http2_runs_closed_loop_only() {
        assert_eq!(
            start_error(&config(Protocol::Http2, Mode::NewConnection)),
            "HTTPS HTTP/2 runs closed loop only; new connection per request is not supported by \
             the load generator yet"
        );
    }

    #[test]
    fn zero_streams_are_rejected() {
        let config = LoadConfig {
            streams: 0,
            ..config(Protocol::Http2, Mode::Closed)
        };
        assert_eq!(start_error(&config), "streams must be at least 1");
    }

    #[test]
    fn h2_uri_carries_authority_and_path() {
        let uri = h2_uri("bench.local", "/a?b=1").unwrap();
        assert_eq!(uri.authority().unwrap().as_str(), "bench.local");
        assert_eq!(uri.path_and_query().unwrap().as_str(), "/a?b=1");
        assert!(h2_uri("bad host", "/").is_err());
    }

    #[test]
    fn only_connection_failures_end_an_h2_connection() {
        for kind in [
            ErrorKind::StreamReset,
            ErrorKind::Status(503),
            ErrorKind::InvalidResponse,
            ErrorKind::Timeout,
        ] {
            assert!(!stream_error_ends_connection(kind), "{kind}");
        }
        for kind in [
            ErrorKind::GoAway,
            ErrorKind::Read,
            ErrorKind::H2Protocol,
            ErrorKind::QuicConnectionLost,
            ErrorKind::H3Protocol,
        ] {
            assert!(stream_error_ends_connection(kind), "{kind}");
        }
    }

    /// Behaviour of the test server for each HTTP/2 request.
    #[derive(Clone, Copy)]
    enum Reply {
        Status(u16),
        Reset,
    }

    /// Serves one TLS connection on a loopback port, with HTTP/2 when `alpn` is `h2`, and
    /// responds to its requests with `reply`. Gives up after 10 s so that a test cannot hang.
    fn serve_one(alpn: Option<&'static [u8]>, reply: Reply) -> (SocketAddr, JoinHandle<()>) {
        let certified = rcgen::generate_simple_self_signed(vec!["bench.local".to_owned()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .unwrap();
        config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let serve = async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let (tcp, _) = listener.accept().await.unwrap();
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let handshake = h2::server::Builder::new().handshake::<_, &'static [u8]>(tls);
                let Ok(mut connection) = handshake.await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    match reply {
                        Reply::Status(status) => {
                            let response =
                                http::Response::builder().status(status).body(()).unwrap();
                            let mut body = respond.send_response(response, false).unwrap();
                            body.send_data(b"ok".as_slice(), true).unwrap();
                        }
                        Reply::Reset => respond.send_reset(h2::Reason::REFUSED_STREAM),
                    }
                }
            };
            runtime.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), serve).await;
            });
        });
        (addr, thread)
    }

    fn probe_h2(addr: SocketAddr) -> anyhow::Result<u16> {
        probe(addr, "bench.local", Protocol::Http2, Duration::from_secs(5))
    }

    #[test]
    fn h2_probe_reads_the_status() {
        let (addr, server) = serve_one(Some(b"h2"), Reply::Status(200));
        assert_eq!(probe_h2(addr).unwrap(), 200);
        server.join().unwrap();
        let (addr, server) = serve_one(Some(b"h2"), Reply::Status(503));
        assert_eq!(probe_h2(addr).unwrap(), 503);
        server.join().unwrap();
    }

    #[test]
    fn h2_probe_names_a_reset_stream() {
        let (addr, server) = serve_one(Some(b"h2"), Reply::Reset);
        let err = probe_h2(addr).unwrap_err().to_string();
        assert_eq!(err, format!("probe of {addr} failed: stream reset"));
        server.join().unwrap();
    }

    #[test]
    fn h2_probe_needs_alpn_h2() {
        let (addr, server) = serve_one(None, Reply::Status(200));
        let err = probe_h2(addr).unwrap_err().to_string();
        assert_eq!(err, format!("probe of {addr} failed: alpn not h2"));
        server.join().unwrap();
    }
}
