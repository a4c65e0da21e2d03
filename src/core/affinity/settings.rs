//! The validated `prefixAffinity` and `prefixAffinity.picker` settings, as the configuration
//! compiles them (`core::config`).

use super::hosts::HostsSource;
use super::load_metrics::MetricsSource;
use super::picker::Scoring;
use super::shared_blocks::SharedTable;
use super::shared_load::SharedLoad;

/// The validated `prefixAffinity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixAffinity {
    /// Lower-case header name.
    pub header: String,
    pub block_bytes: usize,
    pub prefix_blocks: usize,
    /// `Some` with `prefixAffinity.picker`.
    pub picker: Option<PickerConfig>,
}

impl PrefixAffinity {
    /// The bytes of prompt one request holds for its key (and the picker's blocks).
    pub fn capture_bytes(&self) -> usize {
        let blocks = match &self.picker {
            Some(p) => self.prefix_blocks.max(p.max_blocks),
            None => self.prefix_blocks,
        };
        self.block_bytes * blocks
    }
}

/// The validated `prefixAffinity.picker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickerConfig {
    /// Lower-case header name.
    pub header: String,
    pub lru_blocks: usize,
    pub max_blocks: usize,
    pub scoring: Scoring,
    pub cooldown_ms: u64,
    /// `sharedSlots`: 0 for none.
    pub shared_slots: usize,
    /// `kvWeight`: the KV-cache score's weight, with `server_metrics`.
    pub kv_weight: u32,
    /// `consistentPlacement`: a new prefix placed by rendezvous hashing within the bound.
    pub consistent_placement: bool,
    /// `hosts`: the pools' endpoints are their clusters' hosts, read from Envoy's admin.
    pub hosts: Option<HostsSource>,
    /// `serverMetrics`: each host's own load from its metrics page.
    pub server_metrics: Option<MetricsSource>,
    pub pools: Vec<PickerPool>,
}

/// One picker pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickerPool {
    pub cluster: String,
    pub base_models: Vec<String>,
    /// `IP:port` or `[IPv6]:port`; empty with `hosts` (the cluster's hosts, at run time).
    pub endpoints: Vec<String>,
    /// The pool's table in the workers' shared data; `None` with `sharedSlots: 0`.
    pub shared: Option<SharedTable>,
    /// The pool's rows of in-flight counts in the workers' shared data; `None` with
    /// `sharedSlots: 0`.
    pub shared_load: Option<SharedLoad>,
}

impl PickerConfig {
    /// The pool a routed request's endpoint is picked from: by the cluster discovery routed it
    /// to, else by its base model. `None`: not picked (Envoy's fallback policy chooses).
    pub fn pool_for(&self, cluster: Option<&str>, base_model: &str) -> Option<usize> {
        match cluster {
            Some(c) => self.pools.iter().position(|p| p.cluster == c),
            None => self
                .pools
                .iter()
                .position(|p| p.base_models.iter().any(|m| m == base_model)),
        }
    }
}
