//! Per-worker backend selection and keep-alive connection pools.
//!
//! Everything here belongs to one worker thread (`!Send`): the pool, the round-robin cursors,
//! the in-flight counts and the short passive-failure marks. Workers never share a backend
//! connection, so nothing needs a lock.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use edge_proto::{Balance, ServerState};

use crate::{state::Compiled, upstream_tls::UpstreamStream};

/// How long a backend that refused a connection is skipped by this worker, unless every
/// other backend is skipped too.
const FAILURE_COOLDOWN: Duration = Duration::from_secs(2);

/// The result of choosing a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Server {
        index: usize,
        addr: SocketAddr,
    },
    /// The service has no server at all.
    NoServers,
    /// Every server is down or draining.
    NoneAvailable,
}

/// Idle time after which a pooled connection is checked with a peek before reuse. Under load
/// connections are reused within microseconds, when a close by the backend is very unlikely,
/// so the extra syscall is spent only on connections that have waited.
const PEEK_AFTER_IDLE: Duration = Duration::from_millis(20);

struct IdleConn {
    stream: UpstreamStream,
    since: Instant,
    expires: Instant,
}

#[derive(Default)]
struct BalanceState {
    /// Address of the snapshot the cursors belong to.
    snapshot: usize,
    cursors: Vec<usize>,
    in_flight: HashMap<SocketAddr, u32>,
    failed_until: HashMap<SocketAddr, Instant>,
}

/// Key of pooled connections: the backend address and the id of the TLS settings the
/// connection was verified with (`upstream_tls::PLAIN` for plain TCP).
type PoolKey = (SocketAddr, u64);

