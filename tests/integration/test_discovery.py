"""Model discovery: pools that find their own models (`pools` in the filter config).

The filter polls each pool's /v1/models with dispatch_http_call on its timer; discovered
models route through envoy.yaml's cluster_header route on x-gateway-destination-pool. Real
Envoy, real mock-vllm backends (and, for broken answers, a small Python server) on free
loopback ports. Every wait has a deadline.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import httpx
import pytest
from conftest import (
    LORA,
    PHI,
    QWEN,
    assert_openai_error,
    cluster,
    completion_body,
    free_port,
    set_filter_config,
)

POOL_HEADER = "x-gateway-destination-pool"
INTERVAL_MS = 500
# The filter's jitter: up to a tenth of the interval on top of it; its timer ticks at a tenth
# of the interval (at least 50 ms). SLACK covers the poll's own round trip and a busy 2-core
# machine.
JITTER_MS = INTERVAL_MS // 10
TICK_MS = max(50, INTERVAL_MS // 10)
SLACK_S = 1.0
ABSENT_POLLS = 2


def pools_config(*clusters: str, interval_ms: int = INTERVAL_MS, **extra) -> dict:
    cfg = {
        "pools": [{"cluster": c, "intervalMs": interval_ms, "timeoutMs": 300} for c in clusters],
        "absentPollsBeforeRemoval": ABSENT_POLLS,
    }
    cfg.update(extra)
    return cfg


def wait_until(what: str, check: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Calls check() until it is true; returns the seconds it took; fails after timeout."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout:.1f}s")
        time.sleep(step)


def complete(client: httpx.Client, model: str, headers: dict | None = None) -> httpx.Response:
    h = {"content-type": "application/json"}
    h.update(headers or {})
    return client.post("/v1/completions", content=json.dumps(completion_body(model)).encode(), headers=h)


def listed(client: httpx.Client) -> list[tuple[str, str | None]]:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    return [(m["id"], m["parent"]) for m in r.json()["data"]]


def prometheus(env) -> dict[str, float]:
    text = httpx.get(f"{env.admin_url}/stats/prometheus", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("bbr_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def polls(env, pool: str, outcome: str) -> float:
    return prometheus(env).get(f'bbr_discovery_polls_total{{pool="{pool}",outcome="{outcome}"}}', 0.0)


def assert_discovered(r: httpx.Response, model: str, base: str, backend: str, pool: str) -> None:
    assert r.status_code == 200, f"{r.status_code} {r.text[:300]}"
    assert r.headers.get("x-mock-backend") == backend, dict(r.headers)
    assert r.headers.get("x-echo-base-model-name") == base, dict(r.headers)
    assert r.headers.get("x-echo-model-name") == model, dict(r.headers)
    assert r.headers.get("x-echo-destination-pool") == pool, dict(r.headers)


def fast_health_checks(cfg: dict, *names: str) -> None:
    """Active health checks every 0.5 s instead of 15 s, so hosts that come up late turn
    healthy quickly (with panic mode off, Envoy sends nothing to an unhealthy host)."""
    for name in names:
        for hc in cluster(cfg, name)["health_checks"]:
            hc["interval"] = hc["no_traffic_interval"] = "0.5s"


# --------------------------------------------------------------------------------------
# Before the first answer: 503 with Retry-After, then routing once the pools answer
# --------------------------------------------------------------------------------------


def test_pools_only_503_before_first_answer_then_routes(envoy_factory, mock_factory):
    """Pools only, no `models`, and the backends not up yet: every model gets 503
    model_discovery_pending with Retry-After (not 404); once the backends come up, the first
    poll that answers makes both seed models route, with no config change."""
    qwen_port, phi_port = free_port(), free_port()

    def mutate(cfg):
        set_filter_config(cfg, pools_config("qwen-vllm", "phi-vllm"))
        fast_health_checks(cfg, "qwen-vllm", "phi-vllm")

    env = envoy_factory(
        {"qwen-vllm": qwen_port, "phi-vllm": phi_port}, mutate=mutate, name="discovery-cold", wait_healthy=False
    )
    c = env.client()
    # Let several polls fail (connection refused -> Envoy's 503): still 503, not 404.
    time.sleep(3 * INTERVAL_MS / 1000)
    for model in (QWEN, PHI, LORA, "gpt-4o"):
        r = complete(c, model)
        err = assert_openai_error(r, 503, "model_discovery_pending", type_="service_unavailable_error", param="model")
        assert model in err["message"]
        # Retry-After: the longest interval among the pools not heard from yet, in seconds.
        assert r.headers.get("retry-after") == "1", dict(r.headers)
    assert listed(c) == []
    assert prometheus(env).get("bbr_discovery_pending_total{}", 0) >= 4

    qwen = mock_factory(QWEN, "qwen-cold", loras=(LORA,), port=qwen_port)
    mock_factory(PHI, "phi-cold", port=phi_port)
    # Health checks every 0.5 s, then the next poll: a few seconds at most.
    wait_until("Qwen routes", lambda: complete(c, QWEN).status_code == 200, timeout=15)
    wait_until("Phi routes", lambda: complete(c, PHI).status_code == 200, timeout=15)
    assert_discovered(complete(c, QWEN), QWEN, QWEN, "qwen-cold", "qwen-vllm")
    assert_discovered(complete(c, LORA), LORA, QWEN, "qwen-cold", "qwen-vllm")
    assert_discovered(complete(c, PHI), PHI, PHI, "phi-cold", "phi-vllm")
    # Every pool answered: an unknown model is now a plain 404.
    r = complete(c, "gpt-4o")
    assert_openai_error(r, 404, "model_not_found", param="model")
    assert "retry-after" not in r.headers
    # Pools in configuration order, each: base models, then adapters with their parent.
    assert listed(c) == [(QWEN, None), (LORA, QWEN), (PHI, None)]
    assert qwen.stats()["by_model"][LORA] >= 1


# --------------------------------------------------------------------------------------
# Adapters loaded and unloaded at run time
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def discovery(envoy_factory, mock_factory):
    """Pools only, on mocks of their own (the tests load and unload adapters on them)."""
    qwen = mock_factory(QWEN, "qwen-disc", loras=(LORA,))
    phi = mock_factory(PHI, "phi-disc")
    env = envoy_factory(
        {"qwen-vllm": qwen.port, "phi-vllm": phi.port},
        mutate=lambda cfg: set_filter_config(cfg, pools_config("qwen-vllm", "phi-vllm")),
        name="discovery",
    )
    c = env.client()
    wait_until("first answers", lambda: len(listed(c)) == 3, timeout=10)
    return env, qwen, phi


def load(mock, name: str, path: str | None = None) -> None:
    r = httpx.post(
        f"{mock.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path or f"/adapters/{name}"}, timeout=5
    )
    assert r.status_code == 200, r.text


def unload(mock, name: str) -> None:
    r = httpx.post(f"{mock.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=5)
    assert r.status_code == 200, r.text


def test_loaded_adapter_routes_within_one_interval(discovery):
    env, qwen, _ = discovery
    c = env.client()
    assert_openai_error(complete(c, "sql-v2"), 404, "model_not_found", param="model")
    load(qwen, "sql-v2")
    took = wait_until(
        "the loaded adapter routes",
        lambda: complete(c, "sql-v2").status_code == 200,
        timeout=(INTERVAL_MS + JITTER_MS + TICK_MS) / 1000 + SLACK_S,
        step=0.02,
    )
    print(f"adapter routed {took:.2f}s after the load (interval {INTERVAL_MS} ms)")
    assert_discovered(complete(c, "sql-v2"), "sql-v2", QWEN, "qwen-disc", "qwen-vllm")
    assert ("sql-v2", QWEN) in listed(c)
    assert listed(c) == [(QWEN, None), (LORA, QWEN), ("sql-v2", QWEN), (PHI, None)]
    assert prometheus(env)['bbr_discovery_models{pool="qwen-vllm"}'] == 3


def test_unloaded_adapter_404s_after_the_absent_polls(discovery):
    env, qwen, _ = discovery
    c = env.client()
    load(qwen, "to-unload")
    wait_until("loaded adapter routes", lambda: complete(c, "to-unload").status_code == 200, timeout=5)
    unload(qwen, "to-unload")
    unloaded_at = time.monotonic()
    # One absent poll does not remove it: right after the unload the gateway still routes it,
    # and it is the backend (vLLM's own 404, NotFoundError) that refuses.
    r = complete(c, "to-unload")
    assert r.status_code == 404 and r.headers.get("x-mock-backend") == "qwen-disc", r.text
    assert r.json()["error"]["type"] == "NotFoundError"

    def gateway_404() -> bool:
        r = complete(c, "to-unload")
        return r.status_code == 404 and "x-mock-backend" not in r.headers

    wait_until(
        "the gateway's own 404",
        gateway_404,
        timeout=ABSENT_POLLS * (INTERVAL_MS + JITTER_MS + TICK_MS) / 1000 + SLACK_S,
        step=0.02,
    )
    took = time.monotonic() - unloaded_at
    print(f"gateway 404 {took:.2f}s after the unload ({ABSENT_POLLS} absent polls of {INTERVAL_MS} ms)")
    # Removed only after ABSENT_POLLS consecutive polls without it: at least
    # ABSENT_POLLS - 1 full intervals after the unload.
    assert took >= (ABSENT_POLLS - 1) * INTERVAL_MS / 1000 * 0.9, took
    assert_openai_error(complete(c, "to-unload"), 404, "model_not_found", param="model")
    assert "to-unload" not in [m for m, _ in listed(c)]


def test_same_name_in_two_pools_goes_to_the_first_pool(discovery):
    """An adapter of the same name loaded in both pools: the pool configured first keeps it,
    the conflict is counted and logged once (not at every poll)."""
    env, qwen, phi = discovery
    c = env.client()
    before = prometheus(env).get("bbr_discovery_conflicts_total{}", 0)
    load(phi, "shared-lora")
    wait_until("Phi's adapter routes", lambda: complete(c, "shared-lora").status_code == 200, timeout=5)
    assert_discovered(complete(c, "shared-lora"), "shared-lora", PHI, "phi-disc", "phi-vllm")
    load(qwen, "shared-lora")
    # qwen-vllm comes first in `pools`. (The worker's own poll; the main thread's root
    # context polls too and may have counted the conflict first.)
    wait_until(
        "the first pool takes the name",
        lambda: complete(c, "shared-lora").headers.get("x-mock-backend") == "qwen-disc",
        timeout=(INTERVAL_MS + JITTER_MS + TICK_MS) / 1000 + SLACK_S,
    )
    wait_until(
        "the conflict is counted",
        lambda: prometheus(env).get("bbr_discovery_conflicts_total{}", 0) == before + 1,
        timeout=5,
    )
    # qwen-vllm comes first in `pools`.
    assert_discovered(complete(c, "shared-lora"), "shared-lora", QWEN, "qwen-disc", "qwen-vllm")
    time.sleep(4 * INTERVAL_MS / 1000)
    assert prometheus(env).get("bbr_discovery_conflicts_total{}", 0) == before + 1
    lines = [l for l in env.proc.text().splitlines() if '"shared-lora" is listed by' in l]
    assert len(lines) == 1, lines
    assert listed(c).count(("shared-lora", QWEN)) == 1
    unload(qwen, "shared-lora")
    unload(phi, "shared-lora")


def test_client_pool_header_never_picks_a_cluster(discovery):
    """The pool header is the filter's alone: a client's copy is removed before routing, so it
    cannot send a model to another pool, nor reach a cluster for an uninspected request."""
    env, qwen, phi = discovery
    c = env.client()
    for forged in ("phi-vllm", "PHI-VLLM", "no-such-cluster"):
        for name in (POOL_HEADER, POOL_HEADER.upper()):
            r = complete(c, QWEN, headers={name: forged})
            assert_discovered(r, QWEN, QWEN, "qwen-disc", "qwen-vllm")
    before = phi.stats()["total"]
    for path in ("/v1/anything", "/v1/completions"):
        r = c.get(path, headers={POOL_HEADER: "phi-vllm"})
        assert_openai_error(r, 404, "route_not_found")
    assert phi.stats()["total"] == before


def test_discovery_metrics(discovery):
    env, _, _ = discovery
    m = prometheus(env)
    for pool in ("qwen-vllm", "phi-vllm"):
        assert m[f'bbr_discovery_polls_total{{pool="{pool}",outcome="ok"}}'] >= 1
        for outcome in ("unreachable", "http_error", "too_large", "malformed"):
            assert m[f'bbr_discovery_polls_total{{pool="{pool}",outcome="{outcome}"}}'] == 0
    assert m['bbr_discovery_models{pool="phi-vllm"}'] >= 1
    text = httpx.get(f"{env.admin_url}/stats/prometheus", timeout=10).text
    assert re.search(r"^# TYPE bbr_discovery_polls_total counter$", text, re.M)
    assert re.search(r"^# TYPE bbr_discovery_models gauge$", text, re.M)


# --------------------------------------------------------------------------------------
# A pool that fails: down, garbage, too large, hanging
# --------------------------------------------------------------------------------------


class FlakyPool:
    """A stand-in pool backend whose /v1/models answer the test switches: `models` (a valid
    list), `garbage`, `huge` (2 MiB), `hang` (no answer for 5 s), `down` (stop(): connections
    closed, the port no longer listening). Inference requests succeed, with
    x-mock-backend: flaky."""

    MODELS = {"object": "list", "data": [{"id": "flaky-model", "object": "model", "parent": None}]}

    def __init__(self) -> None:
        self.mode = "models"
        self.release = threading.Event()
        pool = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.send_header("x-mock-backend", "flaky")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                mode = pool.mode
                if mode == "down":
                    # Connections Envoy already holds outlive the listening socket: close them.
                    self.close_connection = True
                    return
                if self.path != "/v1/models":
                    self.send(200, b"")
                elif mode == "models":
                    self.send(200, json.dumps(pool.MODELS).encode())
                elif mode == "garbage":
                    self.send(200, b"<html>this is not a model list</html>", "text/html")
                elif mode == "huge":
                    self.send(200, b'{"object":"list","data":[' + b" " * (2 * 1024 * 1024) + b"]}")
                elif mode == "hang":
                    pool.release.wait(5.0)  # bounded; the gateway gave up after timeoutMs
                    self.close_connection = True

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                self.send(200, json.dumps({"model": body.get("model"), "choices": []}).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.mode = "down"
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_failing_pool_keeps_its_last_good_list(envoy_factory, backends):
    """Garbage, an oversized body, a hang, then the backend down: each kind of failure is
    counted at every poll and logged once; the last good list keeps routing; the other pools
    are unaffected; a good answer in between is logged once as a recovery."""
    flaky = FlakyPool()

    def mutate(cfg):
        extra = json.loads(json.dumps(cluster(cfg, "phi-vllm")))
        extra["name"] = extra["load_assignment"]["cluster_name"] = "flaky-vllm"
        extra.pop("health_checks")
        extra["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
            "port_value"
        ] = flaky.port
        cfg["static_resources"]["clusters"].append(extra)
        set_filter_config(cfg, pools_config("qwen-vllm", "flaky-vllm", "phi-vllm", interval_ms=300))

    try:
        env = envoy_factory(
            {"qwen-vllm": backends.qwen.port, "phi-vllm": backends.phi.port}, mutate=mutate, name="discovery-faults"
        )
        c = env.client()
        wait_until("first answers", lambda: len(listed(c)) == 4, timeout=10)
        assert [m for m, _ in listed(c)] == [QWEN, LORA, "flaky-model", PHI]

        def fail_lines() -> list[str]:
            return [l for l in env.proc.text().splitlines() if 'pool "flaky-vllm": polls of /v1/models fail' in l]

        def recovered_lines() -> list[str]:
            return [l for l in env.proc.text().splitlines() if 'pool "flaky-vllm": polls answer again' in l]

        phases = [("garbage", "malformed"), ("huge", "too_large"), ("hang", "http_error"), ("down", "http_error")]
        for n, (mode, outcome) in enumerate(phases, start=1):
            before = polls(env, "flaky-vllm", outcome)
            if mode == "down":
                flaky.stop()
            else:
                flaky.mode = mode
            wait_until(f"3 {outcome} polls ({mode})", lambda: polls(env, "flaky-vllm", outcome) >= before + 3, timeout=10)
            # The last good list still routes (the backend itself is up except when down),
            # the other pools too.
            if mode != "down":
                r = complete(c, "flaky-model")
                assert r.status_code == 200 and r.headers.get("x-mock-backend") == "flaky", r.text
            assert ("flaky-model", None) in listed(c)
            assert complete(c, QWEN).status_code == 200
            assert complete(c, PHI).status_code == 200
            assert len(fail_lines()) == n, fail_lines()
            if mode != "down":
                flaky.mode = "models"
                wait_until("recovery logged", lambda: len(recovered_lines()) == n, timeout=10)
        m = prometheus(env)
        assert m['bbr_discovery_models{pool="flaky-vllm"}'] == 1
        for pool in ("qwen-vllm", "phi-vllm"):
            for outcome in ("unreachable", "http_error", "too_large", "malformed"):
                assert m[f'bbr_discovery_polls_total{{pool="{pool}",outcome="{outcome}"}}'] == 0
        print("\n".join(fail_lines()))
    finally:
        flaky.stop()
