//! The host-independent core. Nothing here knows about proxy-wasm, so all of it is tested
//! natively and under wasm-bindgen-test. One module per capability (docs/architecture.md):
//!
//! - [`json`] and [`multipart`]: read `model` out of a request body, push-style;
//! - [`routing`]: classify a request, look its model up, decide, and say so in headers or an
//!   OpenAI-style error; learn the served models from the pools (`routing::discovery`);
//! - [`affinity`]: key requests by their prompt's prefix and pick the replica;
//! - [`overload`]: bound the memory of held bodies;
//! - [`usage`]: token usage and latency, read from responses as they stream past;
//! - [`config`]: the JSON configuration, compiled into the types above.
//!
//! Dependencies run one way (`scripts/core-deps.py` checks it): `config` → `routing` →
//! `affinity`, `overload`, `usage` → `json`; nothing imports `config` but the host adapter.

pub mod affinity;
pub mod config;
pub mod json;
pub mod multipart;
pub mod overload;
pub mod routing;
pub mod usage;

pub use affinity::prefix::{CaptureState, PromptCapture};
pub use affinity::settings::{PickerConfig, PrefixAffinity};
pub use config::ConfigError;
pub use json::scanner::{ModelScanner, ScanError, Step, StreamFields};
pub use multipart::MultipartScanner;
pub use routing::discovery::{Pool, PoolState, Route, RoutingView, ViewVerdict};
pub use routing::errors::Rejection;
pub use routing::metrics::Outcome;
pub use routing::request::{BodyScanner, HeadAction, RequestHead, Verdict};
pub use routing::table::{Router, ServedModel, UnknownModel};
