//! The configuration exactly as written: serde types with `deny_unknown_fields`, and every
//! default and limit by name.

use crate::core::affinity::hosts::{
    DEFAULT_ADMIN_CLUSTER, DEFAULT_ADMIN_PATH, DEFAULT_HOSTS_INTERVAL_MS, DEFAULT_HOSTS_MAX_BYTES,
    DEFAULT_HOSTS_TIMEOUT_MS,
};
use crate::core::affinity::load_metrics::{
    DEFAULT_METRICS_INTERVAL_MS, DEFAULT_METRICS_MAX_BYTES, DEFAULT_METRICS_PATH,
    DEFAULT_METRICS_TIMEOUT_MS,
};
use crate::core::affinity::picker::{
    DEFAULT_BALANCE_FACTOR, DEFAULT_COOLDOWN_MS, DEFAULT_KV_WEIGHT, DEFAULT_LOAD_WEIGHT,
    DEFAULT_PREFIX_WEIGHT,
};
use crate::core::affinity::prefix::{
    DEFAULT_BLOCK_BYTES, DEFAULT_PREFIX_BLOCKS, DEFAULT_PREFIX_HEADER,
};
use crate::core::affinity::shared_blocks::DEFAULT_SHARED_SLOTS;
use crate::core::overload::{DEFAULT_MAX_HELD_BODY_BYTES, DEFAULT_SHED_BODIES_OVER_BYTES};
use crate::core::routing::table::UnknownModel;
use crate::core::usage::DEFAULT_MAX_SCAN_BYTES;
use serde::Deserialize;

/// Default for `pathPrefixes`: every OpenAI endpoint.
pub const DEFAULT_PATH_PREFIX: &str = "/v1/";
/// Default for `multipartPaths`: OpenAI's form-upload endpoints.
pub const DEFAULT_MULTIPART_PATHS: [&str; 2] =
    ["/v1/audio/transcriptions", "/v1/audio/translations"];
/// Default for `baseModelHeader`: the header the seed's HTTPRoutes match.
pub const DEFAULT_BASE_MODEL_HEADER: &str = "x-gateway-base-model-name";
/// Default for `modelHeader`.
pub const DEFAULT_MODEL_HEADER: &str = "x-gateway-model-name";
/// Default for `maxBodyBytes`: 8 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
/// Default for `maxModelNameBytes`.
pub const DEFAULT_MAX_MODEL_NAME_BYTES: usize = 256;
/// Default for `modelList.path`.
pub const DEFAULT_MODEL_LIST_PATH: &str = "/v1/models";
/// Largest accepted `maxBodyBytes`: the body is buffered in Envoy, so a limit past this is a
/// mistake rather than a wish.
pub const MAX_MAX_BODY_BYTES: u64 = 1024 * 1024 * 1024;
/// Largest accepted `maxHeldBodyBytes` (per worker).
pub const MAX_MAX_HELD_BODY_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// Largest accepted `maxModelNameBytes`.
pub const MAX_MAX_MODEL_NAME_BYTES: usize = 64 * 1024;
/// Default for `pools[].path`: what vLLM answers the served models on.
pub const DEFAULT_POOL_PATH: &str = "/v1/models";
/// Default for `pools[].intervalMs`: 10 s (plus up to 10 % jitter).
pub const DEFAULT_POOL_INTERVAL_MS: u64 = 10_000;
/// Default for `pools[].timeoutMs`.
pub const DEFAULT_POOL_TIMEOUT_MS: u64 = 2_000;
/// Smallest accepted `pools[].intervalMs`: the timer ticks at a tenth of the shortest
/// interval, and below this the polls cost more than they tell.
pub const MIN_POOL_INTERVAL_MS: u64 = 100;
/// Largest accepted `pools[].intervalMs` (one hour).
pub const MAX_POOL_INTERVAL_MS: u64 = 3_600_000;
/// Largest accepted `pools[].timeoutMs` (one minute).
pub const MAX_POOL_TIMEOUT_MS: u64 = 60_000;
/// Default for `absentPollsBeforeRemoval`.
pub const DEFAULT_ABSENT_POLLS_BEFORE_REMOVAL: u32 = 3;
/// Largest accepted `absentPollsBeforeRemoval`.
pub const MAX_ABSENT_POLLS_BEFORE_REMOVAL: u32 = 1000;
/// Default for `poolHeader`: names the cluster of a discovered model; the shipped Envoy
/// route reads it with `cluster_header`.
pub const DEFAULT_POOL_HEADER: &str = "x-gateway-destination-pool";
/// The request header the filter sets on its own 503 (model discovery pending) before answering,
/// so that Envoy's `local_reply_config` can tell that reply from Envoy's own 503s and leave its
/// body alone (see envoy/envoy.yaml). Client copies are removed like the routing headers.
pub const LOCAL_REPLY_HEADER: &str = "x-bbr-local-reply";
/// Default for `prefixAffinity.picker.header`: the header Envoy's `override_host` load
/// balancing policy reads the chosen endpoint from (the Gateway API Inference Extension's name).
pub const DEFAULT_PICKER_HEADER: &str = "x-gateway-destination-endpoint";
/// Default for `prefixAffinity.picker.lruBlocks`: block hashes remembered per endpoint
/// (8192 x 256 bytes: 2 MiB of prompt, 512 Ki tokens; about 40 bytes of memory each).
pub const DEFAULT_PICKER_LRU_BLOCKS: usize = 8192;
/// Largest accepted `prefixAffinity.picker.lruBlocks`.
pub const MAX_PICKER_LRU_BLOCKS: usize = 1 << 20;
/// Default for `prefixAffinity.picker.maxBlocks`: the blocks of a prompt matched (8 KiB).
pub const DEFAULT_PICKER_MAX_BLOCKS: usize = 32;
/// Most endpoints in one picker pool.
pub const MAX_PICKER_ENDPOINTS: usize = 256;
/// Largest accepted picker weight.
pub const MAX_PICKER_WEIGHT: u32 = 100;
/// Largest accepted `prefixAffinity.picker.balanceFactor` (percent of the mean).
pub const MAX_PICKER_BALANCE_FACTOR: u32 = 10_000;
/// Largest accepted `prefixAffinity.picker.cooldownMs` (one hour).
pub const MAX_PICKER_COOLDOWN_MS: u64 = 3_600_000;
/// Most bytes in a cluster name or an authority.
pub const MAX_CLUSTER_NAME_BYTES: usize = 255;

