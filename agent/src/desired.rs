//! The desired routing state: every container's routers and services, scoped by compose
//! project and merged across replicas, plus the routes from the routes file.
//!
//! [`build`] is a pure function of the containers, the routes file and the options, and its
//! output is sorted, so equal inputs give equal output.
//!
//! Unlike Traefik, names never leak across compose projects: every router, service and
//! middleware declared by labels is named `SCOPE/NAME`, where the scope is the compose project
//! (or the container name outside compose), and references resolve within the scope. So two
//! sites that both declare `routers.app` and `services.app` each keep their own containers.
//! Within one scope, containers that declare the same name with equal settings are merged,
//! and the servers of a service are the union of theirs (replicas). Different settings are a
//! conflict that disables that router, service or middleware only.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use edge_proto::{Balance, Router, Server, ServerState, ServersTransport, Service, Snapshot};

use crate::labels::{
    self, capitalized, Declared, LabelError, MiddlewareConfig, Reference, RouterConfig,
    ServiceConfig, Severity,
};
use crate::model::{ContainerInfo, DockerHealth, Lifecycle};

/// Settings that change how labels become routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOptions {
    /// Whether a container without `traefik.enable` is exposed. Traefik's default: true.
    pub exposed_by_default: bool,
    /// Docker network to reach containers on when a container has no `traefik.docker.network`
    /// label (`EDGE_DOCKER_NETWORK`). It is also the preferred fallback when the named network
    /// is not attached.
    pub default_network: Option<String>,
    /// Rule of routers that declare none.
    pub default_rule: DefaultRule,
    /// Whether an unknown or malformed label key is ignored with a warning instead of failing
    /// its container. Default: false, as in Traefik.
    pub lenient: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            exposed_by_default: true,
            default_network: None,
            default_rule: DefaultRule::default(),
            lenient: false,
        }
    }
}

/// The rule of a router that declares none (Traefik's `defaultRule`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefaultRule {
    /// A rule in which `{name}` is replaced by the container's default service name, such as
    /// `web-shop` for compose service `web` of project `shop`. The default is Traefik's
    /// ``Host(`{name}`)``.
    Template(String),
    /// No default: a router without a rule is an error.
    Disabled,
}

impl Default for DefaultRule {
    fn default() -> Self {
        DefaultRule::Template("Host(`{name}`)".to_owned())
    }
}

/// The routing state wanted from the containers' labels and the routes file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Routers sorted by name. Label routers are named `SCOPE/ROUTER`; routes-file routers keep
    /// their names, which contain no `/` in practice.
    pub routers: Vec<Router>,
    /// Services sorted by name, named like routers.
    pub services: Vec<DesiredService>,
    /// Certificates that served routers request from an ACME resolver, sorted.
    pub certificates: Vec<CertificateRequest>,
    /// The routes file's servers transports, which services of both sources may use.
    pub servers_transports: Vec<ServersTransport>,
    /// Every problem, errors and warnings, sorted by container and key.
    pub errors: Vec<LabelError>,
}

/// A load-balanced service and its backends.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredService {
    /// `SCOPE/SERVICE` for label services, the file's name for routes-file services.
    pub name: String,
    /// Servers sorted by URL, then container name.
    pub servers: Vec<DesiredServer>,
    pub pass_host_header: bool,
    pub balance: Balance,
    /// Name of the servers transport in [`Desired::servers_transports`] for `https://`
    /// servers.
    pub servers_transport: Option<String>,
    /// Health check of every server. Routes-file services get the defaults.
    pub health: HealthSpec,
    pub source: ServiceSource,
}

/// The origin of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceSource {
    /// Container labels.
    Docker,
    /// The routes file. Its servers have no container: `container_id` and `container_name`
    /// are empty, `docker_health` is `NoCheck` and `lifecycle` is `Running`.
    File,
}

