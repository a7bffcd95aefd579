//! The route and certificate snapshot: the complete routing state that the edge serves.
//!
//! A snapshot is built off the hot path (from a Traefik-format file, or by the agent from Docker
//! labels), validated, and then published to every worker as one immutable value. The same type
//! travels over the agent's snapshot socket as JSON, so every field is plain data: rules are kept
//! as their source text and compiled by the receiver.

use serde::{Deserialize, Serialize};

/// Name of Traefik's plain-HTTP entry point.
pub const ENTRYPOINT_WEB: &str = "web";
/// Name of Traefik's HTTPS entry point (TCP and QUIC).
pub const ENTRYPOINT_WEBSECURE: &str = "websecure";

/// The complete routing state at one version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Monotonic version chosen by the producer; the edge acknowledges it after applying.
    pub version: u64,
    /// Routers in no particular order; the edge sorts them by priority.
    pub routers: Vec<Router>,
    /// Services referenced by routers, by name.
    pub services: Vec<Service>,
    /// Certificates offered by SNI. The first one whose names match wins.
    #[serde(default)]
    pub certificates: Vec<CertificatePem>,
    /// Certificate for clients that send no SNI or an unknown name. When absent, the edge
    /// generates a self-signed one at start.
    #[serde(default)]
    pub default_certificate: Option<CertificatePem>,
    /// ACME challenge responses that the edge serves while the agent's orders are validated.
    #[serde(default, skip_serializing_if = "AcmeChallenges::is_empty")]
    pub acme_challenges: AcmeChallenges,
    /// TLS settings towards `https://` backends, referenced by [`Service::servers_transport`].
    /// Left out of the JSON when empty, so that an edge built before this field accepts
    /// snapshots that do not use it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers_transports: Vec<ServersTransport>,
}

/// TLS settings for connections to `https://` backends, Traefik's `serversTransports` entry.
/// A service without one verifies its backends against the system's root certificates and
/// uses the URL's host as the server name, as Traefik does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServersTransport {
    /// Unique name, referenced by services.
    pub name: String,
    /// Name sent in SNI and checked against the backend's certificate instead of the URL's
    /// host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Whether the backend's certificate chain and name are accepted without verification.
    /// The handshake signatures are still checked. Default: false.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// PEM certificates of the CAs trusted for the backends. When not empty they replace the
    /// system's root certificates, as in Traefik.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_cas: Vec<RootCaPem>,
    /// Whether HTTP/2 is left out of ALPN, so that backends are always reached over HTTP/1.1.
    /// Default: false.
    #[serde(default)]
    pub disable_http2: bool,
}

/// One trusted CA file of a [`ServersTransport`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootCaPem {
    /// One or more PEM `CERTIFICATE` blocks.
    pub pem: String,
    /// Source of the certificates (a file path), for errors and logs.
    #[serde(default)]
    pub origin: String,
}

/// Name of the ALPN protocol of the TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN_PROTOCOL: &[u8] = b"acme-tls/1";

/// Path prefix of HTTP-01 challenge requests (RFC 8555, section 8.3).
pub const ACME_HTTP_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Challenge responses for pending ACME authorizations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeChallenges {
    /// HTTP-01 responses, served on the plain-HTTP listener before routing and redirects.
    #[serde(default)]
    pub http01: Vec<Http01Challenge>,
    /// TLS-ALPN-01: served by the certificate resolver to clients that offer only the ALPN
    /// protocol `acme-tls/1`.
    #[serde(default)]
    pub tls_alpn01: Vec<TlsAlpn01Challenge>,
}

impl AcmeChallenges {
    /// Returns whether no challenge is pending.
    pub fn is_empty(&self) -> bool {
        self.http01.is_empty() && self.tls_alpn01.is_empty()
    }
}

/// One HTTP-01 challenge: `GET /.well-known/acme-challenge/TOKEN` returns the key
/// authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http01Challenge {
    /// The token from the CA, base64url characters only.
    pub token: String,
    /// `TOKEN.THUMBPRINT`, the response body.
    pub key_authorization: String,
}

/// One TLS-ALPN-01 challenge: the self-signed certificate with the `acmeIdentifier`
/// extension for `name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsAlpn01Challenge {
    /// The DNS name being validated, lower case.
    pub name: String,
    pub certificate: CertificatePem,
}

/// One router: a rule that selects requests and the service that serves them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Router {
    /// Unique name, used in errors, metrics and access logs.
    pub name: String,
    /// Rule in Traefik's rule language (v3, or v2 with several arguments per matcher).
    pub rule: String,
    /// Explicit priority; `None` means the byte length of `rule`, as in Traefik.
    #[serde(default)]
    pub priority: Option<i64>,
    /// Entry points (`web`, `websecure`); empty means both.
    #[serde(default)]
    pub entrypoints: Vec<String>,
    /// Name of the service in [`Snapshot::services`].
    pub service: String,
    /// Whether the router declared a `tls` section. A router on `web` without TLS is a
    /// plain-HTTP route; every other request on `web` is redirected to HTTPS.
    #[serde(default)]
    pub tls: bool,
    /// Maximum request body size in bytes; `None` leaves the edge's global limit.
    #[serde(default)]
    pub max_request_body_bytes: Option<u64>,
}

