//! The prefix key (`core::affinity::prefix`): what is captured from a body, whole, byte by byte and split
//! at every boundary, and how the key is chained. Runs natively and under wasm-bindgen-test,
//! like tests/core.rs.

use bbr_wasm::core::affinity::prefix::{block_hashes, key_header_value, prefix_key};
use bbr_wasm::core::json::vector::find_quote_or_backslash;
use bbr_wasm::core::{CaptureState, PromptCapture, Router};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test;

#[macro_use]
mod common; // the `both!` test macro

/// (name, body, what is captured with a large budget; None: the capture gives up)
const CAPTURES: &[(&str, &str, Option<&str>)] = &[
    (
        "completion prompt",
        r#"{"model":"m","prompt":"Hello there","max_tokens":4}"#,
        Some("Hello there"),
    ),
    (
        "escapes decoded",
        r#"{"prompt":"a\nb\t\"q\" \\ \/ \u00e9 \ud83d\ude00 end","model":"m"}"#,
        Some("a\nb\t\"q\" \\ / é 😀 end"),
    ),
    (
        "prompt array: the first string",
        r#"{"model":"m","prompt":["first","second"]}"#,
        Some("first"),
    ),
    (
        "prompt of token ids: nothing",
        r#"{"model":"m","prompt":[1,2,3]}"#,
        Some(""),
    ),
    (
        "chat: role, newline, content, newline",
        r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]}"#,
        Some("system\nBe brief.\nuser\nHi\n"),
    ),
    (
        "chat: content before role",
        r#"{"messages":[{"content":"Hi","role":"user"},{"content":"Yo","name":"x","role":"assistant"}],"model":"m"}"#,
        Some("user\nHi\nassistant\nYo\n"),
    ),
    (
        "chat: text parts kept, images skipped, type after text",
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"A"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA\"x"}},{"text":"B","type":"text"},{"text":"not text","type":"input_audio"}]}]}"#,
        Some("user\nAB\n"),
    ),
    (
        "chat: parts before the role",
        r#"{"model":"m","messages":[{"content":[{"type":"text","text":"A"},{"text":"B","type":"text"}],"role":"user"}]}"#,
        Some("user\nAB\n"),
    ),
    (
        "tools before messages are skipped",
        r#"{"tools":[{"type":"function","function":{"name":"get","description":"the \"role\": x","parameters":{"type":"object","properties":{"messages":{"type":"array"}}}}}],"model":"m","messages":[{"role":"user","content":"Q"}]}"#,
        Some("user\nQ\n"),
    ),
    (
        "tool calls and tool results",
        r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"city\":\"Paris\"}"}}]},{"role":"tool","tool_call_id":"c1","content":"{\"temp\":21}"}]}"#,
        Some("assistant\n\ntool\n{\"temp\":21}\n"),
    ),
    (
        "escaped key",
        r#"{"model":"m","mess\u0061ges":[{"r\u006fle":"user","content":"Q"}]}"#,
        Some("user\nQ\n"),
    ),
    (
        "nested objects and numbers in a message",
        r#"{"model":"m","temperature":0.5,"messages":[{"role":"user","content":"Q","meta":{"a":[1,{"b":true}],"content":"no"}}],"n":1}"#,
        Some("user\nQ\n"),
    ),
    (
        "whitespace everywhere",
        "{ \"messages\" : [ { \"role\" : \"user\" , \"content\" : \"Q\" } ] , \"model\" : \"m\" }",
        Some("user\nQ\n"),
    ),
    ("top level is an array", r#"[{"prompt":"x"}]"#, None),
    ("no prompt at all", r#"{"model":"m","input":"x"}"#, Some("")),
];

/// Feeds `parts` in order and finishes; the state before finish and the captured text.
fn capture_parts(parts: &[&[u8]], budget: usize) -> (CaptureState, Option<Vec<u8>>) {
    let mut c = PromptCapture::new(budget);
    for part in parts {
        c.feed(part);
    }
    let before = c.state();
    c.finish();
    (before, c.prompt().map(<[u8]>::to_vec))
}

fn check_capture(name: &str, body: &[u8], budget: usize, want: Option<&[u8]>) {
    let (_, whole) = capture_parts(&[body], budget);
    assert_eq!(whole.as_deref(), want, "{name}: whole");
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    let (_, one_by_one) = capture_parts(&bytes, budget);
    assert_eq!(one_by_one.as_deref(), want, "{name}: byte by byte");
    for cut in 0..=body.len() {
        let (_, split) = capture_parts(&[&body[..cut], &body[cut..]], budget);
        assert_eq!(split.as_deref(), want, "{name}: split at {cut}");
    }
}

both! {
    fn captures_the_prompt_as_the_server_sees_it() {
        for (name, body, want) in CAPTURES {
            check_capture(name, body.as_bytes(), 4096, want.map(str::as_bytes));
        }
    }

    fn the_budget_bounds_the_capture_and_settles_it_early() {
        // 8 bytes of budget: the prompt is cut, and the capture is Done before the body ends.
        let body = br#"{"messages":[{"role":"user","content":"0123456789abcdef"}],"model":"m","tail":"#;
        let mut c = PromptCapture::new(8);
        assert_eq!(c.feed(body), CaptureState::Done);
        assert_eq!(c.prompt(), Some(&b"user\n012"[..]));
        for (name, body, want) in CAPTURES {
            let Some(want) = want else { continue };
            let want = &want.as_bytes()[..want.len().min(5)];
            check_capture(name, body.as_bytes(), 5, Some(want));
        }
    }

    fn settles_at_the_end_of_the_prompt_not_the_body() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"Q"}],"#;
        let mut c = PromptCapture::new(4096);
        assert_eq!(c.feed(body), CaptureState::Done);
        let body = br#"{"model":"m","prompt":"Q","#;
        let mut c = PromptCapture::new(4096);
        assert_eq!(c.feed(body), CaptureState::Done);
        // A body cut inside the prompt: still reading.
        let mut c = PromptCapture::new(4096);
        assert_eq!(c.feed(br#"{"prompt":"Q"#), CaptureState::Reading);
    }

    fn content_held_before_its_role_is_bounded() {
        // 1 MiB of content before the role: at most the budget is held.
        let mut body = br#"{"messages":[{"content":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', 1 << 20));
        body.extend_from_slice(br#"","role":"user"}]}"#);
        let (_, got) = capture_parts(&[&body], 64);
        let mut want = b"user\n".to_vec();
        want.extend(std::iter::repeat_n(b'x', 59));
        assert_eq!(got, Some(want));
    }

    fn key_chains_blocks_seeded_with_the_model() {
        let block = 16;
        let a: Vec<u8> = (0..64u8).collect();
        // Shorter than one block: no key.
        assert_eq!(prefix_key("m", &a[..15], block, 4), None);
        // The key after one block is xxh64(xxh64("m") ++ block).
        let h0 = xxhash_rust_reference::xxh64(b"m");
        let mut first = h0.to_le_bytes().to_vec();
        first.extend_from_slice(&a[..16]);
        let h1 = xxhash_rust_reference::xxh64(&first);
        assert_eq!(prefix_key("m", &a[..16], block, 4), Some(h1));
        // An incomplete last block does not count.
        assert_eq!(prefix_key("m", &a[..31], block, 4), Some(h1));
        let mut second = h1.to_le_bytes().to_vec();
        second.extend_from_slice(&a[16..32]);
        let h2 = xxhash_rust_reference::xxh64(&second);
        assert_eq!(prefix_key("m", &a[..32], block, 4), Some(h2));
        // Only the first prefixBlocks blocks: what follows does not change the key.
        let mut b = a.clone();
        b[40] ^= 1;
        assert_eq!(prefix_key("m", &a, block, 2), Some(h2));
        assert_eq!(prefix_key("m", &b, block, 2), Some(h2));
        assert_ne!(prefix_key("m", &a, block, 3), prefix_key("m", &b, block, 3));
        // Another model, another key.
        assert_ne!(prefix_key("m2", &a, block, 2), Some(h2));
        // The picker's chain is the same chain, one hash per complete block, bounded.
        assert_eq!(block_hashes("m", &a[..40], block, 8), vec![h1, h2]);
        assert_eq!(block_hashes("m", &a, block, 3).len(), 3);
        assert_eq!(block_hashes("m", &a[..15], block, 8), Vec::<u64>::new());
        assert_eq!(block_hashes("m", &a, 0, 8), Vec::<u64>::new());
        for n in 1..=4 {
            assert_eq!(block_hashes("m", &a, block, n).last().copied(), prefix_key("m", &a, block, n));
        }
        assert_eq!(key_header_value(0xab), "00000000000000ab");
        assert_eq!(key_header_value(h2).len(), 16);
    }

    fn router_sets_a_key_only_when_enabled_and_settled() {
        let on = r#"{"models":[{"name":"m"}],"prefixAffinity":{"enabled":true,"blockBytes":16,"prefixBlocks":2}}"#;
        let Ok(router) = Router::from_json(on.as_bytes()) else { unreachable!("valid") };
        let scanner = json_scanner(&router);
        let Some(mut c) = router.prompt_capture(&scanner) else { unreachable!("enabled") };
        c.feed(br#"{"model":"m","prompt":"0123456789abcdef0123456789abcdefXYZ"}"#);
        let want = prefix_key("m", b"0123456789abcdef0123456789abcdef", 16, 2).map(key_header_value);
        assert_eq!(router.prefix_key(&c, "m"), want);
        assert!(want.is_some());
        // Settled as soon as the budget (2 blocks of 16) is full, before the prompt ends.
        let Some(mut c) = router.prompt_capture(&scanner) else { unreachable!("enabled") };
        c.feed(br#"{"model":"m","prompt":"0123456789abcdef0123456789abcdef"#);
        assert_eq!(router.prefix_key(&c, "m"), want);
        // Not settled (cut inside a prompt shorter than the budget): no key.
        let Some(mut c) = router.prompt_capture(&scanner) else { unreachable!("enabled") };
        c.feed(br#"{"model":"m","prompt":"0123456789abcdef0123"#);
        assert_eq!(router.prefix_key(&c, "m"), None);
        // Disabled (the default): no capture at all, but the header is still known (stripped).
        let Ok(off) = Router::from_json(br#"{"models":[{"name":"m"}]}"#) else { unreachable!("valid") };
        assert!(off.prompt_capture(&json_scanner(&off)).is_none());
        assert_eq!(off.prefix_header, "x-gateway-prefix-hash");
        assert!(off.prefix_affinity.is_none());
    }

    fn prefix_config_refusals_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"blockBytes":8}"#, "prefixAffinity.blockBytes"),
            (r#"{"blockBytes":65537}"#, "prefixAffinity.blockBytes"),
            (r#"{"prefixBlocks":0}"#, "prefixAffinity.prefixBlocks"),
            (r#"{"blockBytes":4096,"prefixBlocks":17}"#, "prefixAffinity.prefixBlocks"),
            (r#"{"header":"bad header"}"#, "prefixAffinity.header"),
            (r#"{"header":"X-Gateway-Model-Name"}"#, "prefixAffinity.header"),
            (r#"{"enabled":true,"blocks":4}"#, "blocks"),
        ];
        for (affinity, field) in cases {
            let config = format!(r#"{{"models":[{{"name":"m"}}],"prefixAffinity":{affinity}}}"#);
            match Router::from_json(config.as_bytes()) {
                Ok(_) => unreachable!("{affinity} must be refused"),
                Err(e) => assert!(e.to_string().contains(field), "{affinity}: {e}"),
            }
        }
    }
}

fn json_scanner(router: &Router) -> bbr_wasm::core::BodyScanner {
    let head = bbr_wasm::core::RequestHead {
        method: "POST",
        path: "/v1/completions",
        content_type: Some("application/json"),
        ..Default::default()
    };
    match router.classify(&head) {
        bbr_wasm::core::HeadAction::Inspect(scanner) => *scanner,
        other => unreachable!("a JSON POST is inspected: {other:?}"),
    }
}

/// XXH64 (seed 0) written out from the specification, independent of the crate the filter
/// uses: the key's chaining is checked against it.
mod xxhash_rust_reference {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P3: u64 = 0x1656_67B1_9E37_79F9;
    const P4: u64 = 0x85EB_CA77_C2B2_AE63;
    const P5: u64 = 0x27D4_EB2F_1656_67C5;

    fn round(acc: u64, lane: u64) -> u64 {
        acc.wrapping_add(lane.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    }

    fn merge(acc: u64, v: u64) -> u64 {
        (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
    }

    fn u64_at(b: &[u8], i: usize) -> u64 {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(x)
    }

    fn u32_at(b: &[u8], i: usize) -> u64 {
        let mut x = [0u8; 4];
        x.copy_from_slice(&b[i..i + 4]);
        u64::from(u32::from_le_bytes(x))
    }

    pub fn xxh64(input: &[u8]) -> u64 {
        let len = input.len();
        let mut i = 0;
        let mut h = if len >= 32 {
            let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
            while i + 32 <= len {
                for (k, acc) in v.iter_mut().enumerate() {
                    *acc = round(*acc, u64_at(input, i + 8 * k));
                }
                i += 32;
            }
            let mut h = v[0]
                .rotate_left(1)
                .wrapping_add(v[1].rotate_left(7))
                .wrapping_add(v[2].rotate_left(12))
                .wrapping_add(v[3].rotate_left(18));
            for acc in v {
                h = merge(h, acc);
            }
            h
        } else {
            P5
        };
        h = h.wrapping_add(len as u64);
        while i + 8 <= len {
            h ^= round(0, u64_at(input, i));
            h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            i += 8;
        }
        if i + 4 <= len {
            h ^= u32_at(input, i).wrapping_mul(P1);
            h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            i += 4;
        }
        while i < len {
            h ^= u64::from(input[i]).wrapping_mul(P5);
            h = h.rotate_left(11).wrapping_mul(P1);
            i += 1;
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

both! {
    fn quote_or_backslash_search_finds_the_first_at_every_position() {
        // Each stop byte at every position of 0..40 bytes, after bytes that look like stops to
        // the scanner's own search (control, non-ASCII) but are not stops here.
        for len in 0..40 {
            let base: Vec<u8> = (0..len).map(|i| [b'a', 0x01, 0xC3, b'z'][i % 4]).collect();
            assert_eq!(find_quote_or_backslash(&base), len, "none in {len}");
            for at in 0..len {
                for stop in [b'"', b'\\'] {
                    let mut v = base.clone();
                    v[at] = stop;
                    if at + 1 < len {
                        v[len - 1] = b'"';
                    }
                    assert_eq!(find_quote_or_backslash(&v), at, "{stop} at {at} of {len}");
                }
            }
        }
    }

    fn reference_xxh64_matches_published_vectors() {
        // XXH64 of the empty input and of "a", seed 0, from the xxHash test vectors; and a
        // 100-byte input, which takes the 32-byte-stripe path, against the crate.
        assert_eq!(xxhash_rust_reference::xxh64(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxhash_rust_reference::xxh64(b"a"), 0xD24E_C4F1_A98C_6E5B);
        let long: Vec<u8> = (0..100u8).collect();
        assert_eq!(
            Some(xxhash_rust_reference::xxh64(&[&xxhash_rust_reference::xxh64(b"m").to_le_bytes()[..], &long[..64]].concat())),
            prefix_key("m", &long, 64, 1)
        );
    }
}
