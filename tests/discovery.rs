//! Table-driven tests of model discovery's plain data (src/core/routing/discovery.rs): reading a
//! pool's `/v1/models`, the per-pool map with its absent-polls threshold, the merged routing
//! view. Natively and, unchanged, as wasm under Node (`make test-wasm`), like tests/core.rs.

use bbr_wasm::core::routing::discovery::{
    fingerprint, next_poll_delay_ms, next_random, parse_models, Health, Listed, PollFailure,
    PollOutcome, MAX_MODELS_BODY_BYTES,
};
use bbr_wasm::core::{PoolState, Router, RoutingView, Step, ViewVerdict};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test;

#[macro_use]
mod common; // the `both!` test macro

fn router(json: &str) -> Router {
    match Router::from_json(json.as_bytes()) {
        Ok(r) => r,
        Err(e) => unreachable!("{json}: {e}"),
    }
}

fn base(name: &str) -> Listed {
    Listed {
        name: name.into(),
        parent: None,
    }
}

fn adapter(name: &str, parent: &str) -> Listed {
    Listed {
        name: name.into(),
        parent: Some(parent.into()),
    }
}

fn names(state: &PoolState) -> Vec<String> {
    state.models().map(|(n, _)| n.to_string()).collect()
}

/// (name, route) of every entry, route = "base@pool" or "base@static".
fn routes(view: &RoutingView) -> Vec<(String, String)> {
    view.routes()
        .iter()
        .map(|r| {
            let at = r.pool.clone().unwrap_or_else(|| "static".into());
            (r.model.name.clone(), format!("{}@{at}", r.model.base))
        })
        .collect()
}

