//! The multipart/form-data scanner against a plain whole-body reading of the same body, fed
//! whole, byte by byte and in chunks; `early_model` (routing before the body ends) must give
//! the verdict on the first `model` part as soon as it ends. The boundary is fixed (`XyZ`, as
//! in the seeds); the cut positions and a small model limit are drawn from a hash of the input.
#![no_main]

use bbr_wasm_fuzz::multipart_ref::{reference_early, same, scan, scan_bytewise_early};
use bbr_wasm_fuzz::{cuts, hash};
use libfuzzer_sys::fuzz_target;

const BOUNDARY: &str = "XyZ";

fuzz_target!(|body: &[u8]| {
    let seed = hash(body);
    for max in [256, 1 + (seed % 16) as usize] {
        let whole = scan(body, BOUNDARY, max, &[]);
        let (bytewise, early) =
            scan_bytewise_early(body, BOUNDARY, max).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(whole, bytewise, "whole vs byte by byte");
        let cuts = cuts(body.len(), seed.rotate_left(17) ^ max as u64);
        let chunked = scan(body, BOUNDARY, max, &cuts);
        assert_eq!(whole, chunked, "whole vs cut at {cuts:?}");
        let (want, want_early) = reference_early(body, BOUNDARY, max);
        assert!(
            same(&whole, &want),
            "scanner {whole:?}, reference {want:?}, body {:?}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(
            early,
            want_early,
            "early_model, body {:?}",
            String::from_utf8_lossy(body)
        );
    }
});
