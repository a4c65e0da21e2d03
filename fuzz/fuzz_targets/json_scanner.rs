//! The JSON body scanner against serde_json, fed whole, byte by byte and in chunks.
//!
//! The input is the body itself (the seeds are real OpenAI requests); the cut positions and a
//! small model limit are drawn from a hash of it. Checked on every input:
//! - no panic (overflow checks on: `make fuzz` builds with debug assertions);
//! - the outcome does not depend on the chunking;
//! - an error's offset is exact: the bytes before it are a valid prefix, the byte at it fails;
//! - `early_model` (routing before the body ends) gives one verdict, the first `model`'s;
//! - the outcome is serde_json's reading of the body (`bbr_wasm_fuzz::json_oracle`).
#![no_main]

use bbr_wasm_fuzz::{cuts, hash, json_oracle as oracle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let seed = hash(body);
    // The filter's default limit, and one small enough for the fuzzer to cross.
    for max in [256, 1 + (seed % 16) as usize] {
        let whole = oracle::scan(body, max, &[]);
        // Byte by byte, with `early_model` checked on the way.
        let bytewise = oracle::scan_bytewise_early(body, max).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(whole, bytewise, "whole vs byte by byte");
        let cuts = cuts(body.len(), seed.rotate_left(17) ^ max as u64);
        let chunked = oracle::scan(body, max, &cuts);
        assert_eq!(whole, chunked, "whole vs cut at {cuts:?}");
        if let Err(e) = oracle::check_offset(body, max, &whole) {
            panic!("{e}");
        }
        if let Err(e) = oracle::check(body, max, &whole) {
            panic!("{e}");
        }
    }
});
