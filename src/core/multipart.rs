//! A push-style `multipart/form-data` scanner that finds the `model` form field.
//!
//! OpenAI's audio endpoints (`/v1/audio/transcriptions`, `/v1/audio/translations`) take a
//! form upload: the audio file and the parameters, `model` among them, as parts. Like the JSON
//! scanner, this one takes each chunk once, keeps a fixed amount of state (the part headers,
//! bounded, and the `model` value, bounded) and never needs earlier bytes again.
//!
//! Delimiter search needs no buffering across chunks: the delimiter is `CRLF--boundary`, and a
//! boundary cannot contain CR (RFC 2046 `bchars`), so after a partial match fails the only
//! place a new match can start is the current byte.

use crate::core::json::scanner::{model_value, remember, ScanError, Step};
use crate::core::json::vector::find_byte;

/// Longest part-header block accepted (all header lines of one part).
pub const MAX_PART_HEADER_BYTES: usize = 8 * 1024;
/// Longest boundary allowed by RFC 2046.
pub const MAX_BOUNDARY_LEN: usize = 70;

/// Extracts and checks the boundary parameter of a `multipart/form-data` content type.
pub fn boundary_of(content_type: &str) -> Result<String, &'static str> {
    let mut params = content_type.split(';');
    let media_type = params.next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("multipart/form-data") {
        return Err("not multipart/form-data");
    }
    let mut boundary = None;
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("boundary") {
            let value = value.trim();
            let value = match value.strip_prefix('"') {
                Some(quoted) => quoted
                    .strip_suffix('"')
                    .ok_or("unterminated quoted boundary")?,
                None => value,
            };
            boundary = Some(value.to_string());
        }
    }
    let boundary = boundary.ok_or("no boundary parameter")?;
    let is_bchar = |c: char| c.is_ascii_alphanumeric() || "'()+_,-./:=? ".contains(c);
    if boundary.is_empty()
        || boundary.len() > MAX_BOUNDARY_LEN
        || !boundary.chars().all(is_bchar)
        || boundary.ends_with(' ')
    {
        return Err("invalid boundary");
    }
    Ok(boundary)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter (a preamble may precede it).
    Preamble,
    /// Just after a delimiter: `--` (the end) or transport padding then CRLF.
    AfterDelimiter,
    /// After a delimiter's first `-`: the second `-` closes the body.
    CloseDash,
    /// Linear whitespace after a delimiter, before its CRLF.
    Padding,
    /// After the CR that ends a delimiter line.
    DelimiterCr,
    /// In a part's header block.
    Headers,
    /// In a part's content.
    Content,
    /// After the close delimiter: the epilogue, ignored.
    Epilogue,
}

/// The scanner for one multipart body.
#[derive(Debug, Clone)]
pub struct MultipartScanner {
    /// `\r\n--boundary`.
    delimiter: Vec<u8>,
    /// How many bytes of `delimiter` the input currently matches.
    matched: usize,
    state: State,
    /// The header block of the current part.
    headers: Vec<u8>,
    /// The current part is the `model` field.
    in_model: bool,
    model_seen: bool,
    /// The `model` part has ended.
    model_complete: bool,
    model: Vec<u8>,
    max_model_bytes: usize,
    offset: u64,
    failed: Option<ScanError>,
}

