//! Tests of building the desired state from many containers and the routes file.

use std::path::Path;

use edge_proto::file::{self, Format};

use super::*;
use crate::labels::tests::Fixture;

fn build_default(containers: &[ContainerInfo]) -> Desired {
    build(containers, None, &AgentOptions::default())
}

fn router<'a>(desired: &'a Desired, name: &str) -> Option<&'a Router> {
    desired.routers.iter().find(|router| router.name == name)
}

fn service<'a>(desired: &'a Desired, name: &str) -> Option<&'a DesiredService> {
    desired.services.iter().find(|service| service.name == name)
}

fn server_urls(desired: &Desired, name: &str) -> Vec<String> {
    service(desired, name)
        .map(|service| service.servers.iter().map(|s| s.url.clone()).collect())
        .unwrap_or_default()
}

fn error_texts(desired: &Desired) -> Vec<String> {
    desired.hard_errors().map(LabelError::to_string).collect()
}

fn file_routes(yaml: &str) -> Snapshot {
    match file::parse(yaml, Format::Yaml, Path::new("")) {
        Ok(snapshot) => snapshot,
        Err(errors) => panic!("invalid test routes file: {errors}"),
    }
}

/// Starts the container of the worked example in Traefik's label reference: project `shop`,
/// service `web`, port 8080, on networks `shop_default` and `proxy`.
fn worked_example() -> Fixture {
    Fixture::compose("shop", "web", 1, "172.18.0.2")
        .network("proxy", "10.9.0.4")
        .ports(&[8080])
        .label(
            "traefik.http.routers.web.rule",
            "Host(`shop.example.com`) && PathPrefix(`/`)",
        )
        .label("traefik.http.routers.web.entrypoints", "websecure")
        .label("traefik.http.routers.web.tls.certresolver", "le")
        .label("traefik.docker.network", "proxy")
}

#[test]
fn worked_example_builds_router() {
    let desired = build_default(&[worked_example().build()]);
    let expected = Router {
        name: "shop/web".to_owned(),
        rule: "Host(`shop.example.com`) && PathPrefix(`/`)".to_owned(),
        priority: None,
        entrypoints: vec!["websecure".to_owned()],
        service: "shop/web-shop".to_owned(),
        tls: true,
        max_request_body_bytes: None,
    };
    assert_eq!(router(&desired, "shop/web"), Some(&expected));
    assert_eq!(expected.effective_priority(), 43);
    assert_eq!(
        server_urls(&desired, "shop/web-shop"),
        vec!["http://10.9.0.4:8080"]
    );
    assert!(desired.errors.is_empty(), "{:?}", desired.errors);
}

#[test]
fn worked_example_middlewares_disable_router() {
    let container = worked_example()
        .label("traefik.http.routers.web.middlewares", "hsts,auth@file")
        .label(
            "traefik.http.middlewares.hsts.headers.stsseconds",
            "31536000",
        )
        .build();
    let desired = build_default(&[container]);
    assert!(router(&desired, "shop/web").is_none());
    assert!(service(&desired, "shop/web-shop").is_some());
    let errors = error_texts(&desired);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].contains(
        "middleware auth@file cannot be used: routers from labels cannot use middlewares of the \
         routes file yet"
    ));
    assert!(errors[1].contains(
        "middleware type headers is not supported yet (middleware hsts); only buffering is. \
         Router web is disabled"
    ));
    assert!(desired.certificates.is_empty());
}

