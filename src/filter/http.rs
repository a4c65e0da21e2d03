//! One HTTP stream: anti-spoofing, the body scan, and the routing headers.

use super::response::Accounting;
use super::{now_millis, now_nanos, shared, Metrics};
use crate::core::affinity::picker::Picker;
use crate::core::affinity::shared_blocks::not_entries;
use crate::core::config::LOCAL_REPLY_HEADER;
use crate::core::overload::HeldBodies;
use crate::core::routing::headers;
use crate::core::usage::include::{self, BodyEdit};
use crate::core::{
    BodyScanner, CaptureState, HeadAction, ModelScanner, Outcome, PromptCapture, Rejection,
    RequestHead, Route, Router, RoutingView, Step, ViewVerdict,
};
use log::{debug, error, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType, Status};
use std::cell::{Cell, RefCell};
use std::ptr::null_mut;
use std::rc::Rc;

/// Envoy's foreign function that makes the router re-resolve the route after we changed
/// request headers. Since Envoy 1.33 a header change from wasm does not always clear the
/// cached route, so without it a filter that resolved the route earlier (Lua, ext_authz, ...)
/// would leave the request on the route chosen before our header existed.
const CLEAR_ROUTE_CACHE: &str = "clear_route_cache";

/// Most body bytes copied into the VM at once.
const READ_WINDOW_BYTES: usize = 64 * 1024;

// The raw ABI call behind the SDK's `get_map_bytes`, which panics on a non-Ok status (a trap
// that takes the VM down) and unwraps each header name as UTF-8. Declared here to handle both.
// The same import as the SDK's declaration (module "env"), with the enum arguments as u32.
// Likewise `proxy_set_buffer_bytes`, whose SDK wrapper (`hostcalls::set_buffer`) panics on any
// status but Ok: Envoy answers NotFound when it has no body buffer and BadArgument for an
// edit in the middle of one.
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
}

/// `BufferType::HttpRequestBody` of the ABI.
const HTTP_REQUEST_BODY: u32 = 0;

thread_local! {
    /// Set once the host said it has no `clear_route_cache`, so we warn once, not per request.
    static NO_CLEAR_ROUTE_CACHE: Cell<bool> = const { Cell::new(false) };
    /// The body bytes this VM's requests hold together. One VM per worker thread, and a VM
    /// runs one callback at a time, so this is the worker's total (see `core::overload`).
    static HELD_BODIES: Cell<HeldBodies> = const { Cell::new(HeldBodies::new()) };
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Headers not seen yet.
    Headers,
    /// Headers held; reading the body.
    Scanning,
    /// Decided and let through; later callbacks pass.
    Passed,
    /// Answered locally; later callbacks must not let anything through.
    Replied,
}

