//! What to do with a request, decided from its headers and then from its body.

use super::discovery::RoutingView;
use super::errors::Rejection;
use super::table::{Router, ServedModel, UnknownModel};
use crate::core::affinity::prefix::{block_hashes, key_header_value, CaptureState, PromptCapture};
use crate::core::json::scanner::{ModelScanner, Step, StreamFields};
use crate::core::multipart::{boundary_of, MultipartScanner};

/// The request headers the decision needs. Names are looked up by the adapter.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// `:path`, query included.
    pub path: &'a str,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    pub content_length: Option<&'a str>,
}

/// What the headers alone decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadAction {
    /// Not an inference request: let it through untouched (routing headers already removed).
    Pass,
    /// `GET` of the model list: answer it from the configuration.
    ServeModelList,
    /// Refuse it now.
    Reject(Rejection),
    /// Hold the headers and read the body with this scanner.
    Inspect(Box<BodyScanner>),
}

/// The scanner for the kind of body the request declared.
#[derive(Debug, Clone)]
pub enum BodyScanner {
    Json(ModelScanner),
    Multipart(MultipartScanner),
}

impl BodyScanner {
    /// Feeds the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Step {
        match self {
            BodyScanner::Json(s) => s.feed(chunk),
            BodyScanner::Multipart(s) => s.feed(chunk),
        }
    }

    /// The verdict on `model` once it is read whole, before the body ends.
    pub fn early_model(&self) -> Option<Step> {
        match self {
            BodyScanner::Json(s) => s.early_model(),
            BodyScanner::Multipart(s) => s.early_model(),
        }
    }

    /// Ends the body.
    pub fn finish(&mut self) -> Step {
        match self {
            BodyScanner::Json(s) => s.finish(),
            BodyScanner::Multipart(s) => s.finish(),
        }
    }

    /// What a JSON body says about streaming (see [`ModelScanner::stream_fields`]); `None` for
    /// a multipart body, which has no such fields.
    pub fn stream_fields(&self) -> Option<StreamFields> {
        match self {
            BodyScanner::Json(s) => Some(s.stream_fields()),
            BodyScanner::Multipart(_) => None,
        }
    }
}

/// Scanners compare equal by kind: enough for tests of the classification.
impl PartialEq for BodyScanner {
    fn eq(&self, other: &Self) -> bool {
        matches!(
            (self, other),
            (BodyScanner::Json(_), BodyScanner::Json(_))
                | (BodyScanner::Multipart(_), BodyScanner::Multipart(_))
        )
    }
}

impl Eq for BodyScanner {}

/// What the body decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'r> {
    /// Set the routing headers for this model and continue.
    Route(&'r ServedModel),
    /// Unknown model with `unknownModel: passthrough`: continue without routing headers.
    Pass,
    /// Refuse it.
    Reject(Rejection),
}

