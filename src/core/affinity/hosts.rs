//! The endpoint picker's candidates from Envoy's own cluster: each host's address and health
//! as Envoy sees them (active health checks, outlier ejection, EDS health status), read from
//! the admin page `/clusters?format=json`, whatever the cluster's discovery (STATIC,
//! STRICT_DNS, EDS). docs/prefix-affinity.md says why the admin page and what it costs.
//!
//! One root context per Envoy process reads the page (the holder of a lease in shared data,
//! [`Lease`]); it publishes one [`Snapshot`] per picker pool in shared data, which every
//! worker reads on its timer and applies to its own picker
//! (`core::affinity::picker::Picker::set_hosts`). The host calls are the filter's; here are
//! the parsing, the encodings and the lease's rule, plain data and functions.

use serde::Deserialize;

/// Default for `prefixAffinity.picker.hosts.cluster`: the loopback cluster to Envoy's admin.
pub const DEFAULT_ADMIN_CLUSTER: &str = "bbr-envoy-admin";
/// Default for `prefixAffinity.picker.hosts.path`.
pub const DEFAULT_ADMIN_PATH: &str = "/clusters?format=json";
/// Default for `prefixAffinity.picker.hosts.intervalMs`: how often the page is read.
pub const DEFAULT_HOSTS_INTERVAL_MS: u64 = 250;
/// Default for `prefixAffinity.picker.hosts.timeoutMs`.
pub const DEFAULT_HOSTS_TIMEOUT_MS: u64 = 1_000;
/// Default for `prefixAffinity.picker.hosts.maxBytes`: a page past it is refused unread (about
/// 800 bytes per host: some 5000 hosts over all of Envoy's clusters).
pub const DEFAULT_HOSTS_MAX_BYTES: usize = 4 << 20;
/// Bounds of `prefixAffinity.picker.hosts.intervalMs`.
pub const MIN_HOSTS_INTERVAL_MS: u64 = 50;
pub const MAX_HOSTS_INTERVAL_MS: u64 = 10_000;
/// Largest `prefixAffinity.picker.hosts.maxBytes`.
pub const MAX_HOSTS_MAX_BYTES: usize = 64 << 20;
/// Most hosts one pool takes from its cluster (the first ones, in Envoy's order).
pub const MAX_POOL_HOSTS: usize = 256;

/// Where the picker reads the hosts (`prefixAffinity.picker.hosts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsSource {
    pub cluster: String,
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub max_bytes: usize,
}

impl HostsSource {
    /// A snapshot older than this is stale: the workers keep the last hosts they applied and
    /// say so (the scraper's lease has lapsed, or its calls keep failing).
    pub fn stale_ms(&self) -> u64 {
        (4 * self.interval_ms + self.timeout_ms).max(2_000)
    }

    /// A lease not renewed for this long may be taken by another root context.
    pub fn lease_ms(&self) -> u64 {
        (3 * self.interval_ms).max(1_000) + self.timeout_ms
    }
}

/// One host of a cluster, as the picker uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// `IP:port` or `[IPv6]:port`, as override_host reads it.
    pub address: String,
    /// Envoy would send it traffic: no failed active or outlier check, not excluded, not
    /// being removed, EDS status HEALTHY or UNKNOWN (absent). A degraded host is not healthy.
    pub healthy: bool,
    /// Envoy's `rq_active` gauge for the host, summed over the workers.
    pub rq_active: u32,
}

/// Why a page could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    /// Not the JSON of `envoy.admin.v3.Clusters`.
    Garbage(String),
}

impl std::fmt::Display for PageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PageError::Garbage(why) => write!(f, "not an admin clusters page: {why}"),
        }
    }
}

// The fields of envoy.admin.v3.Clusters the picker reads; serde skips the rest. Proto3 JSON
// leaves out false booleans and zero numbers, hence the defaults.
#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    cluster_statuses: Vec<ClusterStatus>,
}

#[derive(Deserialize)]
struct ClusterStatus {
    name: String,
    #[serde(default)]
    host_statuses: Vec<HostStatus>,
}

#[derive(Deserialize)]
struct HostStatus {
    #[serde(default)]
    address: Option<Address>,
    #[serde(default)]
    stats: Vec<Stat>,
    #[serde(default)]
    health_status: Health,
}

#[derive(Deserialize)]
struct Address {
    #[serde(default)]
    socket_address: Option<SocketAddress>,
}

