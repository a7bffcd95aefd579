//! Choice of a container's backend address: the Docker network whose IP the edge connects to,
//! and the port.
//!
//! Traefik takes the first network in Go map order when the named one is missing, which is
//! effectively random and gives intermittent 504s across restarts. Here every fallback is
//! deterministic: the agent's default network (the one the edge can reach) first, then the
//! first attached network in name order.

use std::net::IpAddr;

use super::{LabelError, NETWORK_LABEL};
use crate::model::ContainerInfo;

/// The network chosen for a container and its address there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NetworkChoice {
    pub name: String,
    pub ip: IpAddr,
}

/// Chooses the network whose IP the edge connects to.
///
/// The network named by the `traefik.docker.network` label (`label`), else `default_network`,
/// is used when the container is attached to it. Otherwise the name with the compose project
/// prefix (`PROJECT_NAME`) is tried. When neither is attached, or no network is named, the
/// default network is preferred, then the first attached network in name order. Each fallback
/// adds a warning to `problems`.
///
/// # Errors
///
/// Returns an error when the container has no network with an IP address.
pub(crate) fn choose_network(
    container: &ContainerInfo,
    label: Option<&str>,
    default_network: Option<&str>,
    problems: &mut Vec<LabelError>,
) -> Result<NetworkChoice, LabelError> {
    let attached: Vec<(&String, IpAddr)> = container
        .networks
        .iter()
        .filter(|(_, ip)| !ip.is_unspecified())
        .map(|(name, ip)| (name, *ip))
        .collect();
    let find = |wanted: &str| {
        attached
            .iter()
            .find(|(name, _)| name.as_str() == wanted)
            .map(|(name, ip)| NetworkChoice {
                name: (*name).clone(),
                ip: *ip,
            })
    };

    let Some(first) = attached.first() else {
        let hint = match default_network {
            Some(network) => format!("; attach it to network {network}"),
            None => String::new(),
        };
        return Err(LabelError::error(
            container,
            None,
            None,
            format!("the container has no network with an IP address{hint}"),
        ));
    };
    let fallback = default_network
        .and_then(find)
        .unwrap_or_else(|| NetworkChoice {
            name: first.0.clone(),
            ip: first.1,
        });
    let attached_names: Vec<&str> = attached.iter().map(|(name, _)| name.as_str()).collect();

    let requested = label.or(default_network);
    let Some(requested) = requested else {
        if attached.len() > 1 {
            let message = format!(
                "the container is on several networks ({}) and none is named; using {}. Set \
                 {NETWORK_LABEL} to the network the edge reaches",
                attached_names.join(", "),
                fallback.name
            );
            problems.push(LabelError::warning(container, None, None, message));
        }
        return Ok(fallback);
    };
    if let Some(choice) = find(requested) {
        return Ok(choice);
    }

    let (key, described) = match label {
        Some(_) => (Some(NETWORK_LABEL), format!("network {requested}")),
        None => (None, format!("default network {requested}")),
    };
    let value = label.map(str::to_owned);
    if let Some(project) = container.compose_project() {
        let prefixed = format!("{project}_{requested}");
        if let Some(choice) = find(&prefixed) {
            let message = format!(
                "{described} is not attached to the container; using {prefixed} (missing the \
                 project prefix?). Write {NETWORK_LABEL}={prefixed}"
            );
            problems.push(LabelError::warning(container, key, value, message));
            return Ok(choice);
        }
    }
    let message = format!(
        "{described} is not attached to the container (missing the project prefix?); it is on \
         {}, so {} is used",
        attached_names.join(", "),
        fallback.name
    );
    problems.push(LabelError::warning(container, key, value, message));
    Ok(fallback)
}

