//! The endpoint picker's view of the real cluster (`prefixAffinity.picker.hosts` and
//! `serverMetrics`): one root context per Envoy process reads Envoy's admin `/clusters` page
//! and each host's `/metrics` on the timer, and publishes one snapshot per picker pool in
//! shared data; every root context (one per worker) reads the snapshots on its timer and
//! hands them to its worker's pickers. No request waits on any of it.
//!
//! Which root context scrapes: the holder of a lease in shared data (`core::affinity::hosts::
//! Lease`), renewed on every tick; another takes it over when it lapses (a VM replaced). So
//! the servers see one scraper per Envoy process, whatever the number of workers.
//!
//! Every host call is raw or handled: shared data through `super::shared`, the calls through
//! `hostcalls::dispatch_http_call` (see `root::poll_due` for why that one), every answer's
//! status, size and bytes checked before use. A scrape that hangs ends at its timeout (Envoy
//! answers the call with no headers); one that fails in any way leaves that host on the
//! in-flight counts, counted and logged once per change.

use super::{now_millis, shared, Metrics};
use crate::core::affinity::hosts::{
    parse_clusters, Host, HostState, HostsSource, Lease, ServerLoad, Snapshot,
};
use crate::core::affinity::load_metrics::{LoadError, MetricsReader, MetricsSource};
use crate::core::affinity::picker::Picker;
use crate::core::affinity::settings::PickerConfig;
use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};
use std::collections::HashMap;
use std::time::Duration;

/// Bytes of a metrics page copied into the VM at once (the reader is push-style).
const METRICS_WINDOW_BYTES: usize = 16 * 1024;
/// A call not answered this long past its timeout is forgotten (the host always answers by
/// its timeout; this only guards against one that did not).
const LOST_CALL_GRACE_MS: u64 = 1_000;

/// Outcomes of one read of the admin page or of one metrics page.
const OUTCOMES: [&str; 7] = [
    "ok",
    "unreachable",
    "timeout",
    "http_error",
    "too_large",
    "garbage",
    "missing",
];

fn outcome_index(label: &str) -> usize {
    OUTCOMES.iter().position(|o| *o == label).unwrap_or(1)
}

/// The scraper's counters (names in Istio's tag convention, like discovery's).
struct ScrapeMetrics {
    host_polls: [Option<u32>; OUTCOMES.len()],
    metric_scrapes: [Option<u32>; OUTCOMES.len()],
    fallbacks: Option<u32>,
    stale: Option<u32>,
    unusable: Option<u32>,
}

impl ScrapeMetrics {
    fn define(id: u32) -> ScrapeMetrics {
        let define = |kind, name: &str| Metrics::define_one(id, kind, name);
        ScrapeMetrics {
            host_polls: OUTCOMES.map(|o| {
                define(
                    MetricType::Counter,
                    &format!("outcome=.={o};.;bbr_picker_host_polls_total"),
                )
            }),
            metric_scrapes: OUTCOMES.map(|o| {
                define(
                    MetricType::Counter,
                    &format!("outcome=.={o};.;bbr_picker_metric_scrapes_total"),
                )
            }),
            fallbacks: define(MetricType::Counter, "bbr_picker_load_fallback_total"),
            stale: define(MetricType::Counter, "bbr_picker_hosts_stale_total"),
            unusable: define(MetricType::Counter, "bbr_picker_hosts_unusable_total"),
        }
    }

