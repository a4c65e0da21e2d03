//! Criterion micro-benchmarks of the core scanners, natively (`cargo bench --bench scanner`,
//! or `make bench-core` for a short run).
//!
//! Native numbers use the SWAR fast path of `core::json::skip` and the plain-array stand-in for the
//! vector UTF-8 check of `core::json::vector` (the wasm build uses SIMD128 and runs under V8: `make
//! bench-scan` times that in Node, `make bench` inside Envoy from the filter's own counters).
//! What they are good for: comparing scanner changes, and seeing which kind of body costs
//! what. Bodies are fed in 64 KiB windows, as the filter reads them.
//!
//! Groups:
//! - `chat/<size>/model-first|model-last`: chat-completions bodies of exact sizes, mostly
//!   ASCII prose with some escapes and non-ASCII, like `make bench` sends;
//! - `chat-plain/<size>`: the same with printable ASCII only, nothing escaped: the distance
//!   to `chat/` is what escapes and non-ASCII characters cost the scanner;
//! - `class/<name>`: the body classes of `make corpus` (real text in eight languages, emoji,
//!   tool use, code, a base64 image, a long conversation, \u-escaped Russian), 1 MiB each;
//! - `cjk/<size>`: the same shape with Chinese and Japanese text (3-byte UTF-8 throughout);
//! - `embeddings/<size>`: an embeddings-style request with a long array of numbers;
//! - `multipart/<size>/model-first|model-last`: an audio upload with a binary file part;
//! - `skip/<size>`: the string fast path alone (`find_string_stop`, which stops at non-ASCII too, and
//!   `plain_string_prefix`, which validates it), on ASCII and on CJK text: the ceiling for string bodies;
//! - `serde/<size>`: `serde_json` on the same chat body, as a point of reference (a full
//!   `Value` parse, like the naive prototype; and a typed struct that borrows `model`);
//! - `usage/json`, `usage/sse`: the response scanner (`core::usage`) on a 64-token
//!   chat completion and on a 300-event chat stream shaped like vLLM's (and `make
//!   bench-usage`'s mock's), fed one event at a time as the filter gets them.