/// Returns the backend port: the `loadbalancer.server.port` label when set, else the lowest
/// port the container exposes, as Traefik does.
///
/// # Errors
///
/// Returns an error naming the label to add when the container exposes no port.
pub(crate) fn choose_port(
    container: &ContainerInfo,
    label: Option<u16>,
    service: &str,
) -> Result<u16, LabelError> {
    if let Some(port) = label {
        return Ok(port);
    }
    container
        .exposed_ports
        .iter()
        .copied()
        .min()
        .ok_or_else(|| {
            LabelError::error(
                container,
                None,
                None,
                format!(
                    "port is missing: the container exposes no port; add the label \
                 traefik.http.services.{service}.loadbalancer.server.port=PORT"
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use super::*;
    use crate::labels::Severity;
    use crate::model::{DockerHealth, Lifecycle, COMPOSE_PROJECT_LABEL};

    fn container(networks: &[(&str, [u8; 4])], ports: &[u16]) -> ContainerInfo {
        ContainerInfo {
            id: "0123456789ab".to_owned(),
            name: "shop-web-1".to_owned(),
            labels: BTreeMap::from([(COMPOSE_PROJECT_LABEL.to_owned(), "shop".to_owned())]),
            exposed_ports: ports.to_vec(),
            networks: networks
                .iter()
                .map(|(name, ip)| ((*name).to_owned(), IpAddr::V4(Ipv4Addr::from(*ip))))
                .collect(),
            health: DockerHealth::NoCheck,
            lifecycle: Lifecycle::Running,
        }
    }

    fn chosen(
        container: &ContainerInfo,
        label: Option<&str>,
        default: Option<&str>,
    ) -> (Option<String>, Vec<LabelError>) {
        let mut problems = Vec::new();
        let choice = choose_network(container, label, default, &mut problems);
        (choice.ok().map(|choice| choice.name), problems)
    }

    const TWO_NETWORKS: &[(&str, [u8; 4])] = &[
        ("shop_default", [172, 18, 0, 2]),
        ("shop_proxy", [172, 19, 0, 2]),
    ];

    #[test]
    fn network_label_is_used() {
        let (name, problems) = chosen(&container(TWO_NETWORKS, &[]), Some("shop_proxy"), None);
        assert_eq!(name.as_deref(), Some("shop_proxy"));
        assert!(problems.is_empty());
    }

    #[test]
    fn network_label_gets_project_prefix() {
        let (name, problems) = chosen(&container(TWO_NETWORKS, &[]), Some("proxy"), None);
        assert_eq!(name.as_deref(), Some("shop_proxy"));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("missing the project prefix?"));
        assert_eq!(problems[0].severity, Severity::Warning);
        assert_eq!(problems[0].key.as_deref(), Some(NETWORK_LABEL));
    }

    #[test]
    fn missing_network_prefers_default() {
        let networks = &[("shop_default", [172, 18, 0, 2]), ("edge", [10, 9, 0, 5])];
        let (name, problems) = chosen(&container(networks, &[]), Some("proxy"), Some("edge"));
        assert_eq!(name.as_deref(), Some("edge"));
        assert!(problems[0].message.contains("missing the project prefix?"));
    }

    #[test]
    fn missing_network_takes_first_sorted() {
        let networks = &[("zeta", [10, 0, 0, 3]), ("alpha", [10, 0, 0, 2])];
        let (name, problems) = chosen(&container(networks, &[]), Some("proxy"), None);
        assert_eq!(name.as_deref(), Some("alpha"));
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn default_network_used_without_label() {
        let networks = &[("shop_default", [172, 18, 0, 2]), ("edge", [10, 9, 0, 5])];
        let (name, problems) = chosen(&container(networks, &[]), None, Some("edge"));
        assert_eq!(name.as_deref(), Some("edge"));
        assert!(problems.is_empty());
    }

    #[test]
    fn unnamed_networks_warn_when_several() {
        let (name, problems) = chosen(&container(TWO_NETWORKS, &[]), None, None);
        assert_eq!(name.as_deref(), Some("shop_default"));
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn no_network_is_an_error() {
        let unspecified = &[("host", [0, 0, 0, 0])];
        let (name, _) = chosen(&container(unspecified, &[]), None, None);
        assert_eq!(name, None);
    }

    #[test]
    fn port_prefers_label_then_lowest() {
        let container = container(TWO_NETWORKS, &[9000, 8080]);
        assert_eq!(choose_port(&container, Some(3000), "web"), Ok(3000));
        assert_eq!(choose_port(&container, None, "web"), Ok(8080));
    }

    #[test]
    fn missing_port_names_the_label() {
        let error = choose_port(&container(TWO_NETWORKS, &[]), None, "web-shop").err();
        assert_eq!(
            error.map(|error| error.to_string()).as_deref(),
            Some(
                "container shop-web-1: port is missing: the container exposes no port; add the \
                 label traefik.http.services.web-shop.loadbalancer.server.port=PORT"
            )
        );
    }
}
