//! Workers: one thread per core, each with its own monoio runtime, listeners, upstream pools
//! and access log buffer.
//!
//! ```text
//! main thread ── spawn ──> worker N: runtime (io_uring or epoll)
//!                            ├─ accept loop `web`       ─┐
//!                            ├─ accept loop `websecure` ─┼─> connection tasks (http1::serve, or
//!                            │                           │   http2::serve when ALPN chose h2)
//!                            └─ housekeeping (log flush, pool sweep)
//! SIGTERM ── stop channel ──> stop accepting, let connections finish, exit by the deadline
//! ```
//!
//! A [`WorkerCtx`] is `!Send` and lives on its worker thread. The only values it shares with
//! other threads are the read-mostly [`Shared`] state and the counters this worker writes.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    rc::Rc,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll, Waker},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use arc_swap::{cache::Cache, ArcSwap};
use monoio::{
    net::{TcpListener, TcpStream},
    IoUringDriver, LegacyDriver, RuntimeBuilder,
};
use tracing::{debug, error, info, warn, Instrument};

use crate::{
    access_log::AccessLog,
    http1, http2,
    metrics::WorkerMetrics,
    settings::IoDriver,
    state::{Compiled, EntryPoint, Shared},
    tls::{self, SniResolver},
    upstream::Upstreams,
};

/// Interval of the housekeeping task: access log flush and idle pool sweep.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(100);

/// The listening sockets of one worker, created before the worker starts.
pub struct WorkerListeners {
    pub http: std::net::TcpListener,
    pub https: std::net::TcpListener,
}

/// Per-worker state reachable from every task of the worker.
pub struct WorkerCtx {
    pub id: usize,
    pub shared: Arc<Shared>,
    snapshot: RefCell<Cache<Arc<ArcSwap<Compiled>>, Arc<Compiled>>>,
    pub upstreams: Rc<Upstreams>,
    /// HTTP/2 connections to h2c backends and to https backends that chose `h2`.
    pub h2_pool: http2::client::H2Pool,
    pub shutdown: Shutdown,
    pub access_log: RefCell<AccessLog>,
    tls: Arc<rustls::ServerConfig>,
    next_conn: Cell<u64>,
    next_request: Cell<u64>,
    active_conns: Cell<usize>,
    last_upstream_warning: Cell<Option<Instant>>,
}

impl WorkerCtx {
    /// Returns whether a backend failure may be logged now: at most once per second per
    /// worker, so a dead backend under load does not flood the log (metrics count them all).
    pub fn should_log_upstream_error(&self) -> bool {
        let now = Instant::now();
        let allowed = self
            .last_upstream_warning
            .get()
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1));
        if allowed {
            self.last_upstream_warning.set(Some(now));
        }
        allowed
    }

    /// Returns the current snapshot; a reload becomes visible at the next call.
    pub fn snapshot(&self) -> Arc<Compiled> {
        self.snapshot.borrow_mut().load().clone()
    }

    pub fn metrics(&self) -> &WorkerMetrics {
        &self.shared.metrics[self.id]
    }

    /// Returns a request id unique in this process: the worker id and a per-worker sequence,
    /// as 16 hex digits.
    pub fn next_request_id(&self) -> RequestId {
        let n = self.next_request.get().wrapping_add(1);
        self.next_request.set(n);
        RequestId::new(((self.id as u64) << 48) | (n & 0xffff_ffff_ffff))
    }

    fn next_conn_id(&self) -> u64 {
        let n = self.next_conn.get().wrapping_add(1);
        self.next_conn.set(n);
        ((self.id as u64) << 48) | (n & 0xffff_ffff_ffff)
    }
}

/// A request id rendered as 16 lowercase hex digits, without allocating.
#[derive(Clone, Copy)]
pub struct RequestId([u8; 16]);

impl RequestId {
    pub(crate) fn new(value: u64) -> Self {
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            let nibble = (value >> ((15 - i) * 4)) & 0xf;
            *byte = b"0123456789abcdef"[nibble as usize];
        }
        Self(out)
    }

    pub fn as_str(&self) -> &str {
        // The bytes are ASCII hex digits by construction.
        std::str::from_utf8(&self.0).unwrap_or("0000000000000000")
    }
}

