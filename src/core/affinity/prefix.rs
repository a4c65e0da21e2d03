//! The prefix key: which replica of a pool most likely holds this prompt's prefix in its
//! KV cache.
//!
//! llm-d's endpoint picker scores replicas by prefix-cache hits: it splits the prompt into
//! fixed blocks (64 tokens, taken as 256 bytes), hashes each block chained with the one before
//! (xxhash64, the chain seeded with the model name), and remembers which replica saw which
//! block hashes. bbr-wasm does the first half in the filter and leaves the second to Envoy:
//! the chained hash after the first `prefix_blocks` blocks becomes a request header, and a
//! consistent-hash load balancer with bounded load (`MAGLEV` + `hash_balance_factor`) sends
//! equal keys to the same replica while load allows.
//!
//! [`PromptCapture`] reads the start of the prompt out of the body as the model server will
//! see it, push-style over arbitrary chunks, holding at most the bytes the key needs:
//! - completions: `prompt` (a string, or the first string of an array);
//! - chat: each message of `messages` in order as `role`, `\n`, its text content, `\n`; the
//!   text content is `content` when it is a string, or the concatenated `text` of its
//!   `{"type": "text"}` parts (images, audio and other parts are skipped).
//!
//! Escapes in strings are decoded: the key is over the text, not its JSON spelling.
//!
//! The capture is a second, structure-only reader that stops as soon as the key is settled
//! (the budget is full, or `messages` / `prompt` has ended), usually a few KiB into the body;
//! the [`crate::core::json::scanner::ModelScanner`] remains the only judge of whether the body is valid
//! JSON. Anything the capture does not understand makes it give up: no key, the request is
//! routed as usual and spread over the pool.

use crate::core::json::scanner::{escaped_byte, hex_digit, surrogate_pair};
use crate::core::json::vector::find_quote_or_backslash as string_stop;
use xxhash_rust::xxh64::Xxh64;

/// Default for `prefixAffinity.blockBytes`: llm-d's prefix scorer uses 64-token blocks and
/// counts 4 bytes per token.
pub const DEFAULT_BLOCK_BYTES: usize = 256;
/// Default for `prefixAffinity.prefixBlocks` (see the README's "Prefix affinity").
pub const DEFAULT_PREFIX_BLOCKS: usize = 8;
/// Default for `prefixAffinity.header`.
pub const DEFAULT_PREFIX_HEADER: &str = "x-gateway-prefix-hash";
/// Largest accepted `blockBytes x prefixBlocks`: the bytes one request may hold for its key.
pub const MAX_CAPTURE_BYTES: usize = 64 * 1024;

/// Longest `role` kept (roles are short words: system, user, assistant, tool, developer).
const MAX_ROLE_BYTES: usize = 32;
/// Longest content-part `type` kept (`text`, `image_url`, `input_audio`...).
const MAX_TYPE_BYTES: usize = 16;
/// Longest key compared (`messages` is the longest key the capture looks for).
const MAX_KEY_BYTES: usize = 8;

/// The chained block hashes of `prompt`'s complete blocks, in order: `h0 = xxh64(model)`,
/// `h(i+1) = xxh64(h(i) as 8 little-endian bytes ++ block i)`; item `i` is `h(i+1)`, the hash
/// of the prompt's first `i + 1` blocks. Lazy: take only what you need. Nothing when
/// `block_bytes` is 0.
pub fn block_chain<'a>(
    model: &str,
    prompt: &'a [u8],
    block_bytes: usize,
) -> impl Iterator<Item = u64> + 'a {
    let mut h = xxhash_rust::xxh64::xxh64(model.as_bytes(), 0);
    let blocks = if block_bytes == 0 {
        [].chunks_exact(1)
    } else {
        prompt.chunks_exact(block_bytes)
    };
    blocks.map(move |block| {
        let mut hasher = Xxh64::new(0);
        hasher.update(&h.to_le_bytes());
        hasher.update(block);
        h = hasher.digest();
        h
    })
}

/// The first `max_blocks` hashes of [`block_chain`]: what the endpoint picker
/// (`core::affinity::picker`) matches against what each replica has been sent.
pub fn block_hashes(model: &str, prompt: &[u8], block_bytes: usize, max_blocks: usize) -> Vec<u64> {
    block_chain(model, prompt, block_bytes)
        .take(max_blocks)
        .collect()
}

