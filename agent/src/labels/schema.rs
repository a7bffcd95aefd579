//! The key grammar of Traefik's HTTP labels: which options exist below a router, a service
//! and a middleware, and how a key's segments walk that tree.
//!
//! Option names match case-insensitively. A segment `name[n]` indexes a list of sections, as
//! in `tls.domains[0].main`. The option lists follow Traefik v3's label reference
//! (`docs/content/reference/dynamic-configuration/docker-labels.yml`).

use std::fmt;

/// One option below a section.
pub(crate) struct Field {
    /// Lower-case name, as it appears in a key.
    pub name: &'static str,
    pub node: Node,
}

/// The target of a key segment in the grammar.
pub(crate) enum Node {
    /// A value.
    Leaf,
    /// Options below this key. With `switch`, the key alone enables or disables the section,
    /// as Traefik's "allowEmpty" sections do (router `tls`, `healthcheck`, `sticky`).
    Section {
        fields: &'static [Field],
        switch: bool,
    },
    /// A list of sections, written `name[n]`.
    List(&'static [Field]),
    /// A map: the next segment is a key kept as written, such as a header name.
    Map,
    /// A middleware type that the edge does not implement: its options are not checked.
    Unchecked,
}

const fn leaf(name: &'static str) -> Field {
    Field {
        name,
        node: Node::Leaf,
    }
}

const fn section(name: &'static str, fields: &'static [Field]) -> Field {
    Field {
        name,
        node: Node::Section {
            fields,
            switch: false,
        },
    }
}

const fn switched_section(name: &'static str, fields: &'static [Field]) -> Field {
    Field {
        name,
        node: Node::Section {
            fields,
            switch: true,
        },
    }
}

const fn unchecked(name: &'static str) -> Field {
    Field {
        name,
        node: Node::Unchecked,
    }
}

/// Options of `traefik.http.routers.NAME`.
pub(crate) const ROUTER: &[Field] = &[
    leaf("entrypoints"),
    leaf("middlewares"),
    section("observability", OBSERVABILITY),
    leaf("priority"),
    leaf("rule"),
    leaf("rulesyntax"),
    leaf("service"),
    switched_section("tls", ROUTER_TLS),
];

const OBSERVABILITY: &[Field] = &[
    leaf("accesslogs"),
    leaf("metrics"),
    leaf("traceverbosity"),
    leaf("tracing"),
];

const ROUTER_TLS: &[Field] = &[
    leaf("certresolver"),
    Field {
        name: "domains",
        node: Node::List(TLS_DOMAIN),
    },
    leaf("options"),
];

const TLS_DOMAIN: &[Field] = &[leaf("main"), leaf("sans")];

/// Options of `traefik.http.services.NAME`.
pub(crate) const SERVICE: &[Field] = &[section("loadbalancer", LOAD_BALANCER)];

const LOAD_BALANCER: &[Field] = &[
    switched_section("healthcheck", HEALTH_CHECK),
    leaf("passhostheader"),
    section("passivehealthcheck", PASSIVE_HEALTH_CHECK),
    section("responseforwarding", RESPONSE_FORWARDING),
    section("server", SERVER),
    leaf("serverstransport"),
    switched_section("sticky", STICKY),
    leaf("strategy"),
];

const HEALTH_CHECK: &[Field] = &[
    leaf("followredirects"),
    Field {
        name: "headers",
        node: Node::Map,
    },
    leaf("hostname"),
    leaf("interval"),
    leaf("method"),
    leaf("mode"),
    leaf("path"),
    leaf("port"),
    leaf("scheme"),
    leaf("status"),
    leaf("timeout"),
    leaf("unhealthyinterval"),
];

const PASSIVE_HEALTH_CHECK: &[Field] = &[leaf("failurewindow"), leaf("maxfailedattempts")];

const RESPONSE_FORWARDING: &[Field] = &[leaf("flushinterval")];

const SERVER: &[Field] = &[
    leaf("port"),
    leaf("preservepath"),
    leaf("scheme"),
    leaf("url"),
    leaf("weight"),
];

const STICKY: &[Field] = &[switched_section("cookie", STICKY_COOKIE)];

const STICKY_COOKIE: &[Field] = &[
    leaf("domain"),
    leaf("httponly"),
    leaf("maxage"),
    leaf("name"),
    leaf("path"),
    leaf("samesite"),
    leaf("secure"),
];

/// Middleware types of `traefik.http.middlewares.NAME.TYPE`. Only `buffering` is
/// implemented, so only its options are checked.
pub(crate) const MIDDLEWARE: &[Field] = &[
    unchecked("addprefix"),
    unchecked("basicauth"),
    section("buffering", BUFFERING),
    unchecked("chain"),
    unchecked("circuitbreaker"),
    unchecked("compress"),
    unchecked("contenttype"),
    unchecked("digestauth"),
    unchecked("encodedcharacters"),
    unchecked("errors"),
    unchecked("forwardauth"),
    unchecked("grpcweb"),
    unchecked("headers"),
    unchecked("inflightreq"),
    unchecked("ipallowlist"),
    unchecked("ipwhitelist"),
    unchecked("passtlsclientcert"),
    unchecked("plugin"),
    unchecked("ratelimit"),
    unchecked("redirectregex"),
    unchecked("redirectscheme"),
    unchecked("replacepath"),
    unchecked("replacepathregex"),
    unchecked("retry"),
    unchecked("stripprefix"),
    unchecked("stripprefixregex"),
];

const BUFFERING: &[Field] = &[
    leaf("maxrequestbodybytes"),
    leaf("maxresponsebodybytes"),
    leaf("memrequestbodybytes"),
    leaf("memresponsebodybytes"),
    leaf("retryexpression"),
];

/// The option that a key's segments name, with its list index and map key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptionPath {
    /// Lower-case option names joined with `.`, without list indexes or map keys, such as
    /// `tls.domains.main` or `loadbalancer.healthcheck.headers`.
    pub option: String,
    /// The list index, for options below a list such as `tls.domains[1].sans`.
    pub index: Option<usize>,
    /// The map key as written, for map options such as a health-check header name.
    pub map_key: Option<String>,
    /// The option as a canonical key suffix: lower-case names, with the index and map key,
    /// such as `tls.domains[1].sans`. Below an unchecked middleware type, the remaining
    /// segments follow as written.
    pub suffix: String,
}

