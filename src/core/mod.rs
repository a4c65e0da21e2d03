//! The host-independent core: configuration, request classification, the model scanner,
//! the routing decision, model discovery and the error bodies. Nothing here knows about proxy-wasm, so all of
//! it is tested natively and under wasm-bindgen-test.

pub mod config;
pub mod discovery;
pub mod errors;
pub mod headers;
pub mod metrics;
pub mod multipart;
pub mod overload;
pub mod picker;
pub mod prefix;
pub mod request;
pub mod scanner;
pub mod shared_blocks;
pub mod shared_load;
pub mod skip;
pub mod strict_json;
pub mod vector;

pub use config::{ConfigError, PickerConfig, PrefixAffinity, Router, ServedModel, UnknownModel};
pub use discovery::{Pool, PoolState, Route, RoutingView, ViewVerdict};
pub use errors::Rejection;
pub use metrics::Outcome;
pub use multipart::MultipartScanner;
pub use prefix::{CaptureState, PromptCapture};
pub use request::{BodyScanner, HeadAction, RequestHead, Verdict};
pub use scanner::{ModelScanner, ScanError, Step};
