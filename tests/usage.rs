//! The response accounting (`core::usage`): token usage and the first token's event, read
//! push-style from JSON responses and SSE streams. Every case is fed whole, byte by byte, and
//! split in two at every boundary, and must give the same outcome, with the first token seen
//! at the same byte. Runs natively and under wasm-bindgen-test, like tests/core.rs.

use bbr_wasm::core::routing::request::is_completions_path;
use bbr_wasm::core::usage::include;
use bbr_wasm::core::usage::metrics;
use bbr_wasm::core::usage::UsageSettings;
use bbr_wasm::core::usage::{
    elapsed_ms, plan_response, time_per_output_token_ms, Framing, Outcome, ResponsePlan,
    ResponseScanner, Unreadable, Usage, DEFAULT_MAX_SCAN_BYTES,
};
use bbr_wasm::core::{ModelScanner, Router, Step, StreamFields};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test;

#[macro_use]
mod common; // the `both!` test macro

/// An access-log case: prompt tokens, completion tokens, ttft ms, the value written.
type LogCase = (Option<u64>, Option<u64>, Option<u64>, Option<&'static str>);

fn counted(input: u64, output: u64, cached: Option<u64>) -> Outcome {
    Outcome::Counted(Usage {
        input: Some(input),
        output: Some(output),
        cached_input: cached,
    })
}

/// (status, content type, content encoding, plan).
type PlanCase = (
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
    ResponsePlan,
);

const MALFORMED: Outcome = Outcome::Unreadable(Unreadable::Malformed);
const TRUNCATED: Outcome = Outcome::Unreadable(Unreadable::Truncated);

/// Feeds `pieces` in order; returns the outcome and the byte offset at which `feed` first said
/// "content" (the offset of the piece's last byte), checking it says so at most once.
fn scan(framing: Framing, pieces: &[&[u8]]) -> (Outcome, Option<usize>) {
    let mut scanner = ResponseScanner::new(framing, DEFAULT_MAX_SCAN_BYTES);
    let (mut at, mut first) = (0, None);
    for piece in pieces {
        at += piece.len();
        if scanner.feed(piece) {
            assert!(first.is_none(), "content reported twice");
            first = Some(at - 1);
        }
    }
    (scanner.finish(true), first)
}

/// Whole, byte by byte, and in two at every boundary: the same outcome each time, and the
/// first token reported in the piece that holds its byte.
fn check(name: &str, framing: Framing, text: &str, want: Outcome, first_token: Option<&str>) {
    let bytes = text.as_bytes();
    let want_first = first_token.map(|marker| match text.find(marker) {
        Some(at) => at,
        None => unreachable!("{name}: marker {marker:?} not in the case"),
    });
    let (got, first) = scan(framing, &[bytes]);
    assert_eq!(got, want, "{name}: whole");
    assert_eq!(
        first.is_some(),
        want_first.is_some(),
        "{name}: whole, first token"
    );
    let singles: Vec<&[u8]> = bytes.chunks(1).collect();
    let (got, first) = scan(framing, &singles);
    assert_eq!(got, want, "{name}: byte by byte");
    assert_eq!(first, want_first, "{name}: byte by byte, first token");
    for split in 0..=bytes.len() {
        let (a, b) = bytes.split_at(split);
        let (got, first) = scan(framing, &[a, b]);
        assert_eq!(got, want, "{name}: split at {split}");
        let want_piece = want_first.map(|at| {
            if at < split {
                split - 1
            } else {
                bytes.len() - 1
            }
        });
        assert_eq!(first, want_piece, "{name}: split at {split}, first token");
    }
}

// A vLLM chat stream (`stream_options.include_usage`): the role chunk's content is empty,
// every token chunk has content, the usage chunk has empty choices.
const VLLM_CHAT_STREAM: &str = concat!(
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",",
    "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",",
    "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",",
    "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \\\"\\u00e9\\\"\"},\"logprobs\":null,\"finish_reason\":\"length\"}]}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",",
    "\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"total_tokens\":14,\"completion_tokens\":2}}\n\n",
    "data: [DONE]\n\n",
);

// llama-server's shape: CR LF line ends, the role chunk's content null, usage and timings in
// the last chunk, cached prompt tokens reported.
const LLAMA_CHAT_STREAM: &str = concat!(
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}],\"created\":1,\"id\":\"x\",\"model\":\"s\",\"object\":\"chat.completion.chunk\"}\r\n\r\n",
    "data: {\"choices\":[{\"finish_reason\":null,\"index\":0,\"delta\":{\"content\":\"Once\"}}],\"created\":1,\"id\":\"x\",\"model\":\"s\",\"object\":\"chat.completion.chunk\"}\r\n\r\n",
    "data: {\"choices\":[{\"finish_reason\":\"length\",\"index\":0,\"delta\":{}}],\"created\":1,\"id\":\"x\",\"model\":\"s\",\"object\":\"chat.completion.chunk\",",
    "\"usage\":{\"completion_tokens\":96,\"prompt_tokens\":40,\"total_tokens\":136,\"prompt_tokens_details\":{\"cached_tokens\":32}},",
    "\"timings\":{\"prompt_n\":8,\"prompt_ms\":1.5,\"predicted_n\":96,\"predicted_per_token_ms\":4.25}}\r\n\r\n",
    "data: [DONE]\r\n\r\n",
);

