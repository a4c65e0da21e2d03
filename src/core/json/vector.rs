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

/// Whether `bytes` is valid UTF-8, with the block check on every 16 bytes and no branch but
/// the loop's: UTF-8 validation alone, the least per-byte work a scanner that validates every
/// string must do. The scanner does not call it (it judges strings inside its own blocks);
/// `make bench-scan` times it beside the scanner on every body class as the ceiling no
/// validating scanner in the same vector instructions can pass (docs/body-classes.md).
#[inline(never)]
pub fn validate_utf8(bytes: &[u8]) -> bool {
    let mut err = splat(0);
    let mut prev = splat(0);
    let mut blocks = bytes.chunks_exact(64);
    for block in &mut blocks {
        let (v0, v1, v2, v3) = parts(block);
        err = or(err, utf8_errors_4(prev, v0, v1, v2, v3));
        prev = v3;
    }
    !any(or(err, tail_utf8_errors(prev, blocks.remainder())))
}

/// The four 16-byte parts of a 64-byte block, with one `v128.load` each (the ceilings'
/// loads; the scanner keeps `load`, see `load_unaligned`).
#[inline(always)]
fn parts(block: &[u8]) -> (V, V, V, V) {
    (
        load_unaligned(&block[..16]),
        load_unaligned(&block[16..32]),
        load_unaligned(&block[32..48]),
        load_unaligned(&block[48..]),
    )
}

/// UTF-8 errors of the last, partial block `rest` (fewer than 64 bytes) after `prev`, padded
/// with NUL bytes (a whole block of them when `rest` is empty): a character cut short at the
/// end is an error at the first of them (a lead followed by ASCII).
#[inline(always)]
fn tail_utf8_errors(prev: V, rest: &[u8]) -> V {
    let mut tail = [0u8; 64];
    tail[..rest.len()].copy_from_slice(rest);
    let (t0, t1, t2, t3) = parts(&tail);
    utf8_errors_4(prev, t0, t1, t2, t3)
}

/// Non-zero lanes where the 64 bytes `v0`..`v3` (preceded by `prev`) are not valid UTF-8.
///
/// Out of line, for V8 14.6 (Envoy 1.40's; make bench-scan, A/B against a loop over
/// `[v0, v1, v2, v3]` inlined in `string_blocks`): fr 1.18x, ru 1.22x, zh 1.21x, emoji 1.15x,
/// the ASCII classes unchanged. LLVM kept that array in linear memory and looped over it, and
/// V8 rebuilt the lookup tables and splats from immediates on every pass; inlined and written
/// out, the tables were hoisted into the scanner's main loop and spilled there (en 0.74x). Here
/// they are built once per 64 bytes, in a function small enough to keep them in registers.
/// Node 20's V8 11.3 measured the opposite (0.75-0.84x): the V8 that runs the filter decides.
#[inline(never)]
fn utf8_errors_64(prev: V, v0: V, v1: V, v2: V, v3: V) -> V {
    utf8_errors_4(prev, v0, v1, v2, v3)
}

/// `utf8_errors_64` inlined: for loops that do little else, where the tables stay in
/// registers (`validate_utf8`, `string_floor`: 9.6 against 10.2 GB/s with the call).
#[inline(always)]
fn utf8_errors_4(prev: V, v0: V, v1: V, v2: V, v3: V) -> V {
    or(
        or(utf8_errors(prev, v0), utf8_errors(v0, v1)),
        or(utf8_errors(v1, v2), utf8_errors(v2, v3)),
    )
}

