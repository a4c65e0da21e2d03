//! The root context: the configuration, the timer, and model discovery.
//!
//! Every worker's VM has its own root context, and with `pools` each one polls every pool
//! itself (README, Discovery: why each worker polls rather than one polling and sharing).
//! Polls are `dispatch_http_call`s made on the tick; their answers come back in
//! `on_http_call_response`, are applied to the core's plain-data [`PoolState`], and a new
//! [`RoutingView`] replaces the old one for the requests that start after it. No request
//! ever waits on a poll.

use super::http::{BbrHttp, Phase};
use super::scrape::Scraper;
use super::{now_millis, now_nanos, shared, Metrics};
use crate::core::affinity::picker::Picker;
use crate::core::affinity::prefix::DEFAULT_PREFIX_BLOCKS;
use crate::core::routing::discovery::{
    fingerprint, next_poll_delay_ms, next_random, parse_models, Health, Listed, PollFailure,
    PollOutcome, MAX_MODELS_BODY_BYTES,
};
use crate::core::{PoolState, Router, RoutingView};
use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MapType, Status};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// How often each worker's root context asks the host for the log level.
const LOG_LEVEL_REFRESH_MS: u64 = 1_000;
/// The timer's period with pools: a tenth of the shortest interval, within these bounds. The
/// tick is when a due poll is sent, so this is how late a poll can be past its due time.
const MIN_TICK_MS: u64 = 50;
const MAX_TICK_MS: u64 = 1_000;
/// A poll whose answer has not come this long after its timeout is given up on (the host
/// always answers, by its timeout at the latest; this only guards against one that did not).
const LOST_CALL_GRACE_MS: u64 = 1_000;
/// Most model names one log line spells out.
const NAMES_PER_LOG_LINE: usize = 10;

/// One pool's polling: what it serves, when it is next due, the call in flight.
struct PoolRun {
    state: PoolState,
    next_due_ms: u64,
    /// (token, sent at) of the call in flight.
    in_flight: Option<(u32, u64)>,
}

/// The plugin's root context: holds the validated configuration and the routing table.
pub(super) struct BbrRoot {
    context_id: u32,
    router: Option<Rc<Router>>,
    /// The table new requests are routed by.
    view: Rc<RoutingView>,
    metrics: Rc<Metrics>,
    /// The endpoint pickers of `prefixAffinity.picker.pools`, in the same order: this worker's
    /// own table (each Envoy worker runs its own VM), shared by its requests.
    pickers: Rc<RefCell<Vec<Picker>>>,
    /// Unix time of the accepted configuration, the `created` of the model list.
    configured_at: u64,
    /// Per configured pool, in the same order.
    pools: Vec<PoolRun>,
    /// Jitter source, seeded per root context.
    random: u64,
    /// Fingerprint of the configuration: the namespace of this plugin's shared-data keys.
    config_fingerprint: u64,
    log_level_read_ms: u64,
    /// With `prefixAffinity.picker.hosts`: this root context's part in reading the cluster's
    /// hosts and metrics (`super::scrape`).
    scraper: Option<Scraper>,
}

impl BbrRoot {
    pub(super) fn new(context_id: u32) -> Self {
        BbrRoot {
            context_id,
            router: None,
            view: Rc::new(RoutingView::default()),
            metrics: Rc::new(Metrics::default()),
            pickers: Rc::new(RefCell::new(Vec::new())),
            configured_at: 0,
            pools: Vec::new(),
            random: 0,
            config_fingerprint: 0,
            log_level_read_ms: 0,
            scraper: None,
        }
    }