impl MultipartScanner {
    /// A scanner for a body with this (already checked) boundary.
    pub fn new(boundary: &str, max_model_bytes: usize) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        MultipartScanner {
            delimiter,
            // The body's first delimiter needs no CRLF before it: start as if one was seen.
            matched: 2,
            state: State::Preamble,
            headers: Vec::new(),
            in_model: false,
            model_seen: false,
            model_complete: false,
            model: Vec::new(),
            max_model_bytes,
            offset: 0,
            failed: None,
        }
    }

    /// Feeds the next chunk; [`Step::NeedMore`] until the end, or an error.
    pub fn feed(&mut self, chunk: &[u8]) -> Step {
        if let Some(err) = &self.failed {
            return Step::Error(err.clone());
        }
        let mut i = 0;
        while i < chunk.len() {
            // Fast path: outside the `model` part, content (and the preamble) is only watched
            // for the delimiter, whose one CR is its first byte. With no partial match pending,
            // every byte up to the next CR is plain content: skip to it (an audio file is
            // megabytes of it).
            if self.matched == 0
                && !self.in_model
                && matches!(self.state, State::Content | State::Preamble)
            {
                let skip = find_byte(b'\r', &chunk[i..]);
                i += skip;
                self.offset += skip as u64;
                if i == chunk.len() {
                    break;
                }
            }
            if let Err(err) = self.byte(chunk[i]) {
                return remember(&mut self.failed, Step::Error(err));
            }
            self.offset += 1;
            i += 1;
        }
        Step::NeedMore
    }

    /// Ends the body: [`Step::Found`] or [`Step::Error`].
    pub fn finish(&mut self) -> Step {
        if let Some(err) = &self.failed {
            return Step::Error(err.clone());
        }
        let result = match self.state {
            State::Epilogue => self.verdict(),
            State::Preamble => Err(self.invalid("no multipart boundary found in the body")),
            _ => Err(self.invalid("the body ends before the closing boundary (truncated part)")),
        };
        remember(&mut self.failed, result.into())
    }

    /// The verdict on the `model` field as soon as its part has ended (see
    /// `ModelScanner::early_model`).
    pub fn early_model(&self) -> Option<Step> {
        if self.failed.is_some() || !self.model_complete {
            return None;
        }
        Some(self.verdict().into())
    }

    fn verdict(&self) -> Result<String, ScanError> {
        if !self.model_seen {
            return Err(ScanError::MissingModel);
        }
        model_value(&self.model)
    }

    fn invalid(&self, reason: &'static str) -> ScanError {
        ScanError::InvalidMultipart {
            offset: self.offset,
            reason,
        }
    }

    fn byte(&mut self, b: u8) -> Result<(), ScanError> {
        match self.state {
            State::Preamble | State::Content => self.content_byte(b),
            State::AfterDelimiter => match b {
                b'-' => {
                    self.state = State::CloseDash;
                    Ok(())
                }
                b' ' | b'\t' => {
                    self.state = State::Padding;
                    Ok(())
                }
                b'\r' => {
                    self.state = State::DelimiterCr;
                    Ok(())
                }
                _ => Err(self.invalid("unexpected bytes after a boundary")),
            },
            State::CloseDash => match b {
                b'-' => {
                    self.state = State::Epilogue;
                    Ok(())
                }
                _ => Err(self.invalid("unexpected bytes after a boundary")),
            },
            State::Padding => match b {
                b' ' | b'\t' => Ok(()),
                b'\r' => {
                    self.state = State::DelimiterCr;
                    Ok(())
                }
                _ => Err(self.invalid("unexpected bytes after a boundary")),
            },
            State::DelimiterCr => match b {
                b'\n' => {
                    self.headers.clear();
                    self.state = State::Headers;
                    Ok(())
                }
                _ => Err(self.invalid("a boundary line must end with CRLF")),
            },
            State::Headers => {
                if self.headers.len() >= MAX_PART_HEADER_BYTES {
                    return Err(self.invalid("part headers too long"));
                }
                self.headers.push(b);
                if self.headers.ends_with(b"\r\n\r\n") {
                    self.start_content()?;
                } else if self.headers.as_slice() == b"\r\n" {
                    // A part with no headers at all: content starts right away.
                    self.start_content()?;
                }
                Ok(())
            }
            State::Epilogue => Ok(()),
        }
    }

    /// Content bytes (or preamble): watch for the delimiter, keep the model value.
    fn content_byte(&mut self, b: u8) -> Result<(), ScanError> {
        if self.delimiter.get(self.matched) == Some(&b) {
            self.matched += 1;
            if self.matched == self.delimiter.len() {
                self.matched = 0;
                self.end_part();
                self.state = State::AfterDelimiter;
            }
            return Ok(());
        }
        // The partial match was content after all.
        if self.matched > 0 {
            let held = self.matched;
            self.matched = 0;
            if self.state == State::Content {
                for i in 0..held {
                    let byte = self.delimiter.get(i).copied().unwrap_or(b'\r');
                    self.keep(byte)?;
                }
            }
            // The delimiter's only CR is its first byte, so a match can restart only here.
            if b == b'\r' {
                self.matched = 1;
                return Ok(());
            }
        }
        if self.state == State::Content {
            self.keep(b)?;
        }
        Ok(())
    }

    fn keep(&mut self, b: u8) -> Result<(), ScanError> {
        if self.in_model {
            if self.model.len() >= self.max_model_bytes {
                return Err(ScanError::ModelTooLong {
                    limit: self.max_model_bytes,
                });
            }
            self.model.push(b);
        }
        Ok(())
    }

    fn end_part(&mut self) {
        if self.in_model {
            self.model_complete = true;
        }
        self.in_model = false;
    }

    /// The header block is complete: is this the `model` field?
    fn start_content(&mut self) -> Result<(), ScanError> {
        let name = part_name(&self.headers).map_err(|why| self.invalid(why))?;
        let is_model = name.as_deref() == Some("model");
        self.headers.clear();
        if is_model {
            if self.model_seen {
                return Err(ScanError::DuplicateModel);
            }
            self.model_seen = true;
        }
        self.in_model = is_model;
        self.state = State::Content;
        // The delimiter that ends this part starts with the CRLF before it.
        self.matched = 0;
        Ok(())
    }
}

