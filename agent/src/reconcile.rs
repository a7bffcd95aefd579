//! The agent's main loop: whenever Docker, a probe, the routes file or an operator changes
//! something, rebuild the desired routes, decide each backend's state, and push a complete
//! snapshot to the edge if it differs from the last one the edge acknowledged.
//!
//! Backend state, in order: drained by an operator or stopping (`kill`/`stop` seen) means
//! `draining`; a Docker HEALTHCHECK that is not `healthy` means `down`; otherwise the agent's
//! own probe decides, with rise and fall thresholds.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use edge_proto::{control::EdgeMessage, ServerState, Snapshot};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::{
    acme::AcmeHandle,
    ctl::{CtlCall, CtlRequest, CtlResponse},
    desired::{self, AgentOptions, Desired, DesiredServer},
    docker::DockerView,
    edge_link::EdgeLink,
    health::{ProbeKey, Prober, Thresholds},
    model::{DockerHealth, Lifecycle},
};

/// Time to let a burst of changes settle before rebuilding.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Maximum wait for the first probe of every backend before the first push after a start.
const FIRST_PUSH_WAIT: Duration = Duration::from_secs(10);
/// Interval of retries while the edge is unreachable or behind.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of the main loop.
pub struct LoopSettings {
    pub options: AgentOptions,
    pub thresholds: Thresholds,
    pub routes_file: Option<PathBuf>,
    /// The edge's persisted snapshot, read once to seed backend health.
    pub seed_file: Option<PathBuf>,
    /// Whether Docker is used at all; without it only the routes file is served.
    pub docker_enabled: bool,
    /// File that keeps operator drains across restarts.
    pub drains_file: Option<PathBuf>,
    /// The XDP filter's pinned maps and the rate limits to apply.
    pub filter: crate::filter::FilterSettings,
}

/// The edge's last reply, as the agent recorded it.
#[derive(Debug, Default)]
struct EdgeState {
    acked_version: Option<u64>,
    last_error: Option<String>,
    connected: bool,
}

pub struct Reconciler {
    settings: LoopSettings,
    docker: Arc<Mutex<DockerView>>,
    prober: Prober,
    edge: EdgeLink,
    edge_state: EdgeState,
    drained: BTreeSet<String>,
    /// Problems already logged, so each is logged once while it lasts.
    logged_errors: BTreeSet<String>,
    file_snapshot: Option<Snapshot>,
    /// Certificates that the routes file's routers request from ACME resolvers.
    file_certificates: Vec<desired::CertificateRequest>,
    file_error: Option<String>,
    acme: AcmeHandle,
    desired: Desired,
    /// The last snapshot sent, and whether the edge acknowledged it.
    pushed: Option<(Snapshot, bool)>,
    version: u64,
    started: Instant,
}

impl Reconciler {
    pub fn new(
        settings: LoopSettings,
        docker: Arc<Mutex<DockerView>>,
        edge: EdgeLink,
        changed: watch::Sender<u64>,
        acme: AcmeHandle,
    ) -> Self {
        let mut prober = Prober::new(settings.thresholds, changed);
        if let Some(path) = &settings.seed_file {
            prober.seed(read_seed(path));
        }
        let drained = load_drains(settings.drains_file.as_deref());
        Self {
            settings,
            docker,
            prober,
            edge,
            edge_state: EdgeState::default(),
            drained,
            logged_errors: BTreeSet::new(),
            file_snapshot: None,
            file_certificates: Vec::new(),
            file_error: None,
            acme,
            desired: Desired::default(),
            pushed: None,
            version: 0,
            started: Instant::now(),
        }
    }

