//! Black-box tests: start the real binary on 127.0.0.1:0 and talk HTTP/1.1 to it
//! over plain std TcpStreams. Every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_mock-vllm");
const IO_TIMEOUT: Duration = Duration::from_secs(10);

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mock-vllm");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(IO_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("mock-vllm did not print its ready line in time");
            }
        };
        // "mock-vllm <ID> listening on <ADDR> serving <MODELS>"
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.len(), 7, "ready line: {line:?}");
        assert_eq!(words[0], "mock-vllm");
        assert_eq!(
            (words[2], words[3], words[5]),
            ("listening", "on", "serving")
        );
        let addr = words[4].to_string();
        assert!(
            addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
            "{addr}"
        );
        Server { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("bad status line {line:?}"))
        .parse()
        .unwrap();
    assert!(line.starts_with("HTTP/1.1 "), "{line:?}");
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    (status, headers)
}

/// Reads one chunk of a chunked body; `None` at the last (zero) chunk.
fn read_chunk(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut size = String::new();
    r.read_line(&mut size).unwrap();
    let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16)
        .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
    if n == 0 {
        // Trailers, then the empty line.
        loop {
            let mut t = String::new();
            r.read_line(&mut t).unwrap();
            if t.trim_end().is_empty() {
                return None;
            }
        }
    }
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[n..], b"\r\n");
    buf.truncate(n);
    Some(buf)
}

fn read_body(r: &mut impl BufRead, headers: &[(String, String)], method: &str) -> Vec<u8> {
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if method == "HEAD" {
        return Vec::new();
    }
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        while let Some(c) = read_chunk(r) {
            body.extend(c);
        }
        body
    } else {
        let n: usize = get("content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; n];
        r.read_exact(&mut body).unwrap();
        body
    }
}

fn raw_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: mock\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        req.push_str("Connection: close\r\n");
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = connect(addr);
    s.write_all(&raw_request(method, path, headers, body, true))
        .unwrap();
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let body = read_body(&mut r, &headers, method);
    Resp {
        status,
        headers,
        body,
    }
}

fn post_json(addr: &str, path: &str, v: &Value) -> Resp {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        v.to_string().as_bytes(),
    )
}

fn metric(addr: &str, line_prefix: &str) -> f64 {
    let r = request(addr, "GET", "/metrics", &[], b"");
    let text = String::from_utf8(r.body).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no metric {line_prefix} in\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn endpoints_and_shapes() {
    let srv = Server::start(&[
        "--model", "llama", "--lora", "sql", "--lora", "chat", "--id", "b-1",
    ]);
    let a = srv.addr.as_str();

    let r = request(a, "GET", "/health", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("x-mock-backend"), Some("b-1"));
    assert_eq!(r.header("x-echo-request-body-bytes"), Some("0"));

    let r = request(a, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama", "sql", "chat"]);
    assert_eq!(v["data"][0]["parent"], Value::Null);
    assert_eq!(v["data"][1]["parent"], "llama");
    assert_eq!(v["data"][2]["owned_by"], "vllm");

    // Non-streaming completion on an adapter, with the gateway's headers echoed.
    let body =
        json!({"model": "sql", "prompt": "select the rows please", "max_tokens": 4}).to_string();
    let r = request(
        a,
        "POST",
        "/v1/completions",
        &[
            ("Content-Type", "application/json"),
            ("x-gateway-base-model-name", "llama"),
            ("x-gateway-model-name", "sql"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-mock-backend"), Some("b-1"));
    assert_eq!(r.header("x-echo-base-model-name"), Some("llama"));
    assert_eq!(r.header("x-echo-model-name"), Some("sql"));
    assert_eq!(
        r.header("x-echo-request-body-bytes"),
        Some(body.len().to_string().as_str())
    );
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "sql");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["text"], "tok0 tok1 tok2 tok3");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8, "prompt_tokens_details": null})
    );

    // Chat on the base, default max_tokens: 16 tokens, finish "stop".
    let r = post_json(
        a,
        "/v1/chat/completions",
        &json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 200);
    assert!(r.header("x-echo-model-name").is_none());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "llama");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 16);

    // Unknown model: vLLM's exact 404.
    let r = post_json(
        a,
        "/v1/chat/completions",
        &json!({"model": "gpt-4", "messages": []}),
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-mock-backend"), Some("b-1"));
    assert_eq!(
        r.json(),
        json!({"error": {"message": "The model `gpt-4` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
    );

    // Invalid JSON: 400, vLLM-style.
    let r = request(
        a,
        "POST",
        "/v1/completions",
        &[("Content-Type", "application/json")],
        b"{\"model\": \"llama\",",
    );
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["error"]["code"], 400);
    assert_eq!(v["error"]["type"], "Bad Request");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("json_invalid"));

    // Unknown path and wrong method.
    let r = request(a, "GET", "/v2/nothing", &[], b"");
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-mock-backend"), Some("b-1"));
    assert_eq!(
        r.json(),
        json!({"error": {"message": "Not Found", "type": "NotFoundError", "param": null, "code": 404}})
    );
    let r = request(a, "GET", "/v1/completions", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(r.header("x-mock-backend"), Some("b-1"));

    // Stats: two 200s (sql, llama); errors are not counted. Then reset.
    let r = request(a, "GET", "/mock/stats", &[], b"");
    assert_eq!(
        r.json(),
        json!({"id": "b-1", "total": 2, "by_model": {"llama": 1, "sql": 1, "chat": 0}})
    );
    let r = request(a, "POST", "/mock/stats/reset", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["total"], 0);
    let r = request(a, "GET", "/mock/stats", &[], b"");
    assert_eq!(
        r.json(),
        json!({"id": "b-1", "total": 0, "by_model": {"llama": 0, "sql": 0, "chat": 0}})
    );

    // Metrics: vLLM names, HELP/TYPE lines, model_name label.
    let r = request(a, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.body).unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:request_success_total",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name}\n{text}");
        assert!(text.contains(&format!("# TYPE {name} ")), "{name}\n{text}");
        assert!(
            text.contains(&format!("{name}{{model_name=\"llama\"")),
            "{name}\n{text}"
        );
    }
    assert_eq!(metric(a, "vllm:request_success_total{model_name=\"llama\",engine=\"0\",finished_reason=\"length\"}"), 1.0);
    assert_eq!(metric(a, "vllm:request_success_total{model_name=\"llama\",engine=\"0\",finished_reason=\"stop\"}"), 1.0);
}

