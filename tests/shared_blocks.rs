//! The endpoint picker's shared table (`core::affinity::shared_blocks`): the slot encoding, slots shared
//! by two hashes, what another writer may have left in a slot, scoring, updates, and the
//! picker scoring with it; and its shared in-flight rows (`core::affinity::shared_load`). Runs natively
//! and under wasm-bindgen-test, like tests/picker.rs.

use bbr_wasm::core::affinity::picker::{Picker, Scoring};
use bbr_wasm::core::affinity::shared_blocks::{
    deepest_known, not_entries, pool_tag, SharedTable, SlotEntry, DEFAULT_SHARED_SLOTS, ENTRY_BYTES,
};
use bbr_wasm::core::affinity::shared_load::{LoadRow, SharedLoad, LOAD_LEASE_MS};

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
            let Some(i) = w2.pick_shared(&hashes, &t.attributed(&hashes, &read(&t, &store, &hashes)), &[], 0) else { unreachable!() };
            record(&t, &mut store, &hashes, i);
            w2.done(i);
        }
        let tenant = chain(1, 8);
        let Some(home) = w1.pick_shared(&tenant, &t.attributed(&tenant, &read(&t, &store, &tenant)), &[], 0) else { unreachable!() };
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
            let picked = w2.pick_shared(&hashes, &shared, &[], 0);
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
        assert_eq!(p.pick_shared(&hashes, &shared, &[], 0), Some(a));
        p.done(a);
        // A new prompt the table gives b whole, a nothing: b.
        let fresh = chain(5, 4);
        let mut only_b = vec![0; 2];
        only_b[b] = 4;
        assert_eq!(p.pick_shared(&fresh, &only_b, &[], 0), Some(b));
        // A count beyond the prompt's blocks is capped, and a short or empty list is zeros.
        let mut q = Picker::new(&addresses(2), 1000, Scoring::default());
        let mut huge = vec![0; 2];
        huge[b] = 1_000;
        assert_eq!(q.pick_shared(&fresh, &huge, &[], 0), Some(b));
        assert!(q.pick_shared(&fresh, &[], &[], 0).is_some());
        // The bound still comes first: b with 2 in flight over 2 endpoints is past it.
        let mut r = Picker::new(&addresses(2), 1000, Scoring::default());
        assert_eq!(r.pick_shared(&fresh, &only_b, &[], 0), Some(b));
        assert_eq!(r.pick_shared(&fresh, &only_b, &[], 0), Some(b));
        assert_eq!(r.pick_shared(&fresh, &only_b, &[], 0), Some(a));
    }

    fn load_rows_round_trip_and_refuse_anything_else() {
        let rows = [
            LoadRow { pool_tag: 1, owner: 2, stamp_ms: 3, counts: vec![] },
            LoadRow { pool_tag: u64::MAX, owner: 7, stamp_ms: u64::MAX, counts: vec![0, 1, u16::MAX] },
        ];
        for row in rows {
            assert_eq!(LoadRow::decode(&row.encode()), Some(row.clone()), "{row:?}");
        }
        let good = LoadRow { pool_tag: 1, owner: 2, stamp_ms: 3, counts: vec![4, 5] }.encode();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("short head", good[..20].to_vec()),
            ("half a count", good[..good.len() - 1].to_vec()),
            ("another magic", [&[0u8][..], &good[1..]].concat()),
            ("a slot entry", SlotEntry { pool_tag: 1, hash: 2, endpoints: [Some(0), None] }.encode().to_vec()),
            ("text", b"garbage bytes, not a row of counts".to_vec()),
        ];
        for (name, bytes) in cases {
            assert_eq!(LoadRow::decode(&bytes), None, "{name}");
        }
    }

    fn other_workers_rows_add_up_and_stale_or_foreign_rows_do_not() {
        let load = SharedLoad::new("pool", 77, 3);
        let now = 100_000;
        let me = 1;
        let row = |owner: u64, stamp: u64, counts: &[u32]| Some(load.row(owner, stamp, counts));
        let foreign = SharedLoad::new("pool", 78, 3);
        let values = vec![
            row(me, now, &[9, 9, 9]),                       // mine: not added
            row(2, now - 10, &[1, 0, 2]),                   // fresh
            row(3, now - LOAD_LEASE_MS, &[0, 3, 0]),        // just within the lease
            row(4, now - LOAD_LEASE_MS - 1, &[5, 5, 5]),    // stale: its worker is gone
            Some(foreign.row(5, now, &[7, 7, 7])),          // another endpoint list
            Some(b"garbage".to_vec()),
            None,
        ];
        assert_eq!(load.others(&values, me, now), vec![1, 3, 2]);
        assert_eq!(load.others(&[], me, now), vec![0, 0, 0]);
        // A row for fewer endpoints than the pool has is not this pool's.
        let short = SharedLoad::new("pool", 77, 2);
        assert_eq!(load.others(&[Some(short.row(2, now, &[1, 1]))], me, now), vec![0, 0, 0]);
        // Counts past u16 are capped, not wrapped; missing counts are 0.
        let capped = load.row(2, now, &[70_000]);
        assert_eq!(LoadRow::decode(&capped).map(|r| r.counts), Some(vec![u16::MAX, 0, 0]));
        // Claimable: nothing, garbage, stale, foreign, or mine; not another worker's live row.
        let claim_cases: Vec<(&str, Option<Vec<u8>>, bool)> = vec![
            ("not found", None, true),
            ("garbage", Some(b"x".to_vec()), true),
            ("stale", row(4, now - LOAD_LEASE_MS - 1, &[1, 1, 1]), true),
            ("another list's", Some(foreign.row(5, now, &[1, 1, 1])), true),
            ("mine", row(me, now - 1, &[1, 1, 1]), true),
            ("another worker's, live", row(2, now - 1, &[0, 0, 0]), false),
        ];
        for (name, value, want) in claim_cases {
            assert_eq!(load.claimable(value.as_deref(), me, now), want, "{name}");
        }
        assert!(load.key(3).starts_with("bbr-wasm.picker.pool.load."));
    }

    fn the_other_workers_load_counts_in_the_score_and_the_bound() {
        // 3 endpoints, nothing shared: this worker alone would take endpoint 0 (all idle, the
        // rotor at 0). The others have 1 in flight at 0 and at 1: endpoint 2.
        let mut p = Picker::new(&addresses(3), 1000, Scoring::default());
        assert_eq!(p.clone().pick(&chain(1, 4), 0), Some(0));
        assert_eq!(p.pick_shared(&chain(1, 4), &[], &[1, 1, 0], 0), Some(2));
        // The bound over every worker's requests: a prefix at home on 0, which the others load
        // with 3 while 1 and 2 are idle, goes elsewhere (3 in flight is not under
        // ceil(4 x 1.25 / 3) = 2), though this worker alone sees 0 idle.
        let mut q = Picker::new(&addresses(3), 1000, Scoring::default());
        let hashes = chain(2, 4);
        let mut home = vec![0; 3];
        home[0] = 4;
        assert_eq!(q.clone().pick_shared(&hashes, &home, &[], 0), Some(0));
        assert_ne!(q.pick_shared(&hashes, &home, &[3, 0, 0], 0), Some(0));
        // Only this worker's own count goes up.
        assert_eq!(q.in_flight().iter().sum::<u32>(), 1);
    }
}

both! {
    fn deepest_known_finds_the_deepest_known_block_in_few_probes() {
        // Known blocks first (a chained hash stands for its prefix): every split of 0..=40
        // blocks, the probes counted.
        for blocks in 0..=40usize {
            for known_upto in 0..=blocks {
                let mut probes = 0;
                let got = deepest_known(blocks, |i| {
                    probes += 1;
                    assert!(i < blocks, "probed {i} of {blocks}");
                    i < known_upto
                });
                assert_eq!(got, known_upto.checked_sub(1), "{known_upto} of {blocks}");
                // The last block first, then a binary search.
                let bound = if known_upto == blocks && blocks > 0 {
                    1
                } else {
                    2 + (usize::BITS - blocks.leading_zeros()) as usize
                };
                assert!(probes <= bound, "{probes} probes for {known_upto} of {blocks}");
            }
        }
        // A hole (a slot lost to a collision) hides what is past it, no more.
        let got = deepest_known(32, |i| i < 20 && i != 15);
        assert!(got.is_some_and(|d| d < 20), "{got:?}");
    }
}