#[test]
fn projects_keep_their_own_names() {
    let containers = [
        Fixture::compose("alpha", "site", 1, "172.18.0.2")
            .label("traefik.http.routers.app.rule", "Host(`alpha.test`)")
            .label("traefik.http.services.app.loadbalancer.server.port", "3000"),
        Fixture::compose("beta", "site", 1, "172.19.0.2")
            .label("traefik.http.routers.app.rule", "Host(`beta.test`)")
            .label("traefik.http.services.app.loadbalancer.server.port", "4000"),
    ]
    .map(Fixture::build);
    let desired = build_default(&containers);
    let alpha = router(&desired, "alpha/app").map(|r| r.service.as_str());
    assert_eq!(alpha, Some("alpha/app"));
    let beta = router(&desired, "beta/app").map(|r| r.service.as_str());
    assert_eq!(beta, Some("beta/app"));
    assert_eq!(
        server_urls(&desired, "alpha/app"),
        vec!["http://172.18.0.2:3000"]
    );
    assert_eq!(
        server_urls(&desired, "beta/app"),
        vec!["http://172.19.0.2:4000"]
    );
    assert!(desired.errors.is_empty(), "{:?}", desired.errors);
}

#[test]
fn replicas_merge_into_one_service() {
    let replica = |index, ip| {
        Fixture::compose("shop", "web", index, ip)
            .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
            .label("traefik.http.services.web.loadbalancer.server.port", "8080")
            .build()
    };
    let desired = build_default(&[replica(2, "172.18.0.3"), replica(1, "172.18.0.2")]);
    assert_eq!(desired.routers.len(), 1);
    assert_eq!(
        server_urls(&desired, "shop/web"),
        vec!["http://172.18.0.2:8080", "http://172.18.0.3:8080"]
    );
    let containers: Vec<&str> = service(&desired, "shop/web")
        .map(|s| {
            s.servers
                .iter()
                .map(|s| s.container_name.as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(containers, vec!["shop-web-1", "shop-web-2"]);
}

#[test]
fn scaled_default_services_merge() {
    let desired = build_default(&[
        Fixture::compose("shop", "web", 1, "172.18.0.2").build(),
        Fixture::compose("shop", "web", 2, "172.18.0.3").build(),
    ]);
    assert_eq!(server_urls(&desired, "shop/web-shop").len(), 2);
    assert!(router(&desired, "shop/web-shop").is_some());
}

#[test]
fn conflict_disables_only_that_router() {
    let containers = [
        Fixture::compose("shop", "api", 1, "172.18.0.2")
            .label("traefik.http.routers.app.rule", "Host(`api.shop.test`)")
            .label("traefik.http.routers.api.rule", "Host(`api2.shop.test`)")
            .label("traefik.http.routers.api.service", "api")
            .label("traefik.http.routers.app.service", "api")
            .label("traefik.http.services.api.loadbalancer.server.port", "3000"),
        Fixture::compose("shop", "web", 1, "172.18.0.3")
            .label("traefik.http.routers.app.rule", "Host(`shop.test`)")
            .label("traefik.http.routers.app.service", "api"),
    ]
    .map(Fixture::build);
    let desired = build_default(&containers);
    assert!(router(&desired, "shop/app").is_none());
    assert!(router(&desired, "shop/api").is_some());

    let conflicts: Vec<&LabelError> = desired
        .errors
        .iter()
        .filter(|error| error.message.starts_with("conflicts with"))
        .collect();
    assert_eq!(conflicts.len(), 2, "{:#?}", desired.errors);
    assert_eq!(
        conflicts[0].to_string(),
        "container shop-api-1: label traefik.http.routers.app.rule=\"Host(`api.shop.test`)\": \
         conflicts with container shop-web-1, where it is \"Host(`shop.test`)\": router app of \
         project shop is disabled because its definitions differ"
    );
    assert_eq!(
        conflicts[1].to_string(),
        "container shop-web-1: label traefik.http.routers.app.rule=\"Host(`shop.test`)\": \
         conflicts with container shop-api-1, where it is \"Host(`api.shop.test`)\": router app \
         of project shop is disabled because its definitions differ"
    );
}

#[test]
fn service_conflict_ignores_server_port() {
    let containers = [
        Fixture::compose("shop", "a", 1, "172.18.0.2")
            .label("traefik.http.services.app.loadbalancer.server.port", "3000"),
        Fixture::compose("shop", "b", 1, "172.18.0.3")
            .label("traefik.http.services.app.loadbalancer.server.port", "4000"),
    ]
    .map(Fixture::build);
    let desired = build_default(&containers);
    assert_eq!(
        server_urls(&desired, "shop/app"),
        vec!["http://172.18.0.2:3000", "http://172.18.0.3:4000"]
    );
}

#[test]
fn service_conflict_disables_service() {
    let containers = [
        Fixture::compose("shop", "a", 1, "172.18.0.2")
            .label("traefik.http.routers.a.rule", "Host(`a.test`)")
            .label(
                "traefik.http.services.app.loadbalancer.healthcheck.path",
                "/a",
            ),
        Fixture::compose("shop", "b", 1, "172.18.0.3")
            .label("traefik.http.routers.b.rule", "Host(`b.test`)")
            .label(
                "traefik.http.services.app.loadbalancer.healthcheck.path",
                "/b",
            ),
    ]
    .map(Fixture::build);
    let desired = build_default(&containers);
    assert!(service(&desired, "shop/app").is_none());
    assert!(desired.routers.is_empty());
    let errors = error_texts(&desired);
    let conflict_key = "label traefik.http.services.app.loadbalancer.healthcheck.path";
    assert!(
        errors.iter().any(|e| e.contains(conflict_key)),
        "{errors:#?}"
    );
    assert!(errors
        .iter()
        .any(|e| e.contains("service app is disabled by its own errors")));
}

#[test]
fn multi_host_rules_are_served() {
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label(
            "traefik.http.routers.v2.rule",
            "Host(`a.test`,`www.a.test`)",
        )
        .label("traefik.http.routers.v2.tls.certresolver", "le")
        .label("traefik.http.routers.bare.rule", "Host(b.test,www.b.test)")
        .label("traefik.http.routers.bare.tls.certresolver", "le")
        .build();
    let desired = build_default(&[container]);
    assert!(router(&desired, "shop/v2").is_some());
    assert!(router(&desired, "shop/bare").is_some());
    let names: Vec<Vec<String>> = desired
        .certificates
        .iter()
        .map(|c| c.names.clone())
        .collect();
    assert_eq!(
        names,
        vec![
            vec!["a.test".to_owned(), "www.a.test".to_owned()],
            vec!["b.test".to_owned(), "www.b.test".to_owned()],
        ]
    );
}

#[test]
fn misspelled_key_fails_only_its_container() {
    let containers = [
        Fixture::compose("shop", "web", 1, "172.18.0.2")
            .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
            .label("traefik.http.routers.web.entrypoint", "websecure"),
        Fixture::compose("blog", "web", 1, "172.19.0.2")
            .label("traefik.http.routers.web.rule", "Host(`blog.test`)"),
    ]
    .map(Fixture::build);
    let desired = build_default(&containers);
    assert!(router(&desired, "shop/web").is_none());
    assert!(service(&desired, "shop/web-shop").is_none());
    assert!(router(&desired, "blog/web").is_some());
    let errors: Vec<&LabelError> = desired.hard_errors().collect();
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].key.as_deref(),
        Some("traefik.http.routers.web.entrypoint")
    );
}

#[test]
fn bad_rule_leaves_sibling_router() {
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label("traefik.http.routers.r.rule", "'PathPrefix(`/`)'")
        .label("traefik.http.routers.ok.rule", "Host(`shop.test`)")
        .build();
    let desired = build_default(&[container]);
    assert!(router(&desired, "shop/r").is_none());
    assert!(router(&desired, "shop/ok").is_some());
    assert!(error_texts(&desired)[0].contains("invalid rule \"'PathPrefix(`/`)'\""));
}

#[test]
fn unsupported_middleware_disables_router() {
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
        .label("traefik.http.routers.web.middlewares", "strip")
        .label("traefik.http.routers.plain.rule", "Host(`plain.test`)")
        .label(
            "traefik.http.middlewares.strip.stripprefix.prefixes",
            "/api",
        )
        .build();
    let desired = build_default(&[container]);
    assert!(router(&desired, "shop/web").is_none());
    assert!(router(&desired, "shop/plain").is_some());
    let errors = error_texts(&desired);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("middleware type stripprefix is not supported yet"));
}

