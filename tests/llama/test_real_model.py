"""bbr-wasm in front of a model server someone else wrote: llama.cpp's llama-server with
SmolLM2-135M-Instruct, two replicas in one pool, next to the two mock-vllm pools.

llama-server answers every request with its alias (the pool's model name) whatever the request
says, so a response's `model` tells which pool served it; the mocks also name themselves in
`x-mock-backend`. Routing is judged by both.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import LORA, PHI, QWEN, SMOL, UPSTREAM_HEADER, integration, smol_work

MOCK_BACKEND = {QWEN: "qwen-a", LORA: "qwen-a", PHI: "phi-a"}


def request_for(model: str, i: int) -> tuple[str, dict]:
    """A small request of alternating kind (completions, chat) for `model`."""
    if i % 2:
        return "/v1/completions", {"model": model, "prompt": f"Count to {i}:", "max_tokens": 4}
    return "/v1/chat/completions", {
        "model": model,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": f"Say the number {i}."}],
    }


def served_by(resp: httpx.Response) -> str:
    """Which pool answered: the mock's id, or 'llama' for a llama-server replica."""
    if "x-mock-backend" in resp.headers:
        return resp.headers["x-mock-backend"]
    return "llama" if resp.headers.get(UPSTREAM_HEADER) else "?"


def check_routed(model: str, resp: httpx.Response) -> list[str]:
    """What is wrong with one answer (nothing: []), judged by the response's own `model`."""
    if resp.status_code != 200:
        return [f"{model}: {resp.status_code} {resp.text[:200]}"]
    got = resp.json().get("model")
    where = served_by(resp)
    want_where = MOCK_BACKEND.get(model, "llama")
    problems = []
    if got != model:
        problems.append(f"{model}: answered as {got!r} by {where}")
    if where != want_where:
        problems.append(f"{model}: served by {where}, not {want_where}")
    return problems


# 48 requests: each of the four models 12 times, interleaved so that consecutive requests go
# to different pools.
MIXED = [m for _ in range(12) for m in (SMOL, QWEN, PHI, LORA)]


@pytest.mark.parametrize("concurrency", [1, 10])
def test_mixed_sequence_reaches_the_right_pool(gateway, replicas, concurrency):
    work_before = [r.work() for r in replicas]
    with httpx.Client(base_url=gateway.url, timeout=120.0) as client:

        def one(i_model):
            i, model = i_model
            path, body = request_for(model, i)
            return model, client.post(path, json=body)

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            answers = list(pool.map(one, enumerate(MIXED)))
    problems = [p for model, resp in answers for p in check_routed(model, resp)]
    assert not problems, f"{len(problems)} of {len(MIXED)} wrong:\n" + "\n".join(problems[:20])
    smol_answers = [resp for model, resp in answers if model == SMOL]
    # Real inference happened: llama-server counted usage and its own timings.
    for resp in smol_answers:
        body = resp.json()
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0, body
        assert body["timings"]["prompt_n"] >= 0, body
    # ... on the replicas of this pool, and only those requests (each moved the decode counter).
    moved = [r.work() - w for r, w in zip(replicas, work_before)]
    assert sum(moved) > 0, moved
    replicas_seen = {resp.headers[UPSTREAM_HEADER] for resp in smol_answers}
    assert replicas_seen <= {f"127.0.0.1:{r.port}" for r in replicas}, replicas_seen
    if concurrency > 1:
        # Least-request spreads a concurrent burst over both replicas.
        assert len(replicas_seen) == 2, replicas_seen


def sse_events(lines) -> tuple[float | None, list[str], float]:
    """Reads an SSE stream: (time of the first data event carrying text, the data payloads,
    time of the end), times from the monotonic clock."""
    first, payloads = None, []
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        payloads.append(payload)
        if first is None and payload != "[DONE]":
            chunk = json.loads(payload)
            choice = (chunk.get("choices") or [{}])[0]
            if (choice.get("delta") or {}).get("content") or choice.get("text"):
                first = time.monotonic()
    return first, payloads, time.monotonic()


STREAM_BODY = {
    "model": SMOL,
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 96,
    # Greedy decoding, and the end-of-sequence token ignored: every stream is 96 tokens long.
    "temperature": 0,
    "ignore_eos": True,
    "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
}


