//! One ACME order with instant-acme: account, new order, challenge responses published through
//! the edge, validation, CSR and download of the chain. Also the HTTPS client for the CA and
//! the TLS-ALPN-01 challenge certificate.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use edge_proto::{CertificatePem, Http01Challenge, TlsAlpn01Challenge};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{store::Store, ChallengeKind, KeyType};

/// Maximum wait for the CA to validate the challenges, and then to issue the certificate.
const POLL_TIMEOUT: Duration = Duration::from_secs(90);

/// A failed order, or a failed step before it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The CA bundle file cannot be read or contains no certificate.
    #[error("CA bundle {path}: {message}")]
    CaBundle { path: String, message: String },
    /// The CA returned an error or could not be reached.
    #[error("{step}: {source}")]
    Acme {
        step: &'static str,
        #[source]
        source: instant_acme::Error,
    },
    /// The CA rejected a challenge.
    #[error("validation failed: {0}")]
    Validation(String),
    /// The CA offers no challenge of the configured type for a name.
    #[error("the CA offers no {kind} challenge for {name}")]
    NoChallenge { kind: &'static str, name: String },
    /// The edge did not apply a snapshot with the challenge responses in time.
    #[error(
        "the edge did not acknowledge the challenge responses within {0:?}; check that the edge runs and that the agent has sent it routes (`edgectl status`; without Docker, start the agent with --docker false)"
    )]
    EdgeNotReady(Duration),
    /// Generating a key, the CSR or the challenge certificate failed.
    #[error("{0}")]
    Crypto(String),
    /// The account file cannot be read or written.
    #[error("account storage: {0}")]
    Storage(String),
}

/// The account file: the directory URL the account belongs to, and the credentials, which
/// contain the account's private key.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory_url: String,
    credentials: AccountCredentials,
}