#[test]
fn unused_unsupported_middleware_is_reported() {
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
        .label(
            "traefik.http.middlewares.hsts.headers.stsseconds",
            "31536000",
        )
        .build();
    let desired = build_default(&[container]);
    assert!(router(&desired, "shop/web").is_some());
    let errors: Vec<&LabelError> = desired.hard_errors().collect();
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].key.as_deref(),
        Some("traefik.http.middlewares.hsts.headers")
    );
    assert!(errors[0].message.contains("No router uses middleware hsts"));
}

#[test]
fn missing_middleware_disables_router() {
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
        .label("traefik.http.routers.web.middlewares", "nothere")
        .build();
    let desired = build_default(&[container]);
    assert!(router(&desired, "shop/web").is_none());
    assert!(error_texts(&desired)[0].contains("middleware nothere not found"));
}

#[test]
fn buffering_limit_takes_chain_minimum() {
    let containers = [
        Fixture::compose("shop", "web", 1, "172.18.0.2")
            .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
            .label(
                "traefik.http.routers.web.middlewares",
                "big, small@docker, unlimited",
            )
            .label(
                "traefik.http.middlewares.big.buffering.maxrequestbodybytes",
                "10000000",
            ),
        Fixture::compose("shop", "limits", 1, "172.18.0.3")
            .label("traefik.enable", "true")
            .label("traefik.http.routers.limits.rule", "Host(`limits.test`)")
            .label(
                "traefik.http.middlewares.small.buffering.maxrequestbodybytes",
                "2048",
            )
            .label(
                "traefik.http.middlewares.unlimited.buffering.maxrequestbodybytes",
                "0",
            ),
    ]
    .map(Fixture::build);
    let desired = build_default(&containers);
    let limit = router(&desired, "shop/web").and_then(|r| r.max_request_body_bytes);
    assert_eq!(limit, Some(2048));
    assert!(desired.errors.is_empty(), "{:?}", desired.errors);
}