/// The chained block hash after the first `min(prefix_blocks, complete blocks)` blocks of
/// `prompt` (see [`block_chain`]). `None` when the prompt has no complete block.
pub fn prefix_key(
    model: &str,
    prompt: &[u8],
    block_bytes: usize,
    prefix_blocks: usize,
) -> Option<u64> {
    block_chain(model, prompt, block_bytes)
        .take(prefix_blocks)
        .last()
}

/// The header value: 16 lower-case hex digits.
pub fn key_header_value(key: u64) -> String {
    format!("{key:016x}")
}

/// What a container is to the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// The top-level object.
    Top,
    /// The `messages` array.
    Messages,
    /// One message object.
    Message,
    /// A message's `content` array.
    Parts,
    /// One content part object.
    Part,
    /// The `prompt` array.
    Prompts,
    /// Any container the capture does not look into.
    Other,
}

/// Where a string's decoded bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// Nowhere: read to its end and drop.
    Drop,
    /// An object key: compared with the keys the capture looks for.
    Key,
    /// Straight to the captured prompt.
    Prompt,
    /// The current message's role.
    Role,
    /// The current message's text content.
    Content,
    /// The current part's type.
    PartType,
    /// The current part's text.
    PartText,
}

/// The tokenizer's position between two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Between,
    /// Inside a string.
    Str,
    /// After a backslash.
    Escape,
    /// Inside `\uXXXX`.
    Unicode { digits: u8, value: u16 },
    /// Inside a number or literal: until a delimiter.
    Scalar,
}

/// The state of the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureState {
    /// Still reading: feed it more of the body.
    Reading,
    /// The key's input is settled: feeding more changes nothing.
    Done,
    /// The body's shape was not understood: no key for this request.
    GaveUp,
}

/// Captures the start of the prompt from a JSON request body. Memory: the budget plus a few
/// small fixed buffers and a bounded stack, whatever the body.
#[derive(Debug, Clone)]
pub struct PromptCapture {
    budget: usize,
    out: Vec<u8>,
    state: CaptureState,
    lex: Lex,
    sink: Sink,
    /// Containers down to the deepest one the capture looks into; deeper ones are counted.
    stack: Vec<Frame>,
    /// Containers below the last frame that matter (all `Other`).
    other_depth: usize,
    /// In an object, the next string is a key.
    expect_key: bool,
    /// The last key read in the current object, if it is one the capture looks for.
    key: [u8; MAX_KEY_BYTES],
    key_len: usize,
    key_overflow: bool,
    /// The key whose value comes next (set at `:`).
    value_key: Option<&'static [u8]>,
    /// A pending high surrogate of a `\uD800-\uDBFF` escape.
    high_surrogate: Option<u16>,
    /// The `prompt` array's first string has been read.
    prompt_taken: bool,
    // The current message.
    role: [u8; MAX_ROLE_BYTES],
    role_len: usize,
    /// `role \n` is already in `out` and content goes straight there.
    head_emitted: bool,
    /// Content read before the role was known (capped at the budget).
    content: Vec<u8>,
    // The current content part.
    part_type: [u8; MAX_TYPE_BYTES],
    part_type_len: usize,
    part_type_overflow: bool,
    part_text: Vec<u8>,
}

const KEYS: [&[u8]; 6] = [
    b"messages",
    b"prompt",
    b"role",
    b"content",
    b"type",
    b"text",
];

impl PromptCapture {
    /// A capture that keeps at most `budget` bytes of prompt.
    pub fn new(budget: usize) -> Self {
        PromptCapture {
            budget,
            // One allocation up front rather than a doubling series as the prompt comes in.
            out: Vec::with_capacity(budget.min(MAX_CAPTURE_BYTES)),
            state: CaptureState::Reading,
            lex: Lex::Between,
            sink: Sink::Drop,
            stack: Vec::new(),
            other_depth: 0,
            expect_key: false,
            key: [0; MAX_KEY_BYTES],
            key_len: 0,
            key_overflow: false,
            value_key: None,
            high_surrogate: None,
            prompt_taken: false,
            role: [0; MAX_ROLE_BYTES],
            role_len: 0,
            head_emitted: false,
            content: Vec::new(),
            part_type: [0; MAX_TYPE_BYTES],
            part_type_len: 0,
            part_type_overflow: false,
            part_text: Vec::new(),
        }
    }

