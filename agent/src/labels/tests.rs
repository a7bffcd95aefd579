//! Tests of the per-container label parser, and the container fixtures that the tests of
//! `crate::desired` share.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use edge_proto::Balance;

use super::*;
use crate::desired::DefaultRule;
use crate::model::{DockerHealth, Lifecycle, COMPOSE_PROJECT_LABEL, COMPOSE_SERVICE_LABEL};

/// Builds a [`ContainerInfo`] for tests.
pub(crate) struct Fixture(ContainerInfo);

impl Fixture {
    /// Starts a container of compose service `service` in project `project`, named
    /// `PROJECT-SERVICE-INDEX`, on network `PROJECT_default` at `ip`, exposing port 80.
    pub(crate) fn compose(project: &str, service: &str, index: u32, ip: &str) -> Fixture {
        let labels = BTreeMap::from([
            (COMPOSE_PROJECT_LABEL.to_owned(), project.to_owned()),
            (COMPOSE_SERVICE_LABEL.to_owned(), service.to_owned()),
        ]);
        Fixture(ContainerInfo {
            id: format!("{project}{service}{index}").repeat(4),
            name: format!("{project}-{service}-{index}"),
            labels,
            exposed_ports: vec![80],
            networks: BTreeMap::new(),
            health: DockerHealth::NoCheck,
            lifecycle: Lifecycle::Running,
        })
        .network(&format!("{project}_default"), ip)
    }

    /// Starts a container outside compose, on network `bridge` at `ip`, exposing port 80.
    pub(crate) fn plain(name: &str, ip: &str) -> Fixture {
        Fixture(ContainerInfo {
            id: name.repeat(8),
            name: name.to_owned(),
            labels: BTreeMap::new(),
            exposed_ports: vec![80],
            networks: BTreeMap::new(),
            health: DockerHealth::NoCheck,
            lifecycle: Lifecycle::Running,
        })
        .network("bridge", ip)
    }

    pub(crate) fn label(mut self, key: &str, value: &str) -> Fixture {
        self.0.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    pub(crate) fn ports(mut self, ports: &[u16]) -> Fixture {
        self.0.exposed_ports = ports.to_vec();
        self
    }

    pub(crate) fn network(mut self, name: &str, ip: &str) -> Fixture {
        let ip: IpAddr = ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        self.0.networks.insert(name.to_owned(), ip);
        self
    }

    pub(crate) fn without_networks(mut self) -> Fixture {
        self.0.networks.clear();
        self
    }

    pub(crate) fn lifecycle(mut self, lifecycle: Lifecycle) -> Fixture {
        self.0.lifecycle = lifecycle;
        self
    }

    pub(crate) fn build(self) -> ContainerInfo {
        self.0
    }
}

fn parse(fixture: Fixture) -> ParsedContainer {
    parse_container(&fixture.build(), &AgentOptions::default())
}

fn parse_with(fixture: Fixture, options: &AgentOptions) -> ParsedContainer {
    parse_container(&fixture.build(), options)
}

fn web() -> Fixture {
    Fixture::compose("shop", "web", 1, "172.18.0.2")
}

fn router<'a>(parsed: &'a ParsedContainer, id: &str) -> Option<&'a RouterConfig> {
    parsed.config.as_ref()?.routers.get(id)?.config.as_ref()
}

fn service<'a>(parsed: &'a ParsedContainer, id: &str) -> Option<&'a ServiceConfig> {
    parsed.config.as_ref()?.services.get(id)?.config.as_ref()
}

fn errors(parsed: &ParsedContainer) -> Vec<String> {
    parsed
        .problems
        .iter()
        .filter(|problem| problem.severity == Severity::Error)
        .map(LabelError::to_string)
        .collect()
}

fn warnings(parsed: &ParsedContainer) -> Vec<String> {
    parsed
        .problems
        .iter()
        .filter(|problem| problem.severity == Severity::Warning)
        .map(LabelError::to_string)
        .collect()
}

