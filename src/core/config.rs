//! The filter's configuration: parsed strictly from JSON, then validated into a [`Router`].
//!
//! The JSON arrives as Envoy's `configuration` StringValue or as Istio's `pluginConfig`
//! (which istiod turns into the same StringValue). Unknown keys are refused so that a typo
//! never silently falls back to a default.

use super::discovery::Pool;
use super::overload::{BodyBudget, DEFAULT_MAX_HELD_BODY_BYTES, DEFAULT_SHED_BODIES_OVER_BYTES};
use super::picker::{
    Scoring, DEFAULT_BALANCE_FACTOR, DEFAULT_COOLDOWN_MS, DEFAULT_LOAD_WEIGHT,
    DEFAULT_PREFIX_WEIGHT,
};
use super::prefix::{
    DEFAULT_BLOCK_BYTES, DEFAULT_PREFIX_BLOCKS, DEFAULT_PREFIX_HEADER, MAX_CAPTURE_BYTES,
};
use super::shared_blocks::{SharedTable, DEFAULT_SHARED_SLOTS, MAX_SHARED_SLOTS};
use super::shared_load::SharedLoad;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;

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
}

/// `prefixAffinity`: a header carrying the prompt's prefix key, for a consistent-hash load
/// balancer (see `core::prefix`).
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
    /// The endpoint picker: the filter chooses the replica itself (see `core::picker`).
    #[serde(default)]
    pub picker: Option<RawPicker>,
}

/// `prefixAffinity.picker`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPicker {
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
    /// Slots per pool of the table the workers share (`core::shared_blocks`); 0: each worker
    /// picks by what it sent alone.
    #[serde(default = "default_picker_shared_slots")]
    pub shared_slots: usize,
    pub pools: Vec<RawPickerPool>,
}

/// `prefixAffinity.picker.pools[]`: the endpoints of one Envoy cluster, and which requests
/// go there: those routed to `cluster` by discovery (`pools`), and those for `baseModels`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPickerPool {
    pub cluster: String,
    #[serde(default)]
    pub base_models: Vec<String>,
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
    pub pools: Vec<PickerPool>,
}

/// One picker pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickerPool {
    pub cluster: String,
    pub base_models: Vec<String>,
    /// `IP:port` or `[IPv6]:port`.
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

/// What to do with a model that no base model or adapter knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UnknownModel {
    /// Answer 404 `model_not_found`.
    #[default]
    Reject,
    /// Let the request continue without routing headers (the routes decide).
    Passthrough,
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

/// Why a configuration was refused. `field` names the offending field as a JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The configuration is empty (Envoy passed no `configuration`).
    Missing,
    /// Not valid JSON, or of the wrong shape (serde's message names the field).
    Syntax(String),
    /// A field has a value we refuse.
    Invalid { field: String, reason: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Missing => {
                f.write_str("no configuration: `models` is required (or `pools`, to discover them)")
            }
            ConfigError::Syntax(msg) => write!(f, "{msg}"),
            ConfigError::Invalid { field, reason } => write!(f, "{field}: {reason}"),
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A served model: a base model or an adapter on one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    /// The name clients send in `model`.
    pub name: String,
    /// The base model it runs on (its own name for a base model).
    pub base: String,
    /// True for a LoRA adapter.
    pub is_adapter: bool,
}

