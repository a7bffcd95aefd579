//! Types shared by the edge data plane and the agent: route snapshots, the Traefik rule
//! language and the Traefik file-provider format.
#![forbid(unsafe_code)]

pub mod control;
pub mod file;
pub mod rule;
pub mod snapshot;

pub use snapshot::{
    Balance, CertificatePem, Router, Server, ServerState, Service, Snapshot, ENTRYPOINT_WEB,
    ENTRYPOINT_WEBSECURE,
};
