//! HTTP server: routing, the streaming (SSE) body, and the accept loop.

use std::convert::Infallible;
use std::future::Future as _;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};

use crate::args::Config;
use crate::cache::{self, Admitted, Engine};
use crate::openai::{self, ApiError, Endpoint, Meta};
use crate::state::{Finish, InflightGuard, State};

/// Request bodies larger than this get 413 (the gateway's own limit is 8 MiB by default).
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

const JSON: &str = "application/json";
/// What Starlette's StreamingResponse(media_type="text/event-stream") sends.
const EVENT_STREAM: &str = "text/event-stream; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

static X_MOCK_BACKEND: HeaderName = HeaderName::from_static("x-mock-backend");
static X_BASE_IN: HeaderName = HeaderName::from_static("x-gateway-base-model-name");
static X_MODEL_IN: HeaderName = HeaderName::from_static("x-gateway-model-name");
static X_BASE_ECHO: HeaderName = HeaderName::from_static("x-echo-base-model-name");
static X_MODEL_ECHO: HeaderName = HeaderName::from_static("x-echo-model-name");
static X_POOL_IN: HeaderName = HeaderName::from_static("x-gateway-destination-pool");
static X_POOL_ECHO: HeaderName = HeaderName::from_static("x-echo-destination-pool");
static X_BODY_BYTES: HeaderName = HeaderName::from_static("x-echo-request-body-bytes");
static X_PREFIX_IN: HeaderName = HeaderName::from_static("x-gateway-prefix-hash");
static X_PREFIX_ECHO: HeaderName = HeaderName::from_static("x-echo-prefix-hash");
/// Prompt tokens this request found in the simulated prefix cache.
static X_HIT_TOKENS: HeaderName = HeaderName::from_static("x-mock-prefix-cache-hit-tokens");
/// Time to first token as this replica schedules it (queueing + prefill + --ttft-ms), in ms:
/// simulated time, which a benchmark can trust when its own client is short of CPU.
static X_TTFT: HeaderName = HeaderName::from_static("x-mock-ttft-ms");

// ---------------------------------------------------------------------------
// Response bodies

/// Either a complete body or a timed SSE stream.
pub enum RespBody {
    Full(Full<Bytes>),
    Sse(Box<SseBody>),
}

impl RespBody {
    fn empty() -> RespBody {
        RespBody::Full(Full::new(Bytes::new()))
    }
    fn bytes(b: impl Into<Bytes>) -> RespBody {
        RespBody::Full(Full::new(b.into()))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            RespBody::Full(f) => Pin::new(f).poll_frame(cx),
            RespBody::Sse(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(f) => f.is_end_stream(),
            RespBody::Sse(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(f) => f.size_hint(),
            RespBody::Sse(_) => SizeHint::default(),
        }
    }
}

/// Server-sent events, one frame per event, each released at its due time:
/// (chat: role chunk,) token 0 at start+ttft, token i at start+ttft+i*itl,
/// then the usage chunk (if asked) and `[DONE]` right after the last token.
pub struct SseBody {
    state: Arc<State>,
    _inflight: InflightGuard,
    /// The sequence slot, held until the stream ends.
    _admitted: Admitted,
    ep: Endpoint,
    meta: Meta,
    tokens: u64,
    finish: Finish,
    include_usage: bool,
    /// Index of the next event in the sequence described by `event`.
    next: u64,
    first_token_at: Instant,
    sleep: Pin<Box<Sleep>>,
    armed_for: Option<u64>,
    completed: bool,
}

enum Event {
    Role,
    Token(u64),
    Usage,
    Done,
}

impl SseBody {
    fn prefix(&self) -> u64 {
        u64::from(self.ep == Endpoint::Chat)
    }

    fn event(&self, k: u64) -> Option<Event> {
        let p = self.prefix();
        if k < p {
            return Some(Event::Role);
        }
        let t = k - p;
        if t < self.tokens {
            return Some(Event::Token(t));
        }
        let mut rest = t - self.tokens;
        if self.include_usage {
            if rest == 0 {
                return Some(Event::Usage);
            }
            rest -= 1;
        }
        (rest == 0).then_some(Event::Done)
    }

