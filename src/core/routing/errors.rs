//! The errors the filter answers itself, as OpenAI-style JSON that OpenAI clients understand:
//! `{"error": {"message", "type", "param", "code"}}`.

use crate::core::json::scanner::ScanError;
use serde_json::json;
use std::fmt;

/// A request the filter refuses, with everything needed to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The body is not valid JSON, or its top level is not an object.
    InvalidJson(String),
    /// A `multipart/form-data` body that cannot be read (bad boundary, truncated part).
    InvalidMultipart(String),
    /// No top-level `model` (no `model` form field for multipart).
    MissingModel,
    /// `model` is unusable: not a string, empty, control characters, too long.
    InvalidModel(String),
    /// Two top-level `model` keys.
    DuplicateModel,
    /// No configured base model or adapter has this name.
    ModelNotFound(String),
    /// The body is larger than `maxBodyBytes`.
    TooLarge { limit: u64 },
    /// The body is not something we can read (content type or encoding).
    UnsupportedMediaType(String),
    /// No source lists the model yet, and some pool has not answered its first poll: the
    /// model may well exist, so 503 with `Retry-After` rather than 404.
    DiscoveryPending {
        model: String,
        retry_after_secs: u64,
    },
    /// This worker holds more body bytes than `maxHeldBodyBytes`, and this request's body is
    /// one of the large ones (over `shedBodiesOverBytes`): 503 with `Retry-After`.
    Overloaded,
}

/// `Retry-After` of an [`Rejection::Overloaded`] answer: held bodies drain in seconds.
pub const OVERLOADED_RETRY_AFTER_SECS: u64 = 1;

impl Rejection {
    pub fn status(&self) -> u32 {
        match self {
            Rejection::InvalidJson(_)
            | Rejection::InvalidMultipart(_)
            | Rejection::MissingModel
            | Rejection::InvalidModel(_)
            | Rejection::DuplicateModel => 400,
            Rejection::ModelNotFound(_) => 404,
            Rejection::TooLarge { .. } => 413,
            Rejection::UnsupportedMediaType(_) => 415,
            Rejection::DiscoveryPending { .. } | Rejection::Overloaded => 503,
        }
    }

    /// The machine-readable `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::InvalidJson(_) => "invalid_json",
            Rejection::InvalidMultipart(_) => "invalid_multipart",
            Rejection::MissingModel => "missing_model",
            Rejection::InvalidModel(_) => "invalid_model",
            Rejection::DuplicateModel => "duplicate_model",
            Rejection::ModelNotFound(_) => "model_not_found",
            Rejection::TooLarge { .. } => "request_too_large",
            Rejection::UnsupportedMediaType(_) => "unsupported_media_type",
            Rejection::DiscoveryPending { .. } => "model_discovery_pending",
            // The same code as Envoy's own overload answer (envoy.yaml's local_reply_config).
            Rejection::Overloaded => "gateway_overloaded",
        }
    }

    /// The `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::DiscoveryPending { .. } | Rejection::Overloaded => {
                "service_unavailable_error"
            }
            _ => "invalid_request_error",
        }
    }

    /// The `Retry-After` header's seconds, for answers that ask the client to come back.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Rejection::DiscoveryPending {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Rejection::Overloaded => Some(OVERLOADED_RETRY_AFTER_SECS),
            _ => None,
        }
    }

    /// The request field the error is about, as OpenAI's `error.param`.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Rejection::MissingModel
            | Rejection::InvalidModel(_)
            | Rejection::DuplicateModel
            | Rejection::ModelNotFound(_)
            | Rejection::DiscoveryPending { .. } => Some("model"),
            Rejection::InvalidJson(_)
            | Rejection::InvalidMultipart(_)
            | Rejection::TooLarge { .. }
            | Rejection::Overloaded
            | Rejection::UnsupportedMediaType(_) => None,
        }
    }

    /// The JSON body of the answer.
    pub fn body(&self) -> String {
        error_body(&self.to_string(), self.kind(), self.param(), self.code())
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::InvalidJson(detail) => {
                write!(
                    f,
                    "We could not parse the JSON body of your request: {detail}"
                )
            }
            Rejection::InvalidMultipart(detail) => {
                write!(
                    f,
                    "We could not read the multipart/form-data body of your request: {detail}"
                )
            }
            Rejection::MissingModel => f.write_str("You must provide a model parameter."),
            Rejection::InvalidModel(detail) => write!(f, "Invalid 'model': {detail}."),
            Rejection::DuplicateModel => f.write_str(
                "The 'model' parameter appears more than once in the request body; send it once.",
            ),
            Rejection::ModelNotFound(model) => write!(
                f,
                "The model `{model}` does not exist or you do not have access to it."
            ),
            Rejection::TooLarge { limit } => write!(
                f,
                "The request body is larger than this gateway accepts ({limit} bytes)."
            ),
            Rejection::UnsupportedMediaType(detail) => write!(f, "{detail}"),
            Rejection::DiscoveryPending {
                model,
                retry_after_secs,
            } => write!(
                f,
                "The gateway is still discovering the models its pools serve and does not know \
                 `{model}` yet. Retry in {retry_after_secs} s."
            ),
            Rejection::Overloaded => write!(
                f,
                "The gateway is holding too many large request bodies right now. Retry in \
                 {OVERLOADED_RETRY_AFTER_SECS} s."
            ),
        }
    }
}

impl From<ScanError> for Rejection {
    fn from(err: ScanError) -> Self {
        match err {
            ScanError::InvalidJson { .. } | ScanError::NotAnObject | ScanError::TooDeep { .. } => {
                Rejection::InvalidJson(err.to_string())
            }
            ScanError::InvalidMultipart { .. } => Rejection::InvalidMultipart(err.to_string()),
            ScanError::MissingModel => Rejection::MissingModel,
            ScanError::DuplicateModel => Rejection::DuplicateModel,
            ScanError::ModelNotString { .. }
            | ScanError::ModelEmpty
            | ScanError::ModelControlCharacter
            | ScanError::ModelInvalidUnicode
            | ScanError::ModelTooLong { .. } => Rejection::InvalidModel(err.to_string()),
        }
    }
}

/// An OpenAI-style error body. serde_json does the escaping, so a model name a client sent
/// cannot break the JSON.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: &str) -> String {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}}).to_string()
}
