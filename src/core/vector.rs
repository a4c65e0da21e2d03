//! Sixteen bytes at a time: the string fast path's block test, with UTF-8 validated in the
//! vector registers.
//!
//! [`plain_blocks`] walks a string's content a 16-byte block at a time and stops at the first
//! block that holds a `"`, a `\`, a control byte, or anything that is not valid UTF-8 (or
//! that it cannot judge because a character runs past the data). Blocks of plain ASCII cost a
//! load, four compares and a branch; blocks with non-ASCII text are checked with the lookup
//! algorithm of Keiser and Lemire ("Validating UTF-8 in less than one instruction per byte",
//! Software: Practice and Experience, 2021; the one simdjson uses): three table lookups on the
//! nibbles of each byte and of the byte before it, plus a check that the 2nd and 3rd bytes
//! after a 3- or 4-byte lead are continuations. Text in accented Latin, CJK or emoji then stays
//! in the vector loop instead of leaving it at every character.
//!
//! The same code runs on two implementations of the handful of vector operations it needs:
//! wasm SIMD128 (what ships, when built with `+simd128`) and plain `[u8; 16]` arrays elsewhere,
//! so the native tests, the differential tests against serde_json and the fuzzers exercise the
//! very algorithm the filter runs.

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
use portable::*;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
use simd128::*;

// The error classes of the algorithm, one bit each in the lookup tables. An error is a lane
// where all three lookups agree on a class (their AND is non-zero), except that TWO_CONTS is
// expected exactly where the 2nd/3rd continuation of a 3- or 4-byte character sits.
const TOO_SHORT: u8 = 1 << 0; // a lead byte not followed by enough continuations
const TOO_LONG: u8 = 1 << 1; // a continuation after ASCII
const OVERLONG_3: u8 = 1 << 2; // E0 followed by 80-9F
const TOO_LARGE: u8 = 1 << 3; // above U+10FFFF
const SURROGATE: u8 = 1 << 4; // ED followed by A0-BF
const OVERLONG_2: u8 = 1 << 5; // C0 or C1
const TOO_LARGE_1000: u8 = 1 << 6; // F5-FF, or F4 followed by 90-BF
const OVERLONG_4: u8 = 1 << 6; // F0 followed by 80-8F (shares the bit: disjoint cases)
const TWO_CONTS: u8 = 1 << 7; // a continuation after a continuation
const CARRY: u8 = TOO_SHORT | TOO_LONG | TWO_CONTS;

/// Indexed by the high nibble of the previous byte.
const BYTE_1_HIGH: [u8; 16] = [
    // 0_______ ASCII
    TOO_LONG,
    TOO_LONG,
    TOO_LONG,
    TOO_LONG,
    TOO_LONG,
    TOO_LONG,
    TOO_LONG,
    TOO_LONG,
    // 10______ continuation
    TWO_CONTS,
    TWO_CONTS,
    TWO_CONTS,
    TWO_CONTS,
    // 1100____ 2-byte lead (C0, C1 are overlong)
    TOO_SHORT | OVERLONG_2,
    // 1101____ 2-byte lead
    TOO_SHORT,
    // 1110____ 3-byte lead
    TOO_SHORT | OVERLONG_3 | SURROGATE,
    // 1111____ 4-byte lead (or F8-FF, never valid)
    TOO_SHORT | TOO_LARGE | TOO_LARGE_1000 | OVERLONG_4,
];

/// Indexed by the low nibble of the previous byte.
const BYTE_1_LOW: [u8; 16] = [
    CARRY | OVERLONG_3 | OVERLONG_2 | OVERLONG_4, // ____0000
    CARRY | OVERLONG_2,                           // ____0001
    CARRY,                                        // ____0010
    CARRY,                                        // ____0011
    CARRY | TOO_LARGE,                            // ____0100
    CARRY | TOO_LARGE | TOO_LARGE_1000,           // ____0101
    CARRY | TOO_LARGE | TOO_LARGE_1000,           // ____0110
    CARRY | TOO_LARGE | TOO_LARGE_1000,           // ____0111
    CARRY | TOO_LARGE | TOO_LARGE_1000,           // ____1000
    CARRY | TOO_LARGE | TOO_LARGE_1000,           // ____1001
    CARRY | TOO_LARGE | TOO_LARGE_1000,           // ____1010
    CARRY | TOO_LARGE | TOO_LARGE_1000,           // ____1011
    CARRY | TOO_LARGE | TOO_LARGE_1000,           // ____1100
    CARRY | TOO_LARGE | TOO_LARGE_1000 | SURROGATE, // ____1101
    CARRY | TOO_LARGE | TOO_LARGE_1000,           // ____1110
    CARRY | TOO_LARGE | TOO_LARGE_1000,           // ____1111
];

