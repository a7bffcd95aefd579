//! Decoding of one container's `traefik.*` labels into typed router, service and middleware
//! options, before any default is applied.
//!
//! An unknown or malformed key fails the whole container, as in Traefik, because ignoring it
//! could expose a router more widely than intended (a misspelled `entrypoints` puts it on every
//! entry point). In lenient mode such a key is ignored with a warning instead. An invalid value
//! disables only the router, service or middleware that it belongs to.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use edge_proto::Balance;

use super::schema::{self, Field, KeyError, OptionPath};
use super::value::{
    is_http_token, parse_bool, parse_int, parse_list, parse_port, parse_positive_duration,
    parse_section_switch, parse_unsigned, SectionSwitch,
};
use super::{LabelError, ENABLE_LABEL};
use crate::desired::HealthSpec;
use crate::model::ContainerInfo;

/// Namespaces below `traefik.` that the Docker provider reads.
const NAMESPACES: &[&str] = &["docker", "enable", "http", "swarm", "tcp", "tls", "udp"];

/// Options below `traefik.docker.`.
const DOCKER_OPTIONS: &[&str] = &["allownonrunning", "lbswarm", "network"];

/// Kinds below `traefik.http.`.
const HTTP_KINDS: &[&str] = &["middlewares", "routers", "services"];

/// Label namespaces of Traefik v1, which Traefik v2 and later ignore.
const TRAEFIK_V1_NAMESPACES: &[&str] =
    &["backend", "frontend", "port", "protocol", "weight", "tags"];

/// The labels of one container, decoded but without defaults.
#[derive(Debug, Default)]
pub(super) struct DecodedLabels {
    /// Value of `traefik.docker.network`.
    pub network: Option<String>,
    /// Routers by lower-case name.
    pub routers: BTreeMap<String, Entity<RouterLabels>>,
    /// Services by lower-case name.
    pub services: BTreeMap<String, Entity<ServiceLabels>>,
    /// Middlewares by lower-case name.
    pub middlewares: BTreeMap<String, Entity<MiddlewareLabels>>,
    /// Whether the container has `traefik.tcp.*` or `traefik.udp.*` labels.
    pub has_tcp_or_udp: bool,
}

/// A router, service or middleware declared by labels.
#[derive(Debug, Default)]
pub(super) struct Entity<T> {
    /// The name as written; of several spellings, the one that sorts first, as in Traefik.
    pub name: String,
    /// Option key suffix (lower case, such as `tls.certresolver`) to value.
    pub settings: BTreeMap<String, String>,
    /// Whether an invalid value disabled it. The error is already reported.
    pub invalid: bool,
    pub labels: T,
}

/// Router options as written.
#[derive(Debug, Default)]
pub(super) struct RouterLabels {
    pub rule: Option<String>,
    pub entrypoints: Option<Vec<String>>,
    pub service: Option<String>,
    pub priority: Option<i64>,
    pub middlewares: Vec<String>,
    /// Value of the bare `tls` key.
    pub tls_switch: Option<SectionSwitch>,
    pub cert_resolver: Option<String>,
    pub tls_options: Option<String>,
    /// `tls.domains[n]` by index.
    pub domains: BTreeMap<usize, DomainLabels>,
}

/// One `tls.domains[n]` entry.
#[derive(Debug, Default)]
pub(super) struct DomainLabels {
    pub main: Option<String>,
    pub sans: Vec<String>,
}

/// Service options as written, with defaults for the ones not set.
#[derive(Debug)]
pub(super) struct ServiceLabels {
    pub port: Option<u16>,
    /// `server.scheme`, lowercase: `http`, `https` or `h2c`.
    pub scheme: Option<String>,
    /// Name of the routes file's servers transport named by `serverstransport=NAME@file`.
    pub servers_transport: Option<String>,
    /// `server.url`, normalized to `SCHEME://IP:PORT`, with its address.
    pub url: Option<(String, SocketAddr)>,
    /// `healthcheck.scheme`, lowercase. Probes use the server's scheme when it is not set.
    pub health_scheme: Option<String>,
    pub pass_host_header: bool,
    pub balance: Balance,
    pub health: HealthSpec,
}

