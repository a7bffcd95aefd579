//! Turns one container's Traefik labels into its routers, services and middlewares.
//!
//! [`parse_container`] works on a single container. It decodes the labels with Traefik v3's
//! grammar, adds Traefik's defaults (a service and a router named after the compose service,
//! and the default rule), checks each router, and picks the backend address. Names here are
//! the container's own. Scoping them by compose project, merging replicas and resolving
//! references between containers happen in [`crate::desired`].

mod address;
mod decode;
mod router;
mod schema;
mod value;

use std::collections::BTreeMap;
use std::fmt;

use edge_proto::Balance;

use crate::desired::{AgentOptions, DesiredServer, HealthSpec};
use crate::model::ContainerInfo;
use decode::{DecodedLabels, Entity, MiddlewareLabels};
use router::RouterCheck;

/// Label that includes or excludes a container, overriding `exposed_by_default`.
pub const ENABLE_LABEL: &str = "traefik.enable";
/// Label that names the Docker network whose IP the edge connects to.
pub const NETWORK_LABEL: &str = "traefik.docker.network";

/// One problem found in a container's labels.
///
/// It displays as `container NAME: label KEY="VALUE": MESSAGE`, without the label part when
/// the problem concerns no single label. The message names what is disabled, if anything.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LabelError {
    /// Container name.
    pub container: String,
    /// Full label key as written, when one label is at fault.
    pub key: Option<String>,
    /// The label's value.
    pub value: Option<String>,
    pub message: String,
    pub severity: Severity,
}

/// The severity of a [`LabelError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Something is not served: a container, router, service or middleware, or a TCP part.
    /// The message names it.
    Error,
    /// Everything is served, but a setting is ignored or a fallback was chosen.
    Warning,
}

impl LabelError {
    pub(crate) fn error(
        container: &ContainerInfo,
        key: Option<&str>,
        value: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(&container.name, key, value, message.into(), Severity::Error)
    }

    pub(crate) fn warning(
        container: &ContainerInfo,
        key: Option<&str>,
        value: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(
            &container.name,
            key,
            value,
            message.into(),
            Severity::Warning,
        )
    }

    pub(crate) fn new(
        container: &str,
        key: Option<&str>,
        value: Option<String>,
        message: String,
        severity: Severity,
    ) -> Self {
        LabelError {
            container: container.to_owned(),
            key: key.map(str::to_owned),
            value,
            message,
            severity,
        }
    }
}

impl fmt::Display for LabelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "container {}: ", self.container)?;
        match (&self.key, &self.value) {
            (Some(key), Some(value)) => write!(f, "label {key}=\"{value}\": ")?,
            (Some(key), None) => write!(f, "label {key}: ")?,
            (None, _) => {}
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for LabelError {}

/// The result of [`parse_container`].
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedContainer {
    /// The container's configuration; `None` when it is not exposed or an error skipped it.
    pub config: Option<ContainerConfig>,
    /// Every problem found, errors and warnings.
    pub problems: Vec<LabelError>,
}

/// The routers, services and middlewares of one container, with Traefik's defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerConfig {
    /// Compose project, or the container name for a container outside compose. Names are
    /// unique within a scope.
    pub scope: String,
    /// Routers by lower-case name.
    pub routers: BTreeMap<String, Declared<RouterConfig>>,
    /// Services by lower-case name.
    pub services: BTreeMap<String, Declared<ServiceConfig>>,
    /// Middlewares by lower-case name.
    pub middlewares: BTreeMap<String, Declared<MiddlewareConfig>>,
}

/// A router, service or middleware as one container declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared<T> {
    /// The name as written; of several spellings, the one that sorts first, as in Traefik.
    pub name: String,
    /// Option key suffix (lower case, such as `tls.certresolver`) to value, with defaults
    /// that depend on the container marked `(default ...)`. Two containers declare the same
    /// thing when these are equal. Services leave out `loadbalancer.server.*`, because each
    /// container brings its own server.
    pub settings: BTreeMap<String, String>,
    /// `None` when an error disabled it; the error is already reported.
    pub config: Option<T>,
}

/// A router that passed its per-container checks.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// The rule from the label, or the default rule.
    pub rule: String,
    /// Whether `rule` is the default rule.
    pub default_rule: bool,
    pub priority: Option<i64>,
    /// `web`, `websecure`, or empty for both.
    pub entrypoints: Vec<String>,
    /// The service, from the `service` label or the container's only service.
    pub service: Reference,
    pub middlewares: Vec<Reference>,
    /// `Some` when TLS is enabled.
    pub tls: Option<RouterTls>,
    /// Host names of the rule's `Host` matchers, from [`edge_proto::rule::Expr::hosts`].
    pub hosts: Vec<String>,
}

