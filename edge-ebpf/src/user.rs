//! Userspace access to the pinned maps: the block lists, the rate limits and the counters.
//!
//! The agent, `edgectl` through the agent, and the tests open the maps the edge pinned under
//! [`PIN_DIR`](crate::PIN_DIR) and change them while the programs run. Each call opens the
//! pins again, so a map that a new edge replaced is never written through a stale handle.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    string::String,
    time::Duration,
    vec::Vec,
};

use aya::maps::{lpm_trie::Key, Array, LpmTrie, Map, MapData, MapError, PerCpuArray};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{BlockEntry, Limits, LpmKeyV4, LpmKeyV6};

const _: () = assert!(size_of::<Key<[u8; 4]>>() == size_of::<LpmKeyV4>());
const _: () = assert!(size_of::<Key<[u8; 16]>>() == size_of::<LpmKeyV6>());

/// Error from opening, reading or changing a pinned map.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinnedError {
    /// The pin does not exist because no edge has loaded the programs since boot.
    #[error("pinned map {path} not found: the edge has not loaded its eBPF programs (it needs root and the same pin directory as the agent)")]
    NotPinned { path: PathBuf },
    /// A map operation failed.
    #[error("{operation} on pinned map {path} failed: {source}")]
    Map {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: MapError,
    },
    /// The block list is full.
    #[error("the block list is full ({max} entries)")]
    Full { max: u32 },
}

/// One block list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub net: IpNet,
    /// Time left until the entry stops applying; `None` for a permanent block.
    pub remaining: Option<Duration>,
    /// Whether the entry no longer applies and waits for removal.
    pub expired: bool,
    /// [`BLOCK_MANUAL`](crate::BLOCK_MANUAL) or [`BLOCK_AUTO`](crate::BLOCK_AUTO).
    pub origin: u32,
}

/// Returns the CLOCK_MONOTONIC time in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Turns an IPv4-mapped IPv6 network (`::ffff:a.b.c.d/n`, n >= 96) into its IPv4 form and
/// clears the host bits, so each network has one key.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(v4) = Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(v4.trunc());
                }
            }
        }
    }
    net.trunc()
}

/// The pinned maps under one directory.
#[derive(Debug, Clone)]
pub struct PinnedMaps {
    dir: PathBuf,
}