    /// Sends the due polls; gives up on calls the host never answered.
    fn poll_due(&mut self, now: u64) {
        let Some(router) = self.router.clone() else {
            return;
        };
        for (i, pool) in router.pools.iter().enumerate() {
            let Some(run) = self.pools.get_mut(i) else {
                continue;
            };
            if let Some((token, sent)) = run.in_flight {
                if now < sent + pool.timeout_ms + LOST_CALL_GRACE_MS {
                    continue;
                }
                run.in_flight = None;
                debug!(
                    "[{}] pool {:?}: forgetting call {token}",
                    self.context_id, pool.cluster
                );
                self.apply(
                    i,
                    Err(PollFailure::Unreachable(
                        "the host did not answer the call".into(),
                    )),
                );
                continue;
            }
            if now < run.next_due_ms {
                continue;
            }
            run.next_due_ms =
                now + next_poll_delay_ms(pool.interval_ms, next_random(&mut self.random));
            let headers = vec![
                (":method", "GET"),
                (":path", pool.path.as_str()),
                (":authority", pool.authority.as_str()),
                ("accept", "application/json"),
            ];
            // The SDK's hostcalls::dispatch_http_call, not a raw import: it registers the token,
            // and the SDK panics on an answer to a token it does not know. It panics itself only
            // on statuses Envoy does not return here (Envoy: Ok, BadArgument for an unknown
            // cluster or a missing pseudo-header, InternalFailure).
            match hostcalls::dispatch_http_call(
                &pool.cluster,
                headers,
                None,
                vec![],
                Duration::from_millis(pool.timeout_ms),
            ) {
                Ok(token) => run.in_flight = Some((token, now)),
                // Envoy refuses a call to an unknown cluster (BadArgument), and one that fails
                // at once (InternalFailure: no healthy replica, connection refused).
                Err(status) => self.apply(
                    i,
                    Err(PollFailure::Unreachable(format!(
                        "the call failed at once: {status:?} (no healthy replica, or no cluster \
                         {:?} in Envoy's configuration)",
                        pool.cluster
                    ))),
                ),
            }
        }
    }

