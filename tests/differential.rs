//! Differential and robustness tests of the JSON body scanner (native only).
//!
//! - On any valid JSON the scanner reads the top-level `model` serde_json reads. Documents are
//!   generated as serde_json values (nested `model` keys included), written compact, pretty, or
//!   by a writer of our own that puts random whitespace between tokens and escapes characters
//!   at random (`\/`, `\n`, `\u00e9`, surrogate pairs, either hex case), then fed in random
//!   chunks.
//! - On any byte string (random bytes, a soup of JSON tokens, mutations of valid documents) the
//!   scanner never panics, ends the same whole, byte by byte and in chunks, places its errors
//!   at the exact byte, gives one early verdict (`early_model`, for `routeBeforeBodyEnds`) that
//!   is the first `model`'s, and agrees with serde_json's reading (`fuzz/src/json_oracle.rs`, shared
//!   with the `json_scanner` fuzz target, holds that reading and its documented differences).
//! - Work is linear in the input: see `adversarial_inputs_*` below.
#![cfg(not(target_arch = "wasm32"))]

#[path = "../fuzz/src/json_oracle.rs"]
mod oracle;

#[path = "../fuzz/src/multipart_ref.rs"]
mod multipart_ref;

use bbr_wasm::core::usage::{Framing, Outcome, ResponseScanner};
use bbr_wasm::core::{ModelScanner, MultipartScanner, Step};
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Generators

/// Strings that stress the scanner: model-like names, anything Unicode (control characters
/// included), runs of the characters JSON must or may escape, and long non-ASCII runs.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9/._:-]{0,24}",
        3 => any::<String>(),
        3 => vec(
            prop::sample::select(vec![
                "\"", "\\", "/", "\n", "\r", "\t", "\u{0}", "\u{1f}", "\u{7f}", "\u{85}", "é", "€",
                "\u{ffff}", "\u{10ffff}", "😀", " ", "model", "a",
            ]),
            0..12,
        )
        .prop_map(|parts| parts.concat()),
        // Long runs of mostly non-ASCII text: whole 16-byte blocks of it go through the vector
        // UTF-8 check (src/core/json/vector.rs), with specials and ASCII at any offset in between.
        2 => vec(
            prop::sample::select(vec![
                "中", "文", "。", "é", "ß", "😀", "\u{800}", "\u{ffff}", "\u{10000}", "\u{10ffff}",
                "\u{7ff}", "\u{e000}", "a", " ", "\"", "\\", "\n",
            ]),
            0..96,
        )
        .prop_map(|parts| parts.concat()),
    ]
}

/// JSON numbers serde_json can hold.
fn number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<i64>().prop_map(Number::from),
        any::<u64>().prop_map(Number::from),
        any::<f64>().prop_filter_map("finite", Number::from_f64),
    ]
}

/// Any JSON value, bounded in depth and size; objects may hold `model` keys of their own.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number().prop_map(Value::Number),
        string().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 48, 5, |inner| {
        let key = prop_oneof![3 => string(), 1 => Just("model".to_string())];
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((key, inner), 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// The top-level `model`: usually a string, sometimes another kind of value.
fn model_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => string().prop_map(Value::String),
        1 => "[a-z]{300,400}".prop_map(Value::String),
        1 => value(),
    ]
}

/// A request body: top-level members in order, with zero, one or (rarely) two `model` keys.
#[derive(Debug, Clone)]
struct Doc {
    members: Vec<(String, Value)>,
}

fn doc() -> impl Strategy<Value = Doc> {
    // `stream` and `stream_options` too, whose top-level values the scanner notes.
    let key = prop_oneof![
        8 => string().prop_filter("not model", |k| k != "model"),
        1 => Just("stream".to_string()),
        1 => Just("stream_options".to_string()),
    ];
    let other = (key, value());
    (
        vec(other, 0..6),
        prop::option::weighted(0.9, model_value()),
        prop::option::weighted(0.05, model_value()),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        prop::option::weighted(0.5, prop_oneof![3 => Just(Value::Bool(true)), 1 => value()]),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(mut members, model, second, i, j, stream, k)| {
            if let Some(v) = stream {
                let at = k.index(members.len() + 1);
                members.insert(at, ("stream".to_string(), v));
            }
            if let Some(m) = model {
                let at = i.index(members.len() + 1);
                members.insert(at, ("model".to_string(), m));
            }
            if let Some(m) = second {
                let at = j.index(members.len() + 1);
                members.insert(at, ("model".to_string(), m));
            }
            Doc { members }
        })
}

