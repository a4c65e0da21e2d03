//! The endpoint picker: which replica of a pool gets this request, the way llm-d's endpoint
//! picker (EPP) scores pods, inside the filter.
//!
//! Per pool, a list of endpoints; per endpoint, an LRU of the chained block hashes
//! (`core::affinity::prefix::block_chain`) of the prompts the picker has sent there, bounded at
//! `lru_blocks`, and the number of requests in flight there. [`Picker::pick`] scores each
//! endpoint as llm-d's scheduler does:
//! - prefix score: the leading blocks of this prompt the endpoint has been sent (consecutive
//!   from the first), over the prompt's blocks; a chained hash stands for its whole prefix;
//! - load score: `(max - q) / (max - min)` over the in-flight counts, 1 when all are equal;
//!
//! weighted (default prefix 3, load 2). Ties go to the fewest in flight, then to a rotating
//! index. A bound, after Envoy's `hash_balance_factor` (one request stricter), comes first: an
//! endpoint whose in-flight count would exceed `balance_factor` percent of the mean (after this
//! request) is not a candidate while another is within it. The chosen endpoint records the
//! prompt's blocks and counts the request in flight until [`Picker::done`].
//!
//! Consistent placement (on by default, [`Picker::set_consistent`]): a prompt that continues a
//! prefix every candidate already holds (a shared system prompt, a preamble) with a block that
//! no candidate within the bound holds beyond the first one past it is a new tenant's or a new
//! conversation's: the picker knows nothing that tells the endpoints apart but load, and a
//! second gateway, which cannot see this one's tables, would place it by its own load
//! elsewhere. Such a prompt goes to the endpoint within the bound that ranks first by
//! rendezvous hashing of that first unshared block's chained hash (seeded with the model, so
//! it stands for the whole prefix up to it) with each endpoint's address: every gateway with
//! the same hosts places it the same way without talking, and a host that comes or goes moves
//! only the keys it wins. Later requests of that prefix go home too while the home is within
//! the bound (for a prefix home already holds, Envoy's own rule, one request looser: see
//! `pick_shared`), wherever else this gateway has seen the prefix: another gateway may have
//! placed there the turns this one did not see, so the home's known share of the prompt understates
//! it, and a prefix one gateway placed elsewhere (before every endpoint held the opening, past
//! the bound, before a host joined) would otherwise be followed there by that gateway alone
//! while its peers send it home: each turn would re-prefill the history at both. Home past the
//! bound: a new prefix goes to the next endpoint within it in the key's order, a known one is
//! scored (it spills where it is known).
//! A prompt sharing nothing with what the endpoints hold (no common block) is likely unique,
//! and one whose blocks up to the prefix key's span (`prefixBlocks`) every candidate holds is
//! a hot prefix held everywhere: both stay placed by load.
//!
//! When Envoy served a request elsewhere than picked (override_host's fallback after the picked
//! host failed, see envoy/picker-lb-policy.yaml), [`Picker::served_elsewhere`] moves the request
//! to the endpoint that served it and sets the picked one aside for a cooldown: override_host
//! does not check health, so without this every request picked for a dead replica would pay a
//! failed connection.
//!
//! The picker sees only what it sent: a replica's real cache may have evicted blocks sooner
//! (size `lru_blocks` to the servers' cache) and other gateways' requests are not counted.
//! Plain data: one table per Envoy worker (each wasm VM has its own). What the workers learn
//! together comes in through [`Picker::pick_shared`]: the blocks sent to each endpoint by any
//! of them (`core::affinity::shared_blocks`) and the other workers' requests in flight
//! (`core::affinity::shared_load`).

use super::hosts::{HostState, ServerLoad};
use super::prefix::DEFAULT_PREFIX_BLOCKS;
use super::shared_blocks::SharedTable;
use super::shared_load::SharedLoad;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use xxhash_rust::xxh64::xxh64;

