//! `make bench`'s ext_proc peer: the seeds' body router architecture, measured next to bbr-wasm.
//!
//! The llm-d seeds route on the body with the Inference Extension's Body Based Router (BBR,
//! `pkg/bbr` of kubernetes-sigs/gateway-api-inference-extension, release-1.5): an Envoy
//! `ext_proc` gRPC service. This program does per request what BBR's handlers and its two
//! default plugins do (docs/performance.md cites the files):
//!
//! - request headers: copy every header into a map (`HandleRequestHeaders`) and answer an
//!   empty `HeadersResponse` (BBR's non-streaming answer);
//! - request body: append the chunks; at the end of the stream unmarshal the WHOLE body into
//!   a generic JSON tree (`json.Unmarshal(body, &map[string]any)`; here `serde_json::Value`,
//!   its Rust equivalent), read the top-level `model`, and answer a `BodyResponse` whose
//!   `CommonResponse` sets `X-Gateway-Model-Name` (plugin body-field-to-header) and
//!   `X-Gateway-Base-Model-Name` (plugin base-model-to-header: the base model of a known
//!   adapter, the model itself if it is a known base model, else "") as raw values, with
//!   `clear_route_cache: true` so Envoy routes on them;
//! - a body that is not a JSON object: an `ImmediateResponse` 400 with the parse error
//!   (`errcommon.BuildErrResponse`);
//! - trailers: an empty `TrailersResponse`; response-path messages (not sent in the bench's
//!   processing mode): answered empty, so Envoy never waits.
//!
//! Where BBR leaves a choice, this peer takes the cheaper side (docs/performance.md lists
//! them): plaintext gRPC on a Unix socket instead of TLS on TCP, no per-request logging,
//! tracing or metrics, one single-threaded runtime (the bench pins it to the CPU of Envoy's
//! one worker, so threads could only contend), large HTTP/2 windows.
//!
//! Usage: bbr-extproc-peer --listen unix:/path/to.sock|127.0.0.1:PORT
//!            [--base-model NAME]... [--adapter NAME=BASE]...
//! Prints "ready <address>" on stdout once it accepts connections.
//!
//!        bbr-extproc-peer --time BODY_FILE ITERATIONS
//! Times, in this process and on its CPU, the two steps of the peer's work that can be timed
//! alone for one body: decoding the gRPC message that carries it (protobuf, the body copied
//! out of the frame) and the full JSON parse; prints {"decode_ns": .., "parse_ns": ..} per
//! request (medians of 5 batches). What the peer costs beyond them is HTTP/2, the async
//! runtime and the socket.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    processing_request, processing_response, BodyResponse, CommonResponse, HeaderMutation,
    HeadersResponse, ImmediateResponse, ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use futures_core::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

const MODEL_FIELD: &str = "model";
const MODEL_HEADER: &str = "X-Gateway-Model-Name";
const BASE_MODEL_HEADER: &str = "X-Gateway-Base-Model-Name";
/// Largest gRPC message accepted: a 4 MiB body plus its framing fits with room to spare
/// (tonic's default, 4 MiB, would refuse the bench's largest body).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// HTTP/2 flow-control windows: large, so a 4 MiB body never waits for a window update.
const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// The base-model-to-header plugin's AdaptersStore, filled from the command line instead of
/// ConfigMaps.
#[derive(Default)]
struct Adapters {
    adapter_to_base: HashMap<String, String>,
    base_models: std::collections::HashSet<String>,
}

impl Adapters {
    fn base_model(&self, model: &str) -> String {
        let model = model.trim();
        if let Some(base) = self.adapter_to_base.get(model) {
            return base.clone();
        }
        if self.base_models.contains(model) {
            return model.to_owned();
        }
        String::new()
    }
}

