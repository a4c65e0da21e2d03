//! Metric names and the outcome of each request, host-independent.
//!
//! The adapter defines these through proxy-wasm; Envoy stores them as `wasmcustom.<name>` and,
//! because `wasmcustom` is a custom stat namespace, `/stats/prometheus` shows them as `<name>`
//! without Envoy's `envoy_` prefix. Every name starts with [`PREFIX`].
//!
//! proxy-wasm metrics have no labels. The per-model counter carries its label in the name in
//! Istio's tag convention (`model=.=<base model>;.;bbr_model_requests_total`), which Envoy's
//! `stats_config.stats_tags` regex `(model=\.=(.*?);\.;)` turns into a `model` label (the
//! shipped Envoy configs set it; in Istio add `model` to `extraStatTags`).

use super::errors::Rejection;

/// Every metric name starts with this.
pub const PREFIX: &str = "bbr_";

/// What happened to one request, for the outcome counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Routing headers set for a known model.
    Routed,
    /// The model is not configured (refused with 404, or passed through).
    UnknownModel,
    /// Unreadable body: broken JSON or multipart, an unusable or duplicate `model`, an
    /// unsupported content type or encoding.
    InvalidBody,
    /// No `model` in the body.
    MissingModel,
    /// Over `maxBodyBytes`.
    BodyTooLarge,
    /// Let through without routing headers: not an inference request, or an unknown model
    /// with `unknownModel: passthrough`.
    Passthrough,
    /// `GET /v1/models` answered by the filter.
    ModelList,
    /// A host call failed; the request got a 500.
    InternalError,
    /// An unknown model while some pool had not answered yet: 503 with `Retry-After`.
    DiscoveryPending,
    /// A large body refused because the worker held more than `maxHeldBodyBytes`: 503.
    Overloaded,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Routed,
        Outcome::UnknownModel,
        Outcome::InvalidBody,
        Outcome::MissingModel,
        Outcome::BodyTooLarge,
        Outcome::Passthrough,
        Outcome::ModelList,
        Outcome::InternalError,
        Outcome::DiscoveryPending,
        Outcome::Overloaded,
    ];

    /// The counter's name.
    pub fn counter(self) -> &'static str {
        match self {
            Outcome::Routed => "bbr_routed_total",
            Outcome::UnknownModel => "bbr_unknown_model_total",
            Outcome::InvalidBody => "bbr_invalid_body_total",
            Outcome::MissingModel => "bbr_missing_model_total",
            Outcome::BodyTooLarge => "bbr_body_too_large_total",
            Outcome::Passthrough => "bbr_passthrough_total",
            Outcome::ModelList => "bbr_model_list_total",
            Outcome::InternalError => "bbr_internal_error_total",
            Outcome::DiscoveryPending => "bbr_discovery_pending_total",
            Outcome::Overloaded => "bbr_overloaded_total",
        }
    }
}

/// Requests that arrived with a client-supplied routing header, which was removed.
pub const SPOOFED_HEADER_REMOVED: &str = "bbr_spoofed_header_removed_total";
/// Routed requests that got a prefix-key header (prefix affinity on, a complete block).
pub const PREFIX_KEYED: &str = "bbr_prefix_keyed_total";
/// Requests the endpoint picker (`prefixAffinity.picker`) chose a replica for.
pub const ENDPOINT_PICKED: &str = "bbr_endpoint_picked_total";
/// Picked requests Envoy served at another endpoint (the picked one failed them); that endpoint
/// then cools down (`prefixAffinity.picker.cooldownMs`).
pub const ENDPOINT_FAILED_OVER: &str = "bbr_endpoint_failed_over_total";
/// Slots of the picker's shared table (`prefixAffinity.picker.sharedSlots`) that held bytes
/// that are no entry, and shared-data host calls that failed: what the workers learned
/// together was not there, and the pick went by the worker's own history.
pub const ENDPOINT_SHARED_UNUSABLE: &str = "bbr_endpoint_shared_unusable_total";
/// Histogram: body bytes read per inspected request.
pub const BODY_BYTES: &str = "bbr_body_bytes";
/// Histogram: time spent scanning the body of one request, in microseconds.
pub const SCAN_TIME_US: &str = "bbr_scan_time_us";
/// Counter: every body byte scanned. With [`SCAN_NANOSECONDS`] it gives the scan speed
/// exactly; the histograms' sums are approximations.
pub const SCANNED_BYTES: &str = "bbr_scanned_bytes_total";
/// Counter: nanoseconds spent scanning, all requests.
pub const SCAN_NANOSECONDS: &str = "bbr_scan_nanoseconds_total";
/// Gauge: the size of the VM's linear memory in bytes. It grows with what the filter
/// allocates at once, so it shows that bodies are not kept whole.
pub const MEMORY_BYTES: &str = "bbr_wasm_memory_bytes";

/// Gauge: requests whose body the filter is reading now (held at their headers, their body
/// buffered by Envoy). It goes down when the request is decided, answered, or reset by the
/// client or by Envoy's overload manager: after a flood of cut-off uploads it is back at 0,
/// so no per-request state was left behind.
pub const BODIES_IN_PROGRESS: &str = "bbr_bodies_in_progress";
/// Gauge: the body bytes those requests hold, together (this worker's share of what
/// `maxHeldBodyBytes` bounds; the gauge sums the workers).
pub const HELD_BODY_BYTES: &str = "bbr_held_body_bytes";

/// Counter: names dropped from the routing table because an earlier source has them (a static
/// model also discovered, or one name in two pools); each conflict is counted once, when it
/// appears.
pub const DISCOVERY_CONFLICTS: &str = "bbr_discovery_conflicts_total";

/// Counter: polls of one pool that ended with `outcome` (`ok`, `unreachable`, `http_error`,
/// `too_large`, `malformed`), with the pool and the outcome as Istio-style tags.
pub fn discovery_polls(cluster: &str, outcome: &str) -> String {
    format!("pool=.={cluster};.;outcome=.={outcome};.;bbr_discovery_polls_total")
}

/// Gauge: models (bases and adapters) one pool is known to serve.
pub fn discovery_models(cluster: &str) -> String {
    format!("pool=.={cluster};.;bbr_discovery_models")
}

/// The per-base-model request counter's name, with the model as an Istio-style tag.
///
/// Envoy's stat names use `.` as a separator, but the tag regex takes everything up to `;.;`,
/// so dots and slashes in model names survive as the label value.
pub fn model_requests(base_model: &str) -> String {
    format!("model=.={base_model};.;bbr_model_requests_total")
}

impl Rejection {
    /// The outcome counter this rejection increments.
    pub fn outcome(&self) -> Outcome {
        match self {
            Rejection::InvalidJson(_)
            | Rejection::InvalidMultipart(_)
            | Rejection::InvalidModel(_)
            | Rejection::DuplicateModel
            | Rejection::UnsupportedMediaType(_) => Outcome::InvalidBody,
            Rejection::MissingModel => Outcome::MissingModel,
            Rejection::ModelNotFound(_) => Outcome::UnknownModel,
            Rejection::TooLarge { .. } => Outcome::BodyTooLarge,
            Rejection::DiscoveryPending { .. } => Outcome::DiscoveryPending,
            Rejection::Overloaded => Outcome::Overloaded,
        }
    }
}