    /// Reads the answer to a poll (headers, status, size-capped body) into a model list.
    fn read_answer(
        &self,
        num_headers: usize,
        body_size: usize,
    ) -> Result<Vec<Listed>, PollFailure> {
        if num_headers == 0 {
            return Err(PollFailure::Unreachable(
                "the call ended without a response".into(),
            ));
        }
        let status =
            match hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status") {
                Ok(Some(bytes)) => std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok()),
                Ok(None) => None,
                Err(status) => {
                    return Err(PollFailure::Unreachable(format!(
                        "cannot read the response status: {status:?}"
                    )))
                }
            };
        match status {
            Some(200) => {}
            Some(code) => return Err(PollFailure::Status(code)),
            None => {
                return Err(PollFailure::Unreachable(
                    "the response has no valid :status".into(),
                ))
            }
        }
        // Refused before a byte is copied into the VM.
        if body_size > MAX_MODELS_BODY_BYTES {
            return Err(PollFailure::TooLarge { size: body_size });
        }
        let body = match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                return Err(PollFailure::Unreachable(format!(
                    "cannot read the response body: {status:?}"
                )))
            }
        };
        let max_name = self.router.as_ref().map_or(0, |r| r.max_model_name_bytes);
        parse_models(&body, max_name)
    }

    /// Applies one poll's result to pool `i`: counters always; a log line only when the
    /// pool's health or its models changed; a new routing table when routes changed.
    fn apply(&mut self, i: usize, result: Result<Vec<Listed>, PollFailure>) {
        let Some(router) = self.router.clone() else {
            return;
        };
        let (Some(pool), Some(run)) = (router.pools.get(i), self.pools.get_mut(i)) else {
            return;
        };
        let id = self.context_id;
        let fp = self.config_fingerprint;
        let cluster = &pool.cluster;
        let mut rebuild = false;
        match result {
            Ok(listed) => {
                self.metrics.count_poll(i, PollOutcome::Ok);
                let answered_before = run.state.answered();
                let applied = run
                    .state
                    .apply_models(&listed, router.absent_polls_before_removal);
                let n = run.state.len();
                if let Some(was) = applied.health_was {
                    // The first answer ends the pool's 503 window: a new table either way.
                    rebuild = true;
                    if claim_log(fp, &format!("health.{cluster}"), PollOutcome::Ok.label()) {
                        match was {
                            Health::Failing(outcome) if answered_before => info!(
                                "[{id}] bbr-wasm: pool {cluster:?}: polls answer again (were {}), \
                                 {n} models",
                                outcome.label()
                            ),
                            _ => {
                                info!("[{id}] bbr-wasm: pool {cluster:?}: first answer, {n} models")
                            }
                        }
                    }
                }
                let models = format!("{:016x}", run.state.models_fingerprint());
                if applied.routes_changed() {
                    rebuild = true;
                }
                if applied.routes_changed() && claim_log(fp, &format!("models.{cluster}"), &models)
                {
                    info!(
                        "[{id}] bbr-wasm: pool {cluster:?}: added [{}], removed [{}], re-parented [{}]",
                        spell(&applied.added),
                        spell(&applied.removed),
                        spell(&applied.reparented)
                    );
                }
            }
            Err(failure) => {
                self.metrics.count_poll(i, failure.outcome());
                if run.state.apply_failure(&failure).is_some()
                    && claim_log(fp, &format!("health.{cluster}"), failure.outcome().label())
                {
                    let keeps = if run.state.answered() {
                        format!("keeping the last good list of {} models", run.state.len())
                    } else {
                        "no answer yet: models not otherwise known get 503".to_string()
                    };
                    warn!(
                        "[{id}] bbr-wasm: pool {cluster:?}: polls of {} fail: {failure}; {keeps} \
                         (logged once until this changes)",
                        pool.path
                    );
                } else {
                    debug!("[{id}] pool {cluster:?}: poll failed again: {failure}");
                }
            }
        }
        self.metrics.record_pool_models(i, run.state.len());
        if rebuild {
            self.rebuild_view(&router);
        }
    }

    /// Merges the static models and every pool's into a new routing table, and logs and counts
    /// each conflict the first time it appears.
    fn rebuild_view(&mut self, router: &Router) {
        let pairs: Vec<_> = router
            .pools
            .iter()
            .zip(self.pools.iter().map(|run| &run.state))
            .collect();
        let view = RoutingView::merge(router, &pairs);
        for conflict in view.conflicts.difference(&self.view.conflicts) {
            let winner = format!("{}>{}", conflict.kept, conflict.dropped);
            if !claim_log(
                self.config_fingerprint,
                &format!("conflict.{}", conflict.name),
                &winner,
            ) {
                continue;
            }
            warn!(
                "[{}] bbr-wasm: model {:?} is listed by {} and by pool {:?}: routed to {} \
                 (static models come first, then pools in configuration order)",
                self.context_id, conflict.name, conflict.kept, conflict.dropped, conflict.kept
            );
            self.metrics.increment(self.metrics.discovery_conflicts);
        }
        self.metrics.define_models(&view);
        self.view = Rc::new(view);
    }
}

impl BbrRoot {
    /// Rewrites this worker's rows of in-flight counts (the ones it claimed), so that they stay
    /// within their lease while the worker is idle (`core::affinity::shared_load`).
    fn refresh_load_rows(&self, now: u64) {
        let Ok(mut pickers) = self.pickers.try_borrow_mut() else {
            return;
        };
        for picker in pickers.iter_mut() {
            if let (Some(load), Some(_)) = (picker.shared_load(), picker.load_row()) {
                if shared::publish_load(self.context_id, &load, picker, None, now) {
                    self.metrics
                        .increment(self.metrics.endpoint_shared_unusable);
                }
            }
        }
    }
}

