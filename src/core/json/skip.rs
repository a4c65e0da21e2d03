//! Fast skipping of the bytes the scanner only validates.
//!
//! Since the real-text work (docs/body-classes.md) the scanner first hands string content to `vector::string_blocks`, which
//! judges 64 bytes at a time whatever they hold; the byte-wise path below takes what that
//! leaves: the last bytes of a chunk, and the bytes before an error.
//!
//! Most of an LLM request is text inside JSON strings. Inside a string only a few kinds of byte
//! need more than a glance: `"` (the end), `\` (an escape), control bytes below 0x20 (invalid
//! unescaped) and bytes from 0x80 up (UTF-8 to validate). [`find_string_stop`] finds the first
//! of them many bytes at a time: with wasm SIMD128 when the module is built with `+simd128`
//! (V8 supports it), and with 8-byte SWAR words elsewhere. [`plain_string_prefix`] then handles
//! what it stops at without leaving the fast path when it can: a complete escape, or a run of
//! complete, valid UTF-8 characters.
//!
//! Why one pass that also stops at non-ASCII, rather than finding the specials and running the
//! standard library's UTF-8 check over the run before them: the check walks the run a second
//! time, a word (4 bytes on wasm32) at a time, and is a call per run. On chat bodies (a special
//! or a non-ASCII character every 80 bytes or so) one pass measured faster in V8 (`make
//! bench-scan`, see the commit that made the change).

/// Index of the first `"`, `\`, byte below 0x20 or byte from 0x80 up in `bytes`, or
/// `bytes.len()`.
#[inline]
pub fn find_string_stop(bytes: &[u8]) -> usize {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    {
        simd128::find(bytes)
    }
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    {
        swar::find(bytes)
    }
}

/// Length of the leading run of JSON whitespace (space, tab, line feed, carriage return).
#[inline]
pub fn whitespace_run(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .unwrap_or(bytes.len())
}

/// Length of the leading run of ASCII digits.
#[inline]
pub fn digit_run(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len())
}

/// How many leading bytes of a string's content can be skipped: plain ASCII runs, complete and
/// valid UTF-8 characters, and complete escapes. What is left (the closing quote, a control
/// byte, an invalid or split escape, invalid UTF-8 or a character split across chunks) goes to
/// the byte-at-a-time state machine, which reports it or carries it over.
/// Consuming escapes here rather than in the state machine measured +13-30 % in V8 on chat
/// bodies (about one escape per 170 bytes).
#[inline]
pub fn plain_string_prefix(bytes: &[u8]) -> usize {
    let mut i = 0;
    loop {
        i += find_string_stop(&bytes[i..]);
        let Some(&b) = bytes.get(i) else {
            return i;
        };
        if b >= 0x80 {
            // One character here; a lone accented letter or dash in ASCII text costs no more.
            match utf8_char_len(&bytes[i..]) {
                Some(n) => i += n,
                None => return i,
            }
            if bytes.get(i).is_some_and(|&next| next >= 0x80) {
                // A run of non-ASCII text (CJK, Cyrillic, emoji...): whole blocks of it are
                // validated in the vector registers (see `vector`). Measured: CJK 0.86 ->
                // 3.7 GB/s in V8, while sparse accents stay on the path above (doing the
                // vector check for them too made chat bodies 30 % slower).
                i += super::vector::plain_blocks(&bytes[i..]);
            }
            continue;
        }
        if b != b'\\' {
            return i;
        }
        // An escape: inside a string that is only validated, any of these will do (an
        // unpaired `\uD800` is grammatical JSON; see the scanner).
        match bytes.get(i + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
            Some(b'u')
                if bytes
                    .get(i + 2..i + 6)
                    .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
            {
                i += 6
            }
            _ => return i,
        }
    }
}

/// What a UTF-8 lead byte announces: how many continuation bytes follow, and the range the
/// first of them must fall in (the later ones are 0x80-0xBF). `None` for a byte that cannot
/// start a character. RFC 3629's ranges: no overlong forms (C0, C1, E0 80-9F, F0 80-8F), no
/// UTF-16 surrogates (ED A0-BF), nothing above U+10FFFF (F4 90-BF, F5-FF). The one table both
/// the fast path and the scanner's byte-at-a-time state machine use.
#[inline]
pub fn utf8_lead(b: u8) -> Option<(u8, u8, u8)> {
    Some(match b {
        0xC2..=0xDF => (1, 0x80, 0xBF),
        0xE0 => (2, 0xA0, 0xBF),
        0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
        0xED => (2, 0x80, 0x9F),
        0xF0 => (3, 0x90, 0xBF),
        0xF1..=0xF3 => (3, 0x80, 0xBF),
        0xF4 => (3, 0x80, 0x8F),
        _ => return None,
    })
}

/// Length of the complete, valid UTF-8 character at the start of `bytes` (whose first byte is
/// 0x80 or above), or `None` if it is invalid or not complete in `bytes`.
#[inline]
pub(crate) fn utf8_char_len(bytes: &[u8]) -> Option<usize> {
    let (continuations, lo, hi) = utf8_lead(*bytes.first()?)?;
    let second = *bytes.get(1)?;
    if second < lo || second > hi {
        return None;
    }
    let len = usize::from(continuations) + 1;
    for k in 2..len {
        if *bytes.get(k)? & 0xC0 != 0x80 {
            return None;
        }
    }
    Some(len)
}

