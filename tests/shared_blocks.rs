//! The endpoint picker's shared table (`core::shared_blocks`): the slot encoding, slots shared
//! by two hashes, what another writer may have left in a slot, scoring, updates, and the
//! picker scoring with it. Runs natively and under wasm-bindgen-test, like tests/picker.rs.

use bbr_wasm::core::picker::{Picker, Scoring};
use bbr_wasm::core::shared_blocks::{
    not_entries, pool_tag, SharedTable, SlotEntry, DEFAULT_SHARED_SLOTS, ENTRY_BYTES,
};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test;

#[macro_use]
mod common; // the `both!` test macro

fn addresses(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("127.0.0.1:{}", 8000 + i)).collect()
}

fn table(n: usize, slots: usize) -> SharedTable {
    match SharedTable::new("pool", &addresses(n), slots) {
        Some(t) => t,
        None => unreachable!("slots > 0"),
    }
}

/// A prompt's chain: `blocks` hashes, distinct per `family`.
fn chain(family: u64, blocks: usize) -> Vec<u64> {
    (0..blocks as u64).map(|i| family * 1_000 + i + 1).collect()
}

/// Writes `chosen` into a map of slot values for every hash of `hashes`, as the filter does.
fn record(
    t: &SharedTable,
    store: &mut std::collections::HashMap<String, Vec<u8>>,
    hashes: &[u64],
    chosen: usize,
) {
    for &h in hashes {
        let key = t.key(h);
        if let Some(v) = t.update(store.get(&key).map(Vec::as_slice), h, chosen) {
            store.insert(key, v.to_vec());
        }
    }
}

fn read(
    t: &SharedTable,
    store: &std::collections::HashMap<String, Vec<u8>>,
    hashes: &[u64],
) -> Vec<Option<Vec<u8>>> {
    hashes
        .iter()
        .map(|&h| store.get(&t.key(h)).cloned())
        .collect()
}

/// (case, the slot's bytes before, the endpoint chosen, the endpoints written: `None` for no
/// write).
type UpdateCase = (
    &'static str,
    Option<Vec<u8>>,
    usize,
    Option<[Option<u16>; 2]>,
);

