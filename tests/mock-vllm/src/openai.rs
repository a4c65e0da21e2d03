//! OpenAI/vLLM request parsing and response shapes (pure functions, no I/O).
//!
//! Shapes follow vLLM's OpenAI server (`vllm/entrypoints/openai/...`):
//! errors are `{"error": {"message", "type", "param", "code": <int>}}`; request
//! validation failures (FastAPI `RequestValidationError`) are 400 with type
//! `"Bad Request"` and a pydantic-style message; an unknown model is 404
//! `NotFoundError` with param `model`.

use serde_json::{json, Value};

use crate::state::Finish;

/// vLLM's default `max_tokens` for /v1/completions.
pub const DEFAULT_MAX_TOKENS: u64 = 16;
/// Upper bound on generated tokens per request, whatever is asked.
pub const MAX_TOKENS_CAP: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// What the mock needs from an inference request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceRequest {
    /// `None` when the body has no `model` (vLLM then serves the base model).
    pub model: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// The `max_tokens` (or chat `max_completion_tokens`) asked for, if any.
    pub max_tokens: Option<i64>,
    pub prompt_tokens: u64,
}

impl InferenceRequest {
    /// Tokens to generate and how the request finishes: an explicit limit is hit
    /// ("length"); without one the mock "emits EOS" after the default ("stop").
    pub fn plan(&self) -> (u64, Finish) {
        match self.max_tokens {
            Some(n) => ((n.max(1) as u64).min(MAX_TOKENS_CAP), Finish::Length),
            None => (DEFAULT_MAX_TOKENS, Finish::Stop),
        }
    }
}

/// An error response: HTTP status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub body: Value,
}

pub fn error_body(status: u16, message: &str, typ: &str, param: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": typ, "param": param, "code": status}})
}

fn api_error(status: u16, message: &str, typ: &str, param: Option<&str>) -> ApiError {
    ApiError {
        status,
        body: error_body(status, message, typ, param),
    }
}

/// vLLM's answer to a request for a model it does not serve.
pub fn model_not_found(model: &str) -> ApiError {
    api_error(
        404,
        &format!("The model `{model}` does not exist."),
        "NotFoundError",
        Some("model"),
    )
}

/// A FastAPI/pydantic validation error as vLLM's handler renders it.
fn validation_error(param: &str, entry: String) -> ApiError {
    api_error(
        400,
        &format!("1 validation error:\n  {entry}"),
        "Bad Request",
        Some(param),
    )
}

fn short_repr(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 64 {
        let mut cut = 64;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &s[..cut])
    } else {
        s
    }
}

fn type_error(field: &str, kind: &str, what: &str, input: &Value) -> ApiError {
    validation_error(
        &format!("body.{field}"),
        format!(
            "{{'type': '{kind}', 'loc': ('body', '{field}'), 'msg': 'Input should be a valid {what}', 'input': {}}}",
            short_repr(input)
        ),
    )
}

/// Byte offset of a serde_json error, like Python's `JSONDecodeError.pos`.
fn error_offset(body: &[u8], line: usize, column: usize) -> usize {
    if line == 0 {
        return 0;
    }
    let mut offset = 0;
    for (i, l) in body.split(|&b| b == b'\n').enumerate() {
        if i + 1 == line {
            return (offset + column.saturating_sub(1)).min(body.len());
        }
        offset += l.len() + 1;
    }
    body.len()
}

/// The body as a JSON object, or the validation error vLLM's FastAPI layer answers.
fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(validation_error(
            "body",
            "{'type': 'missing', 'loc': ('body',), 'msg': 'Field required', 'input': None}".into(),
        ));
    }
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            let pos = if e.is_eof() {
                body.len()
            } else {
                error_offset(body, e.line(), e.column())
            };
            let msg = e.to_string().replace('\'', "\"");
            return Err(validation_error(
                &format!("body.{pos}"),
                format!(
                    "{{'type': 'json_invalid', 'loc': ('body', {pos}), 'msg': 'JSON decode error', 'input': {{}}, 'ctx': {{'error': '{msg}'}}}}"
                ),
            ));
        }
    };
    match v {
        Value::Object(obj) => Ok(obj),
        other => Err(validation_error(
            "body",
            format!(
                "{{'type': 'model_attributes_type', 'loc': ('body',), 'msg': 'Input should be a valid dictionary or object to extract fields from', 'input': {}}}",
                short_repr(&other)
            ),
        )),
    }
}

