//! A push-style, allocation-bounded JSON scanner that finds the top-level `model` string.
//!
//! The body of an inference request arrives in chunks (HTTP/1.1 chunked encoding, HTTP/2
//! DATA frames, TCP segments). [`ModelScanner::feed`] takes each chunk once, in order, and
//! never needs to see earlier bytes again, so the adapter reads only the new bytes of every
//! body callback. Incomplete input is [`Step::NeedMore`], never an error.
//!
//! The scanner validates the whole document (RFC 8259 grammar and UTF-8 inside strings), not
//! just the prefix up to `model`: a request whose routing key and whose body the backend parses
//! could disagree must not be routed. Two top-level `model` keys are refused for the same reason.
//!
//! Memory is fixed: the container stack is a bitset of [`MAX_DEPTH`] bits, top-level keys are
//! compared as they are decoded, and only the `model` value is kept, up to the configured limit.
//! Beside `model` the scanner notes two top-level facts about streaming ([`StreamFields`]): is
//! `stream` the literal `true`, and is there a `stream_options` member.

use super::skip::{digit_run, plain_string_prefix, utf8_lead, whitespace_run};
use super::vector::{short_string_end, string_blocks};
use std::fmt;

/// Deepest nesting accepted. Deeper documents are refused as invalid JSON: no backend parser
/// accepts them either (Python's json stops near 1000, serde_json at 128), and a fixed bound
/// keeps the scanner's memory constant.
pub const MAX_DEPTH: usize = 1024;

/// Which of [`TOP_KEYS`] a top-level key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopKey {
    Model,
    Stream,
    StreamOptions,
}

/// The top-level keys whose values matter, compared after unescaping.
const TOP_KEYS: [(TopKey, &[u8]); 3] = [
    (TopKey::Model, b"model"),
    (TopKey::Stream, b"stream"),
    (TopKey::StreamOptions, b"stream_options"),
];

/// What a complete, valid body says about streaming, read with `model` in the same pass. A
/// repeated key counts as its last occurrence, as Python's `json` (vLLM's, llama.cpp's own
/// parser likewise) reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamFields {
    /// The top-level `stream` is the literal `true`.
    pub stream: bool,
    /// The top-level object has a `stream_options` member (whatever its value, `null` too).
    pub stream_options: bool,
    /// The offset of the top-level object's `{` (after any leading whitespace).
    pub object_start: u64,
}

/// What the scanner needs or has found after a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The document is not finished and nothing is wrong so far.
    NeedMore,
    /// The document is complete and valid, and its top-level `model` is this string.
    Found(String),
    /// The request must be refused; no further input can change that.
    Error(ScanError),
}

impl From<Result<String, ScanError>> for Step {
    fn from(result: Result<String, ScanError>) -> Step {
        match result {
            Ok(model) => Step::Found(model),
            Err(err) => Step::Error(err),
        }
    }
}

/// The byte a one-character JSON escape (`\n`, `\"`, ...) stands for; `None` for `u`, which
/// starts a `\uXXXX`, and for anything RFC 8259 does not allow after a backslash. Shared with
/// the prefix capture (`core::affinity::prefix`), which decodes the same strings.
pub(crate) fn escaped_byte(b: u8) -> Option<u8> {
    Some(match b {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'b' => 0x08,
        b'f' => 0x0C,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        _ => return None,
    })
}

/// The value of one hex digit of a `\uXXXX` escape.
pub(crate) fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The code point of a UTF-16 surrogate pair (`high` in D800-DBFF, `low` in DC00-DFFF).
pub(crate) fn surrogate_pair(high: u16, low: u16) -> u32 {
    0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(low) - 0xDC00)
}

/// Records an error step in `failed`, so that every later call returns it again.
pub(crate) fn remember(failed: &mut Option<ScanError>, step: Step) -> Step {
    if let Step::Error(err) = &step {
        *failed = Some(err.clone());
    }
    step
}

/// The rules a complete `model` value obeys, whichever body it came from (JSON string or
/// form field): valid UTF-8, not empty, no control characters.
pub(crate) fn model_value(bytes: &[u8]) -> Result<String, ScanError> {
    let model = String::from_utf8(bytes.to_vec()).map_err(|_| ScanError::ModelInvalidUnicode)?;
    if model.is_empty() {
        return Err(ScanError::ModelEmpty);
    }
    if model.chars().any(char::is_control) {
        return Err(ScanError::ModelControlCharacter);
    }
    Ok(model)
}

