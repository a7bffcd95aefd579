//! Certificates by ACME: the resolver settings, the manager task that orders and renews
//! certificates, and the state it shares with the main loop.
//!
//! ```text
//! main loop ── requested names ──> manager ── order task per certificate ──> CA
//!     ^                               │ certificates, challenge responses
//!     └──── changed (rebuild) ────────┘ (the main loop puts them in the next snapshot)
//! ```
//!
//! The manager does not block the main loop: orders run in their own tasks, and the main loop
//! only reads the shared state. An order publishes its challenge responses, then waits until
//! the main loop reports that the edge applied a snapshot that contains them, and only then
//! asks the CA to validate.
//!
//! Rate limits: a certificate in storage that covers the names and is before its renewal time
//! is reused, so restarts never order. Each order start is recorded on disk with its backoff
//! before any request goes to the CA, so a crash loop waits as long as failures do.

pub mod config;
mod manager;
pub mod order;
pub mod store;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use edge_proto::{AcmeChallenges, CertificatePem};
use serde::Serialize;
use tokio::sync::watch;
use tracing::info;

use crate::desired::CertificateRequest;
use manager::{lock, Entry, Manager, Resolver, Served, SharedState};
use store::Store;

/// The ACME challenge the CA validates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// `GET http://NAME/.well-known/acme-challenge/TOKEN` on port 80.
    Http01,
    /// A TLS handshake with ALPN `acme-tls/1` on port 443.
    TlsAlpn01,
}

impl ChallengeKind {
    /// Returns the ACME name of the challenge type.
    pub fn name(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

impl std::str::FromStr for ChallengeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "http-01" | "http01" | "http" => Ok(ChallengeKind::Http01),
            "tls-alpn-01" | "tlsalpn01" | "tls-alpn" => Ok(ChallengeKind::TlsAlpn01),
            _ => Err(format!(
                "invalid challenge type {s:?}; use http-01 or tls-alpn-01"
            )),
        }
    }
}

/// The key type of ordered certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
}

impl KeyType {
    fn algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

impl std::str::FromStr for KeyType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ec256" | "p256" | "ecdsa-p256" => Ok(KeyType::EcdsaP256),
            "ec384" | "p384" | "ecdsa-p384" => Ok(KeyType::EcdsaP384),
            // NOTE: ring, the only crypto provider in this build, cannot generate RSA keys.
            _ => Err(format!(
                "invalid key type {s:?}; use ec256 (ECDSA P-256) or ec384 (ECDSA P-384)"
            )),
        }
    }
}

/// One ACME resolver, as routers name it in `tls.certresolver`.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// The name routers use, such as `le`.
    pub name: String,
    /// The CA's directory URL.
    pub directory_url: String,
    /// Contact address for the account, without `mailto:`.
    pub email: Option<String>,
    pub challenge: ChallengeKind,
    pub key_type: KeyType,
    /// Extra trusted roots for the directory's HTTPS certificate, in PEM.
    pub ca_bundle: Option<PathBuf>,
    /// Storage directory; each resolver uses a subdirectory named after it.
    pub storage: PathBuf,
    /// Wait after the first failed order; it doubles with each further failure.
    pub retry_base: Duration,
    /// Maximum wait between orders after failures.
    pub retry_max: Duration,
}

/// The state of one requested certificate, as `edgectl certs` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CertStatus {
    /// Names on the certificate, main name first.
    pub names: Vec<String>,
    pub resolver: String,
    pub routers: Vec<String>,
    /// Common name of the issuer of the served certificate.
    pub issuer: Option<String>,
    /// notAfter of the served certificate, Unix seconds.
    pub not_after_unix: Option<i64>,
    /// When the served certificate is renewed, Unix seconds.
    pub renew_at_unix: Option<i64>,
    /// `valid`, `ordering`, `renewing`, `failed`, `renewal failed` or `disabled`.
    pub status: String,
    pub last_error: Option<String>,
    /// When the next order may start after failures, Unix seconds.
    pub next_retry_unix: Option<i64>,
}

/// The main loop's handle on the ACME manager.
#[derive(Clone)]
pub struct AcmeHandle {
    shared: Arc<Mutex<SharedState>>,
    requests: watch::Sender<Vec<CertificateRequest>>,
    applied: watch::Sender<u64>,
    configured: bool,
}

/// The ACME parts of a snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotParts {
    pub certificates: Vec<CertificatePem>,
    pub challenges: AcmeChallenges,
    /// Report this to [`AcmeHandle::applied`] once the edge applied the snapshot.
    pub challenge_generation: u64,
}

impl AcmeHandle {
    /// Returns whether any resolver is configured.
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// Sets the certificates that routers request. Orders start for new ones; certificates no
    /// longer requested leave the snapshot (their files stay on disk).
    pub fn set_requests(&self, requests: &[CertificateRequest]) {
        self.requests.send_if_modified(|current| {
            if current.as_slice() == requests {
                false
            } else {
                *current = requests.to_vec();
                true
            }
        });
    }