const COMPLETIONS_STREAM: &str = concat!(
    ": a comment line\n",
    "event: message\nid: 7\nretry: 10\n",
    "data: {\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":null}]}\n\n",
    "data: {\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\" tok0\",\"finish_reason\":null}]}\n\n",
    "data:{\"object\":\"text_completion\",\"choices\":[],\n",
    "data: \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
    "data: [DONE]\n\n",
);

const CHAT_JSON: &str = r#"{"id":"chatcmpl-9","object":"chat.completion","created":1,"model":"m",
 "choices":[{"index":0,"message":{"role":"assistant","content":"Hi \"there\" \u263a","usage":{"prompt_tokens":999}},
 "logprobs":null,"finish_reason":"stop"}],
 "usage":{"prompt_tokens":17,"total_tokens":21,"completion_tokens":4,"prompt_tokens_details":null}}"#;

both! {
    fn json_responses() {
        let cases: &[(&str, &str, Outcome)] = &[
            ("chat, usage last", CHAT_JSON, counted(17, 4, None)),
            ("usage first",
             r#"{"usage":{"completion_tokens":5,"prompt_tokens":6},"choices":[{"text":"abc"}]}"#,
             counted(6, 5, None)),
            ("cached prompt tokens",
             r#"{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":7,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":64}}}"#,
             counted(100, 7, Some(64))),
            ("no usage", r#"{"object":"text_completion","choices":[{"text":"x"}]}"#, Outcome::Absent),
            ("usage null", r#"{"choices":[],"usage":null}"#, Outcome::Absent),
            ("usage without counts", r#"{"usage":{"total_tokens":3}}"#, Outcome::Absent),
            ("usage only nested", r#"{"data":{"usage":{"prompt_tokens":1,"completion_tokens":2}}}"#, Outcome::Absent),
            ("embeddings: input only",
             r#"{"object":"list","data":[{"embedding":[0.1,-2e-3,3]}],"usage":{"prompt_tokens":8,"total_tokens":8}}"#,
             Outcome::Counted(Usage { input: Some(8), output: None, cached_input: None })),
            ("not integers are not counts",
             r#"{"usage":{"prompt_tokens":1.5,"completion_tokens":-2,"prompt_tokens_details":{"cached_tokens":1e3}}}"#,
             Outcome::Absent),
            ("a count past u64 is none", r#"{"usage":{"prompt_tokens":99999999999999999999,"completion_tokens":3}}"#,
             Outcome::Counted(Usage { input: None, output: Some(3), cached_input: None })),
            ("escaped key is not read", r#"{"us\u0061ge":{"prompt_tokens":1,"completion_tokens":1}}"#, Outcome::Absent),
            ("long keys and deep values",
             r#"{"a_very_long_key_that_is_not_compared_at_all":[[[[[{"usage":{"prompt_tokens":1}}]]]]],"usage":{"prompt_tokens":2,"completion_tokens":3}}"#,
             counted(2, 3, None)),
            ("top-level array", "[1,2,{\"usage\":{\"prompt_tokens\":1}}]", Outcome::Absent),
            ("top-level number", "42", Outcome::Absent),
            ("whitespace around", " \r\n\t{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}} \n", counted(1, 2, None)),
            ("broken: missing brace", r#"{"usage":{"prompt_tokens":1,"completion_tokens":2}"#, TRUNCATED),
            ("broken: trailing data", r#"{"usage":{"prompt_tokens":1,"completion_tokens":2}} x"#, MALFORMED),
            ("broken: two documents", r#"{} {}"#, MALFORMED),
            ("broken: missing comma", r#"{"a":1 "b":2}"#, MALFORMED),
            ("broken: trailing comma", r#"{"a":1,}"#, MALFORMED),
            ("broken: bad literal", r#"{"a":nul}"#, MALFORMED),
            ("broken: bad escape", r#"{"a":"\x"}"#, MALFORMED),
            ("broken: bad unicode escape", r#"{"a":"\u12g4"}"#, MALFORMED),
            ("broken: control byte in string", "{\"a\":\"x\ny\"}", MALFORMED),
            ("broken: mismatched close", r#"{"a":[1}"#, MALFORMED),
            ("broken: no colon", r#"{"a" 1}"#, MALFORMED),
            ("broken: HTML", "<html><body>502 Bad Gateway</body></html>", MALFORMED),
            ("truncated mid-string", r#"{"choices":[{"text":"abc"#, TRUNCATED),
            ("empty body", "", TRUNCATED),
        ];
        for (name, text, want) in cases {
            check(name, Framing::Json, text, *want, None);
        }
    }

    fn sse_streams() {
        let cases: &[(&str, &str, Outcome, Option<&str>)] = &[
            ("vLLM chat stream", VLLM_CHAT_STREAM, counted(12, 2, None), Some("Hel\"")),
            ("llama-server chat stream", LLAMA_CHAT_STREAM, counted(40, 96, Some(32)), Some("Once\"")),
            ("completions, comments, fields, data over two lines", COMPLETIONS_STREAM, counted(3, 1, None), Some(" tok0\"")),
            ("no usage",
             "data: {\"choices\":[{\"delta\":{\"content\":\"Za\"}}]}\n\ndata: [DONE]\n\n",
             Outcome::Absent, Some("Za\"")),
            ("usage first, then content (continuous usage stats: the last wins)",
             concat!(
                 "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":0}}\n\n",
                 "data: {\"choices\":[{\"delta\":{\"content\":\"Qx\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1}}\n\n",
                 "data: {\"choices\":[{\"delta\":{\"content\":\"y\"}}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
                 "data: [DONE]\n\n"),
             counted(5, 2, None), Some("Qx\"")),
            ("tool calls are content",
             "data: {\"choices\":[{\"delta\":{\"tool_calls\":[]}}]}\n\ndata: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0}]}}]}\n\n",
             Outcome::Absent, Some("{\"index\":0}")),
            ("reasoning is content",
             "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"hmm\"}}]}\n\n",
             Outcome::Absent, Some("hmm")),
            ("content outside choices is not",
             "data: {\"delta\":{\"content\":\"x\"},\"choices\":[{\"message\":{\"content\":\"y\"}}]}\n\n",
             Outcome::Absent, None),
            ("no blank line after the last event", "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}", counted(1, 1, None), None),
            ("empty stream", "", Outcome::Absent, None),
            ("keep-alive comments only", ": ping\n\n: ping\n\n", Outcome::Absent, None),
            ("CR line ends", "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":4}}\r\rdata: [DONE]\r\r", counted(1, 4, None), None),
            ("cut mid-event", "data: {\"choices\":[{\"delta\":{\"content\":\"Za\"}}]}\n\ndata: {\"choices\":[{\"del", TRUNCATED, Some("Za\"")),
            ("cut mid-DONE", "data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\ndata: [DO", TRUNCATED, None),
            ("broken JSON event", "data: {\"choices\":[}\n\n", MALFORMED, None),
            ("event ends mid-document", "data: {\"choices\":[]\n\ndata: }\n\n", MALFORMED, None),
            ("not DONE", "data: [DONX]\n\n", MALFORMED, None),
            ("DONE then data", "data: [DONE] x\n\n", MALFORMED, None),
            ("two documents in one event", "data: {} {}\n\n", MALFORMED, None),
            ("a data field without a colon is an empty line", "data\n\ndata: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":2}}\n\n", counted(2, 2, None), None),
            ("a long field name is not data", "datadata: {\n\n", Outcome::Absent, None),
        ];
        for (name, text, want, first) in cases {
            check(name, Framing::Sse, text, *want, *first);
        }
    }

    fn a_response_reset_before_its_end_is_truncated() {
        for framing in [Framing::Json, Framing::Sse] {
            let text = if framing == Framing::Json { CHAT_JSON } else { VLLM_CHAT_STREAM };
            let mut scanner = ResponseScanner::new(framing, DEFAULT_MAX_SCAN_BYTES);
            scanner.feed(text.as_bytes());
            assert_eq!(scanner.finish(false), TRUNCATED, "{framing:?}");
        }
    }

    fn past_max_scan_bytes_it_stops_reading() {
        let mut scanner = ResponseScanner::new(Framing::Sse, 100);
        assert!(!scanner.feed(&VLLM_CHAT_STREAM.as_bytes()[..100]));
        assert!(!scanner.stopped());
        scanner.feed(b"d");
        assert!(scanner.stopped());
        assert_eq!(scanner.finish(true), Outcome::Unreadable(Unreadable::TooLarge));
    }

    fn state_is_bounded_whatever_the_response() {
        // A stream of 50 000 token events (about 8 MB) and a JSON answer with a 16 MiB string,
        // nested 100 deep: the scanner's state is its fixed-size struct, nothing grows.
        let size = core::mem::size_of::<ResponseScanner>();
        assert!(size < 512, "{size} bytes");
        let event = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" token\"},\"finish_reason\":null}]}\n\n";
        let mut scanner = ResponseScanner::new(Framing::Sse, u64::MAX);
        for _ in 0..50_000 {
            scanner.feed(event.as_bytes());
        }
        scanner.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":50000}}\n\ndata: [DONE]\n\n");
        assert_eq!(scanner.finish(true), counted(9, 50_000, None));
        let mut scanner = ResponseScanner::new(Framing::Json, u64::MAX);
        scanner.feed(br#"{"choices":[{"text":""#);
        let block = vec![b'a'; 1 << 20];
        for _ in 0..16 {
            scanner.feed(&block);
        }
        scanner.feed(br#""}],"x":"#);
        for _ in 0..100 {
            scanner.feed(b"[");
        }
        for _ in 0..100 {
            scanner.feed(b"]");
        }
        scanner.feed(br#","usage":{"prompt_tokens":3,"completion_tokens":16777216}}"#);
        assert_eq!(scanner.finish(true), counted(3, 16_777_216, None));
    }

    fn nesting_past_the_limit_is_malformed() {
        let mut scanner = ResponseScanner::new(Framing::Json, u64::MAX);
        for _ in 0..10_000 {
            scanner.feed(b"[");
        }
        assert!(scanner.stopped());
        assert_eq!(scanner.finish(true), MALFORMED);
    }

    fn which_responses_are_read() {
        let sse = ResponsePlan::Scan(Framing::Sse);
        let json = ResponsePlan::Scan(Framing::Json);
        let cases: &[PlanCase] = &[
            (Some("200"), Some("application/json"), None, json),
            (Some("200"), Some("text/event-stream; charset=utf-8"), None, sse),
            (Some("200"), Some("Text/Event-Stream"), None, sse),
            (Some("200"), None, None, json),
            (Some("201"), Some("application/json"), Some("identity"), json),
            (Some("200"), Some("application/json"), Some("gzip"), ResponsePlan::Refuse(Unreadable::Encoded)),
            (Some("200"), Some("text/event-stream"), Some("br"), ResponsePlan::Refuse(Unreadable::Encoded)),
            (Some("204"), None, None, ResponsePlan::Skip),
            (Some("400"), Some("application/json"), None, ResponsePlan::Skip),
            (Some("503"), Some("application/json"), Some("gzip"), ResponsePlan::Skip),
            (Some("2x0"), None, None, ResponsePlan::Skip),
            (None, Some("application/json"), None, ResponsePlan::Skip),
        ];
        for (status, content_type, encoding, want) in cases {
            assert_eq!(plan_response(*status, *content_type, *encoding), *want, "{status:?} {content_type:?} {encoding:?}");
        }
    }

    fn latencies() {
        const MS: u64 = 1_000_000;
        // 96 tokens, the first at 100 ms, the end at 100 + 95 * 4.2 ms.
        assert_eq!(time_per_output_token_ms(100 * MS, 100 * MS + 95 * 4_200_000, 96), Some(4));
        assert_eq!(time_per_output_token_ms(0, 95 * 4_600_000, 96), Some(5));
        assert_eq!(time_per_output_token_ms(0, 10 * MS, 1), None);
        assert_eq!(time_per_output_token_ms(0, 10 * MS, 0), None);
        assert_eq!(time_per_output_token_ms(10 * MS, 0, 5), None);
        assert_eq!(elapsed_ms(5 * MS, 7 * MS + 600_000), 3);
        assert_eq!(elapsed_ms(7 * MS, 5 * MS), 0);
    }

    fn access_log_value_holds_the_known_fields_in_order() {
        // (prompt tokens, completion tokens, ttft ms, the value)
        let cases: &[LogCase] = &[
            (Some(11), Some(7), Some(42), Some("prompt_tokens=11 completion_tokens=7 ttft_ms=42")),
            (Some(0), Some(0), Some(0), Some("prompt_tokens=0 completion_tokens=0 ttft_ms=0")),
            (None, None, Some(3), Some("ttft_ms=3")),
            (Some(5), None, None, Some("prompt_tokens=5")),
            (None, Some(u64::MAX), None, Some("completion_tokens=18446744073709551615")),
            (Some(1), None, Some(2), Some("prompt_tokens=1 ttft_ms=2")),
            (None, None, None, None),
        ];
        for (p, c, t, want) in cases {
            assert_eq!(metrics::access_log_value(*p, *c, *t).as_deref(), *want, "{p:?} {c:?} {t:?}");
        }
        assert_eq!(metrics::ACCESS_LOG_PROPERTY, "bbr_usage");
    }

    fn configuration_defaults_and_refusals_name_the_field() {
        let Ok(router) = Router::from_json(br#"{"models":[{"name":"m"}]}"#) else { unreachable!("valid") };
        let defaults = UsageSettings { enabled: true, max_scan_bytes: DEFAULT_MAX_SCAN_BYTES, add_include_usage: false };
        assert_eq!(router.usage, defaults);
        let Ok(router) = Router::from_json(br#"{"models":[{"name":"m"}],"usage":{"enabled":false,"maxScanBytes":1024}}"#) else {
            unreachable!("valid")
        };
        assert_eq!(router.usage, UsageSettings { enabled: false, max_scan_bytes: 1024, add_include_usage: false });
        let Ok(router) = Router::from_json(br#"{"models":[{"name":"m"}],"usage":{"addIncludeUsage":true}}"#) else {
            unreachable!("valid")
        };
        assert_eq!(router.usage, UsageSettings { add_include_usage: true, ..defaults });
        let cases: &[(&str, &str)] = &[
            (r#""usage":{"maxScanBytes":0}"#, "usage.maxScanBytes"),
            (r#""usage":{"maxScanBytes":1073741825}"#, "usage.maxScanBytes"),
            (r#""usage":{"enabled":"yes"}"#, "expected a boolean"),
            (r#""usage":{"maxBytes":1}"#, "maxBytes"),
            (r#""usage":{"enabled":false,"addIncludeUsage":true}"#, "usage.addIncludeUsage"),
            (r#""usage":{"addIncludeUsage":1}"#, "expected a boolean"),
        ];
        for (fields, field) in cases {
            let config = format!(r#"{{"models":[{{"name":"m"}}],{fields}}}"#);
            match Router::from_json(config.as_bytes()) {
                Ok(_) => unreachable!("{fields} must be refused"),
                Err(e) => assert!(e.to_string().contains(field), "{fields}: {e}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Asking for a stream's usage (`usage.addIncludeUsage`): the scanner's stream fields and the
// body edit (`core::usage::include`).

/// (name, body, `stream` is true, `stream_options` present, the body after the edit if any).
type IncludeCase = (&'static str, &'static str, bool, bool, Option<&'static str>);

const INCLUDE_CASES: &[IncludeCase] = &[
    (
        "stream true",
        r#"{"model":"m","stream":true}"#,
        true,
        false,
        Some(r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#),
    ),
    (
        "leading whitespace",
        " \r\n\t{\"stream\" : true ,\"model\":\"m\"}",
        true,
        false,
        Some(r#"{"stream_options":{"include_usage":true},"stream" : true ,"model":"m"}"#),
    ),
    (
        "space before the value",
        r#"{"model":"m","stream":   true }"#,
        true,
        false,
        Some(r#"{"stream_options":{"include_usage":true},"model":"m","stream":   true }"#),
    ),
    (
        "stream false",
        r#"{"model":"m","stream":false}"#,
        false,
        false,
        None,
    ),
    (
        "no stream",
        r#"{"model":"m","prompt":"stream"}"#,
        false,
        false,
        None,
    ),
    (
        "stream as a string",
        r#"{"model":"m","stream":"true"}"#,
        false,
        false,
        None,
    ),
    (
        "stream null",
        r#"{"model":"m","stream":null}"#,
        false,
        false,
        None,
    ),
    (
        "stream as a number",
        r#"{"model":"m","stream":1}"#,
        false,
        false,
        None,
    ),
    (
        "include_usage false",
        r#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#,
        true,
        true,
        None,
    ),
    (
        "stream_options null",
        r#"{"model":"m","stream_options":null,"stream":true}"#,
        true,
        true,
        None,
    ),
    (
        "stream_options empty",
        r#"{"stream_options":{},"model":"m","stream":true}"#,
        true,
        true,
        None,
    ),
    (
        "stream below the top level",
        r#"{"model":"m","messages":[{"stream":true}],"x":{"stream":true}}"#,
        false,
        false,
        None,
    ),
    (
        "stream_options below the top level",
        r#"{"model":"m","stream":true,"x":{"stream_options":{"include_usage":false}}}"#,
        true,
        false,
        Some(
            r#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"x":{"stream_options":{"include_usage":false}}}"#,
        ),
    ),
    (
        "the last stream counts (false)",
        r#"{"model":"m","stream":true,"stream":false}"#,
        false,
        false,
        None,
    ),
    (
        "the last stream counts (true)",
        r#"{"stream":false,"stream":true,"model":"m"}"#,
        true,
        false,
        Some(
            r#"{"stream_options":{"include_usage":true},"stream":false,"stream":true,"model":"m"}"#,
        ),
    ),
    (
        "escaped key",
        r#"{"model":"m","str\u0065am":true}"#,
        true,
        false,
        Some(r#"{"stream_options":{"include_usage":true},"model":"m","str\u0065am":true}"#),
    ),
    (
        "escaped stream_options",
        r#"{"model":"m","stream\u005foptions":{},"stream":true}"#,
        true,
        true,
        None,
    ),
    (
        "near keys",
        r#"{"model":"m","streams":true,"strea":true,"stream_option":1,"stream_options_x":{}}"#,
        false,
        false,
        None,
    ),
    (
        "near keys and stream",
        r#"{"stream_option":1,"model":"m","streamy":false,"stream":true}"#,
        true,
        false,
        Some(
            r#"{"stream_options":{"include_usage":true},"stream_option":1,"model":"m","streamy":false,"stream":true}"#,
        ),
    ),
    (
        "a key that starts like model",
        r#"{"mode":"x","model":"m","stream":true}"#,
        true,
        false,
        Some(r#"{"stream_options":{"include_usage":true},"mode":"x","model":"m","stream":true}"#),
    ),
];

/// Scans `parts` in order to the end; the model (or why not) and the stream fields.
fn scan_stream_fields(parts: &[&[u8]]) -> (Step, StreamFields) {
    let mut scanner = ModelScanner::new(256);
    for part in parts {
        let step = scanner.feed(part);
        if step != Step::NeedMore {
            return (step, scanner.stream_fields());
        }
    }
    let step = scanner.finish();
    (step, scanner.stream_fields())
}

fn check_include_case(case: &IncludeCase, parts: &[&[u8]], how: &str) {
    let (name, body, stream, options, edited) = *case;
    let (step, fields) = scan_stream_fields(parts);
    assert_eq!(step, Step::Found("m".into()), "{name} ({how})");
    assert_eq!(
        (fields.stream, fields.stream_options),
        (stream, options),
        "{name} ({how})"
    );
    let edit = include::include_usage_edit(fields, body.len() as u64);
    let got = edit.map(|e| include::apply(body.as_bytes(), e));
    assert_eq!(got.as_deref(), edited.map(str::as_bytes), "{name} ({how})");
    if let Some(e) = edit {
        assert_eq!(
            e.new_length,
            edited.map_or(0, |b| b.len() as u64),
            "{name} ({how})"
        );
    }
}

both! {
    fn include_usage_cases_whole_split_and_bytewise() {
        for case in INCLUDE_CASES {
            let bytes = case.1.as_bytes();
            check_include_case(case, &[bytes], "whole");
            for at in 0..=bytes.len() {
                let (a, b) = bytes.split_at(at);
                check_include_case(case, &[a, b], &format!("split at {at}"));
            }
            let parts: Vec<&[u8]> = bytes.chunks(1).collect();
            check_include_case(case, &parts, "byte by byte");
        }
    }

    fn an_edited_body_is_asked_once_and_keeps_its_model() {
        for (name, _, _, _, edited) in INCLUDE_CASES {
            let Some(edited) = edited else { continue };
            let (step, fields) = scan_stream_fields(&[edited.as_bytes()]);
            assert_eq!(step, Step::Found("m".into()), "{name}");
            assert!(fields.stream && fields.stream_options, "{name}");
            assert_eq!(include::include_usage_edit(fields, edited.len() as u64), None, "{name}");
        }
    }

    fn include_usage_only_for_the_completions_apis() {
        let cases = [
            ("/v1/chat/completions", true),
            ("/v1/completions", true),
            ("/v1/completions?api-version=1", true),
            ("/v1/chat/completions#x", true),
            ("/openai/v1/chat/completions", true),
            ("/v1/embeddings", false),
            ("/v1/completions/x", false),
            ("/v1/responses", false),
            ("/v1/audio/transcriptions", false),
            ("", false),
        ];
        for (path, want) in cases {
            assert_eq!(is_completions_path(path), want, "{path}");
        }
        // An object start past the body (no such scan) gives no edit rather than a wrong one.
        let fields = StreamFields { stream: true, stream_options: false, object_start: 10 };
        assert_eq!(include::include_usage_edit(fields, 5), None);
        assert_eq!(include::include_usage_edit(StreamFields { object_start: u64::MAX, ..fields }, 5), None);
    }
}

/// Native only: serde_json reads the edited body as the original with `stream_options` added.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn an_edited_body_is_the_original_plus_include_usage() {
    for (name, body, _, _, edited) in INCLUDE_CASES {
        let Some(edited) = edited else { continue };
        let before: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let after: serde_json::Value = serde_json::from_str(edited).unwrap_or_default();
        let mut want = before.clone();
        if let Some(obj) = want.as_object_mut() {
            obj.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
        }
        assert!(before.is_object(), "{name}");
        assert_eq!(after, want, "{name}");
    }
}