/// How a document is written.
#[derive(Debug, Clone, Copy)]
enum Style {
    Compact,
    Pretty,
    /// Our writer: random whitespace, random escapes, driven by the seed.
    Random(u64),
}

fn style() -> impl Strategy<Value = Style> {
    prop_oneof![
        1 => Just(Style::Compact),
        1 => Just(Style::Pretty),
        3 => any::<u64>().prop_map(Style::Random),
    ]
}

fn write(doc: &Doc, style: Style) -> String {
    let unique = doc.members.iter().filter(|(k, _)| k == "model").count() <= 1;
    match style {
        // serde_json writes a Map, which cannot hold two `model` keys: use our writer then.
        Style::Compact | Style::Pretty if unique => {
            let map: Map<String, Value> = doc.members.iter().cloned().collect();
            let value = Value::Object(map);
            let text = match style {
                Style::Pretty => serde_json::to_string_pretty(&value),
                _ => serde_json::to_string(&value),
            };
            match text {
                Ok(text) => text,
                Err(e) => unreachable!("serde_json writes any Value: {e}"),
            }
        }
        Style::Compact | Style::Pretty => Writer::new(0).document(doc),
        Style::Random(seed) => Writer::new(seed).document(doc),
    }
}

/// A JSON writer with random (valid) whitespace and escapes; seed 0 writes plainly.
struct Writer {
    out: String,
    rng: u64,
}

impl Writer {
    fn new(seed: u64) -> Self {
        Writer {
            out: String::new(),
            rng: seed,
        }
    }

    fn next(&mut self) -> u64 {
        if self.rng == 0 {
            return 0; // plain: no whitespace, only the escapes JSON requires, short forms
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn ws(&mut self) {
        let r = self.next();
        for i in 0..(r % 4) {
            let c = [' ', '\t', '\n', '\r'][((r >> (8 + 2 * i)) % 4) as usize];
            self.out.push(c);
        }
    }

    fn document(mut self, doc: &Doc) -> String {
        self.ws();
        self.out.push('{');
        for (i, (k, v)) in doc.members.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.ws();
            self.string(k);
            self.ws();
            self.out.push(':');
            self.ws();
            self.value(v);
            self.ws();
        }
        self.out.push('}');
        self.ws();
        self.out
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.out.push_str("null"),
            Value::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => self.out.push_str(&n.to_string()),
            Value::String(s) => self.string(s),
            Value::Array(items) => {
                self.out.push('[');
                self.ws();
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                        self.ws();
                    }
                    self.value(item);
                    self.ws();
                }
                self.out.push(']');
            }
            Value::Object(map) => {
                self.out.push('{');
                self.ws();
                for (i, (k, v)) in map.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                        self.ws();
                    }
                    self.string(k);
                    self.ws();
                    self.out.push(':');
                    self.ws();
                    self.value(v);
                    self.ws();
                }
                self.out.push('}');
            }
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            let r = self.next();
            let must = c == '"' || c == '\\' || c < ' ';
            if !must && r % 3 != 1 {
                self.out.push(c);
                continue;
            }
            let short = match c {
                '"' => Some("\\\""),
                '\\' => Some("\\\\"),
                '/' => Some("\\/"),
                '\u{8}' => Some("\\b"),
                '\u{c}' => Some("\\f"),
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                _ => None,
            };
            match short {
                Some(esc) if (r >> 8) % 2 == 0 => self.out.push_str(esc),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let hex = if (r >> 9) % 2 == 0 {
                            format!("\\u{unit:04x}")
                        } else {
                            format!("\\u{unit:04X}")
                        };
                        self.out.push_str(&hex);
                    }
                }
            }
        }
        self.out.push('"');
    }
}

/// Pieces of JSON, valid and not, that random sequences are made of.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b",",
    b":",
    b":",
    b" ",
    b"\n",
    b"\"model\"",
    b"\"model\"",
    b"\"\\u006dodel\"",
    b"\"mode\"",
    b"\"models\"",
    b"\"x\"",
    b"\"\"",
    b"\"m\"",
    b"\"Qwen\\/Q\"",
    b"\"\\ud800\"",
    b"\"\\udc00x\"",
    b"\"\\ud83d\\ude00\"",
    b"\"a\\\"b\"",
    b"\"\\u0000\"",
    b"\"\\n\"",
    b"\"\x01\"",
    b"\"\xc3\xa9\"",
    b"\"\xed\xa0\x80\"",
    b"\"\xff\"",
    b"\"\\x\"",
    b"\"\\u12\"",
    b"0",
    b"-0",
    b"1.5e+3",
    b"1e400",
    b"-1E-2",
    b"-",
    b"01",
    b"1.",
    b"2e",
    b"true",
    b"false",
    b"null",
    b"tru",
    b"nul",
    b"\xef\xbb\xbf",
    b"\"",
    b"\\",
    b"\x00",
];