#[test]
fn chunked_request_body() {
    let srv = Server::start(&["--model", "base", "--id", "chunky"]);
    let payload = json!({"model": "base", "prompt": "one two three", "max_tokens": 2}).to_string();
    let (p1, p2) = payload.as_bytes().split_at(10);
    let mut req =
        b"POST /v1/completions HTTP/1.1\r\nHost: mock\r\nContent-Type: application/json\r\n\
Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for part in [p1, p2] {
        req.extend(format!("{:x}\r\n", part.len()).into_bytes());
        req.extend_from_slice(part);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");

    let mut s = connect(&srv.addr);
    s.write_all(&req).unwrap();
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let body = read_body(&mut r, &headers, "POST");
    let resp = Resp {
        status,
        headers,
        body,
    };
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(
        resp.header("x-echo-request-body-bytes"),
        Some(payload.len().to_string().as_str())
    );
    assert_eq!(resp.header("x-mock-backend"), Some("chunky"));
    let v = resp.json();
    assert_eq!(v["choices"][0]["text"], "tok0 tok1");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
}

#[test]
fn keep_alive_reuses_one_connection() {
    let srv = Server::start(&["--model", "base"]);
    let s = connect(&srv.addr);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for i in 0..5 {
        let body = json!({"model": "base", "prompt": "x", "max_tokens": 1}).to_string();
        w.write_all(&raw_request(
            "POST",
            "/v1/completions",
            &[],
            body.as_bytes(),
            false,
        ))
        .unwrap();
        let (status, headers) = read_head(&mut r);
        assert_eq!(status, 200, "request {i}");
        assert!(!headers
            .iter()
            .any(|(k, v)| k == "connection" && v == "close"));
        let body = read_body(&mut r, &headers, "POST");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["choices"][0]["text"], "tok0");
    }
    let stats = request(&srv.addr, "GET", "/mock/stats", &[], b"").json();
    assert_eq!(stats["total"], 5);
    // Default id: the bound address.
    assert_eq!(stats["id"], srv.addr.as_str());
}