/// A load-balanced set of backend servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique name referenced by routers.
    pub name: String,
    /// Backend servers. A service without servers responds with 503.
    pub servers: Vec<Server>,
    /// Strategy a worker uses to pick among the healthy servers.
    #[serde(default)]
    pub balance: Balance,
    /// Whether the client's `Host` header is passed to the backend (Traefik's default: true).
    /// When false, the backend's `host:port` is sent instead.
    #[serde(default = "default_true")]
    pub pass_host_header: bool,
    /// Name of the entry of [`Snapshot::servers_transports`] used for `https://` servers;
    /// `None` means the defaults described at [`ServersTransport`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers_transport: Option<String>,
}

/// One backend server of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Backend URL, `SCHEME://IP:PORT` or `SCHEME://NAME:PORT` (resolved when the snapshot is
    /// compiled, never on the request path). SCHEME is `http`, `https` or `h2c` (HTTP/2
    /// without TLS).
    pub url: String,
    /// Whether new requests may go to this server.
    #[serde(default)]
    pub state: ServerState,
}

/// Whether a backend server receives new requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// Healthy: receives new requests.
    #[default]
    Up,
    /// Failing its health check: receives no new requests.
    Down,
    /// Being removed: receives no new requests, in-flight ones finish.
    Draining,
}

/// Load-balancing strategy of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each worker rotates through the healthy servers.
    #[default]
    RoundRobin,
    /// Each worker picks the healthy server with the fewest requests in flight on that worker.
    LeastInFlight,
}

/// A certificate chain and its private key, both PEM-encoded.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificatePem {
    /// Leaf certificate first, then intermediates.
    pub chain_pem: String,
    /// PKCS#8, PKCS#1 or SEC1 private key.
    pub key_pem: String,
    /// Source of the certificate (a file path or a resolver name), for errors and logs.
    #[serde(default)]
    pub origin: String,
}

impl std::fmt::Debug for CertificatePem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs and panic messages.
        f.debug_struct("CertificatePem")
            .field("origin", &self.origin)
            .field("chain_pem_bytes", &self.chain_pem.len())
            .finish_non_exhaustive()
    }
}

fn default_true() -> bool {
    true
}

impl Router {
    /// Returns whether this router serves requests that arrive on `entrypoint`.
    pub fn is_on_entrypoint(&self, entrypoint: &str) -> bool {
        self.entrypoints.is_empty() || self.entrypoints.iter().any(|e| e == entrypoint)
    }

    /// Returns whether this router serves plain HTTP on `web` rather than redirecting it:
    /// it names `web` explicitly and has no TLS section.
    pub fn is_plain_http(&self) -> bool {
        !self.tls && self.entrypoints.iter().any(|e| e == ENTRYPOINT_WEB)
    }

    /// Returns the effective priority: the explicit one, else the rule's byte length.
    pub fn effective_priority(&self) -> i64 {
        match self.priority {
            Some(p) if p != 0 => p,
            _ => i64::try_from(self.rule.len()).unwrap_or(i64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(rule: &str, priority: Option<i64>, entrypoints: &[&str], tls: bool) -> Router {
        Router {
            name: "r".into(),
            rule: rule.into(),
            priority,
            entrypoints: entrypoints.iter().map(|s| s.to_string()).collect(),
            service: "s".into(),
            tls,
            max_request_body_bytes: None,
        }
    }

    #[test]
    fn priority_defaults_to_rule_length() {
        assert_eq!(
            router("Host(`a.b`)", None, &[], false).effective_priority(),
            11
        );
        assert_eq!(
            router("Host(`a.b`)", Some(0), &[], false).effective_priority(),
            11
        );
        assert_eq!(
            router("Host(`a.b`)", Some(-3), &[], false).effective_priority(),
            -3
        );
    }

    #[test]
    fn plain_http_needs_web_without_tls() {
        assert!(router("x", None, &["web"], false).is_plain_http());
        assert!(!router("x", None, &["web"], true).is_plain_http());
        assert!(!router("x", None, &[], false).is_plain_http());
        assert!(router("x", None, &[], false).is_on_entrypoint("web"));
        assert!(!router("x", None, &["websecure"], false).is_on_entrypoint("web"));
    }

    #[test]
    fn certificate_debug_hides_key() {
        let cert = CertificatePem {
            chain_pem: "CHAIN".into(),
            key_pem: "SECRET-KEY".into(),
            origin: "file".into(),
        };
        assert!(!format!("{cert:?}").contains("SECRET"));
    }
}
