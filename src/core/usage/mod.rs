//! Token usage and latency, read from responses as they stream past.
//!
//! The filter never holds a response: every chunk goes on as it arrives, and a copy of its new
//! bytes is fed to a [`ResponseScanner`] (push-style, `feed(chunk)` / `finish()`), whose state
//! is a fixed size whatever the response. The scanner reads:
//!
//! - a JSON response (`application/json`, or no content type): one document, its top-level
//!   `usage` (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`);
//! - an SSE stream (`text/event-stream`): every `data:` event as its own document; the first
//!   event whose choices carry content (a non-empty `delta.content`, `reasoning_content`,
//!   `reasoning`, `tool_calls`, or completions' `text`) is the first token; the last `usage`
//!   any event carried is the stream's (OpenAI's `stream_options.include_usage` final chunk;
//!   with vLLM's `continuous_usage_stats` every chunk carries the running total).
//!
//! A response whose body is encoded (gzip, ...), breaks JSON or SSE, ends mid-document, or
//! runs past `usage.maxScanBytes` is [`Outcome::Unreadable`]: it passed untouched, and counts
//! no tokens. A readable response without `usage` counts none either: nothing is guessed from
//! the text.

pub mod include;
pub mod json;
pub mod metrics;

use crate::core::json::vector::find_line_end;
pub use json::Usage;
use json::{Doc, DocError};

/// Default for `usage.maxScanBytes`: past this a response is no longer read (counted as
/// unreadable, `too_large`); the rest passes unread.
pub const DEFAULT_MAX_SCAN_BYTES: u64 = 16 * 1024 * 1024;
/// Largest accepted `usage.maxScanBytes`.
pub const MAX_MAX_SCAN_BYTES: u64 = 1024 * 1024 * 1024;

/// `usage` in the configuration, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageSettings {
    /// Read responses at all (`usage.enabled`, default true).
    pub enabled: bool,
    /// `usage.maxScanBytes`.
    pub max_scan_bytes: u64,
    /// `usage.addIncludeUsage` (default false): ask for a stream's usage when the client did
    /// not (`include`).
    pub add_include_usage: bool,
}

impl Default for UsageSettings {
    fn default() -> Self {
        UsageSettings {
            enabled: true,
            max_scan_bytes: DEFAULT_MAX_SCAN_BYTES,
            add_include_usage: false,
        }
    }
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Json,
    Sse,
}

/// Why a response could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// Not valid JSON, or not valid SSE of JSON events.
    Malformed,
    /// Ended (or was reset) in the middle of a document or an event.
    Truncated,
    /// A `content-encoding` other than identity: the gateway does not decompress.
    Encoded,
    /// Longer than `usage.maxScanBytes`.
    TooLarge,
}

/// What one response amounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Read, with usage.
    Counted(Usage),
    /// Read, without usage.
    Absent,
    Unreadable(Unreadable),
}

impl Outcome {
    /// The `outcome` label of `bbr_usage_responses_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Counted(_) => "counted",
            Outcome::Absent => "absent",
            Outcome::Unreadable(Unreadable::Malformed) => "malformed",
            Outcome::Unreadable(Unreadable::Truncated) => "truncated",
            Outcome::Unreadable(Unreadable::Encoded) => "encoded",
            Outcome::Unreadable(Unreadable::TooLarge) => "too_large",
        }
    }

    pub const LABELS: [&'static str; 6] = [
        "counted",
        "absent",
        "malformed",
        "truncated",
        "encoded",
        "too_large",
    ];
}

/// What to do with a response, from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponsePlan {
    /// Not an answer with usage (an error status, a 204, ...): not read, not counted.
    Skip,
    /// Read the body so framed.
    Scan(Framing),
    /// Counted as unreadable at once; the body is not read.
    Refuse(Unreadable),
}

/// Decides from the response's `:status`, `content-type` and `content-encoding`.
pub fn plan_response(
    status: Option<&str>,
    content_type: Option<&str>,
    content_encoding: Option<&str>,
) -> ResponsePlan {
    let ok = status
        .and_then(|s| s.trim().parse::<u16>().ok())
        .is_some_and(|s| (200..300).contains(&s) && s != 204);
    if !ok {
        return ResponsePlan::Skip;
    }
    if let Some(encoding) = content_encoding {
        let encoding = encoding.trim();
        if !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity") {
            return ResponsePlan::Refuse(Unreadable::Encoded);
        }
    }
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if media.eq_ignore_ascii_case("text/event-stream") {
        ResponsePlan::Scan(Framing::Sse)
    } else {
        ResponsePlan::Scan(Framing::Json)
    }
}