// The lints of the crate deny these outside tests; a benchmark's setup may stop on them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_main!(native::benches);

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use bbr_wasm::core::json::skip::{find_string_stop, plain_string_prefix};
    use bbr_wasm::core::usage::{Framing, Outcome, ResponseScanner};
    use bbr_wasm::core::{ModelScanner, MultipartScanner, Step};
    use criterion::{BenchmarkId, Criterion, Throughput};
    use std::hint::black_box;

    const MODEL: &str = "Qwen/Qwen2.5-3B-Instruct";
    const WINDOW: usize = 64 * 1024;
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    const SIZES: [usize; 5] = [KIB, 16 * KIB, 256 * KIB, MIB, 4 * MIB];

    /// A small deterministic generator (xorshift64*): no dependency, same bodies every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[rustfmt::skip]
    const WORDS: &[&str] = &[
        "the", "model", "gateway", "routes", "each", "request", "by", "field", "of", "its",
        "body", "while", "prompt", "carries", "most", "bytes", "context", "window", "tokens",
        "retrieval", "augmented", "generation", "document", "section", "summary", "answer",
        "question", "customer", "support", "ticket", "invoice", "contract", "clause", "table",
        "latency", "throughput", "kubernetes", "cluster", "replica", "adapter", "weights",
        "inference", "server", "stream", "assistant", "please", "explain", "compare",
        "translate", "function", "variable", "error", "stack", "trace", "database", "query",
    ];
    #[rustfmt::skip]
    const EXTRAS: &[&str] = &[
        "naïve", "café", "Zürich", "—", "“quoted”", "数据", "→", "\"as is\"", "C:\\temp\\in.txt",
        "line\nbreak", "tab\there",
    ];
    #[rustfmt::skip]
    const CJK: &[&str] = &[
        "模型", "网关", "根据", "请求", "正文", "路由", "上下文", "窗口", "检索", "增强", "生成",
        "文档", "摘要", "回答", "问题", "推論", "サーバー", "ストリーム", "データベース", "。",
        "、", "翻訳してください", "説明", "比較",
    ];

    /// What the text of the messages is made of.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum Text {
        /// English words, ~3% of them non-ASCII or with characters JSON escapes.
        Mixed,
        /// English words only: printable ASCII, nothing escaped.
        Plain,
        /// Chinese and Japanese: 3-byte UTF-8 throughout.
        Cjk,
    }

    fn prose(rng: &mut Rng, bytes: usize, text: Text) -> String {
        let mut s = String::with_capacity(bytes + 32);
        let mut words = 0;
        while s.len() < bytes {
            let w = if text == Text::Cjk {
                CJK[rng.below(CJK.len())]
            } else if text == Text::Mixed && rng.below(100) < 3 {
                EXTRAS[rng.below(EXTRAS.len())]
            } else {
                WORDS[rng.below(WORDS.len())]
            };
            s.push_str(w);
            words += 1;
            if text != Text::Cjk {
                if words % 14 == 0 {
                    s.push('.');
                }
                s.push(' ');
            }
        }
        s
    }

    /// Pads or trims the string at `field` (a JSON pointer) with ASCII until the encoding of
    /// `doc` is exactly `size` bytes.
    fn exact(mut doc: serde_json::Value, field: &str, size: usize) -> Vec<u8> {
        loop {
            let body = serde_json::to_vec(&doc).unwrap();
            if body.len() == size {
                return body;
            }
            let s = doc.pointer_mut(field).unwrap();
            let mut text = s.as_str().unwrap().to_string();
            if body.len() < size {
                text.extend(std::iter::repeat_n('x', size - body.len()));
            } else {
                assert!(
                    !text.is_empty(),
                    "the fixed part is larger than {size} bytes"
                );
                let over = body.len() - size;
                let mut cut = text.len().saturating_sub(over);
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            *s = serde_json::Value::String(text);
        }
    }

    /// A chat-completions body of exactly `size` bytes.
    pub fn chat(size: usize, model_first: bool, text: Text) -> Vec<u8> {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ size as u64);
        let turns = (2 + size / (16 * KIB)).min(32);
        let per_turn = (size.saturating_sub(400) / turns).max(16);
        let mut messages = vec![serde_json::json!({
            "role": "system",
            "content": format!("You are a helpful assistant. {}", prose(&mut rng, per_turn.min(600), text)),
        })];
        for i in 0..turns - 1 {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(
                serde_json::json!({"role": role, "content": prose(&mut rng, per_turn, text)}),
            );
        }
        if turns % 2 == 1 {
            messages
                .push(serde_json::json!({"role": "user", "content": prose(&mut rng, 64, text)}));
        }
        let last = messages.len() - 1;
        // serde_json's map keeps keys sorted unless preserve_order is on, so `model` is placed
        // by hand: build the object text around the messages.
        let rest = serde_json::json!({
            "messages": messages,
            "temperature": 0.7, "top_p": 0.95, "max_tokens": 512, "stream": false,
            "stop": ["\n\nUser:"], "user": "bench-client-0001",
        });
        let fixed = exact(
            rest,
            &format!("/messages/{last}/content"),
            size - MODEL.len() - 11,
        );
        // `{...}` + `,"model":"..."` (or the reverse): 11 bytes of punctuation and key.
        let inner = &fixed[1..fixed.len() - 1];
        let model = format!("\"model\":\"{MODEL}\"");
        let mut body = Vec::with_capacity(size);
        body.push(b'{');
        if model_first {
            body.extend_from_slice(model.as_bytes());
            body.push(b',');
            body.extend_from_slice(inner);
        } else {
            body.extend_from_slice(inner);
            body.push(b',');
            body.extend_from_slice(model.as_bytes());
        }
        body.push(b'}');
        assert_eq!(body.len(), size);
        body
    }

    /// An embeddings request: `input` is a long array of arrays of numbers.
    pub fn embeddings(size: usize) -> Vec<u8> {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03 ^ size as u64);
        let mut body =
            format!("{{\"model\":\"{MODEL}\",\"encoding_format\":\"float\",\"input\":[[");
        let mut in_row = 0;
        while body.len() + 40 < size {
            if in_row == 64 {
                body.push_str("],[");
                in_row = 0;
            } else if in_row > 0 {
                body.push(',');
            }
            let v = rng.next();
            let sign = if v & 1 == 1 { "-" } else { "" };
            let exp = if v & 0x1E == 0 { "e-3" } else { "" };
            body.push_str(&format!("{sign}0.{:09}{exp}", v % 1_000_000_000));
            in_row += 1;
        }
        body.push_str("]]");
        // `,"user":"uuu…"}` brings it to exactly `size` bytes.
        let pad = size - body.len() - ",\"user\":\"\"}".len();
        body.push_str(&format!(",\"user\":\"{}\"}}", "u".repeat(pad)));
        assert_eq!(body.len(), size);
        body.into_bytes()
    }

    pub const BOUNDARY: &str = "----bbrBenchBoundary7MA4YWxkTrZu0gW";

    /// An audio upload: a `model` field and a binary `file` part of about `size` bytes.
    pub fn multipart(size: usize, model_first: bool) -> Vec<u8> {
        let mut rng = Rng(0xA076_1D64_78BD_642F ^ size as u64);
        let field = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{MODEL}\r\n"
        );
        let file_head = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        );
        let tail = format!("\r\n--{BOUNDARY}--\r\n");
        let audio_len = size.saturating_sub(field.len() + file_head.len() + tail.len());
        let mut audio = Vec::with_capacity(audio_len);
        while audio.len() < audio_len {
            audio.extend_from_slice(&rng.next().to_le_bytes());
        }
        audio.truncate(audio_len);
        let mut body = Vec::with_capacity(size);
        if model_first {
            body.extend_from_slice(field.as_bytes());
        }
        body.extend_from_slice(file_head.as_bytes());
        body.extend_from_slice(&audio);
        if model_first {
            body.extend_from_slice(tail.as_bytes());
        } else {
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(field.as_bytes());
            body.extend_from_slice(&tail.as_bytes()[2..]);
        }
        body
    }

    fn scan_json(body: &[u8]) -> Step {
        let mut s = ModelScanner::new(256);
        for window in body.chunks(WINDOW) {
            let step = s.feed(window);
            if step != Step::NeedMore {
                return step;
            }
        }
        s.finish()
    }

    fn scan_multipart(body: &[u8]) -> Step {
        let mut s = MultipartScanner::new(BOUNDARY, 256);
        for window in body.chunks(WINDOW) {
            let step = s.feed(window);
            if step != Step::NeedMore {
                return step;
            }
        }
        s.finish()
    }

    fn label(size: usize) -> String {
        if size >= MIB {
            format!("{}MiB", size / MIB)
        } else {
            format!("{}KiB", size / KIB)
        }
    }

    fn found(step: Step) {
        assert_eq!(step, Step::Found(MODEL.to_string()));
    }

    fn bench_chat(c: &mut Criterion) {
        let mut g = c.benchmark_group("chat");
        for size in SIZES {
            for (first, pos) in [(true, "model-first"), (false, "model-last")] {
                let body = chat(size, first, Text::Mixed);
                found(scan_json(&body));
                g.throughput(Throughput::Bytes(size as u64));
                g.bench_with_input(BenchmarkId::new(label(size), pos), &body, |b, body| {
                    b.iter(|| scan_json(black_box(body)))
                });
            }
        }
        g.finish();
    }

    /// The same chat bodies with nothing for the state machine inside the strings: the
    /// distance to `chat/` is what escapes and non-ASCII characters cost.
    fn bench_plain(c: &mut Criterion) {
        let mut g = c.benchmark_group("chat-plain");
        for size in [16 * KIB, MIB] {
            let body = chat(size, false, Text::Plain);
            found(scan_json(&body));
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_with_input(
                BenchmarkId::from_parameter(label(size)),
                &body,
                |b, body| b.iter(|| scan_json(black_box(body))),
            );
        }
        g.finish();
    }

    fn bench_cjk(c: &mut Criterion) {
        let mut g = c.benchmark_group("cjk");
        for size in [16 * KIB, MIB] {
            let body = chat(size, false, Text::Cjk);
            found(scan_json(&body));
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_with_input(
                BenchmarkId::from_parameter(label(size)),
                &body,
                |b, body| b.iter(|| scan_json(black_box(body))),
            );
        }
        g.finish();
    }

    /// The body classes of `make corpus` (bench/corpus.py): 1 MiB of real text per class.
    /// `class/<name>`; the folder is BBR_CORPUS or target/corpus (`make bench-core` builds it).
    fn bench_classes(c: &mut Criterion) {
        let dir = std::env::var_os("BBR_CORPUS").map_or_else(
            || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/corpus"),
            std::path::PathBuf::from,
        );
        let manifest = std::fs::read_to_string(dir.join("manifest.json"))
            .unwrap_or_else(|e| panic!("{}: {e}; run `make corpus`", dir.display()));
        let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        let mut g = c.benchmark_group("class");
        for class in manifest["classes"].as_object().unwrap().keys() {
            let body = std::fs::read(dir.join(format!("{class}.json"))).unwrap();
            found(scan_json(&body));
            g.throughput(Throughput::Bytes(body.len() as u64));
            g.bench_with_input(BenchmarkId::from_parameter(class), &body, |b, body| {
                b.iter(|| scan_json(black_box(body)))
            });
        }
        g.finish();
    }

    fn bench_embeddings(c: &mut Criterion) {
        let mut g = c.benchmark_group("embeddings");
        for size in [16 * KIB, MIB] {
            let body = embeddings(size);
            found(scan_json(&body));
            g.throughput(Throughput::Bytes(body.len() as u64));
            g.bench_with_input(
                BenchmarkId::from_parameter(label(size)),
                &body,
                |b, body| b.iter(|| scan_json(black_box(body))),
            );
        }
        g.finish();
    }

    fn bench_multipart(c: &mut Criterion) {
        let mut g = c.benchmark_group("multipart");
        for size in [16 * KIB, MIB] {
            for (first, pos) in [(true, "model-first"), (false, "model-last")] {
                let body = multipart(size, first);
                found(scan_multipart(&body));
                g.throughput(Throughput::Bytes(body.len() as u64));
                g.bench_with_input(BenchmarkId::new(label(size), pos), &body, |b, body| {
                    b.iter(|| scan_multipart(black_box(body)))
                });
            }
        }
        g.finish();
    }

    fn bench_skip(c: &mut Criterion) {
        let mut g = c.benchmark_group("skip");
        let mut rng = Rng(7);
        let ascii: Vec<u8> = prose(&mut rng, MIB, Text::Plain)
            .bytes()
            .filter(|&b| b != b'"' && b != b'\\' && b >= 0x20)
            .collect();
        let cjk: Vec<u8> = prose(&mut rng, MIB, Text::Cjk).into_bytes();
        for (name, text) in [("ascii-1MiB", &ascii), ("cjk-1MiB", &cjk)] {
            assert_eq!(plain_string_prefix(text), text.len());
            g.throughput(Throughput::Bytes(text.len() as u64));
            g.bench_with_input(BenchmarkId::new("find_string_stop", name), text, |b, t| {
                b.iter(|| find_string_stop(black_box(t)))
            });
            g.bench_with_input(
                BenchmarkId::new("plain_string_prefix", name),
                text,
                |b, t| b.iter(|| plain_string_prefix(black_box(t))),
            );
        }
        g.finish();
    }

    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(borrow)]
        model: &'a str,
    }

    fn bench_serde(c: &mut Criterion) {
        let mut g = c.benchmark_group("serde");
        for size in [16 * KIB, MIB] {
            let body = chat(size, false, Text::Mixed);
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_with_input(BenchmarkId::new("value", label(size)), &body, |b, body| {
                b.iter(|| {
                    let v: serde_json::Value = serde_json::from_slice(black_box(body)).unwrap();
                    v.get("model").and_then(|m| m.as_str()).map(str::len)
                })
            });
            g.bench_with_input(BenchmarkId::new("typed", label(size)), &body, |b, body| {
                b.iter(|| {
                    let t: Typed<'_> = serde_json::from_slice(black_box(body)).unwrap();
                    t.model.len()
                })
            });
        }
        g.finish();
    }

    /// A chat completion of `tokens` tokens, non-streamed, usage last.
    fn completion(tokens: usize) -> Vec<u8> {
        let content: Vec<String> = (0..tokens).map(|i| format!("tok{i}")).collect();
        format!(
            "{{\"choices\":[{{\"finish_reason\":\"length\",\"index\":0,\"logprobs\":null,\
             \"message\":{{\"content\":\"{}\",\"role\":\"assistant\"}}}}],\"created\":1796603484,\
             \"id\":\"chatcmpl-18eed1597b2b2b7400000000\",\"model\":\"{MODEL}\",\
             \"object\":\"chat.completion\",\"usage\":{{\"completion_tokens\":{tokens},\
             \"prompt_tokens\":4,\"prompt_tokens_details\":null,\"total_tokens\":{}}}}}",
            content.join(" "),
            tokens + 4
        )
        .into_bytes()
    }

    /// A chat stream of `tokens` token events (role first, usage and [DONE] last), one event
    /// per element.
    fn stream(tokens: usize) -> Vec<Vec<u8>> {
        let head = "{\"choices\":[{\"delta\":";
        let tail = format!(
            "\"created\":1796603484,\"id\":\"chatcmpl-18eed1597b2b2b7400000000\",\
             \"model\":\"{MODEL}\",\"object\":\"chat.completion.chunk\""
        );
        let mut events = vec![format!(
            "data: {head}{{\"content\":\"\",\"role\":\"assistant\"}},\"finish_reason\":null,\
             \"index\":0,\"logprobs\":null}}],{tail}}}\n\n"
        )];
        for i in 0..tokens {
            let sep = if i == 0 { "" } else { " " };
            events.push(format!(
                "data: {head}{{\"content\":\"{sep}tok{i}\"}},\"finish_reason\":null,\"index\":0,\
                 \"logprobs\":null,\"stop_reason\":null}}],{tail}}}\n\n"
            ));
        }
        events.push(format!(
            "data: {{\"choices\":[],{tail},\"usage\":{{\"completion_tokens\":{tokens},\
             \"prompt_tokens\":4,\"prompt_tokens_details\":null,\"total_tokens\":{}}}}}\n\n",
            tokens + 4
        ));
        events.push("data: [DONE]\n\n".to_string());
        events.into_iter().map(String::into_bytes).collect()
    }

    fn scan_response(framing: Framing, chunks: &[Vec<u8>]) -> Outcome {
        let mut s = ResponseScanner::new(framing, u64::MAX);
        for chunk in chunks {
            s.feed(black_box(chunk));
        }
        s.finish(true)
    }

    fn bench_usage(c: &mut Criterion) {
        let mut g = c.benchmark_group("usage");
        let json = vec![completion(64)];
        let sse = stream(300);
        for (name, framing, chunks) in [("json", Framing::Json, &json), ("sse", Framing::Sse, &sse)]
        {
            let Outcome::Counted(usage) = scan_response(framing, chunks) else {
                panic!("{name}: no usage read");
            };
            assert_eq!(
                (usage.input, usage.output),
                (Some(4), Some(if name == "json" { 64 } else { 300 }))
            );
            g.throughput(Throughput::Bytes(
                chunks.iter().map(|c| c.len() as u64).sum(),
            ));
            g.bench_with_input(BenchmarkId::new(name, chunks.len()), chunks, |b, chunks| {
                b.iter(|| scan_response(framing, chunks))
            });
        }
        g.finish();
    }

    criterion::criterion_group!(
        benches,
        bench_usage,
        bench_chat,
        bench_plain,
        bench_cjk,
        bench_classes,
        bench_embeddings,
        bench_multipart,
        bench_skip,
        bench_serde
    );
}