/// The configuration exactly as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawConfig {
    #[serde(default)]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub pools: Vec<RawPool>,
    #[serde(default = "default_absent_polls_before_removal")]
    pub absent_polls_before_removal: u32,
    #[serde(default = "default_pool_header")]
    pub pool_header: String,
    #[serde(default = "default_path_prefixes")]
    pub path_prefixes: Vec<String>,
    #[serde(default = "default_multipart_paths")]
    pub multipart_paths: Vec<String>,
    #[serde(default = "default_base_model_header")]
    pub base_model_header: String,
    #[serde(default = "default_model_header")]
    pub model_header: String,
    #[serde(default)]
    pub unknown_model: UnknownModel,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    #[serde(default = "default_max_model_name_bytes")]
    pub max_model_name_bytes: usize,
    #[serde(default)]
    pub model_list: RawModelList,
    #[serde(default)]
    pub route_before_body_ends: bool,
    #[serde(default)]
    pub prefix_affinity: RawPrefixAffinity,
    #[serde(default = "default_max_held_body_bytes")]
    pub max_held_body_bytes: u64,
    #[serde(default = "default_shed_bodies_over_bytes")]
    pub shed_bodies_over_bytes: u64,
    #[serde(default)]
    pub usage: RawUsage,
}

/// `usage`: token usage and latency read from responses (see `core::usage`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawUsage {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_max_scan_bytes")]
    pub max_scan_bytes: u64,
    #[serde(default)]
    pub add_include_usage: bool,
}

impl Default for RawUsage {
    fn default() -> Self {
        RawUsage {
            enabled: true,
            max_scan_bytes: DEFAULT_MAX_SCAN_BYTES,
            add_include_usage: false,
        }
    }
}

fn default_max_scan_bytes() -> u64 {
    DEFAULT_MAX_SCAN_BYTES
}

/// `prefixAffinity`: a header carrying the prompt's prefix key, for a consistent-hash load
/// balancer (see `core::affinity::prefix`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPrefixAffinity {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_prefix_header")]
    pub header: String,
    #[serde(default = "default_block_bytes")]
    pub block_bytes: usize,
    #[serde(default = "default_prefix_blocks")]
    pub prefix_blocks: usize,
    /// The endpoint picker: the filter chooses the replica itself (see `core::affinity::picker`).
    #[serde(default)]
    pub picker: Option<RawPicker>,
}