/// Where an SSE line stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line.
    Start,
    /// Reading the field name (its bytes so far in `field`).
    Field,
    /// After `data:`, before the optional space.
    DataColon,
    /// In a `data` value.
    Data,
    /// In a line that is not read (a comment, another field).
    Ignore,
}

/// What the current event's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Data {
    /// No data byte yet but whitespace.
    Empty,
    /// A JSON document, in `doc`.
    Json,
    /// `[DONE]`, this many bytes of it matched.
    Done(u8),
}

const DONE: &[u8] = b"[DONE]";

/// Reads one response, chunk by chunk.
#[derive(Debug, Clone)]
pub struct ResponseScanner {
    framing: Framing,
    max_bytes: u64,
    seen: u64,
    doc: Doc,
    failed: Option<Unreadable>,
    /// The last usage read.
    usage: Option<Usage>,
    /// Some content was seen (reported once by `feed`).
    content: bool,
    // SSE only.
    line: Line,
    /// The field name's first bytes (`data` is all that is read).
    field: [u8; 4],
    field_len: u8,
    field_long: bool,
    /// The last byte was a CR (a CR LF pair ends one line).
    after_cr: bool,
    data: Data,
}

impl ResponseScanner {
    pub fn new(framing: Framing, max_bytes: u64) -> Self {
        ResponseScanner {
            framing,
            max_bytes,
            seen: 0,
            doc: Doc::new(),
            failed: None,
            usage: None,
            content: false,
            line: Line::Start,
            field: [0; 4],
            field_len: 0,
            field_long: false,
            after_cr: false,
            data: Data::Empty,
        }
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Whether feeding more is useless (the response is already unreadable).
    pub fn stopped(&self) -> bool {
        self.failed.is_some()
    }

    /// Reads the next bytes. Returns true the first time content shows: in a stream, the first
    /// token's event (a JSON response's first token is its first byte, which the host times).
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        if self.failed.is_some() {
            return false;
        }
        self.seen = self.seen.saturating_add(chunk.len() as u64);
        if self.seen > self.max_bytes {
            self.failed = Some(Unreadable::TooLarge);
            return false;
        }
        let had_content = self.content;
        let result = match self.framing {
            Framing::Json => self.doc.feed(chunk),
            Framing::Sse => self.feed_sse(chunk),
        };
        if result.is_err() {
            self.failed = Some(Unreadable::Malformed);
        }
        !had_content && self.content
    }

    /// The response ended (`complete`: with its end of stream; false: reset or destroyed
    /// before).
    pub fn finish(&mut self, complete: bool) -> Outcome {
        if let Some(why) = self.failed {
            return Outcome::Unreadable(why);
        }
        match self.framing {
            Framing::Json => {
                if !complete || !self.doc.complete() {
                    return Outcome::Unreadable(Unreadable::Truncated);
                }
                self.usage = self.doc.usage;
            }
            Framing::Sse => {
                // A last data line may lack its line end: its data is judged as it is.
                self.line = Line::Start;
                // The last event's blank line may be missing; its data must be whole.
                let whole = match self.data {
                    Data::Empty => true,
                    Data::Json => self.doc.complete(),
                    Data::Done(n) => n as usize == DONE.len(),
                };
                if !whole {
                    return Outcome::Unreadable(Unreadable::Truncated);
                }
                if self.dispatch().is_err() {
                    return Outcome::Unreadable(Unreadable::Malformed);
                }
                if !complete {
                    return Outcome::Unreadable(Unreadable::Truncated);
                }
            }
        }
        match self.usage {
            Some(usage) => Outcome::Counted(usage),
            None => Outcome::Absent,
        }
    }