both! {
    fn entries_round_trip() {
        let cases = [
            SlotEntry { pool_tag: 0, hash: 0, endpoints: [Some(0), None] },
            SlotEntry { pool_tag: u64::MAX, hash: u64::MAX, endpoints: [Some(255), Some(0)] },
            SlotEntry { pool_tag: 7, hash: 0x0123_4567_89ab_cdef, endpoints: [Some(3), Some(1)] },
        ];
        for entry in cases {
            let bytes = entry.encode();
            assert_eq!(bytes.len(), ENTRY_BYTES);
            assert_eq!(SlotEntry::decode(&bytes), Some(entry), "{entry:?}");
        }
    }

    fn anything_else_in_a_slot_is_no_entry() {
        let good = SlotEntry { pool_tag: 1, hash: 2, endpoints: [Some(0), Some(1)] }.encode();
        let with = |at: usize, b: u8| {
            let mut v = good.to_vec();
            v[at] = b;
            v
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("one byte short", good[..ENTRY_BYTES - 1].to_vec()),
            ("one byte long", [good.as_slice(), &[0]].concat()),
            ("text", b"garbage bytes, not an entry".to_vec()),
            ("another magic", with(0, 0)),
            ("another version", with(1, 2)),
            ("no endpoint", [&good[..18], &[0xff, 0xff, 0xff, 0xff]].concat()),
            ("an endpoint after a gap", [&good[..18], &[0xff, 0xff, 1, 0]].concat()),
            ("an endpoint twice", [&good[..18], &[1, 0, 1, 0]].concat()),
        ];
        for (name, bytes) in &cases {
            assert_eq!(SlotEntry::decode(bytes), None, "{name}");
        }
        // Counted as such (bbr_endpoint_shared_unusable_total); a missing slot, another hash's
        // or another pool's entry are not.
        let mut values: Vec<Option<Vec<u8>>> = cases.into_iter().map(|(_, b)| Some(b)).collect();
        let garbage = values.len();
        values.push(None);
        values.push(Some(good.to_vec()));
        values.push(Some(SlotEntry { pool_tag: 9, hash: 9, endpoints: [Some(0), None] }.encode().to_vec()));
        assert_eq!(not_entries(&values), garbage);
        assert_eq!(not_entries(&[]), 0);
    }

    fn keys_are_bounded_by_the_slots() {
        for slots in [1usize, 2, 7, DEFAULT_SHARED_SLOTS] {
            let t = table(4, slots);
            let mut keys = std::collections::HashSet::new();
            for h in 0..20_000u64 {
                let h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                assert!(t.slot_of(h) < slots);
                keys.insert(t.key(h));
            }
            assert!(keys.len() <= slots, "{slots}: {}", keys.len());
            assert!(keys.iter().all(|k| k.starts_with("bbr-wasm.picker.pool.")));
        }
        // Sharing off, or more endpoints than an entry can name: no table.
        assert!(SharedTable::new("pool", &addresses(2), 0).is_none());
        assert!(SharedTable::new("pool", &addresses(65_535), 8).is_none());
    }

    fn the_deepest_named_block_scores() {
        let t = table(3, 1024);
        let mut store = std::collections::HashMap::new();
        let prompt = chain(1, 6);
        // Endpoint 1 was sent the first 4 blocks, then endpoint 2 the first 2 (a shared
        // preamble sent elsewhere last): 1 keeps 4, 2 gets 2, 0 nothing.
        record(&t, &mut store, &prompt[..4], 1);
        record(&t, &mut store, &prompt[..2], 2);
        assert_eq!(t.attributed(&prompt, &read(&t, &store, &prompt)), vec![0, 4, 2]);
        // A third endpoint on the preamble pushes the oldest (1) out of those slots, but block
        // 3 and 4 still name 1: it keeps 4.
        record(&t, &mut store, &prompt[..2], 0);
        assert_eq!(t.attributed(&prompt, &read(&t, &store, &prompt)), vec![2, 4, 2]);
        // Nothing read: nothing attributed; fewer values than hashes: the rest not counted.
        assert_eq!(t.attributed(&prompt, &[]), vec![0, 0, 0]);
        assert_eq!(t.attributed(&prompt, &vec![None; 6]), vec![0, 0, 0]);
        // Another prompt: nothing.
        let other = chain(2, 6);
        assert_eq!(t.attributed(&other, &read(&t, &store, &other)), vec![0, 0, 0]);
    }

    fn a_slot_shared_by_two_hashes_holds_the_last_and_never_misleads() {
        // One slot: every block collides.
        let t = table(2, 1);
        let mut store = std::collections::HashMap::new();
        let a = chain(1, 3);
        let b = chain(2, 3);
        record(&t, &mut store, &a, 0);
        // Only a's last block survives in the slot: a scores 3 on endpoint 0 through it.
        assert_eq!(t.attributed(&a, &read(&t, &store, &a)), vec![3, 0]);
        record(&t, &mut store, &b, 1);
        // b took the slot over: a is forgotten, not attributed to b's endpoint.
        assert_eq!(t.attributed(&a, &read(&t, &store, &a)), vec![0, 0]);
        assert_eq!(t.attributed(&b, &read(&t, &store, &b)), vec![0, 3]);
        assert_eq!(store.len(), 1);
    }

    fn updates_write_only_what_changes() {
        let t = table(4, 64);
        let h = 42u64;
        let entry = |bytes: Option<[u8; ENTRY_BYTES]>| bytes.and_then(|b| SlotEntry::decode(&b));
        let tag = t.pool_tag();
        let cases: Vec<UpdateCase> = vec![
            ("empty slot", None, 2, Some([Some(2), None])),
            ("garbage", Some(b"not an entry".to_vec()), 1, Some([Some(1), None])),
            (
                "another hash",
                Some(SlotEntry { pool_tag: tag, hash: 7, endpoints: [Some(0), Some(1)] }.encode().to_vec()),
                3,
                Some([Some(3), None]),
            ),
            (
                "another pool's entry",
                Some(SlotEntry { pool_tag: tag ^ 1, hash: h, endpoints: [Some(3), None] }.encode().to_vec()),
                3,
                Some([Some(3), None]),
            ),
            (
                "an endpoint this pool does not have",
                Some(SlotEntry { pool_tag: tag, hash: h, endpoints: [Some(9), None] }.encode().to_vec()),
                0,
                Some([Some(0), None]),
            ),
            (
                "already first",
                Some(SlotEntry { pool_tag: tag, hash: h, endpoints: [Some(2), Some(0)] }.encode().to_vec()),
                2,
                None,
            ),
            (
                "already second",
                Some(SlotEntry { pool_tag: tag, hash: h, endpoints: [Some(2), Some(0)] }.encode().to_vec()),
                0,
                None,
            ),
            (
                "one more endpoint",
                Some(SlotEntry { pool_tag: tag, hash: h, endpoints: [Some(2), None] }.encode().to_vec()),
                1,
                Some([Some(1), Some(2)]),
            ),
            (
                "the oldest falls off",
                Some(SlotEntry { pool_tag: tag, hash: h, endpoints: [Some(2), Some(0)] }.encode().to_vec()),
                3,
                Some([Some(3), Some(2)]),
            ),
            ("an endpoint out of range is not written", None, 4, None),
        ];
        for (name, old, chosen, want) in cases {
            let got = entry(t.update(old.as_deref(), h, chosen));
            let want = want.map(|endpoints| SlotEntry { pool_tag: tag, hash: h, endpoints });
            assert_eq!(got, want, "{name}");
        }
    }

    fn pool_tags_tell_endpoint_lists_apart() {
        let a = addresses(3);
        let mut reordered = a.clone();
        reordered.swap(0, 1);
        assert_eq!(pool_tag("c", &a), pool_tag("c", &a.clone()));
        assert_ne!(pool_tag("c", &a), pool_tag("c", &reordered));
        assert_ne!(pool_tag("c", &a), pool_tag("d", &a));
        assert_ne!(pool_tag("c", &a), pool_tag("c", &a[..2]));
        // An entry another list wrote is not read.
        let t = table(3, 16);
        let other = match SharedTable::new("pool", &reordered, 16) { Some(t) => t, None => unreachable!() };
        let mut store = std::collections::HashMap::new();
        let prompt = chain(1, 2);
        record(&other, &mut store, &prompt, 0);
        assert_eq!(t.attributed(&prompt, &read(&t, &store, &prompt)), vec![0, 0, 0]);
    }

    fn two_workers_sharing_a_table_send_a_prefix_to_one_endpoint() {
        // Two pickers (two Envoy workers) over the same 4 endpoints and one table. Without the
        // table each places tenant 1 by its own history and rotor; with it the second follows
        // the first.
        let scoring = Scoring::default();
        let t = table(4, DEFAULT_SHARED_SLOTS);
        let mut store = std::collections::HashMap::new();
        let mut w1 = Picker::new(&addresses(4), 1000, scoring);
        let mut w2 = Picker::new(&addresses(4), 1000, scoring);
        // Worker 2 has placed other prompts first, so its rotor is elsewhere.
        for family in 10..13 {
            let hashes = chain(family, 4);
            let Some(i) = w2.pick_shared(&hashes, &t.attributed(&hashes, &read(&t, &store, &hashes)), 0) else { unreachable!() };
            record(&t, &mut store, &hashes, i);
            w2.done(i);
        }
        let tenant = chain(1, 8);
        let Some(home) = w1.pick_shared(&tenant, &t.attributed(&tenant, &read(&t, &store, &tenant)), 0) else { unreachable!() };
        record(&t, &mut store, &tenant, home);
        w1.done(home);
        // Without sharing, worker 2 would place the tenant by load and its rotor: not home.
        let mut alone = w2.clone();
        assert_ne!(alone.pick(&tenant, 0), Some(home));
        // With it, home, for the same tenant's longer prompts too.
        let mut longer = tenant.clone();
        longer.extend(chain(2, 4));
        for hashes in [tenant.clone(), longer] {
            let shared = t.attributed(&hashes, &read(&t, &store, &hashes));
            assert_eq!(shared[home], 8);
            let picked = w2.pick_shared(&hashes, &shared, 0);
            assert_eq!(picked, Some(home));
            if let Some(i) = picked { w2.done(i); }
        }
    }

    fn shared_blocks_add_to_the_local_history_and_stay_under_the_bound() {
        let mut p = Picker::new(&addresses(2), 1000, Scoring::default());
        let hashes = chain(1, 4);
        // Locally endpoint 0 has the prompt; the table says 1 has 2 of its 4 blocks: 0 wins
        // (the larger of the two counts per endpoint).
        let Some(a) = p.pick(&hashes, 0) else { unreachable!() };
        p.done(a);
        let b = 1 - a;
        let mut shared = vec![0; 2];
        shared[b] = 2;
        assert_eq!(p.pick_shared(&hashes, &shared, 0), Some(a));
        p.done(a);
        // A new prompt the table gives b whole, a nothing: b.
        let fresh = chain(5, 4);
        let mut only_b = vec![0; 2];
        only_b[b] = 4;
        assert_eq!(p.pick_shared(&fresh, &only_b, 0), Some(b));
        // A count beyond the prompt's blocks is capped, and a short or empty list is zeros.
        let mut q = Picker::new(&addresses(2), 1000, Scoring::default());
        let mut huge = vec![0; 2];
        huge[b] = 1_000;
        assert_eq!(q.pick_shared(&fresh, &huge, 0), Some(b));
        assert!(q.pick_shared(&fresh, &[], 0).is_some());
        // The bound still comes first: b with 2 in flight over 2 endpoints is past it.
        let mut r = Picker::new(&addresses(2), 1000, Scoring::default());
        assert_eq!(r.pick_shared(&fresh, &only_b, 0), Some(b));
        assert_eq!(r.pick_shared(&fresh, &only_b, 0), Some(b));
        assert_eq!(r.pick_shared(&fresh, &only_b, 0), Some(a));
    }
}
