//! bbr-wasm: a body-based model router for LLM gateways, as a proxy-wasm filter.
//!
//! [`core`] holds everything that decides; the `filter` module (built only for
//! `wasm32-wasip1`, the proxy-wasm target) is the thin adapter to the host.

pub mod core;

#[cfg(target_os = "wasi")]
mod filter;