/// `POST /v1/load_lora_adapter` / `unload_lora_adapter` bodies (vLLM's
/// `LoadLoRAAdapterRequest {lora_name, lora_path, load_inplace=False}` and
/// `UnloadLoRAAdapterRequest {lora_name, lora_int_id=None}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterRequest {
    pub lora_name: String,
    /// Empty for an unload.
    pub lora_path: String,
    pub load_inplace: bool,
}

/// Parses a load (`load = true`: `lora_path` required) or unload body.
pub fn parse_adapter_request(body: &[u8], load: bool) -> Result<AdapterRequest, ApiError> {
    let obj = parse_object(body)?;
    let string = |field: &str, required: bool| -> Result<String, ApiError> {
        match obj.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            None if !required => Ok(String::new()),
            None => Err(validation_error(
                &format!("body.{field}"),
                format!(
                    "{{'type': 'missing', 'loc': ('body', '{field}'), 'msg': 'Field required', 'input': {}}}",
                    short_repr(&Value::Object(obj.clone()))
                ),
            )),
            Some(other) => Err(type_error(field, "string_type", "string", other)),
        }
    };
    let lora_name = string("lora_name", true)?;
    let lora_path = if load {
        string("lora_path", true)?
    } else {
        String::new()
    };
    let load_inplace = match obj.get("load_inplace") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(type_error("load_inplace", "bool_type", "boolean", other)),
    };
    Ok(AdapterRequest {
        lora_name,
        lora_path,
        load_inplace,
    })
}

/// An error of the adapter endpoints, as vLLM's `create_error_response` renders it.
pub fn adapter_error(status: u16, kind: &str, message: &str) -> ApiError {
    api_error(status, message, kind, None)
}

/// Parses and validates an inference body (the model is checked by the caller).
pub fn parse_request(ep: Endpoint, body: &[u8]) -> Result<InferenceRequest, ApiError> {
    let obj = parse_object(body)?;

    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(type_error("model", "string_type", "string", other)),
    };

    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(type_error("stream", "bool_type", "boolean", other)),
    };

    let stream_options = obj.get("stream_options").filter(|v| !v.is_null());
    let include_usage = match stream_options {
        None => false,
        Some(Value::Object(o)) => {
            if !stream && !o.is_empty() {
                return Err(validation_error(
                    "stream_options",
                    format!(
                        "{{'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, Stream options can only be defined when `stream=True`.', 'input': {}}}",
                        short_repr(&Value::Object(obj.clone()))
                    ),
                ));
            }
            // StreamOptions.include_usage defaults to True in vLLM.
            match o.get("include_usage") {
                None => true,
                Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(type_error(
                        "stream_options.include_usage",
                        "bool_type",
                        "boolean",
                        other,
                    ))
                }
            }
        }
        Some(other) => {
            return Err(type_error(
                "stream_options",
                "model_type",
                "dictionary or instance of StreamOptions",
                other,
            ))
        }
    };

    let token_fields: &[&str] = match ep {
        // vLLM: `request.max_completion_tokens or request.max_tokens`.
        Endpoint::Chat => &["max_completion_tokens", "max_tokens"],
        Endpoint::Completions => &["max_tokens"],
    };
    let mut max_tokens = None;
    for field in token_fields {
        match obj.get(*field) {
            None | Some(Value::Null) => {}
            Some(n) => {
                let parsed = n
                    .as_i64()
                    .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64));
                match parsed {
                    Some(x) => {
                        if max_tokens.is_none() {
                            max_tokens = Some(x);
                        }
                    }
                    None => return Err(type_error(field, "int_type", "integer", n)),
                }
            }
        }
    }

    let prompt_tokens = match ep {
        Endpoint::Completions => obj.get("prompt").map(count_prompt).unwrap_or(0),
        Endpoint::Chat => obj.get("messages").map(count_messages).unwrap_or(0),
    };

    Ok(InferenceRequest {
        model,
        stream,
        include_usage,
        max_tokens,
        prompt_tokens,
    })
}