/// The validated configuration with its lookup table.
#[derive(Debug, Clone)]
pub struct Router {
    /// Base models and adapters in configuration order.
    pub served: Vec<ServedModel>,
    index: HashMap<String, usize>,
    pub path_prefixes: Vec<String>,
    /// Paths whose `multipart/form-data` bodies are read for a `model` form field.
    pub multipart_paths: Vec<String>,
    /// Lower-case header names (HTTP/2 and Envoy's header maps are lower case).
    pub base_model_header: String,
    pub model_header: String,
    pub unknown_model: UnknownModel,
    pub max_body_bytes: u64,
    pub max_model_name_bytes: usize,
    /// `Some(path)` when the filter answers `GET path` itself.
    pub model_list_path: Option<String>,
    /// Release the request as soon as `model` is read, without the whole-body checks.
    pub route_before_body_ends: bool,
    /// `maxHeldBodyBytes` / `shedBodiesOverBytes`.
    pub body_budget: BodyBudget,
    /// `Some` when `prefixAffinity.enabled`.
    pub prefix_affinity: Option<PrefixAffinity>,
    /// `prefixAffinity.header`, lower case: removed from every client request, enabled or not,
    /// since a route may hash on it.
    pub prefix_header: String,
    /// `prefixAffinity.picker.header`, lower case: removed from every client request, picker
    /// or not, since a cluster's override_host policy may read it.
    pub picker_header: String,
    /// Pools to discover models from, in configuration order (their precedence).
    pub pools: Vec<Pool>,
    /// Consecutive successful polls a model must be missing from before it is removed.
    pub absent_polls_before_removal: u32,
    /// Lower-case name of the header naming a discovered model's cluster.
    pub pool_header: String,
}

