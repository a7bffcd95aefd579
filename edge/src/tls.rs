//! TLS termination: the certificate store, the SNI resolver and the rustls server settings.
//!
//! The store is part of each compiled snapshot, so a reload swaps certificates together with
//! routes. Lookup order: exact name, then one-label wildcard, then the default certificate. A
//! name without a certificate gets the default (generated self-signed when none is configured)
//! rather than a failed handshake.

use std::{collections::HashMap, fmt, sync::Arc};

use arc_swap::ArcSwap;
use edge_proto::{CertificatePem, TlsAlpn01Challenge, ACME_TLS_ALPN_PROTOCOL};
use rustls::{
    server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache},
    sign::CertifiedKey,
    ServerConfig,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use crate::state::Compiled;

pub mod stream;

/// ALPN protocols offered to clients, most preferred first. `acme-tls/1` is last, so it is
/// chosen only for a client that offers no HTTP protocol; such a connection is closed after
/// the handshake.
pub const ALPN_PROTOCOLS: &[&[u8]] = &[b"h2", b"http/1.1", ACME_TLS_ALPN_PROTOCOL];

/// Reason a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate {origin}: no CERTIFICATE block in the chain PEM")]
    NoCertificate { origin: String },
    #[error("certificate {origin}: invalid PEM: {reason}")]
    InvalidPem { origin: String, reason: String },
    #[error("certificate {origin}: unsupported or invalid private key: {reason}")]
    InvalidKey { origin: String, reason: String },
    #[error("certificate {origin}: the private key does not match the certificate")]
    KeyMismatch { origin: String },
    #[error("certificate {origin}: cannot parse the leaf certificate: {reason}")]
    InvalidLeaf { origin: String, reason: String },
    #[error("cannot generate the self-signed default certificate: {0}")]
    Generate(String),
}

/// Certificates by the names they are valid for.
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain of `*.parent`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    /// TLS-ALPN-01 challenge certificates by the name being validated.
    acme_challenges: HashMap<String, Arc<CertifiedKey>>,
    /// Expiry of each configured certificate, in snapshot order, for `/metrics`.
    pub expiries: Vec<CertExpiry>,
}