/// One worker's view of the backends.
pub struct Upstreams {
    idle: RefCell<HashMap<PoolKey, Vec<IdleConn>>>,
    balance: RefCell<BalanceState>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Upstreams {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: RefCell::new(HashMap::new()),
            balance: RefCell::new(BalanceState::default()),
            max_idle,
            idle_timeout,
        }
    }

    /// Chooses a server of `service` that is up, skipping those in `exclude` (already tried
    /// for this request). Servers this worker saw fail recently are used only when no other
    /// is left.
    pub fn pick(
        &self,
        compiled: &Compiled,
        service: usize,
        exclude: &[Option<SocketAddr>],
    ) -> Pick {
        let svc = &compiled.services[service];
        if svc.servers.is_empty() {
            return Pick::NoServers;
        }
        let mut state = self.balance.borrow_mut();
        let snapshot_id = compiled as *const Compiled as usize;
        if state.snapshot != snapshot_id {
            state.snapshot = snapshot_id;
            state.cursors = vec![0; compiled.services.len()];
        }
        let now = Instant::now();
        let n = svc.servers.len();
        let mut fallback = None;
        let mut best: Option<(usize, u32)> = None;
        let start = state.cursors[service];
        for offset in 0..n {
            let index = (start + offset) % n;
            let server = &svc.servers[index];
            if server.state != ServerState::Up || exclude.contains(&Some(server.addr)) {
                continue;
            }
            if state
                .failed_until
                .get(&server.addr)
                .is_some_and(|until| *until > now)
            {
                fallback.get_or_insert(index);
                continue;
            }
            match svc.balance {
                Balance::RoundRobin => {
                    best = Some((index, 0));
                    break;
                }
                Balance::LeastInFlight => {
                    let load = state.in_flight.get(&server.addr).copied().unwrap_or(0);
                    if best.is_none_or(|(_, l)| load < l) {
                        best = Some((index, load));
                    }
                }
            }
        }
        let Some(index) = best.map(|(i, _)| i).or(fallback) else {
            return Pick::NoneAvailable;
        };
        state.cursors[service] = (index + 1) % n;
        Pick::Server {
            index,
            addr: svc.servers[index].addr,
        }
    }

    /// Marks `addr` as failing for a short time on this worker.
    pub fn mark_failed(&self, addr: SocketAddr) {
        self.balance
            .borrow_mut()
            .failed_until
            .insert(addr, Instant::now() + FAILURE_COOLDOWN);
    }

    /// Clears a failure mark after a successful exchange.
    pub fn mark_ok(&self, addr: SocketAddr) {
        let mut state = self.balance.borrow_mut();
        if !state.failed_until.is_empty() {
            state.failed_until.remove(&addr);
        }
    }

    /// Counts a request in flight to `addr` until the guard is dropped.
    pub fn start_request(self: &Rc<Self>, addr: SocketAddr) -> InFlight {
        *self.balance.borrow_mut().in_flight.entry(addr).or_insert(0) += 1;
        InFlight {
            upstreams: self.clone(),
            addr,
        }
    }

    /// Takes a pooled connection to `addr` with TLS settings `tls_id` that is still open,
    /// newest first.
    pub fn take_idle(&self, addr: SocketAddr, tls_id: u64) -> Option<UpstreamStream> {
        let mut idle = self.idle.borrow_mut();
        let conns = idle.get_mut(&(addr, tls_id))?;
        let now = Instant::now();
        while let Some(conn) = conns.pop() {
            let checked = now.duration_since(conn.since) < PEEK_AFTER_IDLE || is_open(&conn.stream);
            if conn.expires > now && checked {
                return Some(conn.stream);
            }
        }
        None
    }

    /// Returns a connection to the pool. `backend_keep_alive` is the backend's advertised
    /// `Keep-Alive: timeout`; the connection expires one second before it, or after the
    /// configured idle timeout if that is shorter.
    pub fn put_idle(
        &self,
        addr: SocketAddr,
        tls_id: u64,
        stream: UpstreamStream,
        backend_keep_alive: Option<Duration>,
    ) {
        if self.max_idle == 0 {
            return;
        }
        let mut ttl = self.idle_timeout;
        if let Some(advertised) = backend_keep_alive {
            ttl = ttl.min(advertised.saturating_sub(Duration::from_secs(1)));
        }
        if ttl.is_zero() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let conns = idle.entry((addr, tls_id)).or_default();
        if conns.len() >= self.max_idle {
            // Drop the oldest, which is the most likely to be closed by the backend.
            conns.remove(0);
        }
        let now = Instant::now();
        conns.push(IdleConn {
            stream,
            since: now,
            expires: now + ttl,
        });
    }

    /// Returns the requests in flight per backend on this worker.
    pub fn in_flight_counts(&self) -> Vec<(SocketAddr, u32)> {
        let state = self.balance.borrow();
        state
            .in_flight
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(addr, n)| (*addr, *n))
            .collect()
    }

    /// Closes expired idle connections.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        idle.retain(|_, conns| {
            conns.retain(|c| c.expires > now);
            !conns.is_empty()
        });
        let mut state = self.balance.borrow_mut();
        state.failed_until.retain(|_, until| *until > now);
        state.in_flight.retain(|_, n| *n > 0);
    }

    /// Closes every idle connection (at shutdown).
    pub fn clear(&self) {
        self.idle.borrow_mut().clear();
    }
}