#[derive(Deserialize)]
struct SocketAddress {
    address: String,
    #[serde(default)]
    port_value: u32,
}

#[derive(Deserialize)]
struct Stat {
    #[serde(default)]
    name: String,
    /// uint64 in proto3 JSON: a string ("3"); a number is accepted too.
    #[serde(default)]
    value: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct Health {
    #[serde(default)]
    failed_active_health_check: bool,
    #[serde(default)]
    failed_outlier_check: bool,
    #[serde(default)]
    failed_active_degraded_check: bool,
    #[serde(default)]
    pending_dynamic_removal: bool,
    #[serde(default)]
    excluded_via_immediate_hc_fail: bool,
    #[serde(default)]
    active_hc_timeout: bool,
    #[serde(default)]
    eds_health_status: Option<String>,
}

impl Health {
    fn healthy(&self) -> bool {
        !(self.failed_active_health_check
            || self.failed_outlier_check
            || self.failed_active_degraded_check
            || self.pending_dynamic_removal
            || self.excluded_via_immediate_hc_fail
            || self.active_hc_timeout)
            && matches!(
                self.eds_health_status.as_deref(),
                None | Some("HEALTHY") | Some("UNKNOWN")
            )
    }
}

fn stat_value(value: Option<&serde_json::Value>) -> u64 {
    match value {
        Some(serde_json::Value::String(s)) => s.parse().unwrap_or(0),
        Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// The hosts of each of `clusters` on an admin `/clusters?format=json` page: `None` for a
/// cluster the page does not list. Hosts without a socket address (a pipe, an internal
/// listener) are skipped; at most [`MAX_POOL_HOSTS`] per cluster.
pub fn parse_clusters(page: &[u8], clusters: &[&str]) -> Result<Vec<Option<Vec<Host>>>, PageError> {
    let page: Page = serde_json::from_slice(page).map_err(|e| PageError::Garbage(e.to_string()))?;
    let mut out: Vec<Option<Vec<Host>>> = vec![None; clusters.len()];
    for status in page.cluster_statuses {
        let Some(i) = clusters.iter().position(|c| *c == status.name) else {
            continue;
        };
        let hosts = status
            .host_statuses
            .iter()
            .filter_map(|h| {
                let socket = h.address.as_ref()?.socket_address.as_ref()?;
                let address = if socket.address.contains(':') {
                    format!("[{}]:{}", socket.address, socket.port_value)
                } else {
                    format!("{}:{}", socket.address, socket.port_value)
                };
                let rq_active = h
                    .stats
                    .iter()
                    .find(|s| s.name == "rq_active")
                    .map_or(0, |s| stat_value(s.value.as_ref()));
                Some(Host {
                    address,
                    healthy: h.health_status.healthy(),
                    rq_active: u32::try_from(rq_active).unwrap_or(u32::MAX),
                })
            })
            .take(MAX_POOL_HOSTS)
            .collect();
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(hosts);
        }
    }
    Ok(out)
}

/// What the server says about its own load, from its `/metrics`
/// (`core::affinity::load_metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerLoad {
    /// Requests waiting for a sequence slot (`vllm:num_requests_waiting`).
    pub waiting: u32,
    /// Requests running (`vllm:num_requests_running`).
    pub running: u32,
    /// KV-cache usage in thousandths (`vllm:kv_cache_usage_perc` x 1000); `None`: not reported.
    pub kv_milli: Option<u16>,
}

/// One host in a published snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostState {
    pub host: Host,
    /// The server's own report, when its last scrape is fresh; `None`: the picker uses the
    /// gateway's in-flight counts for this host.
    pub load: Option<ServerLoad>,
}

/// One pool's hosts as the scraper last read them, for the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// When the admin page was read (ms).
    pub stamp_ms: u64,
    pub hosts: Vec<HostState>,
}

const SNAPSHOT_MAGIC: u8 = 0xB7;
const SNAPSHOT_VERSION: u8 = 1;
const FLAG_HEALTHY: u8 = 1;
const FLAG_LOAD: u8 = 2;
const FLAG_KV: u8 = 4;
/// Longest address a snapshot carries (an IPv6 address with port is at most 47).
const MAX_ADDRESS_BYTES: usize = 64;

