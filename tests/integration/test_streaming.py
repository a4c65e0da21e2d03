"""Responses are not buffered: SSE chunks reach the client as the backend produces them.

The backend here emits one token every 300 ms (mock-vllm --itl-ms 300); the first chunk must
arrive through Envoy long before the stream ends.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import PHI, QWEN, QWEN_ID, chat_body, completion_body

ITL_MS = 300
TOKENS = 8


@pytest.fixture(scope="module")
def slow_envoy(envoy_factory, mock_factory, backends):
    slow_qwen = mock_factory(QWEN, QWEN_ID, extra=("--itl-ms", str(ITL_MS)))
    env = envoy_factory({"qwen-vllm": slow_qwen.port, "phi-vllm": backends.phi.port}, name="streaming")
    return env


def _stream(client, path, body):
    """Returns (status, headers, [(t_since_send, data_line)], total_seconds)."""
    events = []
    t0 = time.monotonic()
    with client.stream("POST", path, json=body) as r:
        status, headers = r.status_code, r.headers
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append((time.monotonic() - t0, line[len("data:") :].strip()))
    return status, headers, events, time.monotonic() - t0


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_sse_chunks_arrive_incrementally(slow_envoy, path, http2):
    client = slow_envoy.client(http2=http2, timeout=30.0)
    make = chat_body if path == "/v1/chat/completions" else completion_body
    body = make(QWEN, stream=True, max_tokens=TOKENS)
    status, headers, events, total = _stream(client, path, body)

    assert status == 200
    assert headers["content-type"].startswith("text/event-stream"), headers
    assert headers["x-mock-backend"] == QWEN_ID
    assert headers["x-echo-base-model-name"] == QWEN
    assert events, "no SSE events"
    assert events[-1][1] == "[DONE]", events[-3:]

    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["model"] == QWEN for c in chunks), chunks
    want_object = "chat.completion.chunk" if "chat" in path else "text_completion"
    assert all(c["object"] == want_object for c in chunks), chunks

    # The backend needs (TOKENS - 1) * ITL to finish; the stream must really take that long,
    # and its first chunk must not wait for the end.
    min_total = (TOKENS - 1) * ITL_MS / 1000 * 0.8
    assert total >= min_total, f"stream took {total:.2f}s; the backend delay did not apply"
    first = events[0][0]
    assert first < total / 2, f"first chunk after {first:.2f}s of {total:.2f}s: buffered?"
    # Chunks are spread over time, not delivered in one burst at the end.
    arrival = [t for t, _ in events]
    assert arrival[len(arrival) // 2] - first > (TOKENS // 2 - 1) * ITL_MS / 1000 * 0.5, arrival


def test_non_streaming_model_still_fast(slow_envoy):
    """The other model's backend (no delay) is unaffected by a slow stream next to it."""
    client = slow_envoy.client()
    t0 = time.monotonic()
    r = client.post("/v1/completions", json=completion_body(PHI))
    assert r.status_code == 200
    assert time.monotonic() - t0 < 2.0