/// Why a body cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    /// Not JSON at all, or broken JSON. `offset` is the byte offset of the first bad byte.
    InvalidJson { offset: u64, reason: &'static str },
    /// Valid JSON whose top level is not an object.
    NotAnObject,
    /// A `multipart/form-data` body that does not follow its own boundary.
    InvalidMultipart { offset: u64, reason: &'static str },
    /// Nesting deeper than [`MAX_DEPTH`].
    TooDeep { offset: u64 },
    /// The object has no top-level `model`.
    MissingModel,
    /// `model` is present but not a string; the kind of value it is.
    ModelNotString { kind: &'static str },
    /// `model` is the empty string.
    ModelEmpty,
    /// `model` contains a control character (after unescaping).
    ModelControlCharacter,
    /// `model` contains an escaped lone UTF-16 surrogate, so it is no valid string.
    ModelInvalidUnicode,
    /// `model` is longer than the configured limit (bytes after unescaping).
    ModelTooLong { limit: usize },
    /// Two top-level `model` keys.
    DuplicateModel,
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::InvalidJson { offset, reason } => {
                write!(f, "invalid JSON at byte {offset}: {reason}")
            }
            ScanError::NotAnObject => f.write_str("the JSON body must be an object"),
            ScanError::InvalidMultipart { offset, reason } => {
                write!(
                    f,
                    "invalid multipart/form-data body at byte {offset}: {reason}"
                )
            }
            ScanError::TooDeep { offset } => {
                write!(
                    f,
                    "JSON nesting deeper than {MAX_DEPTH} levels at byte {offset}"
                )
            }
            ScanError::MissingModel => f.write_str("you must provide a model parameter"),
            ScanError::ModelNotString { kind } => {
                write!(f, "'model' must be a string, not {kind}")
            }
            ScanError::ModelEmpty => f.write_str("'model' must not be empty"),
            ScanError::ModelControlCharacter => {
                f.write_str("'model' must not contain control characters")
            }
            ScanError::ModelInvalidUnicode => {
                f.write_str("'model' contains an unpaired UTF-16 surrogate escape")
            }
            ScanError::ModelTooLong { limit } => {
                write!(f, "'model' is longer than {limit} bytes")
            }
            ScanError::DuplicateModel => {
                f.write_str("'model' appears more than once at the top level of the body")
            }
        }
    }
}

/// Where the grammar stands between two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the top-level value (only whitespace so far).
    DocumentStart,
    /// A value must come next (after `:` or `,` in an array).
    Value,
    /// Just after `[`: a value or `]`.
    ArrayFirst,
    /// Just after `{`: a key or `}`.
    ObjectFirst,
    /// After `,` inside an object: a key.
    ObjectKey,
    /// After a key: `:`.
    Colon,
    /// After a complete value: `,` or the closing bracket of the current container.
    AfterValue,
    /// Inside a string.
    Str,
    /// Just after a backslash inside a string.
    Escape,
    /// Inside `\uXXXX`, `digits` hex digits read so far.
    Unicode { digits: u8, value: u16 },
    /// Inside a multi-byte UTF-8 sequence: bytes still expected and the range of the next one.
    Utf8 { remaining: u8, lo: u8, hi: u8 },
    /// Inside a number.
    Number(NumberPart),
    /// Inside `true`, `false` or `null`: the literal and how many bytes matched.
    Literal { word: &'static [u8], matched: u8 },
    /// After the top-level value: only whitespace may follow.
    End,
}

/// The parts of the JSON number grammar `-? int frac? exp?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumberPart {
    /// After `-`.
    Minus,
    /// After a leading `0`.
    Zero,
    /// In the integer digits (after 1-9).
    Int,
    /// After `.`.
    Dot,
    /// In the fraction digits.
    Frac,
    /// After `e` or `E`.
    Exp,
    /// After the exponent sign.
    ExpSign,
    /// In the exponent digits.
    ExpDigits,
}

impl NumberPart {
    /// A number may end here.
    fn is_complete(self) -> bool {
        matches!(
            self,
            NumberPart::Zero | NumberPart::Int | NumberPart::Frac | NumberPart::ExpDigits
        )
    }
}