/// vLLM's SamplingParams check, which runs after the model check.
pub fn check_max_tokens(req: &InferenceRequest) -> Result<(), ApiError> {
    match req.max_tokens {
        Some(n) if n < 1 => Err(api_error(
            400,
            &format!("max_tokens must be at least 1, got {n}. (parameter=max_tokens, value={n})"),
            "BadRequestError",
            Some("max_tokens"),
        )),
        _ => Ok(()),
    }
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Completions `prompt`: a string, a list of strings, a token-id list or a list of those.
fn count_prompt(p: &Value) -> u64 {
    match p {
        Value::String(s) => words(s),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => words(s),
                Value::Number(_) => 1,
                Value::Array(ids) => ids.len() as u64,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Chat `messages`: string contents or lists of parts with `text`.
fn count_messages(m: &Value) -> u64 {
    let Some(msgs) = m.as_array() else { return 0 };
    msgs.iter()
        .map(|msg| match msg.get("content") {
            Some(Value::String(s)) => words(s),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| match p {
                    Value::String(s) => words(s),
                    _ => p
                        .get("text")
                        .and_then(Value::as_str)
                        .map(words)
                        .unwrap_or(0),
                })
                .sum(),
            _ => 0,
        })
        .sum()
}

/// The text of token `i` as streamed: "tok0", " tok1", " tok2", ...
pub fn token_text(i: u64) -> String {
    if i == 0 {
        "tok0".to_string()
    } else {
        format!(" tok{i}")
    }
}

/// The full text of `n` tokens: the concatenation of every `token_text`.
pub fn filler(n: u64) -> String {
    let mut s = String::with_capacity(n as usize * 7);
    for i in 0..n {
        s.push_str(&token_text(i));
    }
    s
}

pub fn usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": null,
    })
}

/// What a response needs besides the token count.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_tokens: u64,
}

pub fn id_prefix(ep: Endpoint) -> &'static str {
    match ep {
        Endpoint::Completions => "cmpl-",
        Endpoint::Chat => "chatcmpl-",
    }
}

/// Non-streaming `text_completion` / `chat.completion` object.
pub fn full_response(ep: Endpoint, m: &Meta, n: u64, finish: Finish) -> Value {
    let text = filler(n);
    let choice = match ep {
        Endpoint::Completions => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": finish.as_str(),
            "stop_reason": null,
            "prompt_logprobs": null,
        }),
        Endpoint::Chat => json!({
            "index": 0,
            "message": {
                "role": "assistant",
                "content": text,
                "refusal": null,
                "tool_calls": [],
                "reasoning_content": null,
            },
            "logprobs": null,
            "finish_reason": finish.as_str(),
            "stop_reason": null,
        }),
    };
    json!({
        "id": m.id,
        "object": match ep { Endpoint::Completions => "text_completion", Endpoint::Chat => "chat.completion" },
        "created": m.created,
        "model": m.model,
        "choices": [choice],
        "usage": usage(m.prompt_tokens, n),
        "system_fingerprint": null,
        "service_tier": null,
        "prompt_logprobs": null,
        "kv_transfer_params": null,
    })
}

fn chunk_object(ep: Endpoint) -> &'static str {
    match ep {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    }
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// Chat only: the first chunk, carrying the assistant role (as vLLM sends it).
pub fn role_chunk(m: &Meta) -> String {
    sse(&json!({
        "id": m.id,
        "object": "chat.completion.chunk",
        "created": m.created,
        "model": m.model,
        "choices": [{
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": null,
            "finish_reason": null,
        }],
    }))
}

/// The chunk carrying token `i`; `finish` is set on the last one.
pub fn token_chunk(ep: Endpoint, m: &Meta, i: u64, finish: Option<Finish>) -> String {
    let finish = finish.map(Finish::as_str);
    let choice = match ep {
        Endpoint::Completions => json!({
            "index": 0,
            "text": token_text(i),
            "logprobs": null,
            "finish_reason": finish,
            "stop_reason": null,
        }),
        Endpoint::Chat => json!({
            "index": 0,
            "delta": {"content": token_text(i)},
            "logprobs": null,
            "finish_reason": finish,
            "stop_reason": null,
        }),
    };
    sse(&json!({
        "id": m.id,
        "object": chunk_object(ep),
        "created": m.created,
        "model": m.model,
        "choices": [choice],
    }))
}

/// The final usage chunk (`stream_options.include_usage`): empty choices.
pub fn usage_chunk(ep: Endpoint, m: &Meta, n: u64) -> String {
    sse(&json!({
        "id": m.id,
        "object": chunk_object(ep),
        "created": m.created,
        "model": m.model,
        "choices": [],
        "usage": usage(m.prompt_tokens, n),
    }))
}

