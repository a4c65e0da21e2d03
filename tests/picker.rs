//! The endpoint picker (`core::affinity::picker`) and its configuration (`prefixAffinity.picker`):
//! scoring, bounded load, ties, the LRU, and refusals that name the field. Runs natively and
//! under wasm-bindgen-test, like tests/core.rs.

use bbr_wasm::core::affinity::picker::{BlockLru, Picker, Scoring};
use bbr_wasm::core::affinity::prefix::block_hashes;
use bbr_wasm::core::{HeadAction, RequestHead, Router};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test;

#[macro_use]
mod common; // the `both!` test macro

fn addresses(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("127.0.0.1:{}", 8000 + i)).collect()
}

fn picker(n: usize, scoring: Scoring) -> Picker {
    Picker::new(&addresses(n), 1000, scoring)
}

/// A prompt's chain: `blocks` hashes, distinct per `family`, sharing their first ones when
/// families agree (as chained hashes do).
fn chain(family: u64, blocks: usize) -> Vec<u64> {
    (0..blocks as u64).map(|i| family * 1_000 + i + 1).collect()
}

fn loads(p: &Picker) -> Vec<u32> {
    p.endpoints().iter().map(|e| e.in_flight).collect()
}

fn router(picker: &str) -> Result<Router, String> {
    let config = format!(
        r#"{{"models":[{{"name":"m"}},{{"name":"other"}}],"prefixAffinity":{{"enabled":true,"blockBytes":16,"prefixBlocks":2,"picker":{picker}}}}}"#
    );
    Router::from_json(config.as_bytes()).map_err(|e| e.to_string())
}

const POOL: &str =
    r#""pools":[{"cluster":"c","baseModels":["m"],"endpoints":["127.0.0.1:1","127.0.0.1:2"]}]"#;