impl Router {
    /// Parses and validates a configuration.
    pub fn from_json(bytes: &[u8]) -> Result<Router, ConfigError> {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => return Err(ConfigError::Missing),
            // serde would also accept a struct written as an array of its fields.
            Some(b'{') => {}
            Some(_) => {
                return Err(ConfigError::Syntax(
                    "the configuration must be a JSON object".into(),
                ))
            }
        }
        let raw: RawConfig =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        // Accepted: now without serde's other reading of a struct, an array of its fields
        // (`"models": [["qwen"]]`), anywhere below the top (super::strict_json).
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        super::strict_json::objects_only::<RawConfig>(value)
            .map_err(|e| ConfigError::Syntax(e.to_string()))?;
        Router::compile(raw)
    }

    /// Validates a parsed configuration.
    pub fn compile(raw: RawConfig) -> Result<Router, ConfigError> {
        // Limits first: the model names are checked against them.
        check_range("maxBodyBytes", raw.max_body_bytes, MAX_MAX_BODY_BYTES)?;
        check_range(
            "maxModelNameBytes",
            raw.max_model_name_bytes as u64,
            MAX_MAX_MODEL_NAME_BYTES as u64,
        )?;

        if raw.models.is_empty() && raw.pools.is_empty() {
            return Err(invalid(
                "models",
                "must list at least one model (or configure pools to discover them)",
            ));
        }
        let mut served = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut where_defined: Vec<String> = Vec::new();
        for (i, model) in raw.models.iter().enumerate() {
            let field = format!("models[{i}].name");
            check_model_name(&field, &model.name, raw.max_model_name_bytes)?;
            add_served(
                &mut served,
                &mut index,
                &mut where_defined,
                &field,
                ServedModel {
                    name: model.name.clone(),
                    base: model.name.clone(),
                    is_adapter: false,
                },
            )?;
        }
        // Adapters after every base, so that a clash names the base model's field whichever
        // order they were written in.
        for (i, model) in raw.models.iter().enumerate() {
            for (j, adapter) in model.adapters.iter().enumerate() {
                let field = format!("models[{i}].adapters[{j}]");
                check_model_name(&field, adapter, raw.max_model_name_bytes)?;
                add_served(
                    &mut served,
                    &mut index,
                    &mut where_defined,
                    &field,
                    ServedModel {
                        name: adapter.clone(),
                        base: model.name.clone(),
                        is_adapter: true,
                    },
                )?;
            }
        }

        if raw.path_prefixes.is_empty() {
            return Err(invalid("pathPrefixes", "must list at least one prefix"));
        }
        for (i, prefix) in raw.path_prefixes.iter().enumerate() {
            check_path(&format!("pathPrefixes[{i}]"), prefix)?;
        }

        for (i, path) in raw.multipart_paths.iter().enumerate() {
            let field = format!("multipartPaths[{i}]");
            check_path(&field, path)?;
            if !raw
                .path_prefixes
                .iter()
                .any(|p| path.starts_with(p.as_str()))
            {
                return Err(invalid(
                    field,
                    format!("{path:?} is under none of pathPrefixes"),
                ));
            }
        }

        let base_model_header = check_header_name("baseModelHeader", &raw.base_model_header)?;
        let model_header = distinct_header(
            "modelHeader",
            &raw.model_header,
            &[("baseModelHeader", &base_model_header)],
        )?;

        let pool_header = distinct_header(
            "poolHeader",
            &raw.pool_header,
            &[
                ("baseModelHeader", &base_model_header),
                ("modelHeader", &model_header),
            ],
        )?;
        let pools = compile_pools(&raw.pools)?;
        check_range(
            "absentPollsBeforeRemoval",
            u64::from(raw.absent_polls_before_removal),
            u64::from(MAX_ABSENT_POLLS_BEFORE_REMOVAL),
        )?;
        check_range(
            "maxHeldBodyBytes",
            raw.max_held_body_bytes,
            MAX_MAX_HELD_BODY_BYTES,
        )?;
        if raw.max_held_body_bytes < raw.max_body_bytes {
            return Err(invalid(
                "maxHeldBodyBytes",
                format!(
                    "must be at least maxBodyBytes ({}): one body of the largest size must fit",
                    raw.max_body_bytes
                ),
            ));
        }
        if raw.shed_bodies_over_bytes >= raw.max_held_body_bytes {
            return Err(invalid(
                "shedBodiesOverBytes",
                format!(
                    "must be below maxHeldBodyBytes ({}), got {}",
                    raw.max_held_body_bytes, raw.shed_bodies_over_bytes
                ),
            ));
        }
        let body_budget = BodyBudget {
            max_held_bytes: raw.max_held_body_bytes,
            shed_over_bytes: raw.shed_bodies_over_bytes,
        };
        let prefix = &raw.prefix_affinity;
        let prefix_header = distinct_header(
            "prefixAffinity.header",
            &prefix.header,
            &[
                ("baseModelHeader", &base_model_header),
                ("modelHeader", &model_header),
                ("poolHeader", &pool_header),
            ],
        )?;
        if prefix.block_bytes < 16 || prefix.block_bytes > MAX_CAPTURE_BYTES {
            return Err(invalid(
                "prefixAffinity.blockBytes",
                format!(
                    "must be between 16 and {MAX_CAPTURE_BYTES}, got {}",
                    prefix.block_bytes
                ),
            ));
        }
        if prefix.prefix_blocks == 0
            || prefix.prefix_blocks.saturating_mul(prefix.block_bytes) > MAX_CAPTURE_BYTES
        {
            return Err(invalid(
                "prefixAffinity.prefixBlocks",
                format!(
                    "must be at least 1, and blockBytes x prefixBlocks at most {MAX_CAPTURE_BYTES} \
                     (the bytes each request holds), got {}",
                    prefix.prefix_blocks
                ),
            ));
        }
        let picker_header = distinct_header(
            "prefixAffinity.picker.header",
            prefix
                .picker
                .as_ref()
                .map_or(DEFAULT_PICKER_HEADER, |p| p.header.as_str()),
            &[
                ("baseModelHeader", &base_model_header),
                ("modelHeader", &model_header),
                ("poolHeader", &pool_header),
                ("prefixAffinity.header", &prefix_header),
            ],
        )?;
        let picker = match &prefix.picker {
            Some(raw_picker) => {
                if !prefix.enabled {
                    return Err(invalid(
                        "prefixAffinity.picker",
                        "needs prefixAffinity.enabled: true (the picker matches the prompt's blocks)",
                    ));
                }
                Some(compile_picker(
                    raw_picker,
                    &picker_header,
                    prefix.block_bytes,
                    &raw.models,
                )?)
            }
            None => None,
        };
        let prefix_affinity = prefix.enabled.then(|| PrefixAffinity {
            header: prefix_header.clone(),
            block_bytes: prefix.block_bytes,
            prefix_blocks: prefix.prefix_blocks,
            picker,
        });

        let model_list_path = if raw.model_list.enabled {
            check_path("modelList.path", &raw.model_list.path)?;
            Some(raw.model_list.path.clone())
        } else {
            None
        };

        Ok(Router {
            served,
            index,
            path_prefixes: raw.path_prefixes,
            multipart_paths: raw.multipart_paths,
            base_model_header,
            model_header,
            unknown_model: raw.unknown_model,
            max_body_bytes: raw.max_body_bytes,
            max_model_name_bytes: raw.max_model_name_bytes,
            model_list_path,
            route_before_body_ends: raw.route_before_body_ends,
            body_budget,
            prefix_affinity,
            prefix_header,
            picker_header,
            pools,
            absent_polls_before_removal: raw.absent_polls_before_removal,
            pool_header,
        })
    }

    /// The served model with this exact name (names are case-sensitive, as in vLLM).
    pub fn lookup(&self, model: &str) -> Option<&ServedModel> {
        self.index.get(model).and_then(|&i| self.served.get(i))
    }
}