/// A request in flight to one backend; dropping it ends the count.
pub struct InFlight {
    upstreams: Rc<Upstreams>,
    addr: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut state) = self.upstreams.balance.try_borrow_mut() {
            if let Some(n) = state.in_flight.get_mut(&self.addr) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// Returns whether a pooled connection is still open: no EOF and no unexpected bytes waiting.
/// For TLS, any waiting record (a close_notify alert, a late session ticket) also counts as
/// not open, which costs at most a new handshake.
fn is_open(stream: &UpstreamStream) -> bool {
    let fd = stream.raw_fd();
    let mut byte = 0u8;
    // SAFETY: `fd` is the open socket under `stream`, which outlives this call. The buffer
    // is one valid byte on the stack, and MSG_DONTWAIT keeps the call from blocking the worker.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        return err.kind() == std::io::ErrorKind::WouldBlock;
    }
    // 0 is EOF; any byte before a request is a protocol violation by the backend.
    false
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Mutex};

    use edge_proto::{Router, Server, Service, Snapshot};

    use super::*;
    use crate::state;

    fn compiled(states: &[ServerState], balance: Balance) -> Compiled {
        let servers = states
            .iter()
            .enumerate()
            .map(|(i, state)| Server {
                url: format!("http://127.0.0.1:{}", 10_000 + i),
                state: *state,
            })
            .collect();
        let snapshot = Snapshot {
            version: 1,
            routers: vec![Router {
                name: "r".into(),
                rule: "Host(`a.test`)".into(),
                priority: None,
                entrypoints: Vec::new(),
                service: "s".into(),
                tls: false,
                max_request_body_bytes: None,
            }],
            services: vec![Service {
                name: "s".into(),
                servers,
                balance,
                pass_host_header: true,
                servers_transport: None,
            }],
            certificates: Vec::new(),
            default_certificate: None,
            acme_challenges: Default::default(),
            servers_transports: Vec::new(),
        };
        let fallback = crate::tls::self_signed_default().unwrap();
        let tls_cache = crate::upstream_tls::UpstreamTlsCache::default();
        state::compile_with(
            &snapshot,
            fallback,
            &Mutex::new(HashMap::new()),
            1,
            &tls_cache,
        )
        .unwrap()
    }

    fn port_of(pick: Pick) -> u16 {
        match pick {
            Pick::Server { addr, .. } => addr.port(),
            other => panic!("no server picked: {other:?}"),
        }
    }

    #[test]
    fn round_robin_skips_down_and_draining() {
        let states = [
            ServerState::Up,
            ServerState::Down,
            ServerState::Up,
            ServerState::Draining,
        ];
        let compiled = compiled(&states, Balance::RoundRobin);
        let upstreams = Upstreams::new(4, Duration::from_secs(4));
        let ports: Vec<u16> = (0..4)
            .map(|_| port_of(upstreams.pick(&compiled, 0, &[])))
            .collect();
        assert_eq!(ports, vec![10_000, 10_002, 10_000, 10_002]);
    }

    #[test]
    fn all_down_means_none_available() {
        let compiled = compiled(
            &[ServerState::Down, ServerState::Draining],
            Balance::RoundRobin,
        );
        let upstreams = Upstreams::new(4, Duration::from_secs(4));
        assert_eq!(upstreams.pick(&compiled, 0, &[]), Pick::NoneAvailable);
    }

    #[test]
    fn excluded_servers_are_not_repeated() {
        let compiled = compiled(&[ServerState::Up, ServerState::Up], Balance::RoundRobin);
        let upstreams = Upstreams::new(4, Duration::from_secs(4));
        let first = upstreams.pick(&compiled, 0, &[]);
        let Pick::Server { addr, .. } = first else {
            panic!("no server picked");
        };
        let second = upstreams.pick(&compiled, 0, &[Some(addr)]);
        assert_ne!(port_of(second), addr.port());
        let Pick::Server { addr: other, .. } = second else {
            panic!("no server picked");
        };
        assert_eq!(
            upstreams.pick(&compiled, 0, &[Some(addr), Some(other)]),
            Pick::NoneAvailable
        );
    }

    #[test]
    fn failed_server_used_only_as_fallback() {
        let compiled = compiled(&[ServerState::Up, ServerState::Up], Balance::RoundRobin);
        let upstreams = Upstreams::new(4, Duration::from_secs(4));
        upstreams.mark_failed("127.0.0.1:10000".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(port_of(upstreams.pick(&compiled, 0, &[])), 10_001);
        }
        upstreams.mark_failed("127.0.0.1:10001".parse().unwrap());
        assert!(matches!(
            upstreams.pick(&compiled, 0, &[]),
            Pick::Server { .. }
        ));
    }

    #[test]
    fn least_in_flight_prefers_idle_server() {
        let compiled = compiled(&[ServerState::Up, ServerState::Up], Balance::LeastInFlight);
        let upstreams = Rc::new(Upstreams::new(4, Duration::from_secs(4)));
        let busy = upstreams.start_request("127.0.0.1:10000".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(port_of(upstreams.pick(&compiled, 0, &[])), 10_001);
        }
        drop(busy);
        let _other = upstreams.start_request("127.0.0.1:10001".parse().unwrap());
        assert_eq!(port_of(upstreams.pick(&compiled, 0, &[])), 10_000);
    }
}