#[test]
fn certificates_list_only_declared_names() {
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label(
            "traefik.http.routers.main.rule",
            "Host(`Shop.test`) || Host(`www.shop.test`)",
        )
        .label("traefik.http.routers.main.tls.certresolver", "le")
        .label("traefik.http.routers.api.rule", "Host(`api.shop.test`)")
        .label("traefik.http.routers.api.tls.certresolver", "le")
        .label("traefik.http.routers.api.tls.domains[0].main", "shop.test")
        .label(
            "traefik.http.routers.api.tls.domains[0].sans",
            "api.shop.test",
        )
        .label("traefik.http.routers.own.rule", "Host(`own.shop.test`)")
        .label("traefik.http.routers.own.tls", "true")
        .label(
            "traefik.http.routers.broken.rule",
            "Host(`broken.shop.test`",
        )
        .label("traefik.http.routers.broken.tls.certresolver", "le")
        .build();
    let desired = build_default(&[container]);
    let expected = vec![
        CertificateRequest {
            resolver: "le".to_owned(),
            names: vec!["shop.test".to_owned(), "api.shop.test".to_owned()],
            routers: vec!["shop/api".to_owned()],
        },
        CertificateRequest {
            resolver: "le".to_owned(),
            names: vec!["shop.test".to_owned(), "www.shop.test".to_owned()],
            routers: vec!["shop/main".to_owned()],
        },
    ];
    assert_eq!(desired.certificates, expected);
}

#[test]
fn same_names_share_one_request() {
    let router_labels = |fixture: Fixture, name: &str| {
        fixture
            .label(
                &format!("traefik.http.routers.{name}.rule"),
                "Host(`shop.test`)",
            )
            .label(
                &format!("traefik.http.routers.{name}.tls.certresolver"),
                "le",
            )
            .build()
    };
    let desired = build_default(&[
        router_labels(Fixture::compose("shop", "a", 1, "172.18.0.2"), "a"),
        router_labels(Fixture::compose("shop", "b", 1, "172.18.0.3"), "b"),
    ]);
    assert_eq!(desired.certificates.len(), 1);
    assert_eq!(
        desired.certificates[0].routers,
        vec!["shop/a".to_owned(), "shop/b".to_owned()]
    );
}