/// A key that does not fit the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyError {
    /// A segment that names no option at its level.
    Unknown {
        segment: String,
        valid: Vec<&'static str>,
    },
    /// The key stops at a section that needs an option below it.
    Incomplete {
        section: String,
        valid: Vec<&'static str>,
    },
    /// Options below a key that takes a value.
    BelowValue { option: String },
    /// A list option without its `[n]` index.
    MissingIndex { option: String },
    /// An index on an option that is not a list, or an index that is not a number.
    InvalidIndex { segment: String },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Unknown { segment, valid } => {
                write!(f, "unknown key \"{segment}\"")?;
                if valid.is_empty() {
                    return Ok(());
                }
                match closest(segment, valid) {
                    Some(suggestion) => write!(
                        f,
                        " (did you mean \"{suggestion}\"? valid: {})",
                        valid.join(", ")
                    ),
                    None => write!(f, " (valid: {})", valid.join(", ")),
                }
            }
            KeyError::Incomplete { section, valid } => write!(
                f,
                "\"{section}\" needs an option below it (valid: {})",
                valid.join(", ")
            ),
            KeyError::BelowValue { option } => {
                write!(f, "\"{option}\" takes a value and has no options below it")
            }
            KeyError::MissingIndex { option } => {
                write!(
                    f,
                    "\"{option}\" is a list; write {option}[0], {option}[1], ..."
                )
            }
            KeyError::InvalidIndex { segment } => write!(
                f,
                "invalid list index in \"{segment}\"; only list options such as domains[0] take \
                 one"
            ),
        }
    }
}

/// Walks the option segments of a key (those after the router, service or middleware name)
/// through `fields`.
///
/// # Errors
///
/// Returns a [`KeyError`] for an unknown option, a key that stops at a section that needs an
/// option, options below a value, and a missing or misplaced list index.
pub(crate) fn walk(fields: &'static [Field], segments: &[&str]) -> Result<OptionPath, KeyError> {
    let mut names: Vec<&'static str> = Vec::new();
    let mut suffix = String::new();
    let mut index = None;
    let mut level = fields;
    let mut position = 0;

    loop {
        let Some(segment) = segments.get(position) else {
            return Err(KeyError::Incomplete {
                section: names.last().copied().unwrap_or_default().to_owned(),
                valid: level.iter().map(|field| field.name).collect(),
            });
        };
        let (name, segment_index) = split_index(segment)?;
        let Some(field) = level
            .iter()
            .find(|field| field.name.eq_ignore_ascii_case(name))
        else {
            return Err(KeyError::Unknown {
                segment: name.to_owned(),
                valid: level.iter().map(|field| field.name).collect(),
            });
        };
        names.push(field.name);
        if !suffix.is_empty() {
            suffix.push('.');
        }
        suffix.push_str(field.name);
        let is_last = position + 1 == segments.len();

        if segment_index.is_some() && !matches!(field.node, Node::List(_)) {
            return Err(KeyError::InvalidIndex {
                segment: (*segment).to_owned(),
            });
        }
        match &field.node {
            Node::Leaf if is_last => break,
            Node::Unchecked => {
                // The options are not checked, but they stay in the suffix so that two
                // definitions of one middleware still compare option by option.
                for option in &segments[position + 1..] {
                    suffix.push('.');
                    suffix.push_str(option);
                }
                break;
            }
            Node::Leaf => {
                return Err(KeyError::BelowValue {
                    option: field.name.to_owned(),
                })
            }
            Node::Section { switch: true, .. } if is_last => break,
            Node::Section { fields, .. } => level = fields,
            Node::List(fields) => {
                let Some(list_index) = segment_index else {
                    return Err(KeyError::MissingIndex {
                        option: field.name.to_owned(),
                    });
                };
                index = Some(list_index);
                suffix.push_str(&format!("[{list_index}]"));
                level = fields;
            }
            Node::Map => {
                let Some(key) = segments.get(position + 1) else {
                    return Err(KeyError::Incomplete {
                        section: field.name.to_owned(),
                        valid: vec!["NAME"],
                    });
                };
                if position + 2 != segments.len() {
                    return Err(KeyError::BelowValue {
                        option: format!("{}.{key}", field.name),
                    });
                }
                suffix.push('.');
                suffix.push_str(key);
                return Ok(OptionPath {
                    option: names.join("."),
                    index,
                    map_key: Some((*key).to_owned()),
                    suffix,
                });
            }
        }
        position += 1;
    }

    Ok(OptionPath {
        option: names.join("."),
        index,
        map_key: None,
        suffix,
    })
}

