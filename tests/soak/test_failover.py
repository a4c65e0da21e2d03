"""Fail-over: one of the two replicas of a pool is SIGKILLed in the middle of a soak.

The qwen pool has two mock replicas (qwen-a, qwen-b), phi has one. wrk sends mixed traffic
at concurrency 64 (soak.lua, exact accounting); once about a third of it has gone through,
qwen-b is killed. Envoy's outlier detection (3 consecutive gateway failures -> ejection,
envoy/envoy.yaml) takes it out of rotation at once, and the active health checks (every
15 s, unhealthy after 2 failures) keep it out after the ejection ends.

Checked:
- every request got an answer (nothing lost), and no answer came from the wrong pool or
  carried routing headers that do not match its body;
- the failures are all Envoy's 503 no_healthy_upstream JSON, and there are few of them
  (FAILURE_BOUND, justified there); their number is printed;
- the survivors' counts match what they told the client exactly;
- outlier detection ejected qwen-b; the active health check then marks it failed;
- a second run after the switch has no failure at all, and qwen traffic all goes to qwen-a.
"""

from __future__ import annotations

import time
from collections import Counter

from bbr_integration import (
    LORA,
    PHI,
    QWEN,
    cluster,
    start_envoy,
    wasm_vm_stats,
)
from loadgen import make_kinds, run_wrk

CONNECTIONS = 64
WRK_THREADS = 2
PER_THREAD = 6 * 12_500  # 150 000 requests in all, 100 000 of them to the qwen pool
AFTER_PER_THREAD = 6 * 2_500  # 30 000 requests after the switch
KILL_AFTER_QWEN_REQUESTS = 30_000

# Requests that may fail when a replica dies without warning, at concurrency 64 and with no
# retry policy on the routes (envoy/envoy.yaml has none: a retried LLM request may run twice):
# - the requests in flight on qwen-b when it dies: at most one per client connection, 64;
# - the requests routed to qwen-b before it is ejected: its connections are refused at once,
#   so each worker (2) may pick it for up to 3 consecutive failures before the outlier
#   detector (on the main thread) has ejected it, and the workers have seen the ejection;
#   LEAST_REQUEST even favours the dead host (no requests stay active on it). Allow 64 more.
# So at most 2 x 64 = 128. Typical measurements are far lower (see the printed figures).
FAILURE_BOUND = 2 * CONNECTIONS

HC_INTERVAL_S = 15
HC_UNHEALTHY_THRESHOLD = 2


def _ejections(env) -> int:
    return env.stat("cluster.qwen-vllm.outlier_detection.ejections_enforced_consecutive_gateway_failure")


