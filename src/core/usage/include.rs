//! Asking the server for a stream's token usage when the client did not
//! (`usage.addIncludeUsage`, off by default).
//!
//! OpenAI's API sends a stream's usage only when the request says
//! `"stream_options": {"include_usage": true}`; vLLM and llama-server follow it (llama-server
//! ends a completions stream with usage either way, a chat stream only when asked). A streamed
//! request without it leaves the gateway nothing to count (`absent`). With the setting on, the
//! filter adds the member to such a request, and the client receives what it would have
//! received had it asked: one more event before `[DONE]`, a chunk with an empty `choices` list
//! and the `usage` object. A client that reads `choices[0]` of every chunk without checking
//! would fail on it, which is why it is off unless the operator turns it on.
//!
//! Only a request that left the matter open is changed: `stream` is the literal `true` and the
//! body has no `stream_options` member at all. A client that wrote `stream_options`, with
//! `include_usage` false or absent or as `null`, asked for something; it gets it unchanged (a
//! second member would make the body mean what the server's parser makes of a duplicate key).
//!
//! The edit is the smallest the host allows: Envoy's body buffer can replace its first bytes
//! (`Buffer::copyFrom` with start 0 drains `length` bytes and prepends the new ones:
//! source/extensions/common/wasm/context.cc), so the top-level `{` becomes
//! `{"stream_options":{"include_usage":true},`. The object has at least the `stream` member, so
//! the comma is always followed by one.

use crate::core::json::scanner::StreamFields;

/// What replaces the top-level object's opening brace.
pub const OPENING: &[u8] = br#"{"stream_options":{"include_usage":true},"#;

/// One edit of a request body: bytes `0..replace` become [`OPENING`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyEdit {
    /// How many bytes at the start of the body are replaced (leading whitespace and the `{`).
    pub replace: u64,
    /// The body's length after the edit, for `content-length`.
    pub new_length: u64,
}

/// The edit that asks for a stream's usage, when the body (complete and valid, `body_len`
/// bytes) is a stream that left it open; `None` otherwise.
pub fn include_usage_edit(fields: StreamFields, body_len: u64) -> Option<BodyEdit> {
    if !fields.stream || fields.stream_options {
        return None;
    }
    let replace = fields.object_start.checked_add(1)?;
    if replace > body_len {
        return None;
    }
    Some(BodyEdit {
        replace,
        new_length: body_len - replace + OPENING.len() as u64,
    })
}

/// `body` with the edit applied (what Envoy's buffer holds after it; for tests and fuzzing).
pub fn apply(body: &[u8], edit: BodyEdit) -> Vec<u8> {
    let cut = usize::try_from(edit.replace)
        .unwrap_or(usize::MAX)
        .min(body.len());
    let mut out = Vec::with_capacity(body.len() - cut + OPENING.len());
    out.extend_from_slice(OPENING);
    out.extend_from_slice(&body[cut..]);
    out
}