#[test]
fn label_error_display_names_key() {
    let error = LabelError::new(
        "shop-web-1",
        Some("traefik.http.routers.web.entrypoint"),
        Some("websecure".to_owned()),
        "unknown key \"entrypoint\"".to_owned(),
        Severity::Error,
    );
    assert_eq!(
        error.to_string(),
        "container shop-web-1: label traefik.http.routers.web.entrypoint=\"websecure\": unknown \
         key \"entrypoint\""
    );
}

#[test]
fn label_error_display_without_key() {
    let error = LabelError::new("a", None, None, "no port".to_owned(), Severity::Error);
    assert_eq!(error.to_string(), "container a: no port");
}

#[test]
fn keys_match_case_insensitively() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.Web.Rule", "Host(`a.test`)")
            .label("Traefik.HTTP.routers.web.EntryPoints", "websecure"),
    );
    let routers = &parsed.config.as_ref().map(|c| c.routers.len());
    assert_eq!(*routers, Some(1));
    let declared = parsed.config.as_ref().and_then(|c| c.routers.get("web"));
    assert_eq!(declared.map(|d| d.name.as_str()), Some("Web"));
    let config = router(&parsed, "web");
    assert_eq!(config.map(|r| r.rule.as_str()), Some("Host(`a.test`)"));
    assert_eq!(
        config.map(|r| r.entrypoints.clone()),
        Some(vec!["websecure".to_owned()])
    );
}

#[test]
fn misspelled_key_fails_container() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.web.rule", "Host(`a.test`)")
            .label("traefik.http.routers.web.entrypoint", "websecure")
            .label("traefik.http.services.web.loadbalancer.server.port", "8080"),
    );
    assert!(parsed.config.is_none());
    let error = &parsed.problems[0];
    assert_eq!(
        error.key.as_deref(),
        Some("traefik.http.routers.web.entrypoint")
    );
    assert_eq!(
        error.to_string(),
        "container shop-web-1: label traefik.http.routers.web.entrypoint=\"websecure\": unknown \
         key \"entrypoint\" (did you mean \"entrypoints\"? valid: entrypoints, middlewares, \
         observability, priority, rule, rulesyntax, service, tls); no router or service of this \
         container is created"
    );
}

#[test]
fn lenient_mode_ignores_unknown_key() {
    let options = AgentOptions {
        lenient: true,
        ..AgentOptions::default()
    };
    let parsed = parse_with(
        web()
            .label("traefik.http.routers.web.rule", "Host(`a.test`)")
            .label("traefik.http.routers.web.entrypoint", "websecure"),
        &options,
    );
    assert!(router(&parsed, "web").is_some());
    assert!(errors(&parsed).is_empty());
    assert!(warnings(&parsed)[0].contains("unknown key \"entrypoint\""));
}

#[test]
fn empty_key_segment_fails_container() {
    let parsed = parse(web().label("traefik.http.routers..rule", "Host(`a.test`)"));
    assert!(parsed.config.is_none());
    assert!(errors(&parsed)[0].contains("empty segment"));
}

#[test]
fn unknown_service_option_fails_container() {
    let parsed = parse(web().label("traefik.http.services.web.loadbalancer.server.prot", "80"));
    assert!(parsed.config.is_none());
    assert!(errors(&parsed)[0].contains("did you mean \"port\"?"));
}

#[test]
fn unknown_namespace_only_warns() {
    let parsed = parse(
        web()
            .label("traefik.enabled", "true")
            .label("traefik.frontend.rule", "Host:a.test"),
    );
    assert!(parsed.config.is_some());
    let warnings = warnings(&parsed);
    assert!(warnings[0].contains("did you mean traefik.enable?"));
    assert!(warnings[1].contains("Traefik v1 label"));
}

