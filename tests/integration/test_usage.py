"""Token usage and latency, read from responses as they stream past (`core::usage`,
`src/filter/response.rs`), in a real Envoy.

- mock-vllm (Qwen and its adapter): chat and completions, streamed and not, with and without
  `include_usage`: the counters move by exactly the usage the client received, the TTFT
  histogram by one sample per answer with content, the adapter's tokens count under the base
  model and under the adapter.
- A scripted upstream (fault_upstream.py) in the Phi pool: a response split at every byte,
  usage first or absent, broken JSON, an SSE stream cut mid-event, gzip, 100 MB. Each reaches
  the client byte for byte as sent, without a stall, and is counted as specified.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from conftest import LORA, PHI, QWEN, wasm_failure_lines, wasm_vm_stats

import fault_upstream


@pytest.fixture(scope="module")
def usage_envoy(envoy_factory, backends, upstream):
    def mutate(cfg):
        # Histograms reach the admin endpoint at each stats flush (default 5 s).
        cfg["stats_flush_interval"] = "1s"

    return envoy_factory({"qwen-vllm": backends.qwen.port, "phi-vllm": upstream.port}, mutate=mutate, name="usage")


def scrape(env) -> dict[str, float]:
    text = httpx.get(f"{env.admin_url}/stats/prometheus", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("bbr_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def tokens(m: dict, model: str, kind: str, series: str = "bbr_tokens_total") -> float:
    return m.get(f'{series}{{model="{model}",type="{kind}"}}', 0.0)


def outcome(m: dict, name: str) -> float:
    return m.get(f'bbr_usage_responses_total{{outcome="{name}"}}', 0.0)


def ttft_count(m: dict, model: str) -> float:
    return m.get(f'bbr_time_to_first_token_ms_count{{model="{model}"}}', 0.0)


def wait_for(env, check, timeout: float = 15.0) -> dict:
    """Scrapes until check(scrape) holds (histograms arrive with the 1 s flush)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(env)
        if check(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.3)


def client_usage(path: str, body: dict, client: httpx.Client) -> dict | None:
    """Sends one request; returns the usage the client received (None if it got none)."""
    if not body.get("stream"):
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text[:300]
        return r.json().get("usage")
    usage = None
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
    return usage


SHAPES = [
    (path, stream, include)
    for path in ("/v1/chat/completions", "/v1/completions")
    for stream, include in ((False, None), (True, True), (True, False), (True, None))
]


@pytest.mark.parametrize("path,stream,include_usage", SHAPES)
@pytest.mark.parametrize("model", [QWEN, LORA])
def test_counters_move_by_the_usage_the_client_received(usage_envoy, path, stream, include_usage, model):
    client = usage_envoy.client()
    body = {"model": model, "max_tokens": 5}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "one two three four"}]
    else:
        body["prompt"] = "one two three"
    if stream:
        body["stream"] = True
        if include_usage is not None:
            body["stream_options"] = {"include_usage": include_usage}
    before = wait_for(usage_envoy, lambda m: True)
    got = client_usage(path, body, client)
    expect_usage = not stream or include_usage is True
    assert (got is not None) == expect_usage, got
    want_outcome = "counted" if expect_usage else "absent"
    after = wait_for(
        usage_envoy,
        lambda m: outcome(m, want_outcome) == outcome(before, want_outcome) + 1
        and ttft_count(m, QWEN) == ttft_count(before, QWEN) + 1,
    )
    assert outcome(after, want_outcome) == outcome(before, want_outcome) + 1, after
    for name in ("counted", "absent", "malformed", "truncated", "encoded", "too_large"):
        if name != want_outcome:
            assert outcome(after, name) == outcome(before, name), name
    inp, out = (got["prompt_tokens"], got["completion_tokens"]) if got else (0, 0)
    assert tokens(after, QWEN, "input") - tokens(before, QWEN, "input") == inp
    assert tokens(after, QWEN, "output") - tokens(before, QWEN, "output") == out
    adapter = "bbr_adapter_tokens_total"
    if model == LORA:
        assert tokens(after, LORA, "input", adapter) - tokens(before, LORA, "input", adapter) == inp
        assert tokens(after, LORA, "output", adapter) - tokens(before, LORA, "output", adapter) == out
    # One first-token sample per answer with content.
    assert ttft_count(after, QWEN) == ttft_count(before, QWEN) + 1
    if stream and expect_usage:
        tpot = 'bbr_time_per_output_token_ms_count{model="Qwen/Qwen2.5-3B-Instruct"}'
        after = wait_for(usage_envoy, lambda m: m.get(tpot, 0) == before.get(tpot, 0) + 1)
        assert after.get(tpot, 0) == before.get(tpot, 0) + 1