/// A one-shot, worker-local shutdown signal that any number of tasks can wait for.
#[derive(Default)]
pub struct Shutdown {
    triggered: Cell<bool>,
    /// Wakers of pending waits; a slot is freed when its wait is dropped.
    waiters: RefCell<Vec<Option<Waker>>>,
    free_slots: RefCell<Vec<usize>>,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.triggered.set(true);
        for waker in self
            .waiters
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
        {
            waker.wake();
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.get()
    }

    /// Completes once [`Shutdown::trigger`] has been called.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future releases its waker slot.
    pub fn wait(&self) -> ShutdownWait<'_> {
        ShutdownWait {
            shutdown: self,
            slot: None,
        }
    }
}

pub struct ShutdownWait<'a> {
    shutdown: &'a Shutdown,
    slot: Option<usize>,
}

impl Future for ShutdownWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shutdown = self.shutdown;
        if shutdown.triggered.get() {
            return Poll::Ready(());
        }
        let mut waiters = shutdown.waiters.borrow_mut();
        match self.slot {
            Some(slot) => waiters[slot] = Some(cx.waker().clone()),
            None => {
                let slot = match shutdown.free_slots.borrow_mut().pop() {
                    Some(slot) => {
                        waiters[slot] = Some(cx.waker().clone());
                        slot
                    }
                    None => {
                        waiters.push(Some(cx.waker().clone()));
                        waiters.len() - 1
                    }
                };
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

impl Drop for ShutdownWait<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            if let Some(entry) = self.shutdown.waiters.borrow_mut().get_mut(slot) {
                *entry = None;
            }
            self.shutdown.free_slots.borrow_mut().push(slot);
        }
    }
}

/// Identity of one client connection, carried into its request handling.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub conn_id: u64,
    pub peer: SocketAddr,
    pub local_port: u16,
    pub entrypoint: EntryPoint,
}

impl ConnInfo {
    pub fn is_tls(&self) -> bool {
        self.entrypoint == EntryPoint::WebSecure
    }
}

/// Starts worker `id` on its own thread. The thread returns after `stop` fires and its
/// connections have finished or the shutdown grace period has passed.
///
/// # Errors
/// Fails when the thread cannot be spawned.
pub fn spawn(
    id: usize,
    shared: Arc<Shared>,
    listeners: WorkerListeners,
    stop: futures_channel::oneshot::Receiver<()>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("edge-worker-{id}"))
        .spawn(move || {
            if shared.settings.pin_workers {
                // Pin to the id-th CPU the process may use, so `taskset` and cgroup limits
                // are respected.
                let allowed = allowed_cpus();
                if let Some(&cpu) = allowed.get(id % allowed.len().max(1)) {
                    if let Err(e) = monoio::utils::bind_to_cpu_set(Some(cpu)) {
                        warn!(worker = id, cpu, error = %e, "cannot pin the worker to a core");
                    }
                }
            }
            if let Err(e) = run(id, shared, listeners, stop) {
                error!(worker = id, error = %e, "worker failed to start");
                std::process::exit(1);
            }
        })
}

/// Returns the CPUs this process may run on, in ascending order.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a zeroed cpu_set_t on the stack and its size is passed with it;
    // sched_getaffinity writes only inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: WorkerListeners,
    stop: futures_channel::oneshot::Receiver<()>,
) -> io::Result<()> {
    let driver = shared.settings.io_driver;
    if driver != IoDriver::Epoll {
        // The deferred-completion flags need Linux 6.1. An older kernel rejects them with
        // EINVAL, and the ring is then built without them.
        let runtime = uring_runtime(true).or_else(|e| {
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            warn!(worker = id, error = %e, "io_uring rejected the deferred-completion flags, building the ring without them");
            uring_runtime(false)
        });
        match runtime {
            Ok(mut runtime) => {
                info!(worker = id, driver = "io_uring", "worker runtime started");
                return runtime.block_on(worker_main(id, shared, listeners, stop));
            }
            Err(e) if driver == IoDriver::Auto => {
                warn!(worker = id, error = %e, "io_uring is unavailable, falling back to epoll");
            }
            Err(e) => return Err(e),
        }
    }
    let mut runtime = RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .build()?;
    info!(worker = id, driver = "epoll", "worker runtime started");
    runtime.block_on(worker_main(id, shared, listeners, stop))
}