#[test]
fn streaming_chunks_arrive_before_the_end() {
    let srv = Server::start(&["--model", "base", "--lora", "ad", "--itl-ms", "200"]);
    let body = json!({
        "model": "ad",
        "messages": [{"role": "user", "content": "count to five"}],
        "max_tokens": 5,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let mut s = connect(&srv.addr);
    let t0 = Instant::now();
    s.write_all(&raw_request(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        true,
    ))
    .unwrap();
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    assert_eq!(status, 200);
    let ct = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    assert!(
        ct.is_some_and(|c| c.starts_with("text/event-stream")),
        "{ct:?}"
    );

    let first = read_chunk(&mut r).expect("a first chunk");
    let first_at = t0.elapsed();
    let mut all = first.clone();
    while let Some(c) = read_chunk(&mut r) {
        all.extend(c);
    }
    let end_at = t0.elapsed();
    // 5 tokens at 200 ms apart: >= 800 ms in all; the first chunk comes right away.
    assert!(
        end_at >= Duration::from_millis(750),
        "stream ended after {end_at:?}"
    );
    assert!(
        first_at < Duration::from_millis(400),
        "first chunk after {first_at:?} (end {end_at:?})"
    );
    assert!(String::from_utf8_lossy(&first).starts_with("data: {"));

    let text = String::from_utf8(all).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap())
        .collect();
    // role chunk + 5 token chunks + usage chunk
    assert_eq!(chunks.len(), 7, "{text}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks[1..6]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(content, "tok0 tok1 tok2 tok3 tok4");
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], Value::Null);
    for c in &chunks {
        assert_eq!(c["model"], "ad");
        assert_eq!(c["object"], "chat.completion.chunk");
    }
    assert_eq!(chunks[6]["choices"], json!([]));
    assert_eq!(chunks[6]["usage"]["completion_tokens"], 5);
    assert_eq!(chunks[6]["usage"]["prompt_tokens"], 3);

    // Completions stream without include_usage: tokens then [DONE].
    let r = request(
        &srv.addr,
        "POST",
        "/v1/completions",
        &[],
        json!({"model": "base", "prompt": "p", "max_tokens": 2, "stream": true})
            .to_string()
            .as_bytes(),
    );
    let text = String::from_utf8(r.body).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{text}");
    let last_tok: Value = serde_json::from_str(&events[1]["data: ".len()..]).unwrap();
    assert_eq!(last_tok["choices"][0]["text"], " tok1");
    assert_eq!(last_tok["choices"][0]["finish_reason"], "length");
    assert_eq!(events[2], "data: [DONE]");
}