/// Indexed by the high nibble of the byte itself.
const BYTE_2_HIGH: [u8; 16] = [
    // 0_______ ASCII
    TOO_SHORT,
    TOO_SHORT,
    TOO_SHORT,
    TOO_SHORT,
    TOO_SHORT,
    TOO_SHORT,
    TOO_SHORT,
    TOO_SHORT,
    // 1000____
    TOO_LONG | OVERLONG_2 | TWO_CONTS | OVERLONG_3 | TOO_LARGE_1000 | OVERLONG_4,
    // 1001____
    TOO_LONG | OVERLONG_2 | TWO_CONTS | OVERLONG_3 | TOO_LARGE,
    // 101_____
    TOO_LONG | OVERLONG_2 | TWO_CONTS | SURROGATE | TOO_LARGE,
    TOO_LONG | OVERLONG_2 | TWO_CONTS | SURROGATE | TOO_LARGE,
    // 11______ a lead
    TOO_SHORT,
    TOO_SHORT,
    TOO_SHORT,
    TOO_SHORT,
];

/// Whether `cur` (preceded by `prev`) is free of UTF-8 errors. A character that is still
/// incomplete at the end of `cur` is not an error here; the next block (or the caller) decides.
///
/// Kept out of line on purpose: inlined, its dozen vector constants (tables, splats) were
/// hoisted into the ASCII loop of `plain_blocks` by V8 and spilled there, which made plain ASCII
/// 2.5 times slower (make bench-scan).
#[inline(never)]
fn utf8_valid(prev: V, cur: V) -> bool {
    !any(utf8_errors(prev, cur))
}

/// Non-zero lanes where `cur` (preceded by `prev`) is not valid UTF-8.
#[inline(always)]
fn utf8_errors(prev: V, cur: V) -> V {
    let prev1 = prev1(prev, cur);
    let special = and(
        and(
            lookup(BYTE_1_HIGH, shr4(prev1)),
            lookup(BYTE_1_LOW, and(prev1, splat(0x0F))),
        ),
        lookup(BYTE_2_HIGH, shr4(cur)),
    );
    // 0x80 where the byte two back is a 3- or 4-byte lead (>= E0) or the byte three back a
    // 4-byte lead (>= F0): this byte must then be a continuation, which `special` marks
    // TWO_CONTS (0x80) exactly when it is one after a continuation.
    let third = sub_sat(prev2(prev, cur), splat(0xE0 - 0x80));
    let fourth = sub_sat(prev3(prev, cur), splat(0xF0 - 0x80));
    let must_continue = and(or(third, fourth), splat(0x80));
    xor(must_continue, special)
}

/// Lanes holding `"`, `\`, a byte below 0x20 or a byte from 0x80 up. `v - 0x20` (wrapping)
/// is above 0x5F exactly for the bytes below 0x20 and from 0x80 up: one compare for both.
#[inline(always)]
fn stops(v: V) -> V {
    let outside = gt(sub(v, splat(0x20)), splat(0x5F));
    or(or(eq(v, splat(b'"')), eq(v, splat(b'\\'))), outside)
}

/// Index of the first `needle` in `bytes`, or `bytes.len()`: 16 bytes per vector compare.
#[inline]
pub fn find_byte(needle: u8, bytes: &[u8]) -> usize {
    let wanted = splat(needle);
    let mut i = 0;
    let mut blocks = bytes.chunks_exact(16);
    for block in &mut blocks {
        if any(eq(load(block), wanted)) {
            break;
        }
        i += 16;
    }
    // The block that matched (or the tail), byte by byte.
    i + bytes[i..]
        .iter()
        .position(|&b| b == needle)
        .unwrap_or(bytes.len() - i)
}