/// When one configured certificate expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertExpiry {
    /// The first DNS name of the leaf certificate.
    pub name: String,
    /// Source of the certificate: a file path or an ACME resolver.
    pub origin: String,
    /// The leaf's notAfter as Unix seconds.
    pub not_after_unix: i64,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Builds a store from PEM certificates and TLS-ALPN-01 challenge certificates;
    /// `fallback` serves names no certificate covers unless `default` is given.
    ///
    /// # Errors
    /// Every certificate that fails to load, each naming its origin.
    pub fn build(
        certificates: &[CertificatePem],
        default: Option<&CertificatePem>,
        fallback: Arc<CertifiedKey>,
        challenges: &[TlsAlpn01Challenge],
    ) -> Result<Self, Vec<CertError>> {
        let mut errors = Vec::new();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut expiries = Vec::new();
        for pem in certificates {
            match load_certified_key(pem) {
                Ok((key, names, not_after_unix)) => {
                    expiries.push(CertExpiry {
                        name: names.first().cloned().unwrap_or_default(),
                        origin: pem.origin.clone(),
                        not_after_unix,
                    });
                    for name in names {
                        let name = normalize_name(&name);
                        if let Some(parent) = name.strip_prefix("*.") {
                            wildcard
                                .entry(parent.to_owned())
                                .or_insert_with(|| key.clone());
                        } else {
                            exact.entry(name).or_insert_with(|| key.clone());
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        let mut acme_challenges = HashMap::new();
        for challenge in challenges {
            // NOTE: rustls checks that a key matches through webpki, which rejects the critical
            // acmeIdentifier extension, so challenge certificates skip that check. A wrong key
            // only fails the validation handshake.
            match load_key_unchecked(&challenge.certificate) {
                Ok((key, _, _)) => {
                    acme_challenges.insert(normalize_name(&challenge.name), key);
                }
                Err(e) => errors.push(e),
            }
        }
        let default = match default.map(load_certified_key) {
            Some(Ok((key, _, _))) => key,
            Some(Err(e)) => {
                errors.push(e);
                fallback
            }
            None => fallback,
        };
        if errors.is_empty() {
            Ok(Self {
                exact,
                wildcard,
                default,
                acme_challenges,
                expiries,
            })
        } else {
            Err(errors)
        }
    }

    /// Returns the certificate for `server_name`: exact match, then a one-label wildcard, then
    /// the default. Case and one trailing dot are ignored.
    pub fn lookup(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return self.default.clone();
        };
        let name = normalize_name(name);
        if let Some(key) = self.exact.get(&name) {
            return key.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(key) = self.wildcard.get(parent) {
                return key.clone();
            }
        }
        self.default.clone()
    }

    /// Returns the TLS-ALPN-01 challenge certificate for `server_name`, if one is pending.
    pub fn acme_challenge(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let name = normalize_name(server_name?);
        self.acme_challenges.get(&name).cloned()
    }

    /// Returns how many distinct names have a certificate.
    pub fn name_count(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }
}

/// Lowercases `name` and strips one trailing dot (RFC 6066 forbids it in SNI, but clients
/// send it for fully qualified names).
pub fn normalize_name(name: &str) -> String {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase()
}

/// Chooses the certificate by SNI from the current snapshot.
pub struct SniResolver {
    current: Arc<ArcSwap<Compiled>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SniResolver")
    }
}

impl SniResolver {
    pub fn new(current: Arc<ArcSwap<Compiled>>) -> Self {
        Self { current }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let compiled = self.current.load();
        if is_acme_tls_alpn_hello(&client_hello) {
            // RFC 8737: a validation handshake gets the challenge certificate or fails; it
            // never gets a served certificate. The connection is closed after the handshake.
            return compiled.certs.acme_challenge(client_hello.server_name());
        }
        Some(compiled.certs.lookup(client_hello.server_name()))
    }
}

/// Returns whether a ClientHello is a TLS-ALPN-01 validation: its ALPN list is exactly
/// `acme-tls/1`, as RFC 8737 requires of the CA.
fn is_acme_tls_alpn_hello(client_hello: &ClientHello<'_>) -> bool {
    let Some(mut protocols) = client_hello.alpn() else {
        return false;
    };
    protocols.next() == Some(ACME_TLS_ALPN_PROTOCOL) && protocols.next().is_none()
}

/// Returns whether a negotiated ALPN protocol is the TLS-ALPN-01 one, whose connections carry
/// no HTTP and are closed after the handshake.
pub fn is_acme_tls_alpn(negotiated: Option<&[u8]>) -> bool {
    negotiated == Some(ACME_TLS_ALPN_PROTOCOL)
}

/// Builds the rustls settings of one worker: TLS 1.2 and 1.3, certificates by SNI, a session
/// cache of its own and the process-wide ticket key, so resumption works whichever worker a
/// returning client lands on.
pub fn server_config(
    resolver: Arc<SniResolver>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
) -> Result<ServerConfig, rustls::Error> {
    // NOTE: ring has no post-quantum hybrid key exchange; aws-lc-rs has one but needs a C and
    // CMake build on every machine.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    // ring's provider lists P-384 first, and a server follows its own order when a client
    // offers several key shares. X25519 is several times cheaper per handshake.
    provider.kx_groups = vec![
        rustls::crypto::ring::kx_group::X25519,
        rustls::crypto::ring::kx_group::SECP256R1,
        rustls::crypto::ring::kx_group::SECP384R1,
    ];
    let provider = Arc::new(provider);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
    config.session_storage = ServerSessionMemoryCache::new(4096);
    config.ticketer = ticketer;
    config.send_tls13_tickets = 1;
    Ok(config)
}

/// Generates the self-signed certificate served when no configured one matches.
///
/// # Errors
/// [`CertError::Generate`] when key generation fails.
pub fn self_signed_default() -> Result<Arc<CertifiedKey>, CertError> {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CertError::Generate(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(vec!["edge.invalid".to_owned()])
        .map_err(|e| CertError::Generate(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge default certificate");
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| CertError::Generate(e.to_string()))?;
    let key_der = PrivateKeyDer::try_from(key_pair.serialize_der())
        .map_err(|e| CertError::Generate(e.to_string()))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| CertError::Generate(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    )))
}

/// Parses a PEM chain and key into a signing key, checks that they match, and returns the DNS
/// names and the notAfter (Unix seconds) of the leaf.
fn load_certified_key(
    pem: &CertificatePem,
) -> Result<(Arc<CertifiedKey>, Vec<String>, i64), CertError> {
    let (certified, names, not_after) = load_key_unchecked(pem)?;
    certified.keys_match().map_err(|_| CertError::KeyMismatch {
        origin: pem.origin.clone(),
    })?;
    Ok((certified, names, not_after))
}

/// Parses a PEM chain and key as [`load_certified_key`] does, without checking that the key
/// matches the leaf.
fn load_key_unchecked(
    pem: &CertificatePem,
) -> Result<(Arc<CertifiedKey>, Vec<String>, i64), CertError> {
    let origin = || pem.origin.clone();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| CertError::InvalidPem {
                origin: origin(),
                reason: e.to_string(),
            })?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::NoCertificate { origin: origin() });
    };
    let (names, not_after) = leaf_dns_names(leaf).map_err(|reason| CertError::InvalidLeaf {
        origin: origin(),
        reason,
    })?;
    let key_der = PrivateKeyDer::from_pem_slice(pem.key_pem.as_bytes()).map_err(|e| {
        CertError::InvalidKey {
            origin: origin(),
            reason: e.to_string(),
        }
    })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| {
        CertError::InvalidKey {
            origin: origin(),
            reason: e.to_string(),
        }
    })?;
    Ok((
        Arc::new(CertifiedKey::new(chain, signing_key)),
        names,
        not_after,
    ))
}

