//! rustls client settings for `https://` backends, built from a [`ServersTransport`], so that
//! the edge's connections and the agent's health probes verify backends the same way.
//!
//! Defaults follow Traefik: the backend's chain is verified against the system's root
//! certificates (or only against `rootCAs` when the transport lists some), and the server
//! name is the URL's host unless `serverName` replaces it.

use std::sync::{Arc, OnceLock};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::ServersTransport;

/// ALPN list offered to backends that may speak HTTP/2.
pub const ALPN_H2_AND_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN list offered when only HTTP/1.1 may be used (WebSocket upgrades, `disableHTTP2`).
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

/// Error building TLS client settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientTlsError {
    /// A `rootCAs` entry contains no certificate that rustls accepts as a trust anchor.
    #[error("root CA {origin}: {reason}")]
    InvalidRootCa { origin: String, reason: String },
    /// The system's root certificates could not be loaded and no `rootCAs` replace them.
    #[error("no system root certificates found; set rootCAs in a servers transport")]
    NoSystemRoots,
    /// The server name is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?}")]
    InvalidServerName(String),
    /// rustls rejected the protocol versions of the ring provider.
    #[error("TLS client settings rejected: {0}")]
    Rustls(String),
}

/// Builds the client settings of `transport` (the defaults when `None`), offering `alpn`.
///
/// # Errors
///
/// Returns an error when a root CA does not parse, or when no trust anchor is available.
pub fn client_config(
    transport: Option<&ServersTransport>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, ClientTlsError> {
    // NOTE: ring has no post-quantum key exchange; the edge's listeners make the same choice.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientTlsError::Rustls(e.to_string()))?;

    let insecure = transport.is_some_and(|t| t.insecure_skip_verify);
    let mut config = if insecure {
        let verifier = Arc::new(NoCertificateVerification { provider });
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth()
    } else {
        let roots = match transport.filter(|t| !t.root_cas.is_empty()) {
            Some(transport) => root_store(transport)?,
            None => system_roots()?.clone(),
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(config)
}

/// Returns the name sent in SNI and checked against the backend's certificate: the
/// transport's `serverName`, else `url_host` (a DNS name, or an IP address for which rustls
/// sends no SNI and checks the certificate's IP address entries).
///
/// # Errors
///
/// Returns an error when the name is neither a DNS name nor an IP address.
pub fn server_name(
    transport: Option<&ServersTransport>,
    url_host: &str,
) -> Result<ServerName<'static>, ClientTlsError> {
    let name = transport
        .and_then(|t| t.server_name.as_deref())
        .unwrap_or(url_host);
    let bare = name
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(bare.to_owned())
        .map_err(|_| ClientTlsError::InvalidServerName(name.to_owned()))
}

/// Returns the trust anchors of a transport's `rootCAs`.
fn root_store(transport: &ServersTransport) -> Result<RootCertStore, ClientTlsError> {
    let mut store = RootCertStore::empty();
    for root_ca in &transport.root_cas {
        let invalid = |reason: String| ClientTlsError::InvalidRootCa {
            origin: root_ca.origin.clone(),
            reason,
        };
        let mut found = 0;
        for certificate in CertificateDer::pem_slice_iter(root_ca.pem.as_bytes()) {
            let certificate = certificate.map_err(|e| invalid(e.to_string()))?;
            store.add(certificate).map_err(|e| invalid(e.to_string()))?;
            found += 1;
        }
        if found == 0 {
            return Err(invalid("no PEM CERTIFICATE block".to_owned()));
        }
    }
    Ok(store)
}

/// Returns the system's root certificates, loaded once per process because reading the
/// certificate directory takes milliseconds.
fn system_roots() -> Result<&'static RootCertStore, ClientTlsError> {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    let roots = ROOTS.get_or_init(|| {
        let mut store = RootCertStore::empty();
        // Unreadable entries are skipped, as in Go's crypto/x509 that Traefik uses.
        let loaded = rustls_native_certs::load_native_certs();
        store.add_parsable_certificates(loaded.certs);
        store
    });
    if roots.is_empty() {
        return Err(ClientTlsError::NoSystemRoots);
    }
    Ok(roots)
}

/// `insecureSkipVerify`: accepts any certificate chain and name, but still checks that the
/// handshake is signed by the certificate's key, so the connection is at least bound to the
/// certificate the backend presented.
#[derive(Debug)]
struct NoCertificateVerification {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoCertificateVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RootCaPem;

    #[test]
    fn server_name_prefers_transport() {
        let transport = ServersTransport {
            server_name: Some("api.internal".into()),
            ..ServersTransport::default()
        };
        let name = server_name(Some(&transport), "10.0.0.5").unwrap();
        assert_eq!(name.to_str(), "api.internal");
        let name = server_name(None, "[::1]").unwrap();
        assert_eq!(name.to_str(), "::1");
        assert!(server_name(None, "a b").is_err());
    }

    #[test]
    fn root_ca_garbage_rejected() {
        let transport = ServersTransport {
            root_cas: vec![RootCaPem {
                pem: "not a certificate".into(),
                origin: "/etc/edge/ca.pem".into(),
            }],
            ..ServersTransport::default()
        };
        let error = client_config(Some(&transport), ALPN_HTTP1).unwrap_err();
        assert_eq!(
            error.to_string(),
            "root CA /etc/edge/ca.pem: no PEM CERTIFICATE block"
        );
    }

    #[test]
    fn alpn_list_is_offered() {
        let transport = ServersTransport {
            insecure_skip_verify: true,
            ..ServersTransport::default()
        };
        let config = client_config(Some(&transport), ALPN_H2_AND_HTTP1).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