/// One HTTP stream.
pub(super) struct BbrHttp {
    pub(super) id: u32,
    pub(super) router: Option<Rc<Router>>,
    /// The routing table when the request started: static and discovered models. A poll
    /// answering meanwhile builds a new table for later requests; nothing waits on it.
    pub(super) view: Rc<RoutingView>,
    pub(super) metrics: Rc<Metrics>,
    /// This worker's endpoint pickers (`prefixAffinity.picker`).
    pub(super) pickers: Rc<RefCell<Vec<Picker>>>,
    /// (picker pool, endpoint id) this request was counted in flight at, until the stream ends.
    pub(super) picked: Option<(usize, usize)>,
    /// The prompt's block hashes the pick recorded, kept to record them where Envoy really
    /// sent the request if that was elsewhere (at most `picker.maxBlocks`).
    pub(super) picked_hashes: Vec<u64>,
    pub(super) configured_at: u64,
    pub(super) phase: Phase,
    pub(super) scanner: Option<Box<BodyScanner>>,
    /// The prompt's start, for the prefix key (prefix affinity on, JSON body); fed until it
    /// is settled, usually a few KiB into the body.
    pub(super) capture: Option<Box<PromptCapture>>,
    /// Counted in the `bbr_bodies_in_progress` gauge (reading the body, not decided yet).
    pub(super) held: bool,
    /// The body bytes Envoy buffers for this request while it is held, counted in the
    /// worker's `HELD_BODIES`.
    pub(super) held_bytes: u64,
    /// Body bytes already given to the scanner.
    pub(super) consumed: usize,
    /// Time spent in the scanner for this request.
    pub(super) scan_nanos: u64,
    /// The host's clock when the scanner last stopped (0: never read): the response
    /// accounting's start when the decision follows in the same callback, which saves it a
    /// clock read (each host call costs the gateway about a microsecond per request).
    pub(super) scanned_at_ns: u64,
    /// Token usage and latency of a routed request's response (`usage.enabled`).
    pub(super) usage: Option<Box<Accounting>>,
    /// `usage.addIncludeUsage` is on and this is a completions request: a stream that left
    /// `stream_options` open is asked for its usage (`core::usage::include`).
    pub(super) ask_usage: bool,
    /// The request came with `content-length` (which the edit must then correct).
    pub(super) had_content_length: bool,
    /// The edit that asks for the stream's usage, carried out if the request is routed.
    pub(super) include_edit: Option<BodyEdit>,
}

impl Context for BbrHttp {}

/// The SDK drops the context when Envoy destroys the stream (proxy_on_delete), whatever ended
/// it: a reply, the end of the response, or a reset by the client or by Envoy's overload
/// manager in the middle of the body. The scanner and the buffers go with it; the gauge and
/// the picker's in-flight count are outside the context, so they are settled here: the one
/// place every ending passes (end of response, upstream error, local reply, reset).
impl Drop for BbrHttp {
    fn drop(&mut self) {
        self.release_hold();
        if let Some(usage) = self.usage.as_mut() {
            usage.end(self.id, &self.metrics, false);
        }
        if let Some((pool, endpoint)) = self.picked.take() {
            if let Ok(mut pickers) = self.pickers.try_borrow_mut() {
                if let Some(picker) = pickers.get_mut(pool) {
                    picker.done_id(endpoint);
                    // The other workers see the request end.
                    if let Some(load) = picker.shared_load() {
                        if shared::publish_load(self.id, &load, picker, None, now_millis()) {
                            self.metrics
                                .increment(self.metrics.endpoint_shared_unusable);
                        }
                    }
                }
            }
        }
    }
}