/// Builds a worker's io_uring runtime. Only this thread creates, submits to and reaps the
/// ring. With `deferred`, the ring is declared single-issuer (`SINGLE_ISSUER`), and the kernel
/// posts completions when the worker waits for them (`DEFER_TASKRUN`, with `COOP_TASKRUN`)
/// instead of interrupting the worker with task work as each socket becomes ready.
fn uring_runtime(
    deferred: bool,
) -> io::Result<monoio::Runtime<monoio::time::TimeDriver<IoUringDriver>>> {
    let mut setup = io_uring::IoUring::builder();
    if deferred {
        setup
            .setup_coop_taskrun()
            .setup_single_issuer()
            .setup_defer_taskrun();
    }
    RuntimeBuilder::<IoUringDriver>::new()
        .with_entries(1024)
        .uring_builder(setup)
        .enable_timer()
        .build()
}

async fn worker_main(
    id: usize,
    shared: Arc<Shared>,
    listeners: WorkerListeners,
    stop: futures_channel::oneshot::Receiver<()>,
) -> io::Result<()> {
    let http = TcpListener::from_std(listeners.http)?;
    let https = TcpListener::from_std(listeners.https)?;
    let resolver = Arc::new(SniResolver::new(shared.current.clone()));
    let tls_config = tls::server_config(resolver, shared.ticketer.clone())
        .map_err(|e| io::Error::other(format!("invalid TLS settings: {e}")))?;
    let settings = &shared.settings;
    let ctx = Rc::new(WorkerCtx {
        id,
        snapshot: RefCell::new(Cache::new(shared.current.clone())),
        upstreams: Rc::new(Upstreams::new(
            settings.upstream_max_idle,
            settings.upstream_idle_timeout,
        )),
        h2_pool: http2::client::H2Pool::default(),
        shutdown: Shutdown::default(),
        access_log: RefCell::new(AccessLog::new(settings.access_log, settings.log_format)),
        tls: Arc::new(tls_config),
        next_conn: Cell::new(0),
        next_request: Cell::new(0),
        active_conns: Cell::new(0),
        last_upstream_warning: Cell::new(None),
        shared: shared.clone(),
    });

    let http_loop = monoio::spawn(accept_loop(ctx.clone(), http, EntryPoint::Web));
    let https_loop = monoio::spawn(accept_loop(ctx.clone(), https, EntryPoint::WebSecure));
    monoio::spawn(housekeeping(ctx.clone()));
    shared.ready_workers.fetch_add(1, Ordering::SeqCst);

    // A dropped sender (the main thread is gone) also means stop.
    let _ = stop.await;
    ctx.shutdown.trigger();
    http_loop.await;
    https_loop.await;
    let deadline = Instant::now() + settings.shutdown_grace;
    while ctx.active_conns.get() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    if ctx.active_conns.get() > 0 {
        warn!(
            worker = id,
            connections = ctx.active_conns.get(),
            "shutdown grace period over, closing remaining connections"
        );
    }
    ctx.upstreams.clear();
    ctx.h2_pool.clear();
    ctx.access_log.borrow_mut().flush();
    info!(worker = id, "worker stopped");
    Ok(())
}

async fn accept_loop(ctx: Rc<WorkerCtx>, listener: TcpListener, entrypoint: EntryPoint) {
    let local_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut last_error_log: Option<Instant> = None;
    loop {
        let accepted = monoio::select! {
            _ = ctx.shutdown.wait() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let info = ConnInfo {
                    conn_id: ctx.next_conn_id(),
                    peer,
                    local_port,
                    entrypoint,
                };
                monoio::spawn(CatchUnwind(Box::pin(handle_connection(
                    ctx.clone(),
                    stream,
                    info,
                ))));
            }
            Err(e) => {
                // EMFILE and ENFILE storms repeat on every accept: log once per second.
                let now = Instant::now();
                if last_error_log.is_none_or(|t| now - t > Duration::from_secs(1)) {
                    warn!(worker = ctx.id, listener = entrypoint.name(), error = %e, "accept failed");
                    last_error_log = Some(now);
                }
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    debug!(
        worker = ctx.id,
        listener = entrypoint.name(),
        "stopped accepting"
    );
}

/// Runs a connection task and stops a panic inside it at the task boundary, so a bug on one
/// connection closes that connection and not the whole worker. The panic hook installed in
/// `main` has already logged the panic with its location.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future<Output = ()>> Future for CatchUnwind<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                error!("a connection task panicked; its connection is closed");
                Poll::Ready(())
            }
        }
    }
}

/// Counts a connection as active for as long as it is alive.
struct ActiveConn {
    ctx: Rc<WorkerCtx>,
    tls: bool,
}

