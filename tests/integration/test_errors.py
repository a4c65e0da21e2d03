"""Every error row of docs/CONTRACTS.md, through a real Envoy.

Each case checks the status, the exact OpenAI error shape and its type/code/param, and that
no backend saw the request (the mocks' /mock/stats totals do not move).
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import (
    parse_http1,
    PHI,
    QWEN,
    assert_openai_error,
    assert_routed,
    backend_ports,
    chat_body,
    completion_body,
    filter_config_with,
    free_port,
    set_filter_config,
    start_mock,
    totals,
)

JSON = {"content-type": "application/json"}
DEFAULT_MAX_BODY = 8 * 1024 * 1024
SMALL_MAX_BODY = 4096


def _case(body, code, status=400, param=None, headers=None):
    return (body, status, code, param, headers or JSON)


FILTER_ERRORS = {
    # 400 invalid_json
    "truncated": _case(b'{"model": "Qwen/Qwen2.5-3B-Instruct", "prompt": ', "invalid_json"),
    "not_json": _case(b"model=Qwen/Qwen2.5-3B-Instruct", "invalid_json"),
    "empty_body": _case(b"", "invalid_json"),
    "trailing_garbage": _case(b'{"model": "Qwen/Qwen2.5-3B-Instruct"} x', "invalid_json"),
    "two_documents": _case(b'{"model": "Qwen/Qwen2.5-3B-Instruct"}{"model": "x"}', "invalid_json"),
    "bad_utf8": _case(b'{"model": "Qwen/Qwen2.5-3B-Instruct", "prompt": "\xff\xfe"}', "invalid_json"),
    "single_quotes": _case(b"{'model': 'Qwen/Qwen2.5-3B-Instruct'}", "invalid_json"),
    "trailing_comma": _case(b'{"model": "Qwen/Qwen2.5-3B-Instruct",}', "invalid_json"),
    "byte_order_mark": _case(b'\xef\xbb\xbf{"model": "Qwen/Qwen2.5-3B-Instruct"}', "invalid_json"),
    "nesting_past_1024": _case(
        b'{"model": "Qwen/Qwen2.5-3B-Instruct", "x": ' + b"[" * 1100 + b"]" * 1100 + b"}", "invalid_json"
    ),
    "top_level_array": _case(b'[{"model": "Qwen/Qwen2.5-3B-Instruct"}]', "invalid_json"),
    "top_level_string": _case(b'"Qwen/Qwen2.5-3B-Instruct"', "invalid_json"),
    "top_level_number": _case(b"42", "invalid_json"),
    "top_level_null": _case(b"null", "invalid_json"),
    # 400 missing_model
    "no_model": _case(b'{"prompt": "hi", "max_tokens": 4}', "missing_model", param="model"),
    "empty_object": _case(b"{}", "missing_model", param="model"),
    "nested_model_only": _case(b'{"x": {"model": "Qwen/Qwen2.5-3B-Instruct"}}', "missing_model", param="model"),
    "model_in_messages_only": _case(
        b'{"messages": [{"model": "Qwen/Qwen2.5-3B-Instruct", "role": "user"}]}', "missing_model", param="model"
    ),
    "differently_cased_key": _case(b'{"Model": "Qwen/Qwen2.5-3B-Instruct"}', "missing_model", param="model"),
    # 400 invalid_model
    "model_42": _case(b'{"model": 42}', "invalid_model", param="model"),
    "model_null": _case(b'{"model": null}', "invalid_model", param="model"),
    "model_true": _case(b'{"model": true}', "invalid_model", param="model"),
    "model_empty": _case(b'{"model": ""}', "invalid_model", param="model"),
    "model_object": _case(b'{"model": {"a": 1}}', "invalid_model", param="model"),
    "model_array": _case(b'{"model": ["Qwen/Qwen2.5-3B-Instruct"]}', "invalid_model", param="model"),
    "model_escaped_newline": _case(b'{"model": "Qwen/Qwen2.5-3B-Instruct\\n"}', "invalid_model", param="model"),
    "model_escaped_nul": _case(b'{"model": "Qwen/Qwen2.5-3B-Instruct\\u0000"}', "invalid_model", param="model"),
    "model_escaped_tab": _case(b'{"model": "\\tQwen/Qwen2.5-3B-Instruct"}', "invalid_model", param="model"),
    "model_too_long": _case(json.dumps({"model": "m" * 257}).encode(), "invalid_model", param="model"),
    # 400 duplicate_model
    "duplicate_model_different": _case(
        b'{"model": "Qwen/Qwen2.5-3B-Instruct", "prompt": "x", "model": "microsoft/Phi-3-mini-4k-instruct"}',
        "duplicate_model",
        param="model",
    ),
    "duplicate_model_same": _case(
        b'{"model": "Qwen/Qwen2.5-3B-Instruct", "model": "Qwen/Qwen2.5-3B-Instruct"}',
        "duplicate_model",
        param="model",
    ),
    "duplicate_model_escaped_key": _case(
        b'{"model": "Qwen/Qwen2.5-3B-Instruct", "mod\\u0065l": "microsoft/Phi-3-mini-4k-instruct"}',
        "duplicate_model",
        param="model",
    ),
    # 404 model_not_found
    "unknown_model": _case(b'{"model": "gpt-4o", "prompt": "x"}', "model_not_found", status=404, param="model"),
    "wrong_case_model": _case(
        b'{"model": "qwen/qwen2.5-3b-instruct", "prompt": "x"}', "model_not_found", status=404, param="model"
    ),
    # 256 bytes is still a valid name (maxModelNameBytes), just not a served one.
    "model_256_bytes_unknown": _case(
        json.dumps({"model": "m" * 256}).encode(), "model_not_found", status=404, param="model"
    ),
    "unknown_adapter": _case(
        b'{"model": "qwen-sql-lora-v2", "prompt": "x"}', "model_not_found", status=404, param="model"
    ),
    # 415 unsupported_media_type
    "text_plain": _case(
        json.dumps(completion_body(QWEN)).encode(),
        "unsupported_media_type",
        status=415,
        headers={"content-type": "text/plain"},
    ),
    "form_urlencoded": _case(
        b"model=Qwen%2FQwen2.5-3B-Instruct",
        "unsupported_media_type",
        status=415,
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    "gzip": _case(
        json.dumps(completion_body(QWEN)).encode(),
        "unsupported_media_type",
        status=415,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    ),
    "br": _case(
        json.dumps(completion_body(QWEN)).encode(),
        "unsupported_media_type",
        status=415,
        headers={"content-type": "application/json", "content-encoding": "br"},
    ),
}


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("name", sorted(FILTER_ERRORS))
def test_filter_error(envoy, backends, name, http2):
    body, status, code, param, headers = FILTER_ERRORS[name]
    client = _client(envoy, http2)
    before = totals(backends)
    r = client.post("/v1/chat/completions", content=body, headers=headers)
    assert_openai_error(r, status, code, param=param)
    assert totals(backends) == before, "a backend received a request the filter refused"


_CLIENTS = {}


def _client(env, http2):
    key = (id(env), http2)
    if key not in _CLIENTS:
        _CLIENTS[key] = env.client(http2=http2)
    return _CLIENTS[key]


def test_unknown_model_passthrough_gets_route_not_found(envoy_passthrough, backends):
    """unknownModel=passthrough: the filter lets it go without routing headers, and Envoy
    has no route for it: 404 route_not_found from local_reply_config."""
    before = totals(backends)
    r = envoy_passthrough.client().post("/v1/completions", json=completion_body("gpt-4o"))
    assert_openai_error(r, 404, "route_not_found")
    assert totals(backends) == before
    # Known models still route in passthrough mode; malformed bodies are still refused.
    assert_routed(envoy_passthrough.client().post("/v1/completions", json=completion_body(PHI)), PHI)
    r = envoy_passthrough.client().post("/v1/completions", content=b'{"model": 42}', headers=JSON)
    assert_openai_error(r, 400, "invalid_model", param="model")


@pytest.mark.parametrize(
    "method,path",
    [("GET", "/v1/anything"), ("GET", "/v1/completions"), ("POST", "/not-v1/completions"), ("GET", "/")],
)
def test_envoy_route_not_found(envoy, backends, method, path):
    """No routing header (request not inspected) -> Envoy's own 404 JSON."""
    before = totals(backends)
    body = json.dumps(completion_body(QWEN)).encode() if method == "POST" else None
    r = envoy.client().request(method, path, content=body, headers=JSON if body else None)
    assert_openai_error(r, 404, "route_not_found")
    assert totals(backends) == before


