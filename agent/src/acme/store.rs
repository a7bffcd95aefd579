//! ACME storage on disk: the account credentials and, per certificate, its chain, its private
//! key and its retry state.
//!
//! ```text
//! STORAGE/RESOLVER/account.json          directory URL and account credentials (0600)
//! STORAGE/RESOLVER/certs/ID/cert.pem     leaf first, then intermediates
//! STORAGE/RESOLVER/certs/ID/key.pem      private key (0600)
//! STORAGE/RESOLVER/certs/ID/state.json   failures, last error, next attempt
//! ```
//!
//! Every file is written to a temporary name with mode 0600, synced, then renamed over the old
//! one, so a crash leaves either the old or the new file and never a torn one.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// A storage operation that failed, with the path involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading, writing or renaming a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A stored JSON file cannot be parsed.
    #[error("{path}: invalid content: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The retry state of one certificate, persisted before each order starts so that a crash
/// loop waits as long as a failed order would.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryState {
    /// Orders started since the last success, counting one still running.
    pub failures: u32,
    /// Unix seconds before which no new order starts.
    pub next_attempt_unix: Option<i64>,
    /// The error of the last failed order.
    pub last_error: Option<String>,
    /// Unix seconds when the last order started.
    pub last_attempt_unix: Option<i64>,
}

/// A certificate chain and its key as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCert {
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for StoredCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCert")
            .field("chain_pem_bytes", &self.chain_pem.len())
            .finish_non_exhaustive()
    }
}

/// The storage directory of one resolver.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (without touching the disk) the storage of `resolver` under `storage`.
    pub fn new(storage: &Path, resolver: &str) -> Self {
        Self {
            root: storage.join(sanitize(resolver)),
        }
    }

    /// Returns the account file.
    pub fn account_path(&self) -> PathBuf {
        self.root.join("account.json")
    }

    /// Returns the directory of the certificate with `id`.
    pub fn cert_dir(&self, id: &str) -> PathBuf {
        self.root.join("certs").join(id)
    }

    /// Reads the stored certificate `id`, if both files exist.
    ///
    /// # Errors
    /// A file exists but cannot be read.
    pub fn load_cert(&self, id: &str) -> Result<Option<StoredCert>, StoreError> {
        let dir = self.cert_dir(id);
        let Some(chain_pem) = read_optional(&dir.join("cert.pem"))? else {
            return Ok(None);
        };
        let Some(key_pem) = read_optional(&dir.join("key.pem"))? else {
            return Ok(None);
        };
        Ok(Some(StoredCert { chain_pem, key_pem }))
    }

    /// Stores the certificate `id`: the key first, so a stored chain always has its key.
    ///
    /// # Errors
    /// Creating the directory or writing a file failed.
    pub fn save_cert(&self, id: &str, cert: &StoredCert) -> Result<(), StoreError> {
        let dir = self.cert_dir(id);
        create_dir(&dir)?;
        write_atomic(&dir.join("key.pem"), cert.key_pem.as_bytes())?;
        write_atomic(&dir.join("cert.pem"), cert.chain_pem.as_bytes())
    }

    /// Reads the retry state of certificate `id`; a missing file is the initial state.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed.
    pub fn load_retry(&self, id: &str) -> Result<RetryState, StoreError> {
        let path = self.cert_dir(id).join("state.json");
        match read_optional(&path)? {
            None => Ok(RetryState::default()),
            Some(text) => serde_json::from_str(&text).map_err(|e| StoreError::Invalid {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Writes the retry state of certificate `id`.
    ///
    /// # Errors
    /// Creating the directory or writing the file failed.
    pub fn save_retry(&self, id: &str, state: &RetryState) -> Result<(), StoreError> {
        let dir = self.cert_dir(id);
        create_dir(&dir)?;
        let path = dir.join("state.json");
        let json = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &json)
    }

    /// Reads the account file.
    ///
    /// # Errors
    /// The file exists but cannot be read.
    pub fn load_account(&self) -> Result<Option<String>, StoreError> {
        read_optional(&self.account_path())
    }

    /// Writes the account file.
    ///
    /// # Errors
    /// Creating the directory or writing the file failed.
    pub fn save_account(&self, json: &[u8]) -> Result<(), StoreError> {
        create_dir(&self.root)?;
        write_atomic(&self.account_path(), json)
    }
}

/// Returns the storage id of a certificate for `names` (main name first): the main name, made
/// safe for a file name, and a hash of all names, so another name set gets another id.
pub fn cert_id(names: &[String]) -> String {
    // FNV-1a, because std's hasher is not guaranteed to be stable across Rust releases.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for name in names {
        for byte in name.bytes().chain(std::iter::once(b'\n')) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let main = names.first().map_or("", String::as_str);
    format!("{}-{:08x}", sanitize(main), hash as u32)
}

/// Keeps ASCII letters, digits, `.`, `-` and `_`, and replaces everything else with `_`.
fn sanitize(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    // A name of dots only would be `.` or `..` as a path component.
    if cleaned.chars().all(|c| c == '.') {
        format!("_{cleaned}")
    } else {
        cleaned
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, StoreError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Writes `bytes` to a temporary file with mode 0600, syncs it, and renames it to `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let io_error = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_error)?;
    file.write_all(bytes).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("edge-acme-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn cert_round_trip_private_modes() {
        let dir = temp_dir("store");
        let store = Store::new(&dir, "le");
        let cert = StoredCert {
            chain_pem: "CHAIN".into(),
            key_pem: "KEY".into(),
        };
        assert_eq!(store.load_cert("a").unwrap(), None);
        store.save_cert("a", &cert).unwrap();
        assert_eq!(store.load_cert("a").unwrap(), Some(cert));
        let mode = fs::metadata(store.cert_dir("a").join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!store.cert_dir("a").join("key.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn retry_state_round_trip() {
        let dir = temp_dir("retry");
        let store = Store::new(&dir, "le");
        assert_eq!(store.load_retry("a").unwrap(), RetryState::default());
        let state = RetryState {
            failures: 2,
            next_attempt_unix: Some(5),
            last_error: Some("timed out".into()),
            last_attempt_unix: Some(1),
        };
        store.save_retry("a", &state).unwrap();
        assert_eq!(store.load_retry("a").unwrap(), state);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cert_id_depends_on_all_names() {
        let one = cert_id(&["a.test".into(), "www.a.test".into()]);
        let other = cert_id(&["a.test".into()]);
        assert!(one.starts_with("a.test-"), "{one}");
        assert_ne!(one, other);
        assert_eq!(sanitize("../x"), ".._x");
        assert_eq!(sanitize(".."), "_..");
    }
}