/// Default weights, llm-d's scheduler defaults for its prefix and queue scorers.
pub const DEFAULT_PREFIX_WEIGHT: u32 = 3;
pub const DEFAULT_LOAD_WEIGHT: u32 = 2;
/// Default bound on an endpoint's in-flight requests, in percent of the mean (after the
/// request being placed): the value of the shipped `hash_balance_factor`, with a rule one
/// request stricter than Envoy's (see `pick_shared`).
pub const DEFAULT_BALANCE_FACTOR: u32 = 125;
/// Default for how long an endpoint that failed a picked request is not picked (ms).
pub const DEFAULT_COOLDOWN_MS: u64 = 10_000;
/// Default weight of the KV-cache score (`1 - usage`), llm-d's scheduler default.
pub const DEFAULT_KV_WEIGHT: u32 = 2;
/// The KV-cache score counts a candidate's usage only past this many thousandths (20 %) above
/// the least-used candidate's. vLLM's usage is the running sequences' blocks, so between
/// replicas it mostly restates the load score's running requests, as they were up to a
/// report ago, while the in-flight counts are live: scored exactly, or in steps of 10 %, the
/// stale differences of a request or two broke ties that the live counts and the rotation
/// settle better (`make bench-routing`'s control workload: TTFT p95 101-114 ms exactly, 1.04-1.14x
/// the in-flight picker's in steps, against 70 ms; docs/bench-routing.md). A cache a fifth or
/// more fuller than the emptiest is a difference a report's age does not make.
pub const KV_DEAD_BAND_MILLI: u16 = 200;
/// The server's count of requests beyond this Envoy's own at a host is taken as requests from
/// elsewhere only past this many: one request either way is on the wire or just ended when a
/// report and the in-flight count are read (2 % of reports on a workload with none from
/// elsewhere, each for a report interval; docs/bench-routing.md).
pub const OTHERS_DEAD_BAND: u64 = 1;

/// The scoring settings of a picker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scoring {
    pub prefix_weight: u32,
    pub load_weight: u32,
    /// Percent of the mean in-flight count (>= 100); `None`: no bound.
    pub balance_factor: Option<u32>,
}

impl Default for Scoring {
    fn default() -> Self {
        Scoring {
            prefix_weight: DEFAULT_PREFIX_WEIGHT,
            load_weight: DEFAULT_LOAD_WEIGHT,
            balance_factor: Some(DEFAULT_BALANCE_FACTOR),
        }
    }
}

/// A bounded LRU set of block hashes.
#[derive(Debug, Clone, Default)]
pub struct BlockLru {
    capacity: usize,
    /// hash -> the tick it was last recorded at.
    last_used: HashMap<u64, u64>,
    /// tick -> hash: the oldest first.
    by_age: BTreeMap<u64, u64>,
    tick: u64,
}

impl BlockLru {
    pub fn new(capacity: usize) -> Self {
        BlockLru {
            capacity,
            ..BlockLru::default()
        }
    }

    pub fn len(&self) -> usize {
        self.last_used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_used.is_empty()
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.last_used.contains_key(&hash)
    }

    /// Records a hash as the most recently used, evicting the least recently used past the
    /// capacity.
    pub fn record(&mut self, hash: u64) {
        if self.capacity == 0 {
            return;
        }
        self.tick += 1;
        if let Some(old) = self.last_used.insert(hash, self.tick) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.tick, hash);
        while self.last_used.len() > self.capacity {
            match self.by_age.pop_first() {
                Some((_, oldest)) => {
                    self.last_used.remove(&oldest);
                }
                None => break,
            }
        }
    }

    /// How many of `hashes`, from the first, are recorded (stops at the first that is not).
    pub fn leading_matches(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.contains(**h)).count()
    }
}

/// One endpoint of a pool.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Stable for the endpoint's life in this picker (its index may change when the cluster's
    /// hosts do): what a request in flight remembers.
    pub id: usize,
    /// `IP:port`, as Envoy's override_host policy reads it.
    pub address: String,
    /// As Envoy last reported it (always true for a configured list of endpoints).
    pub healthy: bool,
    /// The server's own report of its load, when fresh (`core::affinity::hosts`).
    pub server: Option<ServerLoad>,
    /// Envoy's requests active at the host when its hosts were last read (`rq_active`, every
    /// worker's): the part of the server's report that is this gateway's own.
    pub envoy_active: u32,
    pub in_flight: u32,
    pub blocks: BlockLru,
    /// Not picked before this time (ms), after a request picked for it was served elsewhere.
    pub down_until_ms: u64,
    /// The endpoint's rendezvous-hashing seed: `xxh64(address)`, the same in every gateway.
    pub rendezvous_seed: u64,
}