#[test]
fn single_quoted_rule_disables_router() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.bad.rule", "PathPrefix('/')")
            .label("traefik.http.routers.good.rule", "Host(`a.test`)"),
    );
    assert!(router(&parsed, "bad").is_none());
    assert!(router(&parsed, "good").is_some());
    assert!(service(&parsed, "web-shop").is_some());
    let errors = errors(&parsed);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("invalid rule \"PathPrefix('/')\""));
    assert!(errors[0].contains("router bad is disabled"));
}

#[test]
fn quoted_whole_rule_disables_router() {
    let parsed = parse(web().label("traefik.http.routers.r.rule", "'PathPrefix(`/`)'"));
    assert!(router(&parsed, "r").is_none());
    assert!(errors(&parsed)[0].contains("wrapped in quotes"));
}

#[test]
fn v2_and_unquoted_hosts_parse() {
    let parsed = parse(
        web()
            .label(
                "traefik.http.routers.v2.rule",
                "Host(`a.test`,`www.a.test`)",
            )
            .label("traefik.http.routers.bare.rule", "Host(b.test,www.b.test)")
            .label("traefik.http.services.app.loadbalancer.server.port", "80"),
    );
    let v2 = router(&parsed, "v2").map(|r| r.hosts.clone());
    assert_eq!(v2, Some(vec!["a.test".to_owned(), "www.a.test".to_owned()]));
    let bare = router(&parsed, "bare").map(|r| r.hosts.clone());
    assert_eq!(
        bare,
        Some(vec!["b.test".to_owned(), "www.b.test".to_owned()])
    );
}

#[test]
fn dollar_signs_stay_as_read() {
    let hash = "u:$apr1$H6uskkkW$IgXLP6ewTrSuBkTrqE8wj/";
    let parsed = parse(
        web()
            .label("traefik.http.middlewares.auth.basicauth.users", hash)
            .label("traefik.http.routers.web.rule", "Host(`a.test`)"),
    );
    let declared = parsed
        .config
        .as_ref()
        .and_then(|c| c.middlewares.get("auth"));
    let users = declared.and_then(|d| d.settings.get("basicauth.users"));
    assert_eq!(users.map(String::as_str), Some(hash));
}

#[test]
fn defaults_create_router_and_service() {
    let parsed = parse(web().ports(&[8080, 443]));
    let config = router(&parsed, "web-shop");
    assert_eq!(config.map(|r| r.rule.as_str()), Some("Host(`web-shop`)"));
    assert_eq!(config.map(|r| r.default_rule), Some(true));
    let server = service(&parsed, "web-shop").map(|s| s.server.url.as_str());
    assert_eq!(server, Some("http://172.18.0.2:443"));
    assert!(warnings(&parsed)[0].contains("gets the default rule Host(`web-shop`)"));
}

#[test]
fn default_name_uses_container_name() {
    let parsed = parse(Fixture::plain("my_blog", "172.17.0.2"));
    let config = parsed.config.as_ref();
    assert_eq!(config.map(|c| c.scope.as_str()), Some("my_blog"));
    assert!(router(&parsed, "my-blog").is_some());
}

#[test]
fn disabled_default_rule_is_an_error() {
    let options = AgentOptions {
        default_rule: DefaultRule::Disabled,
        ..AgentOptions::default()
    };
    let parsed = parse_with(web(), &options);
    assert!(router(&parsed, "web-shop").is_none());
    assert!(errors(&parsed)[0].contains("rule is missing"));
}

#[test]
fn router_binds_to_only_service() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.web.rule", "Host(`a.test`)")
            .label("traefik.http.services.app.loadbalancer.server.port", "3000"),
    );
    let bound = router(&parsed, "web").map(|r| r.service.name.as_str());
    assert_eq!(bound, Some("app"));
    let server = service(&parsed, "app").map(|s| s.server.url.as_str());
    assert_eq!(server, Some("http://172.18.0.2:3000"));
}