/// One backend server of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredServer {
    /// Full container id; empty for a routes-file server.
    pub container_id: String,
    /// Container name; empty for a routes-file server.
    pub container_name: String,
    /// `http://IP:PORT` (IPv6 in brackets). A routes-file server may name a host instead.
    pub url: String,
    /// The address in `url`. For a routes-file server that names a host, it is the
    /// unspecified address `0.0.0.0` with the URL's port.
    pub addr: SocketAddr,
    pub docker_health: DockerHealth,
    pub lifecycle: Lifecycle,
}

/// How to check a service's servers: `METHOD scheme://ADDR:PORT/path` with the given headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// Request path. Default: `/health`, which every public service of the platform must serve.
    pub path: String,
    /// Time between checks. Default: 5 s.
    pub interval: Duration,
    /// Time a check may take. Default: 2 s.
    pub timeout: Duration,
    /// Port to check instead of the server's port.
    pub port: Option<u16>,
    /// `Host` header to send instead of the server's address.
    pub hostname: Option<String>,
    /// `http`, `https`, or `h2c` to probe over HTTP/2 without TLS. Other schemes are rejected
    /// when the labels are read.
    pub scheme: String,
    /// TLS settings of `https` probes; `None` verifies against the system's root certificates
    /// with the backend's IP address as the server name.
    pub transport: Option<ServersTransport>,
    /// Status that counts as healthy; `None` accepts any 2xx.
    pub expected_status: Option<u16>,
    /// Extra request headers, sorted by name.
    pub headers: Vec<(String, String)>,
    /// Request method, upper case. Default: `GET`.
    pub method: String,
    /// Whether redirects are followed (Traefik's `followredirects`, default true).
    pub follow_redirects: bool,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            path: "/health".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            port: None,
            hostname: None,
            scheme: "http".to_owned(),
            transport: None,
            expected_status: None,
            headers: Vec::new(),
            method: "GET".to_owned(),
            follow_redirects: true,
        }
    }
}

/// One certificate that served routers request from an ACME resolver.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CertificateRequest {
    /// Resolver name from `tls.certresolver`, such as `le`.
    pub resolver: String,
    /// Names for the certificate, lower case, main name first: one `tls.domains[n]` entry
    /// (main, then sans), or else the hosts of the router's `Host` matchers in rule order.
    pub names: Vec<String>,
    /// Routers that request it, sorted.
    pub routers: Vec<String>,
}

/// Builds the desired state from the running containers and the routes file.
///
/// Every container in `containers` is considered; the caller leaves out containers that are
/// not running. A container in [`Lifecycle::Stopping`] keeps its servers, with that lifecycle,
/// so the caller can drain them. `file_routes` is a snapshot read by `edge_proto::file::load`;
/// its routers and services are included unchanged.
pub fn build(
    containers: &[ContainerInfo],
    file_routes: Option<&Snapshot>,
    options: &AgentOptions,
) -> Desired {
    let mut sorted: Vec<&ContainerInfo> = containers.iter().collect();
    sorted.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));

    let mut errors = Vec::new();
    let mut projects: BTreeMap<String, Project> = BTreeMap::new();
    for container in sorted {
        let parsed = labels::parse_container(container, options);
        errors.extend(parsed.problems);
        if let Some(config) = parsed.config {
            let project = projects.entry(config.scope.clone()).or_default();
            project.add(&container.name, config);
        }
    }

    let file = FileRoutes::new(file_routes);
    let mut desired = Desired::default();
    let mut certificates = BTreeMap::new();
    for (scope, project) in projects {
        let mut resolver = Resolver {
            scope: &scope,
            file: &file,
            errors: &mut errors,
            certificates: &mut certificates,
        };
        resolver.resolve(project, &mut desired);
    }
    file.add_to(&mut desired);

    desired.routers.sort_by(|a, b| a.name.cmp(&b.name));
    desired.services.sort_by(|a, b| a.name.cmp(&b.name));
    desired.certificates = certificates
        .into_iter()
        .map(|((resolver, names), routers)| CertificateRequest {
            resolver,
            names,
            routers: routers.into_iter().collect(),
        })
        .collect();
    errors.sort();
    errors.dedup();
    desired.errors = errors;
    desired
}