impl Endpoint {
    /// A new endpoint: healthy, nothing sent, nothing reported.
    fn new(id: usize, address: String, lru_blocks: usize) -> Endpoint {
        Endpoint {
            id,
            rendezvous_seed: xxh64(address.as_bytes(), 0),
            address,
            healthy: true,
            server: None,
            envoy_active: 0,
            in_flight: 0,
            blocks: BlockLru::new(lru_blocks),
            down_until_ms: 0,
        }
    }
}

/// The KV-cache score of a candidate whose cache is `usage_milli` full when the least-used
/// candidate's is `least_milli`, in thousandths: llm-d's `1 - usage` relative to the emptiest
/// (the same ranking, as every candidate is scored against the same one) with the first
/// `KV_DEAD_BAND_MILLI` of the difference counted as none.
pub fn kv_free_banded(usage_milli: u16, least_milli: u16) -> u16 {
    let excess = usage_milli.min(1000).saturating_sub(least_milli.min(1000));
    1000 - excess.saturating_sub(KV_DEAD_BAND_MILLI)
}

/// The requests a host's server counts from elsewhere: its `waiting + running` beyond this
/// Envoy's own in flight there (`own_at_report`), less `OTHERS_DEAD_BAND`.
pub fn from_elsewhere(server_total: u64, own_at_report: u64) -> u64 {
    server_total
        .saturating_sub(own_at_report)
        .saturating_sub(OTHERS_DEAD_BAND)
}

/// The picker of one pool.
#[derive(Debug, Clone)]
pub struct Picker {
    endpoints: Vec<Endpoint>,
    scoring: Scoring,
    /// Where the next tie starts looking.
    rotor: usize,
    /// This worker's random id and its row of in-flight counts in the shared data
    /// (`core::affinity::shared_load`), once claimed.
    share_owner: u64,
    load_row: Option<usize>,
    /// The next endpoint id.
    next_id: usize,
    /// Weight of the KV-cache score; used only when every candidate reports its usage.
    kv_weight: u32,
    /// Consistent placement of a new prefix (see the module's documentation).
    consistent: bool,
    /// The prefix key's span (`prefixAffinity.prefixBlocks`): a prompt whose first blocks up to
    /// it every candidate holds is a hot prefix held everywhere, placed by load.
    key_blocks: usize,
    /// The tables shared with the other workers, for the current endpoint list
    /// (`set_sharing`, then rebuilt by `set_hosts`).
    sharing: Option<(String, usize)>,
    shared_table: Option<Rc<SharedTable>>,
    shared_load: Option<Rc<SharedLoad>>,
}

impl Picker {
    pub fn new(addresses: &[String], lru_blocks: usize, scoring: Scoring) -> Self {
        Picker {
            endpoints: addresses
                .iter()
                .enumerate()
                .map(|(id, a)| Endpoint::new(id, a.clone(), lru_blocks))
                .collect(),
            scoring,
            rotor: 0,
            share_owner: 0,
            load_row: None,
            next_id: addresses.len(),
            kv_weight: DEFAULT_KV_WEIGHT,
            consistent: true,
            key_blocks: DEFAULT_PREFIX_BLOCKS,
            sharing: None,
            shared_table: None,
            shared_load: None,
        }
    }

    /// Shares what this picker learns with the other workers under `cluster`, in `slots` slots
    /// (0: not shared): the tables follow the endpoint list (`core::affinity::shared_blocks`).
    pub fn set_sharing(&mut self, cluster: &str, slots: usize) {
        self.sharing = Some((cluster.to_string(), slots));
        self.rebuild_sharing();
    }

    fn rebuild_sharing(&mut self) {
        let Some((cluster, slots)) = &self.sharing else {
            return;
        };
        let addresses: Vec<String> = self.endpoints.iter().map(|e| e.address.clone()).collect();
        let table = SharedTable::new(cluster, &addresses, *slots);
        self.shared_load = table
            .as_ref()
            .map(|t| Rc::new(SharedLoad::new(cluster, t.pool_tag(), addresses.len())));
        self.shared_table = table.map(Rc::new);
    }