# (script, outcome, tokens counted: (input, output, cached) or None)
FAULTS = [
    ("split-json", "counted", (11, 7, 5)),
    ("split-sse", "counted", (11, 7, 5)),
    ("usage-first", "counted", (11, 7, 5)),
    ("usage-absent", "absent", None),
    ("sse-usage-absent", "absent", None),
    ("broken-json", "malformed", None),
    ("sse-cut", "truncated", None),
    ("gzip", "encoded", None),
    ("huge", "too_large", None),
]


@pytest.mark.parametrize("script,want,counts", FAULTS, ids=[f[0] for f in FAULTS])
def test_scripted_responses_pass_untouched_and_are_counted(usage_envoy, script, want, counts):
    client = usage_envoy.client(timeout=60.0)
    vm_before = wasm_vm_stats(usage_envoy)
    before = wait_for(usage_envoy, lambda m: True)
    sent = fault_upstream.body_of(script)
    body = {"model": PHI, "prompt": "hello", "max_tokens": 5}
    received = bytearray()
    t0 = time.monotonic()
    try:
        with client.stream("POST", "/v1/completions", json=body, headers={"x-fault": script}) as r:
            assert r.status_code == 200
            for part in r.iter_raw():
                received.extend(part)
    except httpx.RemoteProtocolError:
        # The cut stream: Envoy resets the client's stream too.
        assert script == "sse-cut"
    elapsed = time.monotonic() - t0
    if script == "sse-cut":
        assert bytes(received) == sent[: len(received)] and len(received) > 0
    else:
        # Untouched: exactly the bytes the upstream sent (gzip still compressed).
        assert bytes(received) == sent, (len(received), len(sent))
    assert elapsed < 30, f"{script}: {elapsed:.1f} s"
    after = wait_for(usage_envoy, lambda m: outcome(m, want) == outcome(before, want) + 1)
    assert outcome(after, want) == outcome(before, want) + 1, (script, after)
    inp, out, cached = counts or (0, 0, 0)
    assert tokens(after, PHI, "input") - tokens(before, PHI, "input") == inp
    assert tokens(after, PHI, "output") - tokens(before, PHI, "output") == out
    assert tokens(after, PHI, "cached_input") - tokens(before, PHI, "cached_input") == cached
    assert wasm_vm_stats(usage_envoy) == vm_before
    assert not wasm_failure_lines(usage_envoy)
    # Memory stays flat in the response size: the 100 MB answer was read a chunk at a time.
    assert after["bbr_wasm_memory_bytes{}"] < 8 * 1024 * 1024, after["bbr_wasm_memory_bytes{}"]


def access_log_line(env, request_id: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        line = next((l for l in env.proc.text().splitlines() if f" id={request_id}" in l), None)
        if line or time.monotonic() > deadline:
            assert line, f"no access log line for {request_id}"
            return line
        time.sleep(0.2)


# (request id, fault script or None for mock-vllm, what the access log's usage field holds:
# a regex, "{p}" and "{c}" standing for the usage the client received)
ACCESS_LOG = [
    ("usage-log-counted", None, r"prompt_tokens={p} completion_tokens={c} ttft_ms=\d+"),
    # Read, no usage: only the time to the first byte is known.
    ("usage-log-absent", "usage-absent", r"ttft_ms=\d+"),
    ("usage-log-sse-absent", "sse-usage-absent", r"ttft_ms=\d+"),
    # Not read at all (gzip): nothing is known, nothing is set, Envoy prints "-".
    ("usage-log-encoded", "gzip", r"-"),
]


@pytest.mark.parametrize("request_id,script,want", ACCESS_LOG, ids=[a[0] for a in ACCESS_LOG])
def test_access_log_has_tokens_and_ttft(usage_envoy, request_id, script, want):
    """The shipped access log's one filter-state field (`wasm.bbr_usage`), between
    `duration_ms=` and `id=`: the fields known, in order, or `-`."""
    client = usage_envoy.client()
    if script is None:
        body = {"model": QWEN, "prompt": "alpha beta gamma", "max_tokens": 6}
        headers = {"x-request-id": request_id}
    else:
        body = {"model": PHI, "prompt": "hello", "max_tokens": 5}
        headers = {"x-request-id": request_id, "x-fault": script}
    r = client.post("/v1/completions", json=body, headers=headers)
    assert r.status_code == 200
    if script is None:
        usage = r.json()["usage"]
        want = want.format(p=usage["prompt_tokens"], c=usage["completion_tokens"])
    line = access_log_line(usage_envoy, request_id)
    m = re.search(rf" duration_ms=\d+ (.*) id={re.escape(request_id)}", line)
    assert m and re.fullmatch(want, m.group(1)), line