fn soup() -> impl Strategy<Value = Vec<u8>> {
    vec(prop::sample::select(TOKENS), 0..48).prop_map(|tokens| {
        let mut body = b"{".to_vec();
        for t in tokens {
            body.extend_from_slice(t);
        }
        body
    })
}

/// An edit of a valid document.
#[derive(Debug, Clone)]
enum Edit {
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Replace(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Repeat(prop::sample::Index, prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let byte = prop_oneof![
        3 => prop::sample::select(b"{}[],:\"\\ u0123456789.eE+-tfnl\x00\x1f\x80\xc3\xed\xff".to_vec()),
        1 => any::<u8>(),
    ];
    let index = any::<prop::sample::Index>;
    prop_oneof![
        (index(), byte.clone()).prop_map(|(i, b)| Edit::Insert(i, b)),
        index().prop_map(Edit::Delete),
        (index(), byte).prop_map(|(i, b)| Edit::Replace(i, b)),
        index().prop_map(Edit::Truncate),
        (index(), index()).prop_map(|(i, j)| Edit::Repeat(i, j)),
    ]
}

fn apply(body: &mut Vec<u8>, edit: &Edit) {
    if body.is_empty() {
        return;
    }
    let n = body.len();
    match edit {
        Edit::Insert(i, b) => body.insert(i.index(n + 1), *b),
        Edit::Delete(i) => {
            body.remove(i.index(n));
        }
        Edit::Replace(i, b) => body[i.index(n)] = *b,
        Edit::Truncate(i) => body.truncate(i.index(n)),
        Edit::Repeat(i, j) => {
            let (a, b) = (i.index(n), j.index(n));
            let piece = body[a.min(b)..a.max(b)].to_vec();
            let at = a.max(b);
            body.splice(at..at, piece);
        }
    }
}

fn max_model_bytes() -> impl Strategy<Value = usize> {
    prop_oneof![2 => Just(256usize), 1 => 1usize..32]
}

fn cuts() -> impl Strategy<Value = Vec<prop::sample::Index>> {
    vec(any::<prop::sample::Index>(), 0..8)
}

fn positions(cuts: &[prop::sample::Index], len: usize) -> Vec<usize> {
    cuts.iter().map(|c| c.index(len + 1)).collect()
}

/// `body` cut at `at` (any order, repeats allowed) into consecutive parts.
fn split<'a>(body: &'a [u8], at: &[usize]) -> Vec<&'a [u8]> {
    let mut at = at.to_vec();
    at.sort_unstable();
    let mut parts = Vec::new();
    let mut from = 0;
    for &cut in &at {
        parts.push(&body[from..cut]);
        from = cut;
    }
    parts.push(&body[from..]);
    parts
}

// ---------------------------------------------------------------------------------------------
// Properties