#[test]
fn file_routes_are_included() {
    let routes = file_routes(
        "http:\n  routers:\n    legacy:\n      rule: Host(`legacy.test`)\n      service: legacy\n  \
         services:\n    legacy:\n      loadBalancer:\n        servers:\n          - url: \
         http://backend.internal:8080\n",
    );
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
        .label("traefik.http.routers.web.service", "legacy@file")
        .build();
    let desired = build(&[container], Some(&routes), &AgentOptions::default());
    let web = router(&desired, "shop/web").map(|r| r.service.as_str());
    assert_eq!(web, Some("legacy"));
    assert!(router(&desired, "legacy").is_some());
    let legacy = service(&desired, "legacy");
    assert_eq!(legacy.map(|s| s.source), Some(ServiceSource::File));
    let server = legacy.and_then(|s| s.servers.first());
    assert_eq!(server.map(|s| s.container_id.as_str()), Some(""));
    assert_eq!(server.map(|s| s.addr.port()), Some(8080));
}

#[test]
fn missing_file_service_disables_router() {
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
        .label("traefik.http.routers.web.service", "legacy@file")
        .build();
    let desired = build_default(&[container]);
    assert!(router(&desired, "shop/web").is_none());
    assert!(error_texts(&desired)[0].contains("service legacy@file not found in the routes file"));
}

#[test]
fn docker_reference_stays_in_project() {
    let containers = [
        Fixture::compose("alpha", "api", 1, "172.18.0.2")
            .label("traefik.http.services.api.loadbalancer.server.port", "3000"),
        Fixture::compose("beta", "web", 1, "172.19.0.2")
            .label("traefik.http.routers.web.rule", "Host(`beta.test`)")
            .label("traefik.http.routers.web.service", "api@docker"),
    ]
    .map(Fixture::build);
    let desired = build_default(&containers);
    assert!(router(&desired, "beta/web").is_none());
    assert!(error_texts(&desired)
        .iter()
        .any(|e| e.contains("service api@docker not found: no container of project beta")));
}

#[test]
fn foreign_provider_disables_router() {
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
        .label("traefik.http.routers.web.service", "api@internal")
        .build();
    let desired = build_default(&[container]);
    assert!(router(&desired, "shop/web").is_none());
    assert!(error_texts(&desired)[0].contains("provider internal is not supported"));
}

#[test]
fn file_name_clash_disables_docker_router() {
    let routes = file_routes(
        "http:\n  routers:\n    shop/web:\n      rule: Host(`x.test`)\n      service: s\n  \
         services:\n    s:\n      loadBalancer:\n        servers:\n          - url: \
         http://10.0.0.1:80\n",
    );
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
        .build();
    let desired = build(&[container], Some(&routes), &AgentOptions::default());
    let names: Vec<&str> = desired.routers.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["shop/web"]);
    assert_eq!(desired.routers[0].rule, "Host(`x.test`)");
    assert!(error_texts(&desired)[0].contains("the routes file also declares a router"));
}

#[test]
fn enable_flags_select_containers() {
    let options = AgentOptions {
        exposed_by_default: false,
        ..AgentOptions::default()
    };
    let containers = [
        Fixture::compose("shop", "web", 1, "172.18.0.2").label("traefik.enable", "true"),
        Fixture::compose("shop", "db", 1, "172.18.0.3"),
    ]
    .map(Fixture::build);
    let desired = build(&containers, None, &options);
    let names: Vec<&str> = desired.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["shop/web-shop"]);

    let disabled = Fixture::compose("shop", "db", 1, "172.18.0.3")
        .label("traefik.enable", "false")
        .build();
    assert!(build_default(&[disabled]).services.is_empty());
}