impl Desired {
    /// Converts the desired state into a snapshot for the edge, asking `state_of` for the
    /// state of each server. The snapshot carries no certificates.
    pub fn to_snapshot(
        &self,
        version: u64,
        state_of: impl Fn(&DesiredServer) -> ServerState,
    ) -> Snapshot {
        let services = self
            .services
            .iter()
            .map(|service| Service {
                name: service.name.clone(),
                servers: service
                    .servers
                    .iter()
                    .map(|server| Server {
                        url: server.url.clone(),
                        state: state_of(server),
                    })
                    .collect(),
                balance: service.balance,
                pass_host_header: service.pass_host_header,
                servers_transport: service.servers_transport.clone(),
            })
            .collect();
        Snapshot {
            version,
            routers: self.routers.clone(),
            services,
            certificates: Vec::new(),
            default_certificate: None,
            acme_challenges: Default::default(),
            servers_transports: self.servers_transports.clone(),
        }
    }

    /// Returns errors only, leaving out warnings.
    pub fn hard_errors(&self) -> impl Iterator<Item = &LabelError> {
        self.errors
            .iter()
            .filter(|error| error.severity == Severity::Error)
    }
}

/// The routers and services of the routes file.
struct FileRoutes<'a> {
    snapshot: Option<&'a Snapshot>,
    router_names: BTreeSet<&'a str>,
    service_names: BTreeSet<&'a str>,
    transports: BTreeMap<&'a str, &'a ServersTransport>,
}

impl<'a> FileRoutes<'a> {
    fn new(snapshot: Option<&'a Snapshot>) -> Self {
        let routers = snapshot.map(|s| s.routers.as_slice()).unwrap_or_default();
        let services = snapshot.map(|s| s.services.as_slice()).unwrap_or_default();
        FileRoutes {
            snapshot,
            router_names: routers.iter().map(|r| r.name.as_str()).collect(),
            service_names: services.iter().map(|s| s.name.as_str()).collect(),
            transports: snapshot
                .map(|s| s.servers_transports.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|transport| (transport.name.as_str(), transport))
                .collect(),
        }
    }

    fn add_to(&self, desired: &mut Desired) {
        let Some(snapshot) = self.snapshot else {
            return;
        };
        desired.routers.extend(snapshot.routers.iter().cloned());
        desired.servers_transports = snapshot.servers_transports.clone();
        for service in &snapshot.services {
            let servers = service
                .servers
                .iter()
                .map(|server| DesiredServer {
                    container_id: String::new(),
                    container_name: String::new(),
                    url: server.url.clone(),
                    addr: file_server_addr(&server.url),
                    docker_health: DockerHealth::NoCheck,
                    lifecycle: Lifecycle::Running,
                })
                .collect();
            desired.services.push(DesiredService {
                name: service.name.clone(),
                servers,
                pass_host_header: service.pass_host_header,
                balance: service.balance,
                servers_transport: service.servers_transport.clone(),
                health: HealthSpec {
                    // Routes-file servers are not probed; the scheme only describes them.
                    scheme: match service.servers.first() {
                        Some(server) if server.url.starts_with("h2c://") => "h2c".to_owned(),
                        Some(server) if server.url.starts_with("https://") => "https".to_owned(),
                        _ => "http".to_owned(),
                    },
                    transport: service
                        .servers_transport
                        .as_deref()
                        .and_then(|name| self.transports.get(name))
                        .map(|transport| (*transport).clone()),
                    ..HealthSpec::default()
                },
                source: ServiceSource::File,
            });
        }
    }
}