/// The path without its query string or fragment.
fn path_only(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

/// Whether a request to `path` (query and fragment allowed) is one whose stream can carry
/// usage: the completions APIs (`/v1/chat/completions`, `/v1/completions`).
pub fn is_completions_path(path: &str) -> bool {
    path_only(path).ends_with("/completions")
}

impl Router {
    /// Whether a stream of this request is asked for its usage if it left that open
    /// (`usage.addIncludeUsage` on a completions path; `core::usage::include`).
    pub fn may_ask_stream_usage(&self, head: &RequestHead<'_>) -> bool {
        self.usage.enabled && self.usage.add_include_usage && is_completions_path(head.path)
    }

    /// Decides from the request headers.
    pub fn classify(&self, head: &RequestHead<'_>) -> HeadAction {
        let path = path_only(head.path);
        if let Some(list_path) = &self.model_list_path {
            if (head.method == "GET" || head.method == "HEAD") && path == list_path {
                return HeadAction::ServeModelList;
            }
        }
        if head.method != "POST"
            || !self
                .path_prefixes
                .iter()
                .any(|p| path.starts_with(p.as_str()))
        {
            return HeadAction::Pass;
        }
        let mut scanner = BodyScanner::Json(ModelScanner::new(self.max_model_name_bytes));
        if let Some(ct) = head.content_type {
            let media_type = ct.split(';').next().unwrap_or("").trim();
            if media_type.eq_ignore_ascii_case("multipart/form-data")
                && self.multipart_paths.iter().any(|p| p == path)
            {
                match boundary_of(ct) {
                    Ok(boundary) => {
                        scanner = BodyScanner::Multipart(MultipartScanner::new(
                            &boundary,
                            self.max_model_name_bytes,
                        ))
                    }
                    Err(why) => {
                        return HeadAction::Reject(Rejection::InvalidMultipart(format!(
                            "{why} in Content-Type"
                        )))
                    }
                }
            } else if !media_type.eq_ignore_ascii_case("application/json") {
                return HeadAction::Reject(Rejection::UnsupportedMediaType(format!(
                    "Content-Type {media_type:?} is not supported here; send application/json."
                )));
            }
        }
        if let Some(ce) = head.content_encoding {
            let ce = ce.trim();
            if !ce.is_empty() && !ce.eq_ignore_ascii_case("identity") {
                // The model sits inside the compressed bytes; decompressing in the filter would
                // cost what the filter exists to save, so such bodies are refused clearly.
                return HeadAction::Reject(Rejection::UnsupportedMediaType(format!(
                    "Content-Encoding {ce:?} is not supported here; send the body uncompressed."
                )));
            }
        }
        if let Some(length) = head
            .content_length
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            if length > self.max_body_bytes {
                return HeadAction::Reject(Rejection::TooLarge {
                    limit: self.max_body_bytes,
                });
            }
        }
        HeadAction::Inspect(Box::new(scanner))
    }

    /// Decides from the scanner's final step (after `finish`, or an error from `feed`).
    pub fn decide(&self, step: Step) -> Option<Verdict<'_>> {
        match step {
            Step::NeedMore => None,
            Step::Error(err) => Some(Verdict::Reject(err.into())),
            Step::Found(model) => Some(match self.lookup(&model) {
                Some(served) => Verdict::Route(served),
                None => match self.unknown_model {
                    UnknownModel::Reject => Verdict::Reject(Rejection::ModelNotFound(model)),
                    UnknownModel::Passthrough => Verdict::Pass,
                },
            }),
        }
    }

    /// A prompt capture for this request's body, when prefix affinity is on and the body is
    /// JSON (multipart audio uploads carry no prompt to share).
    pub fn prompt_capture(&self, scanner: &BodyScanner) -> Option<PromptCapture> {
        match (&self.prefix_affinity, scanner) {
            (Some(affinity), BodyScanner::Json(_)) => {
                Some(PromptCapture::new(affinity.capture_bytes()))
            }
            _ => None,
        }
    }

    /// The prompt's chained block hashes for a routed request, computed once for both the
    /// prefix key and the endpoint picker: as many as either needs (`prefixBlocks`,
    /// `picker.maxBlocks`). The model as requested (an adapter's KV cache is its own) seeds the
    /// chain. Empty without prefix affinity, a settled capture or a complete block.
    pub fn prompt_hashes(&self, capture: &PromptCapture, model: &str) -> Vec<u64> {
        let Some(affinity) = self.prefix_affinity.as_ref() else {
            return Vec::new();
        };
        if capture.state() != CaptureState::Done {
            return Vec::new();
        }
        let blocks = affinity
            .picker
            .as_ref()
            .map_or(affinity.prefix_blocks, |p| {
                p.max_blocks.max(affinity.prefix_blocks)
            });
        match capture.prompt() {
            Some(prompt) => block_hashes(model, prompt, affinity.block_bytes, blocks),
            None => Vec::new(),
        }
    }

    /// The prefix-key header value from [`Router::prompt_hashes`]: the chain after
    /// `prefixBlocks` blocks, or after the last complete one. `None` without one.
    pub fn key_of(&self, hashes: &[u64]) -> Option<String> {
        let affinity = self.prefix_affinity.as_ref()?;
        hashes
            .get(..affinity.prefix_blocks.min(hashes.len()))?
            .last()
            .copied()
            .map(key_header_value)
    }

    /// The hashes the endpoint picker matches, from [`Router::prompt_hashes`]: up to
    /// `picker.maxBlocks`; none without a picker (it then chooses by load alone).
    pub fn picker_part<'a>(&self, hashes: &'a [u64]) -> &'a [u64] {
        let max = self
            .prefix_affinity
            .as_ref()
            .and_then(|a| a.picker.as_ref())
            .map_or(0, |p| p.max_blocks);
        hashes.get(..max.min(hashes.len())).unwrap_or_default()
    }

    /// The prefix-key header value for a routed request ([`Router::key_of`] of
    /// [`Router::prompt_hashes`]).
    pub fn prefix_key(&self, capture: &PromptCapture, model: &str) -> Option<String> {
        self.key_of(&self.prompt_hashes(capture, model))
    }

    /// The chained block hashes the endpoint picker matches ([`Router::picker_part`] of
    /// [`Router::prompt_hashes`]).
    pub fn picker_blocks(&self, capture: &PromptCapture, model: &str) -> Vec<u64> {
        self.picker_part(&self.prompt_hashes(capture, model))
            .to_vec()
    }

    /// The `GET /v1/models` body of the static models, in OpenAI's list format. `created` is
    /// a Unix time. (The filter answers from its [`RoutingView`], which adds discovered ones.)
    pub fn model_list_body(&self, created: u64) -> String {
        RoutingView::from_static(self).model_list_body(created)
    }
}