    pub fn state(&self) -> CaptureState {
        self.state
    }

    /// The captured prompt start, once [`CaptureState::Done`] (or at the end of the body,
    /// after [`PromptCapture::finish`]); `None` when the capture gave up.
    pub fn prompt(&self) -> Option<&[u8]> {
        match self.state {
            CaptureState::GaveUp => None,
            _ => Some(&self.out),
        }
    }

    /// The end of the body: what was captured stands (a body cut short is the scanner's
    /// business, and it refuses it).
    pub fn finish(&mut self) {
        if self.state == CaptureState::Reading {
            self.state = CaptureState::Done;
        }
    }

    /// Feeds the next chunk. Returns the state after it; once not `Reading`, further chunks
    /// are ignored, so the caller can stop feeding.
    pub fn feed(&mut self, chunk: &[u8]) -> CaptureState {
        let mut i = 0;
        while i < chunk.len() && self.state == CaptureState::Reading {
            // Fast path: the plain bytes of a string (up to its next quote or backslash), taken
            // as one run whatever their sink; the state machine sees only the stop byte.
            if self.lex == Lex::Str {
                let n = string_stop(&chunk[i..]);
                if n > 0 {
                    self.put_run(&chunk[i..i + n]);
                    i += n;
                    if i == chunk.len() || self.state != CaptureState::Reading {
                        break;
                    }
                }
            }
            self.byte(chunk[i]);
            i += 1;
        }
        self.state
    }

    fn give_up(&mut self) {
        self.state = CaptureState::GaveUp;
    }

    fn frame(&self) -> Option<Frame> {
        if self.other_depth > 0 {
            return Some(Frame::Other);
        }
        self.stack.last().copied()
    }