    fn due(&self, e: &Event) -> Instant {
        let last = self.tokens.saturating_sub(1);
        let i = match e {
            Event::Role => 0,
            Event::Token(i) => *i,
            Event::Usage | Event::Done => last,
        };
        let itl = self
            .state
            .itl
            .saturating_mul(i.min(u64::from(u32::MAX)) as u32);
        self.first_token_at + itl
    }

    fn render(&self, e: &Event) -> String {
        match e {
            Event::Role => openai::role_chunk(&self.meta),
            Event::Token(i) => {
                let fin = (*i + 1 == self.tokens).then_some(self.finish);
                openai::token_chunk(self.ep, &self.meta, *i, fin)
            }
            Event::Usage => openai::usage_chunk(self.ep, &self.meta, self.tokens),
            Event::Done => openai::DONE.to_string(),
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let Some(event) = this.event(this.next) else {
            return Poll::Ready(None);
        };
        let due = this.due(&event);
        if Instant::now() < due {
            if this.armed_for != Some(this.next) {
                this.sleep.as_mut().reset(due);
                this.armed_for = Some(this.next);
            }
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let bytes = Bytes::from(this.render(&event));
        this.next += 1;
        if matches!(event, Event::Done) && !this.completed {
            this.completed = true;
            this.state.count_finished(this.finish);
        }
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.event(self.next).is_none()
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        if !self.completed {
            // The client went away mid-stream: vLLM counts that as an abort.
            self.state.count_finished(Finish::Abort);
        }
    }
}

// ---------------------------------------------------------------------------
// Request handling

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn response(
    status: StatusCode,
    content_type: Option<&'static str>,
    body: RespBody,
) -> Response<RespBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Some(ct) = content_type {
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<RespBody> {
    response(status, Some(JSON), RespBody::bytes(v.to_string()))
}

fn api_error_response(e: ApiError) -> Response<RespBody> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    json_response(status, &e.body)
}

fn simple_error(status: StatusCode, message: &str, typ: &str) -> Response<RespBody> {
    json_response(
        status,
        &openai::error_body(status.as_u16(), message, typ, None),
    )
}

/// The routes: path -> allowed methods.
fn allowed(path: &str) -> Option<&'static str> {
    match path {
        "/v1/completions"
        | "/v1/chat/completions"
        | "/v1/load_lora_adapter"
        | "/v1/unload_lora_adapter"
        | "/mock/stats/reset"
        | "/reset_prefix_cache" => Some("POST"),
        "/v1/models" | "/health" | "/metrics" | "/mock/stats" => Some("GET, HEAD"),
        _ => None,
    }
}

/// Entry point for every request: reads the body, routes, adds the common headers.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let echo_base = parts.headers.get(&X_BASE_IN).cloned();
    let echo_model = parts.headers.get(&X_MODEL_IN).cloned();
    let echo_prefix = parts.headers.get(&X_PREFIX_IN).cloned();
    let echo_pool = parts.headers.get(&X_POOL_IN).cloned();

    let (mut resp, body_len) = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => {
            let body = collected.to_bytes();
            let len = body.len();
            (
                route(&state, &parts.method, parts.uri.path(), body).await,
                len,
            )
        }
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                let r = simple_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("Request body larger than {MAX_BODY_BYTES} bytes"),
                    "Payload Too Large",
                );
                (r, MAX_BODY_BYTES)
            } else {
                let r = simple_error(
                    StatusCode::BAD_REQUEST,
                    &format!("Could not read the request body: {e}"),
                    "Bad Request",
                );
                (r, 0)
            }
        }
    };

    let h = resp.headers_mut();
    h.insert(X_MOCK_BACKEND.clone(), state.id_header.clone());
    if let Some(v) = echo_base {
        h.insert(X_BASE_ECHO.clone(), v);
    }
    if let Some(v) = echo_model {
        h.insert(X_MODEL_ECHO.clone(), v);
    }
    if let Some(v) = echo_prefix {
        h.insert(X_PREFIX_ECHO.clone(), v);
    }
    if let Some(v) = echo_pool {
        h.insert(X_POOL_ECHO.clone(), v);
    }
    h.insert(X_BODY_BYTES.clone(), HeaderValue::from(body_len));
    Ok(resp)
}

