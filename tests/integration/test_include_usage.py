"""Asking for a stream's usage when the client did not (`usage.addIncludeUsage`,
`core::usage::include`), in a real Envoy.

- mock-vllm (Qwen and its adapter): a routed completions stream without `stream_options` comes
  back with the usage chunk (empty `choices`, then `[DONE]`), and the counters move by exactly
  that usage; a request that said anything about `stream_options`, or did not stream, is left
  as it was.
- The echo script of fault_upstream.py (the Phi pool): what reaches the server is byte for byte
  the client's body with `{` replaced by `{"stream_options":{"include_usage":true},`, its
  `content-length` corrected, whether the body came whole, chunked, or large enough to arrive
  in many reads; an untouched body arrives as it was sent.
"""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import LORA, PHI, QWEN, filter_config_with, set_filter_config, wasm_failure_lines, wasm_vm_stats

from test_usage import outcome, tokens, wait_for

OPENING = b'{"stream_options":{"include_usage":true},'
ADDED = "bbr_usage_include_added_total{}"


@pytest.fixture(scope="module")
def asking_envoy(envoy_factory, backends, upstream):
    def mutate(cfg):
        cfg["stats_flush_interval"] = "1s"
        set_filter_config(cfg, filter_config_with(usage={"addIncludeUsage": True}))

    return envoy_factory({"qwen-vllm": backends.qwen.port, "phi-vllm": upstream.port}, mutate=mutate,
                         name="include-usage")


def stream_events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """The stream's JSON events, in order; `[DONE]` must end it."""
    events, done = [], False
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()[:300]
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            assert not done, "an event after [DONE]"
            if line == "data: [DONE]":
                done = True
            else:
                events.append(json.loads(line[6:]))
    assert done
    return events


def request_body(path: str, model: str, **extra) -> dict:
    body = {"model": model, "max_tokens": 5, **extra}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "one two three four"}]
    else:
        body["prompt"] = "one two three"
    return body


PATHS = ("/v1/chat/completions", "/v1/completions")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("model", [QWEN, LORA])
def test_a_stream_that_did_not_ask_gets_its_usage_counted(asking_envoy, path, model):
    client = asking_envoy.client()
    before = wait_for(asking_envoy, lambda m: True)
    events = stream_events(client, path, request_body(path, model, stream=True))
    # What a client that asked receives: the last event holds the usage and no choices.
    usage = events[-1].get("usage")
    assert usage and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0, events[-1]
    assert events[-1]["choices"] == []
    assert all(e.get("usage") is None for e in events[:-1])
    after = wait_for(asking_envoy, lambda m: outcome(m, "counted") == outcome(before, "counted") + 1)
    assert outcome(after, "counted") == outcome(before, "counted") + 1
    assert after.get(ADDED, 0) == before.get(ADDED, 0) + 1
    assert tokens(after, QWEN, "input") - tokens(before, QWEN, "input") == usage["prompt_tokens"]
    assert tokens(after, QWEN, "output") - tokens(before, QWEN, "output") == usage["completion_tokens"]
    if model == LORA:
        series = "bbr_adapter_tokens_total"
        assert tokens(after, LORA, "output", series) - tokens(before, LORA, "output", series) == usage["completion_tokens"]


# (name, extra body fields, whether the client receives usage): each left as the client sent it.
UNTOUCHED = [
    ("include_usage false", {"stream": True, "stream_options": {"include_usage": False}}, False),
    ("stream_options null", {"stream": True, "stream_options": None}, False),
    ("include_usage true", {"stream": True, "stream_options": {"include_usage": True}}, True),
    ("stream false", {"stream": False}, True),
    ("no stream", {}, True),
]