#[test]
fn router_without_service_among_several_fails() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.web.rule", "Host(`a.test`)")
            .label("traefik.http.routers.api.rule", "Host(`api.test`)")
            .label("traefik.http.routers.api.service", "api")
            .label("traefik.http.services.app.loadbalancer.server.port", "3000")
            .label("traefik.http.services.api.loadbalancer.server.port", "4000"),
    );
    assert!(router(&parsed, "web").is_none());
    assert!(router(&parsed, "api").is_some());
    assert!(errors(&parsed)[0].contains("declares 2 (api, app)"));
}

#[test]
fn several_services_without_router_warn() {
    let parsed = parse(
        web()
            .label("traefik.http.services.a.loadbalancer.server.port", "3000")
            .label("traefik.http.services.b.loadbalancer.server.port", "4000"),
    );
    let routers = parsed.config.as_ref().map(|c| c.routers.len());
    assert_eq!(routers, Some(0));
    assert!(warnings(&parsed)[0].contains("no router is created"));
}

#[test]
fn port_defaults_to_lowest_exposed() {
    let parsed = parse(web().ports(&[9090, 3000, 8080]));
    let addr = service(&parsed, "web-shop").map(|s| s.server.addr);
    assert_eq!(addr, "172.18.0.2:3000".parse::<SocketAddr>().ok());
}

#[test]
fn missing_port_skips_container() {
    let parsed = parse(web().ports(&[]));
    assert!(parsed.config.is_none());
    assert!(errors(&parsed)[0].contains(
        "port is missing: the container exposes no port; add the label \
         traefik.http.services.web-shop.loadbalancer.server.port=PORT"
    ));
}

#[test]
fn missing_network_skips_container() {
    let parsed = parse(web().without_networks());
    assert!(parsed.config.is_none());
    assert!(errors(&parsed)[0].contains("no network with an IP address"));
}

#[test]
fn network_label_picks_address() {
    let parsed = parse(
        web()
            .network("proxy", "10.9.0.7")
            .label(NETWORK_LABEL, "proxy"),
    );
    let url = service(&parsed, "web-shop").map(|s| s.server.url.as_str());
    assert_eq!(url, Some("http://10.9.0.7:80"));
}

#[test]
fn enable_false_skips_container() {
    let parsed = parse(web().label("traefik.enable", "false"));
    assert!(parsed.config.is_none());
    assert!(parsed.problems.is_empty());
}

#[test]
fn exposed_by_default_off_needs_enable() {
    let options = AgentOptions {
        exposed_by_default: false,
        ..AgentOptions::default()
    };
    assert!(parse_with(web(), &options).config.is_none());
    let enabled = parse_with(web().label("traefik.enable", "true"), &options);
    assert!(enabled.config.is_some());
}

#[test]
fn invalid_enable_value_skips_container() {
    let parsed = parse(web().label("traefik.enable", "yes"));
    assert!(parsed.config.is_none());
    assert!(errors(&parsed)[0].contains("invalid boolean"));
}

#[test]
fn tcp_only_container_has_no_http() {
    let parsed = parse(
        web()
            .label("traefik.tcp.routers.db.rule", "HostSNI(`*`)")
            .label("traefik.tcp.services.db.loadbalancer.server.port", "5432"),
    );
    let routers = parsed.config.as_ref().map(|c| c.routers.len());
    assert_eq!(routers, Some(0));
    let errors = errors(&parsed);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("TCP routers, services and middlewares are not supported"));
}

#[test]
fn tcp_labels_leave_http_routers() {
    let parsed = parse(
        web()
            .label("traefik.tcp.routers.db.rule", "HostSNI(`*`)")
            .label("traefik.http.routers.web.rule", "Host(`a.test`)"),
    );
    assert!(router(&parsed, "web").is_some());
}

#[test]
fn invalid_priority_disables_router() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.web.rule", "Host(`a.test`)")
            .label("traefik.http.routers.web.priority", "high")
            .label("traefik.http.routers.api.rule", "Host(`api.test`)")
            .label("traefik.http.routers.api.priority", "+10"),
    );
    assert!(router(&parsed, "web").is_none());
    assert_eq!(router(&parsed, "api").and_then(|r| r.priority), Some(10));
    assert!(errors(&parsed)[0].contains("invalid integer; write a base-10 number; router web"));
}

