//! The snapshot socket: the agent pushes complete snapshots here, and the edge applies them
//! and keeps the last good one on disk so that a restart serves at once, agent or not.
//!
//! One blocking thread serves the socket; compiling a snapshot happens on that thread, never
//! on a worker. Only the edge's own user and root may connect.

use std::{
    fs,
    io::{self, BufRead, BufReader, Write},
    os::unix::{
        fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use edge_proto::{
    control::{AgentMessage, EdgeMessage, MAX_MESSAGE_BYTES},
    Snapshot,
};
use tracing::{error, info, warn};

use crate::state::{self, Shared};

/// File name of the persisted snapshot inside the state directory.
pub const SNAPSHOT_FILE: &str = "edge-snapshot.json";
/// File name of the snapshot socket inside the state directory.
pub const SOCKET_FILE: &str = "edge.sock";

/// Failure to use the snapshot socket or the persisted snapshot.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot create the state directory {path}: {source}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("another process is serving the snapshot socket {path}; stop it first")]
    SocketInUse { path: PathBuf },
    #[error("cannot listen on the snapshot socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot read the persisted snapshot {path}: {reason}")]
    Read { path: PathBuf, reason: String },
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
///
/// # Errors
/// [`LinkError::StateDir`] when it cannot be created.
pub fn ensure_state_dir(dir: &Path) -> Result<(), LinkError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| LinkError::StateDir {
            path: dir.to_owned(),
            source,
        })
}

/// The last good snapshot on disk.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    path: PathBuf,
}

impl SnapshotStore {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join(SNAPSHOT_FILE),
        }
    }

    /// Loads the persisted snapshot; `Ok(None)` when there is none.
    ///
    /// # Errors
    /// [`LinkError::Read`] when the file exists but cannot be read or parsed.
    pub fn load(&self) -> Result<Option<Snapshot>, LinkError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(LinkError::Read {
                    path: self.path.clone(),
                    reason: e.to_string(),
                })
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| LinkError::Read {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }

    /// Writes the snapshot atomically (temporary file, fsync, rename) with mode 0600, since it
    /// contains private keys.
    ///
    /// # Errors
    /// The IO error of the step that failed.
    pub fn save(&self, snapshot: &Snapshot) -> io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let json = serde_json::to_vec(snapshot).map_err(io::Error::other)?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Binds the snapshot socket at `path` with mode 0600, replacing a stale socket file left by a
/// crashed edge but never one that another process still serves.
///
/// # Errors
/// [`LinkError::SocketInUse`] or [`LinkError::Bind`].
pub fn bind(path: &Path) -> Result<UnixListener, LinkError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(LinkError::SocketInUse {
                path: path.to_owned(),
            });
        }
        let _ = fs::remove_file(path);
    }
    let bind_error = |source| LinkError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// Serves agent connections one at a time until the process exits.
pub fn serve(listener: UnixListener, shared: Arc<Shared>, store: Option<SnapshotStore>) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "snapshot socket accept failed");
                continue;
            }
        };
        match peer_uid(&stream) {
            Ok(uid) if uid == 0 || uid == own_uid => {}
            Ok(uid) => {
                warn!(
                    peer_uid = uid,
                    "snapshot socket connection from another user refused"
                );
                continue;
            }
            Err(e) => {
                warn!(error = %e, "cannot read the snapshot socket peer credentials");
                continue;
            }
        }
        if let Err(e) = serve_connection(stream, &shared, store.as_ref()) {
            warn!(error = %e, "snapshot socket connection failed");
        }
    }
}

fn serve_connection(
    stream: UnixStream,
    shared: &Shared,
    store: Option<&SnapshotStore>,
) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = io::Read::take(&mut reader, MAX_MESSAGE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_MESSAGE_BYTES {
            let reply = EdgeMessage::Error {
                message: format!("message larger than {MAX_MESSAGE_BYTES} bytes"),
            };
            write_reply(&mut writer, &reply)?;
            return Ok(());
        }
        let reply = match serde_json::from_slice::<AgentMessage>(&line) {
            Ok(AgentMessage::Apply { snapshot }) => apply(shared, store, *snapshot),
            Ok(AgentMessage::Status) => {
                let compiled = shared.current.load();
                EdgeMessage::Status {
                    version: compiled.version,
                    routers: compiled.routers.len(),
                    workers: shared.settings.workers,
                    ready_workers: shared
                        .ready_workers
                        .load(std::sync::atomic::Ordering::SeqCst),
                    in_flight: shared.in_flight_totals(),
                }
            }
            Err(e) => EdgeMessage::Error {
                message: format!("invalid message: {e}"),
            },
        };
        write_reply(&mut writer, &reply)?;
    }
}

fn write_reply(writer: &mut UnixStream, reply: &EdgeMessage) -> io::Result<()> {
    let mut json = serde_json::to_vec(reply).map_err(io::Error::other)?;
    json.push(b'\n');
    writer.write_all(&json)
}

/// Compiles and publishes `snapshot`, then persists it. A snapshot that fails to compile is
/// rejected and the current one keeps serving.
pub fn apply(shared: &Shared, store: Option<&SnapshotStore>, snapshot: Snapshot) -> EdgeMessage {
    let version = snapshot.version;
    match state::compile(&snapshot, shared) {
        Ok(compiled) => {
            let routers = compiled.routers.len();
            shared.current.store(Arc::new(compiled));
            info!(version, routers, "snapshot applied");
            if let Some(store) = store {
                if let Err(e) = store.save(&snapshot) {
                    error!(version, error = %e, "cannot persist the snapshot; a restart would serve an older one");
                }
            }
            EdgeMessage::Applied { version }
        }
        Err(errors) => {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            error!(version, errors = ?errors, "snapshot rejected, the previous routes keep serving");
            EdgeMessage::Rejected { version, errors }
        }
    }
}

/// Returns the user id of the process at the other end of `stream` (SO_PEERCRED).
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a connected Unix socket owned by `stream`. `cred` and `len` point to
    // live stack values of the size passed, as SO_PEERCRED requires.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(io::Error::last_os_error())
    }
}