impl ActiveConn {
    fn new(ctx: Rc<WorkerCtx>, tls: bool) -> Self {
        ctx.active_conns.set(ctx.active_conns.get() + 1);
        ctx.metrics().connection_opened(tls);
        Self { ctx, tls }
    }
}

impl Drop for ActiveConn {
    fn drop(&mut self) {
        self.ctx.active_conns.set(self.ctx.active_conns.get() - 1);
        self.ctx.metrics().connection_closed(self.tls);
    }
}

async fn handle_connection(ctx: Rc<WorkerCtx>, stream: TcpStream, info: ConnInfo) {
    let _active = ActiveConn::new(ctx.clone(), info.is_tls());
    let _ = stream.set_nodelay(true);
    let span = tracing::debug_span!(
        "conn",
        conn_id = info.conn_id,
        core = ctx.id,
        listener = info.entrypoint.name(),
        peer.addr = %info.peer,
        proto = tracing::field::Empty,
    );
    async move {
        match info.entrypoint {
            EntryPoint::Web => {
                tracing::Span::current().record("proto", "http/1.1");
                // Boxed, as below, so that the task's own future stays small.
                let served = Box::pin(http1::serve(ctx, stream, info));
                served.await
            }
            EntryPoint::WebSecure => {
                let handshake = Box::pin(monoio::time::timeout(
                    ctx.shared.settings.tls_handshake_timeout,
                    tls::stream::accept(stream, ctx.tls.clone()),
                ));
                // The block ends the handshake result's storage before the long await, so
                // the task keeps only the boxed protocol future while the connection lives.
                let served = {
                    let handshake = handshake.await;
                    start_tls_protocol(ctx, handshake, info)
                };
                if let Some(served) = served {
                    served.await;
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// The outcome of a TLS handshake with its time limit.
type Handshake = Result<io::Result<tls::stream::TlsStream>, monoio::time::error::Elapsed>;

/// Counts a finished handshake and returns the boxed future that serves the protocol ALPN
/// chose, or `None` when the connection ends here.
fn start_tls_protocol(
    ctx: Rc<WorkerCtx>,
    handshake: Handshake,
    info: ConnInfo,
) -> Option<Pin<Box<dyn Future<Output = ()>>>> {
    match handshake {
        Ok(Ok(tls_stream)) => {
            crate::metrics::bump(&ctx.metrics().tls_handshakes);
            if tls::is_acme_tls_alpn(tls_stream.alpn_protocol()) {
                // A TLS-ALPN-01 validation ends with the handshake (RFC 8737).
                debug!("ACME TLS-ALPN-01 handshake done, closing");
                return None;
            }
            if tls_stream.alpn_protocol() == Some(b"h2") {
                tracing::Span::current().record("proto", "h2");
                Some(Box::pin(http2::serve(ctx, tls_stream, info)))
            } else {
                tracing::Span::current().record("proto", "http/1.1");
                Some(Box::pin(http1::serve(ctx, tls_stream, info)))
            }
        }
        Ok(Err(e)) => {
            crate::metrics::bump(&ctx.metrics().tls_handshake_failures);
            debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            crate::metrics::bump(&ctx.metrics().tls_handshake_failures);
            debug!("TLS handshake timed out");
            None
        }
    }
}

async fn housekeeping(ctx: Rc<WorkerCtx>) {
    let mut ticks: u32 = 0;
    loop {
        monoio::select! {
            _ = ctx.shutdown.wait() => break,
            _ = monoio::time::sleep(HOUSEKEEPING_INTERVAL) => {},
        }
        ctx.access_log.borrow_mut().flush();
        let counts = ctx.upstreams.in_flight_counts();
        if let Some(slot) = ctx.shared.in_flight.get(ctx.id) {
            *slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = counts;
        }
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(10) {
            ctx.upstreams.sweep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panicking_task_spares_the_worker() {
        let mut runtime = RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let survived = runtime.block_on(async {
            let crashed = monoio::spawn(CatchUnwind(Box::pin(async {
                panic!("bug in one connection");
            })));
            crashed.await;
            let healthy = monoio::spawn(async { 42 });
            healthy.await
        });
        assert_eq!(survived, 42);
    }

    #[test]
    fn request_id_is_hex() {
        assert_eq!(
            RequestId::new(0x1_0000_0000_00ff).as_str(),
            "00010000000000ff"
        );
    }
}