#[test]
fn unknown_entrypoint_disables_router() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.web.rule", "Host(`a.test`)")
            .label("traefik.http.routers.web.entrypoints", "web, https"),
    );
    assert!(router(&parsed, "web").is_none());
    assert!(errors(&parsed)[0].contains("unknown entry point https"));
}

#[test]
fn certresolver_enables_tls() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.web.rule", "Host(`a.test`)")
            .label("traefik.http.routers.web.tls.certresolver", "le"),
    );
    let tls = router(&parsed, "web").and_then(|r| r.tls.clone());
    assert_eq!(tls.and_then(|t| t.cert_resolver).as_deref(), Some("le"));
}

#[test]
fn tls_false_overrides_certresolver() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.web.rule", "Host(`a.test`)")
            .label("traefik.http.routers.web.tls", "false")
            .label("traefik.http.routers.web.tls.certresolver", "le"),
    );
    assert_eq!(router(&parsed, "web").map(|r| r.tls.is_none()), Some(true));
    assert!(warnings(&parsed)[0].contains("tls is off"));
}

#[test]
fn tls_domains_are_collected() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.web.rule", "Host(`a.test`)")
            .label("traefik.http.routers.web.tls.domains[0].main", "a.test")
            .label(
                "traefik.http.routers.web.tls.domains[0].sans",
                "www.a.test, b.test",
            ),
    );
    let domains = router(&parsed, "web")
        .and_then(|r| r.tls.clone())
        .map(|t| t.domains);
    let expected = TlsDomain {
        main: "a.test".to_owned(),
        sans: vec!["www.a.test".to_owned(), "b.test".to_owned()],
    };
    assert_eq!(domains, Some(vec![expected]));
}

#[test]
fn tls_domain_without_main_disables_router() {
    let parsed = parse(
        web()
            .label("traefik.http.routers.web.rule", "Host(`a.test`)")
            .label("traefik.http.routers.web.tls.domains[0].sans", "b.test"),
    );
    assert!(router(&parsed, "web").is_none());
    assert!(errors(&parsed)[0].contains("main domain is missing"));
}

#[test]
fn https_scheme_sets_url_and_probe() {
    let parsed = parse(web().label(
        "traefik.http.services.web.loadbalancer.server.scheme",
        "HTTPS",
    ));
    let config = service(&parsed, "web").expect("service created");
    assert_eq!(config.server.url, "https://172.18.0.2:80");
    assert_eq!(config.health.scheme, "https");
    assert_eq!(config.servers_transport, None);
    assert!(errors(&parsed).is_empty());
}

#[test]
fn https_server_url_accepted() {
    let parsed = parse(web().label(
        "traefik.http.services.web.loadbalancer.server.url",
        "https://172.18.0.9:8443/",
    ));
    let config = service(&parsed, "web").expect("service created");
    assert_eq!(config.server.url, "https://172.18.0.9:8443");
    assert_eq!(config.health.scheme, "https");
}

#[test]
fn unknown_scheme_disables_service() {
    let parsed = parse(web().label(
        "traefik.http.services.web.loadbalancer.server.scheme",
        "ftp",
    ));
    assert!(service(&parsed, "web").is_none());
    assert!(errors(&parsed)[0].contains("unknown scheme; use http, https or h2c"));
}

#[test]
fn servers_transport_label_names_file_transport() {
    let parsed = parse(
        web()
            .label(
                "traefik.http.services.web.loadbalancer.server.scheme",
                "https",
            )
            .label(
                "traefik.http.services.web.loadbalancer.serverstransport",
                "internal@file",
            ),
    );
    let config = service(&parsed, "web").expect("service created");
    assert_eq!(config.servers_transport.as_deref(), Some("internal"));
    assert!(errors(&parsed).is_empty());
    let warnings = warnings(&parsed);
    assert!(
        !warnings.iter().any(|w| w.contains("serverstransport")),
        "{warnings:?}"
    );
}