/// Returns the address of a routes-file server URL `http://HOST:PORT`: the IP and port, or
/// the unspecified address with the port when HOST is a name.
fn file_server_addr(url: &str) -> SocketAddr {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return addr;
    }
    let port = authority
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .unwrap_or_default();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
}

/// What the containers of one scope declare, by lower-case name.
#[derive(Default)]
struct Project {
    routers: BTreeMap<String, Vec<Declaration<RouterConfig>>>,
    services: BTreeMap<String, Vec<Declaration<ServiceConfig>>>,
    middlewares: BTreeMap<String, Vec<Declaration<MiddlewareConfig>>>,
}

/// One container's declaration of a name.
struct Declaration<T> {
    container: String,
    declared: Declared<T>,
}

impl Project {
    fn add(&mut self, container: &str, config: labels::ContainerConfig) {
        fn push<T>(
            map: &mut BTreeMap<String, Vec<Declaration<T>>>,
            container: &str,
            entries: BTreeMap<String, Declared<T>>,
        ) {
            for (id, declared) in entries {
                map.entry(id).or_default().push(Declaration {
                    container: container.to_owned(),
                    declared,
                });
            }
        }
        push(&mut self.routers, container, config.routers);
        push(&mut self.services, container, config.services);
        push(&mut self.middlewares, container, config.middlewares);
    }
}

/// A name declared by one or more containers of a scope, after the conflict check.
struct Merged<T> {
    /// The name as written; of several spellings, the one that sorts first.
    name: String,
    /// Containers that declare it, in name order.
    containers: Vec<String>,
    /// Settings of the first container.
    settings: BTreeMap<String, String>,
    /// Each container's configuration, or `None` when an error or a conflict disabled it.
    configs: Option<Vec<T>>,
}

/// Kinds of names, for messages and label keys.
#[derive(Clone, Copy)]
enum Kind {
    Router,
    Service,
    Middleware,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Router => "router",
            Kind::Service => "service",
            Kind::Middleware => "middleware",
        }
    }

    fn key(self, name: &str, option: &str) -> String {
        let kind = match self {
            Kind::Router => "routers",
            Kind::Service => "services",
            Kind::Middleware => "middlewares",
        };
        match option {
            "" => format!("traefik.http.{kind}.{name}"),
            _ => format!("traefik.http.{kind}.{name}.{option}"),
        }
    }
}

/// Resolves the names of one scope into routers, services and certificate requests.
struct Resolver<'a> {
    scope: &'a str,
    file: &'a FileRoutes<'a>,
    errors: &'a mut Vec<LabelError>,
    /// (resolver, names) to the routers that request them.
    certificates: &'a mut BTreeMap<(String, Vec<String>), BTreeSet<String>>,
}