impl HttpContext for BbrHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(router) = self.router.clone() else {
            error!(
                "[{}] bbr-wasm has no valid configuration; refusing the request",
                self.id
            );
            return self.reply_error(500, "The gateway's model router is not configured.");
        };

        // Every header this callback reads, in one host call (see `core::routing::headers`).
        let map = match request_header_map() {
            Ok(map) => map,
            Err(status) => {
                error!(
                    "[{}] cannot read the request headers: status {status}",
                    self.id
                );
                return self.reply_error(500, "The gateway could not read the request headers.");
            }
        };
        let pairs = match headers::parse_pairs(&map) {
            Ok(pairs) => pairs,
            Err(err) => {
                error!("[{}] {err}", self.id);
                return self.reply_error(500, "The gateway could not read the request headers.");
            }
        };

        // Anti-spoofing comes first, for every request, inspected or not: a client must never
        // choose a pool by sending the routing header itself, and above all never a cluster
        // through the pool header (the shipped route hands its value to `cluster_header`, which
        // would reach any cluster in Envoy's config). The local-reply marker goes too, so a
        // client cannot change how Envoy rewrites error bodies. The value is never decoded: a
        // forged header may hold any bytes.
        let mut removed = false;
        for name in [
            router.base_model_header.as_str(),
            router.model_header.as_str(),
            router.pool_header.as_str(),
            router.prefix_header.as_str(),
            router.picker_header.as_str(),
            LOCAL_REPLY_HEADER,
        ] {
            if headers::first(&pairs, name).is_none() {
                continue;
            }
            // Removes every copy of the header.
            if let Err(status) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name) {
                error!(
                    "[{}] cannot remove client header {name:?}: {status:?}",
                    self.id
                );
                return self.reply_error(500, "The gateway could not sanitize the request.");
            }
            removed = true;
        }
        if removed {
            self.metrics.increment(self.metrics.spoofed_header_removed);
            debug!("[{}] removed client-supplied routing headers", self.id);
            // The route may already have been resolved with the forged value.
            self.clear_route_cache();
        }

        // Read as bytes, decoded here: invalid UTF-8 (bytes 0x80-0xFF, which Envoy accepts in
        // values) becomes U+FFFD, which matches no content type, encoding or path we accept.
        // The SDK's string getters unwrap the conversion instead, so one such header would
        // panic and trap the VM.
        let text = |name: &str| headers::first(&pairs, name).map(String::from_utf8_lossy);
        let method = text(":method");
        let path = text(":path");
        let content_type = text("content-type");
        let content_encoding = text("content-encoding");
        let content_length = text("content-length");
        let head = RequestHead {
            method: method.as_deref().unwrap_or(""),
            path: path.as_deref().unwrap_or(""),
            content_type: content_type.as_deref(),
            content_encoding: content_encoding.as_deref(),
            content_length: content_length.as_deref(),
        };

        match router.classify(&head) {
            HeadAction::Pass => {
                self.metrics.count(Outcome::Passthrough);
                self.phase = Phase::Passed;
                Action::Continue
            }
            HeadAction::ServeModelList => {
                self.metrics.count(Outcome::ModelList);
                let body = self.view.model_list_body(self.configured_at);
                self.reply(200, &body, &[])
            }
            HeadAction::Reject(rejection) => self.reject(&rejection),
            HeadAction::Inspect(mut scanner) => {
                self.ask_usage = router.may_ask_stream_usage(&head);
                self.had_content_length = head.content_length.is_some();
                if end_of_stream {
                    // A POST without a body: the scanner calls it what it is.
                    let step = scanner.finish();
                    return self.act_on(&router, step);
                }
                self.capture = router.prompt_capture(&scanner).map(Box::new);
                self.scanner = Some(scanner);
                self.phase = Phase::Scanning;
                self.held = true;
                self.metrics.add_gauge(self.metrics.bodies_in_progress, 1);
                // Needs `allow_on_headers_stop_iteration: true` on Envoy >= 1.35; otherwise
                // this Pause becomes StopAllIteration and the body callback never comes.
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        // Only a clock read of this callback stands for now.
        self.scanned_at_ns = 0;
        if end_of_stream {
            if let Some(usage) = self.usage.as_mut() {
                usage.request_ended();
            }
        }
        match self.phase {
            Phase::Scanning => {}
            Phase::Replied => return Action::Pause,
            Phase::Headers | Phase::Passed => return Action::Continue,
        }
        let Some(router) = self.router.clone() else {
            return self.reply_error(500, "The gateway's model router is not configured.");
        };
        if body_size as u64 > router.max_body_bytes {
            return self.reject(&Rejection::TooLarge {
                limit: router.max_body_bytes,
            });
        }
        // The worker's held bodies together: past maxHeldBodyBytes, a large body that is still
        // growing is refused (503, retryable), so a flood of slow uploads cannot hold more than
        // the budget while small requests go on. Envoy's overload manager cannot make that
        // choice over HTTP/1.1 (it does not account buffered memory per stream there).
        let total = self.hold_body(body_size as u64);
        if router.body_budget.must_shed(total, self.held_bytes) {
            // Per request at debug level: a flood sheds hundreds; bbr_overloaded_total counts them.
            debug!(
                "[{}] shedding a {} byte body: this worker holds {total} body bytes (maxHeldBodyBytes {})",
                self.id, self.held_bytes, router.body_budget.max_held_bytes
            );
            return self.reject(&Rejection::Overloaded);
        }
        // `body_size` is everything buffered so far (we return Pause, so Envoy keeps
        // buffering). Only the bytes after `consumed` are new: reading from there keeps the
        // work linear in the body size however many chunks arrive. They are copied into the VM
        // a window at a time, so the VM's memory stays bounded however much Envoy delivers in
        // one callback.
        while body_size > self.consumed {
            let len = (body_size - self.consumed).min(READ_WINDOW_BYTES);
            let bytes = match hostcalls::get_buffer(BufferType::HttpRequestBody, self.consumed, len)
            {
                Ok(Some(bytes)) if !bytes.is_empty() => bytes,
                Ok(_) => {
                    error!(
                        "[{}] the host returned no body bytes ({len} expected)",
                        self.id
                    );
                    return self.reply_error(500, "The gateway could not read the request body.");
                }
                Err(status) => {
                    error!("[{}] cannot read the request body: {status:?}", self.id);
                    return self.reply_error(500, "The gateway could not read the request body.");
                }
            };
            self.consumed += bytes.len();
            if let Some(scanner) = self.scanner.as_mut() {
                let started = now_nanos();
                let step = scanner.feed(&bytes);
                if let Some(capture) = self.capture.as_mut() {
                    if capture.state() == CaptureState::Reading {
                        capture.feed(&bytes);
                    }
                }
                let stopped = now_nanos();
                self.scan_nanos += stopped.saturating_sub(started);
                self.scanned_at_ns = stopped;
                if step != Step::NeedMore {
                    return self.act_on(&router, step);
                }
                if router.route_before_body_ends {
                    if let Some(step) = scanner.early_model() {
                        // The rest of the body streams on unscanned.
                        return self.act_on(&router, step);
                    }
                }
            }
        }
        if end_of_stream {
            return self.finish(&router);
        }
        Action::Pause
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.scanned_at_ns = 0;
        // With trailers (gRPC-style HTTP/2 streams) the last body callback does not carry
        // end_of_stream; the trailers end the body.
        match self.phase {
            Phase::Scanning => match self.router.clone() {
                Some(router) => self.finish(&router),
                None => self.reply_error(500, "The gateway's model router is not configured."),
            },
            Phase::Replied => Action::Pause,
            Phase::Headers | Phase::Passed => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.check_picked_upstream();
        if let Some(usage) = self.usage.as_mut() {
            if !usage.on_headers(self.id, &self.metrics, end_of_stream) {
                self.usage = None;
            }
        }
        Action::Continue
    }

    // The response is never held: every chunk goes on as it came (see `response`).
    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if let Some(usage) = self.usage.as_mut() {
            usage.on_body(self.id, &self.metrics, body_size, end_of_stream);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if let Some(usage) = self.usage.as_mut() {
            usage.end(self.id, &self.metrics, true);
        }
        Action::Continue
    }
}

impl BbrHttp {
    fn finish(&mut self, router: &Router) -> Action {
        if let Some(capture) = self.capture.as_mut() {
            capture.finish();
        }
        let step = match self.scanner.as_mut() {
            Some(scanner) => scanner.finish(),
            None => ModelScanner::new(router.max_model_name_bytes).finish(),
        };
        // The whole body has been read (`consumed`), so the stream fields are complete.
        if self.ask_usage && matches!(step, Step::Found(_)) {
            self.include_edit = self
                .scanner
                .as_ref()
                .and_then(|s| s.stream_fields())
                .and_then(|fields| include::include_usage_edit(fields, self.consumed as u64));
        }
        self.act_on(router, step)
    }

    /// Carries out the scanner's verdict.
    /// The request is no longer waiting for its body (decided, answered or gone).
    fn release_hold(&mut self) {
        if self.held {
            self.held = false;
            self.metrics.add_gauge(self.metrics.bodies_in_progress, -1);
        }
        if self.held_bytes > 0 {
            let released = i64::try_from(self.held_bytes).unwrap_or(i64::MAX);
            HELD_BODIES.with(|cell| {
                let mut held = cell.get();
                held.release(&mut self.held_bytes);
                cell.set(held);
            });
            self.metrics
                .add_gauge(self.metrics.held_body_bytes, -released);
        }
    }

    /// This request now holds `now` body bytes; returns the worker's total.
    fn hold_body(&mut self, now: u64) -> u64 {
        let before = self.held_bytes;
        let total = HELD_BODIES.with(|cell| {
            let mut held = cell.get();
            let total = held.hold(&mut self.held_bytes, now);
            cell.set(held);
            total
        });
        let delta =
            i64::try_from(now).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(i64::MAX);
        self.metrics.add_gauge(self.metrics.held_body_bytes, delta);
        total
    }

    fn act_on(&mut self, router: &Router, step: Step) -> Action {
        self.scanner = None;
        let capture = self.capture.take();
        self.release_hold();
        self.metrics
            .record_scan(self.consumed as u64, self.scan_nanos);
        let view = Rc::clone(&self.view);
        match view.decide(step) {
            None => Action::Pause,
            Some(ViewVerdict::Route(route)) => {
                let served = &route.model;
                let set = self
                    .set_request_header(&router.base_model_header, &served.base)
                    .and_then(|()| self.set_request_header(&router.model_header, &served.name))
                    .and_then(|()| match &route.pool {
                        Some(cluster) => self.set_request_header(&router.pool_header, cluster),
                        None => Ok(()),
                    });
                if let Err(status) = set {
                    error!("[{}] cannot set the routing headers: {status:?}", self.id);
                    return self.reply_error(500, "The gateway could not route the request.");
                }
                // With routeBeforeBodyEnds the capture may not be settled yet: no key then,
                // rather than a key over part of the prompt that the next request would not share.
                // One hash chain serves the key and the endpoint picker.
                let hashes = capture
                    .as_deref()
                    .map(|c| router.prompt_hashes(c, &served.name))
                    .unwrap_or_default();
                if let Some(key) = router.key_of(&hashes) {
                    if let Some(affinity) = &router.prefix_affinity {
                        if let Err(status) = self.set_request_header(&affinity.header, &key) {
                            error!("[{}] cannot set the prefix key: {status:?}", self.id);
                            return self
                                .reply_error(500, "The gateway could not route the request.");
                        }
                        self.metrics.increment(self.metrics.prefix_keyed);
                    }
                }
                if let Err(status) = self.pick_endpoint(router, route, router.picker_part(&hashes))
                {
                    error!("[{}] cannot set the picked endpoint: {status:?}", self.id);
                    return self.reply_error(500, "The gateway could not route the request.");
                }
                if let Some(edit) = self.include_edit.take() {
                    if let Err(why) = self.add_include_usage(edit) {
                        error!("[{}] cannot ask for the stream's usage: {why}", self.id);
                        return self.reply_error(500, "The gateway could not route the request.");
                    }
                }
                self.clear_route_cache();
                if router.usage.enabled {
                    let adapter = served.is_adapter.then_some(served.name.as_str());
                    // The scan stopped in this callback, just before the decision.
                    let now = match self.scanned_at_ns {
                        0 => now_nanos(),
                        t => t,
                    };
                    self.usage = Some(Accounting::new(
                        &served.base,
                        adapter,
                        router.usage.max_scan_bytes,
                        now,
                    ));
                }
                self.metrics.count(Outcome::Routed);
                self.metrics.count_model(&served.base);
                debug!("[{}] routed to base model {:?}", self.id, served.base);
                self.phase = Phase::Passed;
                Action::Continue
            }
            Some(ViewVerdict::Pass) => {
                self.metrics.count(Outcome::UnknownModel);
                self.metrics.count(Outcome::Passthrough);
                debug!(
                    "[{}] unknown model passed through without routing headers",
                    self.id
                );
                self.phase = Phase::Passed;
                Action::Continue
            }
            Some(ViewVerdict::Reject(rejection)) => self.reject(&rejection),
        }
    }

    /// With `prefixAffinity.picker` and a pool for this route: chooses the endpoint, counts the
    /// request in flight there (until the stream ends, see `Drop`) and names it in the picker
    /// header for Envoy's override_host policy. `hashes` are the prompt's chained block hashes
    /// (`Router::picker_part`); a request without them is placed by load alone.
    fn pick_endpoint(
        &mut self,
        router: &Router,
        route: &Route,
        hashes: &[u64],
    ) -> Result<(), Status> {
        let Some(config) = router
            .prefix_affinity
            .as_ref()
            .and_then(|a| a.picker.as_ref())
        else {
            return Ok(());
        };
        let Some(pool) = config.pool_for(route.pool.as_deref(), &route.model.base) else {
            return Ok(());
        };
        let now = now_millis();
        // The pool's tables shared with the other workers, for its current endpoints.
        let (table, load) = match self.pickers.try_borrow() {
            Ok(pickers) => match pickers.get(pool) {
                Some(picker) => (picker.shared_table(), picker.shared_load()),
                None => return Ok(()),
            },
            Err(_) => return Ok(()),
        };
        let (table, load) = (table.as_deref(), load.as_deref());
        // What the other workers sent where: the pool's slots in the shared data, read before
        // the pick and updated after it (see `shared`: a failure leaves this worker's own).
        let deepest = match table {
            Some(table) if !hashes.is_empty() => Some(shared::read_deepest(self.id, table, hashes)),
            _ => None,
        };
        let mut failed = deepest.as_ref().is_some_and(|d| d.failed);
        let mut unusable = 0;
        let learned = match (table, &deepest) {
            (Some(table), Some(deepest)) => {
                unusable = not_entries(&deepest.values);
                // Credit where the deepest known block went: the slot names its endpoints.
                let mut values: Vec<Option<Vec<u8>>> = vec![None; hashes.len()];
                if let (Some(b), Some(read)) = (deepest.block, &deepest.read) {
                    if let Some(v) = values.get_mut(b) {
                        v.clone_from(&read.value);
                    }
                }
                table.attributed(hashes, &values)
            }
            _ => Vec::new(),
        };
        let chosen = {
            let Ok(mut pickers) = self.pickers.try_borrow_mut() else {
                return Ok(());
            };
            let Some(picker) = pickers.get_mut(pool) else {
                return Ok(());
            };
            // The other workers' requests in flight (`shared::read_load`).
            let (others, claim) = match load {
                Some(load) => {
                    let owner = picker.share_owner();
                    let read = shared::read_load(self.id, load, owner, now);
                    failed |= read.failed;
                    // A row another worker took over (ours was not refreshed within the lease):
                    // claim another.
                    if let Some(row) = picker.load_row() {
                        let value = read.values.get(row).and_then(|v| v.as_deref());
                        if !read.failed && !load.claimable(value, owner, now) {
                            picker.set_load_row(None);
                        }
                    }
                    (load.others(&read.values, owner, now), read.claim)
                }
                None => (Vec::new(), None),
            };
            let chosen = picker
                .pick_shared(hashes, &learned, &others, now)
                .and_then(|i| Some((i, picker.id_of(i)?, picker.address(i)?.to_string())));
            if let (Some(load), Some(_)) = (load, &chosen) {
                failed |= shared::publish_load(self.id, load, picker, claim, now);
            }
            chosen
        };
        let Some((endpoint, id, address)) = chosen else {
            return Ok(());
        };
        if let (Some(table), Some(deepest)) = (table, &deepest) {
            failed |= shared::write_past(self.id, table, hashes, deepest, endpoint);
        }
        let unusable = unusable + usize::from(failed);
        if unusable > 0 {
            self.metrics
                .add(self.metrics.endpoint_shared_unusable, unusable as u64);
        }
        self.picked = Some((pool, id));
        self.picked_hashes = hashes.to_vec();
        self.set_request_header(&config.header, &address)?;
        self.metrics.increment(self.metrics.endpoint_picked);
        debug!(
            "[{}] picked endpoint {endpoint} of picker pool {pool} ({} blocks)",
            self.id,
            self.picked_hashes.len()
        );
        Ok(())
    }

    /// At the response: did Envoy send the request where the picker said? override_host goes
    /// elsewhere (its fallback) only after the picked host failed the request (a connect
    /// failure, retried) or when the cluster does not have it, and it does not check health
    /// itself (see envoy/picker-lb-policy.yaml). Either way the picked endpoint cools down,
    /// so the next requests are not sent to fail there too, and the request is counted where
    /// it really runs. A reply without an upstream (Envoy's own 503) has no address: nothing.
    fn check_picked_upstream(&mut self) {
        let Some((pool, picked_id)) = self.picked else {
            return;
        };
        let served = match hostcalls::get_property(vec!["upstream", "address"]) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return,
            Err(status) => {
                debug!("[{}] cannot read upstream.address: {status:?}", self.id);
                return;
            }
        };
        let Some(cooldown_ms) = self
            .router
            .as_ref()
            .and_then(|r| r.prefix_affinity.as_ref())
            .and_then(|a| a.picker.as_ref())
            .map(|p| p.cooldown_ms)
        else {
            return;
        };
        let Ok(mut pickers) = self.pickers.try_borrow_mut() else {
            return;
        };
        let Some(picker) = pickers.get_mut(pool) else {
            return;
        };
        let served = String::from_utf8_lossy(&served);
        // The endpoint was dropped from the cluster meanwhile: its count went with it.
        let Some(endpoint) = picker.index_of_id(picked_id) else {
            self.picked = None;
            return;
        };
        if picker.address(endpoint) == Some(served.as_ref()) {
            return;
        }
        let to = picker.index_of(&served);
        let now = now_millis();
        let moved_to = picker.served_elsewhere(endpoint, to, &self.picked_hashes, now, cooldown_ms);
        self.picked = moved_to.and_then(|i| Some((pool, picker.id_of(i)?)));
        if let Some(load) = picker.shared_load() {
            if shared::publish_load(self.id, &load, picker, None, now) {
                self.metrics
                    .increment(self.metrics.endpoint_shared_unusable);
            }
        }
        let table = picker.shared_table();
        drop(pickers);
        // The other workers learn where the blocks really went.
        if let (Some(to), Some(table)) = (moved_to, table) {
            if shared::write_slots(self.id, &table, &self.picked_hashes, &[], to) {
                self.metrics
                    .increment(self.metrics.endpoint_shared_unusable);
            }
        }
        self.metrics.increment(self.metrics.endpoint_failed_over);
        // Addresses are the operator's configuration, not request content.
        warn!(
            "[{}] picked endpoint {endpoint} of picker pool {pool} was not used (served by {served}); \
             not picked for {cooldown_ms} ms",
            self.id
        );
    }

    fn reject(&mut self, rejection: &Rejection) -> Action {
        self.metrics.count(rejection.outcome());
        // The code only: the message may carry client text, and logs never carry request content.
        debug!(
            "[{}] rejected: {} {}",
            self.id,
            rejection.status(),
            rejection.code()
        );
        match rejection.retry_after() {
            Some(secs) => {
                // Marks the reply as the filter's own, so Envoy's local_reply_config keeps its
                // body (the 503 mapper there rewrites every other 503). The request goes no
                // further, so no upstream ever sees the marker.
                if let Err(status) = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    LOCAL_REPLY_HEADER,
                    Some("1"),
                ) {
                    debug!("[{}] cannot mark the local reply: {status:?}", self.id);
                }
                let secs = secs.to_string();
                self.reply(
                    rejection.status(),
                    &rejection.body(),
                    &[("retry-after", secs.as_str())],
                )
            }
            None => self.reply(rejection.status(), &rejection.body(), &[]),
        }
    }

    fn reply_error(&mut self, status: u32, message: &str) -> Action {
        self.metrics.count(Outcome::InternalError);
        let body = crate::core::routing::errors::error_body(
            message,
            "server_error",
            None,
            "internal_error",
        );
        self.reply(status, &body, &[])
    }

    /// Sends a local JSON reply and stops the request.
    fn reply(&mut self, status: u32, body: &str, extra: &[(&str, &str)]) -> Action {
        self.phase = Phase::Replied;
        self.scanner = None;
        self.capture = None;
        self.release_hold();
        let mut headers = vec![("content-type", "application/json")];
        headers.extend_from_slice(extra);
        if let Err(status_err) =
            hostcalls::send_http_response(status, headers, Some(body.as_bytes()))
        {
            warn!("[{}] cannot send the local reply: {status_err:?}", self.id);
        }
        Action::Pause
    }

    /// Adds `stream_options.include_usage` to the held body (`core::usage::include`) and
    /// corrects `content-length`. A body Envoy does not hold as one buffer is left as it is,
    /// and counted; only a failure after the body changed is an error (its length would be
    /// wrong).
    fn add_include_usage(&mut self, edit: BodyEdit) -> Result<(), String> {
        let replace = usize::try_from(edit.replace).map_err(|e| e.to_string())?;
        // SAFETY: the slice outlives the call; the host only reads it.
        let status = unsafe {
            proxy_set_buffer_bytes(
                HTTP_REQUEST_BODY,
                0,
                replace,
                include::OPENING.as_ptr(),
                include::OPENING.len(),
            )
        };
        if status != Status::Ok as u32 {
            warn!(
                "[{}] the host refused the body edit (status {status}); the stream goes without usage",
                self.id
            );
            self.metrics.increment(self.metrics.include_usage_failed);
            return Ok(());
        }
        if self.had_content_length {
            self.set_request_header("content-length", &edit.new_length.to_string())
                .map_err(|status| format!("cannot correct content-length: {status:?}"))?;
        }
        self.metrics.increment(self.metrics.include_usage_added);
        debug!("[{}] asked for the stream's usage", self.id);
        Ok(())
    }

    fn set_request_header(&self, name: &str, value: &str) -> Result<(), Status> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
    }

    fn clear_route_cache(&self) {
        if NO_CLEAR_ROUTE_CACHE.with(Cell::get) {
            return;
        }
        if let Err(status) = hostcalls::call_foreign_function(CLEAR_ROUTE_CACHE, None) {
            // Before Envoy 1.33 there is no such function, and header changes cleared the
            // route cache by themselves.
            NO_CLEAR_ROUTE_CACHE.with(|flag| flag.set(true));
            warn!(
                "[{}] host has no {CLEAR_ROUTE_CACHE} ({status:?}); relying on header mutation",
                self.id
            );
        }
    }
}

/// The request header map, serialized as the ABI hands it over (see `core::routing::headers`), or the
/// host's status code.
pub(super) fn request_header_map() -> Result<Vec<u8>, u32> {
    header_map(MapType::HttpRequestHeaders)
}

/// A header map (request or response), as [`request_header_map`].
pub(super) fn header_map(map_type: MapType) -> Result<Vec<u8>, u32> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and a size into the two locals, nothing else.
    let status = unsafe { proxy_get_header_map_pairs(map_type as u32, &mut data, &mut size) };
    if status != Status::Ok as u32 {
        return Err(status);
    }
    if data.is_null() {
        return Ok(Vec::new());
    }
    // SAFETY: the host allocated the `size` bytes through the SDK's `proxy_on_memory_allocate`,
    // which hands out the buffer of a `Vec<u8>` of exactly that capacity and forgets it; taking
    // it back as that Vec frees it on drop (the SDK's own `get_map_bytes` does the same).
    Ok(unsafe { Vec::from_raw_parts(data, size, size) })
}