    fn byte(&mut self, b: u8) {
        match self.lex {
            Lex::Between => self.between(b),
            Lex::Scalar => match b {
                b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r' => {
                    self.lex = Lex::Between;
                    self.value_done();
                    self.between(b);
                }
                _ => {}
            },
            Lex::Str => match b {
                b'"' => {
                    self.lex = Lex::Between;
                    self.string_done();
                }
                b'\\' => self.lex = Lex::Escape,
                _ => self.put(b),
            },
            Lex::Escape => {
                self.lex = Lex::Str;
                let decoded = match (b, escaped_byte(b)) {
                    (_, Some(decoded)) => decoded,
                    (b'u', None) => {
                        self.lex = Lex::Unicode {
                            digits: 0,
                            value: 0,
                        };
                        return;
                    }
                    _ => return self.give_up(),
                };
                self.flush_surrogate();
                self.put(decoded);
            }
            Lex::Unicode { digits, value } => {
                let Some(nibble) = hex_digit(b) else {
                    return self.give_up();
                };
                let value = (value << 4) | u16::from(nibble);
                if digits < 3 {
                    self.lex = Lex::Unicode {
                        digits: digits + 1,
                        value,
                    };
                    return;
                }
                self.lex = Lex::Str;
                self.code_unit(value);
            }
        }
    }

    /// A decoded `\uXXXX`: pairs surrogates, writes the character as UTF-8.
    fn code_unit(&mut self, unit: u16) {
        let ch = match (self.high_surrogate.take(), unit) {
            (Some(high), 0xDC00..=0xDFFF) => char::from_u32(surrogate_pair(high, unit)),
            (high, 0xD800..=0xDBFF) => {
                if high.is_some() {
                    self.put_char(char::REPLACEMENT_CHARACTER);
                }
                self.high_surrogate = Some(unit);
                return;
            }
            (high, _) => {
                if high.is_some() {
                    self.put_char(char::REPLACEMENT_CHARACTER);
                }
                char::from_u32(u32::from(unit))
            }
        };
        // A lone low surrogate: the scanner refuses it in `model`; in text, servers differ,
        // so the capture writes what Python's json would decode it to, U+FFFD here.
        self.put_char(ch.unwrap_or(char::REPLACEMENT_CHARACTER));
    }

    fn flush_surrogate(&mut self) {
        if self.high_surrogate.take().is_some() {
            self.put_char(char::REPLACEMENT_CHARACTER);
        }
    }

    fn put_char(&mut self, c: char) {
        let mut buf = [0u8; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            self.put(b);
        }
    }

    /// A run of plain (unescaped) bytes of the current string.
    fn put_run(&mut self, run: &[u8]) {
        match self.sink {
            Sink::Drop => {}
            Sink::Prompt => self.emit(run),
            Sink::Content => self.content_bytes(run),
            Sink::PartText if self.part_is_text() == Some(true) => self.content_bytes(run),
            Sink::PartText => {
                let room = self.budget.saturating_sub(self.part_text.len());
                self.part_text
                    .extend_from_slice(&run[..run.len().min(room)]);
            }
            // Short values (keys, roles, types): byte by byte into their fixed buffers.
            Sink::Key | Sink::Role | Sink::PartType => {
                for &b in run {
                    self.put(b);
                }
            }
        }
    }

    /// One decoded byte of the current string.
    fn put(&mut self, b: u8) {
        match self.sink {
            Sink::Drop => {}
            Sink::Key => {
                if self.key_len < MAX_KEY_BYTES {
                    self.key[self.key_len] = b;
                    self.key_len += 1;
                } else {
                    self.key_overflow = true;
                }
            }
            Sink::Prompt => self.emit(&[b]),
            Sink::Role => {
                if self.role_len < MAX_ROLE_BYTES {
                    self.role[self.role_len] = b;
                    self.role_len += 1;
                }
            }
            Sink::Content => self.content_bytes(&[b]),
            Sink::PartType => {
                if self.part_type_len < MAX_TYPE_BYTES {
                    self.part_type[self.part_type_len] = b;
                    self.part_type_len += 1;
                } else {
                    self.part_type_overflow = true;
                }
            }
            Sink::PartText => {
                if self.part_is_text() == Some(true) {
                    self.content_bytes(&[b]);
                } else if self.part_text.len() < self.budget {
                    self.part_text.push(b);
                }
            }
        }
    }

    /// Appends to the captured prompt; the budget full settles the key.
    fn emit(&mut self, bytes: &[u8]) {
        let room = self.budget.saturating_sub(self.out.len());
        let take = bytes.len().min(room);
        self.out.extend_from_slice(&bytes[..take]);
        if self.out.len() >= self.budget {
            self.state = CaptureState::Done;
        }
    }

    /// Text content of the current message: straight out once its role is written, held
    /// until the role is known otherwise.
    fn content_bytes(&mut self, bytes: &[u8]) {
        if !self.head_emitted && self.role_len > 0 {
            self.emit_head();
        }
        if self.head_emitted {
            self.emit(bytes);
        } else {
            let room = self.budget.saturating_sub(self.content.len());
            let take = bytes.len().min(room);
            self.content.extend_from_slice(&bytes[..take]);
        }
    }

    fn emit_head(&mut self) {
        let role = self.role;
        let len = self.role_len;
        self.emit(&role[..len]);
        self.emit(b"\n");
        self.head_emitted = true;
    }

    /// `Some(true)` once the part's type is known to be `text`, `Some(false)` once known to be
    /// something else, `None` while unknown.
    fn part_is_text(&self) -> Option<bool> {
        if self.part_type_len == 0 && !self.part_type_overflow {
            return None;
        }
        Some(!self.part_type_overflow && &self.part_type[..self.part_type_len] == b"text")
    }

    fn between(&mut self, b: u8) {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | b',' => {
                if b == b',' && self.frame_is_object() {
                    self.expect_key = true;
                }
            }
            b':' => {
                self.value_key = if self.key_overflow {
                    None
                } else {
                    KEYS.iter()
                        .copied()
                        .find(|k| *k == &self.key[..self.key_len])
                };
                self.expect_key = false;
            }
            b'"' => {
                self.lex = Lex::Str;
                self.high_surrogate = None;
                if self.expect_key {
                    self.sink = Sink::Key;
                    self.key_len = 0;
                    self.key_overflow = false;
                } else {
                    self.sink = self.string_sink();
                }
            }
            b'{' | b'[' => self.open(b == b'{'),
            b'}' | b']' => self.close(),
            _ => self.lex = Lex::Scalar,
        }
    }

    /// Keys matter only in the objects the capture looks into; inside an `Other` container
    /// every string goes nowhere, key or not.
    fn frame_is_object(&self) -> bool {
        matches!(
            self.frame(),
            Some(Frame::Top | Frame::Message | Frame::Part)
        )
    }

    /// Where a string value goes, from the container and key it is in.
    fn string_sink(&mut self) -> Sink {
        let key = self.value_key.take();
        match (self.frame(), key) {
            (Some(Frame::Top), Some(b"prompt")) => Sink::Prompt,
            (Some(Frame::Prompts), _) if !self.prompt_taken => Sink::Prompt,
            (Some(Frame::Message), Some(b"role")) => {
                self.role_len = 0;
                Sink::Role
            }
            (Some(Frame::Message), Some(b"content")) => Sink::Content,
            (Some(Frame::Part), Some(b"type")) => {
                self.part_type_len = 0;
                self.part_type_overflow = false;
                Sink::PartType
            }
            (Some(Frame::Part), Some(b"text")) => Sink::PartText,
            _ => Sink::Drop,
        }
    }

    /// A string value or key ended.
    fn string_done(&mut self) {
        self.flush_surrogate();
        let sink = self.sink;
        self.sink = Sink::Drop;
        match sink {
            Sink::Key => {}
            Sink::Prompt => {
                if self.frame() == Some(Frame::Prompts) {
                    self.prompt_taken = true;
                }
                // The prompt is complete: nothing later in the body is part of it.
                self.state = CaptureState::Done;
            }
            Sink::Role if self.frame() == Some(Frame::Message) && !self.content.is_empty() => {
                // Content came first; now the head, then what was held.
                self.emit_head();
                let held = std::mem::take(&mut self.content);
                self.emit(&held);
            }
            _ => {}
        }
        self.value_done();
    }

    /// A value ended (string, scalar or container) in the current container.
    fn value_done(&mut self) {
        self.value_key = None;
    }

    fn open(&mut self, object: bool) {
        let key = self.value_key.take();
        if self.other_depth > 0 {
            self.other_depth += 1;
            return;
        }
        let next = match (self.stack.last().copied(), key, object) {
            (None, _, true) => Frame::Top,
            (None, _, false) => return self.give_up(),
            (Some(Frame::Top), Some(b"messages"), false) => Frame::Messages,
            (Some(Frame::Top), Some(b"prompt"), false) => Frame::Prompts,
            (Some(Frame::Messages), _, true) => {
                self.role_len = 0;
                self.head_emitted = false;
                self.content.clear();
                Frame::Message
            }
            (Some(Frame::Message), Some(b"content"), false) => Frame::Parts,
            (Some(Frame::Parts), _, true) => {
                self.part_type_len = 0;
                self.part_type_overflow = false;
                self.part_text.clear();
                Frame::Part
            }
            _ => {
                self.other_depth = 1;
                self.expect_key = false;
                return;
            }
        };
        self.stack.push(next);
        self.expect_key = object;
    }

    fn close(&mut self) {
        if self.other_depth > 0 {
            self.other_depth -= 1;
            self.expect_key = false;
            self.value_done();
            return;
        }
        match self.stack.pop() {
            None => self.give_up(),
            Some(Frame::Top) => self.state = CaptureState::Done,
            // Every message read: the prompt is complete.
            Some(Frame::Messages) => self.state = CaptureState::Done,
            // A prompt array: its first string was the prompt (or it held none: token ids).
            Some(Frame::Prompts) => self.state = CaptureState::Done,
            Some(Frame::Message) => {
                if !self.head_emitted {
                    self.emit_head();
                    let held = std::mem::take(&mut self.content);
                    self.emit(&held);
                }
                self.emit(b"\n");
                self.head_emitted = false;
                self.role_len = 0;
            }
            Some(Frame::Part) => {
                if self.part_is_text() == Some(true) && !self.part_text.is_empty() {
                    let held = std::mem::take(&mut self.part_text);
                    self.content_bytes(&held);
                }
                self.part_text.clear();
            }
            Some(Frame::Parts) | Some(Frame::Other) => {}
        }
        self.expect_key = false;
        self.value_done();
    }
}
