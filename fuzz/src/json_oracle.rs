//! The oracle for bbr-wasm's JSON body scanner: what serde_json reads in a body, turned into
//! the [`Step`] the scanner must end with, and the harness that feeds a body in chunks.
//!
//! Shared by the `json_scanner` fuzz target (`fuzz/src/lib.rs`) and the proptest differential
//! test (`tests/differential.rs` includes this file by path), so it uses only `bbr_wasm`,
//! `serde` and `serde_json` with their default features, and never `unwrap`/`expect`/`panic!`.
//!
//! serde_json is read in three passes, chosen so that no difference of its own policy hides a
//! difference of grammar:
//! 1. validity: `from_str::<IgnoredAny>` on the UTF-8 text. serde_json skips ignored values
//!    iteratively (no recursion limit) and does not decode `\u` escapes there, so lone
//!    surrogates, deep nesting and out-of-range numbers are all just valid JSON, as RFC 8259
//!    and the scanner say;
//! 2. the top-level keys, read as bytes (`deserialize_bytes`: escapes decoded to WTF-8, lone
//!    surrogates kept), so `"\u006dodel"` is `model` and `"model\ud800"` is not;
//! 3. the first `model` value, read as bytes too: a string gives its exact decoded bytes, any
//!    other value gives serde_json's "invalid type" error, which names its kind.
//!
//! The only difference left is the scanner's policy: nesting deeper than
//! [`MAX_DEPTH`] is refused ([`ScanError::TooDeep`]); serde_json's own reading has no such
//! limit in these passes. Everything else must agree exactly.

use bbr_wasm::core::json::scanner::MAX_DEPTH;
use bbr_wasm::core::{ModelScanner, ScanError, Step};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// serde_json's reading of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// Not a JSON text: serde_json's (or UTF-8's) message.
    Invalid(String),
    /// A JSON text whose top level is not an object.
    NotAnObject,
    /// An object.
    Object {
        /// The first top-level `model` value, if any.
        first_model: Option<ModelValue>,
        /// How many top-level keys decode to `model`.
        model_keys: usize,
        /// The deepest nesting of containers (the top-level object is 1).
        depth: usize,
    },
}

/// A top-level `model` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelValue {
    /// A string, decoded to WTF-8: lone surrogates appear as their 3-byte encodings.
    Str(Vec<u8>),
    /// Another kind of value, named as the scanner names it ("a number", "null", ...).
    NotString(&'static str),
}

/// Reads a body with serde_json. `Err` means the oracle itself failed on a document serde_json
/// accepts (a bug in this file, or a serde_json message it does not know).
pub fn read(body: &[u8]) -> Result<Reading, String> {
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(e) => return Ok(Reading::Invalid(e.to_string())),
    };
    if let Err(e) = serde_json::from_str::<IgnoredAny>(text) {
        return Ok(Reading::Invalid(e.to_string()));
    }
    let first = text
        .bytes()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(b'{') {
        return Ok(Reading::NotAnObject);
    }
    let depth = max_depth(body);
    let mut de = serde_json::Deserializer::from_str(text);
    match de.deserialize_map(TopLevel) {
        Ok((first_model, model_keys)) => Ok(Reading::Object {
            first_model,
            model_keys,
            depth,
        }),
        Err(e) => {
            // Pass 3 stops at a first `model` that is not a string: the message names its kind.
            let msg = e.to_string();
            let kind = kind_from_message(&msg)
                .ok_or_else(|| format!("oracle: serde_json refused a valid document: {msg}"))?;
            Ok(Reading::Object {
                first_model: Some(ModelValue::NotString(kind)),
                model_keys: 1,
                depth,
            })
        }
    }
}

/// The kind of a non-string `model` from serde_json's "invalid type" message.
fn kind_from_message(msg: &str) -> Option<&'static str> {
    if msg.starts_with("number out of range") {
        return Some("a number");
    }
    let unexpected = msg.strip_prefix("invalid type: ")?;
    let kinds: [(&str, &'static str); 6] = [
        ("null", "null"),
        ("boolean", "a boolean"),
        ("integer", "a number"),
        ("floating point", "a number"),
        ("map", "an object"),
        ("sequence", "an array"),
    ];
    kinds
        .iter()
        .find(|(prefix, _)| unexpected.starts_with(prefix))
        .map(|&(_, kind)| kind)
}