#[test]
fn default_network_option_is_preferred() {
    let options = AgentOptions {
        default_network: Some("edge".to_owned()),
        ..AgentOptions::default()
    };
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .network("edge", "10.50.0.9")
        .build();
    let desired = build(&[container], None, &options);
    assert_eq!(
        server_urls(&desired, "shop/web-shop"),
        vec!["http://10.50.0.9:80"]
    );
}

#[test]
fn stopping_replica_keeps_server() {
    let desired = build_default(&[
        Fixture::compose("shop", "web", 1, "172.18.0.2")
            .lifecycle(Lifecycle::Stopping)
            .build(),
        Fixture::compose("shop", "web", 2, "172.18.0.3").build(),
    ]);
    let lifecycles: Vec<Lifecycle> = service(&desired, "shop/web-shop")
        .map(|s| s.servers.iter().map(|server| server.lifecycle).collect())
        .unwrap_or_default();
    assert_eq!(lifecycles, vec![Lifecycle::Stopping, Lifecycle::Running]);
}

#[test]
fn output_ignores_input_order() {
    let containers = [
        Fixture::compose("b", "web", 1, "172.19.0.2"),
        Fixture::compose("a", "web", 2, "172.18.0.3"),
        Fixture::compose("a", "web", 1, "172.18.0.2")
            .label("traefik.http.routers.x.rule", "Host(`x.test`)"),
    ]
    .map(Fixture::build);
    let mut reversed = containers.clone();
    reversed.reverse();
    assert_eq!(build_default(&containers), build_default(&reversed));
}

#[test]
fn snapshot_passes_validation() {
    let routes = file_routes(
        "http:\n  routers:\n    legacy:\n      rule: Host(`legacy.test`)\n      service: legacy\n  \
         services:\n    legacy:\n      loadBalancer:\n        servers:\n          - url: \
         http://10.0.0.1:8080\n",
    );
    let containers = [
        worked_example(),
        Fixture::compose("shop", "web", 2, "172.18.0.3").network("proxy", "10.9.0.5"),
        Fixture::compose("blog", "app", 1, "172.19.0.2")
            .network("proxy", "fd00::5")
            .label("traefik.docker.network", "proxy")
            .label("traefik.http.routers.app.rule", "Host(`blog.test`)")
            .label("traefik.http.routers.app.middlewares", "limit")
            .label("traefik.http.routers.app.priority", "-5")
            .label(
                "traefik.http.middlewares.limit.buffering.maxrequestbodybytes",
                "100",
            )
            .label("traefik.http.routers.legacy.rule", "Host(`old.blog.test`)")
            .label("traefik.http.routers.legacy.service", "legacy@file")
            .label("traefik.http.routers.bad.rule", "Host(`bad.test`")
            .label("traefik.http.routers.bad.service", "app"),
    ]
    .map(Fixture::build);
    let desired = build(&containers, Some(&routes), &AgentOptions::default());
    let snapshot = desired.to_snapshot(7, |_| ServerState::Up);
    assert_eq!(snapshot.version, 7);
    assert_eq!(snapshot.routers.len(), 5);
    assert_eq!(
        server_urls(&desired, "blog/app-blog"),
        vec!["http://[fd00::5]:80"]
    );
    let validation = file::validate(&snapshot).map_err(|errors| errors.to_string());
    assert_eq!(validation, Ok(()));
}

#[test]
fn snapshot_takes_server_states() {
    let desired = build_default(&[
        Fixture::compose("shop", "web", 1, "172.18.0.2")
            .lifecycle(Lifecycle::Stopping)
            .build(),
        Fixture::compose("shop", "web", 2, "172.18.0.3").build(),
    ]);
    let snapshot = desired.to_snapshot(1, |server| match server.lifecycle {
        Lifecycle::Stopping => ServerState::Draining,
        Lifecycle::Running => ServerState::Up,
    });
    let states: Vec<ServerState> = snapshot.services[0]
        .servers
        .iter()
        .map(|server| server.state)
        .collect();
    assert_eq!(states, vec![ServerState::Draining, ServerState::Up]);
}

