//! What the agent knows about one container, as read from the Docker engine. Everything that
//! turns labels into routes takes these values, so it can be tested without Docker.

use std::{collections::BTreeMap, net::IpAddr};

/// Compose labels that identify a container's project and service.
pub const COMPOSE_PROJECT_LABEL: &str = "com.docker.compose.project";
pub const COMPOSE_SERVICE_LABEL: &str = "com.docker.compose.service";

/// One container, as read from the Docker engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Full container id.
    pub id: String,
    /// Container name without the leading `/`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// TCP ports the container exposes (image `EXPOSE` or compose `expose`/`ports`), sorted.
    pub exposed_ports: Vec<u16>,
    /// Docker networks the container is attached to, by network name, with its address there.
    pub networks: BTreeMap<String, IpAddr>,
    pub health: DockerHealth,
    pub lifecycle: Lifecycle,
}

impl ContainerInfo {
    /// Returns the compose project, if the container belongs to one.
    pub fn compose_project(&self) -> Option<&str> {
        self.labels.get(COMPOSE_PROJECT_LABEL).map(String::as_str)
    }

    /// Returns the compose service, if the container belongs to one.
    pub fn compose_service(&self) -> Option<&str> {
        self.labels.get(COMPOSE_SERVICE_LABEL).map(String::as_str)
    }
}

/// The container's Docker HEALTHCHECK state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DockerHealth {
    /// The image and container define no HEALTHCHECK.
    NoCheck,
    Starting,
    Healthy,
    Unhealthy,
}

/// Lifecycle stage of a container, from the agent's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Running,
    /// A `kill` or `stop` event was seen: drain it, it will die soon.
    Stopping,
}
