"""GET /v1/models is answered by the filter from its configuration (CONTRACTS.md)."""

from __future__ import annotations

import pytest
from conftest import (
    LORA,
    PHI,
    QWEN,
    assert_openai_error,
    backend_ports,
    filter_config_with,
    set_filter_config,
    totals,
)


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_model_list(envoy, backends, http2):
    before = totals(backends)
    r = envoy.client(http2=http2).get("/v1/models")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].split(";")[0] == "application/json"
    assert "x-mock-backend" not in r.headers, "answered by a backend, not the filter"
    doc = r.json()
    assert doc["object"] == "list"
    by_id = {m["id"]: m for m in doc["data"]}
    assert len(by_id) == len(doc["data"]) == 3, doc
    assert set(by_id) == {QWEN, PHI, LORA}
    for m in doc["data"]:
        assert set(m) == {"id", "object", "created", "owned_by", "root", "parent"}, m
        assert m["object"] == "model"
        assert m["owned_by"] == "bbr-wasm"
        assert isinstance(m["created"], int) and m["created"] > 1_600_000_000, m
    assert (by_id[QWEN]["root"], by_id[QWEN]["parent"]) == (QWEN, None)
    assert (by_id[PHI]["root"], by_id[PHI]["parent"]) == (PHI, None)
    assert (by_id[LORA]["root"], by_id[LORA]["parent"]) == (QWEN, QWEN)
    assert totals(backends) == before


def test_model_list_ignores_forged_routing_header(envoy, backends):
    r = envoy.client().get("/v1/models", headers={"x-gateway-base-model-name": PHI})
    assert r.status_code == 200
    assert "x-mock-backend" not in r.headers


@pytest.fixture(scope="module")
def envoy_no_model_list(envoy_factory, backends):
    return envoy_factory(
        backend_ports(backends),
        mutate=lambda c: set_filter_config(c, filter_config_with(modelList={"enabled": False})),
        name="no-model-list",
    )


def test_model_list_disabled_falls_to_routing(envoy_no_model_list, backends):
    before = totals(backends)
    r = envoy_no_model_list.client().get("/v1/models")
    assert_openai_error(r, 404, "route_not_found")
    assert totals(backends) == before
