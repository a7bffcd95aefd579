//! Types shared by the edge data plane and the agent: route snapshots, the Traefik rule
//! language and the Traefik file-provider format.
#![forbid(unsafe_code)]

#[cfg(feature = "client-tls")]
pub mod client_tls;
pub mod control;
pub mod file;
pub mod rule;
pub mod snapshot;

pub use snapshot::{
    AcmeChallenges, Balance, CertificatePem, Http01Challenge, RootCaPem, Router, Server,
    ServerState, ServersTransport, Service, Snapshot, TlsAlpn01Challenge,
    ACME_HTTP_CHALLENGE_PREFIX, ACME_TLS_ALPN_PROTOCOL, ENTRYPOINT_WEB, ENTRYPOINT_WEBSECURE,
};