/// `prefixAffinity.picker`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPicker {
    /// The one switch: `false` keeps the picker's settings checked but off (Envoy's fallback
    /// policy places every request, as without a picker).
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_picker_header")]
    pub header: String,
    #[serde(default = "default_picker_lru_blocks")]
    pub lru_blocks: usize,
    #[serde(default = "default_picker_max_blocks")]
    pub max_blocks: usize,
    #[serde(default = "default_prefix_weight")]
    pub prefix_weight: u32,
    #[serde(default = "default_load_weight")]
    pub load_weight: u32,
    /// Percent of the mean in-flight count; `null`: no bound.
    #[serde(default = "default_balance_factor")]
    pub balance_factor: Option<u32>,
    /// How long an endpoint that failed a picked request (Envoy served it elsewhere) is not
    /// picked; 0: picked again at once.
    #[serde(default = "default_cooldown_ms")]
    pub cooldown_ms: u64,
    /// Slots per pool of the table the workers share (`core::affinity::shared_blocks`); 0: each worker
    /// picks by what it sent alone.
    #[serde(default = "default_picker_shared_slots")]
    pub shared_slots: usize,
    /// Weight of the KV-cache score (with `serverMetrics`).
    #[serde(default = "default_kv_weight")]
    pub kv_weight: u32,
    /// A new tenant's or conversation's prompt (it continues a prefix every endpoint holds with
    /// nothing more known anywhere) is placed by rendezvous hashing within the bound, the same
    /// way in every gateway; `false`: by load alone.
    #[serde(default = "default_true")]
    pub consistent_placement: bool,
    /// The candidates and their health from Envoy's admin `/clusters` page, in place of each
    /// pool's `endpoints` (`core::affinity::hosts`).
    #[serde(default)]
    pub hosts: Option<RawHosts>,
    /// The servers' own load from their `/metrics` (`core::affinity::load_metrics`); needs
    /// `hosts`.
    #[serde(default)]
    pub server_metrics: Option<RawServerMetrics>,
    pub pools: Vec<RawPickerPool>,
}

/// `prefixAffinity.picker.hosts`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawHosts {
    /// The loopback cluster to Envoy's admin.
    #[serde(default = "default_admin_cluster")]
    pub cluster: String,
    #[serde(default = "default_admin_path")]
    pub path: String,
    #[serde(default = "default_hosts_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_hosts_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_hosts_max_bytes")]
    pub max_bytes: usize,
}

/// `prefixAffinity.picker.serverMetrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawServerMetrics {
    #[serde(default = "default_metrics_path")]
    pub path: String,
    #[serde(default = "default_metrics_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_metrics_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_metrics_max_bytes")]
    pub max_bytes: usize,
    /// Gauge names beside the built-in ones (vLLM's, llama-server's).
    #[serde(default)]
    pub waiting: Vec<String>,
    #[serde(default)]
    pub running: Vec<String>,
    #[serde(default)]
    pub kv_usage: Vec<String>,
}

/// `prefixAffinity.picker.pools[]`: the endpoints of one Envoy cluster, and which requests
/// go there: those routed to `cluster` by discovery (`pools`), and those for `baseModels`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPickerPool {
    pub cluster: String,
    #[serde(default)]
    pub base_models: Vec<String>,
    /// `IP:port` of each replica; none with `picker.hosts` (the cluster's own hosts then).
    #[serde(default)]
    pub endpoints: Vec<String>,
}

impl Default for RawPrefixAffinity {
    fn default() -> Self {
        RawPrefixAffinity {
            enabled: false,
            header: default_prefix_header(),
            block_bytes: default_block_bytes(),
            prefix_blocks: default_prefix_blocks(),
            picker: None,
        }
    }
}

/// One base model and the LoRA adapters served on it (the seed's bbr-managed ConfigMap:
/// `baseModel` + `adapters`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawModel {
    pub name: String,
    #[serde(default)]
    pub adapters: Vec<String>,
}