/// A router's TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterTls {
    /// ACME resolver that should obtain the certificate, such as `le`.
    pub cert_resolver: Option<String>,
    /// Certificate names from `tls.domains`, which take precedence over the rule's hosts.
    pub domains: Vec<TlsDomain>,
    /// Name of the TLS options; the edge applies its own TLS policy and ignores it.
    pub options: Option<String>,
}

/// One `tls.domains[n]` entry: a certificate's main name and extra names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsDomain {
    pub main: String,
    pub sans: Vec<String>,
}

/// A reference such as `app`, `app@docker` or `app@file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub name: String,
    /// The provider after `@`, in lower case.
    pub provider: Option<String>,
}

impl Reference {
    fn parse(text: &str) -> Reference {
        match text.split_once('@') {
            Some((name, provider)) => Reference {
                name: name.to_owned(),
                provider: Some(provider.to_ascii_lowercase()),
            },
            None => Reference {
                name: text.to_owned(),
                provider: None,
            },
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.provider {
            Some(provider) => write!(f, "{}@{provider}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A service with this container's server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub pass_host_header: bool,
    /// Name of the routes file's servers transport for `https://` servers.
    pub servers_transport: Option<String>,
    pub balance: Balance,
    pub health: HealthSpec,
    pub server: DesiredServer,
}

/// A middleware definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MiddlewareConfig {
    /// `buffering`, with its request body limit (`None` when 0, which means unlimited).
    Buffering { max_request_body_bytes: Option<u64> },
    /// Any other type, which the edge does not implement yet.
    Unsupported { type_name: String },
}

/// Decodes one container's labels, applies Traefik's defaults and picks its address.
///
/// A container is skipped (`config` is `None`) when it is not exposed (`traefik.enable`, else
/// `options.exposed_by_default`), when a key error fails it, or when it has no usable port or
/// network. A container with only `traefik.tcp.*` or `traefik.udp.*` labels gets no HTTP
/// router or service.
pub fn parse_container(container: &ContainerInfo, options: &AgentOptions) -> ParsedContainer {
    let mut problems = Vec::new();
    let config = configure(container, options, &mut problems);
    ParsedContainer { config, problems }
}

/// Returns the scope of a container's names: its compose project, else its name.
pub fn scope_of(container: &ContainerInfo) -> String {
    container
        .compose_project()
        .unwrap_or(&container.name)
        .to_owned()
}

/// Returns Traefik's default service name: `SERVICE_PROJECT` for a compose container, else the
/// container name, normalized so that every run of other characters than letters and digits
/// becomes `-`.
pub fn default_service_name(container: &ContainerInfo) -> String {
    match (container.compose_service(), container.compose_project()) {
        (Some(service), Some(project)) => value::normalize_name(&format!("{service}_{project}")),
        _ => value::normalize_name(&container.name),
    }
}

fn configure(
    container: &ContainerInfo,
    options: &AgentOptions,
    problems: &mut Vec<LabelError>,
) -> Option<ContainerConfig> {
    let enabled = match decode::enable_flag(container) {
        Ok(flag) => flag.unwrap_or(options.exposed_by_default),
        Err(error) => {
            problems.push(error);
            return None;
        }
    };
    if !enabled {
        return None;
    }

    let mut decoded = decode::decode(container, options.lenient, problems)?;
    let scope = scope_of(container);
    let declares_http = !decoded.routers.is_empty()
        || !decoded.services.is_empty()
        || !decoded.middlewares.is_empty();
    if !declares_http && decoded.has_tcp_or_udp {
        return Some(ContainerConfig {
            scope,
            routers: BTreeMap::new(),
            services: BTreeMap::new(),
            middlewares: BTreeMap::new(),
        });
    }

    let default_name = default_service_name(container);
    add_default_service_and_router(container, &default_name, &mut decoded, problems);
    let services = configure_services(container, options, &mut decoded, problems)?;

    let service_names: Vec<&str> = decoded
        .services
        .values()
        .map(|entity| entity.name.as_str())
        .collect();
    let mut routers = BTreeMap::new();
    for (id, entity) in &decoded.routers {
        let router = RouterCheck {
            container,
            options,
            default_name: &default_name,
            service_names: &service_names,
            entity,
        };
        routers.insert(id.clone(), router.check(problems));
    }

    let middlewares = decoded
        .middlewares
        .iter()
        .map(|(id, entity)| (id.clone(), middleware_config(entity)))
        .collect();
    Some(ContainerConfig {
        scope,
        routers,
        services,
        middlewares,
    })
}

/// Adds Traefik's default service when the container declares none, and its default router
/// when it declares no router and at most one service.
fn add_default_service_and_router(
    container: &ContainerInfo,
    default_name: &str,
    decoded: &mut DecodedLabels,
    problems: &mut Vec<LabelError>,
) {
    if decoded.services.is_empty() {
        let service = Entity {
            name: default_name.to_owned(),
            ..Entity::default()
        };
        decoded
            .services
            .insert(default_name.to_lowercase(), service);
    }
    if !decoded.routers.is_empty() {
        return;
    }
    if decoded.services.len() > 1 {
        let names: Vec<&str> = decoded.services.values().map(|s| s.name.as_str()).collect();
        let message = format!(
            "no router is created: the container declares several services ({}) and no router; \
             declare a router for each service",
            names.join(", ")
        );
        problems.push(LabelError::warning(container, None, None, message));
        return;
    }
    let router = Entity {
        name: default_name.to_owned(),
        ..Entity::default()
    };
    decoded.routers.insert(default_name.to_lowercase(), router);
}

/// Builds each service with this container's server. Returns `None` when the container has
/// no usable port or network, which skips it as Traefik does.
fn configure_services(
    container: &ContainerInfo,
    options: &AgentOptions,
    decoded: &mut DecodedLabels,
    problems: &mut Vec<LabelError>,
) -> Option<BTreeMap<String, Declared<ServiceConfig>>> {
    let mut network = None;
    let mut services = BTreeMap::new();
    for (id, entity) in &mut decoded.services {
        entity
            .settings
            .retain(|suffix, _| !suffix.starts_with("loadbalancer.server."));
        let mut declared = Declared {
            name: entity.name.clone(),
            settings: entity.settings.clone(),
            config: None,
        };
        if entity.invalid {
            services.insert(id.clone(), declared);
            continue;
        }

        let (url, addr) = match &entity.labels.url {
            Some((url, addr)) => (url.clone(), *addr),
            None => {
                let port = match address::choose_port(container, entity.labels.port, &entity.name) {
                    Ok(port) => port,
                    Err(error) => {
                        problems.push(skipped(error));
                        return None;
                    }
                };
                let choice = match &network {
                    Some(choice) => choice,
                    None => {
                        let label = decoded.network.as_deref();
                        let default = options.default_network.as_deref();
                        match address::choose_network(container, label, default, problems) {
                            Ok(choice) => network.insert(choice),
                            Err(error) => {
                                problems.push(skipped(error));
                                return None;
                            }
                        }
                    }
                };
                let addr = std::net::SocketAddr::new(choice.ip, port);
                let scheme = entity.labels.scheme.as_deref().unwrap_or("http");
                (format!("{scheme}://{addr}"), addr)
            }
        };

        let labels = &entity.labels;
        declared.config = Some(ServiceConfig {
            pass_host_header: labels.pass_host_header,
            servers_transport: labels.servers_transport.clone(),
            balance: labels.balance,
            health: HealthSpec {
                scheme: health_scheme(labels.health_scheme.as_deref(), &url),
                ..labels.health.clone()
            },
            server: DesiredServer {
                container_id: container.id.clone(),
                container_name: container.name.clone(),
                url,
                addr,
                docker_health: container.health,
                lifecycle: container.lifecycle,
            },
        });
        services.insert(id.clone(), declared);
    }
    Some(services)
}

/// Returns the scheme of health probes: the `healthcheck.scheme` label, else the server URL's
/// scheme. In Traefik, too, `healthcheck.scheme` replaces the server URL's scheme.
fn health_scheme(label: Option<&str>, server_url: &str) -> String {
    let server = server_url
        .split_once("://")
        .map_or("http", |(scheme, _)| scheme);
    label.unwrap_or(server).to_owned()
}

/// Adds to an address error that the whole container is skipped.
fn skipped(mut error: LabelError) -> LabelError {
    error
        .message
        .push_str("; no router or service of this container is created");
    error
}

fn middleware_config(entity: &Entity<MiddlewareLabels>) -> Declared<MiddlewareConfig> {
    let labels = &entity.labels;
    let config = match labels.types.iter().next() {
        _ if entity.invalid => None,
        Some(type_name) if type_name == "buffering" => Some(MiddlewareConfig::Buffering {
            max_request_body_bytes: labels.max_request_body_bytes,
        }),
        Some(type_name) => Some(MiddlewareConfig::Unsupported {
            type_name: type_name.clone(),
        }),
        None => None,
    };
    Declared {
        name: entity.name.clone(),
        settings: entity.settings.clone(),
        config,
    }
}

/// Returns `text` with its first character in upper case, to start a sentence.
pub(crate) fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