struct Peer {
    adapters: Arc<Adapters>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

fn respond(r: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Go's fmt.Sprintf("%v", v) for the JSON value types a `model` field can hold.
fn go_format(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "<nil>".to_owned(),
        other => other.to_string(),
    }
}

/// BBR's HandleRequestBody with its two default plugins, for a complete body.
fn handle_body(
    adapters: &Adapters,
    headers: &HashMap<String, String>,
    body: &[u8],
) -> ProcessingResponse {
    let doc: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(body) {
        Ok(doc) => doc,
        Err(e) => {
            return respond(processing_response::Response::ImmediateResponse(
                ImmediateResponse {
                    status: Some(HttpStatus {
                        code: StatusCode::BadRequest as i32,
                    }),
                    body: format!("failed to parse request body: {e}").into_bytes(),
                    ..Default::default()
                },
            ))
        }
    };
    let mut set_headers = Vec::new();
    if let Some(raw) = doc.get(MODEL_FIELD) {
        let model = go_format(raw);
        let base = adapters.base_model(&model);
        // InferenceMessage.SetHeader: only a header that is new or changes is mutated.
        for (key, value) in [
            (MODEL_HEADER, model.as_str()),
            (BASE_MODEL_HEADER, base.as_str()),
        ] {
            if headers.get(&key.to_ascii_lowercase()).map(String::as_str) != Some(value) {
                set_headers.push(set_header(key, value));
            }
        }
    }
    respond(processing_response::Response::RequestBody(BodyResponse {
        response: Some(CommonResponse {
            clear_route_cache: true,
            header_mutation: Some(HeaderMutation {
                set_headers,
                remove_headers: Vec::new(),
            }),
            ..Default::default()
        }),
    }))
}

#[tonic::async_trait]
impl ExternalProcessor for Peer {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let adapters = Arc::clone(&self.adapters);
        let (tx, rx) = mpsc::channel::<Result<ProcessingResponse, Status>>(4);
        tokio::spawn(async move {
            let mut headers: HashMap<String, String> = HashMap::new();
            let mut body: Vec<u8> = Vec::new();
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(msg)) => msg,
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let reply = match msg.request {
                    Some(processing_request::Request::RequestHeaders(h)) => {
                        for hv in h.headers.map(|m| m.headers).unwrap_or_default() {
                            let value = if hv.raw_value.is_empty() {
                                hv.value
                            } else {
                                String::from_utf8_lossy(&hv.raw_value).into_owned()
                            };
                            headers.insert(hv.key, value);
                        }
                        respond(processing_response::Response::RequestHeaders(
                            HeadersResponse::default(),
                        ))
                    }
                    Some(processing_request::Request::RequestBody(b)) => {
                        if body.is_empty() {
                            body = b.body;
                        } else {
                            body.extend_from_slice(&b.body);
                        }
                        if !b.end_of_stream {
                            // A chunk of a streamed body: BBR answers nothing until the end.
                            continue;
                        }
                        handle_body(&adapters, &headers, &body)
                    }
                    Some(processing_request::Request::RequestTrailers(_)) => respond(
                        processing_response::Response::RequestTrailers(TrailersResponse::default()),
                    ),
                    Some(processing_request::Request::ResponseHeaders(_)) => respond(
                        processing_response::Response::ResponseHeaders(HeadersResponse::default()),
                    ),
                    Some(processing_request::Request::ResponseBody(_)) => respond(
                        processing_response::Response::ResponseBody(BodyResponse::default()),
                    ),
                    Some(processing_request::Request::ResponseTrailers(_)) => respond(
                        processing_response::Response::ResponseTrailers(TrailersResponse::default()),
                    ),
                    None => {
                        let _ = tx.send(Err(Status::unknown("unknown request type"))).await;
                        return;
                    }
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream) as Self::ProcessStream))
    }
}

struct Args {
    listen: String,
    adapters: Adapters,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut adapters = Adapters::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?),
            "--base-model" => {
                adapters.base_models.insert(value()?);
            }
            "--adapter" => {
                let v = value()?;
                let (name, base) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--adapter {v}: want NAME=BASE"))?;
                adapters
                    .adapter_to_base
                    .insert(name.to_owned(), base.to_owned());
                adapters.base_models.insert(base.to_owned());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen unix:PATH or HOST:PORT is required")?,
        adapters,
    })
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let service = ExternalProcessorServer::new(Peer {
        adapters: Arc::new(args.adapters),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .tcp_nodelay(true)
        .add_service(service);
    if let Some(path) = args.listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        println!("ready {}", args.listen);
        router
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await?;
    } else {
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        println!("ready {}", listener.local_addr()?);
        router
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await?;
    }
    Ok(())
}

