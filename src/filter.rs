//! The proxy-wasm adapter: the only code that talks to the host.
//!
//! Every host call goes through `proxy_wasm::hostcalls` and its `Status` is handled here. The
//! SDK's convenience methods (`self.get_http_request_header(..)` and friends) `unwrap()` host
//! results, so a host error would panic and trap the VM, taking every request on this worker
//! down with it; they are not used.
//!
//! [`root`] holds the configuration and, with `pools`, polls each pool's `/v1/models` on the
//! timer; [`http`] handles each request against the routing table the root last built.

mod http;
mod response;
mod root;
mod scrape;
mod shared;

use crate::core::routing::discovery::PollOutcome;
use crate::core::routing::metrics as names;
use crate::core::usage::metrics as usage_names;
use crate::core::{Outcome, Router, RoutingView};
use log::warn;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::UNIX_EPOCH;

proxy_wasm::main! {{
    // Installs the `log` backend and a panic hook that logs the panic at critical level, so
    // a panic (none should be reachable) is at least visible in Envoy's log.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| Box::new(root::BbrRoot::new(context_id)));
}}

/// Wall-clock nanoseconds from the host (0 if it cannot tell, which only loses a timing).
fn now_nanos() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Wall-clock milliseconds from the host (0 if it cannot tell).
fn now_millis() -> u64 {
    now_nanos() / 1_000_000
}

/// The metrics of one pool.
struct PoolMetrics {
    /// By `PollOutcome::ALL` index.
    polls: [Option<u32>; PollOutcome::ALL.len()],
    models: Option<u32>,
}

/// The filter's metrics, defined once per configuration. A metric the host refused to define
/// is `None` and simply not recorded: metrics never fail a request.
#[derive(Default)]
struct Metrics {
    context_id: u32,
    outcomes: [Option<u32>; Outcome::ALL.len()],
    spoofed_header_removed: Option<u32>,
    prefix_keyed: Option<u32>,
    endpoint_picked: Option<u32>,
    endpoint_failed_over: Option<u32>,
    endpoint_shared_unusable: Option<u32>,
    body_bytes: Option<u32>,
    scan_time_us: Option<u32>,
    scanned_bytes: Option<u32>,
    scan_nanoseconds: Option<u32>,
    memory_bytes: Option<u32>,
    bodies_in_progress: Option<u32>,
    held_body_bytes: Option<u32>,
    /// The linear memory size last written to the gauge: it is only written when it changed,
    /// which is rarely (it stays flat), saving a host call per request.
    memory_recorded: Cell<u64>,
    /// Per base model. Discovery adds base models at run time (from the root context, between
    /// requests), hence the RefCell.
    per_model: RefCell<HashMap<String, u32>>,
    /// Per pool, in configuration order.
    pools: Vec<PoolMetrics>,
    discovery_conflicts: Option<u32>,
    /// Streams asked for their usage (`usage.addIncludeUsage`), and edits the host refused.
    include_usage_added: Option<u32>,
    include_usage_failed: Option<u32>,
    /// Token usage and latency, from the responses (`response`).
    usage: response::UsageMetrics,
}

impl Metrics {
    fn define_one(context_id: u32, kind: MetricType, name: &str) -> Option<u32> {
        match hostcalls::define_metric(kind, name) {
            Ok(id) => Some(id),
            Err(status) => {
                warn!("[{context_id}] cannot define metric {name:?}: {status:?}");
                None
            }
        }
    }