#[test]
fn ttft_delays_non_streaming_response() {
    let srv = Server::start(&["--model", "base", "--ttft-ms", "300", "--itl-ms", "50"]);
    let t0 = Instant::now();
    let r = post_json(
        &srv.addr,
        "/v1/completions",
        &json!({"model": "base", "prompt": "p", "max_tokens": 3}),
    );
    let took = t0.elapsed();
    assert_eq!(r.status, 200);
    // ttft + itl * (n - 1) = 300 + 100 ms
    assert!(took >= Duration::from_millis(390), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn client_disconnect_mid_stream_is_an_abort() {
    let srv = Server::start(&["--model", "base", "--itl-ms", "100"]);
    let running = "vllm:num_requests_running{model_name=\"base\",engine=\"0\"}";
    let aborted =
        "vllm:request_success_total{model_name=\"base\",engine=\"0\",finished_reason=\"abort\"}";
    {
        let body =
            json!({"model": "base", "prompt": "p", "max_tokens": 50, "stream": true}).to_string();
        let mut s = connect(&srv.addr);
        s.write_all(&raw_request(
            "POST",
            "/v1/completions",
            &[],
            body.as_bytes(),
            true,
        ))
        .unwrap();
        let mut r = BufReader::new(s);
        let (status, _) = read_head(&mut r);
        assert_eq!(status, 200);
        assert!(read_chunk(&mut r).is_some());
        assert_eq!(metric(&srv.addr, running), 1.0);
    } // connection dropped here
    let end = Instant::now() + Duration::from_secs(5);
    while metric(&srv.addr, running) != 0.0 {
        assert!(Instant::now() < end, "stream never noticed the disconnect");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(&srv.addr, aborted), 1.0);
    // Still counted as served: it was answered 200.
    assert_eq!(
        request(&srv.addr, "GET", "/mock/stats", &[], b"").json()["total"],
        1
    );
}

#[test]
fn concurrent_keep_alive_clients() {
    let srv = Server::start(&["--model", "base", "--lora", "a"]);
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let addr = srv.addr.clone();
            thread::spawn(move || {
                let s = connect(&addr);
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let model = if t % 2 == 0 { "base" } else { "a" };
                for _ in 0..25 {
                    let body =
                        json!({"model": model, "prompt": "p q", "max_tokens": 3}).to_string();
                    w.write_all(&raw_request(
                        "POST",
                        "/v1/completions",
                        &[],
                        body.as_bytes(),
                        false,
                    ))
                    .unwrap();
                    let (status, headers) = read_head(&mut r);
                    assert_eq!(status, 200);
                    let _ = read_body(&mut r, &headers, "POST");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = request(&srv.addr, "GET", "/mock/stats", &[], b"").json();
    assert_eq!(stats["total"], 400);
    assert_eq!(stats["by_model"], json!({"base": 200, "a": 200}));
}

#[test]
fn sigterm_exits_cleanly() {
    let mut srv = Server::start(&["--model", "base"]);
    // An idle keep-alive connection must not hold the exit up.
    let _idle = connect(&srv.addr);
    let st = Command::new("kill")
        .args(["-TERM", &srv.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let st = srv
        .wait_exit(Duration::from_secs(5))
        .expect("exit after SIGTERM");
    assert!(st.success(), "{st:?}");
}

fn run_cli(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + IO_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!("mock-vllm {args:?} did not exit");
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn cli_help_and_errors() {
    let out = run_cli(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--lora NAME"));

    let out = run_cli(&["--listen", "0.0.0.0:0", "--model", "m"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("non-loopback"));

    let out = run_cli(&["--model", "m"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));

    // Port already taken: a clear error, exit 1.
    let srv = Server::start(&["--model", "m"]);
    let out = run_cli(&["--listen", &srv.addr, "--model", "m"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
}

/// vLLM's run-time LoRA endpoints: shapes, status codes and messages of
/// `OpenAIServingModels.load_lora_adapter` / `unload_lora_adapter`, and /v1/models reflects
/// each change at once.
#[test]
fn lora_adapters_load_and_unload_at_run_time() {
    let srv = Server::start(&["--model", "base", "--lora", "a"]);
    let a = srv.addr.as_str();
    let listed = |a: &str| -> Vec<(String, Value, Value)> {
        let v = request(a, "GET", "/v1/models", &[], b"").json();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_string(),
                    m["parent"].clone(),
                    m["root"].clone(),
                )
            })
            .collect()
    };

    let r = post_json(
        a,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "b", "lora_path": "/adapters/b"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "Success: LoRA adapter 'b' added successfully."
    );
    assert_eq!(
        listed(a),
        [
            ("base".to_string(), Value::Null, json!("base")),
            ("a".to_string(), json!("base"), json!("a")),
            ("b".to_string(), json!("base"), json!("/adapters/b")),
        ]
    );
    // The new adapter serves at once.
    let r = post_json(
        a,
        "/v1/completions",
        &json!({"model": "b", "prompt": "x", "max_tokens": 1}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["model"], "b");

    // (path, body, status, error type, message); vLLM's error body is
    // {"error": {"message", "type", "param": null, "code": <status>}}.
    let cases: &[(&str, Value, u16, &str, &str)] = &[
        ("/v1/load_lora_adapter", json!({"lora_name": "b", "lora_path": "/p"}), 400, "InvalidUserInput",
         "The lora adapter 'b' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."),
        ("/v1/load_lora_adapter", json!({"lora_name": "", "lora_path": "/p"}), 400, "InvalidUserInput",
         "Both 'lora_name' and 'lora_path' must be provided."),
        ("/v1/unload_lora_adapter", json!({"lora_name": "nope"}), 404, "NotFoundError",
         "The lora adapter 'nope' cannot be found."),
        ("/v1/unload_lora_adapter", json!({"lora_name": ""}), 400, "InvalidUserInput",
         "'lora_name' needs to be provided to unload a LoRA adapter."),
    ];
    for (path, body, status, kind, message) in cases {
        let r = post_json(a, path, body);
        assert_eq!(r.status, *status, "{path} {body}");
        let v = r.json();
        assert_eq!(v["error"]["type"], *kind, "{path} {body}");
        assert_eq!(v["error"]["message"], *message, "{path} {body}");
        assert_eq!(v["error"]["code"], *status, "{path} {body}");
    }
    // A missing field is FastAPI's validation error.
    let r = post_json(a, "/v1/load_lora_adapter", &json!({"lora_name": "c"}));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("'lora_path'"));

    let r = post_json(a, "/v1/unload_lora_adapter", &json!({"lora_name": "a"}));
    assert_eq!(r.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "Success: LoRA adapter 'a' removed successfully."
    );
    let ids: Vec<String> = listed(a).into_iter().map(|m| m.0).collect();
    assert_eq!(ids, ["base", "b"]);
    let r = post_json(a, "/v1/completions", &json!({"model": "a", "prompt": "x"}));
    assert_eq!(r.status, 404);
    let r = request(a, "GET", "/v1/load_lora_adapter", &[], b"");
    assert_eq!(r.status, 405);
}