pub const DONE: &str = "data: [DONE]\n\n";

/// `GET /v1/models` as vLLM's `OpenAIServingModels.show_available_models`.
/// `models` is (id, root) of each served model, the base first.
pub fn models_list(
    models: &[(&str, &str)],
    max_model_len: u64,
    created: u64,
    ids: &mut dyn FnMut() -> String,
) -> Value {
    let mut data = Vec::with_capacity(models.len());
    let base = models.first().map_or("", |m| m.0);
    for (i, &(name, root)) in models.iter().enumerate() {
        let permission = json!([{
            "id": format!("modelperm-{}", ids()),
            "object": "model_permission",
            "created": created,
            "allow_create_engine": false,
            "allow_sampling": true,
            "allow_logprobs": true,
            "allow_search_indices": false,
            "allow_view": true,
            "allow_fine_tuning": false,
            "organization": "*",
            "group": null,
            "is_blocking": false,
        }]);
        let card = if i == 0 {
            json!({
                "id": name, "object": "model", "created": created, "owned_by": "vllm",
                "root": root, "parent": null, "max_model_len": max_model_len,
                "permission": permission,
            })
        } else {
            // vLLM: root = the adapter path (a start-up --lora has none: its name),
            // parent = base, max_model_len unset.
            json!({
                "id": name, "object": "model", "created": created, "owned_by": "vllm",
                "root": root, "parent": base, "max_model_len": null,
                "permission": permission,
            })
        };
        data.push(card);
    }
    json!({"object": "list", "data": data})
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn parse(ep: Endpoint, s: &str) -> Result<InferenceRequest, ApiError> {
        parse_request(ep, s.as_bytes())
    }

    fn meta() -> Meta {
        Meta {
            id: "cmpl-1".into(),
            created: 1700000000,
            model: "m".into(),
            prompt_tokens: 3,
        }
    }

    #[test]
    fn parses_completion() {
        let r = parse(
            Endpoint::Completions,
            r#"{"model":"a","prompt":"one two  three","max_tokens":5,"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            InferenceRequest {
                model: Some("a".into()),
                stream: true,
                include_usage: true,
                max_tokens: Some(5),
                prompt_tokens: 3
            }
        );
        assert_eq!(r.plan(), (5, Finish::Length));
    }

    #[test]
    fn defaults() {
        let r = parse(Endpoint::Completions, r#"{"prompt":["a b", "c"]}"#).unwrap();
        assert_eq!(r.model, None);
        assert!(!r.stream && !r.include_usage);
        assert_eq!(r.prompt_tokens, 3);
        assert_eq!(r.plan(), (DEFAULT_MAX_TOKENS, Finish::Stop));
        let r = parse(Endpoint::Completions, r#"{"model":"x","prompt":[1,2,3,4]}"#).unwrap();
        assert_eq!(r.prompt_tokens, 4);
        let r = parse(
            Endpoint::Completions,
            r#"{"model":"x","max_tokens":100000}"#,
        )
        .unwrap();
        assert_eq!(r.plan(), (MAX_TOKENS_CAP, Finish::Length));
        let r = parse(Endpoint::Completions, r#"{"model":"x","max_tokens":7.0}"#).unwrap();
        assert_eq!(r.max_tokens, Some(7));
        // vLLM: include_usage defaults to true once stream_options is given.
        let r = parse(
            Endpoint::Completions,
            r#"{"stream":true,"stream_options":{}}"#,
        )
        .unwrap();
        assert!(r.include_usage);
        let r = parse(
            Endpoint::Completions,
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
        )
        .unwrap();
        assert!(!r.include_usage);
    }

    #[test]
    fn chat_tokens_and_limits() {
        let r = parse(
            Endpoint::Chat,
            r#"{"model":"a","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hello there world"},{"type":"image_url","image_url":{}}]}],
                "max_tokens":9,"max_completion_tokens":4}"#,
        )
        .unwrap();
        assert_eq!(r.prompt_tokens, 5);
        assert_eq!(r.max_tokens, Some(4));
        let r = parse(
            Endpoint::Chat,
            r#"{"model":"a","messages":[],"max_tokens":9}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(9));
    }

    #[test]
    fn validation_errors() {
        let e = parse(Endpoint::Completions, "{\"model\": ").unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.body["error"]["type"], "Bad Request");
        assert_eq!(e.body["error"]["code"], 400);
        assert!(e.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("json_invalid"));
        assert_eq!(e.body["error"]["param"], "body.10");

        let e = parse(Endpoint::Completions, "").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'missing'"));

        let e = parse(Endpoint::Chat, "[1,2]").unwrap_err();
        assert_eq!(e.body["error"]["param"], "body");

        let e = parse(Endpoint::Chat, r#"{"model": 5}"#).unwrap_err();
        assert_eq!(e.body["error"]["param"], "body.model");

        let e = parse(Endpoint::Chat, r#"{"model": "a", "max_tokens": "x"}"#).unwrap_err();
        assert_eq!(e.body["error"]["param"], "body.max_tokens");

        let e = parse(Endpoint::Chat, r#"{"model": "a", "stream": "yes"}"#).unwrap_err();
        assert_eq!(e.body["error"]["param"], "body.stream");

        let e = parse(
            Endpoint::Chat,
            r#"{"model":"a","stream_options":{"include_usage":true}}"#,
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.body["error"]["param"], "stream_options");

        let r = parse(Endpoint::Completions, r#"{"model":"a","max_tokens":0}"#).unwrap();
        let e = check_max_tokens(&r).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.body["error"]["type"], "BadRequestError");
        assert_eq!(e.body["error"]["param"], "max_tokens");
    }

    #[test]
    fn not_found_shape() {
        let e = model_not_found("nope");
        assert_eq!(e.status, 404);
        assert_eq!(
            e.body,
            json!({"error": {"message": "The model `nope` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
        );
    }

    #[test]
    fn filler_text() {
        assert_eq!(filler(0), "");
        assert_eq!(filler(3), "tok0 tok1 tok2");
        let joined: String = (0..3).map(token_text).collect();
        assert_eq!(joined, filler(3));
    }

    #[test]
    fn completion_shape() {
        let v = full_response(Endpoint::Completions, &meta(), 2, Finish::Length);
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], "m");
        assert_eq!(v["choices"][0]["text"], "tok0 tok1");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(v["usage"]["completion_tokens"], 2);
        assert_eq!(v["usage"]["total_tokens"], 5);
    }

    #[test]
    fn chat_shape() {
        let v = full_response(Endpoint::Chat, &meta(), 1, Finish::Stop);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], "tok0");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    fn data(s: &str) -> Value {
        let body = s
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn stream_chunks() {
        let m = meta();
        let r = data(&role_chunk(&m));
        assert_eq!(r["object"], "chat.completion.chunk");
        assert_eq!(
            r["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );

        let c = data(&token_chunk(Endpoint::Chat, &m, 1, None));
        assert_eq!(c["choices"][0]["delta"], json!({"content": " tok1"}));
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null);

        let c = data(&token_chunk(
            Endpoint::Completions,
            &m,
            0,
            Some(Finish::Length),
        ));
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], "tok0");
        assert_eq!(c["choices"][0]["finish_reason"], "length");

        let u = data(&usage_chunk(Endpoint::Chat, &m, 4));
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["usage"]["completion_tokens"], 4);
        assert_eq!(u["usage"]["total_tokens"], 7);
        assert_eq!(DONE, "data: [DONE]\n\n");
    }

    #[test]
    fn models_shape() {
        let mut n = 0;
        let mut ids = || {
            n += 1;
            n.to_string()
        };
        let v = models_list(
            &[("base", "base"), ("sql", "/adapters/sql")],
            8192,
            7,
            &mut ids,
        );
        assert_eq!(v["object"], "list");
        let base = &v["data"][0];
        assert_eq!(base["id"], "base");
        assert_eq!(base["object"], "model");
        assert_eq!(base["owned_by"], "vllm");
        assert_eq!(base["root"], "base");
        assert_eq!(base["parent"], Value::Null);
        assert_eq!(base["max_model_len"], 8192);
        assert_eq!(base["permission"][0]["object"], "model_permission");
        let lora = &v["data"][1];
        assert_eq!(lora["id"], "sql");
        assert_eq!(lora["root"], "/adapters/sql");
        assert_eq!(lora["parent"], "base");
        assert_eq!(lora["max_model_len"], Value::Null);
    }
}