#[test]
fn servers_transport_needs_file_provider() {
    for value in ["internal", "internal@docker", "@file"] {
        let parsed = parse(web().label(
            "traefik.http.services.web.loadbalancer.serverstransport",
            value,
        ));
        assert!(service(&parsed, "web").is_none(), "{value} accepted");
        let errors = errors(&parsed);
        assert_eq!(errors.len(), 1, "{value}: {errors:?}");
        assert!(errors[0].contains("NAME@file"), "{value}: {}", errors[0]);
        assert!(
            errors[0].contains("service web is disabled"),
            "{}",
            errors[0]
        );
    }
}

#[test]
fn h2c_scheme_sets_url_and_probe() {
    let parsed = parse(web().label(
        "traefik.http.services.web.loadbalancer.server.scheme",
        "H2C",
    ));
    let config = service(&parsed, "web").expect("service created");
    assert_eq!(config.server.url, "h2c://172.18.0.2:80");
    assert_eq!(config.health.scheme, "h2c");
}

#[test]
fn health_scheme_label_overrides_server_scheme() {
    let parsed = parse(
        web()
            .label(
                "traefik.http.services.web.loadbalancer.server.scheme",
                "h2c",
            )
            .label(
                "traefik.http.services.web.loadbalancer.healthcheck.scheme",
                "http",
            ),
    );
    let config = service(&parsed, "web").expect("service created");
    assert_eq!(config.health.scheme, "http");
}

#[test]
fn h2c_server_url_accepted() {
    let parsed = parse(web().without_networks().ports(&[]).label(
        "traefik.http.services.web.loadbalancer.server.url",
        "h2c://10.0.0.9:50051",
    ));
    let server = service(&parsed, "web").map(|s| s.server.url.as_str());
    assert_eq!(server, Some("h2c://10.0.0.9:50051"));
}

#[test]
fn server_url_overrides_address() {
    let parsed = parse(web().without_networks().ports(&[]).label(
        "traefik.http.services.web.loadbalancer.server.url",
        "http://10.0.0.9:81/",
    ));
    let server = service(&parsed, "web").map(|s| s.server.url.as_str());
    assert_eq!(server, Some("http://10.0.0.9:81"));
}

#[test]
fn server_url_with_port_disables_service() {
    let parsed = parse(
        web()
            .label(
                "traefik.http.services.web.loadbalancer.server.url",
                "http://10.0.0.9:81",
            )
            .label("traefik.http.services.web.loadbalancer.server.port", "81"),
    );
    assert!(service(&parsed, "web").is_none());
    assert!(errors(&parsed)[0].contains("cannot be combined"));
}

#[test]
fn server_url_needs_ip_host() {
    let parsed = parse(web().label(
        "traefik.http.services.web.loadbalancer.server.url",
        "http://app:8080",
    ));
    assert!(service(&parsed, "web").is_none());
    assert!(errors(&parsed)[0].contains("the host must be an IP address"));
}

#[test]
fn health_labels_override_defaults() {
    let prefix = "traefik.http.services.web.loadbalancer.healthcheck";
    let parsed = parse(
        web()
            .label(&format!("{prefix}.path"), "/ready")
            .label(&format!("{prefix}.interval"), "10")
            .label(&format!("{prefix}.timeout"), "500ms")
            .label(&format!("{prefix}.port"), "9000")
            .label(&format!("{prefix}.hostname"), "shop.test")
            .label(&format!("{prefix}.status"), "204")
            .label(&format!("{prefix}.method"), "head")
            .label(&format!("{prefix}.headers.X-Probe"), "edge"),
    );
    let health = service(&parsed, "web").map(|s| s.health.clone());
    let expected = HealthSpec {
        path: "/ready".to_owned(),
        interval: Duration::from_secs(10),
        timeout: Duration::from_millis(500),
        port: Some(9000),
        hostname: Some("shop.test".to_owned()),
        expected_status: Some(204),
        headers: vec![("X-Probe".to_owned(), "edge".to_owned())],
        method: "HEAD".to_owned(),
        ..HealthSpec::default()
    };
    assert_eq!(health, Some(expected));
}

