"""Metrics as a real Prometheus scrape of Envoy returns them, and logs without request content.

One Envoy of its own, so its counters start at zero and every expected value is exact.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from conftest import LORA, PHI, QWEN, assert_routed, backend_ports, completion_body

MARKER = "PROMPT-SECRET-7f3a9c"  # must never appear in a filter log line


@pytest.fixture(scope="module")
def obs_envoy(envoy_factory, backends):
    def mutate(cfg):
        # Histograms reach the admin endpoint at each stats flush (default 5 s).
        cfg["stats_flush_interval"] = "1s"

    env = envoy_factory(backend_ports(backends), mutate=mutate, name="observability")
    # The filter's own log lines at their most verbose, to prove even those carry no content.
    httpx.post(f"{env.admin_url}/logging?wasm=trace", timeout=10).raise_for_status()
    # The filter asks the host for its log level on a 1 s timer (src/filter/root.rs); wait a tick.
    time.sleep(1.5)
    return env


def scrape(env) -> dict[str, float]:
    """`/stats/prometheus` as {'name{labels}': value} for the bbr_ series."""
    text = httpx.get(f"{env.admin_url}/stats/prometheus", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("bbr_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def type_of(env, name: str) -> str | None:
    text = httpx.get(f"{env.admin_url}/stats/prometheus", timeout=10).text
    m = re.search(rf"^# TYPE {re.escape(name)} (\w+)$", text, re.M)
    return m.group(1) if m else None


def post(client, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"content-type": "application/json"}
    h.update(headers or {})
    return client.post("/v1/completions", content=content, headers=h)


def test_metrics_in_a_real_prometheus_scrape(obs_envoy):
    client = obs_envoy.client()
    prompt = f"{MARKER} " * 200
    for model in [QWEN, QWEN, QWEN, LORA, PHI, PHI]:
        assert_routed(post(client, completion_body(model, prompt=prompt)), model)
    # A forged header on a routed request.
    r = post(client, completion_body(QWEN, prompt=prompt), {"x-gateway-base-model-name": PHI})
    assert_routed(r, QWEN)
    assert post(client, completion_body("gpt-4o", prompt=prompt)).status_code == 404
    assert post(client, f'{{"model": "{MARKER}", "prompt": "{MARKER}"'.encode()).status_code == 400
    assert post(client, {"prompt": prompt}).status_code == 400
    assert post(client, {"model": 42, "prompt": prompt}).status_code == 400
    assert post(client, b"{}").status_code == 400  # no model: a second missing_model
    r = client.post(
        "/v1/completions",
        content=b"x" * 16,
        headers={"content-type": "text/plain"},
    )
    assert r.status_code == 415
    assert client.get("/v1/models").status_code == 200
    assert client.get("/health").status_code == 404  # not inspected, no route: passthrough

    m = scrape(obs_envoy)
    expected = {
        "bbr_routed_total{}": 7,
        'bbr_model_requests_total{model="Qwen/Qwen2.5-3B-Instruct"}': 5,  # 4 Qwen + the adapter
        'bbr_model_requests_total{model="microsoft/Phi-3-mini-4k-instruct"}': 2,
        "bbr_unknown_model_total{}": 1,
        "bbr_invalid_body_total{}": 3,  # truncated JSON, model 42, text/plain
        "bbr_missing_model_total{}": 2,
        "bbr_body_too_large_total{}": 0,
        "bbr_passthrough_total{}": 1,
        "bbr_model_list_total{}": 1,
        "bbr_spoofed_header_removed_total{}": 1,
        "bbr_internal_error_total{}": 0,
    }
    for key, value in expected.items():
        assert m.get(key) == value, f"{key}: {m.get(key)} != {value}\n{m}"
    assert type_of(obs_envoy, "bbr_routed_total") == "counter"
    assert type_of(obs_envoy, "bbr_wasm_memory_bytes") == "gauge"
    assert type_of(obs_envoy, "bbr_body_bytes") == "histogram"
    # No bbr series leaks Envoy's raw namespace or the tag syntax into a name.
    assert not [k for k in m if "wasmcustom" in k or "=.=" in k], m

    # Scanned bytes: every inspected body, counted exactly.
    assert m["bbr_scanned_bytes_total{}"] > 7 * len(prompt)
    assert m["bbr_scan_nanoseconds_total{}"] > 0
    assert m["bbr_wasm_memory_bytes{}"] >= 65536

    # Histograms arrive with the next stats flush (1 s here): one sample per scanned body:
    # 7 routed, unknown, truncated, missing x2, model 42 = 12.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = scrape(obs_envoy)
        if m.get("bbr_body_bytes_count{}") == 12 and m.get("bbr_scan_time_us_count{}") == 12:
            break
        time.sleep(0.5)
    assert m.get("bbr_body_bytes_count{}") == 12, m
    assert m.get("bbr_scan_time_us_count{}") == 12, m
    assert m.get("bbr_body_bytes_sum{}", 0) > 7 * len(prompt)


def test_413_is_counted(obs_envoy):
    before = scrape(obs_envoy).get("bbr_body_too_large_total{}", 0)
    r = obs_envoy.client().post(
        "/v1/completions",
        content=b"{" + b" " * (8 * 1024 * 1024) + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert scrape(obs_envoy).get("bbr_body_too_large_total{}") == before + 1


def test_filter_logs_never_contain_request_content(obs_envoy):
    """Everything above sent MARKER in prompts, in a model name and in broken JSON, with the
    filter logging at trace level: no filter log line may carry it."""
    client = obs_envoy.client()
    post(client, completion_body(f"{MARKER}-model", prompt=MARKER))
    post(client, f'{{"model": "{QWEN}", "prompt": "{MARKER}\\u0000", "x": [1,}}'.encode())
    post(client, completion_body(QWEN, prompt=MARKER), {"x-gateway-base-model-name": MARKER})
    time.sleep(0.5)
    log = obs_envoy.proc.text()
    filter_lines = [line for line in log.splitlines() if "wasm log" in line]
    assert any("routed to base model" in line for line in filter_lines), "trace logging is not on"
    leaks = [line for line in filter_lines if MARKER in line]
    assert not leaks, leaks[:3]