/// The `name` parameter of a part's `Content-Disposition: form-data` header, or `None` when the
/// part has none (it is then not the `model` field).
///
/// Where readers could disagree about which part is `model`, the part is refused rather than
/// read one way: the backend's form parser (Starlette under vLLM) keeps the last of repeated
/// headers and parameters and honours quoting, so a first-one-wins reading here would let a
/// client route by one model while the backend serves another.
pub fn part_name(headers: &[u8]) -> Result<Option<String>, &'static str> {
    let text = String::from_utf8_lossy(headers);
    let mut name: Option<Option<String>> = None;
    for line in text.split("\r\n") {
        let Some((header, value)) = line.split_once(':') else {
            continue;
        };
        if !header.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        if name.is_some() {
            return Err("a part has more than one Content-Disposition header");
        }
        name = Some(disposition_name(value)?);
    }
    Ok(name.flatten())
}

/// The `name` parameter of one `Content-Disposition` value.
fn disposition_name(value: &str) -> Result<Option<String>, &'static str> {
    let params = split_parameters(value)?;
    let mut params = params.into_iter();
    if !params
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("form-data")
    {
        return Ok(None);
    }
    let mut name = None;
    for param in params {
        let Some((key, val)) = param.split_once('=') else {
            continue;
        };
        let key = key.trim();
        // `name*` is RFC 5987's encoded form of the same parameter.
        if key.eq_ignore_ascii_case("name") || key.eq_ignore_ascii_case("name*") {
            if name.is_some() {
                return Err("a part has more than one name parameter");
            }
            name = Some(unquote(val.trim())?);
        }
    }
    Ok(name)
}

/// Splits a header value on `;`, except inside quoted strings.
fn split_parameters(value: &str) -> Result<Vec<&str>, &'static str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err("an unterminated quoted string in Content-Disposition");
    }
    parts.push(&value[start..]);
    Ok(parts)
}

/// A parameter value: a token, or a quoted string. Escapes inside a part name are refused:
/// parsers differ on them.
fn unquote(value: &str) -> Result<String, &'static str> {
    match value.strip_prefix('"') {
        Some(inner) => {
            let inner = inner
                .strip_suffix('"')
                .ok_or("a malformed quoted part name")?;
            if inner.contains(['"', '\\']) {
                return Err("escaped characters in a part name");
            }
            Ok(inner.to_string())
        }
        None => Ok(value.to_string()),
    }
}