    fn feed_sse(&mut self, chunk: &[u8]) -> Result<(), DocError> {
        let mut i = 0;
        while i < chunk.len() {
            let Some(&b) = chunk.get(i) else { break };
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.line {
                Line::Data => {
                    // The value up to the line's end, in one piece.
                    let rest = chunk.get(i..).unwrap_or_default();
                    let end = find_line_end(rest);
                    self.data_bytes(rest.get(..end).unwrap_or_default())?;
                    i += end;
                    if let Some(&eol) = chunk.get(i) {
                        self.after_cr = eol == b'\r';
                        self.end_data_line()?;
                        self.line = Line::Start;
                        i += 1;
                    }
                }
                Line::Ignore => {
                    let rest = chunk.get(i..).unwrap_or_default();
                    match Some(find_line_end(rest)).filter(|&end| end < rest.len()) {
                        Some(end) => {
                            i += end;
                            self.after_cr = chunk.get(i) == Some(&b'\r');
                            self.line = Line::Start;
                            i += 1;
                        }
                        None => i = chunk.len(),
                    }
                }
                Line::Start => {
                    i += 1;
                    match b {
                        b'\n' | b'\r' => {
                            self.after_cr = b == b'\r';
                            self.blank_line()?;
                        }
                        b':' => self.line = Line::Ignore,
                        _ => {
                            self.field_len = 0;
                            self.field_long = false;
                            self.line = Line::Field;
                            self.field_byte(b);
                        }
                    }
                }
                Line::Field => {
                    i += 1;
                    match b {
                        b':' => {
                            self.line = if self.is_data() {
                                Line::DataColon
                            } else {
                                Line::Ignore
                            };
                        }
                        b'\n' | b'\r' => {
                            // A field without a value: `data` alone is an empty data line.
                            self.after_cr = b == b'\r';
                            if self.is_data() {
                                self.end_data_line()?;
                            }
                            self.line = Line::Start;
                        }
                        _ => self.field_byte(b),
                    }
                }
                Line::DataColon => {
                    self.line = Line::Data;
                    if b == b' ' {
                        i += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn field_byte(&mut self, b: u8) {
        match self.field.get_mut(self.field_len as usize) {
            Some(slot) => {
                *slot = b;
                self.field_len += 1;
            }
            None => self.field_long = true,
        }
    }

    fn is_data(&self) -> bool {
        !self.field_long && self.field_len == 4 && &self.field == b"data"
    }

    /// Bytes of a data line's value.
    fn data_bytes(&mut self, mut bytes: &[u8]) -> Result<(), DocError> {
        while !bytes.is_empty() {
            match self.data {
                Data::Json => {
                    // Content seen before an error in the same piece still counts as seen, as
                    // it would had the piece come byte by byte.
                    let fed = self.doc.feed(bytes);
                    if self.doc.content {
                        self.content = true;
                    }
                    return fed;
                }
                Data::Empty => {
                    let ws = bytes
                        .iter()
                        .position(|&b| !matches!(b, b' ' | b'\t'))
                        .unwrap_or(bytes.len());
                    bytes = bytes.get(ws..).unwrap_or_default();
                    match bytes.first() {
                        Some(b'[') => self.data = Data::Done(0),
                        Some(_) => self.data = Data::Json,
                        None => {}
                    }
                }
                Data::Done(n) => {
                    let n = n as usize;
                    if n == DONE.len() {
                        // Only whitespace may follow.
                        if bytes.iter().any(|&b| !matches!(b, b' ' | b'\t')) {
                            return Err(DocError::Malformed);
                        }
                        return Ok(());
                    }
                    let take = (DONE.len() - n).min(bytes.len());
                    if bytes.get(..take) != DONE.get(n..n + take) {
                        return Err(DocError::Malformed);
                    }
                    self.data = Data::Done((n + take) as u8);
                    bytes = bytes.get(take..).unwrap_or_default();
                }
            }
        }
        Ok(())
    }

    /// A data line ended: SSE joins an event's data lines with a line feed, which JSON reads
    /// as whitespace.
    fn end_data_line(&mut self) -> Result<(), DocError> {
        self.line = Line::Start;
        if self.data == Data::Json {
            self.doc.feed(b"\n")?;
        }
        Ok(())
    }

    /// A blank line: the event is complete.
    fn blank_line(&mut self) -> Result<(), DocError> {
        let whole = match self.data {
            Data::Empty => true,
            Data::Json => self.doc.complete(),
            Data::Done(n) => n as usize == DONE.len(),
        };
        if !whole {
            return Err(DocError::Malformed);
        }
        self.dispatch()
    }

    /// Takes the finished event's usage, and starts the next event.
    fn dispatch(&mut self) -> Result<(), DocError> {
        if self.data == Data::Json {
            if let Some(usage) = self.doc.usage {
                self.usage = Some(usage);
            }
            self.doc = Doc::new();
        }
        self.data = Data::Empty;
        Ok(())
    }
}

/// Time per output token after the first, in milliseconds (rounded), from the first token's
/// time, the end of the stream and the output tokens; `None` below two tokens.
pub fn time_per_output_token_ms(first_ns: u64, end_ns: u64, output_tokens: u64) -> Option<u64> {
    if output_tokens < 2 || end_ns < first_ns {
        return None;
    }
    let per = (end_ns - first_ns) / (output_tokens - 1);
    Some((per + 500_000) / 1_000_000)
}

/// Milliseconds between two host times in nanoseconds, rounded; 0 if the clock went back.
pub fn elapsed_ms(from_ns: u64, to_ns: u64) -> u64 {
    (to_ns.saturating_sub(from_ns) + 500_000) / 1_000_000
}