/// Splits `name[n]` into the name and the index.
fn split_index(segment: &str) -> Result<(&str, Option<usize>), KeyError> {
    let invalid = || KeyError::InvalidIndex {
        segment: segment.to_owned(),
    };
    let Some(open) = segment.find('[') else {
        return Ok((segment, None));
    };
    if open == 0 {
        return Err(invalid());
    }
    let index = segment[open + 1..]
        .strip_suffix(']')
        .and_then(|digits| digits.parse::<usize>().ok())
        .ok_or_else(invalid)?;
    Ok((&segment[..open], Some(index)))
}

/// Returns the valid name closest to `written`, when it is at most two edits away.
pub(crate) fn closest<'a>(written: &str, valid: &[&'a str]) -> Option<&'a str> {
    let written = written.to_ascii_lowercase();
    valid
        .iter()
        .map(|candidate| (edit_distance(&written, candidate), *candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance between two strings, counted in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, b_char) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(a_char != *b_char);
            let insertion = current[j] + 1;
            let deletion = previous[j + 1] + 1;
            current.push(substitution.min(insertion).min(deletion));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(fields: &'static [Field], key: &str) -> Result<OptionPath, KeyError> {
        let segments: Vec<&str> = key.split('.').collect();
        walk(fields, &segments)
    }

    #[test]
    fn walk_matches_case_insensitively() {
        let found = path(ROUTER, "Rule").map(|found| found.option);
        assert_eq!(found, Ok("rule".to_owned()));
    }

    #[test]
    fn walk_reads_list_index() {
        let found = path(ROUTER, "tls.Domains[2].sans");
        let found = found.as_ref().ok();
        assert_eq!(found.map(|p| p.option.as_str()), Some("tls.domains.sans"));
        assert_eq!(found.and_then(|p| p.index), Some(2));
        assert_eq!(
            found.map(|p| p.suffix.as_str()),
            Some("tls.domains[2].sans")
        );
    }

    #[test]
    fn walk_keeps_map_key_spelling() {
        let found = path(SERVICE, "loadbalancer.healthcheck.headers.X-Probe");
        let found = found.ok();
        assert_eq!(
            found.as_ref().and_then(|p| p.map_key.as_deref()),
            Some("X-Probe")
        );
        assert_eq!(
            found.map(|p| p.option),
            Some("loadbalancer.healthcheck.headers".to_owned())
        );
    }

    #[test]
    fn walk_accepts_bare_switch_section() {
        let found = path(ROUTER, "tls").map(|found| found.option);
        assert_eq!(found, Ok("tls".to_owned()));
    }

    #[test]
    fn unknown_key_suggests_closest() {
        let error = path(ROUTER, "entrypoint").err().map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some(
                "unknown key \"entrypoint\" (did you mean \"entrypoints\"? valid: entrypoints, \
                 middlewares, observability, priority, rule, rulesyntax, service, tls)"
            )
        );
    }

    #[test]
    fn section_without_option_is_incomplete() {
        let error = path(SERVICE, "loadbalancer").err();
        assert!(matches!(error, Some(KeyError::Incomplete { .. })));
    }

    #[test]
    fn list_without_index_is_rejected() {
        let error = path(ROUTER, "tls.domains.main").err();
        assert_eq!(
            error,
            Some(KeyError::MissingIndex {
                option: "domains".to_owned()
            })
        );
    }

    #[test]
    fn index_on_value_is_rejected() {
        assert!(matches!(
            path(ROUTER, "rule[0]"),
            Err(KeyError::InvalidIndex { .. })
        ));
        assert!(matches!(
            path(ROUTER, "tls.[0]"),
            Err(KeyError::InvalidIndex { .. })
        ));
    }

    #[test]
    fn option_below_value_is_rejected() {
        assert!(matches!(
            path(ROUTER, "rule.host"),
            Err(KeyError::BelowValue { .. })
        ));
    }

    #[test]
    fn unchecked_middleware_accepts_any_option() {
        let found = path(MIDDLEWARE, "headers.customrequestheaders.X-A").map(|p| p.option);
        assert_eq!(found, Ok("headers".to_owned()));
    }
}