/// Builds the HTTPS client for the CA: the system's roots, plus those in `ca_bundle`.
///
/// # Errors
/// The bundle cannot be read or contains no certificate.
pub fn http_client(ca_bundle: Option<&Path>) -> Result<Box<dyn HttpClient>, OrderError> {
    let mut roots = rustls::RootCertStore::empty();

    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() && ca_bundle.is_none() {
        warn!(
            errors = ?native.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "no trusted root certificates found for the ACME directory; install the system's CA \
             certificates (Debian: ca-certificates) or set ACME_CA_BUNDLE"
        );
    }
    if let Some(path) = ca_bundle {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        let bundle_error = |message: String| OrderError::CaBundle {
            path: path.display().to_string(),
            message,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| bundle_error(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bundle_error(e.to_string()))?;
        if certs.is_empty() {
            return Err(bundle_error("no CERTIFICATE block".into()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| bundle_error(format!("invalid certificate: {e}")))?;
        }
    }

    // NOTE: ring has no post-quantum key exchange; the edge makes the same choice.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| OrderError::Crypto(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, BodyWrapper<Bytes>>(connector);
    Ok(Box::new(client))
}

/// Restores the account stored for `directory_url`, or registers a new one and stores it.
///
/// # Errors
/// The CA cannot be reached, rejects the account, or the account cannot be stored.
pub async fn account(
    store: &Store,
    directory_url: &str,
    email: Option<&str>,
    ca_bundle: Option<&Path>,
) -> Result<Account, OrderError> {
    let stored = store
        .load_account()
        .map_err(|e| OrderError::Storage(e.to_string()))?
        .and_then(|text| serde_json::from_str::<StoredAccount>(&text).ok())
        .filter(|stored| stored.directory_url == directory_url);
    if let Some(stored) = stored {
        let account = Account::builder_with_http(http_client(ca_bundle)?)
            .from_credentials(stored.credentials)
            .await
            .map_err(|source| OrderError::Acme {
                step: "loading the ACME directory",
                source,
            })?;
        return Ok(account);
    }

    let contact = email.map(|email| format!("mailto:{email}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, credentials) = Account::builder_with_http(http_client(ca_bundle)?)
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            directory_url.to_owned(),
            None,
        )
        .await
        .map_err(|source| OrderError::Acme {
            step: "registering the ACME account",
            source,
        })?;
    let json = serde_json::to_vec_pretty(&StoredAccount {
        directory_url: directory_url.to_owned(),
        credentials,
    })
    .map_err(|e| OrderError::Storage(e.to_string()))?;
    store
        .save_account(&json)
        .map_err(|e| OrderError::Storage(e.to_string()))?;
    info!(
        directory = directory_url,
        account = account.id(),
        "ACME account registered"
    );
    Ok(account)
}

/// The challenge responses of one order, to be served by the edge.
#[derive(Debug, Default, Clone)]
pub struct Responses {
    pub http01: Vec<Http01Challenge>,
    pub tls_alpn01: Vec<TlsAlpn01Challenge>,
}

/// The steps of an order that need the edge: publishing the responses and waiting until the
/// edge serves them.
pub trait ChallengeSink {
    /// Publishes `responses` and waits until the edge serves them.
    fn publish(
        &self,
        responses: Responses,
    ) -> impl std::future::Future<Output = Result<(), OrderError>> + Send;
}

/// Orders a certificate for `names` and returns the PEM chain and private key.
///
/// # Errors
/// Any step fails: the CA is unreachable, rejects the order, a validation fails, or the edge
/// does not serve the challenge responses.
pub async fn order_certificate(
    account: &Account,
    names: &[String],
    challenge: ChallengeKind,
    key_type: KeyType,
    sink: &impl ChallengeSink,
) -> Result<CertificatePem, OrderError> {
    let identifiers: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
    let acme = |step: &'static str| move |source| OrderError::Acme { step, source };
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(acme("creating the order"))?;

    let challenge_type = match challenge {
        ChallengeKind::Http01 => ChallengeType::Http01,
        ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut responses = Responses::default();
    let mut pending = 0;
    {
        let mut authorizations = order.authorizations();
        while let Some(result) = authorizations.next().await {
            let mut authz = result.map_err(acme("fetching an authorization"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(OrderError::Validation(format!(
                        "authorization for {} is {other:?}",
                        authz.identifier()
                    )))
                }
            }
            let name = authz.identifier().to_string();
            let Some(handle) = authz.challenge(challenge_type.clone()) else {
                return Err(OrderError::NoChallenge {
                    kind: challenge.name(),
                    name,
                });
            };
            let key_authorization = handle.key_authorization();
            match challenge {
                ChallengeKind::Http01 => responses.http01.push(Http01Challenge {
                    token: handle.token.clone(),
                    key_authorization: key_authorization.as_str().to_owned(),
                }),
                ChallengeKind::TlsAlpn01 => {
                    let certificate =
                        tls_alpn_certificate(&name, key_authorization.digest().as_ref())?;
                    responses
                        .tls_alpn01
                        .push(TlsAlpn01Challenge { name, certificate });
                }
            }
            pending += 1;
        }
    }

    if pending > 0 {
        sink.publish(responses).await?;
        let mut authorizations = order.authorizations();
        while let Some(result) = authorizations.next().await {
            let mut authz = result.map_err(acme("fetching an authorization"))?;
            if authz.status != AuthorizationStatus::Pending {
                continue;
            }
            if let Some(mut handle) = authz.challenge(challenge_type.clone()) {
                handle
                    .set_ready()
                    .await
                    .map_err(acme("starting the validation"))?;
            }
        }
    }

    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(POLL_TIMEOUT);
    let status = order
        .poll_ready(&retries)
        .await
        .map_err(acme("waiting for validation"))?;
    if status != OrderStatus::Ready {
        return Err(OrderError::Validation(validation_errors(&mut order).await));
    }

    let (key_pem, csr_der) = csr(names, key_type)?;
    order
        .finalize_csr(&csr_der)
        .await
        .map_err(acme("finalizing the order"))?;
    let chain_pem = order
        .poll_certificate(&retries)
        .await
        .map_err(acme("downloading the certificate"))?;
    Ok(CertificatePem {
        chain_pem,
        key_pem,
        origin: String::new(),
    })
}

/// Collects the errors of an invalid order's challenges, one per name.
async fn validation_errors(order: &mut instant_acme::Order) -> String {
    let mut messages = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let Ok(state) = authz.refresh().await else {
            continue;
        };
        for challenge in &state.challenges {
            if let Some(problem) = &challenge.error {
                let detail = problem.detail.as_deref().unwrap_or("no detail");
                messages.push(format!("{}: {detail}", state.identifier()));
            }
        }
    }
    if messages.is_empty() {
        "the order became invalid".to_owned()
    } else {
        messages.join("; ")
    }
}

/// Generates the certificate's private key and a CSR for `names`.
fn csr(names: &[String], key_type: KeyType) -> Result<(String, Vec<u8>), OrderError> {
    let crypto = |e: rcgen::Error| OrderError::Crypto(format!("generating the CSR: {e}"));
    let key = rcgen::KeyPair::generate_for(key_type.algorithm()).map_err(crypto)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(crypto)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(crypto)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Builds the TLS-ALPN-01 certificate for `name`: self-signed, with the critical
/// `acmeIdentifier` extension that contains the SHA-256 digest of the key authorization.
fn tls_alpn_certificate(name: &str, digest: &[u8]) -> Result<CertificatePem, OrderError> {
    let crypto = |e: rcgen::Error| {
        OrderError::Crypto(format!("generating the TLS-ALPN-01 certificate: {e}"))
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(crypto)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(crypto)?;
    Ok(CertificatePem {
        chain_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        origin: format!("acme-tls-alpn-01:{name}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_alpn_certificate_has_acme_extension() {
        let pem = tls_alpn_certificate("a.test", &[7u8; 32]).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.chain_pem.as_bytes());
        use rustls_pki_types::pem::PemObject;
        let der = der.unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        // id-pe-acmeIdentifier, RFC 8737.
        let extension = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(extension.critical);
        // An OCTET STRING of 32 bytes: tag, length, digest.
        assert_eq!(extension.value, [&[0x04, 32][..], &[7u8; 32][..]].concat());
    }

    #[test]
    fn csr_for_each_key_type() {
        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
            let (key_pem, der) = csr(&["a.test".into()], key_type).unwrap();
            assert!(key_pem.contains("PRIVATE KEY"));
            assert!(!der.is_empty());
        }
    }
}