@pytest.mark.parametrize("name,extra,gets_usage", UNTOUCHED, ids=[u[0] for u in UNTOUCHED])
def test_a_request_that_said_what_it_wants_is_left_alone(asking_envoy, name, extra, gets_usage):
    client = asking_envoy.client()
    before = wait_for(asking_envoy, lambda m: True)
    path = "/v1/chat/completions"
    body = request_body(path, QWEN, **extra)
    if body.get("stream"):
        events = stream_events(client, path, body)
        got = [e["usage"] for e in events if e.get("usage")]
        assert bool(got) == gets_usage, events[-2:]
    else:
        r = client.post(path, json=body)
        assert r.status_code == 200 and ("usage" in r.json()) == gets_usage
    want = "counted" if gets_usage else "absent"
    after = wait_for(asking_envoy, lambda m: outcome(m, want) == outcome(before, want) + 1)
    assert outcome(after, want) == outcome(before, want) + 1
    assert after.get(ADDED, 0) == before.get(ADDED, 0)


def echo(client: httpx.Client, path: str, content, headers: dict | None = None) -> dict:
    r = client.post(path, content=content, headers={"content-type": "application/json", "x-fault": "echo-request",
                                                     **(headers or {})})
    assert r.status_code == 200, r.text[:300]
    return r.json()


def edited(raw: bytes) -> bytes:
    """The body the server must receive: the top-level `{` (and the whitespace before it)
    replaced, nothing else changed."""
    start = raw.index(b"{")
    return OPENING + raw[start + 1:]


BIG_PROMPT = "lorem ipsum " * 30_000  # 360 KB: Envoy delivers it in many reads


def test_the_server_receives_the_body_with_one_member_added(asking_envoy):
    client = asking_envoy.client(timeout=30.0)
    vm_before = wasm_vm_stats(asking_envoy)
    pretty = json.dumps({"model": PHI, "prompt": "hi", "stream": True, "max_tokens": 3}, indent=2)
    cases = {
        "compact": json.dumps({"model": PHI, "prompt": "hi", "stream": True}).encode(),
        "whitespace before the object": b" \r\n\t" + pretty.encode(),
        "stream first, unicode": json.dumps({"stream": True, "prompt": "h\u00e9llo \U0001F600", "model": PHI},
                                             ensure_ascii=False).encode(),
        "large": json.dumps({"model": PHI, "stream": True, "prompt": BIG_PROMPT}).encode(),
    }
    for name, raw in cases.items():
        for how in ("content-length", "chunked"):
            content = raw if how == "content-length" else (raw[i:i + 1000] for i in range(0, len(raw), 1000))
            got = echo(client, "/v1/completions", content)
            body = got["body"].encode("latin-1")
            assert body == edited(raw), (name, how, body[:120])
            if how == "content-length":
                assert got["headers"].get("content-length") == str(len(edited(raw))), (name, got["headers"])
            else:
                assert "content-length" not in got["headers"], (name, got["headers"])
            parsed = json.loads(body)
            assert parsed["stream_options"] == {"include_usage": True}
            assert {k: v for k, v in parsed.items() if k != "stream_options"} == json.loads(raw)
    assert wasm_vm_stats(asking_envoy) == vm_before
    assert not wasm_failure_lines(asking_envoy)


def test_other_bodies_reach_the_server_as_sent(asking_envoy):
    client = asking_envoy.client()
    untouched = [
        ("/v1/completions", {"model": PHI, "prompt": "hi", "stream": True, "stream_options": {}}),
        ("/v1/completions", {"model": PHI, "prompt": "hi", "stream": "true"}),
        ("/v1/completions", {"model": PHI, "prompt": "hi", "x": {"stream": True}}),
        ("/v1/embeddings", {"model": PHI, "input": "hi", "stream": True}),
    ]
    for path, body in untouched:
        raw = json.dumps(body).encode()
        got = echo(client, path, raw)
        assert got["body"].encode("latin-1") == raw, (path, body)
        assert got["headers"].get("content-length") == str(len(raw))


def test_the_openai_sdk_reads_the_added_usage_chunk(asking_envoy):
    """What an OpenAI SDK client that did not ask gets: its stream iterates as before, and ends
    with one chunk without choices that carries the usage."""
    import openai

    client = openai.OpenAI(base_url=asking_envoy.url + "/v1", api_key="unused", max_retries=0, timeout=30.0)
    stream = client.chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "one two three"}], max_tokens=5, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text, chunks
    assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
    assert chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