# ---------------------------------------------------------------------------------------
# 413
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def envoy_small_body(envoy_factory, backends):
    return envoy_factory(
        backend_ports(backends),
        mutate=lambda c: set_filter_config(c, filter_config_with(maxBodyBytes=SMALL_MAX_BODY)),
        name="small-body",
    )


def _body_of_size(n: int, model: str = QWEN) -> bytes:
    """A valid completion body of exactly n bytes (padding in the prompt)."""
    head = json.dumps({"model": model, "prompt": ""}).encode()
    assert len(head) <= n
    return head[:-2] + b"a" * (n - len(head)) + b'"}'


def _raw_request(port: int, head: bytes, body_chunks=(), read_timeout: float = 30.0) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 exchange over a raw socket (Connection: close); returns status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # Envoy answered early and closed: fine, read the answer.
        data = b""
        deadline = time.monotonic() + read_timeout
        while time.monotonic() < deadline:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
    return parse_http1(data)


def _assert_raw_error(status, headers, body, want_status, code, param=None):
    assert status == want_status, (status, headers, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert "x-mock-backend" not in headers
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", code, param)


def test_413_content_length_over_limit_at_headers(envoy, backends):
    """Content-Length over the default 8 MiB is refused at the headers: no body is sent."""
    before = totals(backends)
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {DEFAULT_MAX_BODY + 1}\r\nConnection: close\r\n\r\n".encode()
    )
    status, headers, body = _raw_request(envoy.port, head, read_timeout=10)
    _assert_raw_error(status, headers, body, 413, "request_too_large")
    assert totals(backends) == before