/// `--time BODY_FILE ITERATIONS`: see the module documentation.
fn time_steps(path: &str, iterations: &str) -> Result<(), String> {
    let body = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let n: u32 = iterations
        .parse()
        .map_err(|e| format!("iterations {iterations}: {e}"))?;
    let message = ProcessingRequest {
        request: Some(processing_request::Request::RequestBody(
            envoy_types::pb::envoy::service::ext_proc::v3::HttpBody {
                body: body.clone(),
                end_of_stream: true,
                ..Default::default()
            },
        )),
        ..Default::default()
    }
    .encode_to_vec();
    let median_ns = |f: &dyn Fn() -> usize| -> u128 {
        let mut batches: Vec<u128> = (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                let mut sink = 0usize;
                for _ in 0..n {
                    sink = sink.wrapping_add(f());
                }
                std::hint::black_box(sink);
                t.elapsed().as_nanos() / u128::from(n.max(1))
            })
            .collect();
        batches.sort_unstable();
        batches[2]
    };
    // Decoding from the frame's bytes copies the body out into the message's own Vec, as
    // tonic's decoder does.
    let decode_ns = median_ns(&|| {
        ProcessingRequest::decode(message.as_slice())
            .map(|m| usize::from(m.request.is_some()))
            .unwrap_or(0)
    });
    let parse_ns = median_ns(&|| {
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body)
            .map(|m| m.len())
            .unwrap_or(0)
    });
    println!(
        "{{\"bytes\": {}, \"decode_ns\": {}, \"parse_ns\": {}}}",
        body.len(),
        decode_ns,
        parse_ns
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.len() == 4 && argv[1] == "--time" {
        return match time_steps(&argv[2], &argv[3]) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bbr-extproc-peer: {e}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bbr-extproc-peer: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bbr-extproc-peer: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bbr-extproc-peer: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapters() -> Adapters {
        let mut a = Adapters::default();
        a.base_models.insert("base-a".to_owned());
        a.adapter_to_base
            .insert("lora-1".to_owned(), "base-a".to_owned());
        a
    }

    /// The headers a body response sets, or the immediate response's status.
    type Outcome = Result<Vec<(String, String)>, i32>;
    /// name, body, the request's headers, the outcome wanted.
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Outcome);

    fn outcome(body: &str, incoming: &[(&str, &str)]) -> Outcome {
        let headers = incoming
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        match handle_body(&adapters(), &headers, body.as_bytes()).response {
            Some(processing_response::Response::RequestBody(BodyResponse {
                response: Some(common),
            })) => {
                assert!(common.clear_route_cache, "BBR clears the route cache");
                Ok(common
                    .header_mutation
                    .map(|m| m.set_headers)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|o| o.header)
                    .map(|h| (h.key, String::from_utf8_lossy(&h.raw_value).into_owned()))
                    .collect())
            }
            Some(processing_response::Response::ImmediateResponse(r)) => {
                Err(r.status.map(|s| s.code).unwrap_or(0))
            }
            other => Err(-i32::from(other.is_some())),
        }
    }

    fn set(model: &str, base: &str) -> Vec<(String, String)> {
        vec![
            (MODEL_HEADER.to_owned(), model.to_owned()),
            (BASE_MODEL_HEADER.to_owned(), base.to_owned()),
        ]
    }

    #[test]
    fn answers_as_bbr_does() {
        let cases: &[Case] = &[
            (
                "base model",
                r#"{"model":"base-a","messages":[]}"#,
                &[],
                Ok(set("base-a", "base-a")),
            ),
            (
                "adapter",
                r#"{"messages":[],"model":"lora-1"}"#,
                &[],
                Ok(set("lora-1", "base-a")),
            ),
            (
                "unknown model: empty base",
                r#"{"model":"other"}"#,
                &[],
                Ok(set("other", "")),
            ),
            (
                "trimmed for the lookup",
                r#"{"model":" base-a "}"#,
                &[],
                Ok(set(" base-a ", "base-a")),
            ),
            (
                "number formatted as Go's %v",
                r#"{"model":7}"#,
                &[],
                Ok(set("7", "")),
            ),
            ("no model: no header", r#"{"messages":[]}"#, &[], Ok(vec![])),
            (
                "unchanged header not set again",
                r#"{"model":"base-a"}"#,
                &[("x-gateway-model-name", "base-a")],
                Ok(vec![(BASE_MODEL_HEADER.to_owned(), "base-a".to_owned())]),
            ),
            (
                "not JSON: 400",
                "not json",
                &[],
                Err(StatusCode::BadRequest as i32),
            ),
            (
                "not an object: 400",
                "[1,2]",
                &[],
                Err(StatusCode::BadRequest as i32),
            ),
            (
                "truncated: 400",
                r#"{"model":"base-a""#,
                &[],
                Err(StatusCode::BadRequest as i32),
            ),
        ];
        for (name, body, incoming, want) in cases {
            assert_eq!(&outcome(body, incoming), want, "{name}");
        }
    }
}