/// What the string being read is to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrRole {
    /// Any string we only validate.
    Skip,
    /// A key of the top-level object: decoded into `key` to compare with [`TOP_KEYS`].
    TopKey,
    /// The value of the top-level `model`: decoded into `model`.
    Model,
}

/// The streaming scanner. One per request.
#[derive(Debug, Clone)]
pub struct ModelScanner {
    state: State,
    /// Container stack as bits: 1 = object, 0 = array. `depth` entries are live.
    stack: [u64; MAX_DEPTH / 64],
    depth: usize,
    /// Bytes consumed so far, for error offsets.
    offset: u64,
    role: StrRole,
    /// The string being read is an object key (so a `:` follows it).
    string_is_key: bool,
    /// A pending high surrogate from a `\uD800`-`\uDBFF` escape in a decoded string.
    high_surrogate: Option<u16>,
    /// The decoded top-level key, while it can still be one of [`TOP_KEYS`] (`None` once it
    /// cannot).
    key: Option<KeyBuf>,
    /// The next top-level value belongs to a `model` key.
    value_is_model: bool,
    /// The next top-level value belongs to a `stream` key.
    value_is_stream: bool,
    stream: StreamFields,
    model_seen: bool,
    /// The `model` string has been read to its closing quote.
    model_complete: bool,
    model: Vec<u8>,
    max_model_bytes: usize,
    /// The model string held an escaped lone surrogate.
    model_bad_unicode: bool,
    /// Set once an error is returned; every later call returns it again.
    failed: Option<ScanError>,
}

/// A top-level key as far as it is decoded: its length, and which of [`TOP_KEYS`] it still
/// matches (bit `k` for `TOP_KEYS[k]`). Nothing else is kept.
#[derive(Debug, Clone, Copy)]
struct KeyBuf {
    len: u8,
    live: u8,
}

impl KeyBuf {
    fn new() -> Self {
        KeyBuf {
            len: 0,
            live: (1 << TOP_KEYS.len()) - 1,
        }
    }

    /// Appends a decoded byte; `None` once the key can be none of [`TOP_KEYS`].
    fn push(mut self, b: u8) -> Option<Self> {
        let i = usize::from(self.len);
        for (k, (_, key)) in TOP_KEYS.iter().enumerate() {
            if key.get(i) != Some(&b) {
                self.live &= !(1 << k);
            }
        }
        if self.live == 0 {
            return None;
        }
        self.len += 1;
        Some(self)
    }

    /// The key, when it is whole one of [`TOP_KEYS`].
    fn matched(&self) -> Option<TopKey> {
        TOP_KEYS
            .iter()
            .enumerate()
            .find(|(k, (_, key))| self.live & (1 << k) != 0 && key.len() == usize::from(self.len))
            .map(|(_, (top, _))| *top)
    }
}

/// Result of handling one byte in the slow path.
type ByteResult = Result<(), ScanError>;

/// The length, both quotes included, of the string that opens at `bytes[0]` when it is short
/// and plain ([`short_string_end`]).
#[inline(always)]
fn short_plain_string(bytes: &[u8]) -> Option<usize> {
    short_string_end(bytes.get(1..)?).map(|end| end + 2)
}

impl ModelScanner {
    /// A scanner that accepts model strings of up to `max_model_bytes` bytes after unescaping.
    pub fn new(max_model_bytes: usize) -> Self {
        ModelScanner {
            state: State::DocumentStart,
            stack: [0; MAX_DEPTH / 64],
            depth: 0,
            offset: 0,
            role: StrRole::Skip,
            string_is_key: false,
            high_surrogate: None,
            key: None,
            value_is_model: false,
            value_is_stream: false,
            stream: StreamFields::default(),
            model_seen: false,
            model_complete: false,
            model: Vec::new(),
            max_model_bytes,
            model_bad_unicode: false,
            failed: None,
        }
    }

    /// Feeds the next chunk of the body. Returns [`Step::NeedMore`] while the document is
    /// incomplete and valid so far, or [`Step::Error`] as soon as the request is known to be bad.
    pub fn feed(&mut self, chunk: &[u8]) -> Step {
        if let Some(err) = &self.failed {
            return Step::Error(err.clone());
        }
        let step = match self.run(chunk) {
            Ok(()) => Step::NeedMore,
            Err(err) => Step::Error(err),
        };
        remember(&mut self.failed, step)
    }

