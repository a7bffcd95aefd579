//! The manager task: loads stored certificates, starts orders when certificates are missing
//! or due for renewal, and records each outcome. Owned by [`super::start`].

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use edge_proto::CertificatePem;
use tokio::{sync::watch, task::JoinSet};
use tracing::{error, info, warn};

use super::{
    order::{self, ChallengeSink, OrderError, Responses},
    store::{cert_id, RetryState, Store, StoredCert},
    ResolverConfig,
};
use crate::desired::CertificateRequest;

/// Maximum wait for the edge to serve published challenge responses.
const EDGE_APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum time between two checks of renewal times.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Maximum orders running at once, so that many new sites do not flood the CA; the others
/// start as these finish.
const MAX_CONCURRENT_ORDERS: usize = 4;
/// Maximum time one order may take, from the first request to the downloaded chain.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);

/// A certificate being tracked by the manager.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) resolver: String,
    pub(super) names: Vec<String>,
    pub(super) routers: Vec<String>,
    pub(super) served: Option<Served>,
    pub(super) retry: RetryState,
    pub(super) running: bool,
    /// Reason no order can run, such as an unknown resolver or a wildcard name.
    pub(super) disabled: Option<String>,
}

/// The served certificate of an entry and what the agent read from it.
#[derive(Debug, Clone)]
pub(super) struct Served {
    pub(super) pem: CertificatePem,
    pub(super) issuer: Option<String>,
    pub(super) not_before: i64,
    pub(super) not_after: i64,
}

impl Served {
    /// Returns the renewal time: two thirds into the validity period.
    // NOTE: ACME renewal information (ARI) is not used: Debian's pebble 2.4 does not offer it,
    // so it could not be tested here.
    pub(super) fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) * 2 / 3
    }
}

/// State shared by the manager, its order tasks and the main loop.
#[derive(Debug, Default)]
pub(super) struct SharedState {
    pub(super) entries: BTreeMap<String, Entry>,
    /// Challenge responses by certificate id.
    pub(super) challenges: BTreeMap<String, Responses>,
    /// Increases whenever `challenges` changes.
    pub(super) challenge_generation: u64,
}

/// A configured resolver with its storage and its account, registered on first use.
pub(super) struct Resolver {
    pub(super) config: ResolverConfig,
    pub(super) store: Store,
    pub(super) account: tokio::sync::Mutex<Option<instant_acme::Account>>,
}

pub(super) struct Manager {
    pub(super) resolvers: BTreeMap<String, Arc<Resolver>>,
    pub(super) shared: Arc<Mutex<SharedState>>,
    pub(super) changed: watch::Sender<u64>,
    pub(super) applied: watch::Receiver<u64>,
}