/// Every property of the scanner on one body that holds whatever the body is.
fn robust(body: &[u8], max: usize, cuts: &[usize]) -> Result<Step, TestCaseError> {
    let whole = oracle::scan(body, max, &[]);
    let bytewise = oracle::scan_bytewise_early(body, max).map_err(TestCaseError::fail)?;
    prop_assert_eq!(&whole, &bytewise, "byte by byte");
    prop_assert_eq!(&whole, &oracle::scan(body, max, cuts), "cut at {:?}", cuts);
    oracle::check_offset(body, max, &whole).map_err(TestCaseError::fail)?;
    oracle::check(body, max, &whole).map_err(TestCaseError::fail)?;
    Ok(whole)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// On a valid document the scanner reads the `model` serde_json reads.
    #[test]
    fn scanner_reads_the_model_serde_json_reads(
        doc in doc(), style in style(), max in max_model_bytes(), cuts in cuts(),
    ) {
        let text = write(&doc, style);
        let body = text.as_bytes();
        // Our writer writes JSON: serde_json reads back the values we generated.
        let parsed: Value = serde_json::from_str(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        // (Strings only: serde_json's default float parsing is not exact to the last bit.)
        let last = doc.members.iter().rev().find(|(k, _)| k == "model").map(|(_, v)| v);
        prop_assert_eq!(
            parsed.get("model").and_then(Value::as_str),
            last.and_then(Value::as_str)
        );

        let got = robust(body, max, &positions(&cuts, body.len()))?;

        // And directly, without the oracle: a routable model is found as serde_json reads it.
        let models = doc.members.iter().filter(|(k, _)| k == "model").count();
        match parsed.get("model") {
            Some(Value::String(m))
                if models == 1
                    && !m.is_empty()
                    && m.len() <= max
                    && !m.chars().any(char::is_control) =>
            {
                prop_assert_eq!(got, Step::Found(m.clone()));
                // What it notes about streaming is serde_json's reading too (the last of a
                // repeated key), and the object's start is the first byte after whitespace.
                let mut scanner = ModelScanner::new(max);
                for part in split(body, &positions(&cuts, body.len())) {
                    scanner.feed(part);
                }
                prop_assert_eq!(scanner.finish(), Step::Found(m.clone()));
                let fields = scanner.stream_fields();
                prop_assert_eq!(fields.stream, parsed.get("stream") == Some(&Value::Bool(true)));
                prop_assert_eq!(fields.stream_options, parsed.get("stream_options").is_some());
                let start = fields.object_start as usize;
                prop_assert_eq!(body.get(start), Some(&b'{'));
                prop_assert!(body[..start].iter().all(u8::is_ascii_whitespace));
            }
            _ => prop_assert!(matches!(got, Step::Error(_)), "{:?}", got),
        }
    }

    /// Random bytes: no panic, the same end however fed, serde_json's reading.
    #[test]
    fn any_bytes(body in vec(any::<u8>(), 0..512), max in max_model_bytes(), cuts in cuts()) {
        robust(&body, max, &positions(&cuts, body.len()))?;
    }

    /// Sequences of JSON tokens, valid and broken: mostly near-JSON, where grammars differ.
    #[test]
    fn token_soup(body in soup(), max in max_model_bytes(), cuts in cuts()) {
        robust(&body, max, &positions(&cuts, body.len()))?;
    }

    /// Valid documents with a few bytes changed.
    #[test]
    fn mutated_documents(
        doc in doc(), style in style(), edits in vec(edit(), 1..4),
        max in max_model_bytes(), cuts in cuts(),
    ) {
        let mut body = write(&doc, style).into_bytes();
        for e in &edits {
            apply(&mut body, e);
        }
        robust(&body, max, &positions(&cuts, body.len()))?;
    }
}

// ---------------------------------------------------------------------------------------------
// multipart/form-data: the streaming scanner against a whole-body reading (the reference of
// the `multipart_scanner` fuzz target), on generated uploads with delimiter-like content.

fn form_part() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        3 => Just("model"),
        2 => prop::sample::select(vec!["file", "language", "Model", "model ", ""]),
    ];
    let header = prop_oneof![
        4 => name.clone().prop_map(|n| format!("Content-Disposition: form-data; name=\"{n}\"")),
        1 => name.clone().prop_map(|n| format!("content-disposition: Form-Data; name={n}")),
        1 => name.prop_map(|n| {
            format!("Content-Disposition: form-data; name=\"{n}\"; filename=\"a.wav\"\r\nContent-Type: audio/wav")
        }),
        1 => Just(String::new()),
    ];
    // Mostly plain text; now and then a piece that looks like (or is) a delimiter.
    let piece = prop_oneof![
        8 => prop::sample::select(vec![&b"qwen-sql-lora"[..], b"a", b" ", b"\xc3\xa9", b"-"]),
        2 => prop::sample::select(vec![&b"\r"[..], b"\n", b"--XyZ", b"\r\n--Xy", b"\r\n-"]),
        1 => prop::sample::select(vec![&b"\r\n--XyZQ"[..], b"\x00", b"\xff"]),
    ];
    let content = vec(piece, 0..12).prop_map(|pieces| pieces.concat());
    (header, content).prop_map(|(h, c)| {
        let mut part = h.into_bytes();
        part.extend_from_slice(b"\r\n\r\n");
        part.extend_from_slice(&c);
        part
    })
}

fn form() -> impl Strategy<Value = Vec<u8>> {
    let preamble = prop::sample::select(vec![&b""[..], b"preamble\r\n", b"\r\n"]);
    let padding = prop_oneof![
        8 => prop::sample::select(vec![&b""[..], b" ", b"\t "]),
        1 => Just(&b"x"[..]),
    ];
    let epilogue = prop::sample::select(vec![&b"\r\n"[..], b"", b"epilogue", b"-"]);
    (preamble, vec((padding, form_part()), 0..4), epilogue).prop_map(|(pre, parts, epi)| {
        let mut body = pre.to_vec();
        for (i, (pad, part)) in parts.iter().enumerate() {
            if i > 0 || !pre.is_empty() {
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"--XyZ");
            body.extend_from_slice(pad);
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(part);
        }
        body.extend_from_slice(b"\r\n--XyZ--");
        body.extend_from_slice(epi);
        body
    })
}