    /// Runs until the process exits.
    pub async fn run(
        mut self,
        mut changed: watch::Receiver<u64>,
        mut calls: mpsc::Receiver<CtlCall>,
    ) {
        self.load_routes_file();
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        loop {
            tokio::select! {
                result = changed.changed() => {
                    if result.is_err() {
                        return;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    changed.borrow_and_update();
                }
                Some((request, reply)) = calls.recv() => {
                    let response = self.handle(request).await;
                    let _ = reply.send(response);
                }
                _ = retry.tick() => {}
            }
            self.reconcile().await;
        }
    }

    fn load_routes_file(&mut self) {
        let Some(path) = &self.settings.routes_file else {
            return;
        };
        match edge_proto::file::load_routes(path) {
            Ok(routes) => {
                self.file_certificates = desired::file_certificate_requests(&routes);
                self.file_snapshot = Some(routes.snapshot);
                self.file_error = None;
                info!(path = %path.display(), "routes file loaded");
            }
            Err(errors) => {
                let message = errors.to_string();
                error!(path = %path.display(), errors = %message, "invalid routes file, keeping the previous one");
                self.file_error = Some(message);
            }
        }
    }

    /// Rebuilds the desired state and pushes it when it changed or the edge is behind.
    async fn reconcile(&mut self) {
        let (containers, docker_connected, docker_ever) = {
            let view = self
                .docker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (
                view.containers.values().cloned().collect::<Vec<_>>(),
                view.connected,
                view.api_version.is_some(),
            )
        };
        self.desired = desired::build(
            &containers,
            self.file_snapshot.as_ref(),
            &self.settings.options,
        );
        desired::merge_certificate_requests(
            &mut self.desired.certificates,
            &self.file_certificates,
        );
        self.acme.set_requests(&self.desired.certificates);

        let mut probes = Vec::new();
        for service in &self.desired.services {
            for server in &service.servers {
                if !server.container_id.is_empty() {
                    probes.push((probe_key(server), service.health.clone()));
                }
            }
        }
        self.prober.sync(&probes);
        if docker_ever || !self.settings.docker_enabled {
            // The backends present at start now have probes with seeded health.
            self.prober.clear_seeds();
        }
        self.log_new_errors();

        // Never push a view without Docker's routes while Docker has not been read once: the
        // edge keeps serving what it has.
        if self.settings.docker_enabled && !docker_ever {
            return;
        }
        if !self.prober.all_probed()
            && self.started.elapsed() < FIRST_PUSH_WAIT
            && self.pushed.is_none()
        {
            return;
        }
        let _ = docker_connected;

        let mut snapshot = self
            .desired
            .to_snapshot(0, |server| self.server_state(server));
        let acme = self.acme.snapshot_parts();
        if let Some(file) = &self.file_snapshot {
            snapshot.certificates = file.certificates.clone();
            snapshot.default_certificate = file.default_certificate.clone();
        }
        snapshot.certificates.extend(acme.certificates);
        snapshot.acme_challenges = acme.challenges;
        let unchanged = self
            .pushed
            .as_ref()
            .is_some_and(|(last, acked)| *acked && same_routes(last, &snapshot));
        if unchanged {
            if self.edge_state.last_error.is_none() {
                self.acme.applied(acme.challenge_generation);
            }
            return;
        }
        self.version = next_version(self.version);
        snapshot.version = self.version;
        match self.edge.apply(&snapshot).await {
            Ok(EdgeMessage::Applied { version }) => {
                if !self.edge_state.connected && self.edge_state.last_error.is_some() {
                    info!("the edge is reachable again");
                }
                info!(
                    version,
                    routers = snapshot.routers.len(),
                    "edge applied the snapshot"
                );
                self.edge_state.acked_version = Some(version);
                self.edge_state.last_error = None;
                self.edge_state.connected = true;
                self.pushed = Some((snapshot, true));
                self.acme.applied(acme.challenge_generation);
            }
            Ok(EdgeMessage::Rejected { version, errors }) => {
                error!(version, errors = ?errors, "the edge rejected the snapshot");
                self.edge_state.last_error = Some(errors.join("; "));
                self.edge_state.connected = true;
                // Do not resend the same invalid snapshot every second.
                self.pushed = Some((snapshot, true));
            }
            Ok(other) => {
                warn!(reply = ?other, "unexpected reply from the edge");
                self.edge_state.last_error = Some(format!("unexpected reply: {other:?}"));
            }
            Err(e) => {
                if self.edge_state.connected || self.edge_state.last_error.is_none() {
                    warn!(error = %e, "cannot reach the edge, retrying every second");
                }
                self.edge_state.connected = false;
                self.edge_state.last_error = Some(e);
                self.pushed = Some((snapshot, false));
            }
        }
    }

    fn server_state(&self, server: &DesiredServer) -> ServerState {
        if server.container_id.is_empty() {
            return ServerState::Up;
        }
        if server.lifecycle == Lifecycle::Stopping || self.is_drained(server) {
            return ServerState::Draining;
        }
        if matches!(
            server.docker_health,
            DockerHealth::Starting | DockerHealth::Unhealthy
        ) {
            return ServerState::Down;
        }
        match self.prober.state(&probe_key(server)) {
            Some(state) if state.healthy => ServerState::Up,
            _ => ServerState::Down,
        }
    }

    fn is_drained(&self, server: &DesiredServer) -> bool {
        self.drained
            .iter()
            .any(|pattern| matches_backend(pattern, server))
    }

    async fn handle(&mut self, request: CtlRequest) -> CtlResponse {
        match request {
            CtlRequest::Status => self.status().await,
            CtlRequest::Routes => CtlResponse::ok(json!(self
                .desired
                .routers
                .iter()
                .map(|r| json!({
                    "name": r.name,
                    "rule": r.rule,
                    "priority": r.effective_priority(),
                    "entrypoints": r.entrypoints,
                    "service": r.service,
                    "tls": r.tls,
                }))
                .collect::<Vec<_>>())),
            CtlRequest::Backends => {
                let in_flight = match self.edge.status().await {
                    Ok(EdgeMessage::Status { in_flight, .. }) => Some(in_flight),
                    _ => None,
                };
                CtlResponse::ok(self.backends_json(in_flight.as_ref()))
            }
            CtlRequest::Errors => CtlResponse::ok(json!(self
                .desired
                .errors
                .iter()
                .map(|e| json!({
                    "container": e.container,
                    "key": e.key,
                    "value": e.value,
                    "message": e.message,
                }))
                .collect::<Vec<_>>())),
            CtlRequest::Drain { backend } => {
                let matched = self.matching_backends(&backend);
                if matched.is_empty() {
                    return CtlResponse::error(format!(
                        "no backend matches {backend:?}; `edgectl backends` lists them"
                    ));
                }
                info!(backend, matched = ?matched, "draining on operator request");
                self.drained.insert(backend);
                self.save_drains();
                CtlResponse::ok(json!({ "drained": matched }))
            }
            CtlRequest::Undrain { backend } => {
                // Any drain that covers one of the same backends is lifted, whichever name
                // (container, id prefix or address) it was given with.
                let targets = self.matching_servers(&backend);
                let before = self.drained.len();
                let desired = &self.desired;
                self.drained.retain(|pattern| {
                    pattern != &backend
                        && !desired
                            .services
                            .iter()
                            .flat_map(|s| &s.servers)
                            .any(|server| {
                                matches_backend(pattern, server) && targets.contains(&server.addr)
                            })
                });
                if self.drained.len() == before {
                    return CtlResponse::error(format!(
                        "no drained backend matches {backend:?}; `edgectl backends` lists them"
                    ));
                }
                info!(backend, "undrained on operator request");
                self.save_drains();
                CtlResponse::ok(json!({ "undrained": self.describe(&targets) }))
            }
            CtlRequest::Block { .. } | CtlRequest::Unblock { .. } | CtlRequest::Blocked => {
                crate::filter::handle(&self.settings.filter, &request)
            }
            CtlRequest::Certs => CtlResponse::ok(json!(self.acme.status())),
            CtlRequest::RetryCert { name } => {
                let affected = self.acme.retry_now(&name);
                if affected.is_empty() {
                    CtlResponse::error(format!(
                        "no ACME certificate covers {name:?}; `edgectl certs` lists them"
                    ))
                } else {
                    CtlResponse::ok(json!({ "retrying": affected }))
                }
            }
            CtlRequest::Reload => {
                self.load_routes_file();
                self.pushed = None;
                match &self.file_error {
                    Some(e) => CtlResponse::error(format!("routes file rejected: {e}")),
                    None => CtlResponse::ok(json!({ "reloaded": true })),
                }
            }
        }
    }

    async fn status(&mut self) -> CtlResponse {
        let edge_reply = self.edge.status().await;
        let (docker_connected, api_version, containers) = {
            let view = self
                .docker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (
                view.connected,
                view.api_version.clone(),
                view.containers.len(),
            )
        };
        let backends: Vec<&DesiredServer> = self
            .desired
            .services
            .iter()
            .flat_map(|s| &s.servers)
            .collect();
        let up = backends
            .iter()
            .filter(|s| self.server_state(s) == ServerState::Up)
            .count();
        let edge = match edge_reply {
            Ok(EdgeMessage::Status {
                version,
                routers,
                workers,
                ready_workers,
                ..
            }) => json!({
                "reachable": true, "serving_version": version, "routers": routers,
                "workers": workers, "ready_workers": ready_workers,
            }),
            Ok(other) => json!({ "reachable": true, "reply": format!("{other:?}") }),
            Err(e) => json!({ "reachable": false, "error": e }),
        };
        CtlResponse::ok(json!({
            "agent_version": env!("CARGO_PKG_VERSION"),
            "snapshot_version": self.pushed.as_ref().map(|(s, _)| s.version),
            "acked_version": self.edge_state.acked_version,
            "edge": edge,
            "edge_last_error": self.edge_state.last_error,
            "docker": {
                "enabled": self.settings.docker_enabled,
                "connected": docker_connected,
                "api_version": api_version,
                "containers": containers,
            },
            "routes_file": self.settings.routes_file.as_ref().map(|p| p.display().to_string()),
            "routes_file_error": self.file_error,
            "routers": self.desired.routers.len(),
            "services": self.desired.services.len(),
            "backends": backends.len(),
            "backends_up": up,
            "errors": self.desired.errors.len(),
            "filter": crate::filter::status_json(&self.settings.filter),
        }))
    }

    /// Lists every backend. `in_flight` contains the edge's counts by address when it replied.
    fn backends_json(
        &self,
        in_flight: Option<&std::collections::BTreeMap<String, u64>>,
    ) -> serde_json::Value {
        let mut rows = Vec::new();
        for service in &self.desired.services {
            for server in &service.servers {
                let probe = (!server.container_id.is_empty())
                    .then(|| self.prober.state(&probe_key(server)))
                    .flatten();
                let addr = server.addr.to_string();
                let in_flight = in_flight.map(|counts| counts.get(&addr).copied().unwrap_or(0));
                rows.push(json!({
                    "service": service.name,
                    "in_flight": in_flight,
                    "container": server.container_name,
                    "container_id": server.container_id,
                    "addr": server.addr.to_string(),
                    "state": state_name(self.server_state(server)),
                    "drained": self.is_drained(server),
                    "docker_health": format!("{:?}", server.docker_health).to_lowercase(),
                    "healthy": probe.as_ref().map(|p| p.healthy),
                    "passes": probe.as_ref().map(|p| p.consecutive_passes),
                    "failures": probe.as_ref().map(|p| p.consecutive_failures),
                    "last_probe_result": probe.as_ref().and_then(|p| p.last_result.clone()),
                    "last_probe_unix": probe.as_ref().and_then(|p| p.last_probe).and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                }));
            }
        }
        json!(rows)
    }

    fn matching_servers(&self, pattern: &str) -> Vec<SocketAddr> {
        self.desired
            .services
            .iter()
            .flat_map(|s| &s.servers)
            .filter(|server| matches_backend(pattern, server))
            .map(|server| server.addr)
            .collect()
    }

    fn describe(&self, addrs: &[SocketAddr]) -> Vec<String> {
        self.desired
            .services
            .iter()
            .flat_map(|s| &s.servers)
            .filter(|server| addrs.contains(&server.addr))
            .map(|server| format!("{} {}", server.container_name, server.addr))
            .collect()
    }

    /// Writes the operator's drains to the state directory, so they survive an agent restart.
    fn save_drains(&self) {
        let Some(path) = &self.settings.drains_file else {
            return;
        };
        let patterns: Vec<&String> = self.drained.iter().collect();
        let result = serde_json::to_vec(&patterns)
            .map_err(std::io::Error::other)
            .and_then(|json| {
                let tmp = path.with_extension("json.tmp");
                std::fs::write(&tmp, json)?;
                std::fs::rename(&tmp, path)
            });
        if let Err(e) = result {
            error!(path = %path.display(), error = %e, "cannot save the drained backends; they will be lost on restart");
        }
    }

    /// Logs label problems that were not there at the previous rebuild, and ACME requests
    /// while no resolver is configured.
    fn log_new_errors(&mut self) {
        let mut current = BTreeSet::new();
        for e in &self.desired.errors {
            let line = e.to_string();
            if !self.logged_errors.contains(&line) {
                warn!(container = %e.container, "{line}");
            }
            current.insert(line);
        }
        let unconfigured = if self.acme.is_configured() {
            &[][..]
        } else {
            &self.desired.certificates[..]
        };
        for request in unconfigured {
            let line = format!(
                "routers {} ask certificate resolver {:?} for {}, but no ACME resolver is configured (set ACME_DIRECTORY_URL), so the edge serves its self-signed default certificate for these names",
                request.routers.join(", "),
                request.resolver,
                request.names.join(", ")
            );
            if !self.logged_errors.contains(&line) {
                warn!("{line}");
            }
            current.insert(line);
        }
        self.logged_errors = current;
    }

    fn matching_backends(&self, pattern: &str) -> Vec<String> {
        self.desired
            .services
            .iter()
            .flat_map(|s| &s.servers)
            .filter(|server| matches_backend(pattern, server))
            .map(|server| format!("{} {}", server.container_name, server.addr))
            .collect()
    }
}

fn probe_key(server: &DesiredServer) -> ProbeKey {
    ProbeKey {
        container_id: server.container_id.clone(),
        addr: server.addr,
    }
}

/// Returns whether an operator's backend pattern names `server`: its container name, a
/// container id prefix (at least 4 characters), or its address.
fn matches_backend(pattern: &str, server: &DesiredServer) -> bool {
    pattern == server.container_name
        || (pattern.len() >= 4 && server.container_id.starts_with(pattern))
        || pattern == server.addr.to_string()
}

fn state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Up => "up",
        ServerState::Down => "down",
        ServerState::Draining => "draining",
    }
}

