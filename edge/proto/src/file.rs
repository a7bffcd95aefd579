//! Traefik's file-provider dynamic configuration, read from YAML or TOML into a [`Snapshot`].
//!
//! The edge accepts this subset of Traefik v3's dynamic configuration:
//!
//! - `http.routers`: `rule`, `priority`, `entryPoints`, `service`, `tls`, `middlewares` and
//!   `ruleSyntax` (ignored, because both rule syntaxes are always accepted).
//! - `http.services.NAME.loadBalancer`: `servers[].url`, `passHostHeader`, `strategy`, and
//!   `healthCheck` and `sticky`, which are checked but not applied yet.
//! - `http.serversTransports.NAME`: `serverName`, `insecureSkipVerify`, `rootCAs` and
//!   `disableHTTP2`, referenced by a load balancer's `serversTransport` (for `https://`
//!   servers).
//! - `http.middlewares.NAME.buffering`, whose `maxRequestBodyBytes` becomes the request body
//!   limit of the routers that use it.
//! - `tls.certificates`, `tls.stores.default.defaultCertificate` and `tls.options` (checked
//!   only, because the edge applies its own TLS policy).
//!
//! Anything else that Traefik accepts is an error naming its key, so no setting is silently
//! dropped. Keys match case-insensitively, as in Traefik, whose decoder (paerser's
//! `findTypedField`) compares field names with Go's `strings.EqualFold`.
//!
//! [`load`] and [`parse`] collect every error they find instead of stopping at the first one,
//! and so does [`validate`], which also checks snapshots that the agent pushes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;

use serde::de::{DeserializeOwned, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::rule;
use crate::snapshot::{
    Balance, CertificatePem, RootCaPem, Router, Server, ServerState, ServersTransport, Service,
    Snapshot, ENTRYPOINT_WEB, ENTRYPOINT_WEBSECURE,
};

/// Highest priority a router may set. Traefik reserves the range above it for its internal
/// routers, such as the ACME HTTP-01 challenge router.
pub const MAX_USER_PRIORITY: i64 = i64::MAX - 1000;

/// Syntax of a configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// YAML, which also reads JSON files.
    Yaml,
    /// TOML.
    Toml,
}

impl Format {
    /// Returns the format for a file name: TOML for a `.toml` extension in any case, and YAML
    /// for every other name.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|extension| extension.to_str()) {
            Some(extension) if extension.eq_ignore_ascii_case("toml") => Format::Toml,
            _ => Format::Yaml,
        }
    }
}

/// Every error found in a configuration, displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", join_lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One error in a configuration, displayed as `KEY: MESSAGE`, for example
/// ``http.routers.app.rule: invalid rule "Host(`a`": expected ')' at byte 9``.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", key_prefix(.key))]
pub struct ConfigError {
    /// Key path: `http.routers.app.rule` in a file, `routers[app].rule` in a snapshot. It is
    /// empty for errors about the whole file, such as a syntax error.
    pub key: String,
    /// The offending value when it is a scalar.
    pub value: Option<String>,
    /// Description of the problem, naming the value.
    pub message: String,
}

/// Reads a configuration file, detecting its format from the extension, and resolves relative
/// certificate paths against the file's directory.
///
/// # Errors
///
/// Returns every error found: an unreadable file, a syntax error, unknown or unsupported keys,
/// values of the wrong type, missing certificate files, and what [`validate`] reports.
pub fn load(path: &Path) -> Result<Snapshot, ConfigErrors> {
    load_routes(path).map(|routes| routes.snapshot)
}

/// A loaded routes file: the snapshot, and the ACME resolvers that its routers name, which
/// the snapshot does not carry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutesFile {
    pub snapshot: Snapshot,
    /// One entry per router with `tls.certResolver`, sorted by router name.
    pub cert_resolvers: Vec<RouterCertResolver>,
}

/// The `tls.certResolver` and `tls.domains` of one router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterCertResolver {
    pub router: String,
    pub resolver: String,
    /// `tls.domains`, each as its main name followed by its sans; empty when not given.
    pub domains: Vec<Vec<String>>,
}

/// Reads a routes file as [`load`] does, and also returns the routers' ACME resolvers.
///
/// # Errors
///
/// As for [`load`].
pub fn load_routes(path: &Path) -> Result<RoutesFile, ConfigErrors> {
    let text = fs::read_to_string(path).map_err(|error| {
        let message = read_error_message(path, &error);
        ConfigErrors(vec![ConfigError::new(
            "",
            Some(path.display().to_string()),
            message,
        )])
    })?;
    let base_dir = path.parent().unwrap_or_else(|| Path::new(""));
    parse_routes(&text, Format::from_path(path), base_dir)
}

/// Parses a configuration in the given format. Relative certificate paths are resolved
/// against `base_dir`. An empty text is an empty configuration. The snapshot's version is 0,
/// and its routers and services are sorted by name.
///
/// # Errors
///
/// Returns every error found, as [`load`] does, except that there is no file to read.
pub fn parse(text: &str, format: Format, base_dir: &Path) -> Result<Snapshot, ConfigErrors> {
    parse_routes(text, format, base_dir).map(|routes| routes.snapshot)
}

/// Parses a configuration as [`parse`] does, and also returns the routers' ACME resolvers.
///
/// # Errors
///
/// As for [`parse`].
pub fn parse_routes(
    text: &str,
    format: Format,
    base_dir: &Path,
) -> Result<RoutesFile, ConfigErrors> {
    let root = match format {
        Format::Yaml => yaml_tree(text),
        Format::Toml => toml_tree(text),
    }
    .map_err(|error| ConfigErrors(vec![error]))?;

    let mut loader = Loader {
        base_dir,
        errors: Vec::new(),
        skip_service_check: BTreeSet::new(),
        cert_resolvers: Vec::new(),
        transport_names: BTreeSet::new(),
    };
    let (snapshot, certificate_indexes) = loader.load_root(&root);
    let mut cert_resolvers = std::mem::take(&mut loader.cert_resolvers);
    cert_resolvers.sort_by(|a, b| a.router.cmp(&b.router));
    let mut errors = loader.errors;
    let keys = KeyStyle::File {
        certificate_indexes: &certificate_indexes,
    };
    check_snapshot(&snapshot, &keys, &loader.skip_service_check, &mut errors);
    into_result(errors).map(|()| RoutesFile {
        snapshot,
        cert_resolvers,
    })
}

/// Checks a snapshot: every router's rule parses, its service exists, its entry points are
/// `web` or `websecure`, its priority is at most [`MAX_USER_PRIORITY`], names are non-empty and
/// unique, server URLs are `http://HOST:PORT`, and certificates contain PEM certificate and key
/// blocks. Key paths have the form `routers[NAME].rule`.
///
/// # Errors
///
/// Returns every problem found, one [`ConfigError`] each.
pub fn validate(snapshot: &Snapshot) -> Result<(), ConfigErrors> {
    let mut errors = Vec::new();
    check_snapshot(snapshot, &KeyStyle::Snapshot, &BTreeSet::new(), &mut errors);
    into_result(errors)
}

impl ConfigError {
    fn new(key: impl Into<String>, value: Option<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            value,
            message: message.into(),
        }
    }
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

fn join_lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn into_result(mut errors: Vec<ConfigError>) -> Result<(), ConfigErrors> {
    if errors.is_empty() {
        return Ok(());
    }
    errors.sort_by(|a, b| a.key.cmp(&b.key));
    Err(ConfigErrors(errors))
}

fn read_error_message(path: &Path, error: &io::Error) -> String {
    if error.kind() == io::ErrorKind::NotFound {
        format!("file \"{}\" not found", path.display())
    } else {
        format!("failed to read file \"{}\": {error}", path.display())
    }
}

// ---------------------------------------------------------------------------------------------
// Syntax: YAML and TOML into one JSON tree, so one decoder serves both formats.
// ---------------------------------------------------------------------------------------------

fn yaml_tree(text: &str) -> Result<Value, ConfigError> {
    // serde_yaml bounds nesting and alias expansion, so an alias bomb fails here quickly.
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|error| ConfigError::new("", None, format!("invalid YAML: {error}")))?;
    yaml.apply_merge().map_err(|error| {
        ConfigError::new("", None, format!("invalid YAML merge key (<<): {error}"))
    })?;
    yaml_to_json(yaml, "")
}

fn yaml_to_json(yaml: serde_yaml::Value, key: &str) -> Result<Value, ConfigError> {
    use serde_yaml::Value as Yaml;

    Ok(match yaml {
        Yaml::Null => Value::Null,
        Yaml::Bool(flag) => Value::Bool(flag),
        Yaml::Number(number) => yaml_number(&number, key)?,
        Yaml::String(text) => Value::String(text),
        Yaml::Sequence(items) => {
            let items = items
                .into_iter()
                .enumerate()
                .map(|(index, item)| yaml_to_json(item, &format!("{key}[{index}]")));
            Value::Array(items.collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(mapping) => {
            let mut object = Map::new();
            for (name, item) in mapping {
                let name = match name {
                    Yaml::String(text) => text,
                    Yaml::Number(number) => number.to_string(),
                    Yaml::Bool(flag) => flag.to_string(),
                    _ => return Err(ConfigError::new(key, None, "map keys must be strings")),
                };
                let item = yaml_to_json(item, &join_key(key, &name))?;
                object.insert(name, item);
            }
            Value::Object(object)
        }
        Yaml::Tagged(tagged) => {
            let message = format!("YAML tag {} is not supported", tagged.tag);
            return Err(ConfigError::new(key, None, message));
        }
    })
}

fn yaml_number(number: &serde_yaml::Number, key: &str) -> Result<Value, ConfigError> {
    if let Some(integer) = number.as_i64() {
        return Ok(Value::from(integer));
    }
    if let Some(integer) = number.as_u64() {
        return Ok(Value::from(integer));
    }
    number
        .as_f64()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .ok_or_else(|| ConfigError::new(key, Some(number.to_string()), "invalid number"))
}

fn toml_tree(text: &str) -> Result<Value, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|error| {
        let position = error
            .span()
            .map(|span| {
                let (line, column) = line_and_column(text, span.start);
                format!(" at line {line} column {column}")
            })
            .unwrap_or_default();
        let message = error.message().trim().replace('\n', " ");
        ConfigError::new("", None, format!("invalid TOML: {message}{position}"))
    })?;
    Ok(toml_to_json(toml::Value::Table(table)))
}

fn toml_to_json(toml: toml::Value) -> Value {
    match toml {
        toml::Value::String(text) => Value::String(text),
        toml::Value::Integer(integer) => Value::from(integer),
        toml::Value::Float(float) => Value::from(float),
        toml::Value::Boolean(flag) => Value::Bool(flag),
        toml::Value::Datetime(datetime) => Value::String(datetime.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Value::Object(
            table
                .into_iter()
                .map(|(name, item)| (name, toml_to_json(item)))
                .collect(),
        ),
    }
}

/// Returns the 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    (line, column)
}

fn join_key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