impl Manager {
    pub(super) async fn run(self, mut requests: watch::Receiver<Vec<CertificateRequest>>) {
        let mut orders: JoinSet<()> = JoinSet::new();
        loop {
            let current = requests.borrow_and_update().clone();
            if self.sync(&current) {
                self.notify();
            }
            let sleep = self.start_due_orders(&mut orders);
            tokio::select! {
                result = requests.changed() => {
                    if result.is_err() {
                        return;
                    }
                }
                Some(_) = orders.join_next(), if !orders.is_empty() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Makes the entries match `requests`: loads stored certificates and retry states for new
    /// ones and drops the others. Returns whether the served certificates changed.
    fn sync(&self, requests: &[CertificateRequest]) -> bool {
        let mut shared = lock(&self.shared);
        let mut requested = BTreeSet::new();
        let mut changed = false;
        for request in requests {
            let id = format!("{}/{}", request.resolver, cert_id(&request.names));
            requested.insert(id.clone());
            if let Some(entry) = shared.entries.get_mut(&id) {
                entry.routers = request.routers.clone();
                continue;
            }
            let entry = self.load_entry(id.clone(), request);
            changed |= entry.served.is_some();
            shared.entries.insert(id, entry);
        }
        let before = shared.entries.len();
        shared
            .entries
            .retain(|id, entry| requested.contains(id) || entry.running);
        changed | (shared.entries.len() != before)
    }

    fn load_entry(&self, id: String, request: &CertificateRequest) -> Entry {
        let mut entry = Entry {
            id,
            resolver: request.resolver.clone(),
            names: request.names.clone(),
            routers: request.routers.clone(),
            served: None,
            retry: RetryState::default(),
            running: false,
            disabled: None,
        };
        let Some(resolver) = self.resolvers.get(&request.resolver) else {
            entry.disabled = Some(format!(
                "certificate resolver {:?} is not configured; define it with ACME_DIRECTORY_URL and ACME_RESOLVER, or in ACME_RESOLVERS_FILE",
                request.resolver
            ));
            return entry;
        };
        if let Some(name) = request.names.iter().find(|n| n.contains('*')) {
            entry.disabled = Some(format!(
                "{name} is a wildcard, which needs the DNS-01 challenge; only {} is configured",
                resolver.config.challenge.name()
            ));
            return entry;
        }
        let file_id = cert_id(&request.names);
        match resolver.store.load_retry(&file_id) {
            Ok(retry) => entry.retry = retry,
            Err(e) => warn!(error = %e, "cannot read the ACME retry state; starting afresh"),
        }
        match resolver.store.load_cert(&file_id) {
            Ok(Some(stored)) => match inspect(&stored, &request.names, &resolver.config.name) {
                Ok(served) if served.not_after > now_unix() => {
                    info!(names = ?request.names, not_after = served.not_after, "stored certificate reused");
                    entry.served = Some(served);
                }
                Ok(_) => {
                    info!(names = ?request.names, "stored certificate has expired; ordering a new one")
                }
                Err(reason) => {
                    warn!(names = ?request.names, reason, "stored certificate not usable; ordering a new one")
                }
            },
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot read the stored certificate"),
        }
        entry
    }

    /// Starts an order for every entry that has no valid certificate or is due for renewal,
    /// unless its backoff is running. Returns how long to sleep until the next due time.
    fn start_due_orders(&self, orders: &mut JoinSet<()>) -> Duration {
        let now = now_unix();
        let mut next_due = now + MAX_SLEEP.as_secs() as i64;
        let mut to_start = Vec::new();
        {
            let mut shared = lock(&self.shared);
            let mut running = shared.entries.values().filter(|e| e.running).count();
            for entry in shared.entries.values_mut() {
                if entry.running || entry.disabled.is_some() {
                    continue;
                }
                if running >= MAX_CONCURRENT_ORDERS {
                    // A finishing order wakes the manager, which starts the next one.
                    break;
                }
                let Some(resolver) = self.resolvers.get(&entry.resolver) else {
                    continue;
                };
                let due = entry.served.as_ref().map_or(now, Served::renew_at);
                let allowed = entry.retry.next_attempt_unix.unwrap_or(0);
                let start_at = due.max(allowed);
                if start_at > now {
                    next_due = next_due.min(start_at);
                    continue;
                }
                // Record the attempt and its backoff before any request reaches the CA.
                entry.retry.failures = entry.retry.failures.saturating_add(1);
                let delay = backoff(&resolver.config, entry.retry.failures);
                entry.retry.next_attempt_unix = Some(now + delay.as_secs() as i64);
                entry.retry.last_attempt_unix = Some(now);
                let file_id = cert_id(&entry.names);
                if let Err(e) = resolver.store.save_retry(&file_id, &entry.retry) {
                    // Without a record on disk a crash loop could order again and again.
                    error!(error = %e, names = ?entry.names, "cannot record the ACME attempt; not ordering until storage is writable");
                    entry.retry.last_error = Some(format!("storage is not writable: {e}"));
                    next_due = next_due.min(now + delay.as_secs() as i64);
                    continue;
                }
                entry.running = true;
                running += 1;
                to_start.push((
                    entry.id.clone(),
                    entry.names.clone(),
                    resolver.clone(),
                    entry.served.is_some(),
                ));
            }
        }
        for (id, names, resolver, renewing) in to_start {
            let task = OrderTask {
                id,
                names,
                resolver,
                renewing,
                shared: self.shared.clone(),
                changed: self.changed.clone(),
                applied: self.applied.clone(),
            };
            orders.spawn(task.run());
        }
        Duration::from_secs(next_due.saturating_sub(now).max(1) as u64)
    }
}

/// Returns the wait after `failures` failed orders: `retry_base` doubled per further failure,
/// at most `retry_max`.
fn backoff(config: &ResolverConfig, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    config
        .retry_base
        .saturating_mul(1u32 << doublings)
        .min(config.retry_max)
}

/// One running order.
struct OrderTask {
    id: String,
    names: Vec<String>,
    resolver: Arc<Resolver>,
    renewing: bool,
    shared: Arc<Mutex<SharedState>>,
    changed: watch::Sender<u64>,
    applied: watch::Receiver<u64>,
}

impl OrderTask {
    async fn run(self) {
        let config = &self.resolver.config;
        info!(names = ?self.names, resolver = %config.name, renewing = self.renewing, "ordering a certificate");
        let mut rate_limited = false;
        let result = match tokio::time::timeout(ORDER_TIMEOUT, self.order()).await {
            Ok(result) => result.map_err(|e| {
                rate_limited = is_rate_limited(&e);
                error_chain(&e)
            }),
            Err(_) => Err(format!("the order took longer than {ORDER_TIMEOUT:?}")),
        };

        let challenges_removed = self.clear_challenges();
        let outcome = result.and_then(|pem| self.store_issued(pem));
        let issued = self.record(outcome, rate_limited);
        if challenges_removed || issued {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Checks an issued certificate and writes it to storage.
    fn store_issued(&self, pem: CertificatePem) -> Result<Served, String> {
        let stored = StoredCert {
            chain_pem: pem.chain_pem,
            key_pem: pem.key_pem,
        };
        let served = inspect(&stored, &self.names, &self.resolver.config.name)?;
        self.resolver
            .store
            .save_cert(&cert_id(&self.names), &stored)
            .map_err(|e| format!("the certificate was issued but cannot be stored: {e}"))?;
        Ok(served)
    }

    /// Records the outcome in the entry and its retry state on disk; a rate-limited order waits
    /// the maximum backoff. Returns whether a new certificate is to be served.
    fn record(&self, outcome: Result<Served, String>, rate_limited: bool) -> bool {
        let mut shared = lock(&self.shared);
        let Some(entry) = shared.entries.get_mut(&self.id) else {
            return false;
        };
        entry.running = false;
        let issued = match outcome {
            Ok(served) => {
                info!(names = ?self.names, not_after = served.not_after, issuer = ?served.issuer, "certificate issued");
                entry.retry = RetryState::default();
                entry.served = Some(served);
                true
            }
            Err(message) => {
                if rate_limited {
                    // NOTE: the CA's Retry-After is not available through instant-acme's
                    // errors, so the maximum backoff is used instead.
                    let max = self.resolver.config.retry_max.as_secs() as i64;
                    let next = entry.retry.next_attempt_unix.unwrap_or(0);
                    entry.retry.next_attempt_unix = Some(next.max(now_unix() + max));
                }
                let next = entry.retry.next_attempt_unix.unwrap_or(0);
                error!(names = ?self.names, error = %message, next_retry_unix = next, "ACME order failed");
                entry.retry.last_error = Some(message);
                false
            }
        };
        if let Err(e) = self
            .resolver
            .store
            .save_retry(&cert_id(&self.names), &entry.retry)
        {
            error!(error = %e, "cannot store the ACME retry state");
        }
        issued
    }

    async fn order(&self) -> Result<CertificatePem, OrderError> {
        let config = &self.resolver.config;
        let account = {
            let mut slot = self.resolver.account.lock().await;
            match slot.as_ref() {
                Some(account) => account.clone(),
                None => {
                    let account = order::account(
                        &self.resolver.store,
                        &config.directory_url,
                        config.email.as_deref(),
                        config.ca_bundle.as_deref(),
                    )
                    .await?;
                    *slot = Some(account.clone());
                    account
                }
            }
        };
        order::order_certificate(
            &account,
            &self.names,
            config.challenge,
            config.key_type,
            self,
        )
        .await
    }

    /// Removes this order's challenge responses. Returns whether there were any.
    fn clear_challenges(&self) -> bool {
        let mut shared = lock(&self.shared);
        if shared.challenges.remove(&self.id).is_some() {
            shared.challenge_generation += 1;
            true
        } else {
            false
        }
    }
}

impl ChallengeSink for OrderTask {
    async fn publish(&self, responses: Responses) -> Result<(), OrderError> {
        let generation = {
            let mut shared = lock(&self.shared);
            shared.challenges.insert(self.id.clone(), responses);
            shared.challenge_generation += 1;
            shared.challenge_generation
        };
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        let mut applied = self.applied.clone();
        let served = tokio::time::timeout(
            EDGE_APPLY_TIMEOUT,
            applied.wait_for(|current| *current >= generation),
        )
        .await
        .is_ok_and(|result| result.is_ok());
        if served {
            Ok(())
        } else {
            Err(OrderError::EdgeNotReady(EDGE_APPLY_TIMEOUT))
        }
    }
}

/// Parses a stored or issued certificate and checks that its leaf covers `names` and that its
/// key matches.
fn inspect(stored: &StoredCert, names: &[String], resolver: &str) -> Result<Served, String> {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let leaf = CertificateDer::pem_slice_iter(stored.chain_pem.as_bytes())
        .next()
        .ok_or("no certificate in the chain")?
        .map_err(|e| format!("invalid chain PEM: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(stored.key_pem.as_bytes())
        .map_err(|e| format!("invalid key PEM: {e}"))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("unsupported key: {e}"))?;
    let certified = rustls::sign::CertifiedKey::new(vec![leaf.clone()], signing_key);
    certified
        .keys_match()
        .map_err(|_| "the key does not match the certificate".to_owned())?;

    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let mut covered = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                covered.insert(dns.to_ascii_lowercase());
            }
        }
    }
    if let Some(missing) = names.iter().find(|n| !covered.contains(*n)) {
        return Err(format!("the certificate does not cover {missing}"));
    }
    let issuer = cert
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Ok(Served {
        pem: CertificatePem {
            chain_pem: stored.chain_pem.clone(),
            key_pem: stored.key_pem.clone(),
            origin: format!("acme:{resolver}:{}", names.join(",")),
        },
        issuer,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Returns whether the CA rejected a request because of its rate limits.
fn is_rate_limited(error: &OrderError) -> bool {
    match error {
        OrderError::Acme {
            source: instant_acme::Error::Api(problem),
            ..
        } => problem
            .r#type
            .as_deref()
            .is_some_and(|t| t == "urn:ietf:params:acme:error:rateLimited"),
        _ => false,
    }
}

/// Formats an error with its sources, skipping a source whose text the message already has,
/// so that "client error (Connect)" also names the refused connection.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub(super) fn lock(shared: &Mutex<SharedState>) -> std::sync::MutexGuard<'_, SharedState> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::acme::{ChallengeKind, KeyType};

    fn config() -> ResolverConfig {
        ResolverConfig {
            name: "le".into(),
            directory_url: "https://127.0.0.1:1/dir".into(),
            email: None,
            challenge: ChallengeKind::Http01,
            key_type: KeyType::EcdsaP256,
            ca_bundle: None,
            storage: PathBuf::from("/nonexistent"),
            retry_base: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
        }
    }

    /// Returns a manager with resolver `le` storing under `storage`.
    fn manager(storage: &std::path::Path) -> Manager {
        let mut config = config();
        config.storage = storage.to_owned();
        let resolver = Resolver {
            store: Store::new(storage, "le"),
            config,
            account: tokio::sync::Mutex::new(None),
        };
        let (changed, _) = watch::channel(0);
        let (_, applied) = watch::channel(0);
        Manager {
            resolvers: BTreeMap::from([("le".to_owned(), Arc::new(resolver))]),
            shared: Arc::new(Mutex::new(SharedState::default())),
            changed,
            applied,
        }
    }

    fn request(resolver: &str, names: &[&str]) -> CertificateRequest {
        CertificateRequest {
            resolver: resolver.to_owned(),
            names: names.iter().map(|n| n.to_string()).collect(),
            routers: vec!["r".to_owned()],
        }
    }

    #[test]
    fn sync_reuses_storage_and_skips_backoff() {
        let storage = std::env::temp_dir().join(format!("edge-acme-sync-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&storage);
        let store = Store::new(&storage, "le");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["stored.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let stored = StoredCert {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        store
            .save_cert(&cert_id(&["stored.test".to_owned()]), &stored)
            .unwrap();
        let waiting = RetryState {
            failures: 3,
            next_attempt_unix: Some(now_unix() + 3600),
            last_error: Some("timed out".to_owned()),
            last_attempt_unix: Some(now_unix()),
        };
        store
            .save_retry(&cert_id(&["waiting.test".to_owned()]), &waiting)
            .unwrap();

        let manager = manager(&storage);
        let requests = [
            request("le", &["stored.test"]),
            request("le", &["waiting.test"]),
            request("le", &["*.wild.test"]),
            request("other", &["other.test"]),
        ];
        assert!(manager.sync(&requests));
        let mut orders = JoinSet::new();
        manager.start_due_orders(&mut orders);
        assert!(orders.is_empty(), "no certificate is due for an order");

        let shared = lock(&manager.shared);
        let entry = |name: &str| {
            shared
                .entries
                .values()
                .find(|e| e.names[0] == name)
                .unwrap()
        };
        assert!(entry("stored.test").served.is_some());
        assert_eq!(entry("waiting.test").retry, waiting);
        let wildcard = entry("*.wild.test").disabled.clone().unwrap();
        assert!(wildcard.contains("DNS-01"), "{wildcard}");
        let other = entry("other.test").disabled.clone().unwrap();
        assert!(other.contains("not configured"), "{other}");
        drop(shared);
        std::fs::remove_dir_all(&storage).unwrap();
    }

    #[test]
    fn backoff_doubles_up_to_cap() {
        let config = config();
        assert_eq!(backoff(&config, 1), Duration::from_secs(60));
        assert_eq!(backoff(&config, 2), Duration::from_secs(120));
        assert_eq!(backoff(&config, 4), Duration::from_secs(480));
        assert_eq!(backoff(&config, 7), Duration::from_secs(3600));
        assert_eq!(backoff(&config, u32::MAX), Duration::from_secs(3600));
    }

    #[test]
    fn renewal_at_two_thirds() {
        let served = Served {
            pem: CertificatePem {
                chain_pem: String::new(),
                key_pem: String::new(),
                origin: String::new(),
            },
            issuer: None,
            not_before: 1_000,
            not_after: 1_000 + 90,
        };
        assert_eq!(served.renew_at(), 1_060);
    }

    #[test]
    fn inspect_checks_names_and_key() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.test".into(), "b.test".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let stored = StoredCert {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        let names = vec!["a.test".to_owned(), "b.test".to_owned()];
        assert!(inspect(&stored, &names, "le").is_ok());
        let more = vec!["a.test".to_owned(), "c.test".to_owned()];
        assert_eq!(
            inspect(&stored, &more, "le").unwrap_err(),
            "the certificate does not cover c.test"
        );
        let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mismatched = StoredCert {
            chain_pem: cert.pem(),
            key_pem: other_key.serialize_pem(),
        };
        assert!(inspect(&mismatched, &names, "le").is_err());
    }

    #[test]
    fn rate_limited_problem_detected() {
        let problem = |kind: &str| OrderError::Acme {
            step: "creating the order",
            source: instant_acme::Error::Api(
                serde_json::from_value(serde_json::json!({ "type": kind, "status": 429 })).unwrap(),
            ),
        };
        assert!(is_rate_limited(&problem(
            "urn:ietf:params:acme:error:rateLimited"
        )));
        assert!(!is_rate_limited(&problem(
            "urn:ietf:params:acme:error:connection"
        )));
        assert!(!is_rate_limited(&OrderError::Crypto("x".into())));
    }
}