    /// Ends the body. Returns [`Step::Found`] or [`Step::Error`], never [`Step::NeedMore`].
    pub fn finish(&mut self) -> Step {
        if let Some(err) = &self.failed {
            return Step::Error(err.clone());
        }
        let result = match self.state {
            State::End => self.verdict(),
            State::DocumentStart => Err(self.invalid("empty body")),
            _ => Err(self.invalid("unexpected end of body")),
        };
        remember(&mut self.failed, result.into())
    }

    /// The verdict on the `model` value as soon as it has been read whole, before the rest of
    /// the body: for `routeBeforeBodyEnds`, which gives up the checks that need the whole body
    /// (a second `model`, broken JSON after it). `None` while the value is incomplete.
    pub fn early_model(&self) -> Option<Step> {
        if self.failed.is_some() || !self.model_complete {
            return None;
        }
        Some(self.verdict().into())
    }

    /// What the body says about streaming. Complete once [`ModelScanner::finish`] has found the
    /// model (a member after the last one read is not in it before then).
    pub fn stream_fields(&self) -> StreamFields {
        self.stream
    }

    /// The verdict once the document is complete.
    fn verdict(&self) -> Result<String, ScanError> {
        if !self.model_seen {
            return Err(ScanError::MissingModel);
        }
        // The model string is complete here, so the checks that could not be made while it
        // was still arriving are made now.
        if self.model_bad_unicode {
            return Err(ScanError::ModelInvalidUnicode);
        }
        model_value(&self.model)
    }

    fn invalid(&self, reason: &'static str) -> ScanError {
        ScanError::InvalidJson {
            offset: self.offset,
            reason,
        }
    }

    fn in_object(&self) -> bool {
        if self.depth == 0 {
            return false;
        }
        let i = self.depth - 1;
        self.stack[i / 64] & (1u64 << (i % 64)) != 0
    }

    fn push(&mut self, object: bool) -> ByteResult {
        if self.depth >= MAX_DEPTH {
            return Err(ScanError::TooDeep {
                offset: self.offset,
            });
        }
        let i = self.depth;
        if object {
            self.stack[i / 64] |= 1u64 << (i % 64);
        } else {
            self.stack[i / 64] &= !(1u64 << (i % 64));
        }
        self.depth += 1;
        Ok(())
    }

    /// The whole scanning loop over one chunk.
    fn run(&mut self, chunk: &[u8]) -> ByteResult {
        let mut i = 0;
        while i < chunk.len() {
            // Fast paths for the runs that make up most of a body. Each stops before any
            // byte the state machine must see, so the machine stays the only judge.
            let skipped = match self.state {
                // The content of a string we only validate (prompt text, tool results, code):
                // whole 64-byte blocks first, then the byte-wise fast path for what is left
                // near the end of the chunk or in front of a byte the state machine must see.
                // This is where string content is consumed: `rest[..skipped]` here, the
                // bytes `string_byte`, `escape` and the Utf8 state take one at a time, and the
                // short keys and values `structure` takes whole. (The prefix capture,
                // `core::affinity::prefix`, reads the prompt with its own pass for that reason.)
                State::Str if self.role == StrRole::Skip => {
                    let rest = &chunk[i..];
                    let blocks = string_blocks(rest);
                    // Stopped at the closing quote (a key, a role, the end of a message): the
                    // state machine's, no byte-wise pass needed.
                    if rest.get(blocks) == Some(&b'"') {
                        blocks
                    } else {
                        blocks + plain_string_prefix(&rest[blocks..])
                    }
                }
                // Between tokens below the top level: whitespace, commas, colons and short
                // keys and values (`"role": "user", "content": "`), without the state machine.
                State::AfterValue
                | State::ObjectKey
                | State::ObjectFirst
                | State::Colon
                | State::Value
                | State::ArrayFirst => self.structure(&chunk[i..]),
                State::Number(NumberPart::Int | NumberPart::Frac | NumberPart::ExpDigits) => {
                    digit_run(&chunk[i..])
                }
                _ => 0,
            };
            if skipped > 0 {
                i += skipped;
                self.offset += skipped as u64;
                if i == chunk.len() {
                    break;
                }
            }
            let b = chunk[i];
            self.byte(b)?;
            self.offset += 1;
            i += 1;
        }
        Ok(())
    }

