"""A client must never choose the backend by sending the routing headers itself.

The filter removes x-gateway-base-model-name and x-gateway-model-name from every request
(any case, any number of copies) before anything else, and only then sets its own.
"""

from __future__ import annotations

import json

import pytest
from conftest import (
    PHI,
    QWEN,
    assert_openai_error,
    assert_routed,
    completion_body,
    totals,
)

BASE = "x-gateway-base-model-name"
MODEL = "x-gateway-model-name"
JSON = ("content-type", "application/json")

FORGERIES = {
    "base_header": [(BASE, PHI)],
    "base_header_upper_case": [(BASE.upper(), PHI)],
    "base_header_mixed_case": [("X-Gateway-Base-Model-Name", PHI)],
    "both_headers": [(BASE, PHI), (MODEL, PHI)],
    "model_header_only": [(MODEL, PHI)],
    "duplicate_base_headers": [(BASE, PHI), (BASE, PHI)],
    "duplicate_mixed_values": [(BASE, PHI), (BASE.upper(), QWEN), (MODEL, "anything")],
    "forged_value_is_garbage": [(BASE, "no-such-model"), (MODEL, "no-such-model")],
}


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_headers_do_not_route(envoy, backends, forgery, http2):
    client = envoy.client(http2=http2)
    headers = [JSON] + FORGERIES[forgery]
    body = json.dumps(completion_body(QWEN)).encode()
    r = client.post("/v1/completions", content=body, headers=headers)
    # Reaches Qwen's backend, and the headers the backend sees are the filter's, not the
    # client's (x-echo-* are the mock's copies of what it received).
    assert_routed(r, QWEN)


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_forged_header_on_uninspected_request_reaches_nothing(envoy, backends, http2):
    """GET /v1/anything is not inspected; its forged header is still stripped, so there is
    no route: Envoy's 404 route_not_found, and no backend sees it."""
    client = envoy.client(http2=http2)
    before = totals(backends)
    for path in ("/v1/anything", "/v1/completions", "/v1/chat/completions"):
        r = client.get(path, headers=[(BASE, PHI), (MODEL, PHI)])
        assert_openai_error(r, 404, "route_not_found")
        r = client.request("DELETE", path, headers=[(BASE.upper(), QWEN)])
        assert_openai_error(r, 404, "route_not_found")
    assert totals(backends) == before


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_forged_header_on_refused_request_reaches_nothing(envoy, backends, http2):
    """A request the filter refuses gets the filter's error even with a forged header."""
    client = envoy.client(http2=http2)
    before = totals(backends)
    forged = [(BASE, PHI), (MODEL, PHI)]
    cases = [
        (b"{not json", [JSON], 400, "invalid_json", None),
        (b'{"prompt": "x"}', [JSON], 400, "missing_model", "model"),
        (b'{"model": "gpt-4o"}', [JSON], 404, "model_not_found", "model"),
        (
            json.dumps(completion_body(PHI)).encode(),
            [("content-type", "text/plain")],
            415,
            "unsupported_media_type",
            None,
        ),
    ]
    for body, headers, status, code, param in cases:
        r = client.post("/v1/completions", content=body, headers=headers + forged)
        assert_openai_error(r, status, code, param=param)
    assert totals(backends) == before


def test_forged_header_with_unknown_model_in_passthrough_mode(envoy_passthrough, backends):
    """unknownModel=passthrough lets an unknown model continue WITHOUT routing headers; a
    forged header must not sneak it onto a backend."""
    before = totals(backends)
    r = envoy_passthrough.client().post(
        "/v1/completions",
        content=json.dumps(completion_body("gpt-4o")).encode(),
        headers=[JSON, (BASE, PHI), (MODEL, PHI)],
    )
    assert_openai_error(r, 404, "route_not_found")
    assert totals(backends) == before
