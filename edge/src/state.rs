//! The compiled snapshot that workers read, and the process-wide state around it.
//!
//! A [`Compiled`] is built from an [`edge_proto::Snapshot`] on the control thread (rules parsed,
//! regexes compiled, backend names resolved, certificates loaded) and published through one
//! `ArcSwap`. Workers hold a cached `Arc` and see a new snapshot on their next request; nothing
//! on the request path takes a lock.

use std::{
    collections::HashMap,
    net::{SocketAddr, ToSocketAddrs},
    sync::{atomic::AtomicUsize, Arc, Mutex},
};

use arc_swap::ArcSwap;
use edge_proto::{
    rule::{self, Expr, HostPattern, RequestView},
    Balance, ServerState, Snapshot, ENTRYPOINT_WEB, ENTRYPOINT_WEBSECURE,
};
use rustls::sign::CertifiedKey;

use crate::upstream_tls::{UpstreamTls, UpstreamTlsCache};

use crate::{
    metrics::{RouteStats, WorkerMetrics},
    settings::Settings,
    tls::CertStore,
};

/// A snapshot ready for the request path.
#[derive(Debug)]
pub struct Compiled {
    pub version: u64,
    /// Routers sorted by descending priority, then by name.
    pub routers: Vec<CompiledRouter>,
    /// Router indices by exact host, ascending (so in priority order).
    exact: HashMap<String, Vec<u32>>,
    /// Router indices by the parent domain of a one-label wildcard.
    wildcard: HashMap<String, Vec<u32>>,
    /// Routers whose rule implies no host set.
    any_host: Vec<u32>,
    pub services: Vec<CompiledService>,
    pub certs: CertStore,
    /// HTTP-01 key authorizations by token.
    pub acme_http: HashMap<String, Arc<str>>,
}

#[derive(Debug)]
pub struct CompiledRouter {
    pub name: Arc<str>,
    pub expr: Expr,
    pub service: usize,
    pub on_web: bool,
    pub on_websecure: bool,
    /// Serves plain HTTP on `web` instead of redirecting to HTTPS.
    pub plain_http: bool,
    pub max_request_body_bytes: Option<u64>,
    pub stats: Arc<RouteStats>,
}

#[derive(Debug)]
pub struct CompiledService {
    pub servers: Vec<CompiledServer>,
    pub balance: Balance,
    pub pass_host_header: bool,
}

#[derive(Debug)]
pub struct CompiledServer {
    pub addr: SocketAddr,
    /// `host:port` as written in the URL, sent as Host when the client's is not passed on.
    pub authority: String,
    pub state: ServerState,
    /// The URL scheme is `h2c`: requests go over HTTP/2 without TLS, as gRPC needs.
    pub h2c: bool,
    /// TLS settings when the URL scheme is `https`. Requests go over HTTP/2 when the backend
    /// chooses `h2` in ALPN, else over HTTP/1.1.
    pub tls: Option<Arc<UpstreamTls>>,
}

impl CompiledServer {
    /// Returns the pool key part of this server's connections: its TLS settings' id, or
    /// [`crate::upstream_tls::PLAIN`].
    pub fn tls_id(&self) -> u64 {
        self.tls
            .as_ref()
            .map_or(crate::upstream_tls::PLAIN, |tls| tls.id)
    }
}

/// Which listener a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    Web,
    WebSecure,
}

impl EntryPoint {
    pub fn name(self) -> &'static str {
        match self {
            EntryPoint::Web => ENTRYPOINT_WEB,
            EntryPoint::WebSecure => ENTRYPOINT_WEBSECURE,
        }
    }
}

impl Shared {
    /// Returns the requests in flight per backend, summed over workers.
    pub fn in_flight_totals(&self) -> std::collections::BTreeMap<String, u64> {
        let mut totals = std::collections::BTreeMap::new();
        for worker in self.in_flight.iter() {
            let counts = worker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (addr, n) in counts.iter() {
                *totals.entry(addr.to_string()).or_insert(0) += u64::from(*n);
            }
        }
        totals
    }
}