/// The least a scanner of JSON strings does per byte, for `make bench-scan`'s second ceiling:
/// the unescaped quotes of `bytes` (read as if all of it were string content, a backslash
/// escaping the byte after it) found 64 bytes at a time with the escape carry, and UTF-8
/// validated on every 64-byte block that holds non-ASCII (or follows one that did), or on
/// every block with `every_block` (faster where ASCII and non-ASCII blocks alternate). Returns
/// the count of unescaped quotes and whether `bytes` is valid UTF-8. No grammar, no escape or
/// control-byte check: any validating scanner does this much and more.
pub fn string_floor(bytes: &[u8], every_block: bool) -> (usize, bool) {
    let (q, b) = (splat(b'"'), splat(b'\\'));
    let mut err = splat(0);
    let mut prev = splat(0);
    let mut prev_high = false;
    let mut first_escaped = false;
    let mut quotes = 0;
    let mut blocks = bytes.chunks_exact(64);
    for block in &mut blocks {
        let (v0, v1, v2, v3) = parts(block);
        let quote = mask64(eq(v0, q), eq(v1, q), eq(v2, q), eq(v3, q));
        let backslash = mask64(eq(v0, b), eq(v1, b), eq(v2, b), eq(v3, b));
        // `escaped_bytes` without its early return: no branch here is the faster floor.
        let (escaped, next) = escaped_bytes_arithmetic(backslash, first_escaped);
        first_escaped = next;
        quotes += (quote & !escaped).count_ones() as usize;
        let high = bitmask(or(or(v0, v1), or(v2, v3))) != 0;
        if every_block || high || prev_high {
            err = or(err, utf8_errors_4(prev, v0, v1, v2, v3));
            prev_high = bitmask(v3) != 0;
        }
        prev = v3;
    }
    let rest = blocks.remainder();
    // The tail's quotes byte by byte (fewer than 64 bytes).
    for &byte in rest {
        if byte == b'"' && !first_escaped {
            quotes += 1;
        }
        first_escaped = byte == b'\\' && !first_escaped;
    }
    (quotes, !any(or(err, tail_utf8_errors(prev, rest))))
}