impl Resolver<'_> {
    fn resolve(&mut self, project: Project, desired: &mut Desired) {
        let mut services: BTreeMap<String, Merged<ServiceConfig>> = project
            .services
            .into_iter()
            .map(|(id, declarations)| (id, self.merge(Kind::Service, declarations)))
            .collect();
        for merged in services.values_mut() {
            self.resolve_transport(merged);
        }
        let middlewares: BTreeMap<String, Merged<MiddlewareConfig>> = project
            .middlewares
            .into_iter()
            .map(|(id, declarations)| (id, self.merge(Kind::Middleware, declarations)))
            .collect();

        let mut used_middlewares = BTreeSet::new();
        for declarations in project.routers.into_values() {
            let merged = self.merge(Kind::Router, declarations);
            let Some(config) = merged.configs.as_ref().and_then(|configs| configs.first()) else {
                continue;
            };
            let lookups = Lookups {
                services: &services,
                middlewares: &middlewares,
                used_middlewares: &mut used_middlewares,
            };
            if let Some(router) = self.route(&merged, config, lookups) {
                self.request_certificate(&merged, config, &router.name);
                desired.routers.push(router);
            }
        }

        self.report_unused_middlewares(&middlewares, &used_middlewares);
        for merged in services.into_values() {
            let Some(configs) = merged.configs else {
                continue;
            };
            desired.services.push(self.service(&merged.name, configs));
        }
    }

    /// Merges the declarations of one name. Different settings disable it, with an error for
    /// each pair of containers that differ.
    fn merge<T>(&mut self, kind: Kind, declarations: Vec<Declaration<T>>) -> Merged<T> {
        let name = declarations
            .iter()
            .map(|declaration| declaration.declared.name.as_str())
            .min()
            .unwrap_or_default()
            .to_owned();
        let containers = declarations.iter().map(|d| d.container.clone()).collect();
        let Some(first) = declarations.first() else {
            return Merged {
                name,
                containers,
                settings: BTreeMap::new(),
                configs: None,
            };
        };
        let settings = first.declared.settings.clone();

        let mut conflict = false;
        for other in &declarations[1..] {
            if let Some(option) = first_difference(&settings, &other.declared.settings) {
                conflict = true;
                self.report_conflict(kind, &name, &option, first, other);
            }
        }
        let configs = declarations
            .into_iter()
            .map(|declaration| declaration.declared.config)
            .collect::<Option<Vec<T>>>();
        let mut merged = Merged {
            name,
            containers,
            settings,
            configs: configs.filter(|_| !conflict),
        };

        let scoped = self.scoped(&merged.name);
        let file_names = match kind {
            Kind::Router => &self.file.router_names,
            Kind::Service => &self.file.service_names,
            Kind::Middleware => return merged,
        };
        if merged.configs.is_some() && file_names.contains(scoped.as_str()) {
            let message = format!(
                "the routes file also declares a {} named {scoped}; rename one of them. {} {} is \
                 disabled",
                kind.noun(),
                capitalized(kind.noun()),
                merged.name
            );
            self.report(kind, &merged, "", message);
            merged.configs = None;
        }
        merged
    }

    fn report_conflict<T>(
        &mut self,
        kind: Kind,
        name: &str,
        option: &str,
        first: &Declaration<T>,
        other: &Declaration<T>,
    ) {
        let key = kind.key(name, option);
        fn value_of<'d, T>(declaration: &'d Declaration<T>, option: &str) -> Option<&'d String> {
            declaration.declared.settings.get(option)
        }
        let described = |value: Option<&String>| match value {
            Some(value) => format!("it is \"{value}\""),
            None => "it is not set".to_owned(),
        };
        let pairs = [(first, other), (other, first)];
        for (this, that) in pairs {
            let message = format!(
                "conflicts with container {}, where {}: {} {name} of project {} is disabled \
                 because its definitions differ",
                that.container,
                described(value_of(that, option)),
                kind.noun(),
                self.scope
            );
            self.errors.push(LabelError::new(
                &this.container,
                Some(&key),
                value_of(this, option).cloned(),
                message,
                Severity::Error,
            ));
        }
    }

    /// Resolves a router's service and middlewares. Returns `None`, with errors for every
    /// container that declares the router, when one of them fails.
    fn route(
        &mut self,
        merged: &Merged<RouterConfig>,
        config: &RouterConfig,
        lookups: Lookups<'_>,
    ) -> Option<Router> {
        let service = self.service_name(merged, &config.service, lookups.services);

        let mut max_request_body_bytes: Option<u64> = None;
        let mut middlewares_ok = true;
        for reference in &config.middlewares {
            match self.middleware(merged, reference, lookups.middlewares) {
                Some(MiddlewareUse::Limit(limit)) => {
                    max_request_body_bytes =
                        Some(max_request_body_bytes.map_or(limit, |current| current.min(limit)));
                }
                Some(MiddlewareUse::NoLimit) => {}
                Some(MiddlewareUse::Unsupported { id, type_name }) => {
                    lookups.used_middlewares.insert(id);
                    let message = format!(
                        "middleware type {type_name} is not supported yet (middleware \
                         {reference}); only buffering is. {}",
                        capitalized(&disabled(Kind::Router, &merged.name))
                    );
                    self.report(Kind::Router, merged, "middlewares", message);
                    middlewares_ok = false;
                }
                None => middlewares_ok = false,
            }
        }

        Some(Router {
            name: self.scoped(&merged.name),
            rule: config.rule.clone(),
            priority: config.priority,
            entrypoints: config.entrypoints.clone(),
            service: service?,
            tls: config.tls.is_some(),
            max_request_body_bytes,
        })
        .filter(|_| middlewares_ok)
    }

    /// Gives a service's health probes the routes file's servers transport that its labels
    /// name, or disables the service with an error when the routes file has no such transport.
    fn resolve_transport(&mut self, merged: &mut Merged<ServiceConfig>) {
        let Some(configs) = merged.configs.as_mut() else {
            return;
        };
        let Some(name) = configs.first().and_then(|c| c.servers_transport.clone()) else {
            return;
        };
        match self.file.transports.get(name.as_str()) {
            Some(transport) => {
                for config in configs.iter_mut() {
                    config.health.transport = Some((*transport).clone());
                }
            }
            None => {
                let message = format!(
                    "servers transport {name}@file not found in the routes file; define it under \
                     http.serversTransports. {}",
                    capitalized(&disabled(Kind::Service, &merged.name))
                );
                self.report(
                    Kind::Service,
                    merged,
                    "loadbalancer.serverstransport",
                    message,
                );
                merged.configs = None;
            }
        }
    }

    /// Returns the snapshot name of a router's service, or reports why there is none.
    fn service_name(
        &mut self,
        router: &Merged<RouterConfig>,
        reference: &Reference,
        services: &BTreeMap<String, Merged<ServiceConfig>>,
    ) -> Option<String> {
        let router_disabled = capitalized(&disabled(Kind::Router, &router.name));
        let message = match reference.provider.as_deref() {
            None | Some("docker") => match services.get(&reference.name.to_lowercase()) {
                Some(service) if service.configs.is_some() => {
                    return Some(self.scoped(&service.name))
                }
                Some(service) => format!(
                    "service {} is disabled by its own errors. {router_disabled}",
                    service.name
                ),
                None => format!(
                    "service {reference} not found: no container of project {} declares it. \
                     {router_disabled}",
                    self.scope
                ),
            },
            Some("file") if self.file.service_names.contains(reference.name.as_str()) => {
                return Some(reference.name.clone())
            }
            Some("file") => {
                format!("service {reference} not found in the routes file. {router_disabled}")
            }
            Some(provider) => format!(
                "provider {provider} is not supported; use @docker or @file. {router_disabled}"
            ),
        };
        self.report(Kind::Router, router, "service", message);
        None
    }

    /// Looks up one middleware of a router, reporting a missing, disabled or foreign one.
    fn middleware(
        &mut self,
        router: &Merged<RouterConfig>,
        reference: &Reference,
        middlewares: &BTreeMap<String, Merged<MiddlewareConfig>>,
    ) -> Option<MiddlewareUse> {
        let router_disabled = capitalized(&disabled(Kind::Router, &router.name));
        let id = reference.name.to_lowercase();
        let message = match reference.provider.as_deref() {
            None | Some("docker") => match middlewares.get(&id) {
                Some(merged) => match merged.configs.as_ref().and_then(|c| c.first()) {
                    Some(MiddlewareConfig::Buffering {
                        max_request_body_bytes: Some(limit),
                    }) => return Some(MiddlewareUse::Limit(*limit)),
                    Some(MiddlewareConfig::Buffering { .. }) => {
                        return Some(MiddlewareUse::NoLimit)
                    }
                    Some(MiddlewareConfig::Unsupported { type_name }) => {
                        return Some(MiddlewareUse::Unsupported {
                            id,
                            type_name: type_name.clone(),
                        })
                    }
                    None => format!(
                        "middleware {} is disabled by its own errors. {router_disabled}",
                        merged.name
                    ),
                },
                None => format!(
                    "middleware {reference} not found: no container of project {} declares it. \
                     {router_disabled}",
                    self.scope
                ),
            },
            // NOTE: the routes-file snapshot keeps no middleware definitions, only each file
            // router's body limit, so a label router cannot use them.
            Some("file") => format!(
                "middleware {reference} cannot be used: routers from labels cannot use \
                 middlewares of the routes file yet. {router_disabled}"
            ),
            Some(provider) => format!(
                "middleware {reference}: provider {provider} is not supported; use @docker. \
                 {router_disabled}"
            ),
        };
        self.report(Kind::Router, router, "middlewares", message);
        None
    }

    /// Reports middlewares of unsupported types that no router uses: nothing is disabled,
    /// but the labels do not do what they say.
    fn report_unused_middlewares(
        &mut self,
        middlewares: &BTreeMap<String, Merged<MiddlewareConfig>>,
        used: &BTreeSet<String>,
    ) {
        for (id, merged) in middlewares {
            let Some(MiddlewareConfig::Unsupported { type_name }) =
                merged.configs.as_ref().and_then(|configs| configs.first())
            else {
                continue;
            };
            if used.contains(id) {
                continue;
            }
            let message = format!(
                "middleware type {type_name} is not supported yet; only buffering is. No router \
                 uses middleware {}",
                merged.name
            );
            self.report(Kind::Middleware, merged, type_name, message);
        }
    }

    /// Records the certificates that a served router requests: one per `tls.domains` entry,
    /// else one for the hosts of its rule.
    fn request_certificate(
        &mut self,
        merged: &Merged<RouterConfig>,
        config: &RouterConfig,
        router_name: &str,
    ) {
        let Some(tls) = &config.tls else { return };
        let Some(resolver) = &tls.cert_resolver else {
            return;
        };
        let mut requests: Vec<Vec<String>> = tls
            .domains
            .iter()
            .map(|domain| {
                let names = std::iter::once(&domain.main).chain(&domain.sans);
                unique_lowercase(names.map(String::as_str))
            })
            .collect();
        if requests.is_empty() && !config.hosts.is_empty() {
            requests.push(unique_lowercase(config.hosts.iter().map(String::as_str)));
        }
        if requests.is_empty() {
            let message = format!(
                "router {} names certificate resolver {resolver}, but neither its rule nor \
                 tls.domains names a host, so no certificate is requested",
                merged.name
            );
            self.report_with(
                Kind::Router,
                merged,
                "tls.certresolver",
                message,
                Severity::Warning,
            );
        }
        for names in requests {
            let key = (resolver.clone(), names);
            self.certificates
                .entry(key)
                .or_default()
                .insert(router_name.to_owned());
        }
    }

    fn service(&self, name: &str, configs: Vec<ServiceConfig>) -> DesiredService {
        let mut servers: Vec<DesiredServer> =
            configs.iter().map(|config| config.server.clone()).collect();
        servers.sort_by(|a, b| (&a.url, &a.container_name).cmp(&(&b.url, &b.container_name)));
        let first = configs.into_iter().next();
        let (pass_host_header, balance, servers_transport, health) = match first {
            Some(config) => (
                config.pass_host_header,
                config.balance,
                config.servers_transport,
                config.health,
            ),
            None => (true, Balance::RoundRobin, None, HealthSpec::default()),
        };
        DesiredService {
            name: self.scoped(name),
            servers,
            pass_host_header,
            balance,
            servers_transport,
            health,
            source: ServiceSource::Docker,
        }
    }

    fn scoped(&self, name: &str) -> String {
        format!("{}/{name}", self.scope)
    }

    /// Reports an error to every container that declares `merged`.
    fn report<T>(&mut self, kind: Kind, merged: &Merged<T>, option: &str, message: String) {
        self.report_with(kind, merged, option, message, Severity::Error);
    }

    fn report_with<T>(
        &mut self,
        kind: Kind,
        merged: &Merged<T>,
        option: &str,
        message: String,
        severity: Severity,
    ) {
        let key = kind.key(&merged.name, option);
        let value = merged.settings.get(option).cloned();
        for container in &merged.containers {
            self.errors.push(LabelError::new(
                container,
                Some(&key),
                value.clone(),
                message.clone(),
                severity,
            ));
        }
    }
}