    /// Consumes what lies between the values a message is made of, below the top level:
    /// whitespace, `,` and `:`, and keys and string values of printable ASCII that close within
    /// 16 bytes (`"role"`, `"user"`, `"content"`, `"type"`, `"text"`). The state moves as
    /// `byte` would move it; anything else (a bracket, a number, a longer or escaped string,
    /// an error) is left to the state machine. A chat body has a few dozen such bytes per
    /// message, which one byte at a time cost a quarter of the scan of short messages (make
    /// bench-scan, emoji and tool-use classes).
    #[inline]
    fn structure(&mut self, bytes: &[u8]) -> usize {
        // The top level has `model` to find, and a value after `"model":` is judged.
        if self.depth < 2 || self.value_is_model {
            return whitespace_run(bytes);
        }
        let mut i = 0;
        loop {
            i += whitespace_run(&bytes[i..]);
            let Some(&b) = bytes.get(i) else {
                return i;
            };
            match (self.state, b) {
                (State::AfterValue, b',') => {
                    self.state = if self.in_object() {
                        State::ObjectKey
                    } else {
                        State::Value
                    };
                    i += 1;
                }
                (State::Colon, b':') => {
                    self.state = State::Value;
                    i += 1;
                }
                (State::ObjectKey | State::ObjectFirst, b'"') => {
                    match short_plain_string(&bytes[i..]) {
                        Some(n) => {
                            self.state = State::Colon;
                            i += n;
                        }
                        None => return i,
                    }
                }
                (State::Value | State::ArrayFirst, b'"') => match short_plain_string(&bytes[i..]) {
                    Some(n) => {
                        self.state = State::AfterValue;
                        i += n;
                    }
                    None => return i,
                },
                _ => return i,
            }
        }
    }

