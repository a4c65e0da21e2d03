//! `make bench-scan` (bench/scan.py): times the core's JSON scanner on request bodies, built for
//! wasm32-wasip1 with `+simd128` like the filter and run by Node's V8 through `node:wasi`
//! (bench/scan/run.mjs). Envoy's wasm runtime is V8 too, so this is the filter's scanner without
//! Envoy around it: quick and repeatable for comparing scanner changes. `make bench` measures
//! the same thing inside Envoy, from the filter's own counters, and that is the figure the
//! targets are checked on.
//!
//! Usage: `bbr-scan-bench REPS FILE...`. A file that starts with `--` is a multipart/form-data
//! body (its first line names the boundary), any other a JSON body. Each is fed in 64 KiB windows, as the filter
//! reads them, each copied into a fresh buffer just before it is scanned (the filter gets a
//! fresh copy from the host's get_buffer); the copy is not timed.
//!
//! The repetitions are interleaved: every file once, then every file again, and so on. Scanning
//! one body over and over lets the CPU's branch predictor learn that body's branches (measured:
//! a 256 KiB body repeated back to back scanned at twice the speed of the same bytes inside a
//! 1 MiB body), which no real stream of different requests would allow.
//! Prints one JSON line per file.
//!
//! Each body is also timed through two ceilings, window by window on the same fresh copies:
//! `core::json::vector::validate_utf8`, UTF-8 validation alone on every 16 bytes, which any scanner
//! that validates every string must do; and `core::json::vector::string_floor`, that plus finding
//! every unescaped quote, the least a scanner of JSON strings does (the faster of its two
//! ways, UTF-8 checked on non-ASCII blocks or on every block). Both use the scanner's vector
//! instructions.
//!
//! Each body is also timed with the prefix-affinity capture (`core::affinity::prefix::PromptCapture`,
//! the shipped budget of 8 blocks of 256 bytes) fed beside the scanner as the filter feeds it:
//! every window until the capture is settled. The two variants alternate in the same rounds,
//! so their ratio is measured side by side.

// A benchmark may stop on a broken setup.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bbr_wasm::core::json::vector;
use bbr_wasm::core::{
    BodyScanner, CaptureState, ModelScanner, MultipartScanner, PromptCapture, Step,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const WINDOW: usize = 64 * 1024;
/// The shipped prefixAffinity budget: blockBytes 256 x prefixBlocks 8.
const CAPTURE_BYTES: usize = 2048;

/// The scanner the filter would use: multipart for a body that starts with a boundary line
/// (`--BOUNDARY\r\n`, as bench/scan.py writes its audio upload), JSON otherwise.
fn scanner_for(body: &[u8]) -> BodyScanner {
    if let Some(rest) = body.strip_prefix(b"--") {
        let end = rest.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
        let boundary = std::str::from_utf8(&rest[..end]).expect("an ASCII boundary");
        return BodyScanner::Multipart(MultipartScanner::new(boundary, 256));
    }
    BodyScanner::Json(ModelScanner::new(256))
}

fn scan_once(body: &[u8], with_capture: bool) -> (Duration, Step) {
    let mut scanner = scanner_for(body);
    let mut capture = (with_capture && matches!(scanner, BodyScanner::Json(_)))
        .then(|| PromptCapture::new(CAPTURE_BYTES));
    let mut elapsed = Duration::ZERO;
    for window in body.chunks(WINDOW) {
        // A fresh copy per window, as the host's get_buffer makes; not timed.
        let copy = black_box(window.to_vec());
        let started = Instant::now();
        let step = scanner.feed(black_box(&copy));
        if let Some(c) = capture.as_mut() {
            if c.state() == CaptureState::Reading {
                c.feed(black_box(&copy));
            }
        }
        elapsed += started.elapsed();
        if step != Step::NeedMore {
            return (elapsed, step);
        }
    }
    let started = Instant::now();
    let step = scanner.finish();
    (elapsed + started.elapsed(), step)
}

/// UTF-8 validation alone over the body's windows (a character split between two windows reads
/// as an error at the edge; only the time is kept).
fn validate_once(body: &[u8]) -> Duration {
    time_windows(body, |w| {
        black_box(vector::validate_utf8(w));
    })
}

/// The string floor over the body's windows, UTF-8 checked on every block or only where needed.
fn floor_once(body: &[u8], every_block: bool) -> Duration {
    time_windows(body, |w| {
        black_box(vector::string_floor(w, every_block));
    })
}

fn time_windows(body: &[u8], mut f: impl FnMut(&[u8])) -> Duration {
    let mut elapsed = Duration::ZERO;
    for window in body.chunks(WINDOW) {
        let copy = black_box(window.to_vec());
        let started = Instant::now();
        f(black_box(&copy));
        elapsed += started.elapsed();
    }
    elapsed
}

fn main() {
    let mut args = std::env::args().skip(1);
    let reps: usize = args
        .next()
        .and_then(|r| r.parse().ok())
        .expect("usage: bbr-scan-bench REPS FILE...");
    let files: Vec<(String, Vec<u8>)> = args
        .map(|path| {
            let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            (path, body)
        })
        .collect();
    let found: Vec<bool> = files
        .iter()
        .map(|(_, body)| matches!(scan_once(body, false).1, Step::Found(_)))
        .collect();
    // Warm-up (V8 tiers hot functions up), then the timed repetitions, interleaved.
    for _ in 0..3 {
        for (_, body) in &files {
            scan_once(body, false);
            scan_once(body, true);
            validate_once(body);
            floor_once(body, false);
            floor_once(body, true);
        }
    }
    let mut nanos: Vec<Vec<u128>> = vec![Vec::with_capacity(reps); files.len()];
    let mut capture_nanos: Vec<Vec<u128>> = vec![Vec::with_capacity(reps); files.len()];
    let mut utf8_nanos: Vec<Vec<u128>> = vec![Vec::with_capacity(reps); files.len()];
    let mut floor_nanos: [Vec<Vec<u128>>; 2] =
        std::array::from_fn(|_| vec![Vec::with_capacity(reps); files.len()]);
    for rep in 0..reps {
        for (i, (_, body)) in files.iter().enumerate() {
            // Alternate which variant goes first, so neither always runs on a warmer cache.
            let order = if rep % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for with_capture in order {
                let t = scan_once(body, with_capture).0.as_nanos().max(1);
                if with_capture {
                    capture_nanos[i].push(t);
                } else {
                    nanos[i].push(t);
                }
            }
            utf8_nanos[i].push(validate_once(body).as_nanos().max(1));
            for (every_block, nanos) in [false, true].into_iter().zip(floor_nanos.iter_mut()) {
                nanos[i].push(floor_once(body, every_block).as_nanos().max(1));
            }
        }
    }
    let median = |mut v: Vec<u128>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let [floor_some, floor_every] = floor_nanos;
    for (i, ((path, body), found)) in files.iter().zip(found).enumerate() {
        let times = std::mem::take(&mut nanos[i]);
        let best = times.iter().copied().min().unwrap_or(1);
        println!(
            "{{\"file\":{path:?},\"bytes\":{},\"found\":{found},\"reps\":{reps},\"median_ns\":{},\"best_ns\":{},\"capture_median_ns\":{},\"utf8_median_ns\":{},\"floor_median_ns\":{}}}",
            body.len(),
            median(times),
            best,
            median(std::mem::take(&mut capture_nanos[i])),
            median(std::mem::take(&mut utf8_nanos[i])),
            median(floor_some[i].clone()).min(median(floor_every[i].clone())),
        );
    }
}
