//! Keep-alive HTTP/1.1 connections from one QUIC thread to its backends: idle hyper senders by
//! backend address, with the same limits as a worker's pool (`--upstream-max-idle`,
//! `--upstream-idle-timeout`, one second less than a backend's `Keep-Alive: timeout`).
//!
//! The pool belongs to one QUIC thread (`!Send`). Each connection is driven by its own task on
//! that thread, which reads an idle connection too, so a close by the backend is seen as soon
//! as it arrives and such a connection is never handed out again.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use hyper::client::conn::http1::SendRequest;

use super::UpstreamBody;

/// A handle that sends requests on one backend connection.
pub(super) type Sender = SendRequest<UpstreamBody>;

/// A backend address and the id of its TLS settings ([`crate::upstream_tls::PLAIN`] without
/// TLS), so that servers reached with different settings never share a connection.
pub(super) type PoolKey = (SocketAddr, u64);

struct IdleSender {
    sender: Sender,
    expires: Instant,
}

/// One QUIC thread's idle backend connections.
pub(super) struct H1Pool {
    idle: RefCell<HashMap<PoolKey, Vec<IdleSender>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl H1Pool {
    pub(super) fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: RefCell::new(HashMap::new()),
            max_idle,
            idle_timeout,
        }
    }

    /// Takes the newest idle connection for `key` that has not expired and that hyper still
    /// considers open and ready for a request.
    pub(super) fn take(&self, key: PoolKey) -> Option<Sender> {
        let mut idle = self.idle.borrow_mut();
        let conns = idle.get_mut(&key)?;
        let now = Instant::now();
        while let Some(conn) = conns.pop() {
            if conn.expires > now && conn.sender.is_ready() {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Returns a connection to the pool. `backend_keep_alive` is the backend's advertised
    /// `Keep-Alive: timeout`; the connection expires one second before it, or after the
    /// configured idle timeout if that is shorter.
    pub(super) fn put(&self, key: PoolKey, sender: Sender, backend_keep_alive: Option<Duration>) {
        if self.max_idle == 0 || !sender.is_ready() {
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
        let conns = idle.entry(key).or_default();
        if conns.len() >= self.max_idle {
            // Drop the oldest, which is the most likely to be closed by the backend.
            conns.remove(0);
        }
        conns.push(IdleSender {
            sender,
            expires: Instant::now() + ttl,
        });
    }

    /// Closes expired idle connections and drops those the backend closed.
    pub(super) fn sweep(&self) {
        let now = Instant::now();
        self.idle.borrow_mut().retain(|_, conns| {
            conns.retain(|c| c.expires > now && !c.sender.is_closed());
            !conns.is_empty()
        });
    }

    /// Closes every idle connection (at shutdown).
    pub(super) fn clear(&self) {
        self.idle.borrow_mut().clear();
    }
}