def test_replica_killed_mid_soak(envoy_bin, session_dir, mock_factory):
    qwen_a = mock_factory(QWEN, "fo-qwen-a", loras=(LORA,))
    qwen_b = mock_factory(QWEN, "fo-qwen-b", loras=(LORA,))
    phi = mock_factory(PHI, "fo-phi-a")

    def two_qwen_replicas(cfg):
        cluster(cfg, "qwen-vllm")["load_assignment"]["endpoints"][0]["lb_endpoints"].append(
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": qwen_b.port}}}}
        )
        hc = cluster(cfg, "qwen-vllm")["health_checks"][0]
        assert (hc["interval"], hc["unhealthy_threshold"]) == (f"{HC_INTERVAL_S}s", HC_UNHEALTHY_THRESHOLD)

    env = start_envoy(
        envoy_bin,
        session_dir,
        {"qwen-vllm": qwen_a.port, "phi-vllm": phi.port},
        mutate=two_qwen_replicas,
        name="failover",
        concurrency=2,
    )
    try:
        both = (qwen_a.id, qwen_b.id)
        kinds = make_kinds({QWEN: (QWEN, both), LORA: (QWEN, both), PHI: (PHI, (phi.id,))})
        a_before = qwen_a.stats()["total"]
        phi_before = phi.stats()["total"]
        vm_before = wasm_vm_stats(env)
        qwen_rq_before = env.stat("cluster.qwen-vllm.upstream_rq_total")
        killed_at: dict[str, float] = {}

        def kill_mid_run(elapsed: float) -> None:
            if killed_at:
                return
            if env.stat("cluster.qwen-vllm.upstream_rq_total") - qwen_rq_before >= KILL_AFTER_QWEN_REQUESTS:
                qwen_b.kill()  # SIGKILL, by pid
                killed_at["elapsed"] = elapsed
                killed_at["monotonic"] = time.monotonic()

        res = run_wrk(env.url, kinds, PER_THREAD, session_dir, WRK_THREADS, CONNECTIONS, 120, kill_mid_run, tag="fo")
        total = PER_THREAD * WRK_THREADS
        failed = sum(res.statuses.values())
        ejections = _ejections(env)
        a_served = qwen_a.stats()["total"] - a_before
        phi_served = phi.stats()["total"] - phi_before

        # The active health check marks qwen-b failed within 2 intervals (+ jitter and slack).
        hc_deadline = killed_at.get("monotonic", time.monotonic()) + HC_INTERVAL_S * HC_UNHEALTHY_THRESHOLD + 15
        flags = []
        while time.monotonic() < hc_deadline:
            flags = [f for h, f in _host_flags(env, "qwen-vllm") if h.endswith(f":{qwen_b.port}")]
            if flags and "failed_active_hc" in flags[0]:
                break
            time.sleep(0.5)
        hc_marked_after = time.monotonic() - killed_at.get("monotonic", time.monotonic())

        # After the switch: no failure at all.
        after = run_wrk(env.url, kinds, AFTER_PER_THREAD, session_dir, WRK_THREADS, CONNECTIONS, 60, tag="fo-after")

        print(
            "\n=== bbr-wasm fail-over: one of two qwen replicas SIGKILLed mid-soak ===\n"
            f"requests: {res.n_recv} answered of {res.n_sent} sent in {res.raw['duration_us'] / 1e6:.2f} s "
            f"({res.rps:,.0f} req/s); qwen-b killed at {killed_at.get('elapsed', -1):.2f} s, after "
            f"{KILL_AFTER_QWEN_REQUESTS} qwen requests\n"
            f"failed during the switch: {failed} ({dict(res.statuses)}; {res.total('failed_json_503')} with the "
            f"no_healthy_upstream JSON); bound {FAILURE_BOUND}\n"
            f"200s by backend: {dict(res.by_backend)}; misrouted {res.total('misrouted')}; "
            f"unattributed {res.total('unattributed')}\n"
            f"outlier ejections (consecutive_gateway_failure): {ejections}; active health check marked qwen-b "
            f"{flags[0] if flags else '?'} {hc_marked_after:.1f} s after the kill\n"
            f"after the switch: {after.n_recv} requests, non-200 {dict(after.statuses)}, by backend "
            f"{dict(after.by_backend)}\n"
            f"latency ms during the switch run: p50 {res.latency_ms(50):.2f} p99 {res.latency_ms(99):.2f} "
            f"max {res.raw['latency_us']['max'] / 1000:.2f}"
        )

        assert killed_at, "the kill never happened (too little qwen traffic?)"
        assert res.completed_by_harness and res.n_sent == res.n_recv == total, "requests were lost"
        assert res.total("misrouted") == 0 and res.total("unattributed") == 0
        # Every failure is Envoy's OpenAI-style 503, never a wrong backend's answer.
        assert set(res.statuses) <= {503}, dict(res.statuses)
        assert res.total("failed_json_503") == failed
        assert failed <= FAILURE_BOUND, f"{failed} requests failed during the switch"
        # Both replicas served before the kill; the survivors' counts match the client's.
        by_backend: Counter = res.by_backend
        assert by_backend[qwen_b.id] > 0 and by_backend[qwen_a.id] > 0
        assert by_backend[qwen_a.id] == a_served
        assert by_backend[phi.id] == phi_served
        assert sum(by_backend.values()) + failed == total
        # Outlier detection moved the traffic, then the active health check took over.
        assert ejections >= 1
        assert flags and "failed_active_hc" in flags[0], f"qwen-b flags: {flags}"
        # After the switch: nothing fails, qwen traffic all on qwen-a.
        assert after.completed_by_harness and after.n_recv == AFTER_PER_THREAD * WRK_THREADS
        assert sum(after.statuses.values()) == 0 and after.total("misrouted") == 0
        assert set(after.by_backend) == {qwen_a.id, phi.id}
        assert wasm_vm_stats(env) == vm_before
    finally:
        env.stop()


def _host_flags(env, cluster_name: str) -> list[tuple[str, str]]:
    """(host address, health_flags) of each host of a cluster, from admin /clusters."""
    out = []
    for line in env.admin("/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster_name and parts[2] == "health_flags":
            out.append((parts[1], parts[3]))
    return out