def test_413_small_limit_content_length_and_chunked(envoy_small_body, backends):
    env = envoy_small_body
    client = env.client()
    before = totals(backends)

    # Exactly at the limit: routed.
    assert_routed(client.post("/v1/completions", content=_body_of_size(SMALL_MAX_BODY), headers=JSON), QWEN)
    after_ok = totals(backends)

    # One byte over, with Content-Length.
    r = client.post("/v1/completions", content=_body_of_size(SMALL_MAX_BODY + 1), headers=JSON)
    assert_openai_error(r, 413, "request_too_large")

    # One byte over, chunked (no Content-Length): counted as the bytes stream in.
    big = _body_of_size(SMALL_MAX_BODY + 1)

    def gen():
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = client.post("/v1/completions", content=gen(), headers=JSON)
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, "request_too_large")

    # Same over HTTP/2 (DATA frames, no content-length).
    r = env.client(http2=True).post("/v1/completions", content=gen(), headers=JSON)
    assert_openai_error(r, 413, "request_too_large")

    assert after_ok[backends.qwen.id] == before[backends.qwen.id] + 1
    assert totals(backends) == after_ok


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_413_real_8mib_plus_one_chunked(envoy, backends, http2):
    """A real 8 MiB + 1 body with the default config and no Content-Length: the filter's
    JSON 413 wins over Envoy's plain-text one (buffer limit 8 MiB + 64 KiB)."""
    before = totals(backends)
    big = _body_of_size(DEFAULT_MAX_BODY + 1)

    def gen():
        for i in range(0, len(big), 256 * 1024):
            yield big[i : i + 256 * 1024]

    client = envoy.client(http2=http2, timeout=60.0)
    try:
        r = client.post("/v1/completions", content=gen(), headers=JSON)
    except (httpx.RemoteProtocolError, httpx.WriteError) as e:  # pragma: no cover - diagnostic
        pytest.fail(f"Envoy reset the upload instead of answering 413 JSON: {e!r}")
    assert_openai_error(r, 413, "request_too_large")
    assert totals(backends) == before


# ---------------------------------------------------------------------------------------
# 503
# ---------------------------------------------------------------------------------------


def test_503_no_healthy_upstream_when_backend_dies(envoy_factory, session_dir):
    """Own backends and Envoy: kill Phi's backend, and Phi requests get Envoy's 503 JSON
    (from connect failure or outlier ejection; health checks are every 15 s), while Qwen
    keeps working."""
    qwen = start_mock(session_dir, QWEN, "qwen-a")
    phi = start_mock(session_dir, PHI, "phi-a")
    try:
        env = envoy_factory({"qwen-vllm": qwen.port, "phi-vllm": phi.port}, name="503")
        client = env.client()
        assert_routed(client.post("/v1/completions", json=completion_body(PHI)), PHI)
        phi.kill()
        for _ in range(3):
            r = client.post("/v1/completions", json=completion_body(PHI))
            assert_openai_error(r, 503, "no_healthy_upstream", type_="service_unavailable_error")
        assert_routed(client.post("/v1/completions", json=completion_body(QWEN)), QWEN)
        # The same over HTTP/2.
        r = env.client(http2=True).post("/v1/completions", json=completion_body(PHI))
        assert_openai_error(r, 503, "no_healthy_upstream", type_="service_unavailable_error")
    finally:
        phi.stop()
        qwen.stop()


def test_503_no_healthy_upstream_when_backend_never_came_up(envoy_factory, backends):
    """Phi's backend is down from the start: its first active health check fails, the host
    is unhealthy, and (panic mode being off) Envoy has no healthy upstream: 503 JSON."""
    dead_port = free_port()
    env = envoy_factory(
        {"qwen-vllm": backends.qwen.port, "phi-vllm": dead_port}, name="503-never-up", wait_healthy=False
    )
    deadline = time.monotonic() + 20
    while not any("failed_active_hc" in f for f in env.health_flags("phi-vllm")):
        assert time.monotonic() < deadline, env.admin("/clusters")
        time.sleep(0.1)
    for http2 in (False, True):
        r = env.client(http2=http2).post("/v1/chat/completions", json=chat_body(PHI))
        assert_openai_error(r, 503, "no_healthy_upstream", type_="service_unavailable_error")
    # No connection was even tried: the router found no healthy host (response flag UH).
    assert env.stat("cluster.phi-vllm.upstream_cx_none_healthy") >= 2
    assert env.stat("cluster.phi-vllm.upstream_cx_total") == 0
    assert_routed(env.client().post("/v1/completions", json=completion_body(QWEN)), QWEN)
