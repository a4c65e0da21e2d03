"""Soak: a few hundred thousand mixed-model requests at concurrency 64 through Envoy and the
bbr-wasm filter to the mock backends, on loopback, bounded in time.

Required results, all checked exactly:
- every answer is a 200 from the right pool, with the routing headers of the model in the
  body (soak.lua matches each answer to the request sent by its body length);
- nothing lost or duplicated: per model, the requests the client sent == the 200s it read ==
  what the mock backends counted (/mock/stats); per pool, Envoy's upstream counters agree,
  and Envoy's downstream_rq_completed equals the requests sent;
- Envoy's memory is flat: admin /memory `allocated`, sampled every second, is compared
  between the first and the last quarter of the run;
- zero Wasm VM failures: the VM counters and gauges do not move, and Envoy logs no Wasm
  failure.

The figures (requests, rate, per-model counts, latency percentiles, memory series) are
printed. BBR_SOAK_REQUESTS sets the number of requests (default 300 000, at least 100 000).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import Counter

from bbr_integration import (
    LORA,
    PHI,
    QWEN,
    log_size,
    start_envoy,
    wasm_failure_lines,
    wasm_vm_stats,
)
from loadgen import MemorySampler, make_kinds, run_wrk

REQUESTS = max(100_000, int(os.environ.get("BBR_SOAK_REQUESTS", "300000")))
CONNECTIONS = 64
WRK_THREADS = 2
ENVOY_WORKERS = 2
MAX_SECONDS = 150  # wrk's hard limit for the measured run (about 20 s on a quiet 2-core box)
WARMUP_PER_THREAD = 600 * 6

# Memory is "flat" when the mean of the last quarter of the samples taken under load is
# within this of the mean of the first quarter: 5 % plus 2 MiB of slack for allocator noise
# (tcmalloc's per-thread caches move by a MiB or so under load). A leak of 8 bytes per
# request would add 2.3 MiB over 300 000 requests.
MEMORY_TOLERANCE_RATIO = 0.05
MEMORY_TOLERANCE_BYTES = 2 * 1024 * 1024

ENVOY_COUNTERS = (
    "http.llm_gateway.downstream_rq_total",
    "http.llm_gateway.downstream_rq_completed",
    "http.llm_gateway.downstream_rq_2xx",
    "http.llm_gateway.downstream_rq_4xx",
    "http.llm_gateway.downstream_rq_5xx",
    "cluster.qwen-vllm.upstream_rq_total",
    "cluster.qwen-vllm.upstream_rq_completed",
    "cluster.qwen-vllm.upstream_rq_200",
    "cluster.phi-vllm.upstream_rq_total",
    "cluster.phi-vllm.upstream_rq_completed",
    "cluster.phi-vllm.upstream_rq_200",
)


def envoy_counters(env) -> dict[str, int]:
    out = {name: 0 for name in ENVOY_COUNTERS}  # a counter never incremented may be absent
    for line in env.admin("/stats?filter=^(http\\.llm_gateway|cluster\\.(qwen|phi)-vllm)\\.").splitlines():
        key, _, value = line.partition(": ")
        if key in out:
            out[key] = int(value)
    return out


def mock_by_model(mocks) -> Counter:
    c: Counter = Counter()
    for m in mocks:
        c.update(m.stats()["by_model"])
    return c


def _mib(n: float) -> str:
    return f"{n / 1048576:.2f} MiB"


def test_soak(envoy_bin, session_dir, mock_factory):
    qwen = mock_factory(QWEN, "soak-qwen", loras=(LORA,))
    phi = mock_factory(PHI, "soak-phi")
    env = start_envoy(
        envoy_bin,
        session_dir,
        {"qwen-vllm": qwen.port, "phi-vllm": phi.port},
        name="soak",
        concurrency=ENVOY_WORKERS,
    )
    try:
        kinds = make_kinds(
            {
                QWEN: (QWEN, (qwen.id,)),
                LORA: (QWEN, (qwen.id,)),
                PHI: (PHI, (phi.id,)),
            }
        )
        per_thread = -(-REQUESTS // (WRK_THREADS * len(kinds))) * len(kinds)  # whole cycles
        total = per_thread * WRK_THREADS

        # Warm-up: connections, pools and allocator caches exist before memory is measured.
        warm = run_wrk(env.url, kinds, WARMUP_PER_THREAD, session_dir, WRK_THREADS, CONNECTIONS, 60, tag="warmup")
        assert warm.completed_by_harness and sum(warm.statuses.values()) == 0, warm.stdout[-2000:]

        vm_before = wasm_vm_stats(env)
        counters_before = envoy_counters(env)
        mocks_before = mock_by_model((qwen, phi))
        log_offset = log_size(env)

        with MemorySampler(env.admin_url, period=1.0) as mem:
            time.sleep(1.0)  # one sample before the load
            load_start = mem.elapsed()
            res = run_wrk(env.url, kinds, per_thread, session_dir, WRK_THREADS, CONNECTIONS, MAX_SECONDS, tag="soak")
            load_end = mem.elapsed()
            time.sleep(1.0)  # and one after

        vm_after = wasm_vm_stats(env)
        counters_after = envoy_counters(env)
        mocks_delta = mock_by_model((qwen, phi))
        mocks_delta.subtract(mocks_before)
        envoy_delta = {k: counters_after[k] - counters_before[k] for k in ENVOY_COUNTERS}

        sent_by_model: Counter = Counter()
        ok_by_model: Counter = Counter()
        for k, s, o in zip(kinds, res.sent_by_kind, res.ok_by_kind):
            sent_by_model[k.model] += s
            ok_by_model[k.model] += o

        # ---- the figures -------------------------------------------------------------
        # Under load: from 1 s after wrk starts (its 64 connections opening) to its end.
        allocated = [a for t, a, _ in mem.samples if load_start + 1.0 <= t <= load_end]
        idle_before = [a for t, a, _ in mem.samples if t < load_start]
        idle_after = [a for t, a, _ in mem.samples if t > load_end]
        assert allocated, f"no memory sample under load: {mem.samples}"
        q = max(1, len(allocated) // 4)
        first_q, last_q = statistics.mean(allocated[:q]), statistics.mean(allocated[-q:])
        lines = [
            "",
            "=== bbr-wasm soak ===",
            (
                f"date {time.strftime('%Y-%m-%d %H:%M:%S %z')}; {platform.machine()}, {os.cpu_count()} CPUs, "
                f"{platform.system()} {platform.release()}; load average before: {os.getloadavg()[0]:.2f}"
            ),
            f"Envoy --concurrency {ENVOY_WORKERS}; wrk -t{WRK_THREADS} -c{CONNECTIONS} (HTTP/1.1 keep-alive)",
            (
                f"requests: {res.n_recv} answered of {res.n_sent} sent (planned {total}) in "
                f"{res.raw['duration_us'] / 1e6:.2f} s = {res.rps:,.0f} req/s; wall {res.wall_s:.1f} s"
            ),
            "per model (sent / 200 from the right pool / counted by the mocks):",
            *(
                f"  {m:<34} {sent_by_model[m]:>7} / {ok_by_model[m]:>7} / {mocks_delta[m]:>7}"
                for m in (QWEN, LORA, PHI)
            ),
            f"by backend: {dict(res.by_backend)}",
            (
                f"non-200: {dict(res.statuses)}; misrouted: {res.total('misrouted')}; unattributed: "
                f"{res.total('unattributed')}; wrk socket errors: {res.raw['errors']}"
            ),
            "latency ms: p50 {:.2f}  p90 {:.2f}  p99 {:.2f}  p99.9 {:.2f}  max {:.2f}".format(
                res.latency_ms(50),
                res.latency_ms(90),
                res.latency_ms(99),
                res.latency_ms(99.9),
                res.raw["latency_us"]["max"] / 1000,
            ),
            f"Envoy counters (delta): {envoy_delta}",
            f"Wasm VM stats before: {vm_before}",
            f"Wasm VM stats after:  {vm_after}",
            f"memory allocated under load ({len(allocated)} samples, 1/s): first quarter mean {_mib(first_q)}, "
            f"last quarter mean {_mib(last_q)} ({(last_q - first_q) / first_q:+.1%}), "
            f"min {_mib(min(allocated))}, max {_mib(max(allocated))}; idle before "
            + ", ".join(_mib(a) for a in idle_before)
            + "; idle after "
            + ", ".join(_mib(a) for a in idle_after),
            "memory series under load (MiB): " + " ".join(f"{a / 1048576:.1f}" for a in allocated),
        ]
        print("\n".join(lines))

        # ---- the checks --------------------------------------------------------------
        assert res.completed_by_harness, f"wrk did not finish {total} requests in {MAX_SECONDS}s:\n{res.stdout}"
        assert res.n_sent == res.n_recv == total
        assert res.raw["errors"] == {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
        assert sum(res.statuses.values()) == 0, f"non-200 answers: {dict(res.statuses)}"
        assert res.total("misrouted") == 0 and res.total("unattributed") == 0
        # Every kind was sent exactly per_thread/len(kinds) times per thread and answered 200.
        assert res.sent_by_kind == res.ok_by_kind == [total // len(kinds)] * len(kinds)
        # Nothing lost or duplicated, per model, as the backends saw it.
        assert +mocks_delta == +sent_by_model == +ok_by_model
        # Envoy agrees: every request completed downstream, and each pool got its share.
        qwen_sent = sent_by_model[QWEN] + sent_by_model[LORA]
        assert envoy_delta["http.llm_gateway.downstream_rq_total"] == total
        assert envoy_delta["http.llm_gateway.downstream_rq_completed"] == total
        assert envoy_delta["http.llm_gateway.downstream_rq_2xx"] == total
        assert (
            envoy_delta["http.llm_gateway.downstream_rq_4xx"] == envoy_delta["http.llm_gateway.downstream_rq_5xx"] == 0
        )
        for stat in ("upstream_rq_total", "upstream_rq_completed", "upstream_rq_200"):
            assert envoy_delta[f"cluster.qwen-vllm.{stat}"] == qwen_sent, stat
            assert envoy_delta[f"cluster.phi-vllm.{stat}"] == sent_by_model[PHI], stat
        # Zero Wasm VM failures: no VM created, lost or reloaded, and no failure logged.
        assert vm_after == vm_before
        assert vm_after["wasm.envoy.wasm.runtime.v8.active"] > 0
        assert wasm_failure_lines(env, since=log_offset) == []
        # Memory flat.
        assert len(allocated) >= 8, f"too few memory samples: {len(allocated)}"
        assert last_q <= first_q * (1 + MEMORY_TOLERANCE_RATIO) + MEMORY_TOLERANCE_BYTES, (
            f"Envoy memory grew: first quarter {_mib(first_q)}, last quarter {_mib(last_q)}"
        )
        assert env.proc.alive()
    finally:
        env.stop()
