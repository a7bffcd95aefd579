//! Listening sockets: one SO_REUSEPORT socket per worker on each address, and a guard against
//! sharing a port with another process.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Accept queue length of each listening socket.
const BACKLOG: i32 = 4096;
/// How long a port in use is checked again before the edge gives up on it.
const IN_USE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Why the listeners could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another socket already listens there. With SO_REUSEPORT a stale process would silently
    /// receive a share of the connections, so the edge does not start.
    #[error("address {addr} is already in use by another process; stop it (a stale edge would silently take a share of the connections) or choose another address")]
    InUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {error}{}", permission_hint(error))]
    Bind { addr: SocketAddr, error: io::Error },
}

fn permission_hint(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::PermissionDenied {
        "; ports below 1024 need root or CAP_NET_BIND_SERVICE (for example `setcap cap_net_bind_service=+ep edge`)"
    } else {
        ""
    }
}

/// Binds `count` listening sockets to `addr`, all with SO_REUSEPORT. Port 0 picks one free
/// port for all of them.
///
/// # Errors
/// [`ListenError::InUse`] when any other socket listens on the address.
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, ListenError> {
    if addr.port() != 0 {
        // NOTE: the listeners of an edge that just exited stay in LISTEN for a moment while
        // the kernel frees its SO_REUSEPORT socket arrays. A busy port is therefore checked
        // again for a short while before it counts as taken by another process.
        let deadline = std::time::Instant::now() + IN_USE_GRACE;
        loop {
            match ensure_unused(addr) {
                Err(ListenError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                result => break result?,
            }
        }
    }
    let first = bind_one(addr).map_err(|source| ListenError::Bind {
        addr,
        error: source,
    })?;
    let bound = first.local_addr().map_err(|source| ListenError::Bind {
        addr,
        error: source,
    })?;
    let mut listeners = vec![first];
    for _ in 1..count.max(1) {
        listeners.push(bind_one(bound).map_err(|source| ListenError::Bind {
            addr: bound,
            error: source,
        })?);
    }
    Ok(listeners)
}

/// Binds a socket without SO_REUSEPORT: this fails with EADDRINUSE while any socket, with or
/// without SO_REUSEPORT, listens on the address.
fn ensure_unused(addr: SocketAddr) -> Result<(), ListenError> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|source| ListenError::Bind {
            addr,
            error: source,
        })?;
    socket
        .set_reuse_address(true)
        .map_err(|source| ListenError::Bind {
            addr,
            error: source,
        })?;
    match socket.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(ListenError::InUse { addr }),
        Err(source) => Err(ListenError::Bind {
            addr,
            error: source,
        }),
    }
    // NOTE: a process that starts listening between this probe and the real bind is not
    // detected; the window is a few microseconds at start.
}

/// Binds `count` UDP sockets to `addr` (a port already chosen), all with SO_REUSEPORT, for the
/// QUIC endpoints.
///
/// # Errors
/// [`ListenError::Bind`] when a socket cannot be bound.
// NOTE: unlike TCP there is no guard against a stale process sharing the UDP port.
pub fn bind_udp_reuseport(
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<std::net::UdpSocket>, ListenError> {
    let bind = || -> io::Result<std::net::UdpSocket> {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        Ok(socket.into())
    };
    (0..count.max(1))
        .map(|_| bind().map_err(|error| ListenError::Bind { addr, error }))
        .collect()
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_shares_one_port() {
        let listeners = bind_reuseport("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        assert!(listeners
            .iter()
            .all(|l| l.local_addr().unwrap().port() == port));
    }

    #[test]
    fn occupied_port_is_rejected() {
        let listeners = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let err = bind_reuseport(addr, 1).unwrap_err();
        assert!(matches!(err, ListenError::InUse { .. }), "{err}");
    }
}