/// The merged services and middlewares of a scope, for resolving a router.
struct Lookups<'a> {
    services: &'a BTreeMap<String, Merged<ServiceConfig>>,
    middlewares: &'a BTreeMap<String, Merged<MiddlewareConfig>>,
    /// Lower-case names of unsupported middlewares that some router uses.
    used_middlewares: &'a mut BTreeSet<String>,
}

/// What a middleware does to a router.
enum MiddlewareUse {
    /// A request body limit in bytes.
    Limit(u64),
    /// Nothing: a `buffering` middleware without a request body limit.
    NoLimit,
    /// A type the edge does not implement, which disables the router.
    Unsupported { id: String, type_name: String },
}

/// Returns the first option whose value differs between two settings maps.
fn first_difference(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Option<String> {
    let options: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    options
        .into_iter()
        .find(|option| a.get(*option) != b.get(*option))
        .cloned()
}

/// Returns the certificates that the routes file's routers request: one per `tls.domains`
/// entry, else one for the hosts of the router's rule.
pub fn file_certificate_requests(routes: &edge_proto::file::RoutesFile) -> Vec<CertificateRequest> {
    let mut requests: BTreeMap<(String, Vec<String>), BTreeSet<String>> = BTreeMap::new();
    for entry in &routes.cert_resolvers {
        let mut name_sets: Vec<Vec<String>> = entry
            .domains
            .iter()
            .map(|names| unique_lowercase(names.iter().map(String::as_str)))
            .collect();
        if name_sets.is_empty() {
            let rule = routes
                .snapshot
                .routers
                .iter()
                .find(|router| router.name == entry.router)
                .and_then(|router| edge_proto::rule::parse(&router.rule).ok());
            let hosts = rule.map(|expr| expr.hosts()).unwrap_or_default();
            if !hosts.is_empty() {
                name_sets.push(unique_lowercase(hosts.iter().map(String::as_str)));
            }
        }
        for names in name_sets {
            requests
                .entry((entry.resolver.clone(), names))
                .or_default()
                .insert(entry.router.clone());
        }
    }
    requests
        .into_iter()
        .map(|((resolver, names), routers)| CertificateRequest {
            resolver,
            names,
            routers: routers.into_iter().collect(),
        })
        .collect()
}

/// Adds `extra` to the sorted `requests`, merging the routers of equal name sets.
pub fn merge_certificate_requests(
    requests: &mut Vec<CertificateRequest>,
    extra: &[CertificateRequest],
) {
    for request in extra {
        let existing = requests
            .iter_mut()
            .find(|r| r.resolver == request.resolver && r.names == request.names);
        match existing {
            Some(existing) => {
                existing.routers.extend(request.routers.iter().cloned());
                existing.routers.sort();
                existing.routers.dedup();
            }
            None => requests.push(request.clone()),
        }
    }
    requests.sort();
}

fn unique_lowercase<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut unique: Vec<String> = Vec::new();
    for name in names {
        let name = name.to_ascii_lowercase();
        if !unique.contains(&name) {
            unique.push(name);
        }
    }
    unique
}

fn disabled(kind: Kind, name: &str) -> String {
    format!("{} {name} is disabled", kind.noun())
}

#[cfg(test)]
mod tests;