#[test]
fn file_routers_request_certificates() {
    let yaml = r#"
http:
  routers:
    shop:
      rule: "Host(`Shop.test`) || Host(`www.shop.test`)"
      service: app
      tls:
        certResolver: le
    docs:
      rule: "Host(`docs.test`)"
      service: app
      tls:
        certResolver: le
        domains:
          - main: docs.test
            sans: [api.docs.test]
    plain:
      rule: "Host(`plain.test`)"
      service: app
      tls: {}
  services:
    app:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:9"
"#;
    let routes = match file::parse_routes(yaml, Format::Yaml, Path::new("")) {
        Ok(routes) => routes,
        Err(errors) => panic!("invalid test routes file: {errors}"),
    };
    let requests = file_certificate_requests(&routes);
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].names, ["docs.test", "api.docs.test"]);
    assert_eq!(requests[0].routers, ["docs"]);
    assert_eq!(requests[1].names, ["shop.test", "www.shop.test"]);
    assert_eq!(requests[1].resolver, "le");

    // A label router asking for the same names shares the certificate.
    let mut merged = vec![CertificateRequest {
        resolver: "le".into(),
        names: vec!["shop.test".into(), "www.shop.test".into()],
        routers: vec!["site/web".into()],
    }];
    merge_certificate_requests(&mut merged, &requests);
    assert_eq!(merged.len(), 2);
    let shop = merged.iter().find(|r| r.names[0] == "shop.test").unwrap();
    assert_eq!(shop.routers, ["shop", "site/web"]);
}

#[test]
fn label_service_uses_file_transport() {
    let dir = std::env::temp_dir().join(format!("edge-agent-transport-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let routes = file::parse(
        "http:\n  serversTransports:\n    internal:\n      serverName: api.internal\n      insecureSkipVerify: true\n",
        Format::Yaml,
        &dir,
    )
    .unwrap();
    let container = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label(
            "traefik.http.services.web.loadbalancer.server.scheme",
            "https",
        )
        .label(
            "traefik.http.services.web.loadbalancer.serverstransport",
            "internal@file",
        )
        .build();
    let desired = build(&[container], Some(&routes), &AgentOptions::default());
    assert!(
        error_texts(&desired).is_empty(),
        "{:?}",
        error_texts(&desired)
    );
    let web = service(&desired, "shop/web").expect("service built");
    assert_eq!(web.servers_transport.as_deref(), Some("internal"));
    let transport = web.health.transport.as_ref().expect("probe transport");
    assert_eq!(transport.server_name.as_deref(), Some("api.internal"));
    assert!(transport.insecure_skip_verify);

    let snapshot = desired.to_snapshot(7, |_| ServerState::Up);
    assert_eq!(snapshot.servers_transports, routes.servers_transports);
    let web = snapshot
        .services
        .iter()
        .find(|s| s.name == "shop/web")
        .unwrap();
    assert_eq!(web.servers_transport.as_deref(), Some("internal"));
    assert!(edge_proto::file::validate(&snapshot).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_transport_disables_only_its_service() {
    let web = Fixture::compose("shop", "web", 1, "172.18.0.2")
        .label("traefik.http.routers.web.rule", "Host(`shop.test`)")
        .label(
            "traefik.http.services.web.loadbalancer.server.scheme",
            "https",
        )
        .label(
            "traefik.http.services.web.loadbalancer.serverstransport",
            "missing@file",
        )
        .build();
    let blog = Fixture::compose("blog", "app", 1, "172.18.0.3")
        .label("traefik.http.routers.app.rule", "Host(`blog.test`)")
        .build();
    let desired = build(&[web, blog], None, &AgentOptions::default());
    assert!(service(&desired, "shop/web").is_none());
    assert!(router(&desired, "shop/web").is_none());
    assert!(service(&desired, "blog/app-blog").is_some());
    assert!(router(&desired, "blog/app").is_some());
    let errors = error_texts(&desired);
    assert!(
        errors.iter().any(|e| e.contains(
            "servers transport missing@file not found in the routes file; define it under \
             http.serversTransports. Service web is disabled"
        )),
        "{errors:?}"
    );
}