impl Compiled {
    /// Returns the highest-priority router on `entrypoint` whose rule matches. `req.host()`
    /// must already be normalised (lowercase, no port, no trailing dot).
    pub fn route(&self, entrypoint: EntryPoint, req: &dyn RequestView) -> Option<&CompiledRouter> {
        let host = req.host();
        let exact = self.exact.get(host).map_or(&[][..], Vec::as_slice);
        let wildcard = host
            .split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .map_or(&[][..], Vec::as_slice);
        let (mut a, mut b, mut c) = (
            exact.iter().peekable(),
            wildcard.iter().peekable(),
            self.any_host.iter().peekable(),
        );
        loop {
            // Merge the three ascending index lists so routers are tried in priority order.
            let next = [a.peek(), b.peek(), c.peek()]
                .into_iter()
                .flatten()
                .min()
                .copied()
                .copied()?;
            for it in [&mut a, &mut b, &mut c] {
                if it.peek() == Some(&&next) {
                    it.next();
                }
            }
            let router = &self.routers[next as usize];
            let on_entrypoint = match entrypoint {
                EntryPoint::Web => router.on_web,
                EntryPoint::WebSecure => router.on_websecure,
            };
            if on_entrypoint && router.expr.matches(req) {
                return Some(router);
            }
        }
    }
}

/// Requests in flight per backend address on one worker.
pub type InFlightCounts = Vec<(SocketAddr, u32)>;

/// State shared by the workers, the admin listener and the control thread.
pub struct Shared {
    pub settings: Settings,
    pub current: Arc<ArcSwap<Compiled>>,
    pub metrics: Box<[WorkerMetrics]>,
    /// Per-route counters by router name, kept across reloads. Locked only when compiling a
    /// snapshot and when rendering /metrics, never on the request path.
    pub route_stats: Mutex<HashMap<String, Arc<RouteStats>>>,
    /// Counters for requests answered without a route (404, redirects, 400s).
    pub unrouted_stats: Arc<RouteStats>,
    pub ready_workers: AtomicUsize,
    /// Requests in flight per backend: one list per worker, then one per worker's QUIC
    /// thread (index `workers + id`), republished by each thread every housekeeping tick so
    /// that the request path takes no lock.
    pub in_flight: Box<[Mutex<InFlightCounts>]>,
    pub fallback_cert: Arc<CertifiedKey>,
    /// TLS client settings of `https://` backends, kept across snapshots.
    pub upstream_tls: UpstreamTlsCache,
    pub ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// The XDP filter and SO_REUSEPORT steering; dropped (and detached) when the edge exits.
    pub kernel: crate::xdp::Kernel,
}

/// One reason a snapshot cannot be compiled, with the key path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct CompileError {
    pub key: String,
    pub message: String,
}

/// Compiles `snapshot`: validates it, parses every rule, resolves backend addresses and loads
/// certificates.
///
/// # Errors
/// Every problem found, not just the first.
pub fn compile(snapshot: &Snapshot, shared: &Shared) -> Result<Compiled, Vec<CompileError>> {
    compile_with(
        snapshot,
        shared.fallback_cert.clone(),
        &shared.route_stats,
        shared.settings.workers,
        &shared.upstream_tls,
    )
}