both! {
    fn parses_vllm_model_lists() {
        let vllm = br#"{"object":"list","data":[
            {"id":"Qwen/Qwen2.5-3B-Instruct","object":"model","created":1,"owned_by":"vllm",
             "root":"/models/qwen","parent":null,"max_model_len":4096,"permission":[{}]},
            {"id":"sql-lora","object":"model","root":"/adapters/sql","parent":"Qwen/Qwen2.5-3B-Instruct"}]}"#;
        assert_eq!(
            parse_models(vllm, 256),
            Ok(vec![base("Qwen/Qwen2.5-3B-Instruct"), adapter("sql-lora", "Qwen/Qwen2.5-3B-Instruct")])
        );
        // No parent field, a parent naming itself, a duplicate id (first wins), an empty list.
        assert_eq!(
            parse_models(br#"{"data":[{"id":"a"},{"id":"b","parent":"b"},{"id":"a","parent":"x"}]}"#, 256),
            Ok(vec![base("a"), base("b")])
        );
        assert_eq!(parse_models(br#"{"object":"list","data":[]}"#, 256), Ok(vec![]));
    }

    fn refuses_what_is_not_a_model_list() {
        // (body, the outcome label it is counted under)
        let cases: &[(&[u8], &str)] = &[
            (b"", "malformed"),
            (b"<html>502</html>", "malformed"),
            (b"[]", "malformed"),
            (b"{}", "malformed"),
            (br#"{"data":{}}"#, "malformed"),
            (br#"{"data":[{"name":"a"}]}"#, "malformed"),
            (br#"{"data":[{"id":5}]}"#, "malformed"),
            (br#"{"data":[{"id":"a","parent":5}]}"#, "malformed"),
            (br#"{"data":[{"id":""}]}"#, "malformed"),
            (br#"{"data":[{"id":"a\nb"}]}"#, "malformed"),
            (br#"{"data":[{"id":" a"}]}"#, "malformed"),
            (br#"{"data":[{"id":"a","parent":""}]}"#, "malformed"),
            (br#"{"data":[{"id":"aaaaaaaaa"}]}"#, "malformed"),
            (br#"{"data":[{"id":"a"}]} trailing"#, "malformed"),
        ];
        for (body, outcome) in cases {
            match parse_models(body, 8) {
                Ok(got) => unreachable!("accepted {:?}: {got:?}", String::from_utf8_lossy(body)),
                Err(e) => assert_eq!(e.outcome().label(), *outcome, "{:?}: {e}", String::from_utf8_lossy(body)),
            }
        }
        let mut huge = br#"{"data":["#.to_vec();
        huge.resize(MAX_MODELS_BODY_BYTES + 1, b' ');
        assert_eq!(parse_models(&huge, 256), Err(PollFailure::TooLarge { size: MAX_MODELS_BODY_BYTES + 1 }));
        assert_eq!(PollFailure::Status(504).outcome(), PollOutcome::HttpError);
        assert_eq!(PollFailure::Unreachable("x".into()).outcome(), PollOutcome::Unreachable);
    }

    fn absent_polls_threshold() {
        // (what the poll lists, names known after it), threshold 3
        let polls: &[(&[&str], &[&str])] = &[
            (&["a", "b", "c"], &["a", "b", "c"]),
            (&["a", "b"], &["a", "b", "c"]),      // c absent once
            (&["a", "c"], &["a", "b", "c"]),      // c back: its count restarts; b absent once
            (&["a"], &["a", "b", "c"]),           // b twice, c once
            (&["a"], &["a", "c"]),                // b third time: gone
            (&["a"], &["a"]),                     // c third time: gone
            (&[], &["a"]),
            (&[], &["a"]),
            (&[], &[]),
        ];
        let mut state = PoolState::new();
        for (i, (listed, want)) in polls.iter().enumerate() {
            let listed: Vec<Listed> = listed.iter().map(|n| base(n)).collect();
            state.apply_models(&listed, 3);
            assert_eq!(names(&state), *want, "after poll {i}");
        }
        // Threshold 1: gone at the first poll without it.
        let mut state = PoolState::new();
        state.apply_models(&[base("a"), base("b")], 1);
        let applied = state.apply_models(&[base("a")], 1);
        assert_eq!(applied.removed, ["b"]);
        assert_eq!(names(&state), ["a"]);
    }

    fn failures_keep_the_last_good_list_and_change_health_once() {
        let mut state = PoolState::new();
        assert_eq!(state.health(), Health::Pending);
        assert!(!state.answered());
        // Failing before any answer: still not answered (models unknown -> 503).
        assert_eq!(state.apply_failure(&PollFailure::Status(503)), Some(Health::Pending));
        assert!(!state.answered());
        let applied = state.apply_models(&[base("m"), adapter("lora", "m")], 2);
        assert_eq!(applied.added, ["lora", "m"]);
        assert_eq!(applied.health_was, Some(Health::Failing(PollOutcome::HttpError)));
        assert!(state.answered());
        // A second identical answer changes nothing.
        let applied = state.apply_models(&[base("m"), adapter("lora", "m")], 2);
        assert!(!applied.routes_changed());
        assert_eq!(applied.health_was, None);
        // (failure, health change reported)
        let failures = [
            (PollFailure::Malformed("x".into()), Some(Health::Ok)),
            (PollFailure::Malformed("y".into()), None),
            (PollFailure::Malformed("z".into()), None),
            (PollFailure::TooLarge { size: 9 }, Some(Health::Failing(PollOutcome::Malformed))),
            (PollFailure::Status(504), Some(Health::Failing(PollOutcome::TooLarge))),
            (PollFailure::Status(503), None),
        ];
        for (failure, want) in failures {
            assert_eq!(state.apply_failure(&failure), want, "{failure}");
            assert_eq!(names(&state), ["lora", "m"], "{failure}");
        }
        // Failures are not absences: the threshold counts successful polls only.
        let applied = state.apply_models(&[base("m")], 2);
        assert_eq!(applied.health_was, Some(Health::Failing(PollOutcome::HttpError)));
        assert_eq!(names(&state), ["lora", "m"]);
        // A new parent for a known name.
        let applied = state.apply_models(&[base("m"), adapter("lora", "n")], 2);
        assert_eq!(applied.reparented, ["lora"]);
    }

    fn merged_view_precedence_and_order() {
        let r = router(r#"{"models":[{"name":"static-base","adapters":["static-lora"]}],
            "pools":[{"cluster":"pool-a"},{"cluster":"pool-b","intervalMs":30000}]}"#);
        let mut a = PoolState::new();
        let mut b = PoolState::new();
        // Before any answer: only the static models; unknown models wait (503, Retry-After of
        // the slowest pending pool, in seconds).
        let view = RoutingView::merge(&r, &[(&r.pools[0], &a), (&r.pools[1], &b)]);
        assert_eq!(view.pending_retry_after, Some(30));
        a.apply_models(&[adapter("z-lora", "a-base"), base("a-base"), base("static-base"), adapter("shared", "a-base")], 3);
        let view = RoutingView::merge(&r, &[(&r.pools[0], &a), (&r.pools[1], &b)]);
        assert_eq!(view.pending_retry_after, Some(30));
        b.apply_models(&[base("b-base"), adapter("shared", "b-base")], 3);
        let view = RoutingView::merge(&r, &[(&r.pools[0], &a), (&r.pools[1], &b)]);
        assert_eq!(view.pending_retry_after, None);
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            routes(&view),
            [
                s("static-base", "static-base@static"),
                s("static-lora", "static-base@static"),
                s("a-base", "a-base@pool-a"),
                s("shared", "a-base@pool-a"),
                s("z-lora", "a-base@pool-a"),
                s("b-base", "b-base@pool-b"),
            ]
        );
        let conflicts: Vec<_> = view.conflicts.iter().map(|c| (c.name.as_str(), c.kept.as_str(), c.dropped.as_str())).collect();
        assert_eq!(conflicts, [("shared", "pool-a", "pool-b"), ("static-base", "static", "pool-a")]);
        // The model list: ids in that order, adapters with their parent.
        let v: serde_json::Value = serde_json::from_str(&view.model_list_body(7)).unwrap_or_default();
        let listed: Vec<(String, serde_json::Value)> = v["data"]
            .as_array()
            .map(|d| d.iter().map(|m| (m["id"].as_str().unwrap_or("").to_string(), m["parent"].clone())).collect())
            .unwrap_or_default();
        assert_eq!(listed[4], ("z-lora".to_string(), serde_json::json!("a-base")));
        assert_eq!(listed[5], ("b-base".to_string(), serde_json::Value::Null));
        // The same states merged in any poll order give the same view.
        let again = RoutingView::merge(&r, &[(&r.pools[0], &a), (&r.pools[1], &b)]);
        assert_eq!(again, view);
    }

    fn decisions_against_the_view() {
        let r = router(r#"{"pools":[{"cluster":"p","intervalMs":2500}]}"#);
        let mut p = PoolState::new();
        let decide = |view: &RoutingView, model: &str| match view.decide(Step::Found(model.into())) {
            Some(ViewVerdict::Route(route)) => format!("{}@{}", route.model.base, route.pool.clone().unwrap_or_default()),
            Some(ViewVerdict::Pass) => "pass".into(),
            Some(ViewVerdict::Reject(rej)) => format!("{} {} {:?}", rej.status(), rej.code(), rej.retry_after()),
            None => "undecided".into(),
        };
        let view = RoutingView::merge(&r, &[(&r.pools[0], &p)]);
        assert_eq!(decide(&view, "m"), "503 model_discovery_pending Some(3)");
        p.apply_failure(&PollFailure::Status(503));
        let view = RoutingView::merge(&r, &[(&r.pools[0], &p)]);
        assert_eq!(decide(&view, "m"), "503 model_discovery_pending Some(3)");
        p.apply_models(&[base("m"), adapter("l", "m")], 3);
        let view = RoutingView::merge(&r, &[(&r.pools[0], &p)]);
        assert_eq!(decide(&view, "m"), "m@p");
        assert_eq!(decide(&view, "l"), "m@p");
        assert_eq!(decide(&view, "x"), "404 model_not_found None");
        assert!(view.decide(Step::NeedMore).is_none());
        // Passthrough: unknown models pass, even while pending.
        let r = router(r#"{"pools":[{"cluster":"p"}],"unknownModel":"passthrough"}"#);
        let view = RoutingView::merge(&r, &[(&r.pools[0], &PoolState::new())]);
        assert_eq!(decide(&view, "x"), "pass");
    }

    fn pool_config_defaults_and_refusals() {
        let r = router(r#"{"pools":[{"cluster":"qwen-vllm"}]}"#);
        let p = &r.pools[0];
        assert_eq!((p.path.as_str(), p.interval_ms, p.timeout_ms, p.authority.as_str()), ("/v1/models", 10_000, 2_000, "qwen-vllm"));
        assert_eq!(r.absent_polls_before_removal, 3);
        assert_eq!(r.pool_header, "x-gateway-destination-pool");
        assert!(r.served.is_empty());
        let r = router(r#"{"pools":[{"cluster":"c","path":"/models","intervalMs":100,"timeoutMs":60000,
            "authority":"vllm.example:8000"}],"absentPollsBeforeRemoval":1,"poolHeader":"X-Pool"}"#);
        assert_eq!(r.pools[0].authority, "vllm.example:8000");
        assert_eq!(r.pool_header, "x-pool");
        let cases: &[(&str, &str)] = &[
            (r#"{"pools":[]}"#, "models: must list at least one model"),
            (r#"{"pools":[{}]}"#, "missing field `cluster`"),
            (r#"{"pools":[{"cluster":"c","interval":5}]}"#, "unknown field `interval`"),
            (r#"{"pools":[{"cluster":""}]}"#, "pools[0].cluster: must not be empty"),
            (r#"{"pools":[{"cluster":"a b"}]}"#, "pools[0].cluster: must be printable ASCII"),
            (r#"{"pools":[{"cluster":"c"},{"cluster":"c"}]}"#, "pools[1].cluster: duplicate cluster \"c\", already at pools[0].cluster"),
            (r#"{"pools":[{"cluster":"c","path":"v1/models"}]}"#, "pools[0].path: must start with '/'"),
            (r#"{"pools":[{"cluster":"c","intervalMs":99}]}"#, "pools[0].intervalMs: must be between 100 and 3600000"),
            (r#"{"pools":[{"cluster":"c","intervalMs":3600001}]}"#, "pools[0].intervalMs: must be between"),
            (r#"{"pools":[{"cluster":"c","timeoutMs":0}]}"#, "pools[0].timeoutMs: must be between 1 and 60000"),
            (r#"{"pools":[{"cluster":"c","authority":""}]}"#, "pools[0].authority: must not be empty"),
            (r#"{"pools":[{"cluster":"c"}],"absentPollsBeforeRemoval":0}"#, "absentPollsBeforeRemoval: must be between 1 and 1000"),
            (r#"{"pools":[{"cluster":"c"}],"poolHeader":"bad header"}"#, "poolHeader: must be a valid HTTP header name"),
            (r#"{"pools":[{"cluster":"c"}],"poolHeader":"X-Gateway-Model-Name"}"#, "poolHeader: must differ"),
        ];
        for (json, want) in cases {
            match Router::from_json(json.as_bytes()) {
                Ok(_) => unreachable!("accepted {json}"),
                Err(e) => assert!(e.to_string().contains(want), "{json}: {e} should contain {want:?}"),
            }
        }
    }

    fn jitter_and_fingerprints() {
        let mut state = 0;
        let mut seen_spread = false;
        for _ in 0..1000 {
            let d = next_poll_delay_ms(10_000, next_random(&mut state));
            assert!((10_000..=11_000).contains(&d), "{d}");
            seen_spread |= d > 10_500;
        }
        assert!(seen_spread);
        assert_eq!(next_poll_delay_ms(5, 123), 5);
        assert_ne!(fingerprint(b"a"), fingerprint(b"b"));
        let mut a = PoolState::new();
        let mut b = PoolState::new();
        a.apply_models(&[base("x"), adapter("y", "x")], 1);
        b.apply_models(&[adapter("y", "x"), base("x")], 1);
        assert_eq!(a.models_fingerprint(), b.models_fingerprint());
        b.apply_models(&[adapter("y", "z"), base("x")], 1);
        assert_ne!(a.models_fingerprint(), b.models_fingerprint());
    }
}