    /// The table of blocks shared with the other workers, for the current endpoints.
    pub fn shared_table(&self) -> Option<Rc<SharedTable>> {
        self.shared_table.clone()
    }

    /// The rows of in-flight counts shared with the other workers, for the current endpoints.
    pub fn shared_load(&self) -> Option<Rc<SharedLoad>> {
        self.shared_load.clone()
    }

    pub fn set_kv_weight(&mut self, weight: u32) {
        self.kv_weight = weight;
    }

    /// Consistent placement of a new prefix on (the default) or off (placed by load alone).
    pub fn set_consistent(&mut self, on: bool) {
        self.consistent = on;
    }

    /// The prefix key's span in blocks (`prefixAffinity.prefixBlocks`, default 8).
    pub fn set_key_blocks(&mut self, blocks: usize) {
        self.key_blocks = blocks;
    }

    /// Takes the cluster's hosts as Envoy reports them (in the snapshot's order, the same for
    /// every worker, so the shared tables' indexes agree): an endpoint whose address stays
    /// keeps its blocks, its in-flight count and its cooldown; a new one starts empty; one no
    /// longer listed is dropped (its requests still in flight end quietly, by id). Returns
    /// whether the list of addresses changed.
    pub fn set_hosts(&mut self, hosts: &[HostState], lru_blocks: usize) -> bool {
        let same = hosts.len() == self.endpoints.len()
            && hosts
                .iter()
                .zip(&self.endpoints)
                .all(|(h, e)| h.host.address == e.address);
        if same {
            for (h, e) in hosts.iter().zip(self.endpoints.iter_mut()) {
                e.healthy = h.host.healthy;
                e.server = h.load;
                e.envoy_active = h.host.rq_active;
            }
            return false;
        }
        let mut old: HashMap<String, Endpoint> = self
            .endpoints
            .drain(..)
            .map(|e| (e.address.clone(), e))
            .collect();
        for h in hosts {
            let endpoint = match old.remove(&h.host.address) {
                Some(e) => e,
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    Endpoint::new(id, h.host.address.clone(), lru_blocks)
                }
            };
            if self.endpoints.iter().any(|e| e.address == endpoint.address) {
                continue;
            }
            self.endpoints.push(Endpoint {
                healthy: h.host.healthy,
                server: h.load,
                envoy_active: h.host.rq_active,
                ..endpoint
            });
        }
        self.rotor = 0;
        self.rebuild_sharing();
        true
    }

    /// The stable id of the endpoint at `index`.
    pub fn id_of(&self, index: usize) -> Option<usize> {
        self.endpoints.get(index).map(|e| e.id)
    }

    /// The index of the endpoint with id `id`, if it is still listed.
    pub fn index_of_id(&self, id: usize) -> Option<usize> {
        self.endpoints.iter().position(|e| e.id == id)
    }

    /// This worker's id in the shared in-flight rows (random per worker).
    pub fn share_owner(&self) -> u64 {
        self.share_owner
    }

    pub fn set_share_owner(&mut self, owner: u64) {
        self.share_owner = owner;
    }

    /// The row of the shared in-flight counts this worker publishes, once claimed.
    pub fn load_row(&self) -> Option<usize> {
        self.load_row
    }

    pub fn set_load_row(&mut self, row: Option<usize>) {
        self.load_row = row;
    }

    /// This worker's requests in flight per endpoint.
    pub fn in_flight(&self) -> Vec<u32> {
        self.endpoints.iter().map(|e| e.in_flight).collect()
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Chooses an endpoint for a prompt with these chained block hashes (possibly none) at
    /// `now_ms`, records the blocks there and counts the request in flight. Endpoints cooling
    /// down are skipped unless all are. Returns its index, `None` for a pool without endpoints.
    pub fn pick(&mut self, hashes: &[u64], now_ms: u64) -> Option<usize> {
        self.pick_shared(hashes, &[], &[], now_ms)
    }

    /// [`Picker::pick`] with what the other workers learned: `shared[i]` is the number of the
    /// prompt's blocks the shared table says endpoint `i` was sent
    /// (`core::affinity::shared_blocks::SharedTable::attributed`; missing entries count 0). An endpoint's
    /// prefix score counts the larger of that and its own LRU's leading matches. `others[i]`:
    /// the other workers' requests in flight at endpoint `i` (`core::affinity::shared_load`), added to
    /// this worker's own for the load score and the bound.
    pub fn pick_shared(
        &mut self,
        hashes: &[u64],
        shared: &[usize],
        others: &[u32],
        now_ms: u64,
    ) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        // Candidates: the healthy endpoints (every one, with a configured list) not cooling
        // down, or all the healthy ones if every one is. None healthy: no pick (Envoy's
        // fallback answers, 503 with the shipped panic threshold of 0).
        let healthy: Vec<bool> = self.endpoints.iter().map(|e| e.healthy).collect();
        let up: Vec<bool> = self
            .endpoints
            .iter()
            .map(|e| e.healthy && e.down_until_ms <= now_ms)
            .collect();
        if !healthy.iter().any(|&h| h) {
            return None;
        }
        let any_up = up.iter().any(|&u| u);
        let candidate = |i: usize| {
            if any_up {
                up.get(i).copied().unwrap_or(false)
            } else {
                healthy.get(i).copied().unwrap_or(false)
            }
        };
        // An endpoint's load: the requests this gateway's workers have in flight there (live),
        // plus, when the server's own report is fresh, what it counts (waiting + running) beyond
        // this Envoy's own requests there (Envoy's rq_active, read as close to it): other
        // gateways' and other clients' requests, which the in-flight count cannot see, less one
        // (`from_elsewhere`). Adding the server's whole count instead (or taking the larger)
        // re-counts this gateway's own requests as they were up to a scrape ago: in make
        // bench-routing it made the control workload's TTFT p95 least request's.
        let loads: Vec<u64> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let own = u64::from(e.in_flight) + u64::from(others.get(i).copied().unwrap_or(0));
                match e.server {
                    Some(s) => {
                        let total = u64::from(s.waiting) + u64::from(s.running);
                        own + from_elsewhere(total, u64::from(e.envoy_active))
                    }
                    None => own,
                }
            })
            .collect();
        let candidate_loads = || {
            (0..n)
                .filter(|&i| candidate(i))
                .filter_map(|i| loads.get(i).copied())
        };
        let min = candidate_loads().min().unwrap_or(0);
        let max = candidate_loads().max().unwrap_or(0);
        let total: u64 = candidate_loads().sum();
        let count = candidate_loads().count().max(1) as u64;
        // A bounded-load rule after Envoy's hash_balance_factor, over the candidates: one may
        // take this request if its count after it stays within ceil((total + 1) x factor /
        // count). The least loaded always qualifies. Envoy's own rule
        // (envoyproxy/envoy@a9476de, source/extensions/load_balancing_policies/common/
        // thread_aware_lb_impl.cc, BoundedLoadHashingLoadBalancer::hostOverloadFactor) is
        // looser by one: a host may take a request while its count before it is within
        // ceil(ceil((total + 1) x factor / 100) / count). Tried here, a burst of one prefix over
        // three replicas then stayed on two (18/18/0 of 36 in
        // tests/integration/test_picker.py's burst test), so the picker keeps this one, but
        // for a prefix its home already holds (below).
        let bound = self.scoring.balance_factor.map(|factor| {
            let scaled = (total + 1) * u64::from(factor);
            scaled.div_ceil(100 * count)
        });
        let within = |load: u64| bound.is_none_or(|b| load < b);
        let any_within = candidate_loads().any(within);
        // The KV-cache score (1 - usage) counts only when every candidate reports its usage
        // fresh: scoring some by it and others not would favour whichever is unknown.
        let kv_of = |i: usize| {
            self.endpoints
                .get(i)
                .and_then(|e| e.server)
                .and_then(|s| s.kv_milli)
        };
        // The least-used candidate's KV use, in one pass: `None` when some candidate has no
        // fresh report (or the score is off).
        let least_kv = if self.kv_weight > 0 {
            (0..n)
                .filter(|&i| candidate(i))
                .try_fold(u16::MAX, |least, i| kv_of(i).map(|k| least.min(k)))
        } else {
            None
        };
        let kv_weight = least_kv.map_or(0, |_| u128::from(self.kv_weight));
        let least_kv = least_kv.unwrap_or(0);

        // Each endpoint's leading blocks of this prompt: the larger of its own LRU's count and
        // what the other workers' table says.
        let matched: Vec<usize> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let local = e.blocks.leading_matches(hashes);
                let learned = shared.get(i).copied().unwrap_or(0);
                local.max(learned).min(hashes.len())
            })
            .collect();
        let eligible =
            |i: usize| candidate(i) && (!any_within || within(loads.get(i).copied().unwrap_or(0)));
        // A known prefix's home may take it up to Envoy's own rule (one request looser; see
        // above): at two gateways' small per-gateway counts the stricter rule spilled turns off
        // their home, each spill re-prefilling the conversation's history elsewhere.
        let envoy_slots = self.scoring.balance_factor.map(|factor| {
            let total_slots = ((total + 1) * u64::from(factor)).div_ceil(100);
            total_slots.div_ceil(count).max(1)
        });
        let within_envoy =
            |i: usize| envoy_slots.is_none_or(|s| loads.get(i).copied().unwrap_or(0) <= s);
        if let Some(home) =
            self.consistent_home(hashes, &matched, candidate, eligible, within_envoy)
        {
            return self.place(home, hashes);
        }

        let blocks = hashes.len() as u64;
        let mut best: Option<(u128, u64, usize)> = None; // (score, load, index)
        for offset in 0..n {
            let i = (self.rotor + offset) % n;
            let load = loads.get(i).copied().unwrap_or(0);
            if !eligible(i) {
                continue;
            }
            let matched = matched.get(i).copied().unwrap_or(0) as u64;
            // Scores in exact fractions over a common denominator, so ties are real ties:
            // prefix = matched / blocks, load = (max - load) / (max - min), kv = free / 1000
            // (relative to the emptiest, with a dead band: `kv_free_banded`).
            let prefix_den = u128::from(blocks.max(1));
            let load_den = u128::from((max - min).max(1));
            let prefix_num = if blocks == 0 { 0 } else { u128::from(matched) };
            let load_num = if max == min {
                1
            } else {
                u128::from(max - load)
            };
            let kv_free = kv_of(i).map_or(0, |k| u128::from(kv_free_banded(k, least_kv)));
            let score = 1000
                * (u128::from(self.scoring.prefix_weight) * prefix_num * load_den
                    + u128::from(self.scoring.load_weight) * load_num * prefix_den)
                + kv_weight * kv_free * prefix_den * load_den;
            let better = match best {
                None => true,
                Some((s, l, _)) => score > s || (score == s && load < l),
            };
            if better {
                best = Some((score, load, i));
            }
        }
        let (_, _, chosen) = best?;
        self.place(chosen, hashes)
    }

    /// Consistent placement (the module's documentation): the prompt's home, when its first
    /// `common` blocks are held by every candidate (`common >= 1`) and a block follows them:
    /// the candidate ranking first by rendezvous hashing of the chained hash of block `common`.
    /// Within the bound, the prompt goes there, wherever else the prefix is known. Past the
    /// bound, a new prefix (no eligible endpoint, a candidate within the bound, holds more than
    /// `common + 1` blocks) goes to the next eligible endpoint in the key's order. `None`: no
    /// home, or a known prefix whose home is past the bound; scored as usual. A prefix the home
    /// already holds (its key block or more) goes there also past the bound while
    /// `within_envoy` allows it (Envoy's own rule, one request looser than `eligible`'s).
    fn consistent_home(
        &self,
        hashes: &[u64],
        matched: &[usize],
        candidate: impl Fn(usize) -> bool,
        eligible: impl Fn(usize) -> bool,
        within_envoy: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if !self.consistent {
            return None;
        }
        let n = self.endpoints.len();
        let count = |i: usize| matched.get(i).copied().unwrap_or(0);
        let common = (0..n).filter(|&i| candidate(i)).map(count).min()?;
        let key = *hashes.get(common)?;
        // Nothing shared (likely unique: by load), or shared past the key's span (a hot prefix
        // every candidate holds: by load, which the hash would only make random).
        if common == 0 || common >= self.key_blocks {
            return None;
        }
        // The candidates in the key's rendezvous order: the home first, then where it spills.
        let mut ranked: Vec<(u64, usize)> = (0..n)
            .filter(|&i| candidate(i))
            .filter_map(|i| Some((rendezvous(key, self.endpoints.get(i)?.rendezvous_seed), i)))
            .collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        let home = ranked.first()?.1;
        // Known there: home holds the key block (the prefix's own first block) or more.
        let known_at_home = count(home) > common;
        if eligible(home) || (known_at_home && within_envoy(home)) {
            // Even when this gateway has seen the prefix deeper elsewhere: only home is where
            // every gateway sends it (the module's documentation). Following the deeper copy
            // kept one gateway's cold-start and spilled placements, and split a conversation
            // between that replica and its home, turn by turn, with two gateways.
            return Some(home);
        }
        let deepest = (0..n).filter(|&i| eligible(i)).map(count).max()?;
        if deepest <= common + 1 {
            // A new prefix whose home is past the bound: the next endpoint in the key's order
            // within it, as another gateway seeing the same loads would choose.
            ranked.iter().map(|&(_, i)| i).find(|&i| eligible(i))
        } else {
            // A known prefix whose home is past the bound: scored, so it spills where it is
            // known (an earlier spill) rather than to an endpoint that holds none of it.
            None
        }
    }

    /// Counts the request in flight at `chosen` and records the prompt's blocks there.
    fn place(&mut self, chosen: usize, hashes: &[u64]) -> Option<usize> {
        let n = self.endpoints.len().max(1);
        self.rotor = (chosen + 1) % n;
        let endpoint = self.endpoints.get_mut(chosen)?;
        for &h in hashes {
            endpoint.blocks.record(h);
        }
        endpoint.in_flight = endpoint.in_flight.saturating_add(1);
        Some(chosen)
    }

    /// Envoy served the request picked for `picked` at `served` instead (`None`: a host this
    /// pool does not list): the picked endpoint failed it, so it is not picked again before
    /// `now_ms + cooldown_ms`; the request counts in flight at `served` from now on, and its
    /// blocks are recorded there. Returns where the request now counts.
    pub fn served_elsewhere(
        &mut self,
        picked: usize,
        served: Option<usize>,
        hashes: &[u64],
        now_ms: u64,
        cooldown_ms: u64,
    ) -> Option<usize> {
        self.done(picked);
        if let Some(e) = self.endpoints.get_mut(picked) {
            e.down_until_ms = now_ms.saturating_add(cooldown_ms);
        }
        let to = served.filter(|&i| i != picked)?;
        let endpoint = self.endpoints.get_mut(to)?;
        for &h in hashes {
            endpoint.blocks.record(h);
        }
        endpoint.in_flight = endpoint.in_flight.saturating_add(1);
        Some(to)
    }

    /// The index of the endpoint with this address.
    pub fn index_of(&self, address: &str) -> Option<usize> {
        self.endpoints.iter().position(|e| e.address == address)
    }

    /// The request counted at the endpoint with id `id` has ended; nothing if that endpoint
    /// is gone (the cluster dropped it meanwhile).
    pub fn done_id(&mut self, id: usize) {
        if let Some(i) = self.index_of_id(id) {
            self.done(i);
        }
    }

    /// The request sent to endpoint `index` has ended (answered, failed or reset).
    pub fn done(&mut self, index: usize) {
        if let Some(e) = self.endpoints.get_mut(index) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }

    pub fn address(&self, index: usize) -> Option<&str> {
        self.endpoints.get(index).map(|e| e.address.as_str())
    }
}

/// Rendezvous (highest random weight) hashing: the key's weight at an endpoint, from the key and
/// the endpoint's seed alone, so every gateway ranks the endpoints alike in any order.
fn rendezvous(key: u64, seed: u64) -> u64 {
    xxh64(&key.to_le_bytes(), seed)
}