#[test]
fn health_defaults_follow_platform() {
    let parsed = parse(web());
    let health = service(&parsed, "web-shop").map(|s| s.health.clone());
    assert_eq!(health, Some(HealthSpec::default()));
    assert_eq!(HealthSpec::default().path, "/health");
}

#[test]
fn invalid_health_interval_disables_service() {
    let parsed = parse(web().label(
        "traefik.http.services.web.loadbalancer.healthcheck.interval",
        "soon",
    ));
    assert!(service(&parsed, "web").is_none());
    assert!(errors(&parsed)[0].contains("invalid duration"));
}

#[test]
fn strategy_and_passhostheader_decode() {
    let parsed = parse(
        web()
            .label("traefik.http.services.web.loadbalancer.strategy", "p2c")
            .label(
                "traefik.http.services.web.loadbalancer.passhostheader",
                "false",
            ),
    );
    let config = service(&parsed, "web");
    assert_eq!(config.map(|s| s.balance), Some(Balance::LeastInFlight));
    assert_eq!(config.map(|s| s.pass_host_header), Some(false));
}

#[test]
fn sticky_cookie_only_warns() {
    let parsed = parse(web().label(
        "traefik.http.services.web.loadbalancer.sticky.cookie.name",
        "srv",
    ));
    assert!(service(&parsed, "web").is_some());
    assert!(warnings(&parsed)[0].contains("sticky sessions are not supported yet"));
}

#[test]
fn buffering_limit_decodes() {
    let parsed = parse(web().label(
        "traefik.http.middlewares.limit.buffering.maxRequestBodyBytes",
        "1048576",
    ));
    let declared = parsed
        .config
        .as_ref()
        .and_then(|c| c.middlewares.get("limit"));
    let expected = MiddlewareConfig::Buffering {
        max_request_body_bytes: Some(1_048_576),
    };
    assert_eq!(declared.and_then(|d| d.config.clone()), Some(expected));
}

#[test]
fn buffering_response_limit_disables_middleware() {
    let parsed = parse(web().label(
        "traefik.http.middlewares.limit.buffering.maxresponsebodybytes",
        "10",
    ));
    let declared = parsed
        .config
        .as_ref()
        .and_then(|c| c.middlewares.get("limit"));
    assert_eq!(declared.map(|d| d.config.is_none()), Some(true));
}

#[test]
fn middleware_with_two_types_is_disabled() {
    let parsed = parse(
        web()
            .label(
                "traefik.http.middlewares.m.buffering.maxrequestbodybytes",
                "10",
            )
            .label("traefik.http.middlewares.m.stripprefix.prefixes", "/a"),
    );
    let declared = parsed.config.as_ref().and_then(|c| c.middlewares.get("m"));
    assert_eq!(declared.map(|d| d.config.is_none()), Some(true));
    assert!(errors(&parsed)[0].contains("declares several types (buffering, stripprefix)"));
}

#[test]
fn unknown_middleware_type_fails_container() {
    let parsed = parse(web().label("traefik.http.middlewares.m.redirect.scheme", "https"));
    assert!(parsed.config.is_none());
    assert!(errors(&parsed)[0].contains("unknown key \"redirect\""));
}

#[test]
fn stopping_container_keeps_lifecycle() {
    let parsed = parse(web().lifecycle(Lifecycle::Stopping));
    let lifecycle = service(&parsed, "web-shop").map(|s| s.server.lifecycle);
    assert_eq!(lifecycle, Some(Lifecycle::Stopping));
}
