"""LoRA adapters route to their base model's pool, and keep their own name upstream."""

from __future__ import annotations

import pytest
from conftest import LORA, QWEN, assert_routed, chat_body, completion_body, totals


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_adapter_routes_to_base_pool(envoy, backends, path, http2):
    client = envoy.client(http2=http2)
    before_qwen = backends.qwen.stats()
    before_phi = backends.phi.stats()
    body = completion_body(LORA) if path == "/v1/completions" else chat_body(LORA)
    r = client.post(path, json=body)
    assert_routed(r, LORA)
    assert r.headers["x-mock-backend"] == backends.qwen.id
    assert r.headers["x-echo-model-name"] == LORA
    assert r.headers["x-echo-base-model-name"] == QWEN
    assert r.json()["model"] == LORA

    after_qwen = backends.qwen.stats()
    assert after_qwen["total"] == before_qwen["total"] + 1
    assert after_qwen["by_model"].get(LORA, 0) == before_qwen["by_model"].get(LORA, 0) + 1
    assert backends.phi.stats()["total"] == before_phi["total"]


def test_adapter_and_base_interleaved(envoy, backends):
    client = envoy.client()
    before = totals(backends)
    for i in range(20):
        model = LORA if i % 2 else QWEN
        assert_routed(client.post("/v1/completions", json=completion_body(model)), model)
    after = totals(backends)
    assert after[backends.qwen.id] == before[backends.qwen.id] + 20
    assert after[backends.phi.id] == before[backends.phi.id]