fn add_served(
    served: &mut Vec<ServedModel>,
    index: &mut HashMap<String, usize>,
    where_defined: &mut Vec<String>,
    field: &str,
    model: ServedModel,
) -> Result<(), ConfigError> {
    if let Some(&earlier) = index.get(&model.name) {
        let first = where_defined
            .get(earlier)
            .map(String::as_str)
            .unwrap_or("another entry");
        return Err(invalid(
            field,
            format!("duplicate name {:?}, already at {first}", model.name),
        ));
    }
    index.insert(model.name.clone(), served.len());
    where_defined.push(field.to_string());
    served.push(model);
    Ok(())
}

fn compile_picker(
    raw: &RawPicker,
    header: &str,
    block_bytes: usize,
    models: &[RawModel],
) -> Result<PickerConfig, ConfigError> {
    check_range(
        "prefixAffinity.picker.lruBlocks",
        raw.lru_blocks as u64,
        MAX_PICKER_LRU_BLOCKS as u64,
    )?;
    if raw.max_blocks == 0 || raw.max_blocks.saturating_mul(block_bytes) > MAX_CAPTURE_BYTES {
        return Err(invalid(
            "prefixAffinity.picker.maxBlocks",
            format!(
                "must be at least 1, and blockBytes x maxBlocks at most {MAX_CAPTURE_BYTES} \
                 (the bytes each request holds), got {}",
                raw.max_blocks
            ),
        ));
    }
    for (field, weight) in [
        ("prefixAffinity.picker.prefixWeight", raw.prefix_weight),
        ("prefixAffinity.picker.loadWeight", raw.load_weight),
    ] {
        if weight > MAX_PICKER_WEIGHT {
            return Err(invalid(
                field,
                format!("must be between 0 and {MAX_PICKER_WEIGHT}, got {weight}"),
            ));
        }
    }
    if let Some(factor) = raw.balance_factor {
        if !(100..=MAX_PICKER_BALANCE_FACTOR).contains(&factor) {
            return Err(invalid(
                "prefixAffinity.picker.balanceFactor",
                format!(
                    "must be between 100 and {MAX_PICKER_BALANCE_FACTOR} (percent of the mean), \
                     or null for no bound, got {factor}"
                ),
            ));
        }
    }
    if raw.cooldown_ms > MAX_PICKER_COOLDOWN_MS {
        return Err(invalid(
            "prefixAffinity.picker.cooldownMs",
            format!(
                "must be between 0 and {MAX_PICKER_COOLDOWN_MS}, got {}",
                raw.cooldown_ms
            ),
        ));
    }
    if raw.shared_slots > MAX_SHARED_SLOTS {
        return Err(invalid(
            "prefixAffinity.picker.sharedSlots",
            format!(
                "must be between 0 (no table shared by the workers) and {MAX_SHARED_SLOTS}, got {}",
                raw.shared_slots
            ),
        ));
    }
    if raw.pools.is_empty() {
        return Err(invalid(
            "prefixAffinity.picker.pools",
            "must list at least one pool",
        ));
    }
    let mut pools: Vec<PickerPool> = Vec::with_capacity(raw.pools.len());
    for (i, p) in raw.pools.iter().enumerate() {
        let field = format!("prefixAffinity.picker.pools[{i}].cluster");
        check_token(&field, &p.cluster)?;
        if let Some(j) = pools.iter().position(|q| q.cluster == p.cluster) {
            return Err(invalid(
                field,
                format!("duplicate cluster {:?}, already at pools[{j}]", p.cluster),
            ));
        }
        for (k, model) in p.base_models.iter().enumerate() {
            let field = format!("prefixAffinity.picker.pools[{i}].baseModels[{k}]");
            if !models.iter().any(|m| &m.name == model) {
                return Err(invalid(
                    field,
                    format!("{model:?} is not a base model in models"),
                ));
            }
            if let Some(j) = pools
                .iter()
                .position(|q| q.base_models.iter().any(|m| m == model))
            {
                return Err(invalid(
                    field,
                    format!("{model:?} is already in pools[{j}]"),
                ));
            }
        }
        let field = format!("prefixAffinity.picker.pools[{i}].endpoints");
        if p.endpoints.is_empty() || p.endpoints.len() > MAX_PICKER_ENDPOINTS {
            return Err(invalid(
                field,
                format!(
                    "must list between 1 and {MAX_PICKER_ENDPOINTS} endpoints, got {}",
                    p.endpoints.len()
                ),
            ));
        }
        let mut endpoints: Vec<String> = Vec::with_capacity(p.endpoints.len());
        for (k, e) in p.endpoints.iter().enumerate() {
            let field = format!("prefixAffinity.picker.pools[{i}].endpoints[{k}]");
            let address = check_endpoint(&field, e)?;
            if let Some(j) = endpoints.iter().position(|x| *x == address) {
                return Err(invalid(
                    field,
                    format!("duplicate endpoint {e:?}, already at endpoints[{j}]"),
                ));
            }
            endpoints.push(address);
        }
        pools.push(PickerPool {
            cluster: p.cluster.clone(),
            base_models: p.base_models.clone(),
            shared: SharedTable::new(&p.cluster, &endpoints, raw.shared_slots),
            shared_load: SharedTable::new(&p.cluster, &endpoints, raw.shared_slots)
                .map(|t| SharedLoad::new(&p.cluster, t.pool_tag(), endpoints.len())),
            endpoints,
        });
    }
    Ok(PickerConfig {
        header: header.to_string(),
        lru_blocks: raw.lru_blocks,
        max_blocks: raw.max_blocks,
        scoring: Scoring {
            prefix_weight: raw.prefix_weight,
            load_weight: raw.load_weight,
            balance_factor: raw.balance_factor,
        },
        cooldown_ms: raw.cooldown_ms,
        shared_slots: raw.shared_slots,
        pools,
    })
}