impl Default for ServiceLabels {
    fn default() -> Self {
        ServiceLabels {
            port: None,
            scheme: None,
            servers_transport: None,
            health_scheme: None,
            url: None,
            pass_host_header: true,
            balance: Balance::RoundRobin,
            health: HealthSpec::default(),
        }
    }
}

/// Middleware options as written.
#[derive(Debug, Default)]
pub(super) struct MiddlewareLabels {
    /// Lower-case middleware types; Traefik allows exactly one.
    pub types: BTreeSet<String>,
    /// `buffering.maxrequestbodybytes`, with 0 (unlimited) as `None`.
    pub max_request_body_bytes: Option<u64>,
}

/// Decodes the labels of `container`. Problems go to `problems`.
///
/// Returns `None` when a key error fails the whole container (never in lenient mode).
pub(super) fn decode(
    container: &ContainerInfo,
    lenient: bool,
    problems: &mut Vec<LabelError>,
) -> Option<DecodedLabels> {
    let mut decoder = Decoder {
        container,
        lenient,
        problems,
        failed: false,
        reported_namespaces: BTreeSet::new(),
        sticky: BTreeMap::new(),
        out: DecodedLabels::default(),
    };
    for (key, value) in &container.labels {
        decoder.decode_label(key, value);
    }
    decoder.finish_services();
    decoder.finish_middlewares();
    (!decoder.failed).then_some(decoder.out)
}

/// Reads `traefik.enable`.
///
/// # Errors
///
/// Returns an error when the value is not a boolean.
pub(super) fn enable_flag(container: &ContainerInfo) -> Result<Option<bool>, LabelError> {
    let Some((key, value)) = container
        .labels
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(ENABLE_LABEL))
    else {
        return Ok(None);
    };
    parse_bool(value).map(Some).map_err(|message| {
        LabelError::error(
            container,
            Some(key),
            Some(value.clone()),
            format!("{message}; the container is skipped"),
        )
    })
}

/// The kind of declaration that an option belongs to.
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

    fn fields(self) -> &'static [Field] {
        match self {
            Kind::Router => schema::ROUTER,
            Kind::Service => schema::SERVICE,
            Kind::Middleware => schema::MIDDLEWARE,
        }
    }
}

/// The sticky-session keys seen for one service.
#[derive(Default)]
struct StickyKeys {
    /// The first key under `sticky`, for the warning.
    first_key: String,
    /// Whether `sticky=false` or `sticky.cookie=false` turned it off.
    disabled: bool,
}

struct Decoder<'a> {
    container: &'a ContainerInfo,
    lenient: bool,
    problems: &'a mut Vec<LabelError>,
    /// Whether a key error failed the whole container.
    failed: bool,
    /// Namespaces (`tcp`, `udp`, `tls`) already reported once.
    reported_namespaces: BTreeSet<&'static str>,
    /// Sticky-session keys by lower-case service name.
    sticky: BTreeMap<String, StickyKeys>,
    out: DecodedLabels,
}

/// One label being decoded, with the entity it belongs to.
struct Target<'k> {
    kind: Kind,
    /// Lower-case name.
    id: String,
    /// The name as written in this key.
    name: &'k str,
    key: &'k str,
    value: &'k str,
    path: OptionPath,
}

