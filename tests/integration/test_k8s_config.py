"""Both shipped Envoy configs pass `envoy --mode validate` with the built filter (validation
also loads the .wasm and runs its on_configure, so a filter config the filter refuses fails
here too)."""

from __future__ import annotations

import subprocess

import yaml
from conftest import ENVOY_K8S_YAML, ENVOY_YAML, ROOT, WASM, _require_artifacts, load_envoy_yaml, wasm_plugin


def _validate(envoy_bin: str, config_path, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [envoy_bin, "--mode", "validate", "-c", str(config_path), "--use-dynamic-base-id"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _assert_ok(proc: subprocess.CompletedProcess, what: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed validation:\n{out[-4000:]}"
    assert "OK" in out, out[-2000:]
    assert "configuration accepted" in out, f"the filter did not accept its configuration:\n{out[-2000:]}"


def test_envoy_yaml_validates_as_shipped(envoy_bin):
    """From the repository root, with the relative .wasm path exactly as `make run` uses it."""
    _require_artifacts()
    _assert_ok(_validate(envoy_bin, ENVOY_YAML), "envoy/envoy.yaml")


def test_envoy_k8s_yaml_validates(envoy_bin, tmp_path):
    _require_artifacts()
    cfg = load_envoy_yaml(ENVOY_K8S_YAML)
    assert wasm_plugin(cfg)["vm_config"]["code"]["local"]["filename"] == "/etc/bbr-wasm/bbr_wasm.wasm"
    wasm_plugin(cfg)["vm_config"]["code"]["local"]["filename"] = str(WASM)
    path = tmp_path / "envoy-k8s.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _assert_ok(_validate(envoy_bin, path, cwd=tmp_path), "envoy/envoy-k8s.yaml")


def test_k8s_and_local_configs_agree():
    """envoy-k8s.yaml is envoy.yaml with other addresses: same routes, filters, local replies,
    health checks, outlier detection and limits."""
    local, k8s = load_envoy_yaml(ENVOY_YAML), load_envoy_yaml(ENVOY_K8S_YAML)

    k8s_listener = k8s["static_resources"]["listeners"][0]
    assert k8s_listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    assert k8s["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"

    # Same HTTP connection manager apart from the .wasm path.
    def hcm_without_wasm_path(cfg):
        listener = cfg["static_resources"]["listeners"][0]
        h = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for f in h["http_filters"]:
            if f["name"] == "envoy.filters.http.wasm":
                f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = "X"
        return h, listener["per_connection_buffer_limit_bytes"]

    assert hcm_without_wasm_path(local) == hcm_without_wasm_path(k8s)

    def model_clusters(cfg):
        # Both ship the endpoint picker's loopback cluster to Envoy's own admin, the same.
        clusters = cfg["static_resources"]["clusters"]
        assert [c for c in clusters if c["name"] == "bbr-envoy-admin"] == [
            c for c in local["static_resources"]["clusters"] if c["name"] == "bbr-envoy-admin"]
        return [c for c in clusters if c["name"] != "bbr-envoy-admin"]

    for lc, kc in zip(model_clusters(local), model_clusters(k8s), strict=True):
        assert lc["name"] == kc["name"]
        assert kc["type"] == "STRICT_DNS" and kc["dns_lookup_family"] == "V4_ONLY"
        for key in (
            "load_balancing_policy",
            "health_checks",
            "outlier_detection",
            "per_connection_buffer_limit_bytes",
            "common_lb_config",
        ):
            assert lc[key] == kc[key], (lc["name"], key)
        addr = kc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        assert addr["address"].endswith(".llm-d-inference-scheduling.svc.cluster.local")
        assert addr["port_value"] == 8000