    /// Returns the certificates to serve and the pending challenge responses.
    pub fn snapshot_parts(&self) -> SnapshotParts {
        let shared = lock(&self.shared);
        let mut certificates: Vec<CertificatePem> = shared
            .entries
            .values()
            .filter_map(|entry| entry.served.as_ref().map(|s| s.pem.clone()))
            .collect();
        certificates.sort_by(|a, b| a.origin.cmp(&b.origin));
        let mut challenges = AcmeChallenges::default();
        for responses in shared.challenges.values() {
            challenges.http01.extend(responses.http01.iter().cloned());
            challenges
                .tls_alpn01
                .extend(responses.tls_alpn01.iter().cloned());
        }
        SnapshotParts {
            certificates,
            challenges,
            challenge_generation: shared.challenge_generation,
        }
    }

    /// Records that the edge serves a snapshot built from `challenge_generation`.
    pub fn applied(&self, challenge_generation: u64) {
        self.applied.send_if_modified(|current| {
            let newer = challenge_generation > *current;
            if newer {
                *current = challenge_generation;
            }
            newer
        });
    }

    /// Lets the certificates that cover `name` order again at once, ignoring their backoff.
    /// The failure count stays, so a further failure waits longer. Returns the main name of
    /// each certificate affected.
    pub fn retry_now(&self, name: &str) -> Vec<String> {
        let name = name.to_ascii_lowercase();
        let mut affected = Vec::new();
        {
            let mut shared = lock(&self.shared);
            for entry in shared.entries.values_mut() {
                if entry.disabled.is_none() && entry.names.contains(&name) {
                    entry.retry.next_attempt_unix = None;
                    affected.extend(entry.names.first().cloned());
                }
            }
        }
        if !affected.is_empty() {
            info!(name, certificates = ?affected, "ACME retry requested by the operator");
            // Wakes the manager, which starts the orders that are now due.
            self.requests.send_modify(|_| {});
        }
        affected
    }

    /// Returns the status of every requested certificate, sorted by main name.
    pub fn status(&self) -> Vec<CertStatus> {
        let shared = lock(&self.shared);
        let mut rows: Vec<CertStatus> = shared.entries.values().map(status_of).collect();
        rows.sort_by(|a, b| a.names.cmp(&b.names));
        rows
    }
}

fn status_of(entry: &Entry) -> CertStatus {
    let status = if entry.disabled.is_some() {
        "disabled"
    } else {
        match (
            &entry.served,
            entry.running,
            entry.retry.last_error.is_some(),
        ) {
            (None, true, _) => "ordering",
            (Some(_), true, _) => "renewing",
            (None, false, true) => "failed",
            (None, false, false) => "pending",
            (Some(_), false, true) => "renewal failed",
            (Some(_), false, false) => "valid",
        }
    };
    CertStatus {
        names: entry.names.clone(),
        resolver: entry.resolver.clone(),
        routers: entry.routers.clone(),
        issuer: entry.served.as_ref().and_then(|s| s.issuer.clone()),
        not_after_unix: entry.served.as_ref().map(|s| s.not_after),
        renew_at_unix: entry.served.as_ref().map(Served::renew_at),
        status: status.to_owned(),
        last_error: entry
            .disabled
            .clone()
            .or_else(|| entry.retry.last_error.clone()),
        next_retry_unix: if entry.retry.last_error.is_some() {
            entry.retry.next_attempt_unix
        } else {
            None
        },
    }
}

/// Starts the manager task for `resolvers` and returns its handle. `changed` is bumped when
/// certificates or challenge responses change, so the main loop rebuilds the snapshot.
pub fn start(resolvers: Vec<ResolverConfig>, changed: watch::Sender<u64>) -> AcmeHandle {
    let (requests_tx, requests_rx) = watch::channel(Vec::new());
    let (applied_tx, applied_rx) = watch::channel(0);
    let shared = Arc::new(Mutex::new(SharedState::default()));
    let handle = AcmeHandle {
        shared: shared.clone(),
        requests: requests_tx,
        applied: applied_tx,
        configured: !resolvers.is_empty(),
    };
    let manager = Manager {
        resolvers: resolvers
            .into_iter()
            .map(|config| {
                let store = Store::new(&config.storage, &config.name);
                (
                    config.name.clone(),
                    Arc::new(Resolver {
                        config,
                        store,
                        account: tokio::sync::Mutex::new(None),
                    }),
                )
            })
            .collect(),
        shared,
        changed,
        applied: applied_rx,
    };
    tokio::spawn(manager.run(requests_rx));
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_challenge_and_key_type() {
        assert_eq!("http-01".parse(), Ok(ChallengeKind::Http01));
        assert_eq!("TLS-ALPN-01".parse(), Ok(ChallengeKind::TlsAlpn01));
        assert!("dns-01".parse::<ChallengeKind>().is_err());
        assert_eq!("ec384".parse(), Ok(KeyType::EcdsaP384));
        assert!("rsa2048".parse::<KeyType>().is_err());
    }
}
