"""Header values that are not UTF-8 must not reach a panic.

Envoy accepts bytes 0x80-0xFF (obs-text) in header values. The proxy-wasm SDK's
`get_map_value` unwraps a UTF-8 conversion, so a filter reading a header through it traps its
VM on such a value: one request with `x-gateway-base-model-name: \\xff\\xfe` took the gateway
down (every later request got 503) before the filter switched to `get_map_value_bytes`. Every
header the filter reads gets such bytes here; the VM must not fail and each answer must be
the one its body deserves.
"""

from __future__ import annotations

import json
import socket

import pytest
from conftest import (
    BACKEND_OF,
    QWEN,
    read_http1_until_close,
    totals,
    wasm_failure_lines,
    wasm_vm_stats,
    log_size,
)

BAD = b"\xff\xfe\x80 caf\xe9"  # invalid UTF-8 (and Latin-1 text)


def raw_post(port: int, headers: list[bytes], body: bytes, path: bytes = b"/v1/completions"):
    head = b"POST " + path + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
    head += b"".join(h + b"\r\n" for h in headers)
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        return read_http1_until_close(s)


BODY = json.dumps({"model": QWEN, "prompt": "hi", "max_tokens": 2}).encode()
JSON_CT = b"Content-Type: application/json"

CASES = {
    # name: (headers, expected status, expected error code or None when routed)
    "forged base model header": ([JSON_CT, b"x-gateway-base-model-name: " + BAD], 200, None),
    "forged model header": ([JSON_CT, b"X-Gateway-Model-Name: " + BAD], 200, None),
    "both forged, twice": (
        [JSON_CT, b"x-gateway-base-model-name: " + BAD, b"x-gateway-base-model-name: " + BAD,
         b"x-gateway-model-name: " + BAD],
        200,
        None,
    ),
    "content-type": ([b"Content-Type: application/json" + BAD], 415, "unsupported_media_type"),
    "content-type parameter": ([b"Content-Type: application/json; charset=" + BAD], 200, None),
    "content-encoding": ([JSON_CT, b"Content-Encoding: " + BAD], 415, "unsupported_media_type"),
    "unrelated header": ([JSON_CT, b"X-Note: " + BAD], 200, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_non_utf8_header_values(envoy, backends, name):
    headers, want_status, want_code = CASES[name]
    before_vm = wasm_vm_stats(envoy)
    since = log_size(envoy)
    before = totals(backends)
    status, resp_headers, body = raw_post(envoy.port, headers, BODY)
    assert status == want_status, (status, body[:300])
    if want_code is None:
        assert resp_headers.get("x-mock-backend") == BACKEND_OF[QWEN]
        assert resp_headers.get("x-echo-base-model-name") == QWEN
        assert json.loads(body)["model"] == QWEN
    else:
        assert json.loads(body)["error"]["code"] == want_code
        assert totals(backends) == before
    assert wasm_vm_stats(envoy) == before_vm
    assert wasm_failure_lines(envoy, since) == []
    # The gateway still serves the next request.
    status, _, _ = raw_post(envoy.port, [JSON_CT], BODY)
    assert status == 200
