//! The routing table: the served models (base models and their adapters) and every setting a
//! request's routing reads, compiled from the configuration (`core::config`).

use crate::core::affinity::settings::PrefixAffinity;
use crate::core::overload::BodyBudget;
use crate::core::usage::UsageSettings;
use serde::Deserialize;
use std::collections::HashMap;

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

/// One discovery pool as configured (see `pools` in the README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// The Envoy cluster polled, and the value of the pool header for its models.
    pub cluster: String,
    /// The path polled (`/v1/models`).
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// The `:authority` of the poll.
    pub authority: String,
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
    pub(crate) index: HashMap<String, usize>,
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
    /// `usage`: token usage and latency read from responses.
    pub usage: UsageSettings,
}

impl Router {
    /// The served model with this exact name (names are case-sensitive, as in vLLM).
    pub fn lookup(&self, model: &str) -> Option<&ServedModel> {
        self.index.get(model).and_then(|&i| self.served.get(i))
    }
}

/// Why `name` cannot be a model name, if it cannot: it must be something a client can send and
/// a header can carry. Configured names and the names a pool lists are checked alike.
pub fn model_name_problem(name: &str, max_bytes: usize) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.chars().any(char::is_control) {
        return Some("must not contain control characters".into());
    }
    if name.trim() != name {
        return Some("must not start or end with whitespace".into());
    }
    if name.len() > max_bytes {
        return Some(format!("is longer than maxModelNameBytes ({max_bytes})"));
    }
    None
}
