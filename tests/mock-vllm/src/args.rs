//! Hand-rolled command line parsing (no clap: keep the dependency tree small).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::cache::EngineConfig;

pub const USAGE: &str = "\
mock-vllm: a vLLM stand-in for gateway tests (OpenAI-compatible API, deterministic output)

USAGE:
    mock-vllm --listen ADDR --model BASE [--lora NAME]... [OPTIONS]

REQUIRED:
    --listen ADDR          Address to bind, e.g. 127.0.0.1:8001 (port 0 = any free port).
                           Must be a loopback address unless --allow-non-loopback is given.
    --model BASE           The base model name served (like `vllm serve BASE`).

OPTIONS:
    --lora NAME            A LoRA adapter served on top of BASE; repeat for several
                           (like `vllm serve --lora-modules NAME=PATH ...`).
    --id ID                Backend id put in every `x-mock-backend` response header
                           (default: the bound address, e.g. 127.0.0.1:8001).
    --ttft-ms N            Time to first token, in milliseconds (default 0).
    --itl-ms N             Delay between tokens, in milliseconds (default 0).
    --max-model-len N      Context length reported by /v1/models (default 4096).
    --prefix-cache-blocks N
                           Simulated prefix cache: an LRU of N blocks per replica (default 0:
                           none). Tokens are 4 bytes of prompt text.
    --block-tokens N       Tokens per cache block (default 16, vLLM's block size).
    --prefill-tokens-per-s N
                           Turns the timing model on: one prefill at a time at N tokens/s
                           (uncached tokens only), then decoding in parallel at --itl-ms;
                           TTFT = queueing + prefill + --ttft-ms (default 0: off).
    --max-num-seqs N       Sequences running at once; more wait (default 256, vLLM's). Given,
                           it queues without --prefill-tokens-per-s too; /metrics reports
                           waiting, running and kv_cache_usage_perc = running / N.
    --background-load N    N requests kept running or waiting from outside the gateway (load
                           the gateway does not see), each for --background-ms (default 1000),
                           then replaced (default 0).
    --allow-non-loopback   Allow binding a non-loopback address.
    -h, --help             Print this help and exit.

Each option also accepts the --name=value form.

Once listening, one line is printed to stdout:
    mock-vllm <ID> listening on <ADDR> serving <BASE>[,<LORA>...]

ENDPOINTS:
    POST /v1/completions, POST /v1/chat/completions   (stream: true -> SSE)
    POST /reset_prefix_cache
    GET  /v1/models, GET /health, GET /metrics
    POST /v1/load_lora_adapter {lora_name, lora_path}, POST /v1/unload_lora_adapter
         {lora_name}   (vLLM's run-time LoRA endpoints, same shapes and status codes)
    GET  /mock/stats, POST /mock/stats/reset
";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub model: String,
    pub loras: Vec<String>,
    pub id: Option<String>,
    pub ttft: Duration,
    pub itl: Duration,
    pub max_model_len: u64,
    pub allow_non_loopback: bool,
    pub engine: EngineConfig,
}

impl Config {
    /// All served model names, base first.
    pub fn served_models(&self) -> Vec<String> {
        let mut v = Vec::with_capacity(1 + self.loras.len());
        v.push(self.model.clone());
        v.extend(self.loras.iter().cloned());
        v
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Boxed: the configuration is far larger than `Help`.
    Run(Box<Config>),
    Help,
}

/// Largest delay accepted for --ttft-ms / --itl-ms (one hour): anything larger is a typo.
const MAX_DELAY_MS: u64 = 3_600_000;

/// Parses the arguments that follow the program name.
pub fn parse<I, S>(args: I) -> Result<Command, String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut listen: Option<String> = None;
    let mut model: Option<String> = None;
    let mut loras: Vec<String> = Vec::new();
    let mut id: Option<String> = None;
    let mut ttft: Option<u64> = None;
    let mut itl: Option<u64> = None;
    let mut max_model_len: Option<u64> = None;
    let mut allow_non_loopback = false;
    let mut engine = EngineOptions::default();

    let mut it = args.into_iter().map(Into::into);
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        if arg == "--allow-non-loopback" {
            allow_non_loopback = true;
            continue;
        }
        if !arg.starts_with("--") {
            return Err(format!("unexpected argument '{arg}'"));
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let takes_value = matches!(
            name.as_str(),
            "--listen"
                | "--model"
                | "--lora"
                | "--id"
                | "--ttft-ms"
                | "--itl-ms"
                | "--max-model-len"
                | "--prefix-cache-blocks"
                | "--block-tokens"
                | "--prefill-tokens-per-s"
                | "--max-num-seqs"
                | "--background-load"
                | "--background-ms"
        );
        if !takes_value {
            return Err(format!("unknown option '{name}'"));
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .ok_or_else(|| format!("option '{name}' needs a value"))?,
        };
        match name.as_str() {
            "--listen" => set_once(&mut listen, &name, value)?,
            "--model" => set_once(&mut model, &name, non_empty(&name, value)?)?,
            "--lora" => loras.push(non_empty(&name, value)?),
            "--id" => set_once(&mut id, &name, non_empty(&name, value)?)?,
            "--ttft-ms" => set_once(&mut ttft, &name, parse_ms(&name, &value)?)?,
            "--itl-ms" => set_once(&mut itl, &name, parse_ms(&name, &value)?)?,
            "--max-model-len" => {
                let n = parse_u64(&name, &value)?;
                if n == 0 {
                    return Err(format!("'{name}' must be at least 1"));
                }
                set_once(&mut max_model_len, &name, n)?
            }
            _ => engine.set(&name, &value)?,
        }
    }

    let listen = listen.ok_or("missing required option '--listen ADDR'")?;
    let model = model.ok_or("missing required option '--model BASE'")?;
    let listen = parse_listen(&listen)?;
    if !listen.ip().is_loopback() && !allow_non_loopback {
        return Err(format!(
            "refusing to listen on non-loopback address {listen} (pass --allow-non-loopback to force it)"
        ));
    }
    for (i, l) in loras.iter().enumerate() {
        if *l == model {
            return Err(format!("--lora '{l}' has the same name as the base model"));
        }
        if loras[..i].contains(l) {
            return Err(format!("--lora '{l}' given twice"));
        }
    }
    if let Some(id) = &id {
        // It goes into a response header.
        if id.chars().any(|c| c.is_control()) || !id.is_ascii() {
            return Err("--id must be printable ASCII".to_string());
        }
    }

    Ok(Command::Run(Box::new(Config {
        listen,
        model,
        loras,
        id,
        ttft: Duration::from_millis(ttft.unwrap_or(0)),
        itl: Duration::from_millis(itl.unwrap_or(0)),
        max_model_len: max_model_len.unwrap_or(4096),
        allow_non_loopback,
        engine: engine.finish(),
    })))
}

/// The prefix-cache and timing-model options (see cache.rs).
#[derive(Default)]
struct EngineOptions {
    cache_blocks: Option<u64>,
    block_tokens: Option<u64>,
    prefill: Option<u64>,
    max_num_seqs: Option<u64>,
    background: Option<u64>,
    background_ms: Option<u64>,
}

/// Upper bound for the engine's counts (blocks, tokens/s, sequences): anything larger is a typo.
const MAX_ENGINE_VALUE: u64 = 1 << 32;

impl EngineOptions {
    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let n = parse_u64(name, value)?;
        if n > MAX_ENGINE_VALUE {
            return Err(format!(
                "option '{name}' is at most {MAX_ENGINE_VALUE}, got {n}"
            ));
        }
        let (slot, min) = match name {
            "--prefix-cache-blocks" => (&mut self.cache_blocks, 0),
            "--block-tokens" => (&mut self.block_tokens, 1),
            "--prefill-tokens-per-s" => (&mut self.prefill, 0),
            "--max-num-seqs" => (&mut self.max_num_seqs, 1),
            "--background-load" => (&mut self.background, 0),
            "--background-ms" => (&mut self.background_ms, 1),
            _ => return Err(format!("unknown option '{name}'")),
        };
        if n < min {
            return Err(format!("'{name}' must be at least {min}"));
        }
        set_once(slot, name, n)
    }

    fn finish(self) -> EngineConfig {
        let d = EngineConfig::default();
        EngineConfig {
            block_tokens: self.block_tokens.unwrap_or(d.block_tokens),
            cache_blocks: self.cache_blocks.map_or(d.cache_blocks, |n| n as usize),
            prefill_tokens_per_s: self.prefill.unwrap_or(d.prefill_tokens_per_s),
            max_num_seqs: self.max_num_seqs.map_or(d.max_num_seqs, |n| n as usize),
            queue: self.max_num_seqs.is_some(),
            background: self.background.map_or(d.background, |n| n as usize),
            background_ms: self.background_ms.unwrap_or(d.background_ms),
        }
    }
}

fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("option '{name}' given more than once"));
    }
    *slot = Some(value);
    Ok(())
}