async fn route(state: &Arc<State>, method: &Method, path: &str, body: Bytes) -> Response<RespBody> {
    let Some(allow) = allowed(path) else {
        return simple_error(StatusCode::NOT_FOUND, "Not Found", "NotFoundError");
    };
    let is_get = method == Method::GET || method == Method::HEAD;
    let ok = if allow == "POST" {
        method == Method::POST
    } else {
        is_get
    };
    if !ok {
        let mut r = simple_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
            "MethodNotAllowedError",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
        return r;
    }
    match path {
        "/v1/completions" => inference(state, Endpoint::Completions, &body).await,
        "/v1/chat/completions" => inference(state, Endpoint::Chat, &body).await,
        "/v1/models" => {
            let mut ids = || state.next_request_id();
            let slots = state.slots();
            let models: Vec<(&str, &str)> = slots
                .iter()
                .map(|s| (s.name.as_str(), s.root.as_str()))
                .collect();
            let v = openai::models_list(&models, state.max_model_len, now_secs(), &mut ids);
            json_response(StatusCode::OK, &v)
        }
        "/v1/load_lora_adapter" | "/v1/unload_lora_adapter" => {
            let load = path == "/v1/load_lora_adapter";
            let req = match openai::parse_adapter_request(&body, load) {
                Ok(r) => r,
                Err(e) => return api_error_response(e),
            };
            let done = if load {
                state.load_adapter(&req.lora_name, &req.lora_path, req.load_inplace)
            } else {
                state.unload_adapter(&req.lora_name)
            };
            match done {
                Ok(text) => {
                    log(&format!("mock-vllm {}: {text}", state.id));
                    // vLLM: `Response(status_code=200, content=...)`, plain text, no media type.
                    response(StatusCode::OK, None, RespBody::bytes(text))
                }
                Err(e) => api_error_response(openai::adapter_error(e.status, e.kind, &e.message)),
            }
        }
        "/health" => response(StatusCode::OK, None, RespBody::empty()),
        "/metrics" => response(
            StatusCode::OK,
            Some(PROMETHEUS),
            RespBody::bytes(state.metrics_text()),
        ),
        "/mock/stats" => json_response(StatusCode::OK, &state.stats_json()),
        // vLLM's endpoint (a dev-mode one there): empties the prefix cache.
        "/reset_prefix_cache" => {
            state.engine.reset_cache();
            response(StatusCode::OK, None, RespBody::empty())
        }
        "/mock/stats/reset" => {
            state.reset_stats();
            json_response(StatusCode::OK, &state.stats_json())
        }
        _ => simple_error(StatusCode::NOT_FOUND, "Not Found", "NotFoundError"),
    }
}