    fn increment(id: Option<u32>) {
        if let Some(id) = id {
            // A lost count is not worth failing anything for.
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

/// What kind of call a token stands for.
enum Call {
    Hosts {
        sent_ms: u64,
    },
    Metrics {
        pool: usize,
        address: String,
        sent_ms: u64,
    },
}

/// Per pool, on the scraping root context.
#[derive(Default)]
struct PoolScrape {
    /// The cluster's hosts at the last good read of the admin page, and when.
    hosts: Vec<Host>,
    hosts_ms: u64,
    /// Per address: the last good report, when it came, and this Envoy's requests in flight
    /// there at that moment (`own_in_flight`; `None`: unknown, Envoy's `rq_active` stands in).
    loads: HashMap<String, (ServerLoad, u64, Option<u32>)>,
    /// Per address: whether its last scrape failed (for logging and counting per change).
    failing: HashMap<String, bool>,
    /// Something changed since the last publication.
    dirty: bool,
}

/// Per pool, on every root context: what was last applied.
#[derive(Default)]
struct PoolApplied {
    bytes: Vec<u8>,
    stale: bool,
}

/// One root context's share of the scraping.
pub(super) struct Scraper {
    id: u32,
    owner: u64,
    lease_key: String,
    holds: bool,
    hosts: HostsSource,
    server_metrics: Option<MetricsSource>,
    picker_header: String,
    lru_blocks: usize,
    clusters: Vec<String>,
    snapshot_keys: Vec<String>,
    calls: HashMap<u32, Call>,
    hosts_due_ms: u64,
    metrics_due_ms: u64,
    pools: Vec<PoolScrape>,
    applied: Vec<PoolApplied>,
    metrics: ScrapeMetrics,
}

impl Scraper {
    /// The scraper of a configuration with `prefixAffinity.picker.hosts`; `None` without.
    /// `namespace` keeps the keys of two configurations apart (the config's fingerprint).
    pub(super) fn new(id: u32, owner: u64, namespace: u64, config: &PickerConfig) -> Option<Self> {
        let hosts = config.hosts.clone()?;
        let clusters: Vec<String> = config.pools.iter().map(|p| p.cluster.clone()).collect();
        Some(Scraper {
            id,
            owner,
            lease_key: format!("bbr-wasm.{namespace:016x}.picker.scraper"),
            holds: false,
            server_metrics: config.server_metrics.clone(),
            picker_header: config.header.clone(),
            lru_blocks: config.lru_blocks,
            snapshot_keys: clusters
                .iter()
                .map(|c| format!("bbr-wasm.{namespace:016x}.picker.hosts.{c}"))
                .collect(),
            pools: clusters.iter().map(|_| PoolScrape::default()).collect(),
            applied: clusters.iter().map(|_| PoolApplied::default()).collect(),
            clusters,
            hosts,
            calls: HashMap::new(),
            hosts_due_ms: 0,
            metrics_due_ms: 0,
            metrics: ScrapeMetrics::define(id),
        })
    }

    /// The timer period this scraper needs.
    pub(super) fn tick_ms(&self) -> u64 {
        let metrics = self
            .server_metrics
            .as_ref()
            .map_or(u64::MAX, |m| m.interval_ms);
        (self.hosts.interval_ms.min(metrics) / 2).clamp(20, 250)
    }

    /// On every tick: the lease; if held, the due calls and the publication; then the
    /// snapshots into this worker's pickers.
    pub(super) fn on_tick(&mut self, pickers: &mut [Picker]) {
        let now = now_millis();
        self.renew_lease(now);
        if self.holds {
            self.forget_lost_calls(now);
            self.send_due(now);
            self.publish(now);
        }
        self.apply(pickers, now);
    }

    fn renew_lease(&mut self, now: u64) {
        let read = match shared::get(&self.lease_key) {
            Ok(read) => read,
            Err(status) => {
                debug!(
                    "[{}] picker: cannot read the scraper lease: status {status}",
                    self.id
                );
                self.holds = false;
                return;
            }
        };
        if !Lease::may_hold(
            read.value.as_deref(),
            self.owner,
            now,
            self.hosts.lease_ms(),
        ) {
            self.holds = false;
            return;
        }
        let lease = Lease {
            owner: self.owner,
            stamp_ms: now,
        };
        let was = self.holds;
        self.holds = shared::set(&self.lease_key, &lease.encode(), read.cas).is_ok();
        if self.holds && !was {
            info!(
                "[{}] bbr-wasm: picker: this root context reads the cluster's hosts{} for the process",
                self.id,
                if self.server_metrics.is_some() { " and their metrics" } else { "" }
            );
        }
    }

    fn forget_lost_calls(&mut self, now: u64) {
        let hosts_limit = self.hosts.timeout_ms + LOST_CALL_GRACE_MS;
        let metrics_limit = self
            .server_metrics
            .as_ref()
            .map_or(0, |m| m.timeout_ms + LOST_CALL_GRACE_MS);
        self.calls.retain(|_, call| match call {
            Call::Hosts { sent_ms } => now < *sent_ms + hosts_limit,
            Call::Metrics { sent_ms, .. } => now < *sent_ms + metrics_limit,
        });
    }

    fn send_due(&mut self, now: u64) {
        let hosts_in_flight = self.calls.values().any(|c| matches!(c, Call::Hosts { .. }));
        if now >= self.hosts_due_ms && !hosts_in_flight {
            self.hosts_due_ms = now + self.hosts.interval_ms;
            let headers = vec![
                (":method", "GET"),
                (":path", self.hosts.path.as_str()),
                (":authority", self.hosts.cluster.as_str()),
                ("accept", "application/json"),
            ];
            match hostcalls::dispatch_http_call(
                &self.hosts.cluster,
                headers,
                None,
                vec![],
                Duration::from_millis(self.hosts.timeout_ms),
            ) {
                Ok(token) => {
                    self.calls.insert(token, Call::Hosts { sent_ms: now });
                }
                Err(status) => self.hosts_failed(
                    "unreachable",
                    &format!(
                        "the call to cluster {:?} failed at once: {status:?}",
                        self.hosts.cluster
                    ),
                ),
            }
        }
        let Some(source) = self.server_metrics.clone() else {
            return;
        };
        if now < self.metrics_due_ms {
            return;
        }
        self.metrics_due_ms = now + source.interval_ms;
        for (i, cluster) in self.clusters.iter().enumerate() {
            let Some(pool) = self.pools.get(i) else {
                continue;
            };
            for host in pool.hosts.iter().filter(|h| h.healthy) {
                let busy = self.calls.values().any(|c| {
                    matches!(c, Call::Metrics { pool: p, address, .. } if *p == i && *address == host.address)
                });
                if busy {
                    continue;
                }
                // Through the pool's own cluster: its override_host policy sends the call to
                // the host the picker header names, as it does the requests.
                let headers = vec![
                    (":method", "GET"),
                    (":path", source.path.as_str()),
                    (":authority", host.address.as_str()),
                    (self.picker_header.as_str(), host.address.as_str()),
                ];
                match hostcalls::dispatch_http_call(
                    cluster,
                    headers,
                    None,
                    vec![],
                    Duration::from_millis(source.timeout_ms),
                ) {
                    Ok(token) => {
                        self.calls.insert(
                            token,
                            Call::Metrics {
                                pool: i,
                                address: host.address.clone(),
                                sent_ms: now,
                            },
                        );
                    }
                    Err(status) => {
                        debug!(
                            "[{}] picker: metrics call failed at once: {status:?}",
                            self.id
                        );
                        ScrapeMetrics::increment(
                            self.metrics.metric_scrapes[outcome_index("unreachable")],
                        );
                    }
                }
            }
        }
    }

    /// An answer to one of this scraper's calls: `false` if the token is not one of them.
    pub(super) fn on_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        pickers: &[Picker],
    ) -> bool {
        let Some(call) = self.calls.remove(&token) else {
            return false;
        };
        match call {
            Call::Hosts { sent_ms } => {
                if now_millis().saturating_sub(sent_ms) >= self.hosts.timeout_ms {
                    self.hosts_failed("timeout", "no answer within timeoutMs");
                } else {
                    self.hosts_answer(num_headers, body_size);
                }
            }
            Call::Metrics {
                pool,
                address,
                sent_ms,
            } => {
                // Envoy answers a call past its timeout with its own 504: told apart by time.
                let timeout_ms = self.server_metrics.as_ref().map_or(0, |m| m.timeout_ms);
                let now = now_millis();
                let result = if now.saturating_sub(sent_ms) >= timeout_ms {
                    Err("timeout")
                } else {
                    self.read_metrics(num_headers, body_size)
                };
                // What of the server's count is this Envoy's own, counted now, as the report
                // arrives: see `own_in_flight`.
                let own = match (&result, pickers.get(pool)) {
                    (Ok(_), Some(picker)) => own_in_flight(self.id, picker, &address, now),
                    _ => None,
                };
                if let (Ok(load), Some(scrape)) = (&result, self.pools.get(pool)) {
                    // The two ways of telling this Envoy's requests apart in the report, for
                    // diagnosis (docs/bench-routing.md, the control workload).
                    let admin = scrape.hosts.iter().find(|h| h.address == address);
                    debug!(
                        "[{}] picker: {address} reports waiting {} running {}; this Envoy's in \
                         flight there now {own:?}, rq_active {:?} read {} ms before",
                        self.id,
                        load.waiting,
                        load.running,
                        admin.map(|h| h.rq_active),
                        now.saturating_sub(scrape.hosts_ms)
                    );
                }
                self.metrics_answer(pool, &address, result.map(|load| (load, own)));
            }
        }
        true
    }

    fn hosts_answer(&mut self, num_headers: usize, body_size: usize) {
        let body = match read_status(num_headers) {
            Err(outcome) => return self.hosts_failed(outcome, "no answer, or not 200"),
            Ok(()) if body_size > self.hosts.max_bytes => {
                return self.hosts_failed(
                    "too_large",
                    &format!("{body_size} bytes, past maxBytes {}", self.hosts.max_bytes),
                )
            }
            Ok(()) => match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
                Ok(bytes) => bytes.unwrap_or_default(),
                Err(status) => {
                    return self
                        .hosts_failed("unreachable", &format!("cannot read the body: {status:?}"))
                }
            },
        };
        let names: Vec<&str> = self.clusters.iter().map(String::as_str).collect();
        let parsed = match parse_clusters(&body, &names) {
            Ok(parsed) => parsed,
            Err(e) => return self.hosts_failed("garbage", &e.to_string()),
        };
        ScrapeMetrics::increment(self.metrics.host_polls[0]);
        let now = now_millis();
        for (i, hosts) in parsed.into_iter().enumerate() {
            let Some(pool) = self.pools.get_mut(i) else {
                continue;
            };
            let hosts = match hosts {
                Some(hosts) => hosts,
                None => {
                    let cluster = self.clusters.get(i).map_or("", String::as_str);
                    if claim_once(&format!("nocluster.{cluster}"), "1") {
                        warn!(
                            "[{}] bbr-wasm: picker pool {cluster:?}: Envoy has no such cluster; \
                             no endpoint is picked for it",
                            self.id
                        );
                    }
                    Vec::new()
                }
            };
            // Published after every good read, changed or not: the snapshot's stamp is how the
            // workers tell a live scraper from a stale one.
            pool.dirty = true;
            // Reports of hosts no longer listed go.
            pool.loads
                .retain(|a, _| hosts.iter().any(|h| &h.address == a));
            pool.failing
                .retain(|a, _| hosts.iter().any(|h| &h.address == a));
            pool.hosts = hosts;
            pool.hosts_ms = now;
        }
        // Publishes at once: a host removed or failed is out of every worker's choice by their
        // next tick.
        self.publish(now);
    }

    fn hosts_failed(&mut self, outcome: &str, why: &str) {
        ScrapeMetrics::increment(self.metrics.host_polls[outcome_index(outcome)]);
        if claim_once("hosts.outcome", outcome) {
            warn!(
                "[{}] bbr-wasm: picker: cannot read the cluster's hosts from {:?}{}: {why} \
                 (logged once until this changes; the last hosts read are kept)",
                self.id, self.hosts.cluster, self.hosts.path
            );
        } else {
            debug!("[{}] picker: hosts read failed again: {why}", self.id);
        }
    }

    fn read_metrics(
        &self,
        num_headers: usize,
        body_size: usize,
    ) -> Result<ServerLoad, &'static str> {
        let Some(source) = self.server_metrics.as_ref() else {
            return Err("missing");
        };
        read_status(num_headers)?;
        // Refused before a byte is copied into the VM.
        if body_size > source.max_bytes {
            return Err(LoadError::TooLarge.label());
        }
        let mut reader = MetricsReader::new(&source.names, source.max_bytes);
        let mut at = 0;
        while at < body_size {
            let len = (body_size - at).min(METRICS_WINDOW_BYTES);
            match hostcalls::get_buffer(BufferType::HttpCallResponseBody, at, len) {
                Ok(Some(bytes)) if !bytes.is_empty() => {
                    at += bytes.len();
                    reader.feed(&bytes);
                }
                Ok(_) | Err(_) => return Err("unreachable"),
            }
        }
        reader.finish().map_err(LoadError::label)
    }

