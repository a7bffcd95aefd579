//! The agent's side of the snapshot socket: sends complete snapshots to the edge and reads
//! its acknowledgement, reconnecting whenever the edge restarts.

use std::{path::PathBuf, time::Duration};

use edge_proto::{
    control::{AgentMessage, EdgeMessage},
    Snapshot,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

/// Longest wait for the edge to answer one message.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to the edge's snapshot socket, opened on first use.
pub struct EdgeLink {
    path: PathBuf,
    stream: Option<BufReader<UnixStream>>,
}

impl EdgeLink {
    pub fn new(path: PathBuf) -> Self {
        Self { path, stream: None }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Sends `snapshot` and returns the edge's reply.
    ///
    /// # Errors
    /// A message saying what failed (connect, write, read, timeout); the connection is
    /// dropped and reopened on the next call.
    pub async fn apply(&mut self, snapshot: &Snapshot) -> Result<EdgeMessage, String> {
        self.exchange(&AgentMessage::Apply {
            snapshot: Box::new(snapshot.clone()),
        })
        .await
    }

    /// Asks the edge what it serves.
    ///
    /// # Errors
    /// As for [`EdgeLink::apply`].
    pub async fn status(&mut self) -> Result<EdgeMessage, String> {
        self.exchange(&AgentMessage::Status).await
    }

    async fn exchange(&mut self, message: &AgentMessage) -> Result<EdgeMessage, String> {
        let result = tokio::time::timeout(REPLY_TIMEOUT, self.exchange_inner(message)).await;
        let result = result.unwrap_or_else(|_| Err("the edge did not answer in time".into()));
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange_inner(&mut self, message: &AgentMessage) -> Result<EdgeMessage, String> {
        if self.stream.is_none() {
            let stream = UnixStream::connect(&self.path).await.map_err(|e| {
                format!("cannot connect to the edge at {}: {e}", self.path.display())
            })?;
            self.stream = Some(BufReader::new(stream));
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err("not connected".into());
        };
        let mut line = serde_json::to_vec(message).map_err(|e| e.to_string())?;
        line.push(b'\n');
        stream
            .get_mut()
            .write_all(&line)
            .await
            .map_err(|e| format!("sending to the edge failed: {e}"))?;
        let mut reply = String::new();
        let n = stream
            .read_line(&mut reply)
            .await
            .map_err(|e| format!("reading the edge's reply failed: {e}"))?;
        if n == 0 {
            return Err("the edge closed the connection".into());
        }
        serde_json::from_str(&reply).map_err(|e| format!("invalid reply from the edge: {e}"))
    }
}
