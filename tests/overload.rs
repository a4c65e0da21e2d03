//! The held-body budget (`core::overload`, `maxHeldBodyBytes`, `shedBodiesOverBytes`): the
//! accounting, the shedding rule, the configuration and the answer. Runs natively and under
//! wasm-bindgen-test, like tests/core.rs.

use bbr_wasm::core::overload::{BodyBudget, HeldBodies};
use bbr_wasm::core::{Rejection, Router};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test;

#[macro_use]
mod common; // the `both!` test macro

const MIB: u64 = 1024 * 1024;

both! {
    fn totals_follow_growth_and_release() {
        let mut held = HeldBodies::new();
        let (mut a, mut b) = (0, 0);
        assert_eq!(held.hold(&mut a, 3 * MIB), 3 * MIB);
        assert_eq!(held.hold(&mut b, MIB), 4 * MIB);
        // Growth counts only the new bytes.
        assert_eq!(held.hold(&mut a, 5 * MIB), 6 * MIB);
        held.release(&mut a);
        assert_eq!((held.total(), a), (MIB, 0));
        // Released twice (decided, then destroyed): counted once.
        held.release(&mut a);
        held.release(&mut b);
        assert_eq!(held.total(), 0);
    }

    fn only_large_bodies_are_shed_and_only_past_the_budget() {
        let budget = BodyBudget { max_held_bytes: 10 * MIB, shed_over_bytes: MIB };
        // (total, this request, shed?)
        let cases = [
            (10 * MIB, 8 * MIB, false), // at the budget: not past it
            (10 * MIB + 1, 8 * MIB, true),
            (10 * MIB + 1, MIB, false), // a small body goes on
            (10 * MIB + 1, MIB + 1, true),
            (100 * MIB, 1024, false),
        ];
        for (total, request, want) in cases {
            assert_eq!(budget.must_shed(total, request), want, "{total} {request}");
        }
    }

    fn budget_defaults_and_refusals_name_the_field() {
        let Ok(router) = Router::from_json(br#"{"models":[{"name":"m"}]}"#) else { unreachable!("valid") };
        assert_eq!(router.body_budget, BodyBudget { max_held_bytes: 256 * MIB, shed_over_bytes: MIB });
        let cases: &[(&str, &str)] = &[
            (r#""maxHeldBodyBytes":0"#, "maxHeldBodyBytes"),
            (r#""maxHeldBodyBytes":1048576"#, "maxHeldBodyBytes"), // below maxBodyBytes (8 MiB)
            (r#""shedBodiesOverBytes":268435456"#, "shedBodiesOverBytes"),
            (r#""maxHeldBodyBytes":16777216,"shedBodiesOverBytes":16777216"#, "shedBodiesOverBytes"),
        ];
        for (fields, field) in cases {
            let config = format!(r#"{{"models":[{{"name":"m"}}],{fields}}}"#);
            match Router::from_json(config.as_bytes()) {
                Ok(_) => unreachable!("{fields} must be refused"),
                Err(e) => assert!(e.to_string().starts_with(field), "{fields}: {e}"),
            }
        }
        let ok = br#"{"models":[{"name":"m"}],"maxHeldBodyBytes":16777216,"shedBodiesOverBytes":65536}"#;
        let Ok(router) = Router::from_json(ok) else { unreachable!("valid") };
        assert_eq!(router.body_budget, BodyBudget { max_held_bytes: 16 * MIB, shed_over_bytes: 65536 });
    }

    fn shedding_answers_a_retryable_openai_503() {
        let r = Rejection::Overloaded;
        assert_eq!((r.status(), r.code(), r.kind(), r.retry_after()), (503, "gateway_overloaded", "service_unavailable_error", Some(1)));
        let body: serde_json::Value = match serde_json::from_str(&r.body()) {
            Ok(v) => v,
            Err(e) => unreachable!("JSON: {e}"),
        };
        assert_eq!(body["error"]["code"], "gateway_overloaded");
        assert_eq!(body["error"]["type"], "service_unavailable_error");
    }
}