fn non_empty(name: &str, value: String) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err(format!("option '{name}' needs a non-empty value"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(format!("option '{name}' has control characters"));
    }
    Ok(value)
}

fn parse_u64(name: &str, value: &str) -> Result<u64, String> {
    value
        .parse::<u64>()
        .map_err(|_| format!("option '{name}' needs a non-negative integer, got '{value}'"))
}

fn parse_ms(name: &str, value: &str) -> Result<u64, String> {
    let n = parse_u64(name, value)?;
    if n > MAX_DELAY_MS {
        return Err(format!(
            "option '{name}' is at most {MAX_DELAY_MS} ms, got {n}"
        ));
    }
    Ok(n)
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        if let Ok(p) = port.parse::<u16>() {
            return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p));
        }
    }
    Err(format!(
        "bad --listen address '{s}' (expected IP:PORT such as 127.0.0.1:8001 or [::1]:8001)"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, String> {
        match parse(args.iter().copied())? {
            Command::Run(c) => Ok(*c),
            Command::Help => Err("help".into()),
        }
    }

    #[test]
    fn minimal() {
        let c = run(&["--listen", "127.0.0.1:0", "--model", "llama"]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(c.model, "llama");
        assert!(c.loras.is_empty());
        assert_eq!(c.id, None);
        assert_eq!(c.ttft, Duration::ZERO);
        assert_eq!(c.itl, Duration::ZERO);
        assert_eq!(c.max_model_len, 4096);
        assert_eq!(c.served_models(), vec!["llama".to_string()]);
        assert_eq!(c.engine, EngineConfig::default());
    }

    #[test]
    fn engine_options() {
        let c = run(&[
            "--listen",
            "127.0.0.1:0",
            "--model",
            "m",
            "--prefix-cache-blocks",
            "1000",
            "--block-tokens=64",
            "--prefill-tokens-per-s",
            "20000",
            "--max-num-seqs",
            "8",
        ])
        .unwrap();
        assert_eq!(
            c.engine,
            EngineConfig {
                block_tokens: 64,
                cache_blocks: 1000,
                prefill_tokens_per_s: 20000,
                max_num_seqs: 8,
                queue: true,
                background: 0,
                background_ms: 1000,
            }
        );
        let b = run(&[
            "--listen",
            "127.0.0.1:0",
            "--model",
            "m",
            "--background-load",
            "3",
            "--background-ms=250",
        ])
        .unwrap();
        assert_eq!((b.engine.background, b.engine.background_ms), (3, 250));
        assert!(run(&[
            "--listen",
            "127.0.0.1:0",
            "--model",
            "m",
            "--background-ms",
            "0"
        ])
        .is_err());
    }

    #[test]
    fn full_and_equals_form() {
        let c = run(&[
            "--listen=127.0.0.1:8001",
            "--model=base",
            "--lora",
            "a",
            "--lora=b",
            "--id",
            "pool-a-1",
            "--ttft-ms",
            "25",
            "--itl-ms=5",
            "--max-model-len",
            "8192",
        ])
        .unwrap();
        assert_eq!(c.listen.port(), 8001);
        assert_eq!(c.loras, vec!["a", "b"]);
        assert_eq!(c.id.as_deref(), Some("pool-a-1"));
        assert_eq!(c.ttft, Duration::from_millis(25));
        assert_eq!(c.itl, Duration::from_millis(5));
        assert_eq!(c.max_model_len, 8192);
        assert_eq!(c.served_models(), vec!["base", "a", "b"]);
    }

    #[test]
    fn help() {
        assert_eq!(parse(["--help"]).unwrap(), Command::Help);
        assert_eq!(parse(["--listen", "x", "-h"]).unwrap(), Command::Help);
    }

    #[test]
    fn ipv6_and_localhost() {
        let c = run(&["--listen", "[::1]:0", "--model", "m"]).unwrap();
        assert!(c.listen.ip().is_loopback());
        let c = run(&["--listen", "localhost:9", "--model", "m"]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9".parse().unwrap());
        let c = run(&["--listen", "127.3.4.5:0", "--model", "m"]).unwrap();
        assert!(c.listen.ip().is_loopback());
    }

    #[test]
    fn non_loopback_refused_unless_allowed() {
        let e = run(&["--listen", "0.0.0.0:0", "--model", "m"]).unwrap_err();
        assert!(e.contains("non-loopback"), "{e}");
        let e = run(&["--listen", "10.1.2.3:80", "--model", "m"]).unwrap_err();
        assert!(e.contains("non-loopback"), "{e}");
        let c = run(&[
            "--listen",
            "0.0.0.0:0",
            "--model",
            "m",
            "--allow-non-loopback",
        ])
        .unwrap();
        assert!(c.allow_non_loopback);
    }

    #[test]
    fn errors() {
        let cases: &[(&[&str], &str)] = &[
            (&["--model", "m"], "--listen"),
            (&["--listen", "127.0.0.1:0"], "--model"),
            (&["--listen"], "needs a value"),
            (
                &["--listen", "127.0.0.1:0", "--model", "m", "--bogus", "1"],
                "unknown option '--bogus'",
            ),
            (
                &["--listen", "127.0.0.1:0", "--model", "m", "stray"],
                "unexpected argument",
            ),
            (&["--listen", "nonsense", "--model", "m"], "bad --listen"),
            (
                &["--listen", "127.0.0.1:99999", "--model", "m"],
                "bad --listen",
            ),
            (&["--listen", "127.0.0.1:0", "--model", ""], "non-empty"),
            (
                &["--listen", "127.0.0.1:0", "--model", "m", "--model", "n"],
                "more than once",
            ),
            (
                &["--listen", "127.0.0.1:0", "--model", "m", "--ttft-ms", "-1"],
                "non-negative integer",
            ),
            (
                &["--listen", "127.0.0.1:0", "--model", "m", "--itl-ms", "1.5"],
                "non-negative integer",
            ),
            (
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    "m",
                    "--itl-ms",
                    "99999999",
                ],
                "at most",
            ),
            (
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    "m",
                    "--max-model-len",
                    "0",
                ],
                "at least 1",
            ),
            (
                &["--listen", "127.0.0.1:0", "--model", "m", "--lora", "m"],
                "same name",
            ),
            (
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    "m",
                    "--lora",
                    "a",
                    "--lora",
                    "a",
                ],
                "twice",
            ),
            (
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    "m",
                    "--id",
                    "caf\u{e9}",
                ],
                "printable ASCII",
            ),
            (
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    "m",
                    "--block-tokens",
                    "0",
                ],
                "at least 1",
            ),
            (
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    "m",
                    "--max-num-seqs",
                    "0",
                ],
                "at least 1",
            ),
            (
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    "m",
                    "--prefix-cache-blocks",
                    "99999999999",
                ],
                "at most",
            ),
            (
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--model",
                    "m",
                    "--prefill-tokens-per-s",
                    "1",
                    "--prefill-tokens-per-s",
                    "2",
                ],
                "more than once",
            ),
        ];
        for (args, want) in cases {
            let e = run(args).unwrap_err();
            assert!(e.contains(want), "{args:?}: got '{e}', want '{want}'");
        }
    }
}