// ---------------------------------------------------------------------------------------------
// Serde structs mirroring the file. Every field is optional, so that the decoder can find
// which key of a map is wrong by decoding each key alone. Sub-sections are kept as `Value`
// and decoded separately, for the same reason.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RootFile {
    http: Option<Value>,
    tcp: Option<Value>,
    udp: Option<Value>,
    tls: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpFile {
    routers: Option<BTreeMap<String, Value>>,
    services: Option<BTreeMap<String, Value>>,
    middlewares: Option<BTreeMap<String, Value>>,
    servers_transports: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouterFile {
    rule: Option<String>,
    priority: Option<i64>,
    entry_points: Option<Vec<String>>,
    service: Option<String>,
    #[serde(default, deserialize_with = "present")]
    tls: Option<Value>,
    middlewares: Option<Vec<String>>,
    rule_syntax: Option<String>,
    observability: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouterTlsFile {
    cert_resolver: Option<String>,
    domains: Option<Vec<Value>>,
    options: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DomainFile {
    main: Option<String>,
    sans: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceFile {
    load_balancer: Option<Value>,
    weighted: Option<Value>,
    mirroring: Option<Value>,
    failover: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LoadBalancerFile {
    servers: Option<Vec<Value>>,
    pass_host_header: Option<bool>,
    strategy: Option<String>,
    #[serde(default, deserialize_with = "present")]
    health_check: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    sticky: Option<Value>,
    servers_transport: Option<String>,
    response_forwarding: Option<Value>,
    passive_health_check: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServerFile {
    url: Option<String>,
    weight: Option<u32>,
    preserve_path: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServersTransportFile {
    server_name: Option<String>,
    insecure_skip_verify: Option<bool>,
    #[serde(rename = "rootCAs")]
    root_cas: Option<Vec<String>>,
    #[serde(rename = "disableHTTP2")]
    disable_http2: Option<bool>,
    certificates: Option<Value>,
    max_idle_conns_per_host: Option<Value>,
    forwarding_timeouts: Option<Value>,
    #[serde(rename = "peerCertURI")]
    peer_cert_uri: Option<Value>,
    spiffe: Option<Value>,
}

// Some fields are only type-checked: the edge accepts them and does not use them.
#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HealthCheckFile {
    path: Option<String>,
    scheme: Option<String>,
    mode: Option<String>,
    hostname: Option<String>,
    port: Option<u16>,
    interval: Option<TraefikDuration>,
    unhealthy_interval: Option<TraefikDuration>,
    timeout: Option<TraefikDuration>,
    headers: Option<BTreeMap<String, String>>,
    follow_redirects: Option<bool>,
    method: Option<String>,
    status: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StickyFile {
    #[serde(default, deserialize_with = "present")]
    cookie: Option<Value>,
}

// Some fields are only type-checked: the edge accepts them and does not use them.
#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CookieFile {
    name: Option<String>,
    secure: Option<bool>,
    http_only: Option<bool>,
    same_site: Option<String>,
    max_age: Option<i64>,
    path: Option<String>,
    domain: Option<String>,
    partitioned: Option<bool>,
}

// NOTE: the edge streams request and response bodies and only enforces
// maxRequestBodyBytes, so the in-memory thresholds are accepted and have no effect.
#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BufferingFile {
    max_request_body_bytes: Option<u64>,
    mem_request_body_bytes: Option<u64>,
    max_response_body_bytes: Option<u64>,
    mem_response_body_bytes: Option<u64>,
    retry_expression: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    certificates: Option<Vec<Value>>,
    stores: Option<BTreeMap<String, Value>>,
    options: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificateFile {
    cert_file: Option<String>,
    key_file: Option<String>,
    stores: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StoreFile {
    default_certificate: Option<Value>,
    default_generated_cert: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DefaultCertificateFile {
    cert_file: Option<String>,
    key_file: Option<String>,
}

// Some fields are only type-checked: the edge accepts them and does not use them.
#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsOptionsFile {
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    curve_preferences: Option<Vec<String>>,
    alpn_protocols: Option<Vec<String>>,
    sni_strict: Option<bool>,
    prefer_server_cipher_suites: Option<bool>,
    disable_session_tickets: Option<bool>,
    client_auth: Option<Value>,
}

/// Middleware types that Traefik v3 documents, so that the edge can tell "not supported yet"
/// from a misspelled type.
const TRAEFIK_MIDDLEWARE_TYPES: &[&str] = &[
    "addPrefix",
    "basicAuth",
    "buffering",
    "chain",
    "circuitBreaker",
    "compress",
    "contentType",
    "digestAuth",
    "encodedCharacters",
    "errors",
    "forwardAuth",
    "grpcWeb",
    "headers",
    "inFlightReq",
    "ipAllowList",
    "ipWhiteList",
    "passTLSClientCert",
    "plugin",
    "rateLimit",
    "redirectRegex",
    "redirectScheme",
    "replacePath",
    "replacePathRegex",
    "retry",
    "stripPrefix",
    "stripPrefixRegex",
];

/// Deserializes a field that Traefik enables by its mere presence (`tls:` with no value), so
/// that an explicit empty value becomes `Some(Value::Null)` instead of `None`.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// A Traefik duration, checked and then dropped because the settings that use it are not
/// applied yet.
struct TraefikDuration;

impl<'de> Deserialize<'de> for TraefikDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        if is_duration(&value) {
            Ok(TraefikDuration)
        } else {
            Err(serde::de::Error::custom(
                "invalid duration; write seconds as a number or a Go duration such as 10s or 1m30s",
            ))
        }
    }
}

const TLS_VERSIONS: &[&str] = &[
    "VersionTLS10",
    "VersionTLS11",
    "VersionTLS12",
    "VersionTLS13",
];

// ---------------------------------------------------------------------------------------------
// Loading: the decoded file into a snapshot.
// ---------------------------------------------------------------------------------------------

/// A middleware definition as far as routers need it.
enum MiddlewareDefinition {
    /// `buffering`, with its request body limit (`None` when 0, which means unlimited).
    Buffering { max_request_body_bytes: Option<u64> },
    /// Any other type, as written in the file.
    Unsupported { type_name: String },
    /// A definition whose errors are already reported.
    Invalid,
}

struct Loader<'a> {
    base_dir: &'a Path,
    errors: Vec<ConfigError>,
    /// Service references that already have an error, which the "service not found" check
    /// skips. These are services that failed to load and references to other providers.
    skip_service_check: BTreeSet<String>,
    /// `tls.certResolver` of the routers read so far.
    cert_resolvers: Vec<RouterCertResolver>,
    /// Names of the servers transports that loaded without errors.
    transport_names: BTreeSet<String>,
}

impl Loader<'_> {
    /// Loads the whole file. Returns the snapshot and, for each of its certificates, the index
    /// in `tls.certificates` it came from.
    fn load_root(&mut self, root: &Value) -> (Snapshot, Vec<usize>) {
        let mut snapshot = Snapshot::default();
        let mut certificate_indexes = Vec::new();
        if root.is_null() {
            return (snapshot, certificate_indexes);
        }
        let Some(file) = self.decode::<RootFile>("", root) else {
            return (snapshot, certificate_indexes);
        };

        for (name, section) in [("tcp", &file.tcp), ("udp", &file.udp)] {
            if section.as_ref().is_some_and(|value| !is_empty(value)) {
                self.error(name, None, "TCP and UDP routers are not supported");
            }
        }

        let mut tls_option_names = BTreeSet::from(["default".to_owned()]);
        if let Some(tls) = file.tls.as_ref().filter(|value| !value.is_null()) {
            let (certificates, indexes, default_certificate) =
                self.load_tls(tls, &mut tls_option_names);
            snapshot.certificates = certificates;
            snapshot.default_certificate = default_certificate;
            certificate_indexes = indexes;
        }

        if let Some(http) = file.http.as_ref().filter(|value| !value.is_null()) {
            if let Some(http) = self.decode::<HttpFile>("http", http) {
                self.load_http(http, &tls_option_names, &mut snapshot);
            }
        }
        (snapshot, certificate_indexes)
    }

    fn load_http(
        &mut self,
        http: HttpFile,
        tls_option_names: &BTreeSet<String>,
        snapshot: &mut Snapshot,
    ) {
        for (name, value) in http.servers_transports.unwrap_or_default() {
            if let Some(transport) = self.load_servers_transport(&name, &value) {
                self.transport_names.insert(name);
                snapshot.servers_transports.push(transport);
            }
        }

        let mut middlewares = BTreeMap::new();
        for (name, value) in http.middlewares.unwrap_or_default() {
            let definition = self.load_middleware(&name, &value);
            middlewares.insert(name, definition);
        }

        for (name, value) in http.services.unwrap_or_default() {
            match self.load_service(&name, &value) {
                Some(service) => snapshot.services.push(service),
                None => {
                    self.skip_service_check.insert(name);
                }
            }
        }

        let mut referenced = BTreeSet::new();
        for (name, value) in http.routers.unwrap_or_default() {
            let router = self.load_router(
                &name,
                &value,
                &middlewares,
                &mut referenced,
                tls_option_names,
            );
            snapshot.routers.extend(router);
        }

        // Unreferenced middlewares of other types are errors too, so nothing is ignored.
        for (name, definition) in &middlewares {
            if let MiddlewareDefinition::Unsupported { type_name } = definition {
                if !referenced.contains(name) {
                    let key = format!("http.middlewares.{name}.{type_name}");
                    self.error(&key, None, unsupported_middleware_message(type_name));
                }
            }
        }
    }

    fn load_router(
        &mut self,
        name: &str,
        value: &Value,
        middlewares: &BTreeMap<String, MiddlewareDefinition>,
        referenced: &mut BTreeSet<String>,
        tls_option_names: &BTreeSet<String>,
    ) -> Option<Router> {
        let key = format!("http.routers.{name}");
        let file: RouterFile = self.decode(&key, value)?;

        if file.observability.is_some() {
            let message = "per-router observability settings are not supported yet";
            self.error(&format!("{key}.observability"), None, message);
        }
        if let Some(syntax) = &file.rule_syntax {
            if !syntax.eq_ignore_ascii_case("v2") && !syntax.eq_ignore_ascii_case("v3") {
                let message = format!("invalid rule syntax \"{syntax}\"; use v2 or v3");
                self.error(&format!("{key}.ruleSyntax"), Some(syntax.clone()), message);
            }
        }
        let tls = self.router_tls(name, &key, file.tls.as_ref(), tls_option_names);

        let service = match file.service {
            Some(reference) => {
                let service_key = format!("{key}.service");
                match self.resolve_reference(&service_key, &reference, "service") {
                    Some(service) => service.to_owned(),
                    None => {
                        self.skip_service_check.insert(reference.clone());
                        reference
                    }
                }
            }
            None => String::new(),
        };

        let mut max_request_body_bytes: Option<u64> = None;
        for (index, reference) in file.middlewares.unwrap_or_default().iter().enumerate() {
            let item_key = format!("{key}.middlewares[{index}]");
            let Some(middleware) = self.resolve_reference(&item_key, reference, "middleware")
            else {
                continue;
            };
            match middlewares.get(middleware) {
                None => {
                    let message = format!("middleware \"{middleware}\" not found");
                    self.error(&item_key, Some(reference.clone()), message);
                }
                Some(MiddlewareDefinition::Buffering {
                    max_request_body_bytes: Some(limit),
                }) => {
                    let current = max_request_body_bytes.unwrap_or(u64::MAX);
                    max_request_body_bytes = Some(current.min(*limit));
                }
                Some(MiddlewareDefinition::Buffering {
                    max_request_body_bytes: None,
                }) => {}
                Some(MiddlewareDefinition::Unsupported { type_name }) => {
                    referenced.insert(middleware.to_owned());
                    let message = format!(
                        "{} (used by \"{middleware}\")",
                        unsupported_middleware_message(type_name)
                    );
                    self.error(&item_key, Some(reference.clone()), message);
                }
                Some(MiddlewareDefinition::Invalid) => {}
            }
        }

        Some(Router {
            name: name.to_owned(),
            rule: file.rule.unwrap_or_default(),
            priority: file.priority,
            entrypoints: file.entry_points.unwrap_or_default(),
            service,
            tls,
            max_request_body_bytes,
        })
    }

    /// Returns whether a router's `tls` value enables TLS. As in Traefik, an empty value
    /// (`tls:` or `tls: {}`) or `true` enables it and `false` disables it.
    fn router_tls(
        &mut self,
        router_name: &str,
        router_key: &str,
        value: Option<&Value>,
        tls_option_names: &BTreeSet<String>,
    ) -> bool {
        let key = format!("{router_key}.tls");
        let tls = match value {
            None => return false,
            Some(Value::Null) => return true,
            Some(Value::Bool(enabled)) => return *enabled,
            Some(Value::String(text)) if text.is_empty() || text.eq_ignore_ascii_case("true") => {
                return true
            }
            Some(Value::String(text)) if text.eq_ignore_ascii_case("false") => return false,
            Some(value @ Value::Object(_)) => self.decode::<RouterTlsFile>(&key, value),
            Some(other) => {
                let message = format!("expected a map, true or false, found {}", describe(other));
                self.error(&key, scalar_text(other), message);
                return false;
            }
        };

        // The edge runs no ACME client: the agent reads certResolver and domains from
        // `cert_resolvers` and obtains the certificates.
        let Some(tls) = tls else { return true };
        let mut domains = Vec::new();
        for (index, domain) in tls.domains.unwrap_or_default().iter().enumerate() {
            let domain_key = format!("{key}.domains[{index}]");
            if let Some(domain) = self.decode::<DomainFile>(&domain_key, domain) {
                match domain.main.filter(|main| !main.is_empty()) {
                    Some(main) => {
                        let mut names = vec![main];
                        names.extend(domain.sans.unwrap_or_default());
                        domains.push(names);
                    }
                    None => self.error(
                        &format!("{domain_key}.main"),
                        None,
                        "required key is missing",
                    ),
                }
            }
        }
        if let Some(resolver) = tls.cert_resolver.filter(|r| !r.is_empty()) {
            self.cert_resolvers.push(RouterCertResolver {
                router: router_name.to_owned(),
                resolver,
                domains,
            });
        }
        if let Some(options) = &tls.options {
            let options_key = format!("{key}.options");
            if let Some(name) = self.resolve_reference(&options_key, options, "TLS options") {
                if !tls_option_names.contains(name) {
                    let message = format!("TLS options \"{name}\" not found in tls.options");
                    self.error(&options_key, Some(options.clone()), message);
                }
            }
        }
        true
    }

    /// Returns the name of a `name` or `name@file` reference, or reports an error for a
    /// reference to another provider.
    fn resolve_reference<'r>(
        &mut self,
        key: &str,
        reference: &'r str,
        what: &str,
    ) -> Option<&'r str> {
        let (name, provider) = match reference.split_once('@') {
            Some((name, provider)) => (name, Some(provider)),
            None => (reference, None),
        };
        if let Some(provider) = provider.filter(|provider| *provider != "file") {
            let message = format!(
                "{what} \"{reference}\" belongs to provider {provider}; only the file provider \
                 (no suffix or @file) is supported"
            );
            self.error(key, Some(reference.to_owned()), message);
            return None;
        }
        if name.is_empty() {
            self.error(
                key,
                Some(reference.to_owned()),
                format!("empty {what} name"),
            );
            return None;
        }
        Some(name)
    }

    fn load_service(&mut self, name: &str, value: &Value) -> Option<Service> {
        let key = format!("http.services.{name}");
        let file: ServiceFile = self.decode(&key, value)?;

        let others = [
            ("weighted", &file.weighted),
            ("mirroring", &file.mirroring),
            ("failover", &file.failover),
        ];
        let mut kinds = 0;
        for (kind, section) in others {
            if section.is_some() {
                kinds += 1;
                self.error(
                    &format!("{key}.{kind}"),
                    None,
                    format!("{kind} services are not supported"),
                );
            }
        }
        let Some(load_balancer) = file.load_balancer else {
            if kinds == 0 {
                self.error(&key, None, "missing loadBalancer");
            }
            return None;
        };
        let key = format!("{key}.loadBalancer");
        let file: LoadBalancerFile = self.decode(&key, &load_balancer)?;

        let mut servers = Vec::new();
        for (index, server) in file.servers.unwrap_or_default().iter().enumerate() {
            servers.extend(self.load_server(&format!("{key}.servers[{index}]"), server));
        }

        let balance = match file.strategy.as_deref() {
            None => Balance::RoundRobin,
            Some(strategy) if strategy.eq_ignore_ascii_case("wrr") => Balance::RoundRobin,
            Some(strategy)
                if strategy.eq_ignore_ascii_case("p2c")
                    || strategy.eq_ignore_ascii_case("leasttime") =>
            {
                Balance::LeastInFlight
            }
            Some(strategy) => {
                let message = format!(
                    "load-balancing strategy \"{strategy}\" is not supported; use wrr, p2c or \
                     leasttime"
                );
                self.error(
                    &format!("{key}.strategy"),
                    Some(strategy.to_owned()),
                    message,
                );
                Balance::RoundRobin
            }
        };

        // NOTE: health checks and sticky sessions are checked for errors but not applied yet:
        // every server stays up, and requests are balanced without affinity.
        if let Some(health_check) = &file.health_check {
            self.check_health_check(&format!("{key}.healthCheck"), health_check);
        }
        if let Some(sticky) = &file.sticky {
            self.check_sticky(&format!("{key}.sticky"), sticky);
        }
        let mut servers_transport = None;
        if let Some(reference) = &file.servers_transport {
            let transport_key = format!("{key}.serversTransport");
            let name = self.resolve_reference(&transport_key, reference, "servers transport");
            match name {
                Some(name) if self.transport_names.contains(name) => {
                    servers_transport = Some(name.to_owned());
                }
                Some(name) => {
                    let message = format!(
                        "servers transport \"{name}\" not found; define it under \
                         http.serversTransports"
                    );
                    self.error(&transport_key, Some(reference.clone()), message);
                }
                None => {}
            }
        }
        for (field, section) in [
            ("responseForwarding", &file.response_forwarding),
            ("passiveHealthCheck", &file.passive_health_check),
        ] {
            if section.is_some() {
                self.error(
                    &format!("{key}.{field}"),
                    None,
                    format!("{field} is not supported yet"),
                );
            }
        }

        Some(Service {
            name: name.to_owned(),
            servers,
            balance,
            pass_host_header: file.pass_host_header.unwrap_or(true),
            servers_transport,
        })
    }

    /// Loads one entry of `http.serversTransports`. Returns `None` when it has errors.
    fn load_servers_transport(&mut self, name: &str, value: &Value) -> Option<ServersTransport> {
        let key = format!("http.serversTransports.{name}");
        let file: ServersTransportFile = self.decode(&key, value)?;
        let reported = self.errors.len();

        let unsupported = [
            ("certificates", file.certificates.is_some()),
            (
                "maxIdleConnsPerHost",
                file.max_idle_conns_per_host.is_some(),
            ),
            ("forwardingTimeouts", file.forwarding_timeouts.is_some()),
            ("peerCertURI", file.peer_cert_uri.is_some()),
            ("spiffe", file.spiffe.is_some()),
        ];
        for (field, present) in unsupported {
            if present {
                let message = format!("{field} is not supported yet");
                self.error(&format!("{key}.{field}"), None, message);
            }
        }

        let server_name = file.server_name.filter(|name| !name.is_empty());
        if let Some(server_name) = &server_name {
            if let Err(reason) = check_server_name(server_name) {
                self.error(
                    &format!("{key}.serverName"),
                    Some(server_name.clone()),
                    reason,
                );
            }
        }

        let mut root_cas = Vec::new();
        for (index, path) in file.root_cas.unwrap_or_default().into_iter().enumerate() {
            let ca_key = format!("{key}.rootCAs[{index}]");
            if let Some((pem, origin)) = self.read_pem(&ca_key, Some(path)) {
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    let message = format!("{origin} contains no PEM CERTIFICATE block");
                    self.error(&ca_key, None, message);
                }
                root_cas.push(RootCaPem { pem, origin });
            }
        }

        (self.errors.len() == reported).then(|| ServersTransport {
            name: name.to_owned(),
            server_name,
            insecure_skip_verify: file.insecure_skip_verify.unwrap_or(false),
            root_cas,
            disable_http2: file.disable_http2.unwrap_or(false),
        })
    }

    fn load_server(&mut self, key: &str, value: &Value) -> Option<Server> {
        let file: ServerFile = self.decode(key, value)?;
        if let Some(weight) = file.weight.filter(|weight| *weight != 1) {
            let message = "server weights are not supported yet; remove weight or set it to 1";
            self.error(&format!("{key}.weight"), Some(weight.to_string()), message);
        }
        if file.preserve_path == Some(true) {
            self.error(
                &format!("{key}.preservePath"),
                Some("true".to_owned()),
                "preservePath is not supported yet",
            );
        }
        let Some(url) = file.url else {
            self.error(&format!("{key}.url"), None, "required key is missing");
            return None;
        };
        Some(Server {
            url: strip_root_path(&url).to_owned(),
            state: ServerState::Up,
        })
    }

    fn check_health_check(&mut self, key: &str, value: &Value) {
        if let Some(value) = self.section_settings(key, value) {
            let _ = self.decode::<HealthCheckFile>(key, value);
        }
    }

    fn check_sticky(&mut self, key: &str, value: &Value) {
        let Some(value) = self.section_settings(key, value) else {
            return;
        };
        let Some(file) = self.decode::<StickyFile>(key, value) else {
            return;
        };
        let cookie_key = format!("{key}.cookie");
        if let Some(cookie) = file
            .cookie
            .as_ref()
            .and_then(|cookie| self.section_settings(&cookie_key, cookie))
        {
            if let Some(cookie) = self.decode::<CookieFile>(&cookie_key, cookie) {
                if let Some(same_site) = cookie.same_site.as_deref() {
                    if !["", "none", "lax", "strict"]
                        .iter()
                        .any(|valid| same_site.eq_ignore_ascii_case(valid))
                    {
                        let message = "invalid sameSite; use none, lax or strict";
                        self.error(
                            &format!("{key}.cookie.sameSite"),
                            Some(same_site.to_owned()),
                            message,
                        );
                    }
                }
            }
        }
    }

    /// Returns the settings map of a section that its mere presence enables in Traefik
    /// (`healthCheck`, `sticky`, `sticky.cookie`), or `None` for an empty value, `true` or
    /// `false`. Reports any other scalar.
    fn section_settings<'v>(&mut self, key: &str, value: &'v Value) -> Option<&'v Value> {
        match value {
            Value::Object(_) => Some(value),
            Value::Null | Value::Bool(_) => None,
            Value::String(text)
                if text.is_empty()
                    || text.eq_ignore_ascii_case("true")
                    || text.eq_ignore_ascii_case("false") =>
            {
                None
            }
            other => {
                let message = format!("expected a map, true or false, found {}", describe(other));
                self.error(key, scalar_text(other), message);
                None
            }
        }
    }

    fn load_middleware(&mut self, name: &str, value: &Value) -> MiddlewareDefinition {
        let key = format!("http.middlewares.{name}");
        let Value::Object(types) = value else {
            let message = format!(
                "expected a map with one middleware type, found {}",
                describe(value)
            );
            self.error(&key, scalar_text(value), message);
            return MiddlewareDefinition::Invalid;
        };
        let mut entries = types.iter();
        let (Some((type_name, config)), None) = (entries.next(), entries.next()) else {
            let names: Vec<&str> = types.keys().map(String::as_str).collect();
            let message = format!(
                "expected exactly one middleware type, found {}",
                names.len()
            );
            let message = if names.is_empty() {
                message
            } else {
                format!("{message}: {}", names.join(", "))
            };
            self.error(&key, None, message);
            return MiddlewareDefinition::Invalid;
        };
        if !type_name.eq_ignore_ascii_case("buffering") {
            return MiddlewareDefinition::Unsupported {
                type_name: type_name.clone(),
            };
        }

        let key = format!("{key}.{type_name}");
        let Some(buffering) = self.decode::<BufferingFile>(&key, config) else {
            return MiddlewareDefinition::Invalid;
        };
        if let Some(limit) = buffering.max_response_body_bytes.filter(|limit| *limit > 0) {
            let message = "maxResponseBodyBytes is not supported yet";
            self.error(
                &format!("{key}.maxResponseBodyBytes"),
                Some(limit.to_string()),
                message,
            );
        }
        if let Some(expression) = buffering
            .retry_expression
            .filter(|expression| !expression.is_empty())
        {
            self.error(
                &format!("{key}.retryExpression"),
                Some(expression),
                "retryExpression is not supported yet",
            );
        }
        let limit = buffering.max_request_body_bytes.filter(|limit| *limit > 0);
        MiddlewareDefinition::Buffering {
            max_request_body_bytes: limit,
        }
    }

    /// Loads the `tls` section. Returns the certificates, the `tls.certificates` index of each
    /// one, and the default certificate. Adds the names of `tls.options` to `option_names`.
    fn load_tls(
        &mut self,
        value: &Value,
        option_names: &mut BTreeSet<String>,
    ) -> (Vec<CertificatePem>, Vec<usize>, Option<CertificatePem>) {
        let mut certificates = Vec::new();
        let mut indexes = Vec::new();
        let mut default_certificate = None;
        let Some(tls) = self.decode::<TlsFile>("tls", value) else {
            return (certificates, indexes, default_certificate);
        };

        for (index, entry) in tls.certificates.unwrap_or_default().iter().enumerate() {
            let key = format!("tls.certificates[{index}]");
            let Some(file) = self.decode::<CertificateFile>(&key, entry) else {
                continue;
            };
            for (store_index, store) in file.stores.unwrap_or_default().iter().enumerate() {
                if store != "default" {
                    let message =
                        format!("store \"{store}\" is not supported; only the default store is");
                    self.error(
                        &format!("{key}.stores[{store_index}]"),
                        Some(store.clone()),
                        message,
                    );
                }
            }
            if let Some(certificate) = self.read_pair(&key, file.cert_file, file.key_file) {
                certificates.push(certificate);
                indexes.push(index);
            }
        }

        for (name, store) in tls.stores.unwrap_or_default() {
            let key = format!("tls.stores.{name}");
            if name != "default" {
                self.error(
                    &key,
                    None,
                    format!("store \"{name}\" is not supported; only the default store is"),
                );
                continue;
            }
            let Some(store) = self.decode::<StoreFile>(&key, &store) else {
                continue;
            };
            if store.default_generated_cert.is_some() {
                let message =
                    "defaultGeneratedCert is not supported; the agent obtains certificates";
                self.error(&format!("{key}.defaultGeneratedCert"), None, message);
            }
            if let Some(default) = &store.default_certificate {
                let key = format!("{key}.defaultCertificate");
                if let Some(file) = self.decode::<DefaultCertificateFile>(&key, default) {
                    default_certificate = self.read_pair(&key, file.cert_file, file.key_file);
                }
            }
        }

        for (name, options) in tls.options.unwrap_or_default() {
            self.check_tls_options(&format!("tls.options.{name}"), &options);
            option_names.insert(name);
        }
        (certificates, indexes, default_certificate)
    }

    /// Checks one entry of `tls.options`.
    ///
    /// NOTE: the edge applies its own policy (TLS 1.2 and 1.3 with its default cipher suites,
    /// curves and ALPN protocols), so these options are checked but not applied.
    fn check_tls_options(&mut self, key: &str, value: &Value) {
        let Some(options) = self.decode::<TlsOptionsFile>(key, value) else {
            return;
        };
        for (field, version) in [
            ("minVersion", &options.min_version),
            ("maxVersion", &options.max_version),
        ] {
            if let Some(version) = version
                .as_ref()
                .filter(|version| !TLS_VERSIONS.contains(&version.as_str()))
            {
                let message = format!(
                    "invalid TLS version; use one of {}",
                    TLS_VERSIONS.join(", ")
                );
                self.error(&format!("{key}.{field}"), Some(version.clone()), message);
            }
        }
        if options.client_auth.is_some() {
            let message = "client certificate authentication (clientAuth) is not supported";
            self.error(&format!("{key}.clientAuth"), None, message);
        }
    }

    fn read_pair(
        &mut self,
        key: &str,
        cert_file: Option<String>,
        key_file: Option<String>,
    ) -> Option<CertificatePem> {
        let chain = self.read_pem(&format!("{key}.certFile"), cert_file);
        let private_key = self.read_pem(&format!("{key}.keyFile"), key_file);
        let ((chain_pem, origin), (key_pem, _)) = (chain?, private_key?);
        Some(CertificatePem {
            chain_pem,
            key_pem,
            origin,
        })
    }

    /// Returns PEM text and its origin. As in Traefik, a value that starts with `-----BEGIN` is
    /// the PEM text itself, and any other value is a path, resolved against the base directory
    /// when relative.
    fn read_pem(&mut self, key: &str, value: Option<String>) -> Option<(String, String)> {
        let Some(value) = value.filter(|value| !value.is_empty()) else {
            self.error(key, None, "required key is missing");
            return None;
        };
        if value.trim_start().starts_with("-----BEGIN") {
            return Some((value, key.to_owned()));
        }
        let path = self.base_dir.join(&value);
        match fs::read_to_string(&path) {
            Ok(text) => Some((text, path.display().to_string())),
            Err(error) => {
                self.error(key, Some(value), read_error_message(&path, &error));
                None
            }
        }
    }

    /// Decodes `T` from a map, matching keys case-insensitively. On failure, reports each key
    /// that fails on its own, with its full key path, and returns `None`.
    fn decode<T: DeserializeOwned>(&mut self, key: &str, value: &Value) -> Option<T> {
        let Value::Object(map) = value else {
            let message = format!("expected a map, found {}", describe(value));
            self.error(key, scalar_text(value), message);
            return None;
        };

        let fields = struct_fields::<T>();
        let mut canonical = Map::new();
        let mut written: BTreeMap<&str, &str> = BTreeMap::new();
        let mut duplicate = false;
        for (name, item) in map {
            let field = fields
                .iter()
                .copied()
                .find(|field| field.eq_ignore_ascii_case(name))
                .unwrap_or(name);
            if let Some(previous) = written.insert(field, name) {
                let message = format!(
                    "duplicate key: {previous} and {name} set the same key, because keys are \
                             case-insensitive"
                );
                self.error(&join_key(key, name), None, message);
                duplicate = true;
                continue;
            }
            canonical.insert(field.to_owned(), item.clone());
        }

        let whole_error = match serde_json::from_value::<T>(Value::Object(canonical.clone())) {
            Ok(decoded) => return (!duplicate).then_some(decoded),
            Err(error) => error,
        };
        let reported = self.errors.len();
        for (field, item) in canonical {
            let name = written
                .get(field.as_str())
                .copied()
                .unwrap_or(field.as_str())
                .to_owned();
            let single = Map::from_iter([(field, item.clone())]);
            if let Err(error) = serde_json::from_value::<T>(Value::Object(single)) {
                self.error(
                    &join_key(key, &name),
                    scalar_text(&item),
                    serde_message(&error, fields),
                );
            }
        }
        if self.errors.len() == reported {
            self.error(key, None, whole_error.to_string());
        }
        None
    }

    fn error(&mut self, key: &str, value: Option<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(key, value, message));
    }
}

