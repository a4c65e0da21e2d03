//! One JSON document of a response, push-style: [`Doc`] takes it chunk by chunk, checks its
//! structure as it goes, and keeps only what the accounting needs: the top-level `usage`
//! object's token counts, and whether any choice carried content. Its state is a fixed size
//! whatever the document: a 128-bit stack of container kinds, the context of the first four
//! levels, one key of at most [`KEY_BYTES`] bytes.
//!
//! What it reads (OpenAI's chat and completions objects and chunks, vLLM's and llama-server's):
//!
//! ```text
//! {"choices": [{"text": "...",                      completions: content
//!               "delta": {"content": "...",         chat chunks: content
//!                         "reasoning_content": ..., "reasoning": ..., "tool_calls": [..]}}],
//!  "usage": {"prompt_tokens": N, "completion_tokens": N,
//!            "prompt_tokens_details": {"cached_tokens": N}}}
//! ```
//!
//! Keys are matched as written, without decoding escapes: a server that spelled `usage` with a
//! `\u` escape would be counted as sending none (no server here does). Strings are skipped,
//! not validated as UTF-8: nothing in them is read but whether a content string is empty.

use crate::core::json::skip::{digit_run, find_string_stop};

/// Deepest nesting followed; deeper is refused as malformed (no response of an inference
/// server nests anywhere near this).
pub const MAX_DEPTH: u32 = 128;
/// Longest key compared; every key read is shorter.
const KEY_BYTES: usize = 24;

/// What a container or a value is, for the accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// Anything not read.
    Other,
    /// The top-level object.
    Root,
    /// `usage`.
    Usage,
    /// `usage.prompt_tokens_details`.
    Details,
    /// `choices`.
    Choices,
    /// One element of `choices`.
    Choice,
    /// `choices[i].delta`.
    Delta,
}

/// The field whose value comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    None,
    Usage,
    Details,
    Choices,
    Delta,
    PromptTokens,
    CompletionTokens,
    CachedTokens,
    /// A field whose non-empty value means the model produced something.
    Content,
}

/// What the lexer expects next (between tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value (the document's start, after `:`, after `,` in an array).
    Value,
    /// A value or `]` (just after `[`).
    ValueOrEnd,
    /// A key or `}` (just after `{`).
    KeyOrEnd,
    /// A key (after `,` in an object).
    Key,
    Colon,
    /// `,` or the container's end.
    CommaOrEnd,
    /// Only whitespace: the document is complete.
    Done,
}

/// Where the lexer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Between,
    /// Inside a string; `key` says whether it is an object key.
    Str {
        key: bool,
    },
    /// After a backslash in a string.
    Escape {
        key: bool,
    },
    /// In a `\uXXXX` escape, this many hex digits to go.
    Unicode {
        key: bool,
        left: u8,
    },
    Number,
    /// Inside `true`, `false` or `null`: the literal and the bytes matched.
    Literal {
        word: &'static [u8],
        at: u8,
    },
}

/// Why a document could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocError {
    Malformed,
}

/// The token counts of one `usage` object, as far as it gave them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub cached_input: Option<u64>,
}

impl Usage {
    /// Whether it says anything: a `usage` without a count is no usage.
    pub fn is_some(&self) -> bool {
        self.input.is_some() || self.output.is_some()
    }
}

/// One JSON document, fed in chunks.
#[derive(Debug, Clone)]
pub struct Doc {
    lex: Lex,
    expect: Expect,
    /// Open containers.
    depth: u32,
    /// Bit `i`: the container at depth `i + 1` is an object (else an array).
    objects: u128,
    /// The context of depths 1..=4; deeper is `Other`.
    ctx: [Ctx; 4],
    key: [u8; KEY_BYTES],
    key_len: usize,
    /// The key was longer than any we compare.
    key_long: bool,
    /// The field the coming value belongs to.
    pending: Field,
    /// The number being read, and its field (`None`: not read).
    number: u64,
    number_field: Field,
    number_ok: bool,
    /// The next string byte, or the next token after `[`, decides whether a content field is
    /// empty.
    probe_string: bool,
    probe_array: bool,
    /// Bytes seen since the document started.
    started: bool,
    /// The `usage` object being read, and the last one completed.
    reading: Usage,
    pub usage: Option<Usage>,
    /// Some choice carried content.
    pub content: bool,
}

