//! The XDP filter's pinned maps as the agent manages them: operator blocks with their TTLs
//! (`edgectl block`, `unblock`, `blocked`) and the rate limits from the agent's settings.
//!
//! The maps belong to the edge, which pins them when it loads its programs. The agent only
//! changes entries. A block's TTL is stored in the entry itself, so the kernel stops applying
//! it on time even when the agent is not running. The agent removes expired entries once a
//! second to free their slots.
//!
//! Operator blocks are also kept in `STATE_DIR/agent-blocks.json` with their wall-clock expiry.
//! Pins vanish at a reboot, and an edge upgrade may replace an incompatible pin, so every
//! second the agent puts back each saved block that is missing from the maps.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use edge_ebpf::{
    user::{parse_net, PinnedError, PinnedMaps},
    Limits, BLOCK_AUTO,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{error, info, warn};

use crate::ctl::{CtlRequest, CtlResponse};

/// Interval of the maintenance loop: expired blocks and limit changes.
const MAINTAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Pin directory of the maps and the limits the agent applies.
#[derive(Debug, Clone)]
pub struct FilterSettings {
    pub pin_dir: PathBuf,
    pub limits: Limits,
    /// File that keeps operator blocks across reboots; none: not kept.
    pub blocks_file: Option<PathBuf>,
}

/// An operator block as saved in the blocks file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedBlock {
    cidr: IpNet,
    /// Wall-clock expiry in ms since the Unix epoch; none for a permanent block.
    expires_unix_ms: Option<u64>,
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn load_blocks(path: &Path) -> Vec<SavedBlock> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            error!(path = %path.display(), error = %e, "ignoring the invalid blocks file");
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            error!(path = %path.display(), error = %e, "cannot read the blocks file");
            Vec::new()
        }
    }
}

fn save_blocks(path: &Path, blocks: &[SavedBlock]) {
    let result = serde_json::to_vec_pretty(blocks)
        .map_err(std::io::Error::other)
        .and_then(|json| {
            use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
            let tmp = path.with_extension("json.tmp");
            // Owner-only, like the agent's other state files.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = result {
        error!(path = %path.display(), error = %e, "cannot save the blocks; they will be lost at a reboot");
    }
}

/// Applies `change` to the saved blocks, when a blocks file is configured.
fn update_saved(settings: &FilterSettings, change: impl FnOnce(&mut Vec<SavedBlock>)) {
    let Some(path) = &settings.blocks_file else {
        return;
    };
    let mut blocks = load_blocks(path);
    change(&mut blocks);
    save_blocks(path, &blocks);
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
            if net.prefix_len() == 0 {
                return CtlResponse::error(format!(
                    "invalid block {net}: it matches every {} source, so block a narrower network",
                    if net.addr().is_ipv4() { "IPv4" } else { "IPv6" }
                ));
            }
            if *ttl_ms == Some(0) {
                return CtlResponse::error("invalid TTL 0: give a positive duration such as 10m, or none for a permanent block");
            }
            let ttl = ttl_ms.map(Duration::from_millis);
            let save = |settings: &FilterSettings| {
                update_saved(settings, |blocks| {
                    blocks.retain(|b| b.cidr != net);
                    blocks.push(SavedBlock {
                        cidr: net,
                        expires_unix_ms: ttl_ms.map(|ms| unix_now_ms().saturating_add(ms)),
                    });
                });
            };
            match pins.block(net, ttl, edge_ebpf::BLOCK_MANUAL) {
                Ok(()) => {
                    info!(%net, ttl = ?ttl, "blocked on operator request");
                    save(settings);
                    CtlResponse::ok(json!({ "blocked": net.to_string(), "ttl_ms": ttl_ms }))
                }
                Err(PinnedError::NotPinned { .. }) if settings.blocks_file.is_some() => {
                    info!(%net, ttl = ?ttl, "saved a block for when the edge loads its filter");
                    save(settings);
                    CtlResponse::ok(json!({
                        "blocked": net.to_string(),
                        "ttl_ms": ttl_ms,
                        "pending": format!(
                            "no pinned maps in {}: the edge has not loaded its filter, uses \
                             another --bpf-pin-dir, or runs in another mount namespace; the \
                             block applies once the maps appear there",
                            settings.pin_dir.display()
                        ),
                    }))
                }
                Err(e) => CtlResponse::error(e.to_string()),
            }
        }
        CtlRequest::Unblock { cidr } => {
            let net = match parse_net(cidr) {
                Ok(net) => net,
                Err(e) => return CtlResponse::error(e),
            };
            let mut saved = false;
            update_saved(settings, |blocks| {
                let before = blocks.len();
                blocks.retain(|b| b.cidr != net);
                saved = blocks.len() != before;
            });
            match pins.unblock(net) {
                Ok(false) | Err(PinnedError::NotPinned { .. }) if saved => {
                    // Saved but not in the maps (not restored yet): removing it was enough.
                    info!(%net, "unblocked on operator request");
                    CtlResponse::ok(json!({ "unblocked": net.to_string() }))
                }
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
            Err(PinnedError::NotPinned { .. }) if settings.blocks_file.is_some() => {
                // The edge has not loaded its filter: list the saved blocks, which apply
                // when it does.
                let now = unix_now_ms();
                let blocks = settings
                    .blocks_file
                    .as_deref()
                    .map(load_blocks)
                    .unwrap_or_default();
                CtlResponse::ok(json!(blocks
                    .iter()
                    .filter(|b| b.expires_unix_ms.is_none_or(|at| at > now))
                    .map(|b| json!({
                        "cidr": b.cidr.to_string(),
                        "expires_in_secs": b.expires_unix_ms.map(|at| (at - now) / 1000),
                        "origin": "pending",
                    }))
                    .collect::<Vec<_>>()))
            }
            Err(e) => CtlResponse::error(e.to_string()),
        },
        _ => CtlResponse::error("not a filter request"),
    }
}

