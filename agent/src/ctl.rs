//! The ops control socket: `edgectl` sends one JSON request per line and gets one JSON
//! response per line. The socket is owner-only (mode 0600) and checks the peer's user id.

use std::{os::unix::fs::PermissionsExt, path::Path};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::warn;

/// File name of the control socket inside the state directory.
pub const CONTROL_SOCKET_FILE: &str = "agent.sock";

/// A request from `edgectl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum CtlRequest {
    Status,
    Routes,
    Backends,
    Errors,
    /// Stop sending new requests to the backends matching `backend` (container name, id
    /// prefix or address).
    Drain {
        backend: String,
    },
    Undrain {
        backend: String,
    },
    /// Re-read the routes file and push a fresh snapshot.
    Reload,
    /// Drop all traffic from `cidr` (an address or CIDR) in the XDP filter, for `ttl_ms`
    /// milliseconds or until unblocked.
    Block {
        cidr: String,
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    /// Remove the block of exactly `cidr`.
    Unblock {
        cidr: String,
    },
    /// List the blocked networks.
    Blocked,
    /// List the certificates that routers request from ACME resolvers.
    Certs,
    /// Order the certificates that cover `name` now, ignoring their backoff.
    RetryCert {
        name: String,
    },
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CtlResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl CtlResponse {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            data,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// A request with the channel for its answer, handled by the agent's main loop.
pub type CtlCall = (CtlRequest, oneshot::Sender<CtlResponse>);

/// Binds the control socket with mode 0600, replacing a stale socket file.
///
/// # Errors
/// Fails when another agent serves the socket or binding fails.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another agent serves {}; stop it first", path.display()),
            ));
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts `edgectl` connections and forwards their requests to the main loop.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<CtlCall>) {
    // The owner of /proc/self is the process's effective user.
    let own_uid = std::fs::metadata("/proc/self").map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 || cred.uid() == own_uid => {}
            Ok(cred) => {
                warn!(
                    peer_uid = cred.uid(),
                    "control socket connection from another user refused"
                );
                continue;
            }
            Err(e) => {
                warn!(error = %e, "cannot read the control socket peer credentials");
                continue;
            }
        }
        tokio::spawn(serve_connection(stream, calls.clone()));
    }
}

async fn serve_connection(stream: UnixStream, calls: mpsc::Sender<CtlCall>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = match serde_json::from_str::<CtlRequest>(&line) {
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                if calls.send((request, tx)).await.is_err() {
                    CtlResponse::error("the agent is shutting down")
                } else {
                    rx.await
                        .unwrap_or_else(|_| CtlResponse::error("the agent dropped the request"))
                }
            }
            Err(e) => CtlResponse::error(format!("invalid request: {e}")),
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let request = CtlRequest::Drain {
            backend: "shop-web-1".into(),
        };
        let line = serde_json::to_string(&request).unwrap();
        assert_eq!(line, r#"{"command":"drain","backend":"shop-web-1"}"#);
        let parsed: CtlRequest = serde_json::from_str(r#"{"command":"status"}"#).unwrap();
        assert_eq!(parsed, CtlRequest::Status);
        let parsed: CtlRequest =
            serde_json::from_str(r#"{"command":"block","cidr":"192.0.2.0/24"}"#).unwrap();
        assert_eq!(
            parsed,
            CtlRequest::Block {
                cidr: "192.0.2.0/24".into(),
                ttl_ms: None
            }
        );
    }
}
