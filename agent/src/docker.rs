//! The Docker provider: lists running containers, follows the event stream, and reconnects
//! with backoff when the engine goes away, resynchronising from a fresh listing.
//!
//! The agent only reads from Docker: it lists, inspects and subscribes, and never creates,
//! stops or changes anything.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bollard::{
    query_parameters::{
        EventsOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    },
    Docker,
};
use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::model::{ContainerInfo, DockerHealth, Lifecycle};

/// Maximum wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The agent's current view of Docker.
#[derive(Debug, Default, Clone)]
pub struct DockerView {
    /// Running containers by id.
    pub containers: BTreeMap<String, ContainerInfo>,
    pub connected: bool,
    /// API version negotiated with the engine.
    pub api_version: Option<String>,
    pub last_error: Option<String>,
}

/// Follows Docker forever, updating `view` and bumping `changed` after every change.
pub async fn watch_docker(view: Arc<Mutex<DockerView>>, changed: watch::Sender<u64>) {
    let mut backoff = Duration::from_millis(250);
    let mut logged_down = false;
    loop {
        match follow(&view, &changed).await {
            Ok(()) => {
                warn!("the Docker event stream ended, reconnecting");
                backoff = Duration::from_millis(250);
                logged_down = false;
            }
            Err(e) => {
                if !logged_down {
                    warn!(error = %e, "Docker is unavailable; routes from Docker keep their last state, retrying");
                    logged_down = true;
                }
            }
        }
        {
            let mut view = lock(&view);
            if view.connected {
                view.connected = false;
                changed.send_modify(|n| *n += 1);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Follows one connection: subscribes to events, lists and inspects running containers, then applies
/// events until the stream ends. Returns an error when the engine cannot be reached.
async fn follow(view: &Arc<Mutex<DockerView>>, changed: &watch::Sender<u64>) -> Result<(), String> {
    // connect_with_defaults honours DOCKER_HOST and falls back to the local socket.
    let docker = Docker::connect_with_defaults().map_err(|e| format!("cannot connect: {e}"))?;
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|e| format!("version negotiation failed: {e}"))?;
    let api_version = docker.client_version().to_string();

    // Subscribe before listing so no event between the two is lost.
    let mut filters = HashMap::new();
    filters.insert("type", vec!["container", "network"]);
    let options = EventsOptionsBuilder::default().filters(&filters).build();
    let mut events = docker.events(Some(options));

    let mut list_filters = HashMap::new();
    list_filters.insert("status", vec!["running"]);
    let options = ListContainersOptionsBuilder::default()
        .filters(&list_filters)
        .build();
    let summaries = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| format!("listing containers failed: {e}"))?;
    let mut containers = BTreeMap::new();
    for summary in summaries {
        let Some(id) = summary.id else { continue };
        if let Some(info) = inspect(&docker, &id).await {
            containers.insert(id, info);
        }
    }
    info!(
        containers = containers.len(),
        api_version, "connected to Docker"
    );
    {
        let mut view = lock(view);
        view.containers = containers;
        view.connected = true;
        view.api_version = Some(api_version);
        view.last_error = None;
    }
    changed.send_modify(|n| *n += 1);

    while let Some(event) = events.next().await {
        let event = event.map_err(|e| format!("event stream failed: {e}"))?;
        let action = event.action.unwrap_or_default();
        let Some(actor) = event.actor else { continue };
        let attributes = actor.attributes.unwrap_or_default();
        let container_id = match event.typ {
            Some(bollard::models::EventMessageTypeEnum::NETWORK) => {
                match attributes.get("container") {
                    Some(id) => id.clone(),
                    None => continue,
                }
            }
            _ => match actor.id {
                Some(id) => id,
                None => continue,
            },
        };
        debug!(container = %container_id, action, "Docker event");
        let action_name = action.split(':').next().unwrap_or_default().trim();
        let updated = match action_name {
            "start" | "health_status" | "connect" | "disconnect" | "unpause" | "restart" => {
                match inspect(&docker, &container_id).await {
                    Some(info) => {
                        let mut view = lock(view);
                        let previous = view.containers.insert(container_id.clone(), info);
                        // A container seen stopping stays drained until it dies.
                        if previous.is_some_and(|p| p.lifecycle == Lifecycle::Stopping) {
                            if let Some(c) = view.containers.get_mut(&container_id) {
                                c.lifecycle = Lifecycle::Stopping;
                            }
                        }
                        true
                    }
                    None => lock(view).containers.remove(&container_id).is_some(),
                }
            }
            "kill" if is_reload_signal(attributes.get("signal").map(String::as_str)) => false,
            "kill" | "stop" | "pause" => {
                let mut view = lock(view);
                match view.containers.get_mut(&container_id) {
                    Some(c) if c.lifecycle != Lifecycle::Stopping => {
                        c.lifecycle = Lifecycle::Stopping;
                        true
                    }
                    _ => false,
                }
            }
            "die" | "destroy" | "oom" => lock(view).containers.remove(&container_id).is_some(),
            _ => false,
        };
        if updated {
            changed.send_modify(|n| *n += 1);
        }
    }
    Ok(())
}

/// Inspects a container; `None` when it is gone or not running.
async fn inspect(docker: &Docker, id: &str) -> Option<ContainerInfo> {
    let response = match docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            debug!(container = %id, error = %e, "inspect failed");
            return None;
        }
    };
    let state = response.state.unwrap_or_default();
    if state.running != Some(true) {
        return None;
    }
    let config = response.config.unwrap_or_default();
    let labels: BTreeMap<String, String> = config.labels.unwrap_or_default().into_iter().collect();
    let mut exposed_ports: Vec<u16> = Vec::new();
    for key in config.exposed_ports.unwrap_or_default() {
        if let Some(port) = tcp_port(&key) {
            exposed_ports.push(port);
        }
    }
    let settings = response.network_settings.unwrap_or_default();
    for key in settings.ports.unwrap_or_default().keys() {
        if let Some(port) = tcp_port(key) {
            exposed_ports.push(port);
        }
    }
    exposed_ports.sort_unstable();
    exposed_ports.dedup();
    let mut networks = BTreeMap::new();
    for (name, endpoint) in settings.networks.unwrap_or_default() {
        let ip = endpoint
            .ip_address
            .filter(|ip| !ip.is_empty())
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        if let Some(ip) = ip {
            networks.insert(name, ip);
        }
    }
    let health = match state.health.and_then(|h| h.status) {
        Some(bollard::models::HealthStatusEnum::STARTING) => DockerHealth::Starting,
        Some(bollard::models::HealthStatusEnum::HEALTHY) => DockerHealth::Healthy,
        Some(bollard::models::HealthStatusEnum::UNHEALTHY) => DockerHealth::Unhealthy,
        _ => DockerHealth::NoCheck,
    };
    let name = response
        .name
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_owned();
    Some(ContainerInfo {
        id: response.id.unwrap_or_else(|| id.to_owned()),
        name,
        labels,
        exposed_ports,
        networks,
        health,
        lifecycle: Lifecycle::Running,
    })
}

