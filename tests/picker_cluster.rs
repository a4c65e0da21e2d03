//! The endpoint picker on Envoy's own cluster (`core::affinity::hosts`), with the servers' own
//! load (`core::affinity::load_metrics`): the admin page's parsing, the snapshot and lease
//! encodings, the Prometheus reader (whole, split at every byte, over its caps, garbage), the
//! picker taking hosts as they come and go, health, and the server-load and KV scores; and the
//! configuration's refusals, which name the field. Runs natively and under wasm-bindgen-test.

use bbr_wasm::core::affinity::hosts::{
    parse_clusters, Host, HostState, Lease, ServerLoad, Snapshot,
};
use bbr_wasm::core::affinity::load_metrics::{LoadError, MetricNames, MetricsReader};
use bbr_wasm::core::affinity::picker::{from_elsewhere, kv_free_banded, Picker, Scoring};
use bbr_wasm::core::Router;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test;

#[macro_use]
mod common;

/// `unwrap` for the tests (clippy denies it in the crate, tests included).
trait Must<T> {
    fn must(self) -> T;
}

impl<T> Must<T> for Option<T> {
    fn must(self) -> T {
        let Some(v) = self else {
            unreachable!("expected a value")
        };
        v
    }
}

impl<T, E: std::fmt::Debug> Must<T> for Result<T, E> {
    fn must(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => unreachable!("expected Ok, got {e:?}"),
        }
    }
}

trait MustErr<E> {
    fn must_err(self) -> E;
}

impl<T, E> MustErr<E> for Result<T, E> {
    fn must_err(self) -> E {
        let Err(e) = self else {
            unreachable!("expected an error")
        };
        e
    }
}

/// An admin page as Envoy 1.40 prints it (trimmed to two clusters), with the health flags
/// proto3 JSON spells only when true.
const PAGE: &str = r#"{"cluster_statuses":[
 {"name":"bbr-envoy-admin","host_statuses":[{"address":{"socket_address":{"address":"127.0.0.1","port_value":9901}},"health_status":{"eds_health_status":"HEALTHY"}}]},
 {"name":"qwen-vllm","added_via_api":false,"host_statuses":[
  {"address":{"socket_address":{"address":"10.0.0.1","port_value":8000}},"stats":[{"name":"cx_total","value":"4"},{"type":"GAUGE","name":"rq_active","value":"3"}],"health_status":{"eds_health_status":"HEALTHY"},"weight":1,"locality":{}},
  {"address":{"socket_address":{"address":"10.0.0.2","port_value":8000}},"stats":[{"type":"GAUGE","name":"rq_active"}],"health_status":{"failed_active_health_check":true,"eds_health_status":"HEALTHY"}},
  {"address":{"socket_address":{"address":"10.0.0.3","port_value":8000}},"health_status":{"failed_outlier_check":true,"eds_health_status":"HEALTHY"}},
  {"address":{"socket_address":{"address":"10.0.0.4","port_value":8000}},"health_status":{"eds_health_status":"UNHEALTHY"}},
  {"address":{"socket_address":{"address":"10.0.0.5","port_value":8000}},"health_status":{"eds_health_status":"DEGRADED"}},
  {"address":{"socket_address":{"address":"10.0.0.6","port_value":8000}},"health_status":{"pending_dynamic_removal":true,"eds_health_status":"HEALTHY"}},
  {"address":{"socket_address":{"address":"fd00::7","port_value":8000}},"health_status":{}},
  {"address":{"pipe":{"path":"/tmp/x"}},"health_status":{}}
 ]}]}"#;

fn host(address: &str, healthy: bool) -> HostState {
    HostState {
        host: Host {
            address: address.to_string(),
            healthy,
            rq_active: 0,
        },
        load: None,
    }
}

fn with_load(mut h: HostState, waiting: u32, running: u32, kv: Option<u16>) -> HostState {
    h.load = Some(ServerLoad {
        waiting,
        running,
        kv_milli: kv,
    });
    h
}

