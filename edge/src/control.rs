//! The control thread: signals, and reloading the routes file when it changes.
//!
//! A new file is parsed and compiled here, off the workers, and published with one pointer
//! swap. A file that fails either step is rejected with every error logged, and the running
//! snapshot keeps serving.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use edge_proto::Snapshot;
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};
use tracing::{error, info, warn};

use crate::state::{self, Shared};

/// How often pending signals are checked.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Identity of one version of the routes file: modification time, size and inode (an editor
/// or a config-map update replaces the file rather than writing it in place).
pub type Fingerprint = (SystemTime, u64, u64);

pub fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// Loads and parses a routes file, returning every error as `key: message` lines.
pub fn load_routes(path: &Path) -> Result<Snapshot, Vec<String>> {
    edge_proto::file::load(path)
        .map_err(|errors| errors.0.iter().map(ToString::to_string).collect())
}

/// Watches the routes file and the process signals until SIGTERM or SIGINT.
pub struct Control {
    shared: Arc<Shared>,
    routes_file: Option<PathBuf>,
    last_seen: Option<Fingerprint>,
    version: u64,
    reload_interval: Duration,
}

impl Control {
    /// `last_seen` is the fingerprint taken before the running routes were loaded, so a file
    /// replaced during start-up is still reloaded.
    pub fn new(
        shared: Arc<Shared>,
        routes_file: Option<PathBuf>,
        last_seen: Option<Fingerprint>,
        version: u64,
        reload_interval: Duration,
    ) -> Self {
        Self {
            shared,
            routes_file,
            last_seen,
            version,
            reload_interval,
        }
    }

    /// Runs until a stop signal arrives, and returns its number.
    ///
    /// # Errors
    /// Fails when the signal handlers cannot be installed.
    pub fn run(mut self) -> std::io::Result<i32> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let mut next_check = Instant::now() + self.reload_interval;
        loop {
            for signal in signals.pending() {
                match signal {
                    SIGHUP => {
                        info!("SIGHUP received, reloading the routes file");
                        self.reload();
                    }
                    other => return Ok(other),
                }
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + self.reload_interval;
                if let Some(path) = &self.routes_file {
                    let current = fingerprint(path);
                    if current.is_none() && self.last_seen.is_some() {
                        warn!(path = %path.display(), "routes file not found, the previous routes keep serving");
                        self.last_seen = None;
                    } else if current.is_some() && current != self.last_seen {
                        self.last_seen = current;
                        info!(path = %path.display(), "routes file changed, reloading");
                        self.reload();
                    }
                }
            }
            std::thread::sleep(SIGNAL_POLL);
        }
    }

    fn reload(&mut self) {
        let Some(path) = &self.routes_file else {
            return;
        };
        let mut snapshot = match load_routes(path) {
            Ok(s) => s,
            Err(errors) => {
                log_rejected(path, &errors);
                return;
            }
        };
        snapshot.version = self.version + 1;
        match state::compile(&snapshot, &self.shared) {
            Ok(compiled) => {
                self.version = snapshot.version;
                let routers = compiled.routers.len();
                self.shared.current.store(Arc::new(compiled));
                info!(version = self.version, routers, "routes reloaded");
            }
            Err(errors) => {
                let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                log_rejected(path, &errors);
            }
        }
    }
}

/// Logs each error of a rejected routes file on its own line, then the outcome.
fn log_rejected(path: &Path, errors: &[String]) {
    for e in errors {
        error!(path = %path.display(), "{e}");
    }
    error!(path = %path.display(), errors = errors.len(), "routes file rejected, the previous routes keep serving");
}