async fn inference(state: &Arc<State>, ep: Endpoint, body: &[u8]) -> Response<RespBody> {
    let arrived = Instant::now();
    let req = match openai::parse_request(ep, body) {
        Ok(r) => r,
        Err(e) => return api_error_response(e),
    };
    let slot = match &req.model {
        None => match state.lookup(state.base()) {
            Some(s) => s,
            None => return api_error_response(openai::model_not_found(state.base())),
        },
        Some(m) => match state.lookup(m) {
            Some(s) => s,
            None => return api_error_response(openai::model_not_found(m)),
        },
    };
    if let Err(e) = openai::check_max_tokens(&req) {
        return api_error_response(e);
    }
    let (tokens, finish) = req.plan();
    let meta = Meta {
        id: format!("{}{}", openai::id_prefix(ep), state.next_request_id()),
        created: now_secs(),
        model: slot.name.clone(),
        prompt_tokens: req.prompt_tokens,
    };
    let inflight = state.start_inflight(&slot);
    // Queueing and prefill (the timing model), and the prefix cache; the response (and, when
    // streaming, its headers) starts after it, as vLLM's first chunk does.
    let prompt = cache::capture_prompt(ep, body);
    let admitted = state.engine.admit(&slot.name, prompt.as_deref()).await;
    let hit_tokens = HeaderValue::from(admitted.hit_tokens);
    let start = Instant::now();
    let first_token_at = start + state.ttft;
    let ttft_ms = (first_token_at - arrived).as_secs_f64() * 1000.0;
    let ttft_ms =
        HeaderValue::from_str(&format!("{ttft_ms:.3}")).unwrap_or(HeaderValue::from_static("0"));

    if req.stream {
        state.count_served(&slot);
        let sse = SseBody {
            state: Arc::clone(state),
            _inflight: inflight,
            _admitted: admitted,
            ep,
            meta,
            tokens,
            finish,
            include_usage: req.include_usage,
            next: 0,
            first_token_at,
            sleep: Box::pin(tokio::time::sleep_until(first_token_at)),
            armed_for: None,
            completed: false,
        };
        let mut r = response(
            StatusCode::OK,
            Some(EVENT_STREAM),
            RespBody::Sse(Box::new(sse)),
        );
        r.headers_mut().insert(
            hyper::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        r.headers_mut().insert(X_HIT_TOKENS.clone(), hit_tokens);
        r.headers_mut().insert(X_TTFT.clone(), ttft_ms);
        return r;
    }

    // Non-streaming: the whole generation time, then the response.
    let steps = u32::try_from(tokens.saturating_sub(1)).unwrap_or(u32::MAX);
    let total = state.ttft + state.itl.saturating_mul(steps);
    if !total.is_zero() {
        tokio::time::sleep_until(start + total).await;
    }
    let v = openai::full_response(ep, &meta, tokens, finish);
    state.count_served(&slot);
    state.count_finished(finish);
    drop(admitted);
    drop(inflight);
    let mut r = json_response(StatusCode::OK, &v);
    r.headers_mut().insert(X_HIT_TOKENS.clone(), hit_tokens);
    r.headers_mut().insert(X_TTFT.clone(), ttft_ms);
    r
}

// ---------------------------------------------------------------------------
// Accept loop

/// A line to stderr that never panics (`eprintln!` does on a closed pipe, and the
/// release profile aborts on panic).
pub fn log(msg: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{msg}");
}

/// Binds, prints the ready line, serves until SIGINT/SIGTERM.
pub async fn run(cfg: Config) -> Result<(), String> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    let id = cfg.id.clone().unwrap_or_else(|| local.to_string());
    let models = cfg.served_models();
    let state = Arc::new(
        State::new(
            id.clone(),
            models.clone(),
            cfg.ttft,
            cfg.itl,
            cfg.max_model_len,
        )?
        .with_engine(Engine::new(cfg.engine)),
    );
    // --background-load: requests from outside the gateway, each a unique prompt held for
    // --background-ms, then the next; they queue and run like any other.
    for k in 0..cfg.engine.background {
        let state = Arc::clone(&state);
        let hold = Duration::from_millis(cfg.engine.background_ms);
        let model = cfg.model.clone();
        tokio::spawn(async move {
            for n in 0u64.. {
                let prompt = format!("background load {k} {n}");
                let admitted = state.engine.admit(&model, Some(prompt.as_bytes())).await;
                tokio::time::sleep(hold).await;
                drop(admitted);
            }
        });
    }

    // Before the ready line: a SIGTERM sent as soon as the line is seen must find the handler
    // (it used to be installed after, and a fast `kill` under load killed the process).
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot install the SIGTERM handler: {e}"))?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| format!("cannot install the SIGINT handler: {e}"))?;

    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "mock-vllm {id} listening on {local} serving {}",
            models.join(",")
        );
        let _ = out.flush();
    }

    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No header-read timer: an idle keep-alive connection must never be closed under a
    // proxy that may be about to reuse it (that race shows up as sporadic 503s).
    builder.http1().keep_alive(true).header_read_timeout(None);
    let builder = Arc::new(builder);

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let state = Arc::clone(&state);
                    let builder = Arc::clone(&builder);
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| handle(Arc::clone(&state), req));
                        // Errors here are clients going away; nothing to do about them.
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    });
                }
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning, keep serving.
                    log(&format!("mock-vllm {id}: accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    log(&format!("mock-vllm {id}: shutting down"));
    Ok(())
}
