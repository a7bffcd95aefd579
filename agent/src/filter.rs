//! The XDP filter's pinned maps as the agent manages them: operator blocks with their TTLs
//! (`edgectl block`, `unblock`, `blocked`) and the rate limits from the agent's settings.
//!
//! The maps belong to the edge, which pins them when it loads its programs. The agent only
//! changes entries. A block's TTL is stored in the entry itself, so the kernel stops applying
//! it on time even when the agent is not running. The agent removes expired entries once a
//! second to free their slots.

use std::{path::PathBuf, time::Duration};

use edge_ebpf::{
    user::{parse_net, PinnedMaps},
    Limits, BLOCK_AUTO,
};
use serde_json::json;
use tracing::{info, warn};

use crate::ctl::{CtlRequest, CtlResponse};

/// Interval of the maintenance loop: expired blocks and limit changes.
const MAINTAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Pin directory of the maps and the limits the agent applies.
#[derive(Debug, Clone)]
pub struct FilterSettings {
    pub pin_dir: PathBuf,
    pub limits: Limits,
}

/// Handles `block`, `unblock` and `blocked`; other requests get an error.
pub fn handle(settings: &FilterSettings, request: &CtlRequest) -> CtlResponse {
    let pins = PinnedMaps::new(&settings.pin_dir);
    match request {
        CtlRequest::Block { cidr, ttl_ms } => {
            let net = match parse_net(cidr) {
                Ok(net) => net,
                Err(e) => return CtlResponse::error(e),
            };
            let ttl = ttl_ms.map(Duration::from_millis);
            match pins.block(net, ttl, edge_ebpf::BLOCK_MANUAL) {
                Ok(()) => {
                    info!(%net, ttl = ?ttl, "blocked on operator request");
                    CtlResponse::ok(json!({ "blocked": net.to_string(), "ttl_ms": ttl_ms }))
                }
                Err(e) => CtlResponse::error(e.to_string()),
            }
        }
        CtlRequest::Unblock { cidr } => {
            let net = match parse_net(cidr) {
                Ok(net) => net,
                Err(e) => return CtlResponse::error(e),
            };
            match pins.unblock(net) {
                Ok(true) => {
                    info!(%net, "unblocked on operator request");
                    CtlResponse::ok(json!({ "unblocked": net.to_string() }))
                }
                Ok(false) => CtlResponse::error(format!(
                    "{net} is not blocked; `edgectl blocked` lists the blocked networks"
                )),
                Err(e) => CtlResponse::error(e.to_string()),
            }
        }
        CtlRequest::Blocked => match pins.blocked() {
            Ok(entries) => CtlResponse::ok(json!(entries
                .iter()
                .filter(|entry| !entry.expired)
                .map(|entry| json!({
                    "cidr": entry.net.to_string(),
                    "expires_in_secs": entry.remaining.map(|d| d.as_secs()),
                    "origin": if entry.origin == BLOCK_AUTO { "auto" } else { "manual" },
                }))
                .collect::<Vec<_>>())),
            Err(e) => CtlResponse::error(e.to_string()),
        },
        _ => CtlResponse::error("not a filter request"),
    }
}

/// Removes expired blocks and keeps the pinned limits equal to the configured ones, once a
/// second, for as long as the agent runs. Waits quietly while no edge has pinned the maps.
pub async fn maintain(settings: FilterSettings) {
    let pins = PinnedMaps::new(&settings.pin_dir);
    let mut interval = tokio::time::interval(MAINTAIN_INTERVAL);
    let mut last_error: Option<String> = None;
    loop {
        interval.tick().await;
        if !pins.exists() {
            continue;
        }
        let result = maintain_once(&pins, settings.limits);
        match result {
            Ok(()) => last_error = None,
            Err(e) => {
                let text = e.to_string();
                // Logged when it changes, not every second.
                if last_error.as_deref() != Some(&text) {
                    warn!(error = %text, "cannot maintain the filter's pinned maps");
                    last_error = Some(text);
                }
            }
        }
    }
}

fn maintain_once(pins: &PinnedMaps, limits: Limits) -> Result<(), edge_ebpf::user::PinnedError> {
    for net in pins.remove_expired()? {
        info!(%net, "block expired and removed");
    }
    if pins.limits()? != limits {
        pins.set_limits(limits)?;
        info!(?limits, "applied the rate limits to the filter");
    }
    Ok(())
}