/// Returns the subjectAltName DNS names of a certificate, or its common name when it has none,
/// and its notAfter as Unix seconds.
fn leaf_dns_names(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for general_name in &san.value.general_names {
            if let GeneralName::DNSName(name) = general_name {
                names.push((*name).to_owned());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_owned());
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_for(names: &[&str]) -> CertificatePem {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key_pair).unwrap();
        CertificatePem {
            chain_pem: cert.pem(),
            key_pem: key_pair.serialize_pem(),
            origin: names.join(","),
        }
    }

    fn leaf_of(key: &CertifiedKey) -> Vec<u8> {
        key.cert[0].as_ref().to_vec()
    }

    #[test]
    fn lookup_exact_wildcard_default() {
        let fallback = self_signed_default().unwrap();
        let a = pem_for(&["a.test"]);
        let wild = pem_for(&["*.w.test"]);
        let store = CertStore::build(&[a, wild], None, fallback.clone(), &[]).unwrap();
        let a_leaf = leaf_of(&store.lookup(Some("a.test")));
        assert_eq!(leaf_of(&store.lookup(Some("A.TEST."))), a_leaf);
        let w_leaf = leaf_of(&store.lookup(Some("x.w.test")));
        assert_ne!(w_leaf, a_leaf);
        assert_eq!(
            leaf_of(&store.lookup(Some("x.y.w.test"))),
            leaf_of(&fallback)
        );
        assert_eq!(leaf_of(&store.lookup(Some("w.test"))), leaf_of(&fallback));
        assert_eq!(leaf_of(&store.lookup(None)), leaf_of(&fallback));
    }

    #[test]
    fn mismatched_key_rejected() {
        let a = pem_for(&["a.test"]);
        let b = pem_for(&["b.test"]);
        let mixed = CertificatePem {
            chain_pem: a.chain_pem,
            key_pem: b.key_pem,
            origin: "mixed".into(),
        };
        let errors =
            CertStore::build(&[mixed], None, self_signed_default().unwrap(), &[]).unwrap_err();
        assert!(matches!(errors[0], CertError::KeyMismatch { .. }));
        assert_eq!(
            errors[0].to_string(),
            "certificate mixed: the private key does not match the certificate"
        );
    }

    #[test]
    fn garbage_pem_rejected() {
        let bad = CertificatePem {
            chain_pem: "not pem".into(),
            key_pem: "nope".into(),
            origin: "bad.pem".into(),
        };
        let errors =
            CertStore::build(&[bad], None, self_signed_default().unwrap(), &[]).unwrap_err();
        assert!(matches!(errors[0], CertError::NoCertificate { .. }));
    }
}
