//! Active health probes of backends, with rise and fall thresholds so that one slow probe
//! does not eject a healthy backend and one lucky probe does not admit a broken one.
//!
//! Each backend has its own probe task. State is keyed by container id and address, so a
//! re-created container never inherits the state of the one it replaces.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
    task::JoinHandle,
};
use tracing::{debug, info};

use crate::desired::HealthSpec;

/// Identity of one probed backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeKey {
    pub container_id: String,
    pub addr: SocketAddr,
}

/// Consecutive results needed to change state.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// Passing probes before a backend joins.
    pub rise: u32,
    /// Failing probes before a backend leaves.
    pub fall: u32,
}

/// Health record of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeState {
    pub healthy: bool,
    pub consecutive_passes: u32,
    pub consecutive_failures: u32,
    /// Outcome of the last probe, for example `200` or `connect failed: ...`.
    pub last_result: Option<String>,
    pub last_probe: Option<SystemTime>,
    /// How many probes ran; 0 means the state is only the initial guess.
    pub probes: u64,
}

impl ProbeState {
    fn new(healthy: bool) -> Self {
        Self {
            healthy,
            consecutive_passes: 0,
            consecutive_failures: 0,
            last_result: None,
            last_probe: None,
            probes: 0,
        }
    }

    /// Records one probe result. Returns whether `healthy` changed.
    fn record(&mut self, passed: bool, result: String, thresholds: Thresholds) -> bool {
        self.probes += 1;
        self.last_result = Some(result);
        self.last_probe = Some(SystemTime::now());
        if passed {
            self.consecutive_passes += 1;
            self.consecutive_failures = 0;
            if !self.healthy && self.consecutive_passes >= thresholds.rise {
                self.healthy = true;
                return true;
            }
        } else {
            self.consecutive_failures += 1;
            self.consecutive_passes = 0;
            if self.healthy && self.consecutive_failures >= thresholds.fall {
                self.healthy = false;
                return true;
            }
        }
        false
    }
}

struct Probe {
    spec: HealthSpec,
    task: JoinHandle<()>,
}

/// Runs one probe task per backend and keeps their states.
pub struct Prober {
    states: Arc<Mutex<HashMap<ProbeKey, ProbeState>>>,
    probes: HashMap<ProbeKey, Probe>,
    /// Initial health by backend address, from the snapshot the edge served before this agent
    /// started, so a restarted agent does not take healthy backends out of service.
    seeds: HashMap<SocketAddr, bool>,
    thresholds: Thresholds,
    changed: watch::Sender<u64>,
}

impl Prober {
    pub fn new(thresholds: Thresholds, changed: watch::Sender<u64>) -> Self {
        Self {
            states: Arc::new(Mutex::new(HashMap::new())),
            probes: HashMap::new(),
            seeds: HashMap::new(),
            thresholds,
            changed,
        }
    }

    /// Sets the initial health of backends that are not probed yet.
    pub fn seed(&mut self, seeds: HashMap<SocketAddr, bool>) {
        self.seeds = seeds;
    }

    /// Forgets the seeds once the backends that existed at start have their probes: a
    /// container started later may reuse a seeded address and must earn its health.
    pub fn clear_seeds(&mut self) {
        self.seeds.clear();
    }

    /// Starts probes for new backends and stops those of backends that are gone.
    pub fn sync(&mut self, wanted: &[(ProbeKey, HealthSpec)]) {
        let target_keys: HashMap<&ProbeKey, &HealthSpec> =
            wanted.iter().map(|(k, s)| (k, s)).collect();
        self.probes.retain(|key, probe| {
            let keep = target_keys
                .get(key)
                .is_some_and(|spec| **spec == probe.spec);
            if !keep {
                probe.task.abort();
            }
            keep
        });
        {
            let mut states = lock(&self.states);
            states.retain(|key, _| target_keys.contains_key(key));
        }
        for (key, spec) in wanted {
            if self.probes.contains_key(key) {
                continue;
            }
            let initial = self.seeds.get(&key.addr).copied().unwrap_or(false);
            lock(&self.states)
                .entry(key.clone())
                .or_insert_with(|| ProbeState::new(initial));
            let task = tokio::spawn(probe_loop(
                key.clone(),
                spec.clone(),
                self.states.clone(),
                self.thresholds,
                self.changed.clone(),
            ));
            self.probes.insert(
                key.clone(),
                Probe {
                    spec: spec.clone(),
                    task,
                },
            );
        }
    }

    pub fn state(&self, key: &ProbeKey) -> Option<ProbeState> {
        lock(&self.states).get(key).cloned()
    }