/// Index of the first `"` or `\` in `bytes`, or `bytes.len()`: 16 bytes per vector compare.
/// The prefix capture (`core::prefix`) copies the runs between them; control and non-ASCII
/// bytes do not stop it (the scanner validates those).
#[inline]
pub fn find_quote_or_backslash(bytes: &[u8]) -> usize {
    let (quote, backslash) = (splat(b'"'), splat(b'\\'));
    let mut i = 0;
    let mut blocks = bytes.chunks_exact(16);
    for block in &mut blocks {
        let v = load(block);
        if any(or(eq(v, quote), eq(v, backslash))) {
            break;
        }
        i += 16;
    }
    i + bytes[i..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\')
        .unwrap_or(bytes.len() - i)
}

/// Bit k set when byte k of the 16-byte `block` is `"`, `\`, below 0x20 or from 0x80 up: the
/// string fast path's block test (`skip::find_string_stop`).
#[inline(always)]
pub fn stop_mask(block: &[u8]) -> u32 {
    bitmask(stops(load(block)))
}

/// Lanes holding `"`, `\` or a byte below 0x20.
#[inline(always)]
fn specials(v: V) -> V {
    or(
        or(eq(v, splat(b'"')), eq(v, splat(b'\\'))),
        lt(v, splat(0x20)),
    )
}

/// Bytes of `bytes`, from the start, that are plain string content in whole 16-byte blocks of
/// non-ASCII text: no `"`, `\` or control byte, and valid UTF-8 in which every character is
/// complete. It stops after the first block of plain ASCII (the caller's ASCII loop is faster
/// there) or before the first block that fails; the up to three bytes before that block are
/// left to the caller too if they begin a character that continues into it. `bytes` must start
/// at a character boundary.
#[inline]
pub fn plain_blocks(bytes: &[u8]) -> usize {
    let mut i = 0;
    // What came before the start: a character boundary, which ASCII stands for.
    let mut prev = splat(0);
    let mut blocks = bytes.chunks_exact(16);
    for block in &mut blocks {
        let v = load(block);
        if !any(stops(v)) {
            // Printable ASCII. Only its start can be wrong: a character of the block before
            // cut short. Accepted, it ends the run.
            if utf8_valid(prev, v) {
                i += 16;
            }
            break;
        }
        if any(specials(v)) || !utf8_valid(prev, v) {
            break;
        }
        prev = v;
        i += 16;
    }
    // The last accepted block may end inside a character whose rest is in the block that
    // stopped us (or past the data): leave that character to the caller too.
    i - incomplete_tail(&bytes[..i])
}

/// How many bytes at the end of `bytes` (complete, valid UTF-8 up to there, apart from its
/// last character) belong to a character that is not complete: 0 to 3.
#[inline]
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b < 0x80 {
            return 0;
        }
        if b >= 0xC0 {
            let len = if b >= 0xF0 {
                4
            } else if b >= 0xE0 {
                3
            } else {
                2
            };
            return if len > back { back } else { 0 };
        }
        // A continuation: its lead is further back.
    }
    0
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128 {
    pub use core::arch::wasm32::v128 as V;
    use core::arch::wasm32::{
        i8x16_shuffle, u8x16, u8x16_bitmask, u8x16_eq, u8x16_gt, u8x16_lt, u8x16_shr, u8x16_splat,
        u8x16_sub, u8x16_sub_sat, u8x16_swizzle, v128_and, v128_any_true, v128_or, v128_xor,
    };

    #[inline(always)]
    pub fn load(block: &[u8]) -> V {
        let mut l = [0u8; 16];
        l.copy_from_slice(block);
        u8x16(
            l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7], l[8], l[9], l[10], l[11], l[12], l[13],
            l[14], l[15],
        )
    }
    #[inline(always)]
    pub fn splat(b: u8) -> V {
        u8x16_splat(b)
    }
    #[inline(always)]
    pub fn eq(a: V, b: V) -> V {
        u8x16_eq(a, b)
    }
    #[inline(always)]
    pub fn lt(a: V, b: V) -> V {
        u8x16_lt(a, b)
    }
    #[inline(always)]
    pub fn gt(a: V, b: V) -> V {
        u8x16_gt(a, b)
    }
    #[inline(always)]
    pub fn sub(a: V, b: V) -> V {
        u8x16_sub(a, b)
    }
    #[inline(always)]
    pub fn and(a: V, b: V) -> V {
        v128_and(a, b)
    }
    #[inline(always)]
    pub fn or(a: V, b: V) -> V {
        v128_or(a, b)
    }
    #[inline(always)]
    pub fn xor(a: V, b: V) -> V {
        v128_xor(a, b)
    }
    #[inline(always)]
    pub fn shr4(a: V) -> V {
        u8x16_shr(a, 4)
    }
    #[inline(always)]
    pub fn sub_sat(a: V, b: V) -> V {
        u8x16_sub_sat(a, b)
    }
    /// `table[index]` per lane; every index here is a nibble (0-15).
    #[inline(always)]
    pub fn lookup(table: [u8; 16], index: V) -> V {
        u8x16_swizzle(load(&table), index)
    }
    #[inline(always)]
    pub fn any(a: V) -> bool {
        v128_any_true(a)
    }
    /// Bit k set when lane k's high bit is.
    #[inline(always)]
    pub fn bitmask(a: V) -> u32 {
        u32::from(u8x16_bitmask(a))
    }
    /// The 16 bytes that end one byte before `cur`'s: `prev`'s last, then `cur`'s first 15.
    #[inline(always)]
    pub fn prev1(prev: V, cur: V) -> V {
        i8x16_shuffle::<15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30>(prev, cur)
    }
    #[inline(always)]
    pub fn prev2(prev: V, cur: V) -> V {
        i8x16_shuffle::<14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29>(prev, cur)
    }
    #[inline(always)]
    pub fn prev3(prev: V, cur: V) -> V {
        i8x16_shuffle::<13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28>(prev, cur)
    }
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
mod portable {
    /// Sixteen lanes in an array: the same operations as wasm SIMD128, lane by lane.
    #[derive(Clone, Copy)]
    pub struct V([u8; 16]);