/// Whether this root context logs a change to `value` of the state named `what`.
///
/// Every worker (and Envoy's main thread, which runs a root context too) polls for
/// itself, so each sees the same change. The last logged value sits in the host's shared
/// data, process-wide: the first root to compare-and-swap it logs, the others find it
/// already there. So a change of state is logged once per Envoy process, not once per
/// worker. If the shared data is unusable this says yes: a duplicate line is better than
/// a lost one.
fn claim_log(config_fingerprint: u64, what: &str, value: &str) -> bool {
    let key = format!("bbr-wasm.{config_fingerprint:016x}.{what}");
    // super::shared's raw calls: the SDK's hostcalls::get_shared_data and set_shared_data
    // panic (trapping the VM) on any status but Ok, NotFound and CasMismatch.
    for _ in 0..3 {
        let read = match super::shared::get(&key) {
            Ok(read) => read,
            Err(_) => return true,
        };
        if read.value.as_deref() == Some(value.as_bytes()) {
            return false;
        }
        match super::shared::set(&key, value.as_bytes(), read.cas) {
            Ok(()) => return true,
            Err(status) if status == Status::CasMismatch as u32 => continue,
            Err(_) => return true,
        }
    }
    false
}

/// Up to NAMES_PER_LOG_LINE names, quoted, then how many more.
fn spell(names: &[String]) -> String {
    let mut out: Vec<String> = names
        .iter()
        .take(NAMES_PER_LOG_LINE)
        .map(|n| format!("{n:?}"))
        .collect();
    if names.len() > NAMES_PER_LOG_LINE {
        out.push(format!("and {} more", names.len() - NAMES_PER_LOG_LINE));
    }
    out.join(", ")
}

impl Context for BbrRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some(scraper) = self.scraper.as_mut() {
            // The pickers, for this Envoy's in-flight counts at the moment a report arrives
            // (none while a request borrows them: then Envoy's rq_active stands in).
            let answered = match self.pickers.try_borrow() {
                Ok(pickers) => scraper.on_response(token_id, num_headers, body_size, &pickers),
                Err(_) => scraper.on_response(token_id, num_headers, body_size, &[]),
            };
            if answered {
                return;
            }
        }
        let Some(i) = self
            .pools
            .iter()
            .position(|run| matches!(run.in_flight, Some((t, _)) if t == token_id))
        else {
            // An answer to a call already given up on.
            debug!(
                "[{}] late answer to call {token_id} ignored",
                self.context_id
            );
            return;
        };
        if let Some(run) = self.pools.get_mut(i) {
            run.in_flight = None;
        }
        let result = self.read_answer(num_headers, body_size);
        self.apply(i, result);
    }
}

fn refresh_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