pub fn compile_with(
    snapshot: &Snapshot,
    fallback_cert: Arc<CertifiedKey>,
    route_stats: &Mutex<HashMap<String, Arc<RouteStats>>>,
    workers: usize,
    tls_cache: &UpstreamTlsCache,
) -> Result<Compiled, Vec<CompileError>> {
    let mut errors = Vec::new();
    if let Err(e) = edge_proto::file::validate(snapshot) {
        errors.extend(e.0.into_iter().map(|e| CompileError {
            key: e.key.clone(),
            message: match &e.value {
                Some(v) => format!("{} (value {v:?})", e.message),
                None => e.message.clone(),
            },
        }));
        return Err(errors);
    }

    let transports: HashMap<&str, &edge_proto::ServersTransport> = snapshot
        .servers_transports
        .iter()
        .map(|transport| (transport.name.as_str(), transport))
        .collect();
    let mut tls_ids = Vec::new();
    let mut services = Vec::with_capacity(snapshot.services.len());
    let mut service_index = HashMap::new();
    for service in &snapshot.services {
        // `validate` has checked that the named transport exists.
        let transport = service
            .servers_transport
            .as_deref()
            .and_then(|name| transports.get(name).copied());
        let mut servers = Vec::with_capacity(service.servers.len());
        for (i, server) in service.servers.iter().enumerate() {
            let key = || format!("services[{}].servers[{i}].url", service.name);
            let (addr, authority) = match resolve_server_url(&server.url) {
                Ok(resolved) => resolved,
                Err(message) => {
                    errors.push(CompileError {
                        key: key(),
                        message,
                    });
                    continue;
                }
            };
            let tls = if server.url.starts_with("https://") {
                match tls_cache.get(transport, url_host(&authority)) {
                    Ok(tls) => {
                        tls_ids.push(tls.id);
                        Some(tls)
                    }
                    Err(e) => {
                        errors.push(CompileError {
                            key: key(),
                            message: format!("TLS settings for {:?}: {e}", server.url),
                        });
                        continue;
                    }
                }
            } else {
                None
            };
            servers.push(CompiledServer {
                addr,
                authority,
                state: server.state,
                h2c: server.url.starts_with("h2c://"),
                tls,
            });
        }
        service_index.insert(service.name.as_str(), services.len());
        services.push(CompiledService {
            servers,
            balance: service.balance,
            pass_host_header: service.pass_host_header,
        });
    }

    let mut stats_registry = route_stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut routers = Vec::with_capacity(snapshot.routers.len());
    for router in &snapshot.routers {
        let expr = match rule::parse(&router.rule) {
            Ok(expr) => expr,
            Err(e) => {
                errors.push(CompileError {
                    key: format!("routers[{}].rule", router.name),
                    message: e.to_string(),
                });
                continue;
            }
        };
        let Some(&service) = service_index.get(router.service.as_str()) else {
            errors.push(CompileError {
                key: format!("routers[{}].service", router.name),
                message: format!("service {:?} not found", router.service),
            });
            continue;
        };
        let stats = stats_registry
            .entry(router.name.clone())
            .or_insert_with(|| Arc::new(RouteStats::new(workers)))
            .clone();
        routers.push((
            router.effective_priority(),
            CompiledRouter {
                name: Arc::from(router.name.as_str()),
                expr,
                service,
                on_web: router.is_on_entrypoint(ENTRYPOINT_WEB),
                on_websecure: router.is_on_entrypoint(ENTRYPOINT_WEBSECURE),
                plain_http: router.is_plain_http(),
                max_request_body_bytes: router.max_request_body_bytes,
                stats,
            },
        ));
    }
    drop(stats_registry);

    let mut acme_http = HashMap::new();
    for (i, challenge) in snapshot.acme_challenges.http01.iter().enumerate() {
        let token_ok = !challenge.token.is_empty()
            && challenge
                .token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if token_ok && !challenge.key_authorization.contains(['\r', '\n']) {
            acme_http.insert(
                challenge.token.clone(),
                Arc::<str>::from(challenge.key_authorization.as_str()),
            );
        } else {
            errors.push(CompileError {
                key: format!("acme_challenges.http01[{i}]"),
                message: "invalid token or key authorization: a token is base64url and \
                          neither contains a line break"
                    .to_owned(),
            });
        }
    }

    let certs = match CertStore::build(
        &snapshot.certificates,
        snapshot.default_certificate.as_ref(),
        fallback_cert,
        &snapshot.acme_challenges.tls_alpn01,
    ) {
        Ok(store) => Some(store),
        Err(cert_errors) => {
            errors.extend(cert_errors.into_iter().map(|e| CompileError {
                key: "tls.certificates".to_owned(),
                message: e.to_string(),
            }));
            None
        }
    };
    let Some(certs) = certs.filter(|_| errors.is_empty()) else {
        return Err(errors);
    };
    tls_cache.retain_ids(&tls_ids);

    // Descending priority; equal priorities are ordered by name so the choice is
    // deterministic (Traefik leaves that order unspecified).
    routers.sort_by(|(pa, ra), (pb, rb)| pb.cmp(pa).then_with(|| ra.name.cmp(&rb.name)));
    let routers: Vec<CompiledRouter> = routers.into_iter().map(|(_, r)| r).collect();

    let mut exact: HashMap<String, Vec<u32>> = HashMap::new();
    let mut wildcard: HashMap<String, Vec<u32>> = HashMap::new();
    let mut any_host = Vec::new();
    for (i, router) in routers.iter().enumerate() {
        let i = i as u32;
        match router.expr.host_constraint() {
            Some(patterns) if !patterns.iter().any(|p| matches!(p, HostPattern::Any)) => {
                for pattern in patterns {
                    let list = match pattern {
                        HostPattern::Exact(host) => exact.entry(host).or_default(),
                        HostPattern::Wildcard(parent) => wildcard.entry(parent).or_default(),
                        HostPattern::Any => continue,
                    };
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
            }
            _ => any_host.push(i),
        }
    }

    Ok(Compiled {
        version: snapshot.version,
        routers,
        exact,
        wildcard,
        any_host,
        services,
        certs,
        acme_http,
    })
}

/// Returns the host of a `host:port` authority, IPv6 addresses without brackets.
fn url_host(authority: &str) -> &str {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'))
        .unwrap_or(host)
}

/// Parses `SCHEME://HOST:PORT[/...]` and resolves HOST. The port defaults to 443 for `https`
/// and 80 otherwise. Runs on the control thread only, since name resolution may block.
fn resolve_server_url(url: &str) -> Result<(SocketAddr, String), String> {
    let (rest, default_port) = if let Some(rest) = url.strip_prefix("https://") {
        (rest, 443)
    } else if let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("h2c://"))
    {
        (rest, 80)
    } else {
        return Err(format!(
            "invalid server URL {url:?}: only http://, https:// and h2c:// are supported"
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("invalid server URL {url:?}: missing host"));
    }
    let with_port = if authority.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')
    }) && !authority.ends_with(']')
    {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    let mut addrs = with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve server URL {url:?}: {e}"))?;
    let addr = addrs
        .next()
        .ok_or_else(|| format!("server URL {url:?} resolves to no address"))?;
    Ok((addr, with_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_url_resolution() {
        let (addr, authority) = resolve_server_url("http://127.0.0.1:3000/").unwrap();
        assert_eq!(addr, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(authority, "127.0.0.1:3000");
        let (addr, _) = resolve_server_url("http://[::1]:8080").unwrap();
        assert_eq!(addr, "[::1]:8080".parse().unwrap());
        let (addr, _) = resolve_server_url("http://127.0.0.1").unwrap();
        assert_eq!(addr.port(), 80);
        let (addr, authority) = resolve_server_url("https://127.0.0.1").unwrap();
        assert_eq!(addr.port(), 443);
        assert_eq!(authority, "127.0.0.1:443");
        assert!(resolve_server_url("ftp://127.0.0.1:1").is_err());
        assert!(resolve_server_url("http://:80").is_err());
    }

    #[test]
    fn url_host_strips_port_and_brackets() {
        assert_eq!(url_host("backend.internal:8443"), "backend.internal");
        assert_eq!(url_host("[::1]:443"), "::1");
        assert_eq!(url_host("10.0.0.5:443"), "10.0.0.5");
    }
}