    /// Returns whether every probed backend has had at least one probe.
    pub fn all_probed(&self) -> bool {
        lock(&self.states).values().all(|s| s.probes > 0)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        for probe in self.probes.values() {
            probe.task.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn probe_loop(
    key: ProbeKey,
    spec: HealthSpec,
    states: Arc<Mutex<HashMap<ProbeKey, ProbeState>>>,
    thresholds: Thresholds,
    changed: watch::Sender<u64>,
) {
    // Spread probes of backends discovered together over the first interval.
    let jitter = Duration::from_millis(u64::from(key.addr.port() % 97) * 3);
    tokio::time::sleep(jitter.min(spec.interval / 4)).await;
    loop {
        let started = Instant::now();
        let (passed, result) = probe_once(key.addr, &spec).await;
        let flipped = {
            let mut states = lock(&states);
            let Some(state) = states.get_mut(&key) else {
                return;
            };
            let first = state.probes == 0;
            let flipped = state.record(passed, result.clone(), thresholds);
            if flipped {
                info!(container = %key.container_id, addr = %key.addr, healthy = state.healthy, result, "backend health changed");
            } else {
                debug!(container = %key.container_id, addr = %key.addr, passed, result, "probe");
            }
            flipped || first
        };
        if flipped {
            changed.send_modify(|n| *n += 1);
        }
        let elapsed = started.elapsed();
        tokio::time::sleep(spec.interval.saturating_sub(elapsed)).await;
    }
}

/// Runs one probe: `METHOD PATH` over HTTP/1.1, passing on the expected status (any 2xx by
/// default) within the timeout.
pub async fn probe_once(addr: SocketAddr, spec: &HealthSpec) -> (bool, String) {
    let target = match spec.port {
        Some(port) => SocketAddr::new(addr.ip(), port),
        None => addr,
    };
    match tokio::time::timeout(spec.timeout, request_status(target, spec)).await {
        Ok(Ok(status)) => {
            let passed = match spec.expected_status {
                Some(expected) => status == expected,
                None => (200..300).contains(&status),
            };
            (passed, status.to_string())
        }
        Ok(Err(e)) => (false, e),
        Err(_) => (false, format!("timed out after {:?}", spec.timeout)),
    }
}

async fn request_status(addr: SocketAddr, spec: &HealthSpec) -> Result<u16, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    match spec.scheme.as_str() {
        "h2c" => request_status_h2c(stream, addr, spec).await,
        "https" => {
            let stream = tls_connect(stream, addr, spec).await?;
            request_status_http1(stream, addr, spec).await
        }
        _ => request_status_http1(stream, addr, spec).await,
    }
}

/// Runs the TLS handshake of an `https` probe, verifying the backend as the edge does, and
/// offering only HTTP/1.1 in ALPN.
async fn tls_connect(
    stream: TcpStream,
    addr: SocketAddr,
    spec: &HealthSpec,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    use edge_proto::client_tls;

    let transport = spec.transport.as_ref();
    let config =
        client_tls::client_config(transport, client_tls::ALPN_HTTP1).map_err(|e| e.to_string())?;
    let name =
        client_tls::server_name(transport, &addr.ip().to_string()).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))
}

/// Sends the probe over HTTP/1.1 and returns the status of the response.
async fn request_status_http1<S>(
    mut stream: S,
    addr: SocketAddr,
    spec: &HealthSpec,
) -> Result<u16, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let host = spec.hostname.clone().unwrap_or_else(|| addr.to_string());
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: edge-agent\r\nConnection: close\r\n",
        spec.method, spec.path
    );
    for (name, value) in &spec.headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    let mut buf = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            return Err("closed before the status line".into());
        }
        len += n;
    }
    let line = std::str::from_utf8(&buf[..len]).map_err(|_| "invalid status line".to_owned())?;
    if !line.starts_with("HTTP/1.") {
        return Err("not an HTTP response".into());
    }
    line.get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "invalid status line".to_owned())
}