fn multipart_agrees(body: &[u8], max: usize, cuts: &[usize]) -> Result<(), TestCaseError> {
    let whole = multipart_ref::scan(body, "XyZ", max, &[]);
    prop_assert_eq!(
        &whole,
        &multipart_ref::scan(body, "XyZ", max, cuts),
        "cut at {:?}",
        cuts
    );
    let (bytewise, early) =
        multipart_ref::scan_bytewise_early(body, "XyZ", max).map_err(TestCaseError::fail)?;
    prop_assert_eq!(&whole, &bytewise, "byte by byte");
    let (want, want_early) = multipart_ref::reference_early(body, "XyZ", max);
    prop_assert!(
        multipart_ref::same(&whole, &want),
        "scanner {:?}, reference {:?}",
        whole,
        want
    );
    prop_assert_eq!(early, want_early, "early_model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Generated uploads, as they are and with a few bytes changed.
    #[test]
    fn multipart_scanner_agrees_with_the_whole_body_reading(
        body in form(), edits in vec(edit(), 0..3), max in max_model_bytes(), cuts in cuts(),
    ) {
        multipart_agrees(&body, max, &positions(&cuts, body.len()))?;
        let mut edited = body;
        for e in &edits {
            apply(&mut edited, e);
        }
        multipart_agrees(&edited, max, &positions(&cuts, edited.len()))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Linear work
//
// No timing assertions (machines are noisy). The argument is structural, from the code:
// `ModelScanner::run` walks each chunk once with an index that only grows, and every step of
// the loop consumes at least one byte. `byte` does O(1) work per byte (`store` appends at most
// 4 bytes, the container stack is a bitset); the one re-dispatch, the byte that ends a number,
// calls `byte` once more in a state that is never `Number`, so at most twice per byte. The fast
// paths (`skip::plain_string_prefix`, `skip::digit_run`) look at the bytes ahead once and the
// index moves past all of them, except when UTF-8 validation stops short: then the next byte is
// either invalid (an error, and errors are sticky: later `feed` calls return at once) or starts
// a character split by the chunk's end (at most 3 bytes looked at twice). `finish` copies the
// model, at most `maxModelNameBytes`. The multipart scanner handles each byte in O(1) but for
// its delimiter matcher, which re-reads a held partial match once (each byte enters and leaves
// the match once), and its header block is bounded (8 KiB). So n bytes cost O(n), however
// chunked.
//
// What a test can observe is that the inputs which would defeat that argument, if it were wrong
// (deep nesting, escape runs, lone surrogates, multi-byte UTF-8, number ends, key prefixes of
// `model`, whitespace, partial multipart delimiters), complete at a few MiB each, fed whole (the
// fast paths) and one byte per `feed` call. A quadratic path would take hours on them. The 60 s
// bound below is a gross hang detector, not a timing test: each input takes well under a second
// even unoptimized.

const HANG_BOUND: Duration = Duration::from_secs(60);

fn without_hang<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(HANG_BOUND) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            unreachable!("{what}: no result after {HANG_BOUND:?}: the scanner hangs")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("{what}: the scanner panicked"),
    }
}

/// About `size` bytes: `{` + `unit` repeated + `"model":"m"}`.
fn body_of(unit: &str, size: usize) -> Vec<u8> {
    let mut body = b"{".to_vec();
    while body.len() < size {
        body.extend_from_slice(unit.as_bytes());
    }
    body.extend_from_slice(br#""model":"m"}"#);
    body
}

const MIB: usize = 1024 * 1024;

#[test]
fn adversarial_inputs_complete_byte_by_byte() {
    let deep = format!("\"a\":{}1{},", "[".repeat(1023), "]".repeat(1023));
    let deep_objects = format!("\"a\":{}1{},", "{\"k\":".repeat(1023), "}".repeat(1023));
    let cases: Vec<(&'static str, Vec<u8>)> = vec![
        ("nesting 1024 deep, repeated", body_of(&deep, 4 * MIB)),
        ("nested objects, repeated", body_of(&deep_objects, 4 * MIB)),
        ("escape runs", {
            let mut b = b"{\"p\":\"".to_vec();
            b.extend("\\u0041\\n\\\"\\/\\ud83d\\ude00".repeat(MIB / 8).bytes());
            b.extend_from_slice(br#"","model":"m"}"#);
            b
        }),
        (
            "lone surrogates",
            body_of("\"\\ud800\\udbff\\udc00x\":\"\\udfff\\ud800\",", 4 * MIB),
        ),
        (
            "multi-byte UTF-8",
            body_of("\"é€😀\u{10ffff}\":\"中文ü\",", 4 * MIB),
        ),
        (
            "number ends",
            body_of("\"n\":[0,-0.5e+10,1E-3,12345678901234567890],", 4 * MIB),
        ),
        ("literals", body_of("\"l\":[true,false,null],", 4 * MIB)),
        (
            "keys that start like model",
            body_of("\"mode\":1,\"modell\":2,\"\\u006dode\":3,", 4 * MIB),
        ),
        ("whitespace", body_of(" \t\r\n", 4 * MIB)),
    ];
    for (what, body) in cases {
        let found = without_hang(what, move || {
            let bytewise = oracle::scan_bytewise(&body, 256);
            let whole = oracle::scan(&body, 256, &[]);
            (bytewise, whole)
        });
        assert_eq!(found.0, Step::Found("m".into()), "{what} (byte by byte)");
        assert_eq!(found.1, Step::Found("m".into()), "{what} (whole)");
    }
}

#[test]
fn adversarial_inputs_are_refused_at_once() {
    // 100 000 levels (the issue's case) and a 64 MiB model: the error comes at the byte that
    // decides it, and every later chunk returns it without work (sticky).
    let deep = format!("{{\"a\":{}", "[".repeat(100_000));
    let step = without_hang("100 000 levels", move || {
        oracle::scan_bytewise(deep.as_bytes(), 256)
    });
    assert!(
        matches!(
            step,
            Step::Error(bbr_wasm::core::ScanError::TooDeep { offset: 1028 })
        ),
        "{step:?}"
    );
    let huge = format!("{{\"model\":\"{}\"}}", "a".repeat(64 * MIB));
    let step = without_hang("64 MiB model", move || {
        oracle::scan(huge.as_bytes(), 256, &[])
    });
    assert_eq!(
        step,
        Step::Error(bbr_wasm::core::ScanError::ModelTooLong { limit: 256 })
    );
}

#[test]
fn adversarial_multipart_completes_byte_by_byte() {
    // File content full of partial delimiters (`\r\n--Xy`, `\r\r`, `\r\n-`) and CRs.
    let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n".to_vec();
    while body.len() < 4 * MIB {
        body.extend_from_slice(b"\r\n--Xy\r\r\n-\r\n--\r\n--XyQ\r");
    }
    body.extend_from_slice(
        b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--XyZ--\r\n",
    );
    let step = without_hang("partial multipart delimiters", move || {
        let mut scanner = MultipartScanner::new("XyZ", 256);
        for b in body.chunks(1) {
            if let err @ Step::Error(_) = scanner.feed(b) {
                return err;
            }
        }
        scanner.finish()
    });
    assert_eq!(step, Step::Found("m".into()));
}

#[test]
fn oracle_reads_what_it_claims() {
    // The oracle's own reading, on the cases where serde_json's policy differs from RFC 8259.
    use oracle::{read, ModelValue, Reading};
    let object = |first: Option<ModelValue>, keys, depth| Reading::Object {
        first_model: first,
        model_keys: keys,
        depth,
    };
    let s = |m: &[u8]| Some(ModelValue::Str(m.to_vec()));
    let cases: Vec<(&[u8], Reading)> = vec![
        (br#"{"model":"m"}"#, object(s(b"m"), 1, 1)),
        (br#"{"\u006dodel":"Qwen\/Q"}"#, object(s(b"Qwen/Q"), 1, 1)),
        (
            br#"{"model":"\ud800","model":1}"#,
            object(s(b"\xed\xa0\x80"), 2, 1),
        ),
        (br#"{"x":"\udc00","model\ud800":1}"#, object(None, 0, 1)),
        (
            br#"{"model":1e400}"#,
            object(Some(ModelValue::NotString("a number")), 1, 1),
        ),
        (
            br#"{"model":-0}"#,
            object(Some(ModelValue::NotString("a number")), 1, 1),
        ),
        (
            br#"{"model":null}"#,
            object(Some(ModelValue::NotString("null")), 1, 1),
        ),
        (
            br#"{"model":false}"#,
            object(Some(ModelValue::NotString("a boolean")), 1, 1),
        ),
        (
            br#"{"model":[]}"#,
            object(Some(ModelValue::NotString("an array")), 1, 2),
        ),
        (
            br#"{"model":{}}"#,
            object(Some(ModelValue::NotString("an object")), 1, 2),
        ),
        (br#"[1]"#, Reading::NotAnObject),
    ];
    for (body, want) in cases {
        assert_eq!(read(body), Ok(want), "{}", String::from_utf8_lossy(body));
    }
    // No depth limit in serde_json's reading here (its default stops at 128).
    let deep = format!(
        "{{\"a\":{}{},\"model\":\"m\"}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    assert_eq!(read(deep.as_bytes()), Ok(object(s(b"m"), 1, 5001)));
    assert!(matches!(
        read(b"{\"model\":\"m\"} x"),
        Ok(Reading::Invalid(_))
    ));
    assert!(matches!(read(b"\xef\xbb\xbf{}"), Ok(Reading::Invalid(_))));
}

// ---------------------------------------------------------------------------------------------
// The body-class corpus (bench/corpus.py, `make corpus`): real text in eight languages, emoji,
// tool use, code, a base64 image, a long conversation, \u-escaped Russian. Each 1 MiB body is
// read whole and in random chunks and agrees with serde_json; then with single bytes changed
// (to quotes, backslashes, control bytes, invalid UTF-8, escape letters) at random places,
// where the new string judge (vector::string_blocks) must refuse exactly what serde_json
// refuses, at the exact byte. The 4 KiB seeds of each class are also fed byte by byte.

/// The corpus folder: BBR_CORPUS, or target/corpus. `make test-native` builds it first.
fn corpus_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("BBR_CORPUS").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/corpus"),
        std::path::PathBuf::from,
    );
    assert!(
        dir.join("manifest.json").is_file(),
        "no body-class corpus in {}: run `make corpus` (make test-native does)",
        dir.display()
    );
    dir
}

fn corpus_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| unreachable!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json") && !p.ends_with("manifest.json"))
        .map(|p| {
            let body = std::fs::read(&p).unwrap_or_else(|e| unreachable!("{}: {e}", p.display()));
            (p.display().to_string(), body)
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 13,
        "{}: only {} bodies",
        dir.display(),
        files.len()
    );
    files
}

#[test]
fn corpus_bodies_agree_with_serde_json() {
    let dir = corpus_dir();
    let mut rng = 0x5DEE_CE66_D1CE_4E5Bu64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng as usize
    };
    for (name, body) in corpus_files(&dir) {
        let whole = oracle::scan(&body, 256, &[]);
        assert_eq!(
            whole,
            Step::Found("Qwen/Qwen2.5-3B-Instruct".into()),
            "{name}"
        );
        oracle::check(&body, 256, &whole).unwrap_or_else(|e| unreachable!("{name}: {e}"));
        let cuts: Vec<usize> = (0..64).map(|_| next() % body.len()).collect();
        assert_eq!(
            oracle::scan(&body, 256, &cuts),
            whole,
            "{name} cut at {cuts:?}"
        );
    }
    // The seeds (4 KiB of each class): byte by byte, then with bytes changed.
    for (name, body) in corpus_files(&dir.join("seeds")) {
        let whole = oracle::scan(&body, 256, &[]);
        let bytewise =
            oracle::scan_bytewise_early(&body, 256).unwrap_or_else(|e| unreachable!("{name}: {e}"));
        assert_eq!(whole, bytewise, "{name}: byte by byte");
        oracle::check(&body, 256, &whole).unwrap_or_else(|e| unreachable!("{name}: {e}"));
        for _ in 0..300 {
            let mut bad = body.clone();
            let mut edits = Vec::new();
            for _ in 0..1 + next() % 3 {
                let at = next() % bad.len();
                let byte = [
                    b'"', b'\\', 0x00, 0x1F, 0x80, 0xC3, 0xE4, 0xF0, 0xFF, b'u', b'x', b'n',
                ][next() % 12];
                bad[at] = byte;
                edits.push((at, byte));
            }
            let got = oracle::scan(&bad, 256, &[]);
            let cuts: Vec<usize> = (0..8).map(|_| next() % bad.len()).collect();
            assert_eq!(
                oracle::scan(&bad, 256, &cuts),
                got,
                "{name}: {edits:x?}, cut"
            );
            oracle::check(&bad, 256, &got)
                .unwrap_or_else(|e| unreachable!("{name}: {edits:x?}: {e}"));
            oracle::check_offset(&bad, 256, &got)
                .unwrap_or_else(|e| unreachable!("{name}: {edits:x?}: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The response scanner (core::usage): its whole-token fast paths (keys, digit runs, literals,
// line ends found by vector search) must read exactly what the byte-at-a-time path reads. A
// chunk boundary decides which of the two takes a token, so the outcome (and the first
// token's position) must not depend on where the response is cut.

const RESPONSE_SEEDS: [(&str, bool); 3] = [
    (
        concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"\",\"role\":\"assistant\"},\"finish_reason\":null,\"index\":0,\"logprobs\":null}],\"created\":1796603484,\"id\":\"chatcmpl-1\",\"model\":\"m\",\"object\":\"chat.completion.chunk\"}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\" tok1\"},\"finish_reason\":null,\"index\":0,\"logprobs\":null,\"stop_reason\":null}],\"created\":1796603484,\"id\":\"chatcmpl-1\",\"model\":\"m\",\"object\":\"chat.completion.chunk\"}\n\n",
            "data: {\"choices\":[],\"usage\":{\"completion_tokens\":300,\"prompt_tokens\":4,\"prompt_tokens_details\":{\"cached_tokens\":2},\"total_tokens\":304}}\r\n\r\n",
            "data: [DONE]\n\n",
        ),
        true,
    ),
    (
        "{\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"logprobs\":null,\"message\":{\"content\":\"tok0 tok1 \\u263a\",\"role\":\"assistant\"}}],\"created\":1796603484,\"usage\":{\"completion_tokens\":64,\"prompt_tokens\":4,\"prompt_tokens_details\":null,\"total_tokens\":68},\"ok\":true,\"x\":false,\"n\":-1.5e3}",
        false,
    ),
    (
        "data: {\"choices\":[{\"index\":0,\"text\":\"a\",\"logprobs\":null}],\"a_key_longer_than_twenty_four_bytes\":[true,false,null,12345678901234567890123]}\n\ndata: {\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":1}}\n\n",
        true,
    ),
];

fn usage_scan(framing: Framing, body: &[u8], cuts: &[usize]) -> (Outcome, Option<usize>) {
    let mut bounds: Vec<usize> = cuts.to_vec();
    bounds.push(0);
    bounds.push(body.len());
    bounds.sort_unstable();
    bounds.dedup();
    let mut scanner = ResponseScanner::new(framing, u64::MAX);
    let mut first = None;
    for w in bounds.windows(2) {
        if scanner.feed(&body[w[0]..w[1]]) && first.is_none() {
            first = Some(w[1]);
        }
    }
    (scanner.finish(true), first)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Streams and JSON answers, as they are and with a few bytes changed: the same outcome
    /// whole, cut anywhere and byte by byte; the first token found in the same byte.
    #[test]
    fn response_scanner_reads_the_same_wherever_the_response_is_cut(
        seed in 0..RESPONSE_SEEDS.len(), edits in vec(edit(), 0..3), cuts in cuts(),
    ) {
        let (text, sse) = RESPONSE_SEEDS[seed];
        let framing = if sse { Framing::Sse } else { Framing::Json };
        let mut body = text.as_bytes().to_vec();
        for e in &edits {
            apply(&mut body, e);
        }
        let every: Vec<usize> = (1..body.len()).collect();
        let (whole, _) = usage_scan(framing, &body, &[]);
        let (bytewise, first_byte) = usage_scan(framing, &body, &every);
        let (cut, first_cut) = usage_scan(framing, &body, &positions(&cuts, body.len()));
        prop_assert_eq!(whole, bytewise, "byte by byte: {:?}", String::from_utf8_lossy(&body));
        prop_assert_eq!(whole, cut, "cut at {:?}", cuts);
        // Byte by byte pins the first token's last byte; any cut reports it in the chunk
        // that holds that byte.
        if let Some(at) = first_byte {
            let at = at - 1;
            let chunk_end = first_cut.unwrap_or(usize::MAX);
            let bounds = positions(&cuts, body.len());
            let start = bounds.iter().copied().filter(|&b| b <= at).max().unwrap_or(0);
            prop_assert!(chunk_end > at && bounds.iter().all(|&b| b <= start || b >= chunk_end),
                "first token at byte {} but reported at {:?} (cuts {:?})", at, first_cut, bounds);
        } else {
            prop_assert_eq!(first_cut, None);
        }
        if edits.is_empty() {
            prop_assert!(matches!(whole, Outcome::Counted(_)), "seed {} unread: {:?}", seed, whole);
        }
    }
}