    /// Handles one byte.
    #[inline(always)]
    fn byte(&mut self, b: u8) -> ByteResult {
        match self.state {
            State::DocumentStart => match b {
                b' ' | b'\t' | b'\n' | b'\r' => Ok(()),
                b'{' => {
                    self.stream.object_start = self.offset;
                    self.push(true)?;
                    self.state = State::ObjectFirst;
                    Ok(())
                }
                // Any other valid start is valid JSON but no request; broken input is reported
                // as what it is.
                b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                    Err(ScanError::NotAnObject)
                }
                0xEF => Err(self.invalid("byte order mark before the JSON text")),
                _ => Err(self.invalid("expected a JSON object")),
            },
            State::Value | State::ArrayFirst => self.value_start(b),
            State::ObjectFirst | State::ObjectKey => match b {
                b' ' | b'\t' | b'\n' | b'\r' => Ok(()),
                b'"' => {
                    self.begin_string(true);
                    Ok(())
                }
                b'}' if self.state == State::ObjectFirst => self.close(),
                _ => Err(self.invalid("expected a string key")),
            },
            State::Colon => match b {
                b' ' | b'\t' | b'\n' | b'\r' => Ok(()),
                b':' => {
                    self.state = State::Value;
                    Ok(())
                }
                _ => Err(self.invalid("expected ':' after a key")),
            },
            State::AfterValue => self.after_value(b),
            State::Str => self.string_byte(b),
            State::Escape => self.escape(b),
            State::Unicode { digits, value } => self.unicode_digit(b, digits, value),
            State::Utf8 { remaining, lo, hi } => {
                if b < lo || b > hi {
                    return Err(self.invalid("invalid UTF-8 in a string"));
                }
                self.store(b)?;
                self.state = if remaining == 1 {
                    State::Str
                } else {
                    State::Utf8 {
                        remaining: remaining - 1,
                        lo: 0x80,
                        hi: 0xBF,
                    }
                };
                Ok(())
            }
            State::Number(part) => self.number(b, part),
            State::Literal { word, matched } => {
                let m = usize::from(matched);
                if word.get(m) != Some(&b) {
                    return Err(self.invalid("invalid literal"));
                }
                if m + 1 == word.len() {
                    self.value_done();
                } else {
                    self.state = State::Literal {
                        word,
                        matched: matched + 1,
                    };
                }
                Ok(())
            }
            State::End => match b {
                b' ' | b'\t' | b'\n' | b'\r' => Ok(()),
                _ => Err(self.invalid("trailing data after the JSON object")),
            },
        }
    }

    /// The first byte of a value (or `]` right after `[`).
    fn value_start(&mut self, b: u8) -> ByteResult {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => return Ok(()),
            b']' if self.state == State::ArrayFirst => return self.close(),
            _ => {}
        }
        // Is this the value of the top-level `model` key?
        let is_model = self.value_is_model;
        self.value_is_model = false;
        if self.value_is_stream {
            self.value_is_stream = false;
            // The scanner validates the literal that `t` begins: it can only be `true`.
            self.stream.stream = b == b't';
        }
        if is_model && b != b'"' {
            let kind = match b {
                b'{' => "an object",
                b'[' => "an array",
                b'-' | b'0'..=b'9' => "a number",
                b't' | b'f' => "a boolean",
                b'n' => "null",
                _ => return Err(self.invalid("expected a value")),
            };
            return Err(ScanError::ModelNotString { kind });
        }
        match b {
            b'"' => {
                self.role = if is_model {
                    StrRole::Model
                } else {
                    StrRole::Skip
                };
                self.string_is_key = false;
                self.high_surrogate = None;
                self.state = State::Str;
                Ok(())
            }
            b'{' => {
                self.push(true)?;
                self.state = State::ObjectFirst;
                Ok(())
            }
            b'[' => {
                self.push(false)?;
                self.state = State::ArrayFirst;
                Ok(())
            }
            b'-' => {
                self.state = State::Number(NumberPart::Minus);
                Ok(())
            }
            b'0' => {
                self.state = State::Number(NumberPart::Zero);
                Ok(())
            }
            b'1'..=b'9' => {
                self.state = State::Number(NumberPart::Int);
                Ok(())
            }
            b't' => {
                self.state = State::Literal {
                    word: b"true",
                    matched: 1,
                };
                Ok(())
            }
            b'f' => {
                self.state = State::Literal {
                    word: b"false",
                    matched: 1,
                };
                Ok(())
            }
            b'n' => {
                self.state = State::Literal {
                    word: b"null",
                    matched: 1,
                };
                Ok(())
            }
            _ => Err(self.invalid("expected a value")),
        }
    }

    /// Starts a string in key position.
    fn begin_string(&mut self, is_key: bool) {
        let top_key = is_key && self.depth == 1;
        self.role = if top_key {
            StrRole::TopKey
        } else {
            StrRole::Skip
        };
        self.key = if top_key { Some(KeyBuf::new()) } else { None };
        self.string_is_key = is_key;
        self.high_surrogate = None;
        self.state = State::Str;
    }

    /// After a complete value: what the enclosing container allows next.
    fn value_done(&mut self) {
        self.state = if self.depth == 0 {
            State::End
        } else {
            State::AfterValue
        };
    }

    fn after_value(&mut self, b: u8) -> ByteResult {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => Ok(()),
            b',' => {
                self.state = if self.in_object() {
                    State::ObjectKey
                } else {
                    State::Value
                };
                Ok(())
            }
            b'}' if self.in_object() => self.close(),
            b']' if !self.in_object() => self.close(),
            _ => Err(self.invalid("expected ',' or a closing bracket")),
        }
    }

    /// Closes the current container; the caller has checked the bracket matches it.
    fn close(&mut self) -> ByteResult {
        self.depth -= 1;
        self.value_done();
        Ok(())
    }

    fn string_byte(&mut self, b: u8) -> ByteResult {
        match b {
            b'"' => {
                if self.high_surrogate.take().is_some() {
                    self.lone_surrogate()?;
                }
                self.end_string()
            }
            b'\\' => {
                self.state = State::Escape;
                Ok(())
            }
            0x00..=0x1F => Err(self.invalid("unescaped control character in a string")),
            0x20..=0x7F => {
                self.plain_char()?;
                self.store(b)
            }
            _ => {
                self.plain_char()?;
                let Some((remaining, lo, hi)) = utf8_lead(b) else {
                    return Err(self.invalid("invalid UTF-8 in a string"));
                };
                self.store(b)?;
                self.state = State::Utf8 { remaining, lo, hi };
                Ok(())
            }
        }
    }

    /// A literal character follows: a pending high surrogate is unpaired.
    fn plain_char(&mut self) -> ByteResult {
        if self.high_surrogate.take().is_some() {
            self.lone_surrogate()?;
        }
        Ok(())
    }

    /// An escaped surrogate without its partner. JSON's grammar allows it, so only the strings
    /// we decode care: such a key is not `model`, and such a model is refused at the end.
    fn lone_surrogate(&mut self) -> ByteResult {
        match self.role {
            StrRole::Skip => {}
            StrRole::TopKey => self.key = None,
            StrRole::Model => self.model_bad_unicode = true,
        }
        Ok(())
    }

    fn end_string(&mut self) -> ByteResult {
        if self.role == StrRole::Model {
            self.model_complete = true;
        }
        if self.role == StrRole::TopKey {
            match self.key.and_then(|k| k.matched()) {
                Some(TopKey::Model) => {
                    if self.model_seen {
                        return Err(ScanError::DuplicateModel);
                    }
                    self.model_seen = true;
                    self.value_is_model = true;
                }
                Some(TopKey::Stream) => self.value_is_stream = true,
                Some(TopKey::StreamOptions) => self.stream.stream_options = true,
                None => {}
            }
        }
        self.key = None;
        self.role = StrRole::Skip;
        if self.string_is_key {
            self.state = State::Colon;
        } else {
            self.value_done();
        }
        Ok(())
    }

    /// Stores one decoded byte of a string we keep.
    fn store(&mut self, b: u8) -> ByteResult {
        match self.role {
            StrRole::Skip => Ok(()),
            StrRole::TopKey => {
                self.key = self.key.and_then(|k| k.push(b));
                Ok(())
            }
            StrRole::Model => {
                if self.model.len() >= self.max_model_bytes {
                    return Err(ScanError::ModelTooLong {
                        limit: self.max_model_bytes,
                    });
                }
                self.model.push(b);
                Ok(())
            }
        }
    }

    fn escape(&mut self, b: u8) -> ByteResult {
        let decoded = match (b, escaped_byte(b)) {
            (_, Some(decoded)) => decoded,
            (b'u', None) => {
                self.state = State::Unicode {
                    digits: 0,
                    value: 0,
                };
                return Ok(());
            }
            _ => return Err(self.invalid("invalid escape in a string")),
        };
        self.plain_char()?;
        self.store(decoded)?;
        self.state = State::Str;
        Ok(())
    }

    fn unicode_digit(&mut self, b: u8, digits: u8, value: u16) -> ByteResult {
        let Some(d) = hex_digit(b) else {
            return Err(self.invalid("invalid \\u escape"));
        };
        let value = (value << 4) | u16::from(d);
        if digits < 3 {
            self.state = State::Unicode {
                digits: digits + 1,
                value,
            };
            return Ok(());
        }
        self.state = State::Str;
        self.code_unit(value)
    }

    /// One UTF-16 code unit from a `\u` escape.
    fn code_unit(&mut self, unit: u16) -> ByteResult {
        match unit {
            0xD800..=0xDBFF => {
                if self.high_surrogate.replace(unit).is_some() {
                    self.lone_surrogate()?;
                }
                Ok(())
            }
            0xDC00..=0xDFFF => match self.high_surrogate.take() {
                Some(high) => self.store_char(surrogate_pair(high, unit)),
                None => self.lone_surrogate(),
            },
            _ => {
                self.plain_char()?;
                self.store_char(u32::from(unit))
            }
        }
    }

    fn store_char(&mut self, c: u32) -> ByteResult {
        if self.role == StrRole::Skip {
            return Ok(());
        }
        match char::from_u32(c) {
            Some(ch) => {
                let mut buf = [0u8; 4];
                for &b in ch.encode_utf8(&mut buf).as_bytes() {
                    self.store(b)?;
                }
                Ok(())
            }
            None => self.lone_surrogate(),
        }
    }

    fn number(&mut self, b: u8, part: NumberPart) -> ByteResult {
        use NumberPart::*;
        let next = match (part, b) {
            (Minus, b'0') => Some(Zero),
            (Minus, b'1'..=b'9') => Some(Int),
            (Int, b'0'..=b'9') => Some(Int),
            (Zero | Int, b'.') => Some(Dot),
            (Dot | Frac, b'0'..=b'9') => Some(Frac),
            (Zero | Int | Frac, b'e' | b'E') => Some(Exp),
            (Exp, b'+' | b'-') => Some(ExpSign),
            (Exp | ExpSign | ExpDigits, b'0'..=b'9') => Some(ExpDigits),
            _ => None,
        };
        if let Some(next) = next {
            self.state = State::Number(next);
            return Ok(());
        }
        if !part.is_complete() {
            return Err(self.invalid("invalid number"));
        }
        // The byte after a number belongs to what follows it.
        self.value_done();
        self.byte(b)
    }
}
