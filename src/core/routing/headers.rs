//! The request headers as the host hands them over all at once.
//!
//! Reading header by header costs one host call each (and, for every header present, a second
//! call back into the VM to allocate the copy): seven headers were fourteen crossings of the
//! VM boundary per request. `proxy_get_header_map_pairs` hands over the whole map in one, in
//! the proxy-wasm ABI's serialized form, which this module reads. Nothing here trusts the
//! bytes: a map that does not parse is an error, never a panic.

use std::fmt;

/// The serialized map did not parse (a host bug; the adapter fails the request closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedHeaderMap;

impl fmt::Display for MalformedHeaderMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the host's serialized header map is malformed")
    }
}

/// Header (name, value) pairs, in the host's order, borrowing from the serialized map.
pub type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

/// The pairs of a serialized header map, in order.
///
/// The ABI's layout: the number of pairs N (u32, little-endian); N pairs of sizes (key size,
/// value size, u32 each); then, for each pair, the key bytes, a NUL, the value bytes, a NUL.
/// An empty buffer is an empty map (the host sends none when there are no headers).
pub fn parse_pairs(bytes: &[u8]) -> Result<Pairs<'_>, MalformedHeaderMap> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let count = read_u32(bytes, 0)? as usize;
    let sizes_end = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .filter(|&end| end <= bytes.len())
        .ok_or(MalformedHeaderMap)?;
    let mut pairs = Vec::with_capacity(count);
    let mut at = sizes_end;
    for n in 0..count {
        let key_len = read_u32(bytes, 4 + n * 8)? as usize;
        let value_len = read_u32(bytes, 8 + n * 8)? as usize;
        let key = take(bytes, &mut at, key_len)?;
        let value = take(bytes, &mut at, value_len)?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// The value of the first header named `name` (compared without regard to ASCII case, as the
/// host's own lookup does), like the host's single-header call returns it.
pub fn first<'a>(pairs: &[(&'a [u8], &'a [u8])], name: &str) -> Option<&'a [u8]> {
    pairs
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name.as_bytes()))
        .map(|&(_, value)| value)
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32, MalformedHeaderMap> {
    let word = bytes.get(at..at + 4).ok_or(MalformedHeaderMap)?;
    let mut le = [0u8; 4];
    le.copy_from_slice(word);
    Ok(u32::from_le_bytes(le))
}

/// `len` bytes at `*at`, then the NUL that ends them.
fn take<'a>(bytes: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8], MalformedHeaderMap> {
    let end = at.checked_add(len).ok_or(MalformedHeaderMap)?;
    let field = bytes.get(*at..end).ok_or(MalformedHeaderMap)?;
    if bytes.get(end) != Some(&0) {
        return Err(MalformedHeaderMap);
    }
    *at = end + 1;
    Ok(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ABI's serialization, written independently of the parser.
    fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    #[test]
    fn round_trips_and_finds_the_first_value() {
        let map: &[(&[u8], &[u8])] = &[
            (b":method", b"POST"),
            (b":path", b"/v1/chat/completions"),
            (b"content-type", b"application/json"),
            (b"x-empty", b""),
            (b"content-type", b"text/plain"),
            (b"x-bytes", b"\xff\x00\x80"),
        ];
        let bytes = serialize(map);
        assert_eq!(parse_pairs(&bytes), Ok(map.to_vec()));
        let pairs = parse_pairs(&bytes).unwrap_or_default();
        assert_eq!(
            first(&pairs, "content-type"),
            Some(&b"application/json"[..])
        );
        assert_eq!(
            first(&pairs, "Content-Type"),
            Some(&b"application/json"[..])
        );
        assert_eq!(first(&pairs, "x-empty"), Some(&b""[..]));
        assert_eq!(first(&pairs, "x-bytes"), Some(&b"\xff\x00\x80"[..]));
        assert_eq!(first(&pairs, "content-length"), None);
        assert_eq!(parse_pairs(&[]), Ok(vec![]));
        assert_eq!(parse_pairs(&serialize(&[])), Ok(vec![]));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = serialize(&[(b"a", b"bc"), (b"de", b"")]);
        for cut in 1..bytes.len() {
            assert_eq!(
                parse_pairs(&bytes[..cut]),
                Err(MalformedHeaderMap),
                "cut at {cut}"
            );
        }
        for at in 0..bytes.len() {
            for b in [0x00, 0x01, 0x7F, 0xFF] {
                let mut bad = bytes.clone();
                bad[at] = b;
                // Either it still parses (a changed byte inside a key or value) or it is an
                // error; it never panics or reads out of bounds.
                let _ = parse_pairs(&bad);
            }
        }
        // Huge counts and sizes do not overflow or allocate.
        assert_eq!(
            parse_pairs(&u32::MAX.to_le_bytes()),
            Err(MalformedHeaderMap)
        );
        let mut huge = 1u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_pairs(&huge), Err(MalformedHeaderMap));
    }
}