impl PinnedMaps {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Returns whether the block lists are pinned, that is whether an edge loaded its programs.
    pub fn exists(&self) -> bool {
        self.path(crate::MAP_BLOCK_V4).exists()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn open(&self, name: &str) -> Result<Map, PinnedError> {
        let path = self.path(name);
        if !path.exists() {
            return Err(PinnedError::NotPinned { path });
        }
        MapData::from_pin(&path)
            .and_then(Map::from_map_data)
            .map_err(|source| PinnedError::Map {
                operation: "open",
                path,
                source,
            })
    }

    fn map_error(&self, operation: &'static str, name: &str, source: MapError) -> PinnedError {
        PinnedError::Map {
            operation,
            path: self.path(name),
            source,
        }
    }

    /// Blocks `net` for `ttl` (forever with `None`), replacing an existing entry for it.
    ///
    /// # Errors
    /// Fails when the maps are not pinned, the list is full, or the update fails.
    pub fn block(&self, net: IpNet, ttl: Option<Duration>, origin: u32) -> Result<(), PinnedError> {
        let expires_ns = match ttl {
            // A TTL of 0 would mean "never" to the kernel; make it expire at once instead.
            Some(ttl) => monotonic_now_ns()
                .saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX))
                .max(1),
            None => 0,
        };
        let entry = BlockEntry {
            expires_ns,
            origin,
            pad: 0,
        };
        let result = match canonical_net(net) {
            IpNet::V4(v4) => {
                let mut trie = self.trie_v4()?;
                trie.insert(&key_v4(&v4), entry, 0)
            }
            IpNet::V6(v6) => {
                let mut trie = self.trie_v6()?;
                trie.insert(&key_v6(&v6), entry, 0)
            }
        };
        result.map_err(|source| match &source {
            MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOSPC) => {
                PinnedError::Full {
                    max: crate::BLOCK_MAX,
                }
            }
            _ => self.map_error("insert", map_name(&net), source),
        })
    }

    /// Removes the entry for exactly `net`; returns whether there was one.
    ///
    /// # Errors
    /// Fails when the maps are not pinned or the removal fails for another reason than a
    /// missing entry.
    pub fn unblock(&self, net: IpNet) -> Result<bool, PinnedError> {
        let net = canonical_net(net);
        let result = match net {
            IpNet::V4(v4) => self.trie_v4()?.remove(&key_v4(&v4)),
            IpNet::V6(v6) => self.trie_v6()?.remove(&key_v6(&v6)),
        };
        match result {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(source) => Err(self.map_error("remove", map_name(&net), source)),
        }
    }

    /// Lists both block lists, IPv4 first.
    ///
    /// # Errors
    /// Fails when the maps are not pinned or cannot be read.
    pub fn blocked(&self) -> Result<Vec<Blocked>, PinnedError> {
        let now = monotonic_now_ns();
        let describe = |net: IpNet, entry: BlockEntry| Blocked {
            net,
            remaining: (entry.expires_ns != 0)
                .then(|| Duration::from_nanos(entry.expires_ns.saturating_sub(now))),
            expired: entry.expires_ns != 0 && entry.expires_ns <= now,
            origin: entry.origin,
        };
        let mut out = Vec::new();
        let v4 = self.trie_v4()?;
        for item in v4.iter() {
            let (key, entry) =
                item.map_err(|e| self.map_error("iterate", crate::MAP_BLOCK_V4, e))?;
            let addr = Ipv4Addr::from(key.data());
            let prefix = u8::try_from(key.prefix_len()).unwrap_or(32);
            if let Ok(net) = Ipv4Net::new(addr, prefix) {
                out.push(describe(IpNet::V4(net), entry));
            }
        }
        let v6 = self.trie_v6()?;
        for item in v6.iter() {
            let (key, entry) =
                item.map_err(|e| self.map_error("iterate", crate::MAP_BLOCK_V6, e))?;
            let addr = Ipv6Addr::from(key.data());
            let prefix = u8::try_from(key.prefix_len()).unwrap_or(128);
            if let Ok(net) = Ipv6Net::new(addr, prefix) {
                out.push(describe(IpNet::V6(net), entry));
            }
        }
        Ok(out)
    }

    /// Removes every entry whose TTL has passed; returns the removed networks.
    ///
    /// The kernel already ignores such entries; removing them frees their slots.
    ///
    /// # Errors
    /// Fails when the maps are not pinned or cannot be read or changed.
    pub fn remove_expired(&self) -> Result<Vec<IpNet>, PinnedError> {
        let mut removed = Vec::new();
        for entry in self.blocked()? {
            if entry.expired && self.unblock(entry.net)? {
                removed.push(entry.net);
            }
        }
        Ok(removed)
    }

    /// Reads the rate limits.
    ///
    /// # Errors
    /// Fails when the map is not pinned or cannot be read.
    pub fn limits(&self) -> Result<Limits, PinnedError> {
        let array: Array<MapData, Limits> = self
            .open(crate::MAP_LIMITS)?
            .try_into()
            .map_err(|e| self.map_error("open", crate::MAP_LIMITS, e))?;
        array
            .get(&0, 0)
            .map_err(|e| self.map_error("read", crate::MAP_LIMITS, e))
    }

    /// Writes the rate limits; the programs use them from the next packet on.
    ///
    /// # Errors
    /// Fails when the map is not pinned or cannot be written.
    pub fn set_limits(&self, limits: Limits) -> Result<(), PinnedError> {
        let mut array: Array<MapData, Limits> = self
            .open(crate::MAP_LIMITS)?
            .try_into()
            .map_err(|e| self.map_error("open", crate::MAP_LIMITS, e))?;
        array
            .set(0, limits, 0)
            .map_err(|e| self.map_error("write", crate::MAP_LIMITS, e))
    }

    /// Reads every counter, summed over the CPUs, indexed like the `STAT_*` constants.
    ///
    /// # Errors
    /// Fails when the map is not pinned or cannot be read.
    pub fn stats(&self) -> Result<Vec<u64>, PinnedError> {
        let array: PerCpuArray<MapData, u64> = self
            .open(crate::MAP_STATS)?
            .try_into()
            .map_err(|e| self.map_error("open", crate::MAP_STATS, e))?;
        read_stats(&array).map_err(|e| self.map_error("read", crate::MAP_STATS, e))
    }

    fn trie_v4(&self) -> Result<LpmTrie<MapData, [u8; 4], BlockEntry>, PinnedError> {
        self.open(crate::MAP_BLOCK_V4)?
            .try_into()
            .map_err(|e| self.map_error("open", crate::MAP_BLOCK_V4, e))
    }

    fn trie_v6(&self) -> Result<LpmTrie<MapData, [u8; 16], BlockEntry>, PinnedError> {
        self.open(crate::MAP_BLOCK_V6)?
            .try_into()
            .map_err(|e| self.map_error("open", crate::MAP_BLOCK_V6, e))
    }
}

/// Reads every counter of `array`, summed over the CPUs.
///
/// # Errors
/// Fails when a lookup fails.
pub fn read_stats(array: &PerCpuArray<MapData, u64>) -> Result<Vec<u64>, MapError> {
    (0..crate::STATS_MAX)
        .map(|index| {
            array
                .get(&index, 0)
                .map(|values| values.iter().copied().fold(0u64, u64::wrapping_add))
        })
        .collect()
}

/// Returns the counter of `reason` (its `reason` label in metrics) from `stats`.
pub fn stat(stats: &[u64], reason: &str) -> u64 {
    crate::STAT_REASONS
        .iter()
        .find(|(_, name)| *name == reason)
        .and_then(|(index, _)| stats.get(*index as usize))
        .copied()
        .unwrap_or(0)
}

/// Parses a block target: a CIDR, or a bare address (a /32 or /128).
///
/// # Errors
/// Returns a message naming the value when it is neither.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(canonical_net(net));
    }
    text.parse::<IpAddr>()
        .map(|addr| canonical_net(IpNet::from(addr)))
        .map_err(|_| {
            std::format!(
                "invalid network {text:?}: expected an address or CIDR such as 192.0.2.0/24 or 2001:db8::/32"
            )
        })
}

fn key_v4(net: &Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

fn key_v6(net: &Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

fn map_name(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => crate::MAP_BLOCK_V4,
        IpNet::V6(_) => crate::MAP_BLOCK_V6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv6_becomes_ipv4() {
        let net: IpNet = "::ffff:192.0.2.7/120".parse().unwrap();
        assert_eq!(canonical_net(net), "192.0.2.0/24".parse::<IpNet>().unwrap());
    }

    #[test]
    fn bare_address_is_host_network() {
        assert_eq!(
            parse_net("2001:db8::1").unwrap(),
            "2001:db8::1/128".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_net("10.1.2.3/8").unwrap(),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn invalid_network_names_value() {
        let err = parse_net("10.0.0.0/33").unwrap_err();
        assert!(err.contains("\"10.0.0.0/33\""), "{err}");
    }
}
