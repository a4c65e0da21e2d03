//! The response side of one routed request: token usage and latency, read as the response
//! streams past (`core::usage` does the reading; this is the host's part).
//!
//! Nothing is held: every response callback returns Continue, and the body is only copied. In
//! Envoy 1.40 the wasm filter's `encodeData` hands the VM the chunk that is passing
//! (`response_body_buffer_ = &data`; `getBuffer(HttpResponseBody)` returns that chunk while
//! the filter does not buffer: source/extensions/common/wasm/context.cc, `Context::encodeData`
//! and `Context::getBuffer`), so each callback's bytes are new bytes, read once.
//!
//! Host calls go through the raw ABI where the SDK's wrapper panics on a status it did not
//! expect (proxy-wasm 0.2.5: `hostcalls::get_buffer` on anything but Ok and NotFound,
//! `hostcalls::set_property` on anything but Ok; Envoy's `setProperty` returns NotFound
//! without a stream and BadArgument for a value its filter-state object refuses).

use super::{now_nanos, Metrics};
use crate::core::routing::headers;
use crate::core::usage::metrics as names;
use crate::core::usage::{
    elapsed_ms, plan_response, time_per_output_token_ms, Framing, Outcome, ResponsePlan,
    ResponseScanner, Usage,
};
use log::debug;
use proxy_wasm::types::{MapType, MetricType, Status};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ptr::null_mut;

/// Most body bytes copied into the VM at once.
const READ_WINDOW_BYTES: usize = 64 * 1024;
/// `BufferType::HttpResponseBody` of the ABI.
const HTTP_RESPONSE_BODY: u32 = 1;

extern "C" {
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
}