/// An endpoint as Envoy's override_host policy parses it: `IPv4:port` or `[IPv6]:port`
/// (addresses, not names: the policy matches the cluster's resolved hosts). Returned in
/// Envoy's spelling, so it matches what Envoy prints.
fn check_endpoint(field: &str, value: &str) -> Result<String, ConfigError> {
    match value.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr.to_string()),
        _ => Err(invalid(
            field,
            format!("must be IP:port or [IPv6]:port with a non-zero port, got {value:?}"),
        )),
    }
}

fn compile_pools(raw: &[RawPool]) -> Result<Vec<Pool>, ConfigError> {
    let mut pools: Vec<Pool> = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let field = format!("pools[{i}].cluster");
        check_token(&field, &p.cluster)?;
        if let Some(j) = pools.iter().position(|q| q.cluster == p.cluster) {
            return Err(invalid(
                field,
                format!(
                    "duplicate cluster {:?}, already at pools[{j}].cluster",
                    p.cluster
                ),
            ));
        }
        check_path(&format!("pools[{i}].path"), &p.path)?;
        let interval = format!("pools[{i}].intervalMs");
        if !(MIN_POOL_INTERVAL_MS..=MAX_POOL_INTERVAL_MS).contains(&p.interval_ms) {
            return Err(invalid(
                interval,
                format!(
                    "must be between {MIN_POOL_INTERVAL_MS} and {MAX_POOL_INTERVAL_MS}, got {}",
                    p.interval_ms
                ),
            ));
        }
        check_range(
            &format!("pools[{i}].timeoutMs"),
            p.timeout_ms,
            MAX_POOL_TIMEOUT_MS,
        )?;
        let authority = match &p.authority {
            Some(a) => {
                check_token(&format!("pools[{i}].authority"), a)?;
                a.clone()
            }
            None => p.cluster.clone(),
        };
        pools.push(Pool {
            cluster: p.cluster.clone(),
            path: p.path.clone(),
            interval_ms: p.interval_ms,
            timeout_ms: p.timeout_ms,
            authority,
        });
    }
    Ok(pools)
}

