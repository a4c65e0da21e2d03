//! A budget for the request bodies one worker holds at once.
//!
//! The filter holds each inspected request until its body is read, so Envoy buffers that body.
//! Envoy's overload manager bounds the heap, but over HTTP/1.1 it cannot say which request
//! holds the memory (it accounts buffered memory per stream only for HTTP/2 and HTTP/3,
//! envoyproxy/envoy#29581): all it can do under pressure is refuse every new request, small ones
//! included. The filter knows exactly how many body bytes each request it holds has buffered,
//! so it keeps the total per worker (each worker has its own wasm VM) and, past the budget,
//! answers the large bodies that keep growing with a retryable 503, while small requests go on.
//!
//! Plain data and plain functions: the adapter keeps one [`HeldBodies`] per VM and calls
//! [`HeldBodies::hold`] on every body callback and [`HeldBodies::release`] when a request is
//! decided, answered or destroyed (a reset stream included).

/// Default for `maxHeldBodyBytes`: 256 MiB per worker.
pub const DEFAULT_MAX_HELD_BODY_BYTES: u64 = 256 * 1024 * 1024;
/// Default for `shedBodiesOverBytes`: bodies up to 1 MiB (nearly every chat request) are never
/// shed by the filter.
pub const DEFAULT_SHED_BODIES_OVER_BYTES: u64 = 1024 * 1024;

/// The validated budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyBudget {
    /// Body bytes this worker's held requests may buffer together.
    pub max_held_bytes: u64,
    /// Past the budget, requests holding more than this are refused.
    pub shed_over_bytes: u64,
}

impl BodyBudget {
    /// Whether a request now holding `request_bytes` must be refused, the worker holding
    /// `total_bytes` in all (this request included).
    pub fn must_shed(&self, total_bytes: u64, request_bytes: u64) -> bool {
        total_bytes > self.max_held_bytes && request_bytes > self.shed_over_bytes
    }
}

/// The body bytes held by one worker's requests, together.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeldBodies {
    total: u64,
}

impl HeldBodies {
    pub const fn new() -> Self {
        HeldBodies { total: 0 }
    }

    /// One request now holds `now` body bytes; `held` is what it held before and is updated.
    /// Returns the worker's new total.
    pub fn hold(&mut self, held: &mut u64, now: u64) -> u64 {
        // Saturating: a host that reported a smaller size than before (it never does) must not
        // wrap the total.
        self.total = self.total.saturating_sub(*held).saturating_add(now);
        *held = now;
        self.total
    }

    /// The request no longer holds its body.
    pub fn release(&mut self, held: &mut u64) {
        self.total = self.total.saturating_sub(*held);
        *held = 0;
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}