impl Decoder<'_> {
    fn decode_label(&mut self, key: &str, value: &str) {
        let segments: Vec<&str> = key.split('.').collect();
        if !segments[0].eq_ignore_ascii_case("traefik") || segments.len() < 2 {
            return;
        }
        let namespace = segments[1].to_ascii_lowercase();
        let decoded_namespace = matches!(namespace.as_str(), "http" | "docker");
        if decoded_namespace && segments.iter().any(|segment| segment.is_empty()) {
            self.key_error(key, value, "empty segment in the key (two dots in a row?)");
            return;
        }

        match namespace.as_str() {
            "enable" if segments.len() == 2 => {}
            "http" => self.decode_http(key, value, &segments[2..]),
            "docker" => self.decode_docker(key, value, &segments[2..]),
            "tcp" | "udp" => {
                self.out.has_tcp_or_udp = true;
                let protocol = if namespace == "tcp" { "tcp" } else { "udp" };
                if self.reported_namespaces.insert(protocol) {
                    let message = format!(
                        "{} routers, services and middlewares are not supported; this \
                         container's HTTP routers are unaffected",
                        protocol.to_ascii_uppercase()
                    );
                    self.problems.push(LabelError::error(
                        self.container,
                        Some(key),
                        Some(value.to_owned()),
                        message,
                    ));
                }
            }
            "tls" if is_default_tls_store(&segments[2..]) => {
                if self.reported_namespaces.insert("tls") {
                    let message = "TLS stores in labels are not supported; the edge serves the \
                                   certificates that the agent obtains";
                    self.problems.push(LabelError::error(
                        self.container,
                        Some(key),
                        Some(value.to_owned()),
                        message,
                    ));
                }
            }
            "swarm" => self.warn(
                key,
                value,
                "traefik.swarm.* labels are read only by Traefik's Swarm provider; ignored",
            ),
            other if TRAEFIK_V1_NAMESPACES.contains(&other) => self.warn(
                key,
                value,
                "Traefik v1 label, which Traefik v2 and later ignore; ignored",
            ),
            other => {
                let suggestion = match schema::closest(other, NAMESPACES) {
                    Some(name) => format!("; did you mean traefik.{name}?"),
                    None => String::new(),
                };
                let message =
                    format!("unknown key, which Traefik does not read either; ignored{suggestion}");
                self.warn(key, value, &message);
            }
        }
    }

    fn decode_docker(&mut self, key: &str, value: &str, options: &[&str]) {
        let option = match options {
            [option] => option.to_ascii_lowercase(),
            [] => {
                let message = KeyError::Incomplete {
                    section: "docker".to_owned(),
                    valid: DOCKER_OPTIONS.to_vec(),
                };
                self.key_error(key, value, &message.to_string());
                return;
            }
            [option, ..] => {
                let valid = if DOCKER_OPTIONS.contains(&option.to_ascii_lowercase().as_str()) {
                    Vec::new()
                } else {
                    DOCKER_OPTIONS.to_vec()
                };
                let error = KeyError::Unknown {
                    segment: options.join("."),
                    valid,
                };
                self.key_error(key, value, &error.to_string());
                return;
            }
        };
        match option.as_str() {
            "network" if value.trim().is_empty() => {
                self.warn(key, value, "empty network name; ignored");
            }
            "network" => self.out.network = Some(value.trim().to_owned()),
            "allownonrunning" => match parse_bool(value) {
                Ok(false) => {}
                Ok(true) => self.warn(
                    key,
                    value,
                    "not supported: the agent routes only to running containers; ignored",
                ),
                Err(message) => self.key_error(key, value, &message),
            },
            "lbswarm" => self.warn(key, value, "Swarm is not supported; ignored"),
            _ => {
                let error = KeyError::Unknown {
                    segment: options[0].to_owned(),
                    valid: DOCKER_OPTIONS.to_vec(),
                };
                self.key_error(key, value, &error.to_string());
            }
        }
    }

    fn decode_http(&mut self, key: &str, value: &str, segments: &[&str]) {
        let Some(kind_segment) = segments.first() else {
            let error = KeyError::Incomplete {
                section: "http".to_owned(),
                valid: HTTP_KINDS.to_vec(),
            };
            self.key_error(key, value, &error.to_string());
            return;
        };
        let kind = match kind_segment.to_ascii_lowercase().as_str() {
            "routers" => Kind::Router,
            "services" => Kind::Service,
            "middlewares" => Kind::Middleware,
            _ => {
                let error = KeyError::Unknown {
                    segment: (*kind_segment).to_owned(),
                    valid: HTTP_KINDS.to_vec(),
                };
                self.key_error(key, value, &error.to_string());
                return;
            }
        };
        let Some(name) = segments.get(1) else {
            let message = format!("the key needs a {} name", kind.noun());
            self.key_error(key, value, &message);
            return;
        };
        if name.contains(['@', '[', ']']) {
            let message = format!(
                "invalid {} name \"{name}\": names cannot contain '@', '[' or ']'",
                kind.noun()
            );
            self.key_error(key, value, &message);
            return;
        }
        let path = match schema::walk(kind.fields(), &segments[2..]) {
            Ok(path) => path,
            Err(error) => {
                self.key_error(key, value, &error.to_string());
                return;
            }
        };

        let target = Target {
            kind,
            id: name.to_lowercase(),
            name,
            key,
            value,
            path,
        };
        self.record_setting(&target);
        match kind {
            Kind::Router => self.router_option(&target),
            Kind::Service => self.service_option(&target),
            Kind::Middleware => self.middleware_option(&target),
        }
    }

    /// Creates the entity on first sight and records the option's value.
    fn record_setting(&mut self, target: &Target<'_>) {
        let (name, settings) = match target.kind {
            Kind::Router => {
                let entity = self.out.routers.entry(target.id.clone()).or_default();
                (&mut entity.name, &mut entity.settings)
            }
            Kind::Service => {
                let entity = self.out.services.entry(target.id.clone()).or_default();
                (&mut entity.name, &mut entity.settings)
            }
            Kind::Middleware => {
                let entity = self.out.middlewares.entry(target.id.clone()).or_default();
                (&mut entity.name, &mut entity.settings)
            }
        };
        if name.is_empty() || target.name < name.as_str() {
            target.name.clone_into(name);
        }
        settings.insert(target.path.suffix.clone(), target.value.to_owned());
    }

    fn router_option(&mut self, target: &Target<'_>) {
        let value = target.value;
        let result = match target.path.option.as_str() {
            "rule" => {
                self.router(target).rule = Some(value.to_owned());
                Ok(())
            }
            "rulesyntax" => {
                // Both syntaxes are always accepted, so the value is only checked.
                if value.eq_ignore_ascii_case("v2") || value.eq_ignore_ascii_case("v3") {
                    Ok(())
                } else {
                    Err("invalid rule syntax; use v2 or v3".to_owned())
                }
            }
            "entrypoints" => {
                self.router(target).entrypoints = Some(parse_list(value));
                Ok(())
            }
            "service" => {
                self.router(target).service = Some(value.trim().to_owned());
                Ok(())
            }
            "priority" => parse_int(value).map(|priority| {
                self.router(target).priority = Some(priority);
            }),
            "middlewares" => {
                self.router(target).middlewares = parse_list(value);
                Ok(())
            }
            "tls" => {
                let switch = parse_section_switch(value);
                if switch == SectionSwitch::DisabledByOtherValue {
                    self.warn(
                        target.key,
                        value,
                        "read as false, as Traefik does; write true or false",
                    );
                }
                self.router(target).tls_switch = Some(switch);
                Ok(())
            }
            "tls.certresolver" => {
                self.router(target).cert_resolver =
                    Some(value.trim().to_owned()).filter(|resolver| !resolver.is_empty());
                Ok(())
            }
            "tls.options" => {
                self.router(target).tls_options =
                    Some(value.trim().to_owned()).filter(|options| !options.is_empty());
                Ok(())
            }
            "tls.domains.main" => {
                let index = target.path.index.unwrap_or_default();
                let domain = self.router(target).domains.entry(index).or_default();
                domain.main = Some(value.trim().to_owned()).filter(|main| !main.is_empty());
                Ok(())
            }
            "tls.domains.sans" => {
                let index = target.path.index.unwrap_or_default();
                self.router(target).domains.entry(index).or_default().sans = parse_list(value);
                Ok(())
            }
            "observability.traceverbosity"
                if !value.eq_ignore_ascii_case("minimal")
                    && !value.eq_ignore_ascii_case("detailed") =>
            {
                Err("invalid trace verbosity; use minimal or detailed".to_owned())
            }
            "observability.traceverbosity" => {
                self.warn_unsupported_observability(target);
                Ok(())
            }
            _ => parse_bool(value).map(|_| self.warn_unsupported_observability(target)),
        };
        if let Err(message) = result {
            self.value_error(target, &message);
        }
    }

    fn warn_unsupported_observability(&mut self, target: &Target<'_>) {
        self.warn(
            target.key,
            target.value,
            "per-router observability settings are not supported yet; ignored",
        );
    }

    fn service_option(&mut self, target: &Target<'_>) {
        let value = target.value;
        let option = target.path.option.as_str();
        let Some(option) = option.strip_prefix("loadbalancer.") else {
            return;
        };
        let result = match option {
            "server.port" => parse_port(value).map(|port| {
                self.service(target).port = Some(port);
            }),
            "server.scheme" => check_backend_scheme(value).map(|scheme| {
                self.service(target).scheme = Some(scheme);
            }),
            "server.url" => parse_server_url(value).map(|url| {
                self.service(target).url = Some(url);
            }),
            "server.weight" => parse_int(value).map(|weight| {
                if weight != 1 {
                    self.warn(
                        target.key,
                        value,
                        "server weights are not supported yet; every server gets an equal share",
                    );
                }
            }),
            "server.preservepath" => parse_bool(value).map(|_| ()),
            "passhostheader" => parse_bool(value).map(|pass| {
                self.service(target).pass_host_header = pass;
            }),
            "strategy" => self.strategy(target),
            "serverstransport" => parse_transport_reference(value).map(|name| {
                self.service(target).servers_transport = Some(name);
            }),
            "responseforwarding.flushinterval" => {
                super::value::parse_duration_nanos(value).map(|_| {
                    self.warn(
                        target.key,
                        value,
                        "flushinterval is not supported yet; the edge flushes as data arrives",
                    );
                })
            }
            "passivehealthcheck.failurewindow" | "passivehealthcheck.maxfailedattempts" => {
                let checked = if option.ends_with("failurewindow") {
                    parse_positive_duration(value).map(|_| ())
                } else {
                    parse_unsigned(value).map(|_| ())
                };
                checked.map(|()| {
                    self.warn(
                        target.key,
                        value,
                        "passive health checks are not supported yet; ignored",
                    );
                })
            }
            _ if option.starts_with("sticky") => self.sticky_option(target, option),
            _ => self.health_option(target, option),
        };
        if let Err(message) = result {
            self.value_error(target, &message);
        }
    }

    fn strategy(&mut self, target: &Target<'_>) -> Result<(), String> {
        let value = target.value;
        let balance = if value.eq_ignore_ascii_case("wrr") {
            Balance::RoundRobin
        } else if value.eq_ignore_ascii_case("p2c") || value.eq_ignore_ascii_case("leasttime") {
            Balance::LeastInFlight
        } else if value.eq_ignore_ascii_case("hrw") {
            self.warn(
                target.key,
                value,
                "strategy hrw is not supported yet; round robin is used",
            );
            Balance::RoundRobin
        } else {
            return Err("unknown load-balancing strategy; use wrr, p2c, hrw or leasttime".into());
        };
        self.service(target).balance = balance;
        Ok(())
    }

    fn sticky_option(&mut self, target: &Target<'_>, option: &str) -> Result<(), String> {
        let value = target.value;
        match option {
            "sticky" | "sticky.cookie" if parse_section_switch(value) != SectionSwitch::Enabled => {
                self.sticky.entry(target.id.clone()).or_default().disabled = true;
            }
            "sticky.cookie.secure" | "sticky.cookie.httponly" => {
                parse_bool(value)?;
            }
            "sticky.cookie.maxage" => {
                parse_int(value)?;
            }
            "sticky.cookie.samesite"
                if !["", "none", "lax", "strict"]
                    .iter()
                    .any(|valid| value.eq_ignore_ascii_case(valid)) =>
            {
                return Err("invalid samesite; use none, lax or strict".to_owned());
            }
            _ => {}
        }
        let sticky = self.sticky.entry(target.id.clone()).or_default();
        if sticky.first_key.is_empty() {
            target.key.clone_into(&mut sticky.first_key);
        }
        Ok(())
    }

    fn health_option(&mut self, target: &Target<'_>, option: &str) -> Result<(), String> {
        let value = target.value;
        let Some(option) = option.strip_prefix("healthcheck") else {
            return Ok(());
        };
        match option {
            "" if parse_section_switch(value) != SectionSwitch::Enabled => {
                self.warn(
                    target.key,
                    value,
                    "health checks cannot be turned off: every backend must answer its health \
                     check before it receives requests",
                );
            }
            ".path" => {
                if !value.starts_with('/') {
                    return Err("health-check path must start with '/'".to_owned());
                }
                self.service(target).health.path = value.to_owned();
            }
            ".interval" => self.service(target).health.interval = parse_positive_duration(value)?,
            ".timeout" => self.service(target).health.timeout = parse_positive_duration(value)?,
            ".unhealthyinterval" => {
                parse_positive_duration(value)?;
                self.warn(
                    target.key,
                    value,
                    "unhealthyinterval is not supported yet; interval is used",
                );
            }
            ".port" => self.service(target).health.port = Some(parse_port(value)?),
            ".hostname" => {
                let hostname = value.trim();
                if hostname.is_empty() || hostname.contains(char::is_whitespace) {
                    return Err("invalid health-check hostname".to_owned());
                }
                self.service(target).health.hostname = Some(hostname.to_owned());
            }
            ".scheme" => self.service(target).health_scheme = Some(check_backend_scheme(value)?),
            ".mode" if value.eq_ignore_ascii_case("http") => {}
            ".mode" if value.eq_ignore_ascii_case("grpc") => {
                return Err("gRPC health checks are not supported yet; use mode http".to_owned());
            }
            ".mode" => return Err("invalid health-check mode; use http".to_owned()),
            ".headers" => {
                let name = target.path.map_key.clone().unwrap_or_default();
                if !is_http_token(&name) {
                    return Err(format!("invalid header name \"{name}\""));
                }
                if value.contains(['\r', '\n', '\0']) {
                    return Err("header value contains a line break or NUL".to_owned());
                }
                let headers = &mut self.service(target).health.headers;
                headers.retain(|(existing, _)| !existing.eq_ignore_ascii_case(&name));
                headers.push((name, value.to_owned()));
                headers.sort();
            }
            ".method" => {
                if !is_http_token(value) {
                    return Err("invalid HTTP method".to_owned());
                }
                self.service(target).health.method = value.to_ascii_uppercase();
            }
            ".status" => match value.parse::<u16>() {
                Ok(status) if (100..=599).contains(&status) => {
                    self.service(target).health.expected_status = Some(status);
                }
                _ => return Err("invalid status code; use 100 to 599".to_owned()),
            },
            ".followredirects" => {
                self.service(target).health.follow_redirects = parse_bool(value)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn middleware_option(&mut self, target: &Target<'_>) {
        let value = target.value;
        let option = target.path.option.as_str();
        let type_name = option.split('.').next().unwrap_or_default().to_owned();
        self.middleware(target).types.insert(type_name);

        let result = match option {
            "buffering.maxrequestbodybytes" => parse_unsigned(value).map(|limit| {
                self.middleware(target).max_request_body_bytes = Some(limit).filter(|l| *l > 0);
            }),
            "buffering.memrequestbodybytes" | "buffering.memresponsebodybytes" => {
                // These only tune when Traefik spills a body to disk; the edge never does.
                parse_unsigned(value).map(|_| ())
            }
            "buffering.maxresponsebodybytes" => match parse_unsigned(value) {
                Ok(0) => Ok(()),
                Ok(_) => Err("maxresponsebodybytes is not supported yet".to_owned()),
                Err(message) => Err(message),
            },
            "buffering.retryexpression" if value.trim().is_empty() => Ok(()),
            "buffering.retryexpression" => Err("retryexpression is not supported yet".to_owned()),
            _ => Ok(()),
        };
        if let Err(message) = result {
            self.value_error(target, &message);
        }
    }

    /// Reports sticky sessions, which are decoded but not applied, and server options that
    /// cannot be combined.
    fn finish_services(&mut self) {
        let sticky = std::mem::take(&mut self.sticky);
        for keys in sticky.into_values() {
            if keys.disabled {
                continue;
            }
            let value = self.container.labels.get(&keys.first_key).cloned();
            let message = "sticky sessions are not supported yet; requests are balanced without \
                           affinity";
            let warning =
                LabelError::warning(self.container, Some(&keys.first_key), value, message);
            self.problems.push(warning);
        }

        for entity in self.out.services.values_mut() {
            let has_url = entity.settings.contains_key("loadbalancer.server.url");
            let conflicting = ["loadbalancer.server.port", "loadbalancer.server.scheme"]
                .into_iter()
                .find(|suffix| entity.settings.contains_key(*suffix));
            if let (true, Some(suffix)) = (has_url, conflicting) {
                let key = format!("traefik.http.services.{}.{suffix}", entity.name);
                let message = format!(
                    "server.url cannot be combined with server.port or server.scheme; service {} \
                     is disabled",
                    entity.name
                );
                let value = entity.settings.get(suffix).cloned();
                self.problems.push(LabelError::error(
                    self.container,
                    Some(&key),
                    value,
                    message,
                ));
                entity.invalid = true;
            }
        }
    }

    /// Rejects middlewares that declare several types, which Traefik also rejects.
    fn finish_middlewares(&mut self) {
        for entity in self.out.middlewares.values_mut() {
            if entity.labels.types.len() > 1 {
                let types: Vec<&str> = entity.labels.types.iter().map(String::as_str).collect();
                let message = format!(
                    "middleware {} declares several types ({}); declare one middleware per type. \
                     Middleware {} is disabled",
                    entity.name,
                    types.join(", "),
                    entity.name
                );
                let key = format!("traefik.http.middlewares.{}", entity.name);
                self.problems
                    .push(LabelError::error(self.container, Some(&key), None, message));
                entity.invalid = true;
            }
        }
    }

    fn router(&mut self, target: &Target<'_>) -> &mut RouterLabels {
        &mut self
            .out
            .routers
            .entry(target.id.clone())
            .or_default()
            .labels
    }

    fn service(&mut self, target: &Target<'_>) -> &mut ServiceLabels {
        &mut self
            .out
            .services
            .entry(target.id.clone())
            .or_default()
            .labels
    }

    fn middleware(&mut self, target: &Target<'_>) -> &mut MiddlewareLabels {
        &mut self
            .out
            .middlewares
            .entry(target.id.clone())
            .or_default()
            .labels
    }

    /// Reports an invalid value and disables the entity it belongs to.
    fn value_error(&mut self, target: &Target<'_>, message: &str) {
        let noun = target.kind.noun();
        let message = format!("{message}; {noun} {} is disabled", target.name);
        self.problems.push(LabelError::error(
            self.container,
            Some(target.key),
            Some(target.value.to_owned()),
            message,
        ));
        match target.kind {
            Kind::Router => {
                self.out
                    .routers
                    .entry(target.id.clone())
                    .or_default()
                    .invalid = true
            }
            Kind::Service => {
                self.out
                    .services
                    .entry(target.id.clone())
                    .or_default()
                    .invalid = true
            }
            Kind::Middleware => {
                self.out
                    .middlewares
                    .entry(target.id.clone())
                    .or_default()
                    .invalid = true;
            }
        }
    }

    /// Reports a key that does not fit the grammar: it fails the whole container, or in
    /// lenient mode it is ignored with a warning.
    fn key_error(&mut self, key: &str, value: &str, message: &str) {
        if self.lenient {
            let message = format!("{message}; the label is ignored (lenient mode)");
            self.warn(key, value, &message);
            return;
        }
        self.failed = true;
        let message = format!("{message}; no router or service of this container is created");
        self.problems.push(LabelError::error(
            self.container,
            Some(key),
            Some(value.to_owned()),
            message,
        ));
    }

    fn warn(&mut self, key: &str, value: &str, message: &str) {
        self.problems.push(LabelError::warning(
            self.container,
            Some(key),
            Some(value.to_owned()),
            message,
        ));
    }
}

/// Returns whether the segments after `traefik.tls` name the default TLS store, the only one
/// Traefik reads from labels.
fn is_default_tls_store(segments: &[&str]) -> bool {
    matches!(segments, [stores, default, ..]
        if stores.eq_ignore_ascii_case("stores") && default.eq_ignore_ascii_case("default"))
}

/// Checks a backend scheme and returns it in lowercase: `http`, `https`, or `h2c` (HTTP/2
/// without TLS, for gRPC).
fn check_backend_scheme(value: &str) -> Result<String, String> {
    if ["http", "https", "h2c"]
        .iter()
        .any(|scheme| value.eq_ignore_ascii_case(scheme))
    {
        Ok(value.to_ascii_lowercase())
    } else {
        Err("unknown scheme; use http, https or h2c".to_owned())
    }
}

/// Parses a `serverstransport` value, `NAME@file`, into NAME. Servers transports cannot be
/// declared by labels (Traefik's Docker provider has none either), so only the routes file's
/// are valid.
fn parse_transport_reference(value: &str) -> Result<String, String> {
    match value.split_once('@') {
        Some((name, provider)) if provider == "file" && !name.is_empty() => Ok(name.to_owned()),
        Some((_, provider)) if provider != "file" => Err(format!(
            "servers transports of provider {provider} are not supported; define the transport \
             in the routes file and write NAME@file"
        )),
        _ => Err(format!(
            "invalid servers transport reference {value:?}; servers transports are defined in \
             the routes file, write NAME@file"
        )),
    }
}

/// Parses `server.url` into `http://IP:PORT` and its socket address. A lone trailing `/` is
/// dropped, as Traefik ignores it.
///
/// # Errors
///
/// Returns a message for another scheme, a path, query or user part, a host that is not an IP
/// address, and a missing or invalid port.
pub(super) fn parse_server_url(text: &str) -> Result<(String, SocketAddr), String> {
    let Some((scheme, rest)) = text.trim().split_once("://") else {
        return Err("missing scheme; write http://IP:PORT".to_owned());
    };
    let scheme = check_backend_scheme(scheme)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err("paths, queries and user parts are not supported; write http://IP:PORT".into());
    }

    let (host, port) = match rest.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':')),
            None => return Err("missing ']' after the IPv6 address".to_owned()),
        },
        None => match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        },
    };
    // NOTE: host names are rejected because the agent probes every Docker backend by address.
    // A route from the routes file may still name a host.
    let Ok(ip) = host.parse::<IpAddr>() else {
        return Err("the host must be an IP address, such as http://172.18.0.5:8080".to_owned());
    };
    let Some(port) = port else {
        return Err(format!(
            "missing port; write http://{rest}:80 for the default port"
        ));
    };
    let port = parse_port(port)?;
    let addr = SocketAddr::new(ip, port);
    Ok((format!("{scheme}://{addr}"), addr))
}