    fn define(context_id: u32, router: &Router) -> Metrics {
        let define = |kind: MetricType, name: &str| Metrics::define_one(context_id, kind, name);
        let pools = router
            .pools
            .iter()
            .map(|p| PoolMetrics {
                polls: PollOutcome::ALL.map(|o| {
                    define(
                        MetricType::Counter,
                        &names::discovery_polls(&p.cluster, o.label()),
                    )
                }),
                models: define(MetricType::Gauge, &names::discovery_models(&p.cluster)),
            })
            .collect();
        let discovery_conflicts = if router.pools.is_empty() {
            None
        } else {
            define(MetricType::Counter, names::DISCOVERY_CONFLICTS)
        };
        // Defined only where they can move, as the discovery series are.
        let (include_usage_added, include_usage_failed) = if router.usage.add_include_usage {
            (
                define(MetricType::Counter, usage_names::INCLUDE_USAGE_ADDED),
                define(MetricType::Counter, usage_names::INCLUDE_USAGE_FAILED),
            )
        } else {
            (None, None)
        };
        let metrics = Metrics {
            context_id,
            outcomes: Outcome::ALL.map(|o| define(MetricType::Counter, o.counter())),
            spoofed_header_removed: define(MetricType::Counter, names::SPOOFED_HEADER_REMOVED),
            prefix_keyed: define(MetricType::Counter, names::PREFIX_KEYED),
            endpoint_picked: define(MetricType::Counter, names::ENDPOINT_PICKED),
            endpoint_failed_over: define(MetricType::Counter, names::ENDPOINT_FAILED_OVER),
            endpoint_shared_unusable: define(MetricType::Counter, names::ENDPOINT_SHARED_UNUSABLE),
            body_bytes: define(MetricType::Histogram, names::BODY_BYTES),
            scan_time_us: define(MetricType::Histogram, names::SCAN_TIME_US),
            scanned_bytes: define(MetricType::Counter, names::SCANNED_BYTES),
            scan_nanoseconds: define(MetricType::Counter, names::SCAN_NANOSECONDS),
            memory_bytes: define(MetricType::Gauge, names::MEMORY_BYTES),
            bodies_in_progress: define(MetricType::Gauge, names::BODIES_IN_PROGRESS),
            held_body_bytes: define(MetricType::Gauge, names::HELD_BODY_BYTES),
            memory_recorded: Cell::new(0),
            per_model: RefCell::new(HashMap::new()),
            pools,
            discovery_conflicts,
            include_usage_added,
            include_usage_failed,
            usage: response::UsageMetrics::define(context_id),
        };
        metrics.define_models(&RoutingView::from_static(router));
        metrics.record_memory();
        metrics
    }

    /// Defines the per-model counter of every base model in the view that has none yet.
    fn define_models(&self, view: &RoutingView) {
        let Ok(mut per_model) = self.per_model.try_borrow_mut() else {
            return;
        };
        for route in view.routes() {
            let base = &route.model.base;
            if per_model.contains_key(base) {
                continue;
            }
            if let Some(id) = Metrics::define_one(
                self.context_id,
                MetricType::Counter,
                &names::model_requests(base),
            ) {
                per_model.insert(base.clone(), id);
            }
        }
    }

    /// One more request for this base model.
    fn count_model(&self, base: &str) {
        let id = self
            .per_model
            .try_borrow()
            .ok()
            .and_then(|m| m.get(base).copied());
        self.increment(id);
    }

    fn count(&self, outcome: Outcome) {
        let index = Outcome::ALL.iter().position(|&o| o == outcome);
        self.increment(index.and_then(|i| self.outcomes[i]));
    }

    fn count_poll(&self, pool: usize, outcome: PollOutcome) {
        let index = PollOutcome::ALL.iter().position(|&o| o == outcome);
        let id = self
            .pools
            .get(pool)
            .and_then(|p| index.and_then(|i| p.polls[i]));
        self.increment(id);
    }

    fn record_pool_models(&self, pool: usize, models: usize) {
        if let Some(p) = self.pools.get(pool) {
            self.record(p.models, models as u64);
        }
    }

    fn increment(&self, id: Option<u32>) {
        if let Some(id) = id {
            // A failed increment loses one count; it is not worth failing the request for.
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn add(&self, id: Option<u32>, value: u64) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// Moves a gauge up or down (Envoy adds a positive and subtracts a negative offset).
    fn add_gauge(&self, id: Option<u32>, offset: i64) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, offset);
        }
    }

    fn record(&self, id: Option<u32>, value: u64) {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    /// One inspected body is finished: its size, its scan time, and the VM's memory now.
    fn record_scan(&self, bytes: u64, nanos: u64) {
        self.record(self.body_bytes, bytes);
        self.record(self.scan_time_us, nanos / 1_000);
        self.add(self.scanned_bytes, bytes);
        self.add(self.scan_nanoseconds, nanos);
        self.record_memory();
    }

    /// The VM's linear memory size, if it changed since it was last recorded.
    fn record_memory(&self) {
        let now = memory_bytes();
        if now != self.memory_recorded.get() {
            self.record(self.memory_bytes, now);
            self.memory_recorded.set(now);
        }
    }
}

/// The size of this VM's linear memory, in bytes.
fn memory_bytes() -> u64 {
    // Memory 0 is the module's only memory; its size is counted in 64 KiB wasm pages.
    (core::arch::wasm32::memory_size(0) as u64) * 65_536
}
