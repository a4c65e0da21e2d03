//! `make bench` diagnostic, not shipped: what a proxy-wasm filter costs in Envoy before it
//! does any work of its own. Three modes, chosen by the plugin configuration (a bare string):
//!
//! - `pass`: `on_http_request_headers` returns Continue. The price of a wasm filter being in
//!   the chain at all (context creation, the callbacks, the VM boundary).
//! - `buffer`: Pause at the headers and on every body callback until the body ends, then
//!   Continue, reading nothing: what holding the body costs through the wasm ABI.
//! - `read`: as `buffer`, and copies every new body byte into the VM in 64 KiB windows,
//!   exactly as bbr-wasm does, without looking at them.
//! - `route`: as `read`, and at the end of the body sets the two routing headers bbr-wasm sets
//!   (to the value the client sent in `x-gateway-base-model-name`), so Envoy routes the request
//!   on a header changed by wasm, as it does for bbr-wasm: the floor of any body-based router.
//!
//! The bench routes these listeners on the client's header, like the baseline, so the
//! distance from `read` to bbr-wasm is what bbr-wasm's own logic costs.
#![cfg(target_os = "wasi")]

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    Buffer,
    Read,
    Route,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| Box::new(FloorRoot { mode: Mode::Pass }));
}}

struct FloorRoot {
    mode: Mode,
}

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.mode = match config.as_slice() {
            b"pass" => Mode::Pass,
            b"buffer" => Mode::Buffer,
            b"read" => Mode::Read,
            b"route" => Mode::Route,
            _ => return false,
        };
        true
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FloorHttp {
            mode: self.mode,
            consumed: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct FloorHttp {
    mode: Mode,
    consumed: usize,
}

impl Context for FloorHttp {}

impl HttpContext for FloorHttp {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        if self.mode == Mode::Pass || end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.mode == Mode::Pass {
            return Action::Continue;
        }
        if self.mode != Mode::Buffer {
            while body_size > self.consumed {
                let len = (body_size - self.consumed).min(64 * 1024);
                match hostcalls::get_buffer(BufferType::HttpRequestBody, self.consumed, len) {
                    Ok(Some(bytes)) if !bytes.is_empty() => self.consumed += bytes.len(),
                    _ => break,
                }
            }
        }
        if !end_of_stream {
            return Action::Pause;
        }
        if self.mode == Mode::Route {
            // The client's header (the bench sends it to the floor listeners), set again from
            // wasm, plus the second header bbr-wasm sets.
            let base = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, BASE_HEADER)
                .ok()
                .flatten()
                .unwrap_or_default();
            let base = String::from_utf8_lossy(&base).into_owned();
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, BASE_HEADER, Some(&base));
            let _ =
                hostcalls::set_map_value(MapType::HttpRequestHeaders, MODEL_HEADER, Some(&base));
        }
        Action::Continue
    }
}

const BASE_HEADER: &str = "x-gateway-base-model-name";
const MODEL_HEADER: &str = "x-gateway-model-name";