impl Snapshot {
    /// magic, version, stamp (u64 LE), host count (u16 LE); per host: flags, rq_active,
    /// waiting, running (u32 LE each), kv (u16 LE), address length (u8), address.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.hosts.len() * 40);
        out.push(SNAPSHOT_MAGIC);
        out.push(SNAPSHOT_VERSION);
        out.extend_from_slice(&self.stamp_ms.to_le_bytes());
        let hosts: Vec<&HostState> = self
            .hosts
            .iter()
            .filter(|h| h.host.address.len() <= MAX_ADDRESS_BYTES)
            .take(usize::from(u16::MAX))
            .collect();
        out.extend_from_slice(&(hosts.len() as u16).to_le_bytes());
        for h in hosts {
            let mut flags = 0;
            if h.host.healthy {
                flags |= FLAG_HEALTHY;
            }
            let load = h.load.unwrap_or_default();
            if h.load.is_some() {
                flags |= FLAG_LOAD;
            }
            if load.kv_milli.is_some() {
                flags |= FLAG_KV;
            }
            out.push(flags);
            out.extend_from_slice(&h.host.rq_active.to_le_bytes());
            out.extend_from_slice(&load.waiting.to_le_bytes());
            out.extend_from_slice(&load.running.to_le_bytes());
            out.extend_from_slice(&load.kv_milli.unwrap_or(0).to_le_bytes());
            out.push(h.host.address.len() as u8);
            out.extend_from_slice(h.host.address.as_bytes());
        }
        out
    }

    /// The snapshot these bytes encode; `None` for anything else (another writer's bytes are
    /// never trusted: a wrong length, an address that is not text, bytes left over).
    pub fn decode(bytes: &[u8]) -> Option<Snapshot> {
        let mut r = Reader { bytes, at: 0 };
        if r.u8()? != SNAPSHOT_MAGIC || r.u8()? != SNAPSHOT_VERSION {
            return None;
        }
        let stamp_ms = r.u64()?;
        let count = usize::from(r.u16()?);
        let mut hosts = Vec::with_capacity(count.min(MAX_POOL_HOSTS));
        for _ in 0..count {
            let flags = r.u8()?;
            let rq_active = r.u32()?;
            let waiting = r.u32()?;
            let running = r.u32()?;
            let kv = r.u16()?;
            let len = usize::from(r.u8()?);
            if len > MAX_ADDRESS_BYTES || flags & !(FLAG_HEALTHY | FLAG_LOAD | FLAG_KV) != 0 {
                return None;
            }
            let address = std::str::from_utf8(r.take(len)?).ok()?.to_string();
            let load = (flags & FLAG_LOAD != 0).then_some(ServerLoad {
                waiting,
                running,
                kv_milli: (flags & FLAG_KV != 0).then_some(kv.min(1000)),
            });
            hosts.push(HostState {
                host: Host {
                    address,
                    healthy: flags & FLAG_HEALTHY != 0,
                    rq_active,
                },
                load,
            });
        }
        (r.at == bytes.len()).then_some(Snapshot { stamp_ms, hosts })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// The scraper's lease: which root context of the process reads the admin page and the
/// servers' metrics. One value in shared data: the holder's random id and when it last renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub owner: u64,
    pub stamp_ms: u64,
}

const LEASE_MAGIC: u8 = 0xB8;

impl Lease {
    pub fn encode(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        let bytes = std::iter::once(LEASE_MAGIC)
            .chain(self.owner.to_le_bytes())
            .chain(self.stamp_ms.to_le_bytes());
        for (o, b) in out.iter_mut().zip(bytes) {
            *o = b;
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Lease> {
        let mut r = Reader { bytes, at: 0 };
        if r.u8()? != LEASE_MAGIC {
            return None;
        }
        let lease = Lease {
            owner: r.u64()?,
            stamp_ms: r.u64()?,
        };
        (r.at == bytes.len()).then_some(lease)
    }

    /// Whether root context `owner` may hold the lease whose value is `value` at `now_ms`
    /// (and so scrape): nothing there, bytes that are no lease, its own, or one not renewed
    /// within `lease_ms`. The caller writes it back with the CAS token it read, so of two that
    /// may, one gets it.
    pub fn may_hold(value: Option<&[u8]>, owner: u64, now_ms: u64, lease_ms: u64) -> bool {
        match value.and_then(Lease::decode) {
            None => true,
            Some(l) => l.owner == owner || now_ms.saturating_sub(l.stamp_ms) > lease_ms,
        }
    }
}