fn unsupported_middleware_message(type_name: &str) -> String {
    if TRAEFIK_MIDDLEWARE_TYPES
        .iter()
        .any(|known| known.eq_ignore_ascii_case(type_name))
    {
        format!("middleware type {type_name} is not supported yet; only buffering is")
    } else {
        format!("unknown middleware type {type_name}")
    }
}

/// Rewrites serde's message for an unknown field to name the valid keys.
fn serde_message(error: &serde_json::Error, fields: &[&str]) -> String {
    let message = error.to_string();
    if message.starts_with("unknown field") {
        format!("unknown key; valid keys are {}", fields.join(", "))
    } else {
        message
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "an empty value",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Bool(_) | Value::Number(_) => Some(value.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// Returns whether a value is a Traefik duration: a number of seconds, or a Go duration
/// string such as `10s`, `1m30s` or `250ms`.
fn is_duration(value: &Value) -> bool {
    let text = match value {
        Value::Number(_) => return true,
        Value::String(text) => text.strip_prefix(['+', '-']).unwrap_or(text),
        _ => return false,
    };
    if text == "0" || text.parse::<u64>().is_ok() {
        return true;
    }
    let mut rest = text;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let number_length = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if number_length == 0 || rest[..number_length].parse::<f64>().is_err() {
            return false;
        }
        rest = &rest[number_length..];
        let Some(unit) = ["ns", "us", "µs", "μs", "ms", "s", "m", "h"]
            .iter()
            .find(|unit| rest.starts_with(**unit))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

/// Returns the server URL without a lone trailing `/`, which Traefik ignores: `http://a:80/`
/// becomes `http://a:80`.
fn strip_root_path(url: &str) -> &str {
    match url.split_once("://") {
        Some((_, rest)) if rest.find('/') == Some(rest.len().saturating_sub(1)) => {
            &url[..url.len() - 1]
        }
        _ => url,
    }
}

/// Returns the field names of a struct that derives `Deserialize`, as renamed by serde.
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The probe always fails after recording the names, so the result carries nothing.
    let _ = T::deserialize(FieldNameProbe {
        fields: &mut fields,
    });
    fields
}

/// A deserializer that records the field names that serde requests and then fails.
struct FieldNameProbe<'a> {
    fields: &'a mut &'static [&'static str],
}

impl<'de> serde::Deserializer<'de> for FieldNameProbe<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.fields = fields;
        Err(serde::de::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

// ---------------------------------------------------------------------------------------------
// Validation: checks shared by file-loaded and agent-pushed snapshots.
// ---------------------------------------------------------------------------------------------

/// Key path style of validation errors.
enum KeyStyle<'a> {
    /// Snapshot fields: `routers[app].rule`.
    Snapshot,
    /// File keys: `http.routers.app.rule`. `certificate_indexes[i]` is the index in
    /// `tls.certificates` of the snapshot's certificate `i`.
    File { certificate_indexes: &'a [usize] },
}

#[derive(Clone, Copy)]
enum RouterField {
    Whole,
    Rule,
    Service,
    Priority,
    EntryPoint(usize),
}

#[derive(Clone, Copy)]
enum CertificateField {
    Chain,
    Key,
}

impl KeyStyle<'_> {
    fn router(&self, name: &str, field: RouterField) -> String {
        let file = matches!(self, KeyStyle::File { .. });
        let suffix = match field {
            RouterField::Whole => String::new(),
            RouterField::Rule => ".rule".to_owned(),
            RouterField::Service => ".service".to_owned(),
            RouterField::Priority => ".priority".to_owned(),
            RouterField::EntryPoint(index) if file => format!(".entryPoints[{index}]"),
            RouterField::EntryPoint(index) => format!(".entrypoints[{index}]"),
        };
        if file {
            format!("http.routers.{name}{suffix}")
        } else {
            format!("routers[{name}]{suffix}")
        }
    }

    fn service(&self, name: &str) -> String {
        match self {
            KeyStyle::File { .. } => format!("http.services.{name}"),
            KeyStyle::Snapshot => format!("services[{name}]"),
        }
    }

    fn server_url(&self, service: &str, index: usize) -> String {
        match self {
            KeyStyle::File { .. } => {
                format!("http.services.{service}.loadBalancer.servers[{index}].url")
            }
            KeyStyle::Snapshot => format!("services[{service}].servers[{index}].url"),
        }
    }

    /// Returns the key of certificate `index`, or of the default certificate when `None`.
    fn certificate(&self, index: Option<usize>, field: CertificateField) -> String {
        match (self, index) {
            (
                KeyStyle::File {
                    certificate_indexes,
                },
                index,
            ) => {
                let prefix = match index {
                    Some(index) => {
                        let file_index = certificate_indexes.get(index).copied().unwrap_or(index);
                        format!("tls.certificates[{file_index}]")
                    }
                    None => "tls.stores.default.defaultCertificate".to_owned(),
                };
                match field {
                    CertificateField::Chain => format!("{prefix}.certFile"),
                    CertificateField::Key => format!("{prefix}.keyFile"),
                }
            }
            (KeyStyle::Snapshot, index) => {
                let prefix = index.map_or_else(
                    || "default_certificate".to_owned(),
                    |i| format!("certificates[{i}]"),
                );
                match field {
                    CertificateField::Chain => format!("{prefix}.chain_pem"),
                    CertificateField::Key => format!("{prefix}.key_pem"),
                }
            }
        }
    }
}

fn check_snapshot(
    snapshot: &Snapshot,
    keys: &KeyStyle<'_>,
    skip_service_check: &BTreeSet<String>,
    errors: &mut Vec<ConfigError>,
) {
    let service_names: BTreeSet<&str> = snapshot
        .services
        .iter()
        .map(|service| service.name.as_str())
        .collect();

    let mut router_names = BTreeSet::new();
    for router in &snapshot.routers {
        let key = keys.router(&router.name, RouterField::Whole);
        check_name(&key, "router", &router.name, &mut router_names, errors);
        check_router(router, keys, &service_names, skip_service_check, errors);
    }

    let mut seen_services = BTreeSet::new();
    for service in &snapshot.services {
        let key = keys.service(&service.name);
        check_name(&key, "service", &service.name, &mut seen_services, errors);
        for (index, server) in service.servers.iter().enumerate() {
            if let Err(reason) = check_server_url(&server.url) {
                let message = format!("invalid server URL \"{}\": {reason}", server.url);
                errors.push(ConfigError::new(
                    keys.server_url(&service.name, index),
                    Some(server.url.clone()),
                    message,
                ));
            }
        }
    }

    // The file loader reports transport problems at their file keys as it reads them.
    if matches!(keys, KeyStyle::Snapshot) {
        check_servers_transports(snapshot, errors);
    }

    for (index, certificate) in snapshot.certificates.iter().enumerate() {
        check_certificate(certificate, keys, Some(index), errors);
    }
    if let Some(certificate) = &snapshot.default_certificate {
        check_certificate(certificate, keys, None, errors);
    }
}

/// Checks the servers transports of a snapshot and the services' references to them.
fn check_servers_transports(snapshot: &Snapshot, errors: &mut Vec<ConfigError>) {
    let mut names = BTreeSet::new();
    for transport in &snapshot.servers_transports {
        let key = format!("servers_transports[{}]", transport.name);
        check_name(
            &key,
            "servers transport",
            &transport.name,
            &mut names,
            errors,
        );
        if let Some(server_name) = &transport.server_name {
            if let Err(reason) = check_server_name(server_name) {
                let key = format!("{key}.server_name");
                errors.push(ConfigError::new(key, Some(server_name.clone()), reason));
            }
        }
        for (index, root_ca) in transport.root_cas.iter().enumerate() {
            if !root_ca.pem.contains("-----BEGIN CERTIFICATE-----") {
                let message = format!("{} contains no PEM CERTIFICATE block", root_ca.origin);
                errors.push(ConfigError::new(
                    format!("{key}.root_cas[{index}]"),
                    None,
                    message,
                ));
            }
        }
    }
    for service in &snapshot.services {
        if let Some(name) = &service.servers_transport {
            if !names.contains(name.as_str()) {
                errors.push(ConfigError::new(
                    format!("services[{}].servers_transport", service.name),
                    Some(name.clone()),
                    format!("servers transport \"{name}\" not found"),
                ));
            }
        }
    }
}

fn check_name<'a>(
    key: &str,
    what: &str,
    name: &'a str,
    seen: &mut BTreeSet<&'a str>,
    errors: &mut Vec<ConfigError>,
) {
    if name.is_empty() {
        errors.push(ConfigError::new(key, None, format!("{what} name is empty")));
    } else if name.contains('@') {
        let message =
            format!("{what} name \"{name}\" contains '@', which only provider references may use");
        errors.push(ConfigError::new(key, Some(name.to_owned()), message));
    } else if !seen.insert(name) {
        errors.push(ConfigError::new(
            key,
            Some(name.to_owned()),
            format!("duplicate {what} name \"{name}\""),
        ));
    }
}

fn check_router(
    router: &Router,
    keys: &KeyStyle<'_>,
    service_names: &BTreeSet<&str>,
    skip_service_check: &BTreeSet<String>,
    errors: &mut Vec<ConfigError>,
) {
    let name = router.name.as_str();
    let rule_key = keys.router(name, RouterField::Rule);
    if router.rule.trim().is_empty() {
        errors.push(ConfigError::new(rule_key, None, "rule is missing or empty"));
    } else if let Err(error) = rule::parse(&router.rule) {
        errors.push(ConfigError::new(
            rule_key,
            Some(router.rule.clone()),
            error.to_string(),
        ));
    }

    let service_key = keys.router(name, RouterField::Service);
    if router.service.is_empty() {
        errors.push(ConfigError::new(
            service_key,
            None,
            "service is missing or empty",
        ));
    } else if !service_names.contains(router.service.as_str())
        && !skip_service_check.contains(&router.service)
    {
        let message = format!("service \"{}\" not found", router.service);
        errors.push(ConfigError::new(
            service_key,
            Some(router.service.clone()),
            message,
        ));
    }

    for (index, entrypoint) in router.entrypoints.iter().enumerate() {
        if entrypoint != ENTRYPOINT_WEB && entrypoint != ENTRYPOINT_WEBSECURE {
            let message = format!(
                "unknown entry point \"{entrypoint}\"; valid entry points are {ENTRYPOINT_WEB} and \
                 {ENTRYPOINT_WEBSECURE}"
            );
            let key = keys.router(name, RouterField::EntryPoint(index));
            errors.push(ConfigError::new(key, Some(entrypoint.clone()), message));
        }
    }

    if let Some(priority) = router
        .priority
        .filter(|priority| *priority > MAX_USER_PRIORITY)
    {
        let message = format!(
            "priority {priority} is above the maximum of {MAX_USER_PRIORITY}, which is reserved \
             for internal routers"
        );
        errors.push(ConfigError::new(
            keys.router(name, RouterField::Priority),
            Some(priority.to_string()),
            message,
        ));
    }
}

/// Checks that a server URL is `SCHEME://HOST:PORT`, where SCHEME is `http`, `https` or
/// `h2c` (HTTP/2 without TLS, for gRPC) and HOST is an IP address (IPv6 in brackets) or a DNS
/// name.
fn check_server_url(url: &str) -> Result<(), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("missing scheme; write http://HOST:PORT".to_owned());
    };
    if !["http", "https", "h2c"]
        .iter()
        .any(|known| scheme.eq_ignore_ascii_case(known))
    {
        return Err(format!(
            "unknown scheme {scheme}; use http, https or h2c, as in http://HOST:PORT"
        ));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(
            "paths, queries and fragments are not supported; write http://HOST:PORT".to_owned(),
        );
    }
    if rest.contains('@') {
        return Err("user information is not supported".to_owned());
    }

    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let Some((address, after)) = bracketed.split_once(']') else {
            return Err("missing ']' after the IPv6 address".to_owned());
        };
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("invalid IPv6 address {address}"));
        }
        (address, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err("missing host".to_owned());
    }
    if !rest.starts_with('[')
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!("invalid host {host}"));
    }
    let Some(port) = port else {
        return Err(format!(
            "missing port; write http://{rest}:80 for the default port"
        ));
    };
    match port.parse::<u16>() {
        Ok(number) if number > 0 && port.bytes().all(|c| c.is_ascii_digit()) => Ok(()),
        _ => Err(format!("invalid port {port}; use 1 to 65535")),
    }
}