fn read_all(page: &[u8], chunk: usize, cap: usize) -> Result<ServerLoad, LoadError> {
    let names = MetricNames::default();
    let mut reader = MetricsReader::new(&names, cap);
    for part in page.chunks(chunk.max(1)) {
        reader.feed(part);
    }
    reader.finish()
}

const VLLM_PAGE: &str =
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{model_name=\"q\",engine=\"0\"} 4.0\n\
vllm:num_requests_running{model_name=\"q\",engine=\"1\"} 2.0\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{model_name=\"a } \\\" tricky\",engine=\"0\"} 7.0\n\
vllm:kv_cache_usage_perc{model_name=\"q\",engine=\"0\"} 0.25\n\
vllm:kv_cache_usage_perc{model_name=\"q\",engine=\"1\"} 0.5 1712345678000\n\
vllm:num_requests_waiting_by_reason{reason=\"x\"} 99\n\
vllm:request_success_total{finished_reason=\"stop\"} 12.0\n";

both! {
    fn the_admin_page_gives_each_clusters_hosts_and_their_health() {
        let parsed = parse_clusters(PAGE.as_bytes(), &["qwen-vllm", "nope"]).must();
        assert_eq!(parsed[1], None);
        let hosts = parsed[0].clone().must();
        let summary: Vec<(&str, bool, u32)> =
            hosts.iter().map(|h| (h.address.as_str(), h.healthy, h.rq_active)).collect();
        assert_eq!(
            summary,
            vec![
                ("10.0.0.1:8000", true, 3),
                ("10.0.0.2:8000", false, 0),
                ("10.0.0.3:8000", false, 0),
                ("10.0.0.4:8000", false, 0),
                ("10.0.0.5:8000", false, 0),
                ("10.0.0.6:8000", false, 0),
                ("[fd00::7]:8000", true, 0),
            ]
        );
        // Garbage is refused, an empty page lists nothing.
        assert!(parse_clusters(b"not json", &["qwen-vllm"]).is_err());
        assert!(parse_clusters(b"{\"cluster_statuses\": 3}", &["qwen-vllm"]).is_err());
        assert_eq!(parse_clusters(b"{}", &["qwen-vllm"]).must(), vec![None]);
    }

    fn snapshots_and_leases_round_trip_and_refuse_anything_else() {
        let snapshot = Snapshot {
            stamp_ms: 123_456,
            hosts: vec![
                with_load(host("10.0.0.1:8000", true), 3, 4, Some(250)),
                with_load(host("[fd00::7]:8000", false), 0, 1, None),
                host("10.0.0.3:8000", true),
            ],
        };
        let bytes = snapshot.encode();
        assert_eq!(Snapshot::decode(&bytes), Some(snapshot));
        for cut in 0..bytes.len() {
            assert_eq!(Snapshot::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Snapshot::decode(&longer), None);
        assert_eq!(Snapshot::decode(b"garbage"), None);
        let lease = Lease { owner: 7, stamp_ms: 1_000 };
        assert_eq!(Lease::decode(&lease.encode()), Some(lease));
        assert_eq!(Lease::decode(b"x"), None);
        // The holder keeps it; another takes it only once it lapsed, or over bytes that are none.
        let v = lease.encode();
        assert!(Lease::may_hold(Some(&v), 7, 50_000, 1_000));
        assert!(!Lease::may_hold(Some(&v), 8, 2_000, 1_000));
        assert!(Lease::may_hold(Some(&v), 8, 2_001, 1_000));
        assert!(Lease::may_hold(None, 8, 0, 1_000));
        assert!(Lease::may_hold(Some(b"junk"), 8, 0, 1_000));
    }

    fn the_metrics_reader_sums_series_and_takes_the_largest_kv_split_anywhere() {
        let want = ServerLoad { waiting: 7, running: 6, kv_milli: Some(500) };
        for chunk in [1, 2, 3, 7, 16, 100, VLLM_PAGE.len()] {
            assert_eq!(read_all(VLLM_PAGE.as_bytes(), chunk, 1 << 20), Ok(want), "chunk {chunk}");
        }
        // llama-server's names; no trailing newline; no KV gauge is no KV score.
        let llama = "llamacpp:requests_deferred 2\nllamacpp:requests_processing 1";
        assert_eq!(
            read_all(llama.as_bytes(), 5, 1 << 20),
            Ok(ServerLoad { waiting: 2, running: 1, kv_milli: None })
        );
        let llama_kv = "llamacpp:requests_deferred 0\nllamacpp:requests_processing 1\nllamacpp:kv_cache_usage_ratio 0.125\n";
        assert_eq!(
            read_all(llama_kv.as_bytes(), 3, 1 << 20),
            Ok(ServerLoad { waiting: 0, running: 1, kv_milli: Some(125) })
        );
    }

    fn the_metrics_reader_refuses_past_its_cap_garbage_and_a_page_without_the_gauges() {
        // Past the cap, whichever way it arrives.
        for chunk in [1, 64, VLLM_PAGE.len()] {
            assert_eq!(read_all(VLLM_PAGE.as_bytes(), chunk, 100), Err(LoadError::TooLarge));
        }
        let bad = [
            "vllm:num_requests_waiting{model_name=\"x\" 3\nvllm:num_requests_running 1\n",
            "vllm:num_requests_waiting NaN\nvllm:num_requests_running 1\n",
            "vllm:num_requests_waiting -1\nvllm:num_requests_running 1\n",
            "vllm:num_requests_waiting 1 2 3\nvllm:num_requests_running 1\n",
            "vllm:num_requests_waiting \u{fffd}\nvllm:num_requests_running 1\n",
        ];
        for page in bad {
            assert_eq!(read_all(page.as_bytes(), 4, 1 << 20), Err(LoadError::Garbage), "{page:?}");
        }
        // Non-UTF-8 bytes in a line of no interest are skipped.
        let mut page = b"other_metric{x=\"\xff\xfe\"} 1\n".to_vec();
        page.extend_from_slice(b"vllm:num_requests_waiting 1\nvllm:num_requests_running 2\n");
        assert!(read_all(&page, 3, 1 << 20).is_ok());
        // A gauge's line past the line limit is garbage; another long line is skipped.
        let long_label = "y".repeat(10_000);
        let skipped = format!("other{{l=\"{long_label}\"}} 1\nvllm:num_requests_waiting 1\nvllm:num_requests_running 2\n");
        assert!(read_all(skipped.as_bytes(), 333, 1 << 20).is_ok());
        let refused = format!("vllm:num_requests_waiting{{l=\"{long_label}\"}} 1\nvllm:num_requests_running 2\n");
        assert_eq!(read_all(refused.as_bytes(), 333, 1 << 20), Err(LoadError::Garbage));
        assert_eq!(read_all(b"", 1, 100), Err(LoadError::Missing));
        assert_eq!(read_all(b"<html>404</html>", 1, 100), Err(LoadError::Missing));
        assert_eq!(read_all(b"vllm:num_requests_waiting 1\n", 1, 100), Err(LoadError::Missing));
    }

    fn hosts_come_and_go_keeping_what_each_learned_and_in_flight_ends_by_id() {
        let mut p = Picker::new(&[], 100, Scoring::default());
        assert_eq!(p.pick(&[1, 2], 0), None, "no hosts yet: no pick");
        let a = host("10.0.0.1:8000", true);
        let b = host("10.0.0.2:8000", true);
        let c = host("10.0.0.3:8000", true);
        assert!(p.set_hosts(&[a.clone(), b.clone()], 100));
        assert!(!p.set_hosts(&[a.clone(), b.clone()], 100), "same list: no change");
        let first = p.pick(&[1, 2, 3], 0).must();
        let home = p.address(first).must().to_string();
        let id = p.id_of(first).must();
        // A host added in front: indexes move, the home keeps its blocks and its count.
        assert!(p.set_hosts(&[c.clone(), a.clone(), b.clone()], 100));
        let now_at = p.index_of(&home).must();
        assert_eq!(p.index_of_id(id), Some(now_at));
        assert_eq!(p.endpoints()[now_at].in_flight, 1);
        assert_eq!(p.endpoints()[now_at].blocks.leading_matches(&[1, 2, 3]), 3);
        p.done_id(id);
        assert_eq!(p.endpoints()[now_at].in_flight, 0);
        // Its prompt goes home again.
        let again = p.pick(&[1, 2, 3], 0).must();
        assert_eq!(p.address(again), Some(home.as_str()));
        let again_id = p.id_of(again).must();
        // The home removed: never picked; its request in flight ends quietly.
        let rest: Vec<HostState> = [c, a, b].into_iter().filter(|h| h.host.address != home).collect();
        assert!(p.set_hosts(&rest, 100));
        p.done_id(again_id);
        for _ in 0..10 {
            let i = p.pick(&[1, 2, 3], 0).must();
            assert_ne!(p.address(i), Some(home.as_str()));
        }
        // Back again: a new endpoint, learned nothing.
        let mut back = rest.clone();
        back.push(host(&home, true));
        p.set_hosts(&back, 100);
        let i = p.index_of(&home).must();
        assert_eq!(p.endpoints()[i].blocks.leading_matches(&[1, 2, 3]), 0);
        assert_ne!(p.id_of(i), Some(again_id));
    }

    fn an_unhealthy_host_is_never_picked_and_none_healthy_is_no_pick() {
        let mut p = Picker::new(&[], 100, Scoring::default());
        p.set_hosts(&[host("a:1", true), host("b:1", false), host("c:1", true)], 100);
        for k in 0..30 {
            let i = p.pick(&[k, k + 1], 0).must();
            assert_ne!(p.address(i), Some("b:1"));
        }
        // Its prefix's home turns unhealthy: the prompt goes elsewhere.
        let home = p.pick(&[500, 501], 0).must();
        let home_addr = p.address(home).must().to_string();
        p.done(home);
        let hosts: Vec<HostState> = ["a:1", "b:1", "c:1"]
            .iter()
            .map(|a| host(a, *a != home_addr && *a != "b:1"))
            .collect();
        p.set_hosts(&hosts, 100);
        let moved = p.pick(&[500, 501], 0).must();
        assert_ne!(p.address(moved), Some(home_addr.as_str()));
        p.set_hosts(&[host("a:1", false), host("b:1", false)], 100);
        assert_eq!(p.pick(&[1], 0), None);
    }

    fn a_server_reported_queue_counts_as_load_and_kv_breaks_the_tie() {
        let hosts = |loads: [(u32, u32, Option<u16>); 3]| -> Vec<HostState> {
            ["a:1", "b:1", "c:1"]
                .iter()
                .zip(loads)
                .map(|(a, (w, r, kv))| with_load(host(a, true), w, r, kv))
                .collect()
        };
        let mut p = Picker::new(&[], 100, Scoring::default());
        // a's server has a long queue from outside; this picker has nothing in flight there.
        p.set_hosts(&hosts([(12, 2, None), (0, 1, None), (0, 1, None)]), 100);
        let mut at_a = 0;
        for k in 0..12u64 {
            let i = p.pick(&[k * 10 + 1], 0).must();
            if p.address(i) == Some("a:1") {
                at_a += 1;
            }
        }
        assert_eq!(at_a, 0);
        // What the server counts beyond Envoy's own requests there (rq_active) is added to the
        // live in-flight counts, less one (on the wire): a's 3 are all this Envoy's (their
        // in-flight counts have ended here since), b's 4 are 1 of Envoy's and 3 from
        // elsewhere, c is idle. So a counts 0, b 2, c 0: four unique prompts go to a and c,
        // none to b (taking the server's whole count would put a at 3 and send all four to c).
        let mut q = Picker::new(&[], 100, Scoring { balance_factor: None, ..Scoring::default() });
        let mut counted = hosts([(1, 2, None), (1, 3, None), (0, 0, None)]);
        counted[0].host.rq_active = 3;
        counted[1].host.rq_active = 1;
        q.set_hosts(&counted, 100);
        let order: Vec<String> = (0..4u64)
            .map(|k| {
                let i = q.pick(&[100 + k], 0).must();
                q.address(i).must().to_string()
            })
            .collect();
        assert!(!order.iter().any(|a| a == "b:1"), "{order:?}");
        assert_eq!(order.iter().filter(|a| *a == "a:1").count(), 2, "{order:?}");
        // Equal load and no prefix: the lower KV usage wins, when every candidate reports it.
        let mut r = Picker::new(&[], 100, Scoring::default());
        r.set_hosts(&hosts([(0, 0, Some(900)), (0, 0, Some(100)), (0, 0, Some(500))]), 100);
        let i = r.pick(&[], 0).must();
        assert_eq!(r.address(i), Some("b:1"));
        // One candidate without a KV report: KV is left out for all (ties rotate from a).
        let mut s = Picker::new(&[], 100, Scoring::default());
        s.set_hosts(&hosts([(0, 0, Some(900)), (0, 0, None), (0, 0, Some(100))]), 100);
        let i = s.pick(&[], 0).must();
        assert_eq!(s.address(i), Some("a:1"));
        // Usage within 20 % of the emptiest is no difference: ties rotate from a, as without KV.
        let mut u = Picker::new(&[], 100, Scoring::default());
        u.set_hosts(&hosts([(0, 0, Some(190)), (0, 0, Some(100)), (0, 0, Some(150))]), 100);
        let order: Vec<String> = (0..3u64)
            .map(|k| {
                let i = u.pick(&[200 + k], 0).must();
                u.address(i).must().to_string()
            })
            .collect();
        assert_eq!(order, ["a:1", "b:1", "c:1"]);
        // Past the band, the fuller cache loses the tie: a is 25 % above b, c within 20 %.
        let mut v = Picker::new(&[], 100, Scoring::default());
        v.set_hosts(&hosts([(0, 0, Some(400)), (0, 0, Some(150)), (0, 0, Some(340))]), 100);
        let i = v.pick(&[], 0).must();
        assert_eq!(v.address(i), Some("b:1"));
        for (usage, least, free) in
            [(100, 100, 1000), (300, 100, 1000), (301, 100, 999), (1000, 0, 200), (4000, 0, 200), (0, 500, 1000)]
        {
            assert_eq!(kv_free_banded(usage, least), free, "usage {usage}, least {least}");
        }
        // One request beyond Envoy's own is on the wire, not from elsewhere.
        for (total, own, elsewhere) in [(3, 3, 0), (4, 3, 0), (5, 3, 1), (0, 5, 0), (14, 2, 11)] {
            assert_eq!(from_elsewhere(total, own), elsewhere, "{total} - {own}");
        }
        // KV weight 0: no KV score.
        let mut t = Picker::new(&[], 100, Scoring::default());
        t.set_kv_weight(0);
        t.set_hosts(&hosts([(0, 0, Some(900)), (0, 0, Some(100)), (0, 0, Some(500))]), 100);
        let i = t.pick(&[], 0).must();
        assert_eq!(t.address(i), Some("a:1"));
    }

    fn the_shared_tables_follow_the_host_list() {
        let mut p = Picker::new(&[], 100, Scoring::default());
        p.set_sharing("qwen", 64);
        p.set_hosts(&[host("a:1", true), host("b:1", true)], 100);
        let two = p.shared_table().must().pool_tag();
        p.set_hosts(&[host("a:1", true), host("b:1", false)], 100);
        assert_eq!(p.shared_table().must().pool_tag(), two, "health alone keeps the tag");
        p.set_hosts(&[host("a:1", true), host("b:1", true), host("c:1", true)], 100);
        assert_ne!(p.shared_table().must().pool_tag(), two);
        assert!(p.shared_load().is_some());
        let mut q = Picker::new(&[], 100, Scoring::default());
        q.set_sharing("qwen", 0);
        q.set_hosts(&[host("a:1", true)], 100);
        assert!(q.shared_table().is_none() && q.shared_load().is_none());
    }

    fn hosts_and_server_metrics_are_configured_strictly() {
        let config = |picker: &str| {
            format!(
                r#"{{"models":[{{"name":"m"}}],"prefixAffinity":{{"enabled":true,"picker":{picker}}}}}"#
            )
        };
        let ok = Router::from_json(
            config(r#"{"hosts":{},"serverMetrics":{"waiting":["my:queue"]},"pools":[{"cluster":"c","baseModels":["m"]}]}"#)
                .as_bytes(),
        )
        .must();
        let picker = ok.prefix_affinity.must().picker.must();
        let hosts = picker.hosts.must();
        assert_eq!((hosts.cluster.as_str(), hosts.path.as_str(), hosts.interval_ms), ("bbr-envoy-admin", "/clusters?format=json", 250));
        let metrics = picker.server_metrics.must();
        assert_eq!(metrics.interval_ms, 100);
        assert!(metrics.names.waiting.iter().any(|n| n == "my:queue"));
        assert!(metrics.names.waiting.iter().any(|n| n == "vllm:num_requests_waiting"));
        assert_eq!(picker.kv_weight, 2);
        let refusals = [
            (r#"{"hosts":{},"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.pools[0].endpoints"),
            (r#"{"pools":[{"cluster":"c"}]}"#, "prefixAffinity.picker.pools[0].endpoints"),
            (r#"{"serverMetrics":{},"pools":[{"cluster":"c","endpoints":["127.0.0.1:1"]}]}"#, "prefixAffinity.picker.serverMetrics"),
            (r#"{"hosts":{"intervalMs":10},"pools":[{"cluster":"c"}]}"#, "prefixAffinity.picker.hosts.intervalMs"),
            (r#"{"hosts":{"path":"clusters"},"pools":[{"cluster":"c"}]}"#, "prefixAffinity.picker.hosts.path"),
            (r#"{"hosts":{"maxBytes":0},"pools":[{"cluster":"c"}]}"#, "prefixAffinity.picker.hosts.maxBytes"),
            (r#"{"hosts":{"cluster":""},"pools":[{"cluster":"c"}]}"#, "prefixAffinity.picker.hosts.cluster"),
            (r#"{"hosts":{"extra":1},"pools":[{"cluster":"c"}]}"#, "extra"),
            (r#"{"hosts":{},"serverMetrics":{"kvUsage":["bad name"]},"pools":[{"cluster":"c"}]}"#, "prefixAffinity.picker.serverMetrics.kvUsage[0]"),
            (r#"{"hosts":{},"serverMetrics":{"timeoutMs":0},"pools":[{"cluster":"c"}]}"#, "prefixAffinity.picker.serverMetrics.timeoutMs"),
            (r#"{"hosts":{},"serverMetrics":{"intervalMs":5},"pools":[{"cluster":"c"}]}"#, "prefixAffinity.picker.serverMetrics.intervalMs"),
            (r#"{"hosts":{},"kvWeight":101,"pools":[{"cluster":"c"}]}"#, "prefixAffinity.picker.kvWeight"),
        ];
        for (picker, field) in refusals {
            let err = Router::from_json(config(picker).as_bytes()).map(|_| ()).must_err().to_string();
            assert!(err.contains(field), "{picker}: {err}");
        }
    }
}
