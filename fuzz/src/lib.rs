//! Oracles and harnesses for bbr-wasm's fuzz targets (`fuzz_targets/`). `json_oracle` is
//! also compiled into the root crate's `tests/differential.rs`.

pub mod config_check;
pub mod json_oracle;
pub mod multipart_ref;

/// FNV-1a of the input: a deterministic seed for the choices a target makes about an input, so
/// that every input is cut differently and a crash reproduces from its file alone.
pub fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Up to 8 cut positions in `0..=len`, drawn from `seed` (xorshift).
pub fn cuts(len: usize, seed: u64) -> Vec<usize> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let n = next() % 9;
    (0..n)
        .map(|_| (next() % (len as u64 + 1)) as usize)
        .collect()
}