/// Checks a `serverName`: a DNS name or an IP address, as rustls accepts for SNI and
/// certificate verification.
fn check_server_name(name: &str) -> Result<(), String> {
    let is_ip = name.parse::<std::net::IpAddr>().is_ok();
    let is_dns = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if is_ip || is_dns {
        Ok(())
    } else {
        Err(format!(
            "invalid server name {name:?}; use a DNS name such as backend.internal or an IP address"
        ))
    }
}

fn check_certificate(
    certificate: &CertificatePem,
    keys: &KeyStyle<'_>,
    index: Option<usize>,
    errors: &mut Vec<ConfigError>,
) {
    let origin = Some(certificate.origin.clone()).filter(|origin| !origin.is_empty());
    let source = origin
        .as_deref()
        .map_or_else(String::new, |origin| format!(" in {origin}"));
    if !certificate
        .chain_pem
        .contains("-----BEGIN CERTIFICATE-----")
    {
        let message = format!("no PEM certificate block (-----BEGIN CERTIFICATE-----){source}");
        errors.push(ConfigError::new(
            keys.certificate(index, CertificateField::Chain),
            origin.clone(),
            message,
        ));
    }

    let key_headers: Vec<&str> = certificate
        .key_pem
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("-----BEGIN ") && line.ends_with("PRIVATE KEY-----"))
        .collect();
    let key = keys.certificate(index, CertificateField::Key);
    // The origin names the certificate, so key errors name only the key's own key path.
    if key_headers.is_empty() {
        let message = "no PEM private key block (-----BEGIN ... PRIVATE KEY-----) in the key";
        errors.push(ConfigError::new(key, None, message.to_owned()));
    } else if key_headers
        .iter()
        .all(|header| header.contains("ENCRYPTED"))
    {
        let message = "encrypted private keys are not supported; decrypt the key first";
        errors.push(ConfigError::new(key, None, message.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Self-signed P-256 certificate for `a.test`, made once with
    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=a.test -days 3650`.
    const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBdzCCAR2gAwIBAgIUBqgcNVBy0rtRWAX8kr92i4qZV9YwCgYIKoZIzj0EAwIw
ETEPMA0GA1UEAwwGYS50ZXN0MB4XDTI2MTIwNDIyMDA1M1oXDTM2MTIwMTIyMDA1
M1owETEPMA0GA1UEAwwGYS50ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE
xCAiilo3WbuLTprR3O7OwnBWZBq7tHfMYKq9DegrO2UhR0eMxLkfzR8carDx5iPA
3FaiU9xgwQM45YEErkU3P6NTMFEwHQYDVR0OBBYEFDpB+OiWJp2t/9GxTZPCFEAV
a9LGMB8GA1UdIwQYMBaAFDpB+OiWJp2t/9GxTZPCFEAVa9LGMA8GA1UdEwEB/wQF
MAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIhANisC24wf7hFxnmBQB2g1KRw97acepEQ
v+VuCGvoeOqKAiAaiJIetqBewhpsCK2ePlYqTHgRP3Yh2c+7zwaap4NYdQ==
-----END CERTIFICATE-----
";

    const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgI7KMymHPkrtWpGS/
LMiME3tARdhCXDre5/w2pjOVU1qhRANCAATEICKKWjdZu4tOmtHc7s7CcFZkGru0
d8xgqr0N6Cs7ZSFHR4zEuR/NHxxqsPHmI8DcVqJT3GDBAzjlgQSuRTc/
-----END PRIVATE KEY-----
";

    const FULL_YAML: &str = r#"
http:
  routers:
    web-app:
      rule: "Host(`app.example.com`) && PathPrefix(`/api`)"
      entryPoints: [websecure]
      service: app@file
      priority: 10
      middlewares: [limit, small@file]
      tls:
        certResolver: le
        options: modern@file
        domains:
          - main: example.com
            sans: [www.example.com]
    plain:
      rule: Host(`plain.example.com`)
      entryPoints:
        - web
      service: static
      ruleSyntax: v2
  services:
    app:
      loadBalancer:
        servers:
          - url: http://10.0.0.1:8080/
          - url: "http://[2001:db8::1]:8080"
        passHostHeader: false
        strategy: p2c
        healthCheck:
          path: /health
          interval: 10s
          timeout: 3
        sticky:
          cookie:
            name: srv
            secure: true
    static:
      loadBalancer:
        servers:
          - url: http://static:80
  middlewares:
    limit:
      buffering:
        maxRequestBodyBytes: 1048576
    small:
      buffering:
        maxRequestBodyBytes: 2048
        memRequestBodyBytes: 1024
tls:
  certificates:
    - certFile: certs/a.pem
      keyFile: certs/a.key
      stores: [default]
  stores:
    default:
      defaultCertificate:
        certFile: certs/a.pem
        keyFile: certs/a.key
  options:
    modern:
      minVersion: VersionTLS12
      sniStrict: true
      alpnProtocols: [h2, http/1.1]
"#;

    const FULL_TOML: &str = r#"
[http.routers.web-app]
rule = "Host(`app.example.com`) && PathPrefix(`/api`)"
entryPoints = ["websecure"]
service = "app@file"
priority = 10
middlewares = ["limit", "small@file"]

[http.routers.web-app.tls]
certResolver = "le"
options = "modern@file"

[[http.routers.web-app.tls.domains]]
main = "example.com"
sans = ["www.example.com"]

[http.routers.plain]
rule = "Host(`plain.example.com`)"
entryPoints = ["web"]
service = "static"
ruleSyntax = "v2"

[http.services.app.loadBalancer]
passHostHeader = false
strategy = "p2c"

[[http.services.app.loadBalancer.servers]]
url = "http://10.0.0.1:8080/"

[[http.services.app.loadBalancer.servers]]
url = "http://[2001:db8::1]:8080"

[http.services.app.loadBalancer.healthCheck]
path = "/health"
interval = "10s"
timeout = 3

[http.services.app.loadBalancer.sticky.cookie]
name = "srv"
secure = true

[[http.services.static.loadBalancer.servers]]
url = "http://static:80"

[http.middlewares.limit.buffering]
maxRequestBodyBytes = 1048576

[http.middlewares.small.buffering]
maxRequestBodyBytes = 2048
memRequestBodyBytes = 1024

[[tls.certificates]]
certFile = "certs/a.pem"
keyFile = "certs/a.key"
stores = ["default"]

[tls.stores.default.defaultCertificate]
certFile = "certs/a.pem"
keyFile = "certs/a.key"

[tls.options.modern]
minVersion = "VersionTLS12"
sniStrict = true
alpnProtocols = ["h2", "http/1.1"]
"#;

    /// A directory under the system temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let count = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("edge-proto-{label}-{}-{count}", std::process::id());
            let path = std::env::temp_dir().join(name);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn write(&self, relative: &str, contents: &str) -> PathBuf {
            let path = self.0.join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn yaml(text: &str) -> Result<Snapshot, ConfigErrors> {
        parse(text, Format::Yaml, Path::new("/nonexistent"))
    }

    fn yaml_errors(text: &str) -> Vec<String> {
        match yaml(text) {
            Ok(snapshot) => panic!("configuration loaded: {snapshot:?}"),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn inline_tls() -> String {
        let indent = |pem: &str| {
            pem.lines()
                .map(|line| format!("          {line}\n"))
                .collect::<String>()
        };
        format!(
            "tls:\n  certificates:\n    - certFile: |\n{}      keyFile: |\n{}",
            indent(CERT_PEM),
            indent(KEY_PEM)
        )
    }

    const APP_SERVICE: &str = "
  services:
    app:
      loadBalancer:
        servers:
          - url: http://127.0.0.1:8080
";

    #[test]
    fn yaml_and_toml_give_same_snapshot() {
        let dir = TempDir::new("full");
        dir.write("certs/a.pem", CERT_PEM);
        dir.write("certs/a.key", KEY_PEM);
        let yaml_path = dir.write("dynamic.yml", FULL_YAML);
        let toml_path = dir.write("dynamic.toml", FULL_TOML);

        let from_yaml = load(&yaml_path).unwrap();
        let from_toml = load(&toml_path).unwrap();
        assert_eq!(from_yaml, from_toml);
    }

    #[test]
    fn full_example_maps_every_field() {
        let dir = TempDir::new("fields");
        dir.write("certs/a.pem", CERT_PEM);
        dir.write("certs/a.key", KEY_PEM);
        let snapshot = load(&dir.write("dynamic.yaml", FULL_YAML)).unwrap();

        let expected_routers = vec![
            Router {
                name: "plain".into(),
                rule: "Host(`plain.example.com`)".into(),
                priority: None,
                entrypoints: vec!["web".into()],
                service: "static".into(),
                tls: false,
                max_request_body_bytes: None,
            },
            Router {
                name: "web-app".into(),
                rule: "Host(`app.example.com`) && PathPrefix(`/api`)".into(),
                priority: Some(10),
                entrypoints: vec!["websecure".into()],
                service: "app".into(),
                tls: true,
                max_request_body_bytes: Some(2048),
            },
        ];
        assert_eq!(snapshot.routers, expected_routers);

        let server = |url: &str| Server {
            url: url.into(),
            state: ServerState::Up,
        };
        let expected_services = vec![
            Service {
                name: "app".into(),
                servers: vec![
                    server("http://10.0.0.1:8080"),
                    server("http://[2001:db8::1]:8080"),
                ],
                balance: Balance::LeastInFlight,
                pass_host_header: false,
                servers_transport: None,
            },
            Service {
                name: "static".into(),
                servers: vec![server("http://static:80")],
                balance: Balance::RoundRobin,
                pass_host_header: true,
                servers_transport: None,
            },
        ];
        assert_eq!(snapshot.services, expected_services);
        assert_eq!(snapshot.version, 0);
    }

    #[test]
    fn relative_cert_paths_use_file_dir() {
        let dir = TempDir::new("certs");
        dir.write("certs/a.pem", CERT_PEM);
        dir.write("certs/a.key", KEY_PEM);
        let snapshot = load(&dir.write("conf/../dynamic.yml", FULL_YAML)).unwrap();

        assert_eq!(snapshot.certificates.len(), 1);
        let certificate = &snapshot.certificates[0];
        assert_eq!(certificate.chain_pem, CERT_PEM);
        assert_eq!(certificate.key_pem, KEY_PEM);
        assert_eq!(
            PathBuf::from(&certificate.origin),
            dir.0.join("conf/../certs/a.pem")
        );
        assert_eq!(snapshot.default_certificate.as_ref(), Some(certificate));
    }

    #[test]
    fn missing_cert_file_named() {
        let dir = TempDir::new("missing");
        let text = "tls:\n  certificates:\n    - certFile: nope.pem\n      keyFile: /nope.key\n";
        let path = dir.write("dynamic.yml", text);
        let errors = load(&path).unwrap_err().to_string();
        let expected = format!(
            "tls.certificates[0].certFile: file \"{}\" not found\n\
             tls.certificates[0].keyFile: file \"/nope.key\" not found",
            dir.0.join("nope.pem").display()
        );
        assert_eq!(errors, expected);
    }

    #[test]
    fn key_error_names_key_file() {
        let dir = TempDir::new("keyfile");
        dir.write("a.pem", CERT_PEM);
        dir.write("notakey.txt", "hello");
        let text = "tls:\n  certificates:\n    - certFile: a.pem\n      keyFile: notakey.txt\n";
        let errors = load(&dir.write("dynamic.yml", text))
            .unwrap_err()
            .to_string();
        assert!(
            errors.starts_with("tls.certificates[0].keyFile: "),
            "{errors}"
        );
        assert!(!errors.contains("a.pem"), "{errors}");
    }

    #[test]
    fn inline_pem_is_accepted() {
        let snapshot = yaml(&inline_tls()).unwrap();
        assert_eq!(snapshot.certificates.len(), 1);
        assert_eq!(snapshot.certificates[0].chain_pem, CERT_PEM);
        assert_eq!(
            snapshot.certificates[0].origin,
            "tls.certificates[0].certFile"
        );
    }

    #[test]
    fn unreadable_file_reported() {
        let errors = load(Path::new("/nonexistent/edge/dynamic.yml")).unwrap_err();
        assert_eq!(
            errors.to_string(),
            "file \"/nonexistent/edge/dynamic.yml\" not found"
        );
    }

    #[test]
    fn empty_file_is_empty_config() {
        let empty = Snapshot::default();
        assert_eq!(yaml("").unwrap(), empty);
        assert_eq!(yaml("# nothing yet\n").unwrap(), empty);
        assert_eq!(parse("", Format::Toml, Path::new("")).unwrap(), empty);
        assert_eq!(yaml("http:\n  routers:\n").unwrap(), empty);
    }

    #[test]
    fn format_follows_extension() {
        assert_eq!(Format::from_path(Path::new("a/dynamic.toml")), Format::Toml);
        assert_eq!(Format::from_path(Path::new("dynamic.TOML")), Format::Toml);
        assert_eq!(Format::from_path(Path::new("dynamic.yml")), Format::Yaml);
        assert_eq!(Format::from_path(Path::new("dynamic.json")), Format::Yaml);
        assert_eq!(Format::from_path(Path::new("dynamic")), Format::Yaml);
    }

    #[test]
    fn rule_error_uses_file_key() {
        let text = format!(
            "http:\n  routers:\n    app:\n      rule: Host(`a`\n      service: app\n{APP_SERVICE}"
        );
        assert_eq!(
            yaml_errors(&text),
            vec!["http.routers.app.rule: invalid rule \"Host(`a`\": expected ')' at byte 9"]
        );
    }

    #[test]
    fn three_mistakes_give_three_errors() {
        let text = format!(
            "http:\n  routers:\n    app:\n      rule: Host(`a`) && Path(api)\n      service: ap\n      \
             entryPoints: [web, https]\n{APP_SERVICE}"
        );
        assert_eq!(
            yaml_errors(&text),
            vec![
                "http.routers.app.entryPoints[1]: unknown entry point \"https\"; valid entry \
                 points are web and websecure",
                "http.routers.app.rule: invalid rule \"Host(`a`) && Path(api)\": argument api of \
                 Path is not quoted at byte 19; write Host(`a`) && Path(`api`)",
                "http.routers.app.service: service \"ap\" not found",
            ]
        );
    }

    #[test]
    fn unknown_key_names_full_path() {
        let text = format!("http:\n  routers:\n    app:\n      rule: Host(`a`)\n      service: app\n      entrypoint: web\n{APP_SERVICE}");
        assert_eq!(
            yaml_errors(&text),
            vec![
                "http.routers.app.entrypoint: unknown key; valid keys are rule, priority, \
                 entryPoints, service, tls, middlewares, ruleSyntax, observability"
            ]
        );
    }

    #[test]
    fn nested_unknown_key_names_path() {
        let text = "http:\n  services:\n    app:\n      loadBalancer:\n        servers:\n          - url: http://a:1\n          - uri: http://b:1\n";
        assert_eq!(
            yaml_errors(text),
            vec!["http.services.app.loadBalancer.servers[1].uri: unknown key; valid keys are url, weight, preservePath"]
        );
    }

    #[test]
    fn wrong_type_names_key() {
        let text = format!("http:\n  routers:\n    app:\n      rule: Host(`a`)\n      service: app\n      priority: high\n{APP_SERVICE}");
        assert_eq!(
            yaml_errors(&text),
            vec!["http.routers.app.priority: invalid type: string \"high\", expected i64"]
        );
    }

    #[test]
    fn keys_match_case_insensitively() {
        let text = "http:\n  routers:\n    app:\n      Rule: Host(`a`)\n      service: app\n      entrypoints: [web]\n  services:\n    app:\n      loadbalancer:\n        PassHostHeader: false\n        servers:\n          - URL: http://a:1\n";
        let snapshot = yaml(text).unwrap();
        assert_eq!(snapshot.routers[0].entrypoints, vec!["web".to_owned()]);
        assert_eq!(snapshot.routers[0].rule, "Host(`a`)");
        assert!(!snapshot.services[0].pass_host_header);
        assert_eq!(snapshot.services[0].servers[0].url, "http://a:1");
    }

    #[test]
    fn case_duplicate_keys_rejected() {
        let text = format!("http:\n  routers:\n    app:\n      rule: Host(`a`)\n      Rule: Host(`b`)\n      service: app\n{APP_SERVICE}");
        assert_eq!(
            yaml_errors(&text),
            vec!["http.routers.app.rule: duplicate key: Rule and rule set the same key, because keys are case-insensitive"]
        );
    }

    #[test]
    fn router_tls_empty_value_enables() {
        for (tls, expected) in [
            ("tls: {}", true),
            ("tls:", true),
            ("tls: true", true),
            ("tls: false", false),
        ] {
            let text = format!("http:\n  routers:\n    app:\n      rule: Host(`a`)\n      service: app\n      {tls}\n{APP_SERVICE}");
            assert_eq!(yaml(&text).unwrap().routers[0].tls, expected, "{tls}");
        }
    }

    #[test]
    fn tcp_and_udp_rejected() {
        let text =
            "tcp:\n  routers:\n    db:\n      rule: HostSNI(`*`)\nudp:\n  services:\n    dns: {}\n";
        assert_eq!(
            yaml_errors(text),
            vec![
                "tcp: TCP and UDP routers are not supported",
                "udp: TCP and UDP routers are not supported"
            ]
        );
    }

    #[test]
    fn other_service_kinds_rejected() {
        let text = "http:\n  services:\n    a:\n      weighted:\n        services: []\n    b:\n      mirroring:\n        service: a\n    c:\n      failover:\n        service: a\n";
        assert_eq!(
            yaml_errors(text),
            vec![
                "http.services.a.weighted: weighted services are not supported",
                "http.services.b.mirroring: mirroring services are not supported",
                "http.services.c.failover: failover services are not supported",
            ]
        );
    }

    #[test]
    fn servers_transport_loaded() {
        let dir = TempDir::new("transport");
        dir.write("ca.pem", CERT_PEM);
        let text = "http:\n  serversTransports:\n    internal:\n      serverName: api.internal\n      rootCAs: [ca.pem]\n      disableHTTP2: true\n    insecure:\n      insecureSkipVerify: true\n  services:\n    app:\n      loadBalancer:\n        serversTransport: internal@file\n        servers:\n          - url: https://10.0.0.5:8443\n    other:\n      loadBalancer:\n        serversTransport: insecure\n        servers:\n          - url: https://10.0.0.6:443\n";
        let snapshot = parse(text, Format::Yaml, &dir.0).unwrap();
        let internal = &snapshot.servers_transports[1];
        assert_eq!(internal.name, "internal");
        assert_eq!(internal.server_name.as_deref(), Some("api.internal"));
        assert!(!internal.insecure_skip_verify);
        assert!(internal.disable_http2);
        assert_eq!(internal.root_cas.len(), 1);
        assert_eq!(internal.root_cas[0].pem, CERT_PEM);
        assert!(internal.root_cas[0].origin.ends_with("ca.pem"));
        let insecure = &snapshot.servers_transports[0];
        assert!(insecure.insecure_skip_verify);
        assert!(insecure.root_cas.is_empty());
        assert_eq!(
            snapshot.services[0].servers_transport.as_deref(),
            Some("internal")
        );
        assert_eq!(
            snapshot.services[1].servers_transport.as_deref(),
            Some("insecure")
        );
        assert_eq!(snapshot.services[0].servers[0].url, "https://10.0.0.5:8443");
        assert!(validate(&snapshot).is_ok());
    }

    #[test]
    fn servers_transport_errors_named() {
        let text = "http:\n  serversTransports:\n    bad:\n      rootCAs: [/nonexistent/ca.pem]\n      serverName: \"a b\"\n      certificates: []\n  services:\n    app:\n      loadBalancer:\n        serversTransport: missing@file\n        servers:\n          - url: https://a:1\n    other:\n      loadBalancer:\n        serversTransport: t@docker\n        servers:\n          - url: https://a:1\n";
        assert_eq!(
            yaml_errors(text),
            vec![
                "http.serversTransports.bad.certificates: certificates is not supported yet",
                "http.serversTransports.bad.rootCAs[0]: file \"/nonexistent/ca.pem\" not found",
                "http.serversTransports.bad.serverName: invalid server name \"a b\"; use a DNS name such as backend.internal or an IP address",
                "http.services.app.loadBalancer.serversTransport: servers transport \"missing\" not found; define it under http.serversTransports",
                "http.services.other.loadBalancer.serversTransport: servers transport \"t@docker\" belongs to provider docker; only the file provider (no suffix or @file) is supported",
            ]
        );
    }

    #[test]
    fn root_ca_without_certificate_rejected() {
        let text = "http:\n  serversTransports:\n    t:\n      rootCAs: [\"-----BEGIN PRIVATE KEY-----\\nAAAA\\n-----END PRIVATE KEY-----\"]\n";
        assert_eq!(
            yaml_errors(text),
            vec!["http.serversTransports.t.rootCAs[0]: http.serversTransports.t.rootCAs[0] contains no PEM CERTIFICATE block"]
        );
    }

    #[test]
    fn snapshot_transport_reference_checked() {
        let mut snapshot = Snapshot {
            services: vec![snapshot_service("app", "https://10.0.0.1:443")],
            ..Snapshot::default()
        };
        snapshot.services[0].servers_transport = Some("gone".into());
        let errors = validate(&snapshot).unwrap_err().0;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "services[app].servers_transport");
        assert_eq!(errors[0].message, "servers transport \"gone\" not found");

        snapshot.servers_transports.push(ServersTransport {
            name: "gone".into(),
            ..ServersTransport::default()
        });
        assert!(validate(&snapshot).is_ok());
    }

    #[test]
    fn snapshot_without_transports_parses() {
        // A snapshot written before servers transports existed.
        let json = r#"{"version":3,"routers":[],"services":[{"name":"s","servers":[{"url":"http://10.0.0.1:80"}]}]}"#;
        let snapshot: Snapshot = serde_json::from_str(json).unwrap();
        assert!(snapshot.servers_transports.is_empty());
        assert_eq!(snapshot.services[0].servers_transport, None);
        let written = serde_json::to_string(&snapshot).unwrap();
        assert!(!written.contains("servers_transport"));
    }

    #[test]
    fn unsupported_middleware_on_router_key() {
        let text = format!(
            "http:\n  routers:\n    app:\n      rule: Host(`a`)\n      service: app\n      middlewares: [hsts]\n  \
             middlewares:\n    hsts:\n      headers:\n        stsSeconds: 31536000\n    spare:\n      headerz: {{}}\n{APP_SERVICE}"
        );
        assert_eq!(
            yaml_errors(&text),
            vec![
                "http.middlewares.spare.headerz: unknown middleware type headerz",
                "http.routers.app.middlewares[0]: middleware type headers is not supported yet; \
                 only buffering is (used by \"hsts\")",
            ]
        );
    }

    #[test]
    fn unreferenced_middleware_rejected() {
        let text =
            "http:\n  middlewares:\n    auth:\n      basicAuth:\n        users: [\"u:$apr1$x\"]\n";
        assert_eq!(
            yaml_errors(text),
            vec!["http.middlewares.auth.basicAuth: middleware type basicAuth is not supported yet; only buffering is"]
        );
    }

    #[test]
    fn other_provider_references_rejected() {
        let text = format!(
            "http:\n  routers:\n    app:\n      rule: Host(`a`)\n      service: api@internal\n      middlewares: [auth@docker, missing]\n{APP_SERVICE}"
        );
        assert_eq!(
            yaml_errors(&text),
            vec![
                "http.routers.app.middlewares[0]: middleware \"auth@docker\" belongs to provider \
                 docker; only the file provider (no suffix or @file) is supported",
                "http.routers.app.middlewares[1]: middleware \"missing\" not found",
                "http.routers.app.service: service \"api@internal\" belongs to provider internal; \
                 only the file provider (no suffix or @file) is supported",
            ]
        );
    }

    #[test]
    fn body_limit_is_chain_minimum() {
        let text = format!(
            "http:\n  routers:\n    app:\n      rule: Host(`a`)\n      service: app\n      middlewares: [big, none, small]\n  \
             middlewares:\n    big:\n      buffering:\n        maxRequestBodyBytes: 5000\n    none:\n      buffering:\n        \
             maxRequestBodyBytes: 0\n    small:\n      buffering:\n        maxRequestBodyBytes: 300\n{APP_SERVICE}"
        );
        assert_eq!(
            yaml(&text).unwrap().routers[0].max_request_body_bytes,
            Some(300)
        );
    }

    #[test]
    fn unknown_strategy_rejected() {
        let text = "http:\n  services:\n    app:\n      loadBalancer:\n        strategy: hrw\n        servers:\n          - url: http://a:1\n";
        assert_eq!(
            yaml_errors(text),
            vec!["http.services.app.loadBalancer.strategy: load-balancing strategy \"hrw\" is not supported; use wrr, p2c or leasttime"]
        );
    }

    #[test]
    fn server_url_problems_reported() {
        let text = "http:\n  services:\n    app:\n      loadBalancer:\n        servers:\n          - url: ftp://a:443\n          - url: http://a\n          - url: http://a:0\n          - url: http://a:80/api\n";
        assert_eq!(
            yaml_errors(text),
            vec![
                "http.services.app.loadBalancer.servers[0].url: invalid server URL \"ftp://a:443\": unknown scheme ftp; use http, https or h2c, as in http://HOST:PORT",
                "http.services.app.loadBalancer.servers[1].url: invalid server URL \"http://a\": missing port; write http://a:80 for the default port",
                "http.services.app.loadBalancer.servers[2].url: invalid server URL \"http://a:0\": invalid port 0; use 1 to 65535",
                "http.services.app.loadBalancer.servers[3].url: invalid server URL \"http://a:80/api\": paths, queries and fragments are not supported; write http://HOST:PORT",
            ]
        );
    }

    #[test]
    fn h2c_server_url_accepted() {
        let text = "http:\n  services:\n    app:\n      loadBalancer:\n        servers:\n          - url: h2c://10.0.0.5:50051\n";
        let snapshot = yaml(text).unwrap();
        assert_eq!(snapshot.services[0].servers[0].url, "h2c://10.0.0.5:50051");
    }

    #[test]
    fn unsupported_server_settings_rejected() {
        let text = "http:\n  services:\n    app:\n      loadBalancer:\n        passiveHealthCheck: {}\n        servers:\n          - url: http://a:1\n            weight: 3\n";
        assert_eq!(
            yaml_errors(text),
            vec![
                "http.services.app.loadBalancer.passiveHealthCheck: passiveHealthCheck is not supported yet",
                "http.services.app.loadBalancer.servers[0].weight: server weights are not supported yet; remove weight or set it to 1",
            ]
        );
    }

    #[test]
    fn health_check_values_checked() {
        let text = "http:\n  services:\n    app:\n      loadBalancer:\n        healthCheck:\n          interval: soon\n          port: 70000\n        servers: []\n";
        assert_eq!(
            yaml_errors(text),
            vec![
                "http.services.app.loadBalancer.healthCheck.interval: invalid duration; write seconds as a number or a Go duration such as 10s or 1m30s",
                "http.services.app.loadBalancer.healthCheck.port: invalid value: integer `70000`, expected u16",
            ]
        );
    }

    #[test]
    fn tls_options_checked() {
        let text = "tls:\n  options:\n    strict:\n      minVersion: TLS13\n      clientAuth:\n        clientAuthType: RequireAndVerifyClientCert\n";
        assert_eq!(
            yaml_errors(text),
            vec![
                "tls.options.strict.clientAuth: client certificate authentication (clientAuth) is not supported",
                "tls.options.strict.minVersion: invalid TLS version; use one of VersionTLS10, VersionTLS11, VersionTLS12, VersionTLS13",
            ]
        );
    }

    #[test]
    fn unknown_tls_options_reference() {
        let text = format!("http:\n  routers:\n    app:\n      rule: Host(`a`)\n      service: app\n      tls:\n        options: modern\n{APP_SERVICE}");
        assert_eq!(
            yaml_errors(&text),
            vec!["http.routers.app.tls.options: TLS options \"modern\" not found in tls.options"]
        );
    }

    #[test]
    fn other_certificate_stores_rejected() {
        let text = format!("{}      stores: [internal]\n", inline_tls());
        assert_eq!(
            yaml_errors(&text),
            vec!["tls.certificates[0].stores[0]: store \"internal\" is not supported; only the default store is"]
        );
    }

    #[test]
    fn yaml_syntax_error_has_location() {
        let errors = yaml_errors("http:\n  routers:\n    app: [\n");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("invalid YAML: "), "{}", errors[0]);
        assert!(errors[0].contains("line 4 column 1"), "{}", errors[0]);
    }

    #[test]
    fn toml_syntax_error_is_one_line() {
        let errors = parse("[http]\nrouters = {\n", Format::Toml, Path::new("")).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        let message = errors.to_string();
        assert!(message.starts_with("invalid TOML: "), "{message}");
        assert!(message.contains(" at line 2 column "), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn yaml_merge_keys_apply() {
        let text = "x-defaults: &defaults\n  service: app\n  entryPoints: [websecure]\nhttp:\n  routers:\n    app:\n      <<: *defaults\n      rule: Host(`a`)\n";
        let errors = yaml_errors(text);
        assert_eq!(
            errors,
            vec!["x-defaults: unknown key; valid keys are http, tcp, udp, tls"]
        );

        let text = format!("http:\n  routers:\n    base: &base\n      rule: Host(`a`)\n      service: app\n    app:\n      <<: *base\n      entryPoints: [web]\n{APP_SERVICE}");
        let snapshot = yaml(&text).unwrap();
        assert_eq!(snapshot.routers[0].name, "app");
        assert_eq!(snapshot.routers[0].service, "app");
        assert_eq!(snapshot.routers[0].entrypoints, vec!["web".to_owned()]);
    }

    #[test]
    fn yaml_alias_bomb_fails() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..12 {
            let previous = format!("*a{}", level - 1);
            let items = [previous.as_str(); 10].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{items}]\n"));
        }
        let errors = yaml_errors(&text);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("repetition limit exceeded"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn priority_above_reserved_range() {
        let text = format!("http:\n  routers:\n    app:\n      rule: Host(`a`)\n      service: app\n      priority: {}\n{APP_SERVICE}", i64::MAX);
        assert_eq!(
            yaml_errors(&text),
            vec![format!(
                "http.routers.app.priority: priority {} is above the maximum of {MAX_USER_PRIORITY}, \
                 which is reserved for internal routers",
                i64::MAX
            )]
        );
    }

    fn snapshot_router(name: &str, rule: &str, service: &str) -> Router {
        Router {
            name: name.into(),
            rule: rule.into(),
            priority: None,
            entrypoints: Vec::new(),
            service: service.into(),
            tls: false,
            max_request_body_bytes: None,
        }
    }

    fn snapshot_service(name: &str, url: &str) -> Service {
        Service {
            name: name.into(),
            servers: vec![Server {
                url: url.into(),
                state: ServerState::Up,
            }],
            balance: Balance::RoundRobin,
            pass_host_header: true,
            servers_transport: None,
        }
    }

    #[test]
    fn validate_accepts_good_snapshot() {
        let snapshot = Snapshot {
            routers: vec![snapshot_router("app", "Host(`a`)", "app")],
            services: vec![snapshot_service("app", "http://127.0.0.1:8080")],
            certificates: vec![CertificatePem {
                chain_pem: CERT_PEM.into(),
                key_pem: KEY_PEM.into(),
                origin: "agent".into(),
            }],
            ..Snapshot::default()
        };
        assert_eq!(validate(&snapshot), Ok(()));
    }

    #[test]
    fn validate_finds_missing_service() {
        let snapshot = Snapshot {
            routers: vec![snapshot_router("app", "Host(`a`)", "nope")],
            services: vec![snapshot_service("app", "http://127.0.0.1:8080")],
            ..Snapshot::default()
        };
        assert_eq!(
            validate(&snapshot).unwrap_err().to_string(),
            "routers[app].service: service \"nope\" not found"
        );
    }

    #[test]
    fn validate_collects_every_error() {
        let mut router = snapshot_router("app", "Host(`a`", "app");
        router.priority = Some(i64::MAX - 999);
        router.entrypoints = vec!["admin".into()];
        let snapshot = Snapshot {
            routers: vec![
                router,
                snapshot_router("", "Host(`b`)", ""),
                snapshot_router("x@y", "Host(`c`)", "app"),
            ],
            services: vec![
                snapshot_service("app", "ftp://a:1"),
                snapshot_service("app", "http://a:1"),
            ],
            certificates: vec![CertificatePem {
                chain_pem: "not a certificate".into(),
                key_pem: "-----BEGIN ENCRYPTED PRIVATE KEY-----\n".into(),
                origin: "/etc/edge/a.pem".into(),
            }],
            default_certificate: Some(CertificatePem {
                chain_pem: CERT_PEM.into(),
                key_pem: String::new(),
                origin: String::new(),
            }),
            ..Snapshot::default()
        };
        let errors: Vec<String> = validate(&snapshot)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            vec![
                "certificates[0].chain_pem: no PEM certificate block (-----BEGIN CERTIFICATE-----) in /etc/edge/a.pem",
                "certificates[0].key_pem: encrypted private keys are not supported; decrypt the key first",
                "default_certificate.key_pem: no PEM private key block (-----BEGIN ... PRIVATE KEY-----) in the key",
                "routers[]: router name is empty",
                "routers[].service: service is missing or empty",
                "routers[app].entrypoints[0]: unknown entry point \"admin\"; valid entry points are web and websecure",
                "routers[app].priority: priority 9223372036854774808 is above the maximum of 9223372036854774807, which is reserved for internal routers",
                "routers[app].rule: invalid rule \"Host(`a`\": expected ')' at byte 9",
                "routers[x@y]: router name \"x@y\" contains '@', which only provider references may use",
                "services[app]: duplicate service name \"app\"",
                "services[app].servers[0].url: invalid server URL \"ftp://a:1\": unknown scheme ftp; use http, https or h2c, as in http://HOST:PORT",
            ]
        );
    }

    #[test]
    fn config_error_display_forms() {
        let error = ConfigError::new(
            "tls.certificates[0].certFile",
            Some("/x.pem".into()),
            "file \"/x.pem\" not found",
        );
        assert_eq!(
            error.to_string(),
            "tls.certificates[0].certFile: file \"/x.pem\" not found"
        );
        let whole_file = ConfigError::new("", None, "invalid YAML: x");
        assert_eq!(whole_file.to_string(), "invalid YAML: x");
        assert_eq!(
            ConfigErrors(vec![error, whole_file])
                .to_string()
                .lines()
                .count(),
            2
        );
    }

    #[test]
    fn error_value_carries_scalar() {
        let text = format!("http:\n  routers:\n    app:\n      rule: Host(`a`)\n      service: app\n      entryPoints: [webz]\n{APP_SERVICE}");
        let errors = yaml(&text).unwrap_err();
        assert_eq!(errors.0[0].value.as_deref(), Some("webz"));
        assert_eq!(errors.0[0].key, "http.routers.app.entryPoints[0]");
    }

    #[test]
    fn duration_forms_accepted() {
        for text in ["10s", "1m30s", "250ms", "1.5h", "0", "30", "-1s"] {
            assert!(is_duration(&Value::String(text.into())), "{text}");
        }
        for text in ["", "10", "s", "10x", "1m30", "ten seconds"] {
            let accepted = is_duration(&Value::String(text.into()));
            assert_eq!(accepted, text == "10", "{text}");
        }
    }
}