/// Sends the probe over HTTP/2 without TLS (prior knowledge) and returns the response status.
async fn request_status_h2c(
    stream: TcpStream,
    addr: SocketAddr,
    spec: &HealthSpec,
) -> Result<u16, String> {
    let (mut sender, connection) = h2::client::handshake(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let host = spec.hostname.clone().unwrap_or_else(|| addr.to_string());
    let mut request = http::Request::builder()
        .method(spec.method.as_str())
        .uri(format!("http://{host}{}", spec.path))
        .header("user-agent", "edge-agent");
    for (name, value) in &spec.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(())
        .map_err(|e| format!("invalid probe request: {e}"))?;
    let result = match sender.send_request(request, true) {
        Ok((response, _)) => response
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| format!("HTTP/2 request failed: {e}")),
        Err(e) => Err(format!("HTTP/2 request failed: {e}")),
    };
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use edge_proto::ServersTransport;

    use super::*;

    const THRESHOLDS: Thresholds = Thresholds { rise: 2, fall: 3 };

    #[test]
    fn rise_needs_consecutive_passes() {
        let mut state = ProbeState::new(false);
        assert!(!state.record(true, "200".into(), THRESHOLDS));
        assert!(!state.record(false, "503".into(), THRESHOLDS));
        assert!(!state.record(true, "200".into(), THRESHOLDS));
        assert!(state.record(true, "200".into(), THRESHOLDS));
        assert!(state.healthy);
    }

    #[test]
    fn fall_needs_consecutive_failures() {
        let mut state = ProbeState::new(true);
        assert!(!state.record(false, "timeout".into(), THRESHOLDS));
        assert!(!state.record(false, "timeout".into(), THRESHOLDS));
        assert!(!state.record(true, "200".into(), THRESHOLDS));
        assert!(state.healthy);
        for _ in 0..2 {
            assert!(!state.record(false, "503".into(), THRESHOLDS));
        }
        assert!(state.record(false, "503".into(), THRESHOLDS));
        assert!(!state.healthy);
    }

    #[tokio::test]
    async fn seeds_apply_only_at_start() {
        let (changed, _rx) = watch::channel(0);
        let mut prober = Prober::new(THRESHOLDS, changed);
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        prober.seed(HashMap::from([(addr, true)]));
        let spec = HealthSpec {
            interval: Duration::from_secs(3600),
            ..HealthSpec::default()
        };
        let old = ProbeKey {
            container_id: "old".into(),
            addr,
        };
        prober.sync(&[(old.clone(), spec.clone())]);
        assert!(prober.state(&old).unwrap().healthy);

        // A new container that reuses the address must earn its health.
        prober.clear_seeds();
        let new = ProbeKey {
            container_id: "new".into(),
            addr,
        };
        prober.sync(&[(new.clone(), spec)]);
        assert!(!prober.state(&new).unwrap().healthy);
    }

    #[tokio::test]
    async fn h2c_probe_reads_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(stream).await.unwrap();
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let status = if request.uri().path() == "/health" {
                    200
                } else {
                    404
                };
                let response = http::Response::builder().status(status).body(()).unwrap();
                respond.send_response(response, true).unwrap();
            }
        });
        let spec = HealthSpec {
            scheme: "h2c".to_owned(),
            ..HealthSpec::default()
        };
        assert_eq!(probe_once(addr, &spec).await, (true, "200".to_owned()));
    }

    #[tokio::test]
    async fn probe_reads_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let response = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let spec = HealthSpec::default();
        assert_eq!(probe_once(addr, &spec).await, (true, "200".to_owned()));
        assert_eq!(probe_once(addr, &spec).await, (false, "503".to_owned()));
    }

    /// Starts a TLS server on 127.0.0.1 with a leaf certificate for 127.0.0.1 signed by a
    /// new CA, which responds to every request with 200. Returns its address and the CA's PEM.
    async fn tls_backend() -> (SocketAddr, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        use rustls_pki_types::{pem::PemObject, PrivateKeyDer};

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let response = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        (addr, ca.pem())
    }

    #[tokio::test]
    async fn https_probe_verifies_backend() {
        let (addr, ca_pem) = tls_backend().await;
        let https = |transport: Option<ServersTransport>| HealthSpec {
            scheme: "https".to_owned(),
            transport,
            ..HealthSpec::default()
        };

        let trusted = ServersTransport {
            name: "internal".into(),
            root_cas: vec![edge_proto::RootCaPem {
                pem: ca_pem,
                origin: "test CA".into(),
            }],
            ..ServersTransport::default()
        };
        assert_eq!(
            probe_once(addr, &https(Some(trusted.clone()))).await,
            (true, "200".to_owned())
        );

        let (passed, result) = probe_once(addr, &https(None)).await;
        assert!(!passed);
        assert!(result.starts_with("TLS handshake failed"), "{result}");
        assert!(result.contains("UnknownIssuer"), "{result}");

        let wrong_name = ServersTransport {
            server_name: Some("other.internal".into()),
            ..trusted
        };
        let (passed, result) = probe_once(addr, &https(Some(wrong_name))).await;
        assert!(!passed);
        assert!(
            result.contains("not valid for name \"other.internal\""),
            "{result}"
        );

        let insecure = ServersTransport {
            name: "insecure".into(),
            insecure_skip_verify: true,
            ..ServersTransport::default()
        };
        assert_eq!(
            probe_once(addr, &https(Some(insecure))).await,
            (true, "200".to_owned())
        );
    }
}