impl RootContext for BbrRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let id = self.context_id;
        refresh_log_level();
        let bytes = match hostcalls::get_buffer(
            BufferType::PluginConfiguration,
            0,
            plugin_configuration_size,
        ) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                error!("[{id}] bbr-wasm: cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        self.config_fingerprint = fingerprint(&bytes);
        let router = match Router::from_json(&bytes) {
            Ok(router) => router,
            Err(err) => {
                // Refusing makes Envoy reject the filter config: at start-up Envoy does not
                // start; on an update the previous configuration keeps serving.
                error!("[{id}] bbr-wasm: configuration refused: {err}");
                return false;
            }
        };
        let adapters = router.served.iter().filter(|m| m.is_adapter).count();
        info!(
            "[{id}] bbr-wasm: configuration accepted: {} base models, {adapters} adapters, \
             {} pools, routing header {:?}",
            router.served.len() - adapters,
            router.pools.len(),
            router.base_model_header
        );
        let now = now_millis();
        self.configured_at = now / 1_000;
        self.log_level_read_ms = now;
        self.random = now_nanos() ^ (u64::from(id) << 32) ^ 0x5DEE_CE66_D1CE_4E5B;
        self.metrics = Rc::new(Metrics::define(id, &router));
        // The first poll of every pool goes out on the first tick.
        self.pools = router
            .pools
            .iter()
            .map(|_| PoolRun {
                state: PoolState::new(),
                next_due_ms: 0,
                in_flight: None,
            })
            .collect();
        // A new table: requests still running keep the old one through their Rc.
        let key_blocks = router
            .prefix_affinity
            .as_ref()
            .map_or(DEFAULT_PREFIX_BLOCKS, |a| a.prefix_blocks);
        let mut pickers: Vec<Picker> = router
            .prefix_affinity
            .as_ref()
            .and_then(|a| a.picker.as_ref())
            .map(|p| {
                p.pools
                    .iter()
                    .map(|pool| {
                        let mut picker = Picker::new(&pool.endpoints, p.lru_blocks, p.scoring);
                        picker.set_sharing(&pool.cluster, p.shared_slots);
                        picker.set_kv_weight(p.kv_weight);
                        picker.set_consistent(p.consistent_placement);
                        picker.set_key_blocks(key_blocks);
                        picker
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Each worker's id in the shared in-flight rows (`core::affinity::shared_load`).
        for picker in &mut pickers {
            picker.set_share_owner(next_random(&mut self.random));
        }
        self.pickers = Rc::new(RefCell::new(pickers));
        self.scraper = router
            .prefix_affinity
            .as_ref()
            .and_then(|a| a.picker.as_ref())
            .and_then(|p| {
                Scraper::new(
                    id,
                    next_random(&mut self.random),
                    self.config_fingerprint,
                    p,
                )
            });
        let router = Rc::new(router);
        self.router = Some(Rc::clone(&router));
        self.view = Rc::new(RoutingView::from_static(&router));
        self.rebuild_view(&router);
        // The timer: it refreshes the log level (so `POST /logging?wasm=debug` on Envoy's
        // admin takes effect on a running gateway, at no cost per request) and sends the due
        // polls.
        let tick_ms = router
            .pools
            .iter()
            .map(|p| p.interval_ms / 10)
            .min()
            .map_or(LOG_LEVEL_REFRESH_MS, |ms| {
                ms.clamp(MIN_TICK_MS, MAX_TICK_MS)
            })
            .min(self.scraper.as_ref().map_or(u64::MAX, Scraper::tick_ms));
        if let Err(status) = hostcalls::set_tick_period(Duration::from_millis(tick_ms)) {
            if router.pools.is_empty() && self.scraper.is_none() {
                warn!("[{id}] bbr-wasm: no timer ({status:?}); the log level is read once, now");
            } else {
                // Without a timer no pool is ever polled: refuse rather than serve 503 forever.
                error!("[{id}] bbr-wasm: no timer ({status:?}); pools cannot be polled");
                return false;
            }
        }
        true
    }

    fn on_tick(&mut self) {
        let now = now_millis();
        if now.saturating_sub(self.log_level_read_ms) >= LOG_LEVEL_REFRESH_MS {
            refresh_log_level();
            self.log_level_read_ms = now;
        }
        self.poll_due(now);
        if let Some(scraper) = self.scraper.as_mut() {
            if let Ok(mut pickers) = self.pickers.try_borrow_mut() {
                scraper.on_tick(&mut pickers);
            }
        }
        self.refresh_load_rows(now);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // The SDK panics on `None`, so a context is always returned; without a router it
        // fails closed (see `BbrHttp::on_http_request_headers`).
        Some(Box::new(BbrHttp {
            id: context_id,
            router: self.router.clone(),
            view: Rc::clone(&self.view),
            metrics: Rc::clone(&self.metrics),
            pickers: Rc::clone(&self.pickers),
            picked: None,
            picked_hashes: Vec::new(),
            configured_at: self.configured_at,
            phase: Phase::Headers,
            scanner: None,
            capture: None,
            held: false,
            held_bytes: 0,
            consumed: 0,
            scan_nanos: 0,
            scanned_at_ns: 0,
            usage: None,
            ask_usage: false,
            had_content_length: false,
            include_edit: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