    #[inline(always)]
    fn map2(a: V, b: V, f: impl Fn(u8, u8) -> u8) -> V {
        let mut out = [0u8; 16];
        for (o, (x, y)) in out.iter_mut().zip(a.0.iter().zip(b.0.iter())) {
            *o = f(*x, *y);
        }
        V(out)
    }

    #[inline(always)]
    pub fn load(block: &[u8]) -> V {
        let mut l = [0u8; 16];
        l.copy_from_slice(block);
        V(l)
    }
    #[inline(always)]
    pub fn splat(b: u8) -> V {
        V([b; 16])
    }
    #[inline(always)]
    pub fn eq(a: V, b: V) -> V {
        map2(a, b, |x, y| if x == y { 0xFF } else { 0 })
    }
    #[inline(always)]
    pub fn lt(a: V, b: V) -> V {
        map2(a, b, |x, y| if x < y { 0xFF } else { 0 })
    }
    #[inline(always)]
    pub fn gt(a: V, b: V) -> V {
        map2(a, b, |x, y| if x > y { 0xFF } else { 0 })
    }
    #[inline(always)]
    pub fn sub(a: V, b: V) -> V {
        map2(a, b, u8::wrapping_sub)
    }
    #[inline(always)]
    pub fn and(a: V, b: V) -> V {
        map2(a, b, |x, y| x & y)
    }
    #[inline(always)]
    pub fn or(a: V, b: V) -> V {
        map2(a, b, |x, y| x | y)
    }
    #[inline(always)]
    pub fn xor(a: V, b: V) -> V {
        map2(a, b, |x, y| x ^ y)
    }
    #[inline(always)]
    pub fn shr4(a: V) -> V {
        map2(a, a, |x, _| x >> 4)
    }
    #[inline(always)]
    pub fn sub_sat(a: V, b: V) -> V {
        map2(a, b, u8::saturating_sub)
    }
    /// As wasm's swizzle: an index of 16 or more gives 0.
    #[inline(always)]
    pub fn lookup(table: [u8; 16], index: V) -> V {
        map2(index, index, |i, _| {
            table.get(usize::from(i)).copied().unwrap_or(0)
        })
    }
    #[inline(always)]
    pub fn any(a: V) -> bool {
        a.0.iter().any(|&x| x != 0)
    }
    /// Bit k set when lane k's high bit is.
    #[inline(always)]
    pub fn bitmask(a: V) -> u32 {
        a.0.iter()
            .enumerate()
            .fold(0, |m, (k, &x)| m | (u32::from(x >> 7) << k))
    }
    #[inline(always)]
    fn shifted(prev: V, cur: V, n: usize) -> V {
        let mut out = [0u8; 16];
        out[..n].copy_from_slice(&prev.0[16 - n..]);
        out[n..].copy_from_slice(&cur.0[..16 - n]);
        V(out)
    }
    #[inline(always)]
    pub fn prev1(prev: V, cur: V) -> V {
        shifted(prev, cur, 1)
    }
    #[inline(always)]
    pub fn prev2(prev: V, cur: V) -> V {
        shifted(prev, cur, 2)
    }
    #[inline(always)]
    pub fn prev3(prev: V, cur: V) -> V {
        shifted(prev, cur, 3)
    }
}

#[cfg(test)]
mod tests {
    //! The contract of `plain_blocks` is tested in tests/core.rs, natively and under wasm (where
    //! the SIMD128 implementation runs).
    use super::*;

    #[test]
    fn incomplete_tail_lengths() {
        assert_eq!(incomplete_tail(b""), 0);
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail("a\u{e9}".as_bytes()), 0);
        assert_eq!(incomplete_tail(&"a\u{4e2d}".as_bytes()[..3]), 2);
        assert_eq!(incomplete_tail(&"a\u{4e2d}".as_bytes()[..2]), 1);
        assert_eq!(incomplete_tail(&"a\u{1f600}".as_bytes()[..4]), 3);
    }
}