impl Default for Doc {
    fn default() -> Self {
        Doc::new()
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Doc {
    pub const fn new() -> Self {
        Doc {
            lex: Lex::Between,
            expect: Expect::Value,
            depth: 0,
            objects: 0,
            ctx: [Ctx::Other; 4],
            key: [0; KEY_BYTES],
            key_len: 0,
            key_long: false,
            pending: Field::None,
            number: 0,
            number_field: Field::None,
            number_ok: false,
            probe_string: false,
            probe_array: false,
            started: false,
            reading: Usage {
                input: None,
                output: None,
                cached_input: None,
            },
            usage: None,
            content: false,
        }
    }

    /// Whether the document is complete (its top-level value closed).
    pub fn complete(&self) -> bool {
        match self.lex {
            // A top-level number ends only where the input does.
            Lex::Number => self.depth == 0,
            Lex::Between => self.expect == Expect::Done,
            _ => false,
        }
    }

    /// Whether any byte but whitespace was seen.
    pub fn started(&self) -> bool {
        self.started
    }

    /// The context of the container now open.
    fn here(&self) -> Ctx {
        match self.depth {
            0 => Ctx::Other,
            d => self
                .ctx
                .get((d - 1) as usize)
                .copied()
                .unwrap_or(Ctx::Other),
        }
    }

    fn in_object(&self) -> bool {
        self.depth > 0 && (self.objects >> (self.depth - 1)) & 1 == 1
    }

    /// Reads the next bytes of the document.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), DocError> {
        let mut i = 0;
        while i < bytes.len() {
            match self.lex {
                Lex::Str { key: false } if !self.probe_string => {
                    // The fast path: most of a response is string content nobody reads.
                    let rest = bytes.get(i..).unwrap_or_default();
                    i += find_string_stop(rest);
                    let Some(&b) = bytes.get(i) else { break };
                    i += 1;
                    match b {
                        b'"' => self.value_done(),
                        b'\\' => self.lex = Lex::Escape { key: false },
                        0..=0x1f => return Err(DocError::Malformed),
                        _ => {} // non-ASCII: part of the string
                    }
                }
                Lex::Between => {
                    let Some(&b) = bytes.get(i) else { break };
                    // Whole tokens at once where the chunk holds them: an SSE event is mostly
                    // keys, short values, numbers and literals, which byte by byte cost the
                    // scanner several times the host's own work per event. What does not fit
                    // (a token cut by the chunk's end, an escape, a non-ASCII byte) goes on
                    // byte by byte below, from the same state.
                    let rest = bytes.get(i..).unwrap_or_default();
                    if let Some(used) = self.token(b, rest) {
                        i += used;
                        continue;
                    }
                    if self.step(b)? {
                        i += 1;
                    }
                }
                Lex::Number => {
                    // The digits at once; the byte after them goes to `step`.
                    let rest = bytes.get(i..).unwrap_or_default();
                    let run = digit_run(rest);
                    self.digits(rest.get(..run).unwrap_or_default());
                    i += run;
                    let Some(&b) = bytes.get(i) else { break };
                    // A number ends at the first byte that is not part of it; that byte is
                    // then read again between tokens.
                    if self.step(b)? {
                        i += 1;
                    }
                }
                _ => {
                    let Some(&b) = bytes.get(i) else { break };
                    if self.step(b)? {
                        i += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// A whole token starting at `b` (= `rest[0]`, between tokens) when `rest` holds all of
    /// it and it needs no more than a glance: a plain key with its closing quote, a plain
    /// string value, a literal. Returns the bytes used, or `None` to go byte by byte.
    #[inline]
    fn token(&mut self, b: u8, rest: &[u8]) -> Option<usize> {
        match (self.expect, b) {
            (Expect::Key | Expect::KeyOrEnd, b'"') => {
                let body = rest.get(1..)?;
                let end = find_string_stop(body);
                if body.get(end) != Some(&b'"') {
                    return None;
                }
                // What `between` does for any byte: after a key no array is being probed.
                self.started = true;
                self.key_long = end > KEY_BYTES;
                let key = if self.key_long {
                    &[][..]
                } else {
                    body.get(..end).unwrap_or_default()
                };
                self.lex = Lex::Between;
                self.expect = Expect::Colon;
                self.pending = self.field_of(key);
                Some(end + 2)
            }
            (Expect::Value | Expect::ValueOrEnd, b'n' | b't' | b'f') => {
                let word: &[u8] = match b {
                    b'n' => b"null",
                    b't' => b"true",
                    _ => b"false",
                };
                if rest.get(..word.len()) != Some(word) {
                    return None;
                }
                // As `between` then `begin_value` and the literal's last byte would.
                self.started = true;
                if self.probe_array {
                    self.probe_array = false;
                    self.content = true;
                }
                self.pending = Field::None;
                self.value_done();
                Some(word.len())
            }
            _ => None,
        }
    }

    /// Digits of the number being read.
    #[inline]
    fn digits(&mut self, run: &[u8]) {
        if self.number_field == Field::None || !self.number_ok {
            return;
        }
        for &d in run {
            match self
                .number
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(d - b'0')))
            {
                Some(n) => self.number = n,
                None => {
                    self.number_ok = false;
                    return;
                }
            }
        }
    }

    /// One byte; returns whether it was consumed (false: read it again).
    fn step(&mut self, b: u8) -> Result<bool, DocError> {
        match self.lex {
            Lex::Between => self.between(b).map(|()| true),
            Lex::Str { key } => {
                if self.probe_string {
                    self.probe_string = false;
                    if b != b'"' {
                        self.content = true;
                    }
                }
                match b {
                    b'"' => {
                        if key {
                            self.key_done();
                        } else {
                            self.value_done();
                        }
                    }
                    b'\\' => {
                        self.lex = Lex::Escape { key };
                        // An escaped key is not one we compare.
                        self.key_long |= key;
                    }
                    0..=0x1f => return Err(DocError::Malformed),
                    _ => {
                        if key {
                            if let Some(slot) = self.key.get_mut(self.key_len) {
                                *slot = b;
                                self.key_len += 1;
                            } else {
                                self.key_long = true;
                            }
                        }
                    }
                }
                Ok(true)
            }
            Lex::Escape { key } => {
                match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                        self.lex = Lex::Str { key };
                    }
                    b'u' => self.lex = Lex::Unicode { key, left: 4 },
                    _ => return Err(DocError::Malformed),
                }
                Ok(true)
            }
            Lex::Unicode { key, left } => {
                if !b.is_ascii_hexdigit() {
                    return Err(DocError::Malformed);
                }
                self.lex = if left <= 1 {
                    Lex::Str { key }
                } else {
                    Lex::Unicode {
                        key,
                        left: left - 1,
                    }
                };
                Ok(true)
            }
            Lex::Number => {
                match b {
                    b'0'..=b'9' => {
                        let digit = u64::from(b - b'0');
                        match self
                            .number
                            .checked_mul(10)
                            .and_then(|n| n.checked_add(digit))
                        {
                            Some(n) => self.number = n,
                            None => self.number_ok = false,
                        }
                    }
                    // A fraction, an exponent or a sign: valid JSON, not a token count.
                    b'.' | b'e' | b'E' | b'+' | b'-' => self.number_ok = false,
                    _ => {
                        self.number_done();
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Lex::Literal { word, at } => {
                if word.get(at as usize) != Some(&b) {
                    return Err(DocError::Malformed);
                }
                if at as usize + 1 == word.len() {
                    self.value_done();
                } else {
                    self.lex = Lex::Literal { word, at: at + 1 };
                }
                Ok(true)
            }
        }
    }

    /// A byte between tokens.
    fn between(&mut self, b: u8) -> Result<(), DocError> {
        if is_ws(b) {
            return Ok(());
        }
        self.started = true;
        if self.probe_array {
            self.probe_array = false;
            if b != b']' {
                self.content = true;
            }
        }
        match self.expect {
            Expect::Value => self.begin_value(b),
            Expect::ValueOrEnd => {
                if b == b']' {
                    self.close(false)
                } else {
                    self.begin_value(b)
                }
            }
            Expect::KeyOrEnd | Expect::Key => match b {
                b'"' => {
                    self.key_len = 0;
                    self.key_long = false;
                    self.lex = Lex::Str { key: true };
                    Ok(())
                }
                b'}' if self.expect == Expect::KeyOrEnd => self.close(true),
                _ => Err(DocError::Malformed),
            },
            Expect::Colon => {
                if b == b':' {
                    self.expect = Expect::Value;
                    Ok(())
                } else {
                    Err(DocError::Malformed)
                }
            }
            Expect::CommaOrEnd => match b {
                b',' => {
                    self.expect = if self.in_object() {
                        Expect::Key
                    } else {
                        Expect::Value
                    };
                    Ok(())
                }
                b'}' if self.in_object() => self.close(true),
                b']' if !self.in_object() => self.close(false),
                _ => Err(DocError::Malformed),
            },
            Expect::Done => Err(DocError::Malformed),
        }
    }

    fn begin_value(&mut self, b: u8) -> Result<(), DocError> {
        let field = std::mem::replace(&mut self.pending, Field::None);
        match b {
            b'{' | b'[' => {
                let object = b == b'{';
                let ctx = match (self.here(), field, object) {
                    (_, _, true) if self.depth == 0 => Ctx::Root,
                    (_, Field::Usage, true) => {
                        self.reading = Usage::default();
                        Ctx::Usage
                    }
                    (_, Field::Details, true) => Ctx::Details,
                    (_, Field::Choices, false) => Ctx::Choices,
                    (Ctx::Choices, _, true) => Ctx::Choice,
                    (_, Field::Delta, true) => Ctx::Delta,
                    (_, Field::Content, false) => {
                        self.probe_array = true;
                        Ctx::Other
                    }
                    _ => Ctx::Other,
                };
                if self.depth >= MAX_DEPTH {
                    return Err(DocError::Malformed);
                }
                if let Some(slot) = self.ctx.get_mut(self.depth as usize) {
                    *slot = ctx;
                }
                if object {
                    self.objects |= 1 << self.depth;
                } else {
                    self.objects &= !(1 << self.depth);
                }
                self.depth += 1;
                self.expect = if object {
                    Expect::KeyOrEnd
                } else {
                    Expect::ValueOrEnd
                };
                Ok(())
            }
            b'"' => {
                self.probe_string = field == Field::Content;
                self.lex = Lex::Str { key: false };
                Ok(())
            }
            b'-' | b'0'..=b'9' => {
                self.number_field = field;
                self.number = u64::from(b.wrapping_sub(b'0'));
                self.number_ok = b != b'-';
                self.lex = Lex::Number;
                Ok(())
            }
            b't' => {
                self.lex = Lex::Literal {
                    word: b"true",
                    at: 1,
                };
                Ok(())
            }
            b'f' => {
                self.lex = Lex::Literal {
                    word: b"false",
                    at: 1,
                };
                Ok(())
            }
            b'n' => {
                self.lex = Lex::Literal {
                    word: b"null",
                    at: 1,
                };
                Ok(())
            }
            _ => Err(DocError::Malformed),
        }
    }

    /// Closes the container now open (`object`: with `}`).
    fn close(&mut self, object: bool) -> Result<(), DocError> {
        if self.depth == 0 || self.in_object() != object {
            return Err(DocError::Malformed);
        }
        if self.here() == Ctx::Usage && self.reading.is_some() {
            self.usage = Some(self.reading);
        }
        self.depth -= 1;
        self.value_done();
        Ok(())
    }

    /// A key is complete: which field comes next, in this context.
    fn key_done(&mut self) {
        self.lex = Lex::Between;
        self.expect = Expect::Colon;
        let key = if self.key_long {
            &[][..]
        } else {
            self.key.get(..self.key_len).unwrap_or_default()
        };
        self.pending = self.field_of(key);
    }

    /// Which field a key names, in the container now open.
    #[inline]
    fn field_of(&self, key: &[u8]) -> Field {
        match (self.here(), key) {
            (Ctx::Root, b"usage") => Field::Usage,
            (Ctx::Root, b"choices") => Field::Choices,
            (Ctx::Usage, b"prompt_tokens") => Field::PromptTokens,
            (Ctx::Usage, b"completion_tokens") => Field::CompletionTokens,
            (Ctx::Usage, b"prompt_tokens_details") => Field::Details,
            (Ctx::Details, b"cached_tokens") => Field::CachedTokens,
            (Ctx::Choice, b"delta") => Field::Delta,
            (Ctx::Choice, b"text") => Field::Content,
            (Ctx::Delta, b"content" | b"reasoning_content" | b"reasoning" | b"tool_calls") => {
                Field::Content
            }
            _ => Field::None,
        }
    }

    fn number_done(&mut self) {
        if self.number_ok {
            let n = Some(self.number);
            match self.number_field {
                Field::PromptTokens => self.reading.input = n,
                Field::CompletionTokens => self.reading.output = n,
                Field::CachedTokens => self.reading.cached_input = n,
                _ => {}
            }
        }
        self.number_field = Field::None;
        self.value_done();
    }

    /// A value is complete.
    fn value_done(&mut self) {
        self.lex = Lex::Between;
        self.probe_string = false;
        self.expect = if self.depth == 0 {
            Expect::Done
        } else {
            Expect::CommaOrEnd
        };
    }
}