both! {
    fn lru_evicts_the_least_recently_recorded() {
        let mut lru = BlockLru::new(3);
        for h in [1, 2, 3] {
            lru.record(h);
        }
        lru.record(1); // 2 is now the oldest
        lru.record(4);
        assert!(lru.contains(1) && lru.contains(3) && lru.contains(4));
        assert!(!lru.contains(2));
        assert_eq!(lru.len(), 3);
        // Leading matches stop at the first miss, even if later ones are present.
        assert_eq!(lru.leading_matches(&[1, 3, 2, 4]), 2);
        assert_eq!(lru.leading_matches(&[2, 1]), 0);
        assert_eq!(lru.leading_matches(&[]), 0);
        // Capacity 0 remembers nothing.
        let mut none = BlockLru::new(0);
        none.record(7);
        assert!(none.is_empty());
        // Bounded whatever is recorded.
        let mut big = BlockLru::new(100);
        for h in 0..10_000 {
            big.record(h);
        }
        assert_eq!(big.len(), 100);
        assert!(big.contains(9_999) && !big.contains(9_899));
    }

    fn the_same_prefix_returns_to_its_endpoint_while_load_allows() {
        let mut p = picker(4, Scoring::default());
        let first = p.pick(&chain(1, 8), 0);
        assert!(first.is_some());
        if let Some(i) = first { p.done(i); }
        // Other prompts land elsewhere (load ties rotate) and do not disturb it.
        for family in 2..6 {
            let Some(i) = p.pick(&chain(family, 8), 0) else { unreachable!("4 endpoints") };
            p.done(i);
        }
        for _ in 0..5 {
            let again = p.pick(&chain(1, 8), 0);
            assert_eq!(again, first);
            if let Some(i) = again { p.done(i); }
        }
        // A longer prompt sharing the first 8 blocks goes there too.
        let mut longer = chain(1, 8);
        longer.extend(chain(9, 4));
        assert_eq!(p.pick(&longer, 0), first);
    }

    fn the_longest_leading_match_wins() {
        let mut p = picker(3, Scoring::default());
        // Endpoint `a` was sent family 1's first 2 blocks; `b` an unrelated prompt.
        let Some(a) = p.pick(&chain(1, 2), 0) else { unreachable!("3 endpoints") };
        p.done(a);
        let Some(b) = p.pick(&chain(5, 4), 0) else { unreachable!("3 endpoints") };
        p.done(b);
        assert_ne!(a, b);
        // A 4-block prompt of family 1 matches 2 of 4 on `a`, none elsewhere: `a`.
        assert_eq!(p.pick(&chain(1, 4), 0), Some(a));
        // Blocks after a miss do not count (a chain never has them without its first).
        let mut later = chain(9, 1);
        later.extend(chain(5, 4).into_iter().skip(1));
        assert_eq!(p.endpoints()[b].blocks.leading_matches(&later), 0);
        assert_eq!(p.endpoints()[b].blocks.leading_matches(&chain(5, 4)), 4);
    }

    fn prefix_outweighs_a_small_load_difference_but_not_the_bound() {
        // Two endpoints: A holds the prefix and one request; B is idle.
        let mut p = picker(2, Scoring { balance_factor: None, ..Scoring::default() });
        let Some(a) = p.pick(&chain(1, 4), 0) else { unreachable!() };
        // score A = 3 x 1 + 2 x 0 = 3, B = 0 + 2 x 1 = 2: A.
        assert_eq!(p.pick(&chain(1, 4), 0), Some(a));
        assert_eq!(loads(&p)[a], 2);
        // With the load weight above the prefix weight, B.
        let mut q = picker(2, Scoring { prefix_weight: 1, load_weight: 2, balance_factor: None });
        let Some(a) = q.pick(&chain(1, 4), 0) else { unreachable!() };
        assert_ne!(q.pick(&chain(1, 4), 0), Some(a));
        // With the default bound (125 %): after one in flight on A, a second on A would be
        // 2 > ceil(2 x 1.25 / 2) = 2? No: 2 <= 2, allowed; a third is 3 > ceil(3 x 1.25 / 2) = 2.
        let mut r = picker(2, Scoring::default());
        let Some(a) = r.pick(&chain(1, 4), 0) else { unreachable!() };
        assert_eq!(r.pick(&chain(1, 4), 0), Some(a));
        assert_ne!(r.pick(&chain(1, 4), 0), Some(a));
    }

    fn a_burst_on_one_prefix_spreads_within_the_bound() {
        for (n, factor) in [(4usize, 125u32), (4, 150), (3, 100), (8, 125)] {
            let mut p = picker(n, Scoring { balance_factor: Some(factor), ..Scoring::default() });
            for k in 0..(4 * n as u64) {
                assert!(p.pick(&chain(1, 8), 0).is_some());
                let total = k + 1;
                let bound = (total * u64::from(factor)).div_ceil(100 * n as u64).max(1);
                let max = loads(&p).into_iter().max().unwrap_or(0);
                assert!(u64::from(max) <= bound, "n {n} factor {factor} after {total}: {:?} > {bound}", loads(&p));
            }
            // Spilled: the bound forced at least ceil(total / bound) endpoints into use.
            let used = loads(&p).iter().filter(|&&l| l > 0).count();
            assert!(used >= 2, "n {n} factor {factor}: {:?}", loads(&p));
        }
        // Without a bound the prefix keeps them all on one endpoint.
        let mut p = picker(4, Scoring { balance_factor: None, ..Scoring::default() });
        for _ in 0..8 {
            p.pick(&chain(1, 8), 0);
        }
        assert_eq!(loads(&p).into_iter().max(), Some(8));
    }

    fn without_shared_prefixes_it_is_least_request_with_rotating_ties() {
        let mut p = picker(4, Scoring::default());
        // Idle pool: ties rotate through every endpoint.
        let mut seen = Vec::new();
        for family in 0..8 {
            let Some(i) = p.pick(&chain(100 + family, 4), 0) else { unreachable!() };
            p.done(i);
            seen.push(i);
        }
        assert_eq!(seen, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        // Loaded pool: the fewest in flight, whatever the rotation.
        let mut q = picker(3, Scoring::default());
        for _ in 0..3 { q.pick(&[], 0); }
        assert_eq!(loads(&q), vec![1, 1, 1]);
        q.done(1);
        assert_eq!(q.pick(&chain(200, 4), 0), Some(1));
        q.done(0);
        q.done(2);
        // Prompts with no blocks (short, or not settled) are placed by load alone.
        let mut r = picker(2, Scoring::default());
        assert_eq!(r.pick(&[], 0), Some(0));
        assert_eq!(r.pick(&[], 0), Some(1));
        assert_eq!(loads(&r), vec![1, 1]);
    }

    fn an_endpoint_that_failed_a_pick_cools_down() {
        let mut p = picker(3, Scoring::default());
        let Some(home) = p.pick(&chain(1, 8), 0) else { unreachable!("3 endpoints") };
        p.done(home);
        assert_eq!(p.pick(&chain(1, 8), 1), Some(home));
        // Envoy served it at `other` (override_host's fallback after `home` failed).
        let other = (home + 1) % 3;
        assert_eq!(p.served_elsewhere(home, Some(other), &chain(1, 8), 1_000, 10_000), Some(other));
        assert_eq!(loads(&p)[home], 0);
        assert_eq!(loads(&p)[other], 1);
        // `other` now holds the prefix too; `home` is skipped until 11 000 ms.
        p.done(other);
        for now in [1_000, 5_000, 10_999] {
            let Some(i) = p.pick(&chain(1, 8), now) else { unreachable!("3 endpoints") };
            assert_ne!(i, home, "at {now}");
            p.done(i);
        }
        let mut seen_home = false;
        for now in [11_000, 11_001, 11_002] {
            let Some(i) = p.pick(&[], now) else { unreachable!("3 endpoints") };
            seen_home |= i == home;
            p.done(i);
        }
        assert!(seen_home, "back after the cooldown");
        // Served by a host the pool does not list: the request leaves the books.
        let Some(i) = p.pick(&chain(2, 4), 20_000) else { unreachable!("3 endpoints") };
        assert_eq!(p.served_elsewhere(i, None, &chain(2, 4), 20_000, 10_000), None);
        assert_eq!(loads(&p), vec![0, 0, 0]);
        // All cooling down: still picked (someone must take it), by load.
        let mut q = picker(2, Scoring::default());
        let Some(a) = q.pick(&[], 0) else { unreachable!() };
        q.served_elsewhere(a, None, &[], 0, 10_000);
        let Some(b) = q.pick(&[], 0) else { unreachable!() };
        q.served_elsewhere(b, None, &[], 0, 10_000);
        assert!(q.pick(&[], 5).is_some());
        assert_eq!(q.index_of("127.0.0.1:8001"), Some(1));
        assert_eq!(q.index_of("127.0.0.1:9"), None);
    }

    fn done_is_safe_on_any_index_and_never_goes_below_zero() {
        let mut p = picker(2, Scoring::default());
        p.done(0);
        p.done(99);
        assert_eq!(loads(&p), vec![0, 0]);
        let mut empty = Picker::new(&[], 10, Scoring::default());
        assert_eq!(empty.pick(&chain(1, 2), 0), None);
        assert_eq!(empty.address(0), None);
        assert_eq!(p.address(1), Some("127.0.0.1:8001"));
    }

    fn picker_config_defaults_and_pool_lookup() {
        let Ok(r) = router(&format!("{{{POOL}}}")) else { unreachable!("valid") };
        let Some(pc) = r.prefix_affinity.as_ref().and_then(|a| a.picker.as_ref()) else { unreachable!("picker") };
        assert_eq!(pc.header, "x-gateway-destination-endpoint");
        assert_eq!(r.picker_header, "x-gateway-destination-endpoint");
        assert_eq!((pc.lru_blocks, pc.max_blocks, pc.cooldown_ms), (8192, 32, 10_000));
        // The workers share a table per pool by default, sized like the LRU.
        assert_eq!(pc.shared_slots, 8192);
        assert_eq!(pc.pools[0].shared.as_ref().map(|t| t.slots()), Some(8192));
        let Ok(alone) = router(&format!(r#"{{"sharedSlots":0,{POOL}}}"#)) else { unreachable!("valid") };
        let Some(apc) = alone.prefix_affinity.as_ref().and_then(|a| a.picker.as_ref()) else { unreachable!("picker") };
        assert!(apc.pools[0].shared.is_none() && apc.pools[0].shared_load.is_none());
        assert!(pc.pools[0].shared_load.is_some());
        assert_eq!(pc.scoring, Scoring::default());
        assert_eq!(pc.pool_for(None, "m"), Some(0));
        assert_eq!(pc.pool_for(None, "other"), None);
        assert_eq!(pc.pool_for(Some("c"), "x"), Some(0));
        assert_eq!(pc.pool_for(Some("d"), "m"), None);
        // The capture holds max(prefixBlocks, maxBlocks) blocks.
        assert_eq!(r.prefix_affinity.as_ref().map(|a| a.capture_bytes()), Some(16 * 32));
        // IPv6 in Envoy's spelling; no bound with null.
        let Ok(r) = router(r#"{"header":"X-Pick","balanceFactor":null,"pools":[{"cluster":"c","endpoints":["[::1]:80","10.0.0.5:8080"]}]}"#) else { unreachable!("valid") };
        let Some(pc) = r.prefix_affinity.as_ref().and_then(|a| a.picker.as_ref()) else { unreachable!("picker") };
        assert_eq!(pc.pools[0].endpoints, vec!["[::1]:80".to_string(), "10.0.0.5:8080".to_string()]);
        assert_eq!(pc.scoring.balance_factor, None);
        assert_eq!(r.picker_header, "x-pick");
        // No picker: its default header is still known, so client copies are removed.
        let Ok(off) = Router::from_json(br#"{"models":[{"name":"m"}]}"#) else { unreachable!("valid") };
        assert_eq!(off.picker_header, "x-gateway-destination-endpoint");
    }

    fn picker_blocks_cover_max_blocks_of_a_settled_prompt() {
        let Ok(r) = router(&format!(r#"{{"maxBlocks":4,{POOL}}}"#)) else { unreachable!("valid") };
        let head = RequestHead { method: "POST", path: "/v1/completions", content_type: Some("application/json"), ..Default::default() };
        let HeadAction::Inspect(scanner) = r.classify(&head) else { unreachable!("inspected") };
        let prompt = "0123456789abcdef".repeat(6);
        let body = format!(r#"{{"model":"m","prompt":"{prompt}"}}"#);
        let Some(mut c) = r.prompt_capture(&scanner) else { unreachable!("enabled") };
        c.feed(body.as_bytes());
        let want = block_hashes("m", prompt.as_bytes(), 16, 4);
        assert_eq!(want.len(), 4);
        assert_eq!(r.picker_blocks(&c, "m"), want);
        // The key still covers prefixBlocks (2) of them.
        assert_eq!(r.prefix_key(&c, "m"), Some(format!("{:016x}", want[1])));
        // Not settled: no blocks.
        let Some(mut c) = r.prompt_capture(&scanner) else { unreachable!("enabled") };
        c.feed(br#"{"model":"m","prompt":"0123456789abcdef01"#);
        assert!(r.picker_blocks(&c, "m").is_empty());
    }

    fn picker_config_refusals_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"pools":[]}"#, "prefixAffinity.picker.pools"),
            (r#"{}"#, "pools"),
            (r#"{"lruBlocks":0,"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.lruBlocks"),
            (r#"{"maxBlocks":0,"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.maxBlocks"),
            (r#"{"maxBlocks":4097,"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.maxBlocks"),
            (r#"{"prefixWeight":101,"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.prefixWeight"),
            (r#"{"loadWeight":1000,"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.loadWeight"),
            (r#"{"cooldownMs":3600001,"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.cooldownMs"),
            (r#"{"sharedSlots":262145,"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.sharedSlots"),
            (r#"{"balanceFactor":99,"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.balanceFactor"),
            (r#"{"header":"x-gateway-prefix-hash","pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.header"),
            (r#"{"header":"bad header","pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.header"),
            (r#"{"pools":[{"cluster":"c","endpoints":[]}]}"#, "prefixAffinity.picker.pools[0].endpoints"),
            (r#"{"pools":[{"cluster":"c","endpoints":["replica-0:8000"]}]}"#, "prefixAffinity.picker.pools[0].endpoints[0]"),
            (r#"{"pools":[{"cluster":"c","endpoints":["127.0.0.1"]}]}"#, "prefixAffinity.picker.pools[0].endpoints[0]"),
            (r#"{"pools":[{"cluster":"c","endpoints":["127.0.0.1:0"]}]}"#, "prefixAffinity.picker.pools[0].endpoints[0]"),
            (r#"{"pools":[{"cluster":"c","endpoints":["127.0.0.1:1","127.0.0.1:01"]}]}"#, "prefixAffinity.picker.pools[0].endpoints[1]"),
            (r#"{"pools":[{"cluster":"c","baseModels":["nope"],"endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.pools[0].baseModels[0]"),
            (r#"{"pools":[{"cluster":"c","baseModels":["m"],"endpoints":["127.0.0.1:1"]},{"cluster":"d","baseModels":["m"],"endpoints":["127.0.0.1:2"]}]}"#, "prefixAffinity.picker.pools[1].baseModels[0]"),
            (r#"{"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]},{"cluster":"c","endpoints":["127.0.0.1:2"]}]}"#, "prefixAffinity.picker.pools[1].cluster"),
            (r#"{"pools":[{"cluster":"","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.pools[0].cluster"),
            (r#"{"weights":1,"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "weights"),
            (r#"{"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"],"extra":1}]}"#, "extra"),
        ];
        for (picker, field) in cases {
            match router(picker) {
                Ok(_) => unreachable!("{picker} must be refused"),
                Err(e) => assert!(e.contains(field), "{picker}: {e}"),
            }
        }
        // The picker matches blocks: it needs prefix affinity on.
        let off = r#"{"models":[{"name":"m"}],"prefixAffinity":{"picker":{"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}}}"#;
        match Router::from_json(off.as_bytes()) {
            Ok(_) => unreachable!("picker without enabled must be refused"),
            Err(e) => assert!(e.to_string().contains("prefixAffinity.picker"), "{e}"),
        }
    }
}

/// A prompt of tenant (or conversation) `family`: the 2 blocks every tenant's prompt opens
/// with (a shared preamble), then `own` blocks of its own.
fn tenant(family: u64, own: usize) -> Vec<u64> {
    let mut blocks = chain(0, 2);
    blocks.extend((0..own as u64).map(|i| family * 1_000 + 100 + i));
    blocks
}

/// What each endpoint holds of the preamble, as the workers' shared table would say: all of it.
fn preamble_everywhere(n: usize) -> Vec<usize> {
    vec![2; n]
}

/// Where `p` places a new tenant's first request, by address (the request then ends).
fn place(p: &mut Picker, prompt: &[u64]) -> String {
    let shared = preamble_everywhere(p.endpoints().len());
    let Some(i) = p.pick_shared(prompt, &shared, &[], 0) else {
        unreachable!("endpoints")
    };
    p.done(i);
    p.address(i).map(str::to_string).unwrap_or_default()
}

both! {
    fn a_new_prefix_is_placed_alike_by_pickers_that_share_nothing() {
        // Two gateways: the same hosts, listed in another order, nothing learned in common.
        let hosts = addresses(4);
        let mut reversed = hosts.clone();
        reversed.reverse();
        let mut a = Picker::new(&hosts, 1000, Scoring::default());
        let mut b = Picker::new(&reversed, 1000, Scoring::default());
        let mut used = std::collections::BTreeSet::new();
        for family in 1..=40 {
            let prompt = tenant(family, 6);
            let at_a = place(&mut a, &prompt);
            assert_eq!(place(&mut b, &prompt), at_a, "tenant {family}");
            // Its next request at either gateway stays there.
            assert_eq!(place(&mut a, &prompt), at_a);
            used.insert(at_a);
        }
        assert_eq!(used.len(), 4, "the keys spread over every endpoint: {used:?}");
        // A conversation: its first turn (one block past the preamble) through `a`, its second
        // (that block and more) through `b`, which never saw it, its third through `a` again,
        // which knows only the first turn: one endpoint for all three.
        for family in 100..120 {
            let turn1 = tenant(family, 1);
            let turn2 = tenant(family, 5);
            let turn3 = tenant(family, 9);
            let home = place(&mut a, &turn1);
            assert_eq!(place(&mut b, &turn2), home, "conversation {family}, turn 2");
            assert_eq!(place(&mut a, &turn3), home, "conversation {family}, turn 3");
        }
        // Placed by load alone (consistent placement off), the two disagree: idle, each
        // rotates through its own order.
        let mut a = Picker::new(&hosts, 1000, Scoring::default());
        let mut b = Picker::new(&reversed, 1000, Scoring::default());
        a.set_consistent(false);
        b.set_consistent(false);
        let differ = (1..=8)
            .filter(|&f| place(&mut a, &tenant(f, 6)) != place(&mut b, &tenant(f, 6)))
            .count();
        assert!(differ > 0);
    }

    fn consistent_placement_keeps_the_bound() {
        for (n, factor) in [(4usize, 125u32), (4, 110), (3, 100), (8, 150)] {
            let mut p = picker(n, Scoring { balance_factor: Some(factor), ..Scoring::default() });
            let shared = preamble_everywhere(n);
            // New tenants arriving while none of the earlier ones ends.
            for family in 1..=(6 * n as u64) {
                assert!(p.pick_shared(&tenant(family, 6), &shared, &[], 0).is_some());
                let bound = (family * u64::from(factor)).div_ceil(100 * n as u64).max(1);
                let max = loads(&p).into_iter().max().unwrap_or(0);
                assert!(u64::from(max) <= bound, "n {n} factor {factor} after {family}: {:?} > {bound}", loads(&p));
            }
        }
        // The bound overrides the hash: a new tenant whose key ranks `home` first goes to the
        // other endpoint while `home` is past the bound (2 in flight against 0).
        let mut p = picker(2, Scoring::default());
        let home = place(&mut p, &tenant(7, 6));
        let Some(h) = p.index_of(&home) else { unreachable!("listed") };
        let shared = preamble_everywhere(2);
        for _ in 0..2 {
            assert_eq!(p.pick_shared(&tenant(7, 6), &shared, &[], 0), Some(h));
        }
        let mut idle = picker(2, Scoring::default());
        let Some(family) = (8..100).find(|&f| place(&mut idle, &tenant(f, 6)) == home) else {
            unreachable!("some key ranks home first")
        };
        assert_eq!(p.pick_shared(&tenant(family, 6), &shared, &[], 0), Some(1 - h));
    }

    fn a_host_leaving_or_joining_moves_only_its_own_keys() {
        let hosts = addresses(5);
        let mut all = Picker::new(&hosts, 1000, Scoring::default());
        let homes: Vec<String> = (1..=200).map(|f| place(&mut all, &tenant(f, 6))).collect();
        let gone = hosts[2].clone();
        let kept: Vec<String> = hosts.iter().filter(|h| **h != gone).cloned().collect();
        let mut fewer = Picker::new(&kept, 1000, Scoring::default());
        let mut moved = 0;
        for (f, home) in (1..=200).zip(&homes) {
            let now = place(&mut fewer, &tenant(f, 6));
            if *home == gone {
                moved += 1;
                assert_ne!(now, gone);
            } else {
                assert_eq!(&now, home, "tenant {f} moved though its host stayed");
            }
        }
        assert!(moved > 10, "the removed host had keys: {moved}");
        // A host joining takes some keys, and every key that moves, moves to it.
        let mut more = hosts.clone();
        more.push("127.0.0.1:9000".to_string());
        let mut joined = Picker::new(&more, 1000, Scoring::default());
        let mut taken = 0;
        for (f, home) in (1..=200).zip(&homes) {
            let now = place(&mut joined, &tenant(f, 6));
            if now != *home {
                assert_eq!(now, "127.0.0.1:9000", "tenant {f}");
                taken += 1;
            }
        }
        assert!(taken > 10, "the new host took keys: {taken}");
        // The same on a live picker whose hosts change (`set_hosts`): a new tenant lands where
        // a fresh picker over the same hosts would put it.
        let mut live = Picker::new(&[], 1000, Scoring::default());
        let states: Vec<_> = kept
            .iter()
            .map(|a| bbr_wasm::core::affinity::hosts::HostState {
                host: bbr_wasm::core::affinity::hosts::Host { address: a.clone(), healthy: true, rq_active: 0 },
                load: None,
            })
            .collect();
        live.set_hosts(&states, 1000);
        for f in 300..340 {
            assert_eq!(place(&mut live, &tenant(f, 6)), place(&mut fewer, &tenant(f, 6)));
        }
    }

    fn a_known_prefix_at_its_home_holds_against_a_little_more_load() {
        // A conversation's turns 1 and 2 went home (consistent placement); its third turn is
        // longer than what this picker saw there (the turn another gateway placed is missing),
        // and home has one request more in flight than the rest: home (scored, it would lose:
        // 3 x 7/14 + 0 against 3 x 2/14 + 2). No bound: with one request in flight the bound
        // would set home aside.
        let unbounded = Scoring { balance_factor: None, ..Scoring::default() };
        let mut p = picker(4, unbounded);
        let home = place(&mut p, &tenant(5, 1));
        assert_eq!(place(&mut p, &tenant(5, 5)), home);
        let Some(h) = p.index_of(&home) else { unreachable!("listed") };
        let shared = preamble_everywhere(4);
        // One request in flight at home only: a fifth tenant whose key ranks home first.
        let mut idle = picker(4, unbounded);
        let Some(other) = (100..400).find(|&f| place(&mut idle, &tenant(f, 6)) == home) else {
            unreachable!("some key ranks home first")
        };
        assert_eq!(p.pick_shared(&tenant(other, 6), &shared, &[], 0), Some(h));
        assert_eq!(p.pick_shared(&tenant(5, 12), &shared, &[], 0), Some(h));
        // Placed by load alone, the same turn leaves home.
        let mut q = picker(4, unbounded);
        q.set_consistent(false);
        let Some(a) = q.pick_shared(&tenant(5, 5), &shared, &[], 0) else { unreachable!() };
        q.done(a);
        q.pick_shared(&tenant(other, 6), &shared, &[], 0);
        let busy = loads(&q).iter().position(|&l| l > 0);
        if busy == Some(a) {
            assert_ne!(q.pick_shared(&tenant(5, 12), &shared, &[], 0), Some(a));
        }
    }

    fn a_turn_that_spilled_past_the_bound_is_not_followed() {
        // Home takes turn 1; turn 2 finds home past the bound and spills; turn 3, home within
        // the bound again, goes home (where the other gateways send the conversation), though
        // the spill target holds more of it here.
        let mut p = picker(4, Scoring::default());
        let home = place(&mut p, &tenant(5, 1));
        let Some(h) = p.index_of(&home) else { unreachable!("listed") };
        let shared = preamble_everywhere(4);
        let mut idle = picker(4, Scoring::default());
        let Some(other) = (100..400).find(|&f| place(&mut idle, &tenant(f, 6)) == home) else {
            unreachable!("some key ranks home first")
        };
        // Two requests in flight at home, none elsewhere: past the bound (ceil(3 x 1.25 / 4) = 1)
        // and past Envoy's looser rule for a prefix known at home (slots 1).
        p.pick_shared(&tenant(other, 6), &shared, &[], 0);
        p.pick_shared(&tenant(other, 6), &shared, &[], 0);
        assert_eq!(loads(&p)[h], 2);
        let Some(spilled) = p.pick_shared(&tenant(5, 5), &shared, &[], 0) else { unreachable!() };
        assert_ne!(spilled, h);
        p.done(spilled);
        p.done(h);
        p.done(h);
        assert_eq!(p.pick_shared(&tenant(5, 9), &shared, &[], 0), Some(h));
    }

    fn a_prompt_sharing_nothing_is_scored_as_before() {
        // Nothing in common with what the endpoints hold: by load (ties rotate), not by hash.
        let mut p = picker(4, Scoring::default());
        let seen: Vec<usize> = (0..4)
            .map(|f| {
                let Some(i) = p.pick_shared(&chain(500 + f, 6), &[0; 4], &[], 0) else { unreachable!() };
                p.done(i);
                i
            })
            .collect();
        assert_eq!(seen, vec![0, 1, 2, 3]);
        // A hot prefix every endpoint holds past the key's span (8 blocks): by load (ties
        // rotate), not by the hash of the block after it (each request's own question).
        let mut r = picker(4, Scoring::default());
        r.set_key_blocks(8);
        let seen: Vec<usize> = (0..4)
            .map(|f| {
                let mut prompt = chain(7, 10);
                prompt.push(900 + f);
                let Some(i) = r.pick_shared(&prompt, &[10; 4], &[], 0) else { unreachable!() };
                r.done(i);
                i
            })
            .collect();
        assert_eq!(seen, vec![0, 1, 2, 3]);
    }

    fn a_prefix_known_elsewhere_goes_home_within_the_bound_and_spills_where_known_past_it() {
        // Where a fresh picker (another gateway, which never saw the prefix) puts tenant 9.
        let Some(home) = picker(4, Scoring::default()).pick_shared(&tenant(9, 6), &preamble_everywhere(4), &[], 0)
        else {
            unreachable!()
        };
        for holder in (0..4).filter(|&h| h != home) {
            // This gateway saw the prefix two blocks deep at `holder` (placed before every
            // endpoint held the preamble, or past the bound): home, where its peer sends it.
            let mut q = picker(4, Scoring::default());
            let mut shared = preamble_everywhere(4);
            shared[holder] = 4;
            let Some(i) = q.pick_shared(&tenant(9, 6), &shared, &[], 0) else { unreachable!() };
            q.done(i);
            assert_eq!(i, home, "holder {holder}");
            // Home one request past the bound (one in flight there, none elsewhere), a prefix
            // known there: home still, within Envoy's own rule (slots 1).
            let one: Vec<u32> = (0..4).map(|e| u32::from(e == home)).collect();
            let Some(i) = q.pick_shared(&tenant(9, 6), &shared, &one, 0) else { unreachable!() };
            q.done(i);
            assert_eq!(i, home, "holder {holder}, home one past the bound");
            // Home past both (two in flight there, none elsewhere): scored, it spills to the
            // endpoint that holds it, not to the next in the key's order.
            let two: Vec<u32> = (0..4).map(|e| 2 * u32::from(e == home)).collect();
            let Some(i) = q.pick_shared(&tenant(9, 6), &shared, &two, 0) else { unreachable!() };
            q.done(i);
            assert_eq!(i, holder, "holder {holder}, home past the bound");
        }
    }
}
