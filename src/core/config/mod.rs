//! The filter's configuration: parsed strictly from JSON, then validated into a [`Router`].
//!
//! The JSON arrives as Envoy's `configuration` StringValue or as Istio's `pluginConfig`
//! (which istiod turns into the same StringValue). Unknown keys are refused so that a typo
//! never silently falls back to a default.
//!
//! - [`raw`]: the configuration exactly as written, with every default and limit by name;
//! - `compile`: from the raw form to the routing table ([`Router`]), the picker's pools and the
//!   discovery pools;
//! - `checks`: the field checks; every refusal names the field as a JSON path;
//! - `strict`: the second reading that refuses a struct written as an array of its fields.
//!
//! Nothing else in the core imports this module: the compiled types live with their capability
//! (`routing::table`, `affinity::settings`, `overload`).

mod checks;
mod compile;
pub mod raw;
pub mod strict;

pub use raw::*;

use crate::core::routing::table::Router;
use std::fmt;

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
        strict::objects_only::<RawConfig>(value).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        compile::compile(raw)
    }
}