def timed_stream(url: str) -> tuple[float, float, list[str]]:
    """POSTs STREAM_BODY to url: (seconds to the first token, seconds to the end, payloads)."""
    t0 = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=STREAM_BODY, timeout=120.0) as resp:
        assert resp.status_code == 200, resp.read()[:300]
        assert resp.headers["content-type"].startswith("text/event-stream"), dict(resp.headers)
        first, payloads, end = sse_events(resp.iter_lines())
    assert first is not None, payloads[:5]
    return first - t0, end - t0, payloads


def test_stream_first_token_is_not_held_back(gateway, replicas):
    """Through the gateway, the first token arrives when the server sends it: compared, pair by
    pair, with the same request sent straight to a replica, and long before the stream ends."""
    direct_first, via_first, via_total = [], [], []
    for _ in range(3):
        # One replica straight, then the gateway (which may pick either replica: the prompt is
        # the same, so both have it cached after the first pair).
        d_first, _, _ = timed_stream(replicas[0].url)
        v_first, v_total, payloads = timed_stream(gateway.url)
        direct_first.append(d_first)
        via_first.append(v_first)
        via_total.append(v_total)
        assert payloads[-1] == "[DONE]", payloads[-3:]
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all(c["model"] == SMOL for c in chunks)
        usage = [c["usage"] for c in chunks if c.get("usage")]
        assert usage and usage[-1]["completion_tokens"] == 96, usage[-1:]
    d, v, total = statistics.median(direct_first), statistics.median(via_first), statistics.median(via_total)
    print(f"first token: direct {d * 1000:.0f} ms, via gateway {v * 1000:.0f} ms; stream {total * 1000:.0f} ms")
    # Not buffered: a gateway that held the response would deliver the first token at the end.
    assert v < 0.5 * total, (direct_first, via_first, via_total)
    # And not late: within 250 ms of the direct figure (the gateway's own cost is ~1 ms; the
    # margin is for a two-core machine running both).
    assert v <= d + 0.25, (direct_first, via_first)


@pytest.fixture()
def sdk(gateway) -> openai.OpenAI:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120.0)
    yield client
    client.close()


def test_openai_sdk_completion(sdk):
    r = sdk.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.model == SMOL
    assert r.choices[0].text
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_openai_sdk_chat(sdk):
    r = sdk.chat.completions.create(
        model=SMOL, max_tokens=16, messages=[{"role": "user", "content": "What is 2 + 2?"}]
    )
    assert r.model == SMOL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0


def test_openai_sdk_streaming_chat_with_usage(sdk):
    stream = sdk.chat.completions.create(
        model=SMOL,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Name three colours."}],
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert all(c.model == SMOL for c in chunks)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0, chunks[-1]


# GuideLLM 0.8.1's request bodies, as guidellm/backends/openai/request_handlers.py builds them
# (`make bench-llm BACKEND=llama` runs GuideLLM itself; it is too large for make test).
GUIDELLM_BODIES = [
    (
        "/v1/completions",
        {
            "model": SMOL,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 16,
            "stop": None,
            "ignore_eos": True,
            "prompt": "The quick brown fox",
        },
    ),
    (
        "/v1/chat/completions",
        {
            "model": SMOL,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_completion_tokens": 16,
            "stop": None,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "The quick brown fox"}]}],
        },
    ),
]


@pytest.mark.parametrize("path,body", GUIDELLM_BODIES, ids=["completions", "chat"])
def test_guidellm_request_shapes(gateway, path, body):
    with httpx.stream("POST", gateway.url + path, json=body, timeout=120.0) as resp:
        assert resp.status_code == 200, resp.read()[:300]
        _, payloads, _ = sse_events(resp.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["model"] == SMOL for c in chunks)
    # GuideLLM takes token counts from the last usage the server sends: 16 with ignore_eos.
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 16 and usage[-1]["prompt_tokens"] > 0, usage[-1:]


# Errors that llama-server itself produces, sent once straight to a replica and once through
# the gateway: status, content type and body must be the same.
def too_long_prompt() -> dict:
    # ~3 tokens per repetition: well past the 2048-token context of a slot.
    return {"model": SMOL, "prompt": "lighthouse keeper " * 1500, "max_tokens": 4}


SERVER_ERRORS = [
    ("/v1/completions", too_long_prompt, 400),
    # No --embeddings: llama-server answers 501 not_supported_error.
    ("/v1/embeddings", lambda: {"model": SMOL, "input": "hello"}, 501),
]


