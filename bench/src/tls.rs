//! TLS for the bench: the self-signed certificate every proxy serves, and the load generator's
//! rustls client configuration.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring::kx_group, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};

/// Paths of the bench certificate files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert_pem: std::path::PathBuf,
    pub key_pem: std::path::PathBuf,
    /// Certificate followed by its key, the form HAProxy's `crt` expects.
    pub combined_pem: std::path::PathBuf,
}

/// Writes a new self-signed ECDSA P-256 certificate for `names` into `dir`.
///
/// # Errors
/// Fails when key generation or a file write fails.
pub fn write_self_signed(dir: &Path, names: &[&str]) -> anyhow::Result<CertFiles> {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let certified =
        rcgen::generate_simple_self_signed(names).context("generating the bench certificate")?;
    let cert = certified.cert.pem();
    let key = certified.key_pair.serialize_pem();
    let files = CertFiles {
        cert_pem: dir.join("cert.pem"),
        key_pem: dir.join("key.pem"),
        combined_pem: dir.join("combined.pem"),
    };
    std::fs::write(&files.cert_pem, &cert)
        .with_context(|| format!("writing {}", files.cert_pem.display()))?;
    std::fs::write(&files.key_pem, &key)
        .with_context(|| format!("writing {}", files.key_pem.display()))?;
    std::fs::write(&files.combined_pem, format!("{cert}{key}"))
        .with_context(|| format!("writing {}", files.combined_pem.display()))?;
    Ok(files)
}

/// Whether the load generator checks the server's handshake signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureCheck {
    /// Verify it, as browsers and curl do.
    Verify,
    /// Accept it unchecked. The server signs exactly as before, so its work is unchanged.
    /// The client saves an ECDSA verification, about a fifth of its CPU time per new
    /// connection, which otherwise limits the handshake rate on a 2-CPU machine.
    Skip,
}

/// Builds the load generator's client configuration. It offers TLS 1.2 and 1.3 with the ring
/// provider, and key exchange groups in the order browsers, curl and OpenSSL use (X25519,
/// P-256, P-384). ALPN offers `alpn` only. Session resumption is off, so every new connection
/// is a full handshake. The certificate chain is not validated. Handshake signatures are
/// verified unless `signatures` is [`SignatureCheck::Skip`].
///
/// # Errors
/// Fails when the provider rejects the protocol versions.
pub fn client_config(
    alpn: &[u8],
    signatures: SignatureCheck,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    build_client_config(alpn, rustls::DEFAULT_VERSIONS, signatures)
}

/// Builds the QUIC client configuration of the HTTP/3 load generator: the settings of
/// [`client_config`] restricted to TLS 1.3, as QUIC requires, with ALPN `h3`.
///
/// # Errors
/// Fails when the provider lacks TLS 1.3 or the AES-128-GCM suite of QUIC's Initial packets.
pub fn quic_client_config() -> anyhow::Result<quinn::ClientConfig> {
    let tls = build_client_config(b"h3", &[&rustls::version::TLS13], SignatureCheck::Verify)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("building the QUIC client configuration")?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

fn build_client_config(
    alpn: &[u8],
    versions: &[&'static rustls::SupportedProtocolVersion],
    signatures: SignatureCheck,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    // NOTE: rustls 0.23.48 lists P-384 first in ring's default groups and sends its key
    // share first. Left that way, every handshake would use P-384, which is much slower in
    // ring than X25519, and which no common client prefers.
    #[allow(deprecated)]
    let provider = Arc::new(CryptoProvider {
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        ..rustls::crypto::ring::default_provider()
    });
    let verifier = Arc::new(AnyCertificate {
        provider: provider.clone(),
        signatures,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .context("selecting TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Accepts any server certificate, so the bench's self-signed one needs no trust setup, and
/// verifies the handshake signatures made with its key unless `signatures` is `Skip`.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
    signatures: SignatureCheck,
}

impl ServerCertVerifier for AnyCertificate {
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
        if self.signatures == SignatureCheck::Skip {
            return Ok(HandshakeSignatureValid::assertion());
        }
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.signatures == SignatureCheck::Skip {
            return Ok(HandshakeSignatureValid::assertion());
        }
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Describes a finished handshake, for example `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`.
pub fn describe_session(connection: &rustls::ClientConnection) -> String {
    let version = connection
        .protocol_version()
        .map_or_else(|| "unknown version".to_owned(), |v| format!("{v:?}"));
    let suite = connection.negotiated_cipher_suite().map_or_else(
        || "unknown suite".to_owned(),
        |s| format!("{:?}", s.suite()),
    );
    let group = connection
        .negotiated_key_exchange_group()
        .map_or_else(|| "unknown group".to_owned(), |g| format!("{:?}", g.name()));
    format!("{version} {suite} {group}")
}

#[cfg(test)]
mod tests {
    use std::{
        net::{TcpListener, TcpStream},
        sync::Arc,
    };

    use rustls::{
        pki_types::{PrivateKeyDer, ServerName},
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
    };

    use super::{client_config, SignatureCheck};

    /// Presents one certificate but signs with the key of another, so its handshake
    /// signatures are invalid for the certificate it sends.
    #[derive(Debug)]
    struct MismatchedKey(Arc<CertifiedKey>);

    impl ResolvesServerCert for MismatchedKey {
        fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    /// Runs one TLS 1.3 handshake against a server whose signature does not match its
    /// certificate, with the client's signature check set to `signatures`.
    fn handshake_with_wrong_signature(signatures: SignatureCheck) -> Result<(), rustls::Error> {
        let presented = rcgen::generate_simple_self_signed(vec!["bench.local".to_owned()]).unwrap();
        let signer = rcgen::generate_simple_self_signed(vec!["bench.local".to_owned()]).unwrap();
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let key = PrivateKeyDer::Pkcs8(signer.key_pair.serialize_der().into());
        let key = provider.key_provider.load_private_key(key).unwrap();
        let certified = CertifiedKey::new(vec![presented.cert.der().clone()], key);
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(MismatchedKey(Arc::new(certified))));
        let server = Arc::new(server);

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut tls = rustls::ServerConnection::new(server).unwrap();
            // The client aborts the handshake when it rejects the signature.
            while tls.is_handshaking() {
                if tls.complete_io(&mut socket).is_err() {
                    break;
                }
            }
        });

        let config = client_config(b"http/1.1", signatures).unwrap();
        let name = ServerName::try_from("bench.local").unwrap();
        let mut tls = rustls::ClientConnection::new(config, name).unwrap();
        let mut socket = TcpStream::connect(addr).unwrap();
        let result = loop {
            if !tls.is_handshaking() {
                break Ok(());
            }
            if let Err(e) = tls.complete_io(&mut socket) {
                break Err(e);
            }
        };
        drop(socket);
        serving.join().unwrap();
        result.map_err(|e| {
            e.into_inner()
                .and_then(|inner| inner.downcast::<rustls::Error>().ok())
                .map_or(rustls::Error::General("i/o error".to_owned()), |e| *e)
        })
    }

    #[test]
    fn verifying_client_rejects_a_signature_from_another_key() {
        let result = handshake_with_wrong_signature(SignatureCheck::Verify);
        assert!(
            matches!(result, Err(rustls::Error::InvalidCertificate(_))),
            "{result:?}"
        );
    }

    #[test]
    fn skipping_client_completes_the_handshake_anyway() {
        handshake_with_wrong_signature(SignatureCheck::Skip).unwrap();
    }
}
