//! Test-only, not shipped: a proxy-wasm plugin that puts other bytes where bbr-wasm keeps
//! shared data, so the integration tests can show what the filter does with them.
//!
//! Envoy keys shared data by `vm_id` alone, so this plugin, run as a wasm service with the
//! filter's `vm_id`, writes into the filter's keys. Its configuration is lines of
//! `key<TAB>value`; it writes each value (the line's bytes after the tab, as they are) at
//! configure time and again on every tick (50 ms), unconditionally, so whatever the filter
//! writes there is soon overwritten again.
#![cfg(target_os = "wasi")]

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};
use std::time::Duration;

/// How often the values are written again.
const REWRITE_MS: u64 = 50;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| Box::new(Writer { pairs: Vec::new() }));
}}

struct Writer {
    pairs: Vec<(String, Vec<u8>)>,
}

impl Writer {
    fn write(&self) {
        for (key, value) in &self.pairs {
            // Unconditional (no CAS). A status other than Ok would trap this VM, not Envoy's
            // others: the test would then see no garbage, and fail its own check of the count.
            let _ = hostcalls::set_shared_data(key, Some(value), None);
        }
    }
}

impl Context for Writer {}

impl RootContext for Writer {
    fn on_configure(&mut self, size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.pairs = config
            .split(|&b| b == b'\n')
            .filter_map(|line| {
                let tab = line.iter().position(|&b| b == b'\t')?;
                let key = String::from_utf8(line.get(..tab)?.to_vec()).ok()?;
                Some((key, line.get(tab + 1..)?.to_vec()))
            })
            .collect();
        self.write();
        hostcalls::set_tick_period(Duration::from_millis(REWRITE_MS)).is_ok()
    }

    fn on_tick(&mut self) {
        self.write();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Pass))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Never used as a filter; the SDK wants a context type.
struct Pass;

impl Context for Pass {}

impl HttpContext for Pass {}
