//! Messages on the snapshot socket between the agent and the edge.
//!
//! The agent connects to the edge's Unix socket and sends one JSON object per line; the edge
//! answers each with one JSON line. A snapshot is complete (never a delta), so a lost or
//! repeated message cannot leave the edge with a partial view.

use serde::{Deserialize, Serialize};

use crate::Snapshot;

/// Largest accepted message line in bytes; certificates make snapshots large, but not this.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A message from the agent to the edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// Replace the edge's routes and certificates with this snapshot. Boxed because a
    /// snapshot is far larger than the other variants; the JSON is the same.
    Apply { snapshot: Box<Snapshot> },
    /// Report what the edge serves.
    Status,
}

/// A reply from the edge to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EdgeMessage {
    /// The snapshot is being served.
    Applied { version: u64 },
    /// The snapshot was invalid; the previous one keeps serving.
    Rejected { version: u64, errors: Vec<String> },
    /// What the edge serves now.
    Status {
        version: u64,
        routers: usize,
        workers: usize,
        ready_workers: usize,
        /// Requests in flight per backend address, summed over workers (at most about 100 ms
        /// old).
        #[serde(default)]
        in_flight: std::collections::BTreeMap<String, u64>,
    },
    /// The request line could not be parsed.
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let message = AgentMessage::Apply {
            snapshot: Box::new(Snapshot {
                version: 7,
                ..Snapshot::default()
            }),
        };
        let line = serde_json::to_string(&message).unwrap();
        assert!(line.starts_with("{\"type\":\"apply\""), "{line}");
        assert_eq!(
            serde_json::from_str::<AgentMessage>(&line).unwrap(),
            message
        );
        let reply: EdgeMessage =
            serde_json::from_str("{\"type\":\"applied\",\"version\":7}").unwrap();
        assert_eq!(reply, EdgeMessage::Applied { version: 7 });
    }
}