/// Compares two snapshots ignoring their versions.
fn same_routes(a: &Snapshot, b: &Snapshot) -> bool {
    a.routers == b.routers
        && a.services == b.services
        && a.certificates == b.certificates
        && a.default_certificate == b.default_certificate
        && a.acme_challenges == b.acme_challenges
}

/// Returns a version above `previous` that also grows across agent restarts: the current
/// time in milliseconds, or `previous + 1` if the clock is behind.
fn next_version(previous: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.max(previous + 1)
}

/// Reads the operator's drains saved by a previous run.
fn load_drains(path: Option<&std::path::Path>) -> BTreeSet<String> {
    let Some(path) = path else {
        return BTreeSet::new();
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeSet::new();
    };
    match serde_json::from_str::<BTreeSet<String>>(&text) {
        Ok(drains) => {
            if !drains.is_empty() {
                info!(drains = ?drains, "drained backends restored from the previous run");
            }
            drains
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot parse the saved drains; starting without drains");
            BTreeSet::new()
        }
    }
}

/// Reads backend health from the edge's persisted snapshot: servers that were up stay up
/// until probes fail.
fn read_seed(path: &std::path::Path) -> HashMap<SocketAddr, bool> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashMap::new();
    };
    let Ok(snapshot) = serde_json::from_str::<Snapshot>(&text) else {
        warn!(path = %path.display(), "cannot parse the edge's persisted snapshot; backends start as down");
        return HashMap::new();
    };
    let mut seeds = HashMap::new();
    for service in &snapshot.services {
        for server in &service.servers {
            if let Some(addr) = server
                .url
                .strip_prefix("http://")
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                seeds.insert(addr, server.state == ServerState::Up);
            }
        }
    }
    info!(
        backends = seeds.len(),
        "backend health seeded from the edge's last snapshot"
    );
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_grow_across_restarts() {
        let first = next_version(0);
        assert!(first > 1_600_000_000_000);
        assert!(next_version(first) > first);
        assert_eq!(next_version(u64::MAX - 1), u64::MAX);
    }
}