/// A pool whose served models are discovered by polling its `/v1/models`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPool {
    pub cluster: String,
    #[serde(default = "default_pool_path")]
    pub path: String,
    #[serde(default = "default_pool_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_pool_timeout_ms")]
    pub timeout_ms: u64,
    /// Default: the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
}

/// The `GET /v1/models` answer served from the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawModelList {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_model_list_path")]
    pub path: String,
}

impl Default for RawModelList {
    fn default() -> Self {
        RawModelList {
            enabled: true,
            path: default_model_list_path(),
        }
    }
}

fn default_path_prefixes() -> Vec<String> {
    vec![DEFAULT_PATH_PREFIX.to_string()]
}
fn default_multipart_paths() -> Vec<String> {
    DEFAULT_MULTIPART_PATHS
        .iter()
        .map(|p| p.to_string())
        .collect()
}
fn default_base_model_header() -> String {
    DEFAULT_BASE_MODEL_HEADER.to_string()
}
fn default_model_header() -> String {
    DEFAULT_MODEL_HEADER.to_string()
}
fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}
fn default_max_model_name_bytes() -> usize {
    DEFAULT_MAX_MODEL_NAME_BYTES
}
fn default_model_list_path() -> String {
    DEFAULT_MODEL_LIST_PATH.to_string()
}
fn default_true() -> bool {
    true
}
fn default_max_held_body_bytes() -> u64 {
    DEFAULT_MAX_HELD_BODY_BYTES
}
fn default_shed_bodies_over_bytes() -> u64 {
    DEFAULT_SHED_BODIES_OVER_BYTES
}
fn default_prefix_header() -> String {
    DEFAULT_PREFIX_HEADER.to_string()
}
fn default_block_bytes() -> usize {
    DEFAULT_BLOCK_BYTES
}
fn default_prefix_blocks() -> usize {
    DEFAULT_PREFIX_BLOCKS
}
fn default_picker_header() -> String {
    DEFAULT_PICKER_HEADER.to_string()
}
fn default_picker_lru_blocks() -> usize {
    DEFAULT_PICKER_LRU_BLOCKS
}
fn default_picker_max_blocks() -> usize {
    DEFAULT_PICKER_MAX_BLOCKS
}
fn default_picker_shared_slots() -> usize {
    DEFAULT_SHARED_SLOTS
}
fn default_prefix_weight() -> u32 {
    DEFAULT_PREFIX_WEIGHT
}
fn default_load_weight() -> u32 {
    DEFAULT_LOAD_WEIGHT
}
fn default_balance_factor() -> Option<u32> {
    Some(DEFAULT_BALANCE_FACTOR)
}
fn default_cooldown_ms() -> u64 {
    DEFAULT_COOLDOWN_MS
}
fn default_kv_weight() -> u32 {
    DEFAULT_KV_WEIGHT
}
fn default_admin_cluster() -> String {
    DEFAULT_ADMIN_CLUSTER.to_string()
}
fn default_admin_path() -> String {
    DEFAULT_ADMIN_PATH.to_string()
}
fn default_hosts_interval_ms() -> u64 {
    DEFAULT_HOSTS_INTERVAL_MS
}
fn default_hosts_timeout_ms() -> u64 {
    DEFAULT_HOSTS_TIMEOUT_MS
}
fn default_hosts_max_bytes() -> usize {
    DEFAULT_HOSTS_MAX_BYTES
}
fn default_metrics_path() -> String {
    DEFAULT_METRICS_PATH.to_string()
}
fn default_metrics_interval_ms() -> u64 {
    DEFAULT_METRICS_INTERVAL_MS
}
fn default_metrics_timeout_ms() -> u64 {
    DEFAULT_METRICS_TIMEOUT_MS
}
fn default_metrics_max_bytes() -> usize {
    DEFAULT_METRICS_MAX_BYTES
}
fn default_absent_polls_before_removal() -> u32 {
    DEFAULT_ABSENT_POLLS_BEFORE_REMOVAL
}
fn default_pool_header() -> String {
    DEFAULT_POOL_HEADER.to_string()
}
fn default_pool_path() -> String {
    DEFAULT_POOL_PATH.to_string()
}
fn default_pool_interval_ms() -> u64 {
    DEFAULT_POOL_INTERVAL_MS
}
fn default_pool_timeout_ms() -> u64 {
    DEFAULT_POOL_TIMEOUT_MS
}
