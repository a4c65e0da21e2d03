"""Model discovery against vLLM itself: the gateway learns SmolLM2 and its adapters from vLLM's
own /v1/models, and an adapter loaded or unloaded with vLLM's own /v1/load_lora_adapter and
/v1/unload_lora_adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) is routed, then refused,
with no configuration change. The mocks keep their static entries beside it.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import httpx
import pytest

from conftest import ADAPTERS, PHI, QWEN, RUNTIME_ADAPTER, SMOL, UPSTREAM_HEADER, vllm_pool, with_vllm_pool

INTERVAL_MS = 1000
# The filter's jitter: up to a tenth of the interval on top of it; its timer ticks at a tenth
# of the interval (at least 50 ms). SLACK covers the poll's round trip (vLLM answers
# /v1/models in a few ms) and a busy two-core machine running vLLM.
JITTER_MS = INTERVAL_MS // 10
TICK_MS = max(50, INTERVAL_MS // 10)
SLACK_S = 1.5
ABSENT_POLLS = 2
BODY = {"prompt": "Hi", "max_tokens": 2}


def wait_until(what: str, check: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout:.1f}s")
        time.sleep(step)


def complete(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/completions", content=json.dumps({"model": model, **BODY}).encode(),
                       headers={"content-type": "application/json"})


def reaches_vllm(client: httpx.Client, model: str) -> bool:
    """Whether the gateway routes `model` to vLLM, without waiting for an inference: the body
    asks for max_tokens -1, which the filter does not judge and vLLM refuses at once (400)."""
    r = client.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": -1})
    return UPSTREAM_HEADER in r.headers


def listed(client: httpx.Client) -> list[tuple[str, str | None]]:
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    return [(m["id"], m.get("parent")) for m in r.json()["data"]]


@pytest.fixture(scope="module")
def discovery(envoy_factory, backends, vllm):
    """The gateway with the mocks' static models and the vLLM pool as `pools` only; vLLM
    without the run-time adapter (unloaded first if an earlier run left it)."""
    if any(name == RUNTIME_ADAPTER for name, _ in vllm.models()):
        assert vllm.unload_adapter(RUNTIME_ADAPTER).status_code == 200
    env = envoy_factory(
        {"qwen-vllm": backends.qwen.port, "phi-vllm": backends.phi.port},
        mutate=with_vllm_pool(
            [vllm.port],
            discovery={"intervalMs": INTERVAL_MS, "timeoutMs": 2000},
            absentPollsBeforeRemoval=ABSENT_POLLS,
        ),
        name="vllm-discovery",
    )
    c = env.client()
    wait_until("vLLM's models discovered", lambda: any(m == SMOL for m, _ in listed(c)), timeout=15)
    yield env, vllm
    if any(name == RUNTIME_ADAPTER for name, _ in vllm.models()):
        vllm.unload_adapter(RUNTIME_ADAPTER)


def test_discovered_from_vllm_models(discovery):
    """What vLLM lists (base model, adapters with `parent`) is what the gateway lists and
    routes, after the static models."""
    env, vllm = discovery
    c = env.client()
    assert sorted(vllm.models()) == sorted([(SMOL, None)] + [(a, SMOL) for a in ADAPTERS])
    got = listed(c)
    assert got[-3:] == [(SMOL, None)] + [(a, SMOL) for a in sorted(ADAPTERS)], got
    assert (QWEN, None) in got and (PHI, None) in got
    for model in (SMOL, *ADAPTERS):
        r = complete(c, model)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["model"] == model
        assert r.headers[UPSTREAM_HEADER] == f"127.0.0.1:{vllm.port}"


def test_runtime_adapter_routed_then_refused(discovery):
    """Loaded with vLLM's /v1/load_lora_adapter: routed within one interval plus jitter, and
    listed with its parent. Unloaded: the gateway's own 404 model_not_found after the
    configured absent polls, vLLM's 404 before that."""
    env, vllm = discovery
    c = env.client()
    r = complete(c, RUNTIME_ADAPTER)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text[:300]
    assert UPSTREAM_HEADER not in r.headers

    load = vllm.load_adapter(RUNTIME_ADAPTER)
    loaded_at = time.monotonic()
    assert load.status_code == 200, load.text[:300]
    print(f"load_lora_adapter: {load.status_code} {load.headers.get('content-type')} {load.text[:100]!r}")
    assert (RUNTIME_ADAPTER, SMOL) in vllm.models()
    took = wait_until(
        "the loaded adapter routes",
        lambda: reaches_vllm(c, RUNTIME_ADAPTER),
        timeout=(INTERVAL_MS + JITTER_MS + TICK_MS) / 1000 + SLACK_S,
        step=0.02,
    )
    print(f"adapter routed {took:.2f} s after the load (interval {INTERVAL_MS} ms)")
    r = complete(c, RUNTIME_ADAPTER)
    assert r.json()["model"] == RUNTIME_ADAPTER and r.headers[UPSTREAM_HEADER] == f"127.0.0.1:{vllm.port}"
    assert (RUNTIME_ADAPTER, SMOL) in listed(c)
    assert time.monotonic() - loaded_at < 30

    unload = vllm.unload_adapter(RUNTIME_ADAPTER)
    unloaded_at = time.monotonic()
    assert unload.status_code == 200, unload.text[:300]
    # Right after the unload the gateway still routes it (one absent poll does not remove it),
    # and vLLM itself refuses: its own 404 comes back unchanged.
    r = complete(c, RUNTIME_ADAPTER)
    assert r.status_code == 404 and r.headers.get(UPSTREAM_HEADER) == f"127.0.0.1:{vllm.port}", r.text[:300]
    direct = httpx.post(vllm.url + "/v1/completions", json={"model": RUNTIME_ADAPTER, **BODY}, timeout=30)
    assert r.json() == direct.json(), (r.text[:300], direct.text[:300])

    def gateway_404() -> bool:
        return not reaches_vllm(c, RUNTIME_ADAPTER)

    wait_until(
        "the gateway's own 404",
        gateway_404,
        timeout=ABSENT_POLLS * (INTERVAL_MS + JITTER_MS + TICK_MS) / 1000 + SLACK_S,
        step=0.02,
    )
    took = time.monotonic() - unloaded_at
    print(f"gateway 404 {took:.2f} s after the unload ({ABSENT_POLLS} absent polls of {INTERVAL_MS} ms)")
    assert took >= (ABSENT_POLLS - 1) * INTERVAL_MS / 1000 * 0.9, took
    r = complete(c, RUNTIME_ADAPTER)
    err = r.json()["error"]
    assert (r.status_code, err["code"], err["type"], err["param"]) == (404, "model_not_found", "invalid_request_error", "model"), r.text
    assert RUNTIME_ADAPTER not in [m for m, _ in listed(c)]


def test_bad_adapter_path_is_vllms_404(discovery):
    """vLLM's answer to an adapter that cannot be loaded (for the docs: its shape), and the
    gateway learns nothing from it."""
    env, vllm = discovery
    r = httpx.post(
        vllm.url + "/v1/load_lora_adapter",
        json={"lora_name": "no-such-adapter", "lora_path": str(vllm_pool.ADAPTERS_DIR / "no-such-adapter")},
        timeout=60.0,
    )
    print(f"bad path: {r.status_code} {r.text[:300]}")
    assert r.status_code in (400, 404), r.text[:300]
    assert "error" in r.json()
    time.sleep((INTERVAL_MS + JITTER_MS) / 1000 * 1.5)
    assert "no-such-adapter" not in [m for m, _ in listed(env.client())]