/// Scalar tail shared by both implementations.
#[inline]
fn is_stop(b: u8) -> bool {
    b == b'"' || b == b'\\' || !(0x20..0x80).contains(&b)
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
mod swar {
    use super::is_stop;

    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;

    /// High bit set in each byte lane of `x` that is zero. Lanes above a zero lane may also be
    /// flagged (borrow), never lanes below it, so the lowest flag is exact.
    #[inline]
    fn zero_lanes(x: u64) -> u64 {
        x.wrapping_sub(ONES) & !x & HIGHS
    }

    /// High bit set in each lane below `n` (n <= 128), with the same lowest-flag guarantee.
    #[inline]
    fn less_than_lanes(x: u64, n: u8) -> u64 {
        x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS
    }

    pub fn find(bytes: &[u8]) -> usize {
        let mut i = 0;
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut lanes = [0u8; 8];
            lanes.copy_from_slice(word);
            let x = u64::from_le_bytes(lanes);
            // `x & HIGHS` flags the non-ASCII lanes exactly.
            let flags = zero_lanes(x ^ (ONES * u64::from(b'"')))
                | zero_lanes(x ^ (ONES * u64::from(b'\\')))
                | less_than_lanes(x, 0x20)
                | (x & HIGHS);
            if flags != 0 {
                return i + (flags.trailing_zeros() / 8) as usize;
            }
            i += 8;
        }
        for &b in words.remainder() {
            if is_stop(b) {
                return i;
            }
            i += 1;
        }
        i
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd128 {
    use super::is_stop;
    use crate::core::json::vector::stop_mask;

    pub fn find(bytes: &[u8]) -> usize {
        let mut i = 0;
        let mut blocks = bytes.chunks_exact(16);
        for block in &mut blocks {
            let mask = stop_mask(block);
            if mask != 0 {
                return i + mask.trailing_zeros() as usize;
            }
            i += 16;
        }
        for &b in blocks.remainder() {
            if is_stop(b) {
                return i;
            }
            i += 1;
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(bytes: &[u8]) -> usize {
        bytes
            .iter()
            .position(|&b| is_stop(b))
            .unwrap_or(bytes.len())
    }

    #[test]
    fn find_matches_scalar_at_every_position_and_byte() {
        for len in 0..40 {
            for pos in 0..len {
                for stop in [b'"', b'\\', 0x00, 0x1F, b'\n', 0x80, 0xC3, 0xFF] {
                    for filler in [b'a', 0x7F, b' ', b'!', b'#', b']', b'\\' + 1, b'"' + 1] {
                        let mut v = vec![filler; len];
                        v[pos] = stop;
                        assert_eq!(find_string_stop(&v), scalar(&v), "{v:?}");
                        assert_eq!(find_string_stop(&v), pos);
                    }
                }
            }
            let plain = vec![b'x'; len];
            assert_eq!(find_string_stop(&plain), len);
        }
        // Every byte value, at every position of a few blocks.
        for b in 0..=255u8 {
            for at in 0..40 {
                let mut v = vec![b'x'; 40];
                v[at] = b;
                assert_eq!(find_string_stop(&v), scalar(&v), "byte {b:#x} at {at}");
            }
        }
    }

    #[test]
    fn plain_prefix_stops_before_bad_or_split_utf8() {
        assert_eq!(plain_string_prefix(b"abc\"def"), 3);
        // Complete escapes are skipped; a split or invalid one is left to the state machine.
        assert_eq!(
            plain_string_prefix("h\u{e9}llo\\n\\\"x\\u00e9y\"".as_bytes()),
            18
        );
        assert_eq!(plain_string_prefix(b"ab\\"), 2);
        assert_eq!(plain_string_prefix(b"ab\\u00e"), 2);
        assert_eq!(plain_string_prefix(b"ab\\u00eg\""), 2);
        assert_eq!(plain_string_prefix(b"ab\\x"), 2);
        // A split 3-byte character: the first two bytes are left to the state machine.
        let s = "ab\u{4e2d}".as_bytes();
        assert_eq!(plain_string_prefix(&s[..4]), 2);
        assert_eq!(plain_string_prefix(s), 5);
        assert_eq!(plain_string_prefix(b"ab\xffcd"), 2);
        // Runs of non-ASCII characters, then ASCII again, then the end of the string.
        let s = "x\u{4e2d}\u{6587}\u{1F600}y\u{e9}\u{e9}z\"".as_bytes();
        assert_eq!(plain_string_prefix(s), s.len() - 1);
        assert_eq!(digit_run(b"12345,"), 5);
        assert_eq!(digit_run(b"x"), 0);
    }

    /// The character check agrees with the standard library on every 1- to 4-byte sequence
    /// that starts with a byte from 0x80 up (whole, or cut short), with a few continuation
    /// bytes that probe each range's edges.
    #[test]
    fn utf8_char_len_agrees_with_std() {
        let probes = [
            0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF,
        ];
        for lead in 0x80..=0xFFu8 {
            for &b1 in &probes {
                for &b2 in &probes {
                    for &b3 in &probes {
                        let seq = [lead, b1, b2, b3];
                        // Only the first character counts: the shortest prefix that is valid
                        // UTF-8 is it; a valid character followed by anything is that length.
                        let first = (1..=4).find(|&n| std::str::from_utf8(&seq[..n]).is_ok());
                        assert_eq!(utf8_char_len(&seq), first, "{seq:x?}");
                        if let Some(n) = first {
                            for cut in 0..n {
                                assert_eq!(
                                    utf8_char_len(&seq[..cut]),
                                    None,
                                    "{seq:x?} cut at {cut}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
