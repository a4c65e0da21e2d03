"""The seed's validation, through Envoy and the filter: every model reaches its own backend.

10 sequential requests per model to /v1/completions, then 200 mixed requests (both base
models and the adapter, completions and chat) at concurrency 10, over HTTP/1.1 and over
HTTP/2 (h2c, prior knowledge). Each response must come from the right backend with the
right routing headers, and the backends' own counters must match what was sent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter

import pytest
from conftest import (
    BACKEND_OF,
    LORA,
    PHI,
    QWEN,
    assert_routed,
    chat_body,
    completion_body,
)

MODELS = [QWEN, PHI, LORA]


def _snapshot(backends):
    return backends.stats()


def _delta(before, after):
    """Per backend: (total delta, Counter of by_model deltas)."""
    out = {}
    for bid in after:
        total = after[bid]["total"] - before[bid]["total"]
        by_model = Counter(after[bid].get("by_model", {}))
        by_model.subtract(before[bid].get("by_model", {}))
        out[bid] = (total, +by_model)
    return out


def _expected(sent: list[str]):
    out = {}
    for bid in set(BACKEND_OF.values()):
        models = Counter(m for m in sent if BACKEND_OF[m] == bid)
        out[bid] = (sum(models.values()), models)
    return out


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_ten_per_model_then_two_hundred_mixed(envoy, backends, http2):
    client = envoy.client(http2=http2)
    before = _snapshot(backends)
    sent: list[str] = []

    # 1. The seed's smoke test: 10 completions per base model (and the adapter).
    for model in MODELS:
        for _ in range(10):
            r = client.post("/v1/completions", json=completion_body(model))
            assert_routed(r, model)
            assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            sent.append(model)

    # 2. 200 mixed requests at concurrency 10: completions and chat, all three names.
    plan = list(itertools.islice(itertools.cycle(MODELS), 200))
    paths = itertools.cycle(["/v1/completions", "/v1/chat/completions"])
    jobs = [(m, next(paths)) for m in plan]

    # Ten at a time from one asyncio client: over HTTP/2, ten streams on one connection. Not ten
    # threads on one sync client: httpcore 1.0.9's sync HTTP/2 connection can leave a thread
    # reading the socket for a response another thread already took (seen here: every stream
    # Envoy received answered 2xx, nothing unsent or unread on either side of the socket,
    # ten threads blocked in httpcore's read), which is the client's race, not the gateway's.
    async def mixed() -> list[str]:
        limit = asyncio.Semaphore(10)
        async with envoy.async_client(http2=http2) as aclient:

            async def one(job):
                model, path = job
                body = completion_body(model) if path == "/v1/completions" else chat_body(model)
                async with limit:
                    r = await aclient.post(path, content=json.dumps(body),
                                           headers={"content-type": "application/json"})
                assert_routed(r, model)
                return model

            return list(await asyncio.gather(*(one(job) for job in jobs)))

    done = asyncio.run(asyncio.wait_for(mixed(), timeout=120))
    assert len(done) == 200
    sent.extend(done)

    after = _snapshot(backends)
    assert _delta(before, after) == _expected(sent)


def test_request_shapes_accepted(envoy, backends):
    """Headers and bodies a client may legitimately send are routed too."""
    client = envoy.client()
    C = "/v1/completions"
    cases = [
        (C, {"content-type": "application/json; charset=utf-8"}, json.dumps(completion_body(QWEN)), QWEN),
        (C, {"content-type": "Application/JSON"}, json.dumps(completion_body(PHI)), PHI),
        (C, {}, json.dumps(completion_body(PHI)), PHI),  # no content-type: inspected like JSON
        (
            C,
            {"content-type": "application/json", "content-encoding": "identity"},
            json.dumps(completion_body(QWEN)),
            QWEN,
        ),
        # Escaped spellings of the same name route like the plain one.
        (C, {"content-type": "application/json"}, '{"model": "Qwen\\/Qwen2.5-3B-Instruct", "prompt": "x"}', QWEN),
        (C, {"content-type": "application/json"}, '{"model": "\\u0051wen/Qwen2.5-3B-Instruct", "prompt": "x"}', QWEN),
        # Whitespace everywhere, model last, nested "model" keys that must be ignored.
        (
            "/v1/chat/completions",
            {"content-type": "application/json"},
            '\n {\n "messages" : [ {"model": "nope", "role": "user", "content": "hi"} ] ,\n'
            ' "x": {"model": "also-nope"}, "model"\t:\r\n "microsoft/Phi-3-mini-4k-instruct" }\n',
            PHI,
        ),
    ]
    for path, headers, body, want_base in cases:
        r = client.post(path, content=body.encode(), headers=headers)
        assert r.status_code == 200, (headers, body, r.status_code, r.text)
        assert r.headers["x-mock-backend"] == BACKEND_OF[want_base], (headers, body)
        assert r.headers["x-echo-base-model-name"] == want_base, (headers, body)