/// Returns whether a `kill` event's signal requests a reload or reopen logs
/// (SIGHUP, SIGUSR1, SIGUSR2) rather than to stop. Any other signal, including an image's own
/// STOPSIGNAL such as SIGQUIT or SIGWINCH, starts draining.
fn is_reload_signal(signal: Option<&str>) -> bool {
    matches!(
        signal,
        Some("1" | "10" | "12" | "SIGHUP" | "SIGUSR1" | "SIGUSR2")
    )
}

/// Parses `"8080/tcp"` into 8080; other protocols give `None`.
fn tcp_port(key: &str) -> Option<u16> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    if proto != "tcp" {
        return None;
    }
    port.parse().ok()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_signals_do_not_drain() {
        assert!(is_reload_signal(Some("1")));
        assert!(is_reload_signal(Some("SIGUSR1")));
        assert!(!is_reload_signal(Some("15")));
        assert!(!is_reload_signal(Some("3")));
        assert!(!is_reload_signal(None));
    }

    #[test]
    fn exposed_port_keys() {
        assert_eq!(tcp_port("8080/tcp"), Some(8080));
        assert_eq!(tcp_port("53/udp"), None);
        assert_eq!(tcp_port("3000"), Some(3000));
        assert_eq!(tcp_port("x/tcp"), None);
    }
}
