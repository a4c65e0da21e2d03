//! From the raw configuration to the routing table ([`Router`]), the endpoint picker's pools
//! and the discovery pools.

use super::checks::*;
use super::raw::*;
use super::{invalid, ConfigError};
use crate::core::affinity::hosts::{
    HostsSource, MAX_HOSTS_INTERVAL_MS, MAX_HOSTS_MAX_BYTES, MIN_HOSTS_INTERVAL_MS,
};
use crate::core::affinity::load_metrics::{
    MetricNames, MetricsSource, MAX_METRICS_INTERVAL_MS, MAX_METRICS_MAX_BYTES,
    MIN_METRICS_INTERVAL_MS,
};
use crate::core::affinity::picker::Scoring;
use crate::core::affinity::prefix::MAX_CAPTURE_BYTES;
use crate::core::affinity::settings::{PickerConfig, PickerPool, PrefixAffinity};
use crate::core::affinity::shared_blocks::{SharedTable, MAX_SHARED_SLOTS};
use crate::core::affinity::shared_load::SharedLoad;
use crate::core::overload::BodyBudget;
use crate::core::routing::table::{Pool, Router, ServedModel};
use crate::core::usage::{UsageSettings, MAX_MAX_SCAN_BYTES};
use std::collections::HashMap;

/// Validates a parsed configuration.
pub(super) fn compile(raw: RawConfig) -> Result<Router, ConfigError> {
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
    check_range(
        "usage.maxScanBytes",
        raw.usage.max_scan_bytes,
        MAX_MAX_SCAN_BYTES,
    )?;
    if raw.usage.add_include_usage && !raw.usage.enabled {
        return Err(invalid(
            "usage.addIncludeUsage",
            "needs usage.enabled: it asks servers for usage that only the accounting reads"
                .to_string(),
        ));
    }
    let usage = UsageSettings {
        enabled: raw.usage.enabled,
        max_scan_bytes: raw.usage.max_scan_bytes,
        add_include_usage: raw.usage.add_include_usage,
    };
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
            // Checked either way, so turning it on cannot surface a refusal.
            let picker =
                compile_picker(raw_picker, &picker_header, prefix.block_bytes, &raw.models)?;
            raw_picker.enabled.then_some(picker)
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
        usage,
    })
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
    if raw.kv_weight > MAX_PICKER_WEIGHT {
        return Err(invalid(
            "prefixAffinity.picker.kvWeight",
            format!(
                "must be between 0 and {MAX_PICKER_WEIGHT}, got {}",
                raw.kv_weight
            ),
        ));
    }
    let hosts = raw.hosts.as_ref().map(compile_hosts).transpose()?;
    let server_metrics =
        match (&raw.server_metrics, &hosts) {
            (Some(_), None) => return Err(invalid(
                "prefixAffinity.picker.serverMetrics",
                "needs prefixAffinity.picker.hosts (the servers scraped are the cluster's hosts)",
            )),
            (Some(m), Some(_)) => Some(compile_server_metrics(m)?),
            (None, _) => None,
        };
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
        if raw.hosts.is_some() && !p.endpoints.is_empty() {
            return Err(invalid(
                field,
                "must be left out with prefixAffinity.picker.hosts: the endpoints are the \
                 cluster's hosts, as Envoy reports them",
            ));
        }
        if raw.hosts.is_none()
            && (p.endpoints.is_empty() || p.endpoints.len() > MAX_PICKER_ENDPOINTS)
        {
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
        kv_weight: raw.kv_weight,
        consistent_placement: raw.consistent_placement,
        hosts,
        server_metrics,
        pools,
    })
}

fn compile_hosts(raw: &RawHosts) -> Result<HostsSource, ConfigError> {
    check_token("prefixAffinity.picker.hosts.cluster", &raw.cluster)?;
    check_call_path("prefixAffinity.picker.hosts.path", &raw.path)?;
    if !(MIN_HOSTS_INTERVAL_MS..=MAX_HOSTS_INTERVAL_MS).contains(&raw.interval_ms) {
        return Err(invalid(
            "prefixAffinity.picker.hosts.intervalMs",
            format!(
                "must be between {MIN_HOSTS_INTERVAL_MS} and {MAX_HOSTS_INTERVAL_MS}, got {}",
                raw.interval_ms
            ),
        ));
    }
    check_range(
        "prefixAffinity.picker.hosts.timeoutMs",
        raw.timeout_ms,
        MAX_POOL_TIMEOUT_MS,
    )?;
    check_range(
        "prefixAffinity.picker.hosts.maxBytes",
        raw.max_bytes as u64,
        MAX_HOSTS_MAX_BYTES as u64,
    )?;
    Ok(HostsSource {
        cluster: raw.cluster.clone(),
        path: raw.path.clone(),
        interval_ms: raw.interval_ms,
        timeout_ms: raw.timeout_ms,
        max_bytes: raw.max_bytes,
    })
}

fn compile_server_metrics(raw: &RawServerMetrics) -> Result<MetricsSource, ConfigError> {
    let field = "prefixAffinity.picker.serverMetrics";
    check_call_path(&format!("{field}.path"), &raw.path)?;
    if !(MIN_METRICS_INTERVAL_MS..=MAX_METRICS_INTERVAL_MS).contains(&raw.interval_ms) {
        return Err(invalid(
            format!("{field}.intervalMs"),
            format!(
                "must be between {MIN_METRICS_INTERVAL_MS} and {MAX_METRICS_INTERVAL_MS}, got {}",
                raw.interval_ms
            ),
        ));
    }
    check_range(
        &format!("{field}.timeoutMs"),
        raw.timeout_ms,
        MAX_POOL_TIMEOUT_MS,
    )?;
    check_range(
        &format!("{field}.maxBytes"),
        raw.max_bytes as u64,
        MAX_METRICS_MAX_BYTES as u64,
    )?;
    let mut names = MetricNames::default();
    for (what, extra, into) in [
        ("waiting", &raw.waiting, &mut names.waiting),
        ("running", &raw.running, &mut names.running),
        ("kvUsage", &raw.kv_usage, &mut names.kv_usage),
    ] {
        for (k, name) in extra.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= 200
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
            if !ok {
                return Err(invalid(
                    format!("{field}.{what}[{k}]"),
                    format!("must be a Prometheus metric name ([a-zA-Z0-9_:], at most 200 bytes), got {name:?}"),
                ));
            }
            into.push(name.clone());
        }
    }
    Ok(MetricsSource {
        path: raw.path.clone(),
        interval_ms: raw.interval_ms,
        timeout_ms: raw.timeout_ms,
        max_bytes: raw.max_bytes,
        names,
    })
}

/// A path for a call the filter makes itself: `/`, then visible ASCII (a query allowed).
fn check_call_path(field: &str, path: &str) -> Result<(), ConfigError> {
    if !path.starts_with('/') || path.len() > 1024 || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            format!("must start with '/' and hold visible ASCII only (at most 1024 bytes), got {path:?}"),
        ));
    }
    Ok(())
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
