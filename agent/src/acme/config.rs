//! The resolvers file: more named ACME resolvers than the one the `ACME_*` flags define.
//!
//! ```toml
//! [resolvers.le]
//! directory_url = "https://acme-v02.api.letsencrypt.org/directory"
//! email = "ops@example.com"
//! challenge = "tls-alpn-01"   # default http-01
//! key_type = "ec384"          # default ec256
//! ca_bundle = "/etc/edge/ca.pem"
//! ```

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

use super::{ChallengeKind, KeyType};

/// One resolver as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverFile {
    pub directory_url: String,
    pub email: Option<String>,
    /// `http-01` (default) or `tls-alpn-01`.
    pub challenge: Option<String>,
    /// `ec256` (default) or `ec384`.
    pub key_type: Option<String>,
    pub ca_bundle: Option<PathBuf>,
}

/// A resolver read from the file, with its name and parsed settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedResolver {
    pub name: String,
    pub directory_url: String,
    pub email: Option<String>,
    pub challenge: ChallengeKind,
    pub key_type: KeyType,
    pub ca_bundle: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootFile {
    #[serde(default)]
    resolvers: BTreeMap<String, ResolverFile>,
}

/// Parses a resolvers file.
///
/// # Errors
/// Every problem found, each naming its key: invalid TOML, an unknown key, an empty directory
/// URL, or an invalid challenge or key type.
pub fn parse(text: &str) -> Result<Vec<NamedResolver>, Vec<String>> {
    let root: RootFile = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
    let mut errors = Vec::new();
    let mut resolvers = Vec::new();
    for (name, file) in root.resolvers {
        let key = format!("resolvers.{name}");
        if file.directory_url.trim().is_empty() {
            errors.push(format!("{key}.directory_url: missing value"));
        }
        let challenge = match file.challenge.as_deref().unwrap_or("http-01").parse() {
            Ok(challenge) => challenge,
            Err(message) => {
                errors.push(format!("{key}.challenge: {message}"));
                ChallengeKind::Http01
            }
        };
        let key_type = match file.key_type.as_deref().unwrap_or("ec256").parse() {
            Ok(key_type) => key_type,
            Err(message) => {
                errors.push(format!("{key}.key_type: {message}"));
                KeyType::EcdsaP256
            }
        };
        resolvers.push(NamedResolver {
            name,
            directory_url: file.directory_url,
            email: file.email.filter(|e| !e.is_empty()),
            challenge,
            key_type,
            ca_bundle: file.ca_bundle,
        });
    }
    if errors.is_empty() {
        Ok(resolvers)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvers_file_parses() {
        let text = r#"
            [resolvers.le]
            directory_url = "https://ca.test/dir"
            email = "ops@example.test"

            [resolvers.staging]
            directory_url = "https://staging.test/dir"
            challenge = "tls-alpn-01"
            key_type = "ec384"
        "#;
        let resolvers = parse(text).unwrap();
        assert_eq!(resolvers.len(), 2);
        assert_eq!(resolvers[0].name, "le");
        assert_eq!(resolvers[0].challenge, ChallengeKind::Http01);
        assert_eq!(resolvers[0].email.as_deref(), Some("ops@example.test"));
        assert_eq!(resolvers[1].challenge, ChallengeKind::TlsAlpn01);
        assert_eq!(resolvers[1].key_type, KeyType::EcdsaP384);
    }

    #[test]
    fn resolvers_file_errors_name_keys() {
        let text = r#"
            [resolvers.le]
            directory_url = ""
            challenge = "dns-01"
        "#;
        let errors = parse(text).unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0], "resolvers.le.directory_url: missing value");
        assert!(errors[1].starts_with("resolvers.le.challenge: invalid challenge type"));
        assert!(parse("[resolvers.le]\ndirectory = 1\n").is_err());
    }
}
