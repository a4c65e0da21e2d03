//! `Router::from_json` never panics, and what it accepts is consistent: serde_json reads the
//! same models, every served name looks up to itself and routes when a request sends it (plain,
//! escaped, or as a form field), header names are lower-case tokens, paths are inspected with
//! the right scanner (`bbr_wasm_fuzz::config_check`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|config: &[u8]| {
    if let Err(e) = bbr_wasm_fuzz::config_check::check(config) {
        panic!("{e}");
    }
});