/// Lanes holding `"`, `\`, a byte below 0x20 or a byte from 0x80 up. Read as signed, the
/// bytes from 0x80 up are negative: one signed compare (`pcmpgtb` on x86) finds both them and
/// the control bytes, where an unsigned one costs V8 three instructions.
#[inline(always)]
fn stops(v: V) -> V {
    or(
        or(eq(v, splat(b'"')), eq(v, splat(b'\\'))),
        lt_signed(v, splat(0x20)),
    )
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

/// Index of the first line feed or carriage return in `bytes`, or `bytes.len()`: 16 bytes per
/// vector compare. An SSE data line's end (`core::usage`), found in one pass before the line
/// goes to the JSON reader.
#[inline]
pub fn find_line_end(bytes: &[u8]) -> usize {
    find_either(b'\n', b'\r', bytes)
}

/// Index of the first `"` or `\` in `bytes`, or `bytes.len()`: 16 bytes per vector compare.
/// The prefix capture (`core::affinity::prefix`) copies the runs between them; control and non-ASCII
/// bytes do not stop it (the scanner validates those).
#[inline]
pub fn find_quote_or_backslash(bytes: &[u8]) -> usize {
    find_either(b'"', b'\\', bytes)
}

/// Index of the first `a` or `b` in `bytes`, or `bytes.len()`: 16 bytes per vector compare,
/// then the tail byte by byte.
#[inline]
fn find_either(a: u8, b: u8, bytes: &[u8]) -> usize {
    let (va, vb) = (splat(a), splat(b));
    let mut i = 0;
    let mut blocks = bytes.chunks_exact(16);
    for block in &mut blocks {
        let v = load(block);
        if any(or(eq(v, va), eq(v, vb))) {
            break;
        }
        i += 16;
    }
    i + bytes[i..]
        .iter()
        .position(|&x| x == a || x == b)
        .unwrap_or(bytes.len() - i)
}

/// Bit k set when byte k of the 16-byte `block` is `"`, `\`, below 0x20 or from 0x80 up: the
/// string fast path's block test (`skip::find_string_stop`).
#[inline(always)]
pub fn stop_mask(block: &[u8]) -> u32 {
    bitmask(stops(load(block)))
}

/// Where a string whose content starts at `bytes[0]` closes, when its closing quote is in the
/// first 16 bytes with only printable ASCII before it (a key, a role, a short value): one
/// vector compare. `None` otherwise, or when fewer than 16 bytes are there.
#[inline(always)]
pub fn short_string_end(bytes: &[u8]) -> Option<usize> {
    let m = stop_mask(bytes.get(..16)?);
    let k = m.trailing_zeros() as usize;
    (m != 0 && bytes[k] == b'"').then_some(k)
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

/// Odd bit positions of a 64-bit mask (simdjson's escape arithmetic).
const ODD_BITS: u64 = 0xAAAA_AAAA_AAAA_AAAA;

/// Bit k set when lane k of the four vectors (64 bytes) has its high bit set.
#[inline(always)]
fn mask64(a: V, b: V, c: V, d: V) -> u64 {
    u64::from(bitmask(a))
        | (u64::from(bitmask(b)) << 16)
        | (u64::from(bitmask(c)) << 32)
        | (u64::from(bitmask(d)) << 48)
}

/// The escaped bytes of a block, from its backslash mask and whether its first byte is escaped
/// by a backslash run that ended the block before (simdjson's `json_escape_scanner`): returns
/// the mask of escaped bytes (the byte after each escaping backslash) and whether the first
/// byte of the next block is escaped. No loop over backslash runs: a run's parity comes out of
/// one subtraction.
#[inline(always)]
pub fn escaped_bytes(backslash: u64, first_escaped: bool) -> (u64, bool) {
    if backslash == 0 {
        return (u64::from(first_escaped), false);
    }
    escaped_bytes_arithmetic(backslash, first_escaped)
}

/// [`escaped_bytes`] without its early return for a block without backslashes (the same
/// result then, at the cost of the arithmetic).
#[inline(always)]
fn escaped_bytes_arithmetic(backslash: u64, first_escaped: bool) -> (u64, bool) {
    let carry = u64::from(first_escaped);
    let potential = backslash & !carry;
    let maybe_escaped = potential << 1;
    let escape_and_terminal = ((maybe_escaped | ODD_BITS).wrapping_sub(potential)) ^ ODD_BITS;
    let escaped = escape_and_terminal ^ (backslash | carry);
    let escape = escape_and_terminal & backslash;
    (escaped, escape >> 63 != 0)
}

/// The escape character (the byte after a backslash) with each low nibble: `"` `t` `u` `f` `\`
/// `n` `/`; `b` and `r` share the nibble of `"` and are compared apart. 0xFF where none has it:
/// its own nibble is F, so no byte with one of those nibbles can equal it.
const ESCAPE_BY_NIBBLE: [u8; 16] = [
    0xFF, 0xFF, b'"', 0xFF, b't', b'u', b'f', 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, b'\\', 0xFF, b'n', b'/',
];

/// Masks of a 64-byte block: the bytes that may NOT follow a backslash, and the `u`s. One table
/// lookup and three compares per 16 bytes: a lane is an escape character when it equals the
/// one its low nibble stands for, or `b` or `r`.
#[inline(always)]
fn escape_chars(v0: V, v1: V, v2: V, v3: V) -> (u64, u64) {
    let (b, r, u, low) = (splat(b'b'), splat(b'r'), splat(b'u'), splat(0x0F));
    let valid = |v: V| {
        or(
            eq(v, lookup(ESCAPE_BY_NIBBLE, and(v, low))),
            or(eq(v, b), eq(v, r)),
        )
    };
    (
        !mask64(valid(v0), valid(v1), valid(v2), valid(v3)),
        mask64(eq(v0, u), eq(v1, u), eq(v2, u), eq(v3, u)),
    )
}

// Hex digits from two nibble lookups whose AND is non-zero: the digits, and `A`-`F` / `a`-`f`.
const HEX_DIGIT: u8 = 1 << 0;
const HEX_LETTER: u8 = 1 << 1;

/// By high nibble: 0x3_ digits, 0x4_ and 0x6_ letters.
const HEX_HIGH: [u8; 16] = [
    0, 0, 0, HEX_DIGIT, HEX_LETTER, 0, HEX_LETTER, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// By low nibble: 0-9 digits, 1-6 letters.
const HEX_LOW: [u8; 16] = [
    HEX_DIGIT,
    HEX_DIGIT | HEX_LETTER,
    HEX_DIGIT | HEX_LETTER,
    HEX_DIGIT | HEX_LETTER,
    HEX_DIGIT | HEX_LETTER,
    HEX_DIGIT | HEX_LETTER,
    HEX_DIGIT | HEX_LETTER,
    HEX_DIGIT,
    HEX_DIGIT,
    HEX_DIGIT,
    0,
    0,
    0,
    0,
    0,
    0,
];

/// The bytes of a 64-byte block that are NOT hex digits. A negative mask because "no class bit
/// set" is one `eq` with zero per lane, where "some bit set" would be an unsigned compare,
/// which V8 emulates with three instructions.
#[inline(always)]
fn not_hex_digits(v0: V, v1: V, v2: V, v3: V) -> u64 {
    let zero = splat(0);
    let none = |v: V| {
        eq(
            and(
                lookup(HEX_HIGH, shr4(v)),
                lookup(HEX_LOW, and(v, splat(0x0F))),
            ),
            zero,
        )
    };
    mask64(none(v0), none(v1), none(v2), none(v3))
}

/// Runs of whole 64-byte blocks of printable ASCII from `i` (a clean boundary): the new `i`.
/// Out of line so that the vector constants of the block judgment (UTF-8 tables, splats) are
/// not hoisted into this loop, where they would be spilled: the reason `utf8_valid` is.
#[inline(never)]
fn ascii_blocks(bytes: &[u8], mut i: usize) -> usize {
    while let Some(block) = bytes.get(i..i + 64) {
        let stop = or(
            or(stops(load(&block[..16])), stops(load(&block[16..32]))),
            or(stops(load(&block[32..48])), stops(load(&block[48..]))),
        );
        if any(stop) {
            break;
        }
        i += 64;
    }
    i
}

/// The positions of the next block that must be hex digits, from the `u`s of `\u` escapes in
/// the last four lanes of this one (bit 0 of `tail` is lane 60): a `u` at lane 60 + j needs
/// lanes 0..=j of the next block.
#[inline(always)]
fn hex_spill(tail: u64) -> u64 {
    tail | (tail >> 1) | (tail >> 2) | (tail >> 3)
}

/// Bytes of a string's content, from the start, that the scanner may skip: whole 64-byte
/// blocks judged at once, whatever they hold. Stops at the string's closing quote (which it
/// does not consume), or at a character boundary outside any escape before the first block it
/// cannot accept: one with a control byte or an invalid escape before the closing quote (for
/// the state machine to report at its exact byte), or the last bytes of `bytes` when fewer
/// than 64 are left (a split escape or character is the state machine's to carry over). UTF-8
/// errors are gathered over the blocks it reads (past the closing quote in its block too) and
/// looked at once at the end: if there is any, it skips nothing, and the byte-wise path finds
/// the error. `bytes` must start inside a string, at a character boundary, outside an escape.
///
/// Per block: four 16-byte loads and bitmasks of quotes, backslashes, control and non-ASCII
/// bytes; the escaped bytes by carry arithmetic on the backslash mask ([`escaped_bytes`]); in a
/// block with an escape, every byte classified as escape character or `u` in vector registers
/// (`escape_chars`; hex digits too when a `\u` needs them, `not_hex_digits`), so escapes
/// are checked with a few mask operations, `\u` digits that run into the next block included;
/// the Keiser-Lemire UTF-8 check on all four parts of a block that holds non-ASCII (or follows
/// one that did). A block of printable ASCII goes through the same steps: a branch on each
/// block being plain was mispredicted where plain and mixed blocks alternate, and cost more
/// than the masks (make bench-scan: fr 1.27x, emoji 1.18x without it). Two plain blocks in a
/// row start a run, skipped out of line at four compares a block (a base64 image). The other
/// branches are taken rarely (the closing quote, an error) or follow long runs: real text in
/// other languages, tool results and code put a stop every few bytes, and a branch on what each
/// stop is, or on how many there are, was mispredicted so often that it cost more than the work
/// it saved (docs/body-classes.md).
#[inline]
pub fn string_blocks(bytes: &[u8]) -> usize {
    // UTF-8 errors of the non-ASCII blocks, gathered without a branch and looked at once at
    // the end: on any, nothing is skipped and the byte-wise path finds and reports the error.
    let mut utf8_err = splat(0);
    let at = string_blocks_with(bytes, &mut utf8_err);
    if any(utf8_err) {
        0
    } else {
        at
    }
}

#[inline(always)]
fn string_blocks_with(bytes: &[u8], utf8_err: &mut V) -> usize {
    let mut i = 0;
    // The last block start at a character boundary outside any escape.
    let mut clean = 0;
    // Carried from the block before: whether its last backslash escapes this block's first
    // byte; the lanes of this block that must be hex digits (a `\u` whose digits run over).
    let mut first_escaped = false;
    let mut hex_carry = 0u64;
    // The previous 16 bytes, for the UTF-8 check across parts and blocks, and whether it had
    // non-ASCII bytes (then the next part is checked too: it may finish a character).
    let mut prev = splat(0);
    let mut prev_high = false;
    // The block before was printable ASCII.
    let mut ascii_run = false;
    // A short string (a key, a role, a name): its closing quote in the first 16 bytes, with
    // nothing to judge before it, costs one compare.
    if let Some(end) = short_string_end(bytes) {
        return end;
    }
    while let Some(block) = bytes.get(i..i + 64) {
        let v0 = load(&block[..16]);
        let v1 = load(&block[16..32]);
        let v2 = load(&block[32..48]);
        let v3 = load(&block[48..]);
        let (q, b, c) = (splat(b'"'), splat(b'\\'), splat(0x20));
        let (q0, q1, q2, q3) = (eq(v0, q), eq(v1, q), eq(v2, q), eq(v3, q));
        let (b0, b1, b2, b3) = (eq(v0, b), eq(v1, b), eq(v2, b), eq(v3, b));
        // Below 0x20 as signed bytes: the control bytes and the non-ASCII ones.
        let (l0, l1, l2, l3) = (
            lt_signed(v0, c),
            lt_signed(v1, c),
            lt_signed(v2, c),
            lt_signed(v3, c),
        );
        let quotes = mask64(q0, q1, q2, q3);
        let backslashes = mask64(b0, b1, b2, b3);
        let (escaped, next_escaped) = escaped_bytes(backslashes, first_escaped);
        let closing = quotes & !escaped;
        // Whether the block, and its last part, hold non-ASCII bytes: one bitmask each, where
        // a 64-bit mask of them would cost four and the shifts to join them.
        let high = bitmask(or(or(v0, v1), or(v2, v3))) != 0;
        let high_last = bitmask(v3) != 0;
        // Control bytes: below 0x20 as signed and ASCII. Rare, so only their presence is
        // computed on every block and their lanes when there are any.
        let (c0, c1, c2, c3) = (
            andnot(l0, v0),
            andnot(l1, v1),
            andnot(l2, v2),
            andnot(l3, v3),
        );
        let controls = if bitmask(or(or(c0, c1), or(c2, c3))) != 0 {
            mask64(c0, c1, c2, c3)
        } else {
            0
        };
        // Printable ASCII from a clean start: nothing in it to judge.
        let plain = quotes | backslashes == 0
            && bitmask(or(or(l0, l1), or(l2, l3))) == 0
            && !first_escaped
            && hex_carry == 0
            && !prev_high;
        let (mut bad, mut bad_hex, mut us) = (controls, 0, 0);
        let newline = splat(b'n');
        let common = quotes
            | backslashes
            | mask64(
                eq(v0, newline),
                eq(v1, newline),
                eq(v2, newline),
                eq(v3, newline),
            );
        if escaped & !common | hex_carry != 0 {
            let (not_escape_char, u) = escape_chars(v0, v1, v2, v3);
            us = escaped & u;
            bad |= escaped & not_escape_char;
            let need_hex = hex_carry | (us << 1) | (us << 2) | (us << 3) | (us << 4);
            if need_hex != 0 {
                bad_hex = need_hex & not_hex_digits(v0, v1, v2, v3);
            }
        }
        if closing != 0 {
            // The string ends here: judge the bytes before the closing quote (the quote itself
            // for `\u` digits: `"\u12"` is cut short), and UTF-8 through the quote (the check
            // at its lane tells whether the character before it is complete).
            let end = closing.trailing_zeros();
            let before = (1u64 << end) - 1;
            let through = before | (1u64 << end);
            if bad & before != 0 || bad_hex & through != 0 {
                return clean;
            }
            if high || prev_high {
                *utf8_err = or(*utf8_err, utf8_errors_64(prev, v0, v1, v2, v3));
            }
            return i + end as usize;
        }
        if bad | bad_hex != 0 {
            return clean;
        }
        if high || prev_high {
            // All four parts, no branch per part (which parts of mixed text hold non-ASCII is
            // a coin toss), errors gathered for the end.
            *utf8_err = or(*utf8_err, utf8_errors_64(prev, v0, v1, v2, v3));
            prev = v3;
            prev_high = high_last;
        } else {
            prev = v3;
        }
        i += 64;
        first_escaped = next_escaped;
        hex_carry = hex_spill(us >> 60);
        // The next block starts clean unless an escape or a character runs into it: a lead
        // byte in the last three lanes whose character is longer than the lanes left (without
        // the branches of `incomplete_tail`; it may also flag a lead that is invalid anyway).
        let in_char = (block[63] >= 0xC0) | (block[62] >= 0xE0) | (block[61] >= 0xF0);
        if !next_escaped && hex_carry == 0 && !in_char {
            clean = i;
        }
        // A second printable-ASCII block in a row starts a run (a base64 image, an ASCII
        // document), skipped out of line. Only then: a branch on each block being plain would
        // be mispredicted in text where plain and mixed blocks alternate.
        if plain && ascii_run {
            i = ascii_blocks(bytes, i);
            clean = i;
            prev = splat(0);
        }
        ascii_run = plain;
    }
    if clean == i {
        i
    } else {
        clean
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128 {
    pub use core::arch::wasm32::v128 as V;
    use core::arch::wasm32::{
        i8x16_lt, i8x16_shuffle, u16x8_shr, u8x16, u8x16_bitmask, u8x16_eq, u8x16_lt, u8x16_splat,
        u8x16_sub_sat, u8x16_swizzle, v128_and, v128_andnot, v128_any_true, v128_load, v128_or,
        v128_xor,
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
    /// The first 16 bytes of `block` (out of range on fewer) with one `v128.load`. In
    /// `validate_utf8` the lane-by-lane `load` ran at 5.1 GB/s against 8.2 with this; in the
    /// scanner this one was 3 % slower on every body class (make bench-scan A/B, 6 rounds), so
    /// each keeps the faster.
    #[inline(always)]
    pub fn load_unaligned(block: &[u8]) -> V {
        let block = &block[..16];
        // SAFETY: `block` is 16 readable bytes; `v128_load` reads them unaligned
        // (`read_unaligned`), which wasm's v128.load allows at any address.
        unsafe { v128_load(block.as_ptr().cast::<V>()) }
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
    /// Lanes compared as signed bytes.
    #[inline(always)]
    pub fn lt_signed(a: V, b: V) -> V {
        i8x16_lt(a, b)
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
    /// `a & !b`.
    #[inline(always)]
    pub fn andnot(a: V, b: V) -> V {
        v128_andnot(a, b)
    }
    /// Each byte's high nibble. A 16-bit shift and a mask: V8 has no byte shift on x86 and
    /// emulates `u8x16.shr_u` with five instructions, building its mask every time.
    #[inline(always)]
    pub fn shr4(a: V) -> V {
        v128_and(u16x8_shr(a, 4), u8x16_splat(0x0F))
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
    pub fn load_unaligned(block: &[u8]) -> V {
        load(&block[..16])
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
    /// Lanes compared as signed bytes.
    #[inline(always)]
    pub fn lt_signed(a: V, b: V) -> V {
        map2(a, b, |x, y| if (x as i8) < (y as i8) { 0xFF } else { 0 })
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
    /// `a & !b`.
    #[inline(always)]
    pub fn andnot(a: V, b: V) -> V {
        map2(a, b, |x, y| x & !y)
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

    /// The tables of `escape_chars` and `not_hex_digits` classify every byte as the scanner's
    /// own escape decoder (`scanner::escaped_byte`, plus `u`) and `is_ascii_hexdigit` do.
    #[test]
    fn escape_tables_agree_with_the_scanner() {
        for b in 0..=255u8 {
            let v = load(&[b; 16]);
            let (not_escape_char, u) = escape_chars(v, v, v, v);
            let all = |yes: bool| if yes { u64::MAX } else { 0 };
            let escape_char = crate::core::json::scanner::escaped_byte(b).is_some() || b == b'u';
            assert_eq!(not_escape_char, all(!escape_char), "{b:#x}");
            assert_eq!(u, all(b == b'u'), "{b:#x}");
            assert_eq!(
                not_hex_digits(v, v, v, v),
                all(!b.is_ascii_hexdigit()),
                "{b:#x}"
            );
        }
    }

    /// Lane 60 + j of a `\u` needs lanes 0..=j of the next block.
    #[test]
    fn hex_spill_lanes() {
        assert_eq!(hex_spill(0), 0);
        assert_eq!(hex_spill(0b0001), 0b0001);
        assert_eq!(hex_spill(0b0010), 0b0011);
        assert_eq!(hex_spill(0b0100), 0b0111);
        assert_eq!(hex_spill(0b1000), 0b1111);
        assert_eq!(hex_spill(0b1001), 0b1111);
    }

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