/// A cluster name or an authority: it travels in a header value, so printable ASCII without
/// spaces (Envoy cluster names in practice: `qwen-vllm`, `outbound|8000||svc.ns.svc...`).
fn check_token(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_CLUSTER_NAME_BYTES {
        return Err(invalid(
            field,
            format!("is longer than {MAX_CLUSTER_NAME_BYTES} bytes"),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            format!("must be printable ASCII without spaces, got {value:?}"),
        ));
    }
    Ok(())
}

fn check_range(field: &str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value == 0 || value > max {
        return Err(invalid(
            field,
            format!("must be between 1 and {max}, got {value}"),
        ));
    }
    Ok(())
}

/// A model name must be something a client can send and a header can carry.
pub(crate) fn check_model_name(
    field: &str,
    name: &str,
    max_bytes: usize,
) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    if name.trim() != name {
        return Err(invalid(field, "must not start or end with whitespace"));
    }
    if name.len() > max_bytes {
        return Err(invalid(
            field,
            format!("is longer than maxModelNameBytes ({max_bytes})"),
        ));
    }
    Ok(())
}

fn check_path(field: &str, path: &str) -> Result<(), ConfigError> {
    if !path.starts_with('/') {
        return Err(invalid(field, format!("must start with '/', got {path:?}")));
    }
    if path.contains(['?', '#']) || path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(invalid(
            field,
            format!("must be a plain path, got {path:?}"),
        ));
    }
    Ok(())
}

/// A header name (see [`check_header_name`]) that must differ from the headers named before it
/// (`(field, lower-case name)`): the filter sets each of them, so two fields naming one header
/// would overwrite each other.
fn distinct_header(
    field: &str,
    name: &str,
    earlier: &[(&str, &str)],
) -> Result<String, ConfigError> {
    let name = check_header_name(field, name)?;
    if earlier.iter().any(|(_, other)| *other == name) {
        let fields: Vec<&str> = earlier.iter().map(|(f, _)| *f).collect();
        let listed = match fields.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
            _ => fields.join(""),
        };
        return Err(invalid(field, format!("must differ from {listed}")));
    }
    Ok(name)
}

/// Header names are RFC 9110 tokens; Envoy stores them lower case.
fn check_header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(is_tchar) {
        return Err(invalid(
            field,
            format!("must be a valid HTTP header name, got {name:?}"),
        ));
    }
    if name.starts_with(':') {
        return Err(invalid(field, "must not be a pseudo-header"));
    }
    Ok(name.to_ascii_lowercase())
}