    fn metrics_answer(
        &mut self,
        i: usize,
        address: &str,
        result: Result<(ServerLoad, Option<u32>), &'static str>,
    ) {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(o) => o,
        };
        ScrapeMetrics::increment(self.metrics.metric_scrapes[outcome_index(outcome)]);
        let id = self.id;
        let cluster = self.clusters.get(i).cloned().unwrap_or_default();
        let Some(pool) = self.pools.get_mut(i) else {
            return;
        };
        let failing = result.is_err();
        let was = pool.failing.insert(address.to_string(), failing);
        match result {
            Ok((load, own)) => {
                if pool.loads.get(address).map(|(l, _, o)| (*l, *o)) != Some((load, own)) {
                    pool.dirty = true;
                }
                pool.loads
                    .insert(address.to_string(), (load, now_millis(), own));
                if was == Some(true) {
                    info!("[{id}] bbr-wasm: picker pool {cluster:?}: {address} reports its load again");
                }
            }
            Err(outcome) => {
                if pool.loads.remove(address).is_some() {
                    pool.dirty = true;
                }
                if was != Some(true) {
                    ScrapeMetrics::increment(self.metrics.fallbacks);
                    // Addresses are the cluster's, not request content.
                    warn!(
                        "[{id}] bbr-wasm: picker pool {cluster:?}: no load report from {address} \
                         ({outcome}); its in-flight count stands in (logged once until this changes)"
                    );
                }
            }
        }
    }

    /// Writes each pool's snapshot if it changed (or its reports aged out).
    fn publish(&mut self, now: u64) {
        let stale_ms = self
            .server_metrics
            .as_ref()
            .map_or(0, MetricsSource::stale_ms);
        for (i, pool) in self.pools.iter_mut().enumerate() {
            let before = pool.loads.len();
            pool.loads
                .retain(|_, (_, at, _)| now.saturating_sub(*at) <= stale_ms);
            if pool.loads.len() != before {
                pool.dirty = true;
                ScrapeMetrics::increment(self.metrics.fallbacks);
            }
            if !pool.dirty || pool.hosts_ms == 0 {
                continue;
            }
            let snapshot = Snapshot {
                stamp_ms: pool.hosts_ms,
                hosts: pool
                    .hosts
                    .iter()
                    .map(|h| {
                        let report = pool.loads.get(&h.address);
                        HostState {
                            // The requests of this Envoy's that the report counts: its own
                            // in-flight count when the report came, else the admin page's
                            // rq_active (read up to a hosts interval apart from the report).
                            host: Host {
                                rq_active: report
                                    .and_then(|(_, _, own)| *own)
                                    .unwrap_or(h.rq_active),
                                ..h.clone()
                            },
                            load: report.map(|(l, _, _)| *l),
                        }
                    })
                    .collect(),
            };
            let Some(key) = self.snapshot_keys.get(i) else {
                continue;
            };
            match shared::set(key, &snapshot.encode(), 0) {
                Ok(()) => pool.dirty = false,
                Err(status) => debug!(
                    "[{}] picker: cannot publish the hosts of pool {i}: status {status}",
                    self.id
                ),
            }
        }
    }

    /// Reads each pool's snapshot and gives it to this worker's picker when it changed.
    fn apply(&mut self, pickers: &mut [Picker], now: u64) {
        let stale_ms = self.hosts.stale_ms();
        for i in 0..self.snapshot_keys.len() {
            let (Some(picker), Some(key), Some(applied)) = (
                pickers.get_mut(i),
                self.snapshot_keys.get(i),
                self.applied.get_mut(i),
            ) else {
                continue;
            };
            let bytes = match shared::get(key) {
                Ok(read) => match read.value {
                    Some(bytes) => bytes,
                    None => continue,
                },
                Err(status) => {
                    debug!(
                        "[{}] picker: cannot read the hosts snapshot: status {status}",
                        self.id
                    );
                    ScrapeMetrics::increment(self.metrics.unusable);
                    continue;
                }
            };
            let snapshot = if bytes == applied.bytes {
                None
            } else {
                match Snapshot::decode(&bytes) {
                    Some(s) => Some(s),
                    None => {
                        ScrapeMetrics::increment(self.metrics.unusable);
                        continue;
                    }
                }
            };
            if let Some(snapshot) = snapshot {
                let changed = picker.set_hosts(&snapshot.hosts, self.lru_blocks);
                let cluster = self.clusters.get(i).map_or("", String::as_str);
                if changed {
                    let list: Vec<String> = snapshot
                        .hosts
                        .iter()
                        .map(|h| h.host.address.clone())
                        .collect();
                    debug!(
                        "[{}] picker pool {cluster:?}: hosts now [{}]",
                        self.id,
                        list.join(", ")
                    );
                }
                let stale = now.saturating_sub(snapshot.stamp_ms) > stale_ms;
                applied.bytes = bytes;
                self.note_stale(i, stale);
            } else if let Some(stamp) = Snapshot::decode(&applied.bytes).map(|s| s.stamp_ms) {
                self.note_stale(i, now.saturating_sub(stamp) > stale_ms);
            }
        }
    }

    fn note_stale(&mut self, i: usize, stale: bool) {
        let Some(applied) = self.applied.get_mut(i) else {
            return;
        };
        if stale == applied.stale {
            return;
        }
        applied.stale = stale;
        if stale {
            ScrapeMetrics::increment(self.metrics.stale);
            let cluster = self.clusters.get(i).map_or("", String::as_str);
            if claim_once(&format!("stale.{cluster}"), "1") {
                warn!(
                    "[{}] bbr-wasm: picker pool {cluster:?}: the hosts were last read over {} ms \
                     ago; the last ones read are kept",
                    self.id,
                    self.hosts.stale_ms()
                );
            }
        } else {
            let cluster = self.clusters.get(i).map_or("", String::as_str);
            let _ = claim_once(&format!("stale.{cluster}"), "0");
        }
    }
}