/// Describes the filter for `edgectl status`: whether its maps are pinned, the number of
/// blocks, the limits in force and the drop counters.
pub fn status_json(settings: &FilterSettings) -> serde_json::Value {
    let pins = PinnedMaps::new(&settings.pin_dir);
    if !pins.exists() {
        return json!({ "loaded": false, "pin_dir": settings.pin_dir.display().to_string() });
    }
    let blocked = pins
        .blocked()
        .map(|entries| entries.iter().filter(|e| !e.expired).count())
        .ok();
    let limits = pins.limits().ok().map(|l| {
        json!({
            "syn_rate": l.syn_rate,
            "syn_burst": l.syn_burst,
            "quic_rate": l.quic_rate,
            "quic_burst": l.quic_burst,
        })
    });
    let drops = pins.stats().ok().map(|stats| {
        let mut drops = serde_json::Map::new();
        for (_, reason) in edge_ebpf::STAT_REASONS {
            if let Some(name) = reason.strip_prefix("drop_") {
                drops.insert(name.into(), json!(edge_ebpf::user::stat(&stats, reason)));
            }
        }
        serde_json::Value::Object(drops)
    });
    json!({ "loaded": true, "blocked": blocked, "limits": limits, "drops": drops })
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
        let result = maintain_once(&pins, &settings);
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

fn maintain_once(pins: &PinnedMaps, settings: &FilterSettings) -> Result<(), PinnedError> {
    for net in pins.remove_expired()? {
        info!(%net, "block expired and removed");
    }
    restore_saved(pins, settings)?;
    let limits = settings.limits;
    if pins.limits()? != limits {
        pins.set_limits(limits)?;
        info!(?limits, "applied the rate limits to the filter");
    }
    Ok(())
}

/// Drops expired saved blocks and puts back each remaining one that the maps lack.
fn restore_saved(pins: &PinnedMaps, settings: &FilterSettings) -> Result<(), PinnedError> {
    let Some(path) = &settings.blocks_file else {
        return Ok(());
    };
    let mut blocks = load_blocks(path);
    let now = unix_now_ms();
    let before = blocks.len();
    blocks.retain(|b| b.expires_unix_ms.is_none_or(|at| at > now));
    if blocks.len() != before {
        save_blocks(path, &blocks);
    }
    if blocks.is_empty() {
        return Ok(());
    }
    let present: Vec<IpNet> = pins.blocked()?.into_iter().map(|b| b.net).collect();
    for block in blocks.iter().filter(|b| !present.contains(&b.cidr)) {
        let ttl = block
            .expires_unix_ms
            .map(|at| Duration::from_millis(at.saturating_sub(now)));
        pins.block(block.cidr, ttl, edge_ebpf::BLOCK_MANUAL)?;
        info!(net = %block.cidr, ttl = ?ttl, "restored a saved block missing from the filter");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// Settings whose pin directory contains no maps, as before the edge loads its filter.
    fn unloaded(dir: &Path) -> FilterSettings {
        FilterSettings {
            pin_dir: dir.join("no-pins"),
            limits: Limits::default(),
            blocks_file: Some(dir.join("agent-blocks.json")),
        }
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("edge-filter-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn block_of_every_source_rejected() {
        let dir = scratch_dir("all");
        let settings = unloaded(&dir);
        for cidr in ["0.0.0.0/0", "::/0"] {
            let response = handle(
                &settings,
                &CtlRequest::Block {
                    cidr: cidr.into(),
                    ttl_ms: None,
                },
            );
            assert!(!response.ok, "{cidr} was accepted");
            assert!(
                response.error.unwrap().contains("every"),
                "{cidr}: unclear error"
            );
        }
        assert!(!dir.join("agent-blocks.json").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pending_blocks_are_listed_and_saved_owner_only() {
        let dir = scratch_dir("pending");
        let settings = unloaded(&dir);
        let response = handle(
            &settings,
            &CtlRequest::Block {
                cidr: "192.0.2.0/24".into(),
                ttl_ms: Some(600_000),
            },
        );
        assert!(response.ok, "{:?}", response.error);
        assert!(response.data["pending"].is_string(), "{}", response.data);

        let listed = handle(&settings, &CtlRequest::Blocked);
        assert!(listed.ok, "{:?}", listed.error);
        let rows = listed.data.as_array().unwrap();
        assert_eq!(rows.len(), 1, "{}", listed.data);
        assert_eq!(rows[0]["cidr"], "192.0.2.0/24");
        assert_eq!(rows[0]["origin"], "pending");
        assert!(rows[0]["expires_in_secs"].as_u64().unwrap() > 500);

        let mode = std::fs::metadata(dir.join("agent-blocks.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let response = handle(
            &settings,
            &CtlRequest::Unblock {
                cidr: "192.0.2.0/24".into(),
            },
        );
        assert!(response.ok, "{:?}", response.error);
        let listed = handle(&settings, &CtlRequest::Blocked);
        assert_eq!(listed.data.as_array().map(Vec::len), Some(0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
