//! The per-container checks of one router: the default rule and service, the rule's syntax,
//! entry points, priority and TLS settings.

use std::collections::BTreeMap;

use edge_proto::file::MAX_USER_PRIORITY;
use edge_proto::{rule, ENTRYPOINT_WEB, ENTRYPOINT_WEBSECURE};

use super::decode::{Entity, RouterLabels};
use super::value::SectionSwitch;
use super::{capitalized, Declared, LabelError, Reference, RouterConfig, RouterTls, TlsDomain};
use crate::desired::{AgentOptions, DefaultRule};
use crate::model::ContainerInfo;

/// The per-container checks of one router.
pub(super) struct RouterCheck<'a> {
    pub container: &'a ContainerInfo,
    pub options: &'a AgentOptions,
    /// The container's default service name, which the default rule uses.
    pub default_name: &'a str,
    /// Names of the container's services, for binding a router that names none.
    pub service_names: &'a [&'a str],
    pub entity: &'a Entity<RouterLabels>,
}

impl RouterCheck<'_> {
    /// Applies the default rule and service, then checks the rule, entry points, priority and
    /// TLS domains. Every problem disables the router and is reported.
    pub fn check(&self, problems: &mut Vec<LabelError>) -> Declared<RouterConfig> {
        let mut settings = self.entity.settings.clone();
        let config = self.configure(&mut settings, problems);
        Declared {
            name: self.entity.name.clone(),
            settings,
            config: config.filter(|_| !self.entity.invalid),
        }
    }

    fn configure(
        &self,
        settings: &mut BTreeMap<String, String>,
        problems: &mut Vec<LabelError>,
    ) -> Option<RouterConfig> {
        let labels = &self.entity.labels;
        let mut valid = true;

        let explicit_rule = labels
            .rule
            .as_deref()
            .filter(|rule| !rule.trim().is_empty());
        let (rule, default_rule) = match explicit_rule {
            Some(rule) => (rule.to_owned(), false),
            None => match self.default_rule(problems) {
                Some(rule) => {
                    settings.insert("rule".to_owned(), format!("{rule} (default rule)"));
                    (rule, true)
                }
                None => (String::new(), true),
            },
        };
        let mut hosts = Vec::new();
        if !rule.is_empty() {
            match rule::parse(&rule) {
                Ok(expr) => hosts = expr.hosts(),
                Err(error) => {
                    let source = if default_rule {
                        " (the default rule)"
                    } else {
                        ""
                    };
                    let message = format!("{error}{source}; {}", self.disabled());
                    problems.push(self.error("rule", Some(rule.clone()), message));
                    valid = false;
                }
            }
        } else {
            valid = false;
        }

        let service = self.service(settings, problems);
        valid &= service.is_some();
        valid &= self.check_entrypoints(problems);
        valid &= self.check_priority(problems);
        let tls = self.tls(problems, &mut valid);

        let middlewares = labels
            .middlewares
            .iter()
            .map(|reference| Reference::parse(reference))
            .collect();
        if !valid {
            return None;
        }
        Some(RouterConfig {
            rule,
            default_rule,
            priority: labels.priority,
            entrypoints: labels.entrypoints.clone().unwrap_or_default(),
            service: service?,
            middlewares,
            tls,
            hosts,
        })
    }

    /// Renders the default rule, with a warning that shows it, or reports that the rule is
    /// missing.
    fn default_rule(&self, problems: &mut Vec<LabelError>) -> Option<String> {
        let rendered = match &self.options.default_rule {
            DefaultRule::Template(template) => template.replace("{name}", self.default_name),
            DefaultRule::Disabled => String::new(),
        };
        if rendered.trim().is_empty() {
            let message = format!(
                "rule is missing and there is no default rule; add the label \
                 traefik.http.routers.{}.rule. {}",
                self.entity.name,
                capitalized(&self.disabled())
            );
            problems.push(self.error("rule", None, message));
            return None;
        }
        let message = format!(
            "router {} has no rule, so it gets the default rule {rendered}; add a rule label \
             with the real host name",
            self.entity.name
        );
        let key = format!("traefik.http.routers.{}.rule", self.entity.name);
        problems.push(LabelError::warning(
            self.container,
            Some(&key),
            None,
            message,
        ));
        Some(rendered)
    }

    /// Returns the router's service: the `service` label, else the container's only service.
    fn service(
        &self,
        settings: &mut BTreeMap<String, String>,
        problems: &mut Vec<LabelError>,
    ) -> Option<Reference> {
        if let Some(written) = self.entity.labels.service.as_deref() {
            let reference = Reference::parse(written);
            if reference.name.is_empty() {
                let message = format!("empty service name; {}", self.disabled());
                problems.push(self.error("service", Some(written.to_owned()), message));
                return None;
            }
            return Some(reference);
        }
        match self.service_names {
            [only] => {
                let note = format!("{only} (default: the container's only service)");
                settings.insert("service".to_owned(), note);
                Some(Reference::parse(only))
            }
            names => {
                let message = format!(
                    "the router names no service and the container declares {} ({}); add the \
                     label traefik.http.routers.{}.service. {}",
                    names.len(),
                    names.join(", "),
                    self.entity.name,
                    capitalized(&self.disabled())
                );
                problems.push(self.error("service", None, message));
                None
            }
        }
    }

    fn check_entrypoints(&self, problems: &mut Vec<LabelError>) -> bool {
        let entrypoints = self
            .entity
            .labels
            .entrypoints
            .as_deref()
            .unwrap_or_default();
        let unknown: Vec<&str> = entrypoints
            .iter()
            .map(String::as_str)
            .filter(|name| *name != ENTRYPOINT_WEB && *name != ENTRYPOINT_WEBSECURE)
            .collect();
        if unknown.is_empty() {
            return true;
        }
        let value = self.entity.settings.get("entrypoints").cloned();
        let message = format!(
            "unknown entry point {}; valid entry points are {ENTRYPOINT_WEB} and \
             {ENTRYPOINT_WEBSECURE}. {}",
            unknown.join(", "),
            capitalized(&self.disabled())
        );
        problems.push(self.error("entrypoints", value, message));
        false
    }

    fn check_priority(&self, problems: &mut Vec<LabelError>) -> bool {
        match self.entity.labels.priority {
            Some(priority) if priority > MAX_USER_PRIORITY => {
                let message = format!(
                    "priority is above the maximum of {MAX_USER_PRIORITY}, which is reserved for \
                     internal routers; {}",
                    self.disabled()
                );
                problems.push(self.error("priority", Some(priority.to_string()), message));
                false
            }
            _ => true,
        }
    }

    /// Returns the TLS settings when TLS is enabled: by the bare `tls` key, or by any option
    /// below it. Clears `valid` when a domain has no main name.
    fn tls(&self, problems: &mut Vec<LabelError>, valid: &mut bool) -> Option<RouterTls> {
        let labels = &self.entity.labels;
        let has_options = labels.cert_resolver.is_some()
            || labels.tls_options.is_some()
            || !labels.domains.is_empty();
        let enabled = match labels.tls_switch {
            Some(switch) => switch == SectionSwitch::Enabled,
            None => has_options,
        };
        if !enabled {
            if has_options {
                let message = format!(
                    "tls is off for router {}, so its tls.* options have no effect",
                    self.entity.name
                );
                let value = self.entity.settings.get("tls").cloned();
                problems.push(self.warning("tls", value, message));
            }
            return None;
        }

        let mut domains = Vec::new();
        for (index, domain) in &labels.domains {
            match &domain.main {
                Some(main) => domains.push(TlsDomain {
                    main: main.clone(),
                    sans: domain.sans.clone(),
                }),
                None => {
                    let message = format!("main domain is missing; {}", self.disabled());
                    let option = format!("tls.domains[{index}].main");
                    problems.push(self.error(&option, None, message));
                    *valid = false;
                }
            }
        }
        if let Some(options) = labels.tls_options.as_deref() {
            if options != "default" && options != "default@file" {
                let message = "TLS options are not supported; the edge applies its own TLS policy";
                let value = Some(options.to_owned());
                problems.push(self.warning("tls.options", value, message.to_owned()));
            }
        }
        Some(RouterTls {
            cert_resolver: labels.cert_resolver.clone(),
            domains,
            options: labels.tls_options.clone(),
        })
    }

    fn disabled(&self) -> String {
        format!("router {} is disabled", self.entity.name)
    }

    fn error(&self, option: &str, value: Option<String>, message: String) -> LabelError {
        let key = format!("traefik.http.routers.{}.{option}", self.entity.name);
        LabelError::error(self.container, Some(&key), value, message)
    }

    fn warning(&self, option: &str, value: Option<String>, message: String) -> LabelError {
        let key = format!("traefik.http.routers.{}.{option}", self.entity.name);
        LabelError::warning(self.container, Some(&key), value, message)
    }
}