/// Ok for a 200 answer; the outcome's label otherwise.
fn read_status(num_headers: usize) -> Result<(), &'static str> {
    if num_headers == 0 {
        // Envoy answers a call that timed out or could not connect with no headers.
        return Err("unreachable");
    }
    match hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status") {
        Ok(Some(bytes)) if bytes.as_slice() == b"200" => Ok(()),
        Ok(_) => Err("http_error"),
        Err(_) => Err("unreachable"),
    }
}

/// Whether this root context logs the change of `what` to `value`: the first root context of
/// the process to swap it in shared data does (like `root::claim_log`); if the shared data is
/// unusable, it does.
fn claim_once(what: &str, value: &str) -> bool {
    let key = format!("bbr-wasm.picker.log.{what}");
    for _ in 0..3 {
        let Ok(read) = shared::get(&key) else {
            return true;
        };
        if read.value.as_deref() == Some(value.as_bytes()) {
            return false;
        }
        match shared::set(&key, value.as_bytes(), read.cas) {
            Ok(()) => return true,
            Err(status) if status == Status::CasMismatch as u32 => continue,
            Err(_) => return true,
        }
    }
    false
}

/// This Envoy's requests in flight at `address` now, over all its workers: this worker's own
/// picker's count plus the other workers' live rows (`core::affinity::shared_load`). The
/// picker subtracts it from the server's report to find the requests the server has from
/// elsewhere: counted at the moment the report arrives, the two agree but for requests on the
/// wire. Envoy's `rq_active` from the admin page would be read up to a hosts interval apart
/// from the report, and the difference of two counts read apart is noise of a few requests
/// each way (measured in docs/bench-routing.md). `None` without the shared rows
/// (`sharedSlots: 0`), when they cannot be read, or before this worker's picker lists the host.
fn own_in_flight(id: u32, picker: &Picker, address: &str, now: u64) -> Option<u32> {
    let index = picker.index_of(address)?;
    let load = picker.shared_load()?;
    let read = shared::read_load(id, &load, picker.share_owner(), now);
    if read.failed {
        return None;
    }
    let others = load.others(&read.values, picker.share_owner(), now);
    let mine = picker.in_flight().get(index).copied()?;
    Some(mine.saturating_add(others.get(index).copied().unwrap_or(0)))
}