@pytest.mark.parametrize("path,make_body,status", SERVER_ERRORS, ids=["context-exceeded", "embeddings-off"])
def test_server_errors_pass_through_unchanged(gateway, replicas, path, make_body, status):
    body = make_body()
    direct = httpx.post(replicas[0].url + path, json=body, timeout=120.0)
    via = httpx.post(gateway.url + path, json=body, timeout=120.0)
    assert direct.status_code == status, direct.text[:300]
    assert via.status_code == direct.status_code, via.text[:300]
    assert via.headers["content-type"] == direct.headers["content-type"]
    assert via.json() == direct.json(), (via.text[:300], direct.text[:300])
    assert "error" in via.json()


# Requests the gateway refuses. llama-server ignores `model`, so each of these WOULD be served
# if it got through (each carries a valid prompt): the replicas' decode counter would move.
REFUSED = [
    ("duplicate-model", b'{"model": "' + SMOL.encode() + b'", "model": "' + SMOL.encode() + b'", "prompt": "Hi"}', 400),
    ("model-not-a-string", b'{"model": 42, "prompt": "Hi", "max_tokens": 2}', 400),
    ("unknown-model-forged-header", b'{"model": "gpt-4o", "prompt": "Hi", "max_tokens": 2}', 404),
    ("broken-json-after-model", b'{"model": "' + SMOL.encode() + b'", "prompt": "Hi" "max_tokens": 2}', 400),
    ("body-too-large", b'{"model": "' + SMOL.encode() + b'", "prompt": "' + b"a" * (8 << 20) + b'"}', 413),
]


def test_refused_input_never_reaches_the_server(gateway, replicas):
    headers = {
        "content-type": "application/json",
        # A client trying to pick the real model's pool itself.
        "x-gateway-base-model-name": SMOL,
        "x-gateway-model-name": SMOL,
    }
    before = smol_work(replicas)
    with httpx.Client(base_url=gateway.url, timeout=60.0) as client:
        for name, raw, status in REFUSED:
            resp = client.post("/v1/completions", content=raw, headers=headers)
            assert resp.status_code == status, (name, resp.status_code, resp.text[:300])
            assert resp.json()["error"]["code"], (name, resp.text[:300])
            assert UPSTREAM_HEADER not in resp.headers, (name, dict(resp.headers))
        after_refused = smol_work(replicas)
        # The control: the same client and headers with a valid body do reach the server,
        # and move the counter the test watches.
        ok = client.post("/v1/completions", json={"model": SMOL, "prompt": "Hi", "max_tokens": 2}, headers=headers)
        assert ok.status_code == 200, ok.text[:300]
    assert after_refused == before, f"refused requests reached llama-server: n_decode_total {before} -> {after_refused}"
    assert smol_work(replicas) > after_refused


def test_models_list_names_the_real_model(gateway):
    """The filter's own /v1/models lists the SmolLM2 pool next to the others."""
    ids = [m["id"] for m in httpx.get(gateway.url + "/v1/models", timeout=10.0).json()["data"]]
    assert SMOL in ids and QWEN in ids and PHI in ids, ids


def test_replica_down_keeps_the_pool_serving(gateway, replicas, llama_server, session_dir):
    """One replica killed: its in-flight requests aside, the pool keeps answering from the other
    (connect failures are retried by health checks and outlier detection, not by the client).
    Runs last in this module: it restarts the replica it killed."""
    from conftest import start_replica

    victim = replicas[1]
    victim_addr = f"127.0.0.1:{victim.port}"
    victim.proc.kill()
    answers = []
    with httpx.Client(base_url=gateway.url, timeout=60.0) as client:
        for i in range(12):
            answers.append(client.post("/v1/completions", json={"model": SMOL, "prompt": f"Hi {i}", "max_tokens": 2}))
    codes = [r.status_code for r in answers]
    # Envoy notices a dead host at its first connect failure (outlier detection: 3 gateway
    # failures eject it); until then a request may get 503 no_healthy_upstream.
    failures = [r for r in answers if r.status_code != 200]
    assert len(failures) <= 3, codes
    for r in failures:
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_upstream", r.text[:300]
    assert all(r.headers[UPSTREAM_HEADER] != victim_addr for r in answers if r.status_code == 200)
    # Bring it back on the same port so later modules see two replicas again.
    port = victim.port
    replacement = start_replica(llama_server, session_dir, "smollm-1b", port=port)
    replicas[1] = replacement