/// The deepest container nesting of a valid JSON text.
pub fn max_depth(body: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Pass 2 and 3: the top-level object.
struct TopLevel;

impl<'de> Visitor<'de> for TopLevel {
    type Value = (Option<ModelValue>, usize);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut first_model = None;
        let mut model_keys = 0;
        while let Some(key) = map.next_key_seed(Bytes)? {
            if key == b"model" {
                model_keys += 1;
                if model_keys == 1 {
                    first_model = Some(ModelValue::Str(map.next_value_seed(Bytes)?));
                    continue;
                }
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok((first_model, model_keys))
    }
}

/// A JSON string as its decoded bytes (WTF-8). Arrays are refused by name, like every other
/// non-string value (serde_json itself names those).
struct Bytes;

impl<'de> DeserializeSeed<'de> for Bytes {
    type Value = Vec<u8>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for Bytes {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<Vec<u8>, A::Error> {
        Err(de::Error::invalid_type(de::Unexpected::Seq, &self))
    }
}

/// Lone surrogates in WTF-8: each is `ED A0..BF xx` (valid UTF-8 never has those).
fn lone_surrogates(wtf8: &[u8]) -> usize {
    wtf8.windows(2)
        .filter(|w| w[0] == 0xED && (0xA0..=0xBF).contains(&w[1]))
        .count()
}

/// The step the scanner must end with for this reading, when it is decided by serde_json
/// (`None` for an invalid text: see [`check`]).
pub fn expected(reading: &Reading, max_model_bytes: usize) -> Option<Step> {
    let (first_model, model_keys) = match reading {
        Reading::Invalid(_) => return None,
        Reading::NotAnObject => return Some(Step::Error(ScanError::NotAnObject)),
        Reading::Object {
            first_model,
            model_keys,
            ..
        } => (first_model, *model_keys),
    };
    let err = |e| Some(Step::Error(e));
    let bytes = match first_model {
        None => return err(ScanError::MissingModel),
        Some(ModelValue::NotString(kind)) => return err(ScanError::ModelNotString { kind }),
        Some(ModelValue::Str(bytes)) => bytes,
    };
    // The scanner never stores a lone surrogate, so its length check counts the rest; the
    // check runs while the string arrives, before a later duplicate key is read.
    let lone = lone_surrogates(bytes);
    if bytes.len() - 3 * lone > max_model_bytes {
        return err(ScanError::ModelTooLong {
            limit: max_model_bytes,
        });
    }
    if model_keys > 1 {
        return err(ScanError::DuplicateModel);
    }
    if lone > 0 {
        return err(ScanError::ModelInvalidUnicode);
    }
    let model = match String::from_utf8(bytes.clone()) {
        Ok(model) => model,
        Err(_) => return err(ScanError::ModelInvalidUnicode),
    };
    if model.is_empty() {
        return err(ScanError::ModelEmpty);
    }
    if model.chars().any(char::is_control) {
        return err(ScanError::ModelControlCharacter);
    }
    Some(Step::Found(model))
}

/// Checks the scanner's final step for `body` against serde_json's reading.
pub fn check(body: &[u8], max_model_bytes: usize, got: &Step) -> Result<(), String> {
    let reading = read(body)?;
    let mismatch = |why: &str| {
        Err(format!(
            "{why}\n  scanner:    {got:?}\n  serde_json: {reading:?}\n  body: {:?}",
            String::from_utf8_lossy(body)
        ))
    };
    if matches!(got, Step::NeedMore) {
        return mismatch("the scanner returned NeedMore after finish");
    }
    match expected(&reading, max_model_bytes) {
        Some(want) => {
            if *got == want {
                return Ok(());
            }
            let deep = matches!(reading, Reading::Object { depth, .. } if depth > MAX_DEPTH);
            if deep && matches!(got, Step::Error(ScanError::TooDeep { .. })) {
                return Ok(()); // the scanner's documented nesting limit
            }
            mismatch("the scanner and serde_json disagree on a valid document")
        }
        None => match got {
            // Broken JSON can only end in a grammar error, or in an error the scanner reports
            // as soon as it sees it, before the bad byte.
            Step::Error(
                ScanError::InvalidJson { .. }
                | ScanError::TooDeep { .. }
                | ScanError::ModelNotString { .. }
                | ScanError::ModelTooLong { .. }
                | ScanError::DuplicateModel,
            ) => Ok(()),
            // Refused at the first byte, which must start some JSON value other than an object.
            Step::Error(ScanError::NotAnObject) => {
                let first = body
                    .iter()
                    .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
                match first {
                    Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => Ok(()),
                    _ => mismatch("NotAnObject for a body that starts no JSON value"),
                }
            }
            _ => mismatch("the scanner accepted a document serde_json refuses"),
        },
    }
}

/// Feeds `body` cut at `cuts` (positions, any order, out-of-range ones ignored), then finishes.
/// Returns the first error, or what `finish` says.
pub fn scan(body: &[u8], max_model_bytes: usize, cuts: &[usize]) -> Step {
    let mut cuts: Vec<usize> = cuts.iter().copied().filter(|&c| c <= body.len()).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut scanner = ModelScanner::new(max_model_bytes);
    let mut start = 0;
    for end in cuts.into_iter().chain(std::iter::once(body.len())) {
        if let Some(chunk) = body.get(start..end) {
            if let step @ Step::Error(_) = scanner.feed(chunk) {
                return step;
            }
        }
        start = end;
    }
    scanner.finish()
}

/// Feeds `body` one byte at a time, then finishes, and checks `early_model` on the way (the
/// verdict `routeBeforeBodyEnds` routes by, as soon as the `model` string is read):
/// - once it has a verdict, that verdict stays until an error ends the body;
/// - it is a verdict on the model alone (found, or empty/control characters/lone surrogate);
/// - when the body ends in such a verdict, `early_model` had given it;
/// - on a valid document it is serde_json's reading of the first `model` (a second `model`
///   is the check routing early gives up).
///
/// Returns the final step.
pub fn scan_bytewise_early(body: &[u8], max_model_bytes: usize) -> Result<Step, String> {
    let mut scanner = ModelScanner::new(max_model_bytes);
    let mut early: Option<Step> = None;
    let mut last = None;
    for (i, b) in body.chunks(1).enumerate() {
        let step = scanner.feed(b);
        if let Step::Error(_) = step {
            last = Some(step);
            break;
        }
        match (&early, scanner.early_model()) {
            (None, now) => early = now,
            (Some(was), Some(now)) if *was == now => {}
            (Some(was), now) => {
                return Err(format!(
                    "early_model went from {was:?} to {now:?} at byte {i}"
                ))
            }
        }
    }
    let last = match last {
        Some(step) => step,
        None => scanner.finish(),
    };
    let model_verdict = |s: &Step| {
        matches!(
            s,
            Step::Found(_)
                | Step::Error(
                    ScanError::ModelEmpty
                        | ScanError::ModelControlCharacter
                        | ScanError::ModelInvalidUnicode
                )
        )
    };
    if let Some(e) = &early {
        if !model_verdict(e) {
            return Err(format!("early_model gave {e:?}"));
        }
    }
    if model_verdict(&last) && early.as_ref() != Some(&last) {
        return Err(format!(
            "the body ends in {last:?}, early_model gave {early:?}"
        ));
    }
    if let (Some(e), Reading::Object { first_model, .. }) = (&early, read(body)?) {
        let first_only = Reading::Object {
            first_model,
            model_keys: 1,
            depth: 0,
        };
        let want = expected(&first_only, max_model_bytes);
        if want.as_ref() != Some(e) {
            return Err(format!(
                "early_model gave {e:?}, serde_json's first model gives {want:?}"
            ));
        }
    }
    Ok(last)
}

/// Feeds `body` one byte at a time, then finishes.
pub fn scan_bytewise(body: &[u8], max_model_bytes: usize) -> Step {
    let mut scanner = ModelScanner::new(max_model_bytes);
    for b in body.chunks(1) {
        if let step @ Step::Error(_) = scanner.feed(b) {
            return step;
        }
    }
    scanner.finish()
}

/// Checks what an error offset claims: the bytes before it are a valid prefix (`NeedMore`),
/// the byte at it brings the same error, and a `TooDeep` is at container 1025.
pub fn check_offset(body: &[u8], max_model_bytes: usize, got: &Step) -> Result<(), String> {
    let offset = match got {
        Step::Error(ScanError::InvalidJson { offset, .. } | ScanError::TooDeep { offset }) => {
            *offset
        }
        _ => return Ok(()),
    };
    let at = usize::try_from(offset).map_err(|e| e.to_string())?;
    if at > body.len() {
        return Err(format!("error offset {at} past the body ({})", body.len()));
    }
    let mut scanner = ModelScanner::new(max_model_bytes);
    let before = scanner.feed(&body[..at]);
    if before != Step::NeedMore {
        return Err(format!("{got:?}, but the bytes before it give {before:?}"));
    }
    let next = match body.get(at..=at) {
        Some(byte) => scanner.feed(byte),
        None => scanner.finish(),
    };
    if next != *got {
        return Err(format!(
            "{got:?}, but the byte at its offset gives {next:?}"
        ));
    }
    if let Step::Error(ScanError::TooDeep { .. }) = got {
        if body.get(..=at).map(max_depth) != Some(MAX_DEPTH + 1) {
            return Err(format!("{got:?} before nesting {} levels", MAX_DEPTH + 1));
        }
    }
    Ok(())
}
