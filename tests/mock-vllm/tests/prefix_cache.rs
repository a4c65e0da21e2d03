//! Black-box test of the simulated prefix cache and prefill timing: the real binary on
//! 127.0.0.1:0, one request per connection (Connection: close, read to EOF). Bounded waits.
//! (Kept apart from tests/http.rs, with its own small helpers.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

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
        let Ok(line) = rx.recv_timeout(IO_TIMEOUT) else {
            let _ = child.kill();
            panic!("mock-vllm did not print its ready line in time");
        };
        let addr = line.split_whitespace().nth(4).unwrap().to_string();
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (status, lower-cased headers, body).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: mock\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn metric(addr: &str, name: &str) -> f64 {
    let (_, _, text) = request(addr, "GET", "/metrics", &[], "");
    text.lines()
        .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b'{'))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn shared_prefix_hits_the_cache_and_skips_its_prefill() {
    // 1000 tokens/s: a 1004-token prompt takes about 1 s to prefill uncached.
    let srv = Server::start(&[
        "--model",
        "m",
        "--prefix-cache-blocks",
        "1000",
        "--prefill-tokens-per-s",
        "1000",
    ]);
    let a = srv.addr.as_str();
    // Captured prompt: "system\n" + 4000 x "s" + "\nuser\nhi\n" = 4016 bytes = 1004 tokens,
    // 62 full blocks of 16 tokens (64 bytes) = 992 cacheable tokens.
    let body = json!({"model": "m", "max_tokens": 1, "messages": [
        {"role": "system", "content": "s".repeat(4000)},
        {"role": "user", "content": "hi"},
    ]})
    .to_string();
    let post = |extra: &[(&str, &str)]| {
        let mut h = vec![("Content-Type", "application/json")];
        h.extend_from_slice(extra);
        let t = Instant::now();
        let (status, headers, _) = request(a, "POST", "/v1/chat/completions", &h, &body);
        assert_eq!(status, 200);
        (t.elapsed(), headers)
    };

    let (cold, h) = post(&[]);
    assert_eq!(header(&h, "x-mock-prefix-cache-hit-tokens"), Some("0"));
    let ttft: f64 = header(&h, "x-mock-ttft-ms").unwrap().parse().unwrap();
    assert!(
        (1004.0..cold.as_secs_f64() * 1000.0).contains(&ttft),
        "{ttft} ms"
    );
    assert!(
        cold >= Duration::from_millis(1000),
        "cold prefill took {cold:?}"
    );
    let (warm, h) = post(&[("x-gateway-prefix-hash", "00112233aabbccdd")]);
    assert_eq!(header(&h, "x-mock-prefix-cache-hit-tokens"), Some("992"));
    assert!(
        warm < cold / 2,
        "cached prefill took {warm:?}, uncached {cold:?}"
    );
    // The gateway's key is echoed, for the routing benchmark's cross-check.
    assert_eq!(header(&h, "x-echo-prefix-hash"), Some("00112233aabbccdd"));

    assert_eq!(metric(a, "vllm:prefix_cache_queries_total"), 2008.0);
    assert_eq!(metric(a, "vllm:prefix_cache_hits_total"), 992.0);
    assert_eq!(metric(a, "vllm:num_requests_running"), 0.0);
    assert_eq!(metric(a, "vllm:num_requests_waiting"), 0.0);

    // vLLM's reset endpoint empties the cache; the counters keep counting.
    let (status, _, _) = request(a, "POST", "/reset_prefix_cache", &[], "");
    assert_eq!(status, 200);
    let (status, _, _) = request(a, "GET", "/reset_prefix_cache", &[], "");
    assert_eq!(status, 405);
    let (_, h) = post(&[]);
    assert_eq!(header(&h, "x-mock-prefix-cache-hit-tokens"), Some("0"));
    assert_eq!(metric(a, "vllm:prefix_cache_queries_total"), 3012.0);
}

#[test]
fn without_options_nothing_is_cached_or_delayed() {
    let srv = Server::start(&["--model", "m"]);
    let body = json!({"model": "m", "max_tokens": 1, "prompt": "p".repeat(8000)}).to_string();
    for _ in 0..2 {
        let t = Instant::now();
        let (status, h, _) = request(&srv.addr, "POST", "/v1/completions", &[], &body);
        assert_eq!(status, 200);
        assert_eq!(header(&h, "x-mock-prefix-cache-hit-tokens"), Some("0"));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    // Queries are counted (2 x 2000 tokens) even with the cache off, as vLLM's are.
    assert_eq!(metric(&srv.addr, "vllm:prefix_cache_queries_total"), 4000.0);
    assert_eq!(metric(&srv.addr, "vllm:prefix_cache_hits_total"), 0.0);
}