/// Bytes `start..start + len` of the response chunk passing now, or the host's status.
fn response_chunk(start: usize, len: usize) -> Result<Vec<u8>, u32> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and a size into the two locals, nothing else.
    let status =
        unsafe { proxy_get_buffer_bytes(HTTP_RESPONSE_BODY, start, len, &mut data, &mut size) };
    if status != Status::Ok as u32 {
        return Err(status);
    }
    if data.is_null() {
        return Ok(Vec::new());
    }
    // SAFETY: allocated for us through the SDK's `proxy_on_memory_allocate` (a `Vec<u8>` of
    // exactly `size` bytes, forgotten); taking it back frees it on drop, as the SDK does.
    Ok(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Sets filter state `wasm.<key>` for the access log; the host's status on failure.
fn set_property(key: &str, value: &str) -> Result<(), u32> {
    // SAFETY: both slices outlive the call; the host only reads them.
    let status =
        unsafe { proxy_set_property(key.as_ptr(), key.len(), value.as_ptr(), value.len()) };
    if status == Status::Ok as u32 {
        Ok(())
    } else {
        Err(status)
    }
}

/// The metric ids of one model, defined at its first response.
#[derive(Clone, Copy, Default)]
struct ModelIds {
    /// input, output, cached_input.
    tokens: [Option<u32>; 3],
    ttft: Option<u32>,
    tpot: Option<u32>,
}

/// The accounting's metrics: per outcome, and per model as models answer (a model is one of
/// the routing table's, so the set is bounded by the table).
#[derive(Default)]
pub(super) struct UsageMetrics {
    outcomes: [Option<u32>; Outcome::LABELS.len()],
    models: RefCell<HashMap<String, ModelIds>>,
    adapters: RefCell<HashMap<String, [Option<u32>; 3]>>,
}

const TOKEN_TYPES: [&str; 3] = [names::INPUT, names::OUTPUT, names::CACHED_INPUT];

impl UsageMetrics {
    pub(super) fn define(context_id: u32) -> Self {
        UsageMetrics {
            outcomes: Outcome::LABELS.map(|label| {
                Metrics::define_one(context_id, MetricType::Counter, &names::responses(label))
            }),
            models: RefCell::new(HashMap::new()),
            adapters: RefCell::new(HashMap::new()),
        }
    }

    fn model(&self, context_id: u32, base: &str) -> ModelIds {
        let Ok(mut models) = self.models.try_borrow_mut() else {
            return ModelIds::default();
        };
        if let Some(ids) = models.get(base) {
            return *ids;
        }
        let define = |kind, name: &str| Metrics::define_one(context_id, kind, name);
        let ids = ModelIds {
            tokens: TOKEN_TYPES.map(|t| define(MetricType::Counter, &names::tokens(base, t))),
            ttft: define(MetricType::Histogram, &names::time_to_first_token(base)),
            tpot: define(MetricType::Histogram, &names::time_per_output_token(base)),
        };
        models.insert(base.to_string(), ids);
        ids
    }

    fn adapter(&self, context_id: u32, adapter: &str) -> [Option<u32>; 3] {
        let Ok(mut adapters) = self.adapters.try_borrow_mut() else {
            return [None; 3];
        };
        if let Some(ids) = adapters.get(adapter) {
            return *ids;
        }
        let ids = TOKEN_TYPES.map(|t| {
            Metrics::define_one(
                context_id,
                MetricType::Counter,
                &names::adapter_tokens(adapter, t),
            )
        });
        adapters.insert(adapter.to_string(), ids);
        ids
    }
}

/// One routed request's response, from the end of the request to the end of the response.
pub(super) struct Accounting {
    base: String,
    /// The requested model, when it is an adapter.
    adapter: Option<String>,
    /// When the request ended (its body's last byte reached the filter).
    request_end_ns: u64,
    /// A body byte has passed (the request's end can no longer move).
    body_seen: bool,
    first_token_ns: Option<u64>,
    ttft_ms: Option<u64>,
    /// `None` until the response headers said to read the body.
    scanner: Option<ResponseScanner>,
    /// The base model's metric ids, once looked up (one map lookup per response, not two).
    ids: Option<ModelIds>,
    max_scan_bytes: u64,
    done: bool,
}

impl Accounting {
    /// `now`: the host's clock at the routing decision (the request's end, unless the decision
    /// came before it).
    pub(super) fn new(
        base: &str,
        adapter: Option<&str>,
        max_scan_bytes: u64,
        now: u64,
    ) -> Box<Self> {
        Box::new(Accounting {
            base: base.to_string(),
            adapter: adapter.map(str::to_string),
            request_end_ns: now,
            body_seen: false,
            first_token_ns: None,
            ttft_ms: None,
            scanner: None,
            ids: None,
            max_scan_bytes,
            done: false,
        })
    }

    /// The request's last byte passed now (with `routeBeforeBodyEnds` after the decision).
    pub(super) fn request_ended(&mut self) {
        if !self.body_seen {
            self.request_end_ns = now_nanos();
        }
    }

    /// The response headers: read the body or not. Returns false when there is nothing more
    /// to do for this response.
    pub(super) fn on_headers(&mut self, id: u32, metrics: &Metrics, end_of_stream: bool) -> bool {
        let map = match super::http::header_map(MapType::HttpResponseHeaders) {
            Ok(map) => map,
            Err(status) => {
                debug!("[{id}] cannot read the response headers: status {status}");
                self.done = true;
                return false;
            }
        };
        let Ok(pairs) = headers::parse_pairs(&map) else {
            self.done = true;
            return false;
        };
        let text = |name: &str| headers::first(&pairs, name).map(String::from_utf8_lossy);
        let (status, content_type, encoding) = (
            text(":status"),
            text("content-type"),
            text("content-encoding"),
        );
        match plan_response(
            status.as_deref(),
            content_type.as_deref(),
            encoding.as_deref(),
        ) {
            ResponsePlan::Skip => {
                self.done = true;
                false
            }
            ResponsePlan::Refuse(why) => {
                self.finish(id, metrics, Outcome::Unreadable(why), true);
                false
            }
            ResponsePlan::Scan(framing) => {
                self.scanner = Some(ResponseScanner::new(framing, self.max_scan_bytes));
                if end_of_stream {
                    self.end(id, metrics, true);
                    return false;
                }
                true
            }
        }
    }

    /// A response body chunk of `size` bytes is passing.
    pub(super) fn on_body(&mut self, id: u32, metrics: &Metrics, size: usize, end_of_stream: bool) {
        if self.done {
            return;
        }
        if size > 0 && !self.body_seen {
            self.body_seen = true;
            // A JSON answer's first token is its first byte. A stream's is its first content
            // event, timed when the scanner finds it: the clock is not read here for it (a host
            // call whose result nothing would use).
            if matches!(self.framing(), Some(Framing::Json)) {
                self.first_token(metrics, now_nanos());
            }
        }
        let mut read = 0;
        while read < size {
            let Some(scanner) = self.scanner.as_mut() else {
                break;
            };
            if scanner.stopped() {
                break;
            }
            let len = (size - read).min(READ_WINDOW_BYTES);
            let bytes = match response_chunk(read, len) {
                Ok(bytes) if !bytes.is_empty() => bytes,
                Ok(_) => break,
                Err(status) => {
                    // Nothing to count then; the response goes on untouched.
                    debug!("[{id}] cannot read the response body: status {status}");
                    self.done = true;
                    return;
                }
            };
            read += bytes.len();
            if scanner.feed(&bytes) {
                self.first_token(metrics, now_nanos());
            }
        }
        if end_of_stream {
            self.end(id, metrics, true);
        }
    }

    /// The response ended (`complete`: with its end of stream; false: the stream was destroyed
    /// first, a reset or a client gone).
    pub(super) fn end(&mut self, id: u32, metrics: &Metrics, complete: bool) {
        if self.done {
            return;
        }
        let Some(scanner) = self.scanner.as_mut() else {
            self.done = true;
            return;
        };
        let outcome = scanner.finish(complete);
        self.finish(id, metrics, outcome, complete);
    }

    fn framing(&self) -> Option<Framing> {
        // The scanner knows; kept out of its public state on purpose: asked only here.
        self.scanner.as_ref().map(ResponseScanner::framing)
    }

    fn model_ids(&mut self, metrics: &Metrics) -> ModelIds {
        if let Some(ids) = self.ids {
            return ids;
        }
        let ids = metrics.usage.model(metrics.context_id, &self.base);
        self.ids = Some(ids);
        ids
    }

    fn first_token(&mut self, metrics: &Metrics, now: u64) {
        if self.first_token_ns.is_some() {
            return;
        }
        self.first_token_ns = Some(now);
        let ms = elapsed_ms(self.request_end_ns, now);
        self.ttft_ms = Some(ms);
        let ids = self.model_ids(metrics);
        metrics.record(ids.ttft, ms);
    }

    fn finish(&mut self, id: u32, metrics: &Metrics, outcome: Outcome, complete: bool) {
        self.done = true;
        let usage = &metrics.usage;
        let index = Outcome::LABELS.iter().position(|&l| l == outcome.label());
        metrics.increment(index.and_then(|i| usage.outcomes.get(i).copied().flatten()));
        let counted = match outcome {
            Outcome::Counted(counted) => counted,
            _ => Usage::default(),
        };
        if let Outcome::Counted(u) = outcome {
            let counts = [u.input, u.output, u.cached_input];
            let ids = self.model_ids(metrics);
            // Envoy refuses an increment of 0 (BadArgument): zero counts are skipped.
            for (id, n) in ids.tokens.iter().zip(counts) {
                if let Some(n) = n.filter(|&n| n > 0) {
                    metrics.add(*id, n);
                }
            }
            if let Some(adapter) = &self.adapter {
                for (id, n) in usage
                    .adapter(metrics.context_id, adapter)
                    .iter()
                    .zip(counts)
                {
                    if let Some(n) = n.filter(|&n| n > 0) {
                        metrics.add(*id, n);
                    }
                }
            }
            if let (Some(Framing::Sse), Some(first), Some(output)) =
                (self.framing(), self.first_token_ns, u.output)
            {
                // Below two output tokens there is no time per token: no clock read either.
                if output >= 2 {
                    if let Some(ms) = time_per_output_token_ms(first, now_nanos(), output) {
                        metrics.record(ids.tpot, ms);
                    }
                }
            }
        }
        metrics.record_memory();
        debug!("[{id}] response usage: {}", outcome.label());
        if !complete {
            // The stream is being destroyed: no access log entry will read filter state now.
            return;
        }
        // One filter-state key for the three fields (one host call); none when nothing is
        // known, and the access log then prints `-`.
        if let Some(value) = names::access_log_value(counted.input, counted.output, self.ttft_ms) {
            let key = names::ACCESS_LOG_PROPERTY;
            if let Err(status) = set_property(key, &value) {
                debug!("[{id}] cannot set {key}: status {status}");
            }
        }
    }
}
