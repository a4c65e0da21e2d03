"""Every YAML document in istio/ is valid for the API server (schemas), the kustomizations
cover every manifest, and the manifests agree with the seed and with each other."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

import istio_convert as ic
import k8s_schema
from conftest import ISTIO, LORA, PHI, QWEN, ROOT, all_docs, doc, manifest_files

NAMESPACE = "llm-d-inference-scheduling"
GATEWAY = "infra-pattern1-inference-gateway"
DOCS = all_docs()


def test_there_are_manifests():
    kinds = sorted({d.body["kind"] for d in DOCS})
    assert kinds == ["ConfigMap", "DestinationRule", "EnvoyFilter", "Gateway", "HTTPRoute", "InferencePool", "WasmPlugin"], kinds


@pytest.mark.parametrize("d", DOCS, ids=[d.where.replace(str(ROOT) + "/", "") for d in DOCS])
def test_document_is_valid(validator, d):
    errors = validator.validate(d.body)
    assert not errors, f"{d.where}:\n  " + "\n  ".join(errors)


# --- the validator really rejects broken manifests ------------------------------------


def _broken(kind, name, mutate):
    body = copy.deepcopy(doc(kind, name))
    mutate(body)
    return body


BROKEN = {
    # A typo in a field name: the API server's strict field validation refuses it.
    "httproute-unknown-field": _broken(
        "HTTPRoute", "qwen-model-route", lambda b: b["spec"]["rules"][0]["backendRefs"][0].update(nmae="qwen-pool")
    ),
    "httproute-bad-match-type": _broken(
        "HTTPRoute", "qwen-model-route", lambda b: b["spec"]["rules"][0]["matches"][0]["headers"][0].update(type="Exactly")
    ),
    "inferencepool-port-as-string": _broken(
        "InferencePool", "qwen-pool", lambda b: b["spec"]["targetPorts"][0].update(number="8000")
    ),
    "inferencepool-missing-selector": _broken("InferencePool", "phi-pool", lambda b: b["spec"].pop("selector")),
    "envoyfilter-bad-applyto": _broken(
        "EnvoyFilter", "bbr-wasm", lambda b: b["spec"]["configPatches"][0].update(applyTo="EXTENSION")
    ),
    "envoyfilter-unknown-spec-field": _broken("EnvoyFilter", "bbr-wasm", lambda b: b["spec"].update(configPatch=[])),
    "wasmplugin-envoy-spelling": _broken("WasmPlugin", "bbr-wasm", lambda b: b["spec"].update(failStrategy="FAIL_CLOSED")),
    "wasmplugin-unserved-version": _broken("WasmPlugin", "bbr-wasm", lambda b: b.update(apiVersion="extensions.istio.io/v1")),
    "gateway-bad-name": _broken("Gateway", GATEWAY, lambda b: b["metadata"].update(name="Infra_Gateway")),
    "destinationrule-bad-tls-mode": _broken(
        "DestinationRule", "gaie-pattern1-epp-tls", lambda b: b["spec"]["trafficPolicy"]["tls"].update(mode="TLS")
    ),
    "bad-label-key": _broken("InferencePool", "qwen-pool", lambda b: b["metadata"].update(labels={"a/b/c": "x"})),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_copy_is_rejected(validator, name):
    assert validator.validate(BROKEN[name]), f"the validator accepted {name}"


def test_broken_file_on_disk_is_rejected(validator, tmp_path):
    """A whole file, parsed from disk like the real ones: one bad document among good ones."""
    text = (ISTIO / "base" / "httproutes.yaml").read_text()
    bad = tmp_path / "httproutes.yaml"
    bad.write_text(text.replace("type: PathPrefix", "type: Prefix", 1))
    results = [validator.validate(d.body) for d in k8s_schema.load_docs(bad)]
    assert results[0] and not results[1], results


def test_core_kinds_go_through_kubernetes_validate(validator):
    """istio/ has no core kinds today (the namespace and the model servers come from Pattern 1),
    but a core object would be checked, strictly, by kubernetes-validate."""
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": NAMESPACE}, "data": {"k": "v"}}
    assert validator.validate(cm) == []
    assert validator.validate({**cm, "data": {"k": 1}})
    assert validator.validate({**cm, "dta": {}})
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "80"}]}}
    assert validator.validate(svc)


def test_unknown_kind_is_rejected(validator):
    hc = {"apiVersion": "networking.gke.io/v1", "kind": "HealthCheckPolicy", "metadata": {"name": "x"}, "spec": {}}
    assert any("no schema" in e for e in validator.validate(hc))


# --- kustomizations --------------------------------------------------------------------


def test_every_manifest_is_in_exactly_one_kustomization():
    included: dict[Path, Path] = {}
    for k in sorted(ISTIO.rglob("kustomization.yaml")):
        for res in yaml.safe_load(k.read_text())["resources"]:
            target = (k.parent / res).resolve()
            if target.is_file():
                assert target not in included, f"{target} is in {included[target]} and {k}"
                included[target] = k
    assert sorted(included) == sorted(p.resolve() for p in manifest_files())


def test_default_install():
    """`kubectl apply -k istio/`: base + the EnvoyFilter, all in the seed's namespace; neither
    the WasmPlugin (it would hang requests) nor the optional EPP DestinationRule."""
    built = k8s_schema.kustomize_build(ISTIO)
    names = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in built)
    assert names == [
        "ConfigMap/bbr-wasm-gateway",
        "ConfigMap/bbr-wasm-overload",
        "EnvoyFilter/bbr-wasm",
        f"Gateway/{GATEWAY}",
        "HTTPRoute/phi-model-route",
        "HTTPRoute/qwen-model-route",
        "InferencePool/phi-pool",
        "InferencePool/qwen-pool",
    ]
    assert {d["metadata"]["namespace"] for d in built} == {NAMESPACE}
    for sub in ("base", "bbr", "wasmplugin", "epp-tls"):
        k8s_schema.kustomize_resources(ISTIO / sub)  # each component builds on its own


def test_every_document_names_the_seed_namespace():
    for d in DOCS:
        assert d.body["metadata"].get("namespace") == NAMESPACE, d.where


# --- the seed's Pattern 2, and the pieces agreeing with each other -------------------------


def test_inferencepools_are_the_seeds():
    for name, instance in (("qwen-pool", "qwen"), ("phi-pool", "phi")):
        spec = doc("InferencePool", name)["spec"]
        assert spec["selector"] == {"matchLabels": {"model-instance": instance}}
        assert spec["targetPorts"] == [{"number": 8000}]
        assert spec["endpointPickerRef"] == {
            "failureMode": "FailClose",
            "group": "",
            "kind": "Service",
            "name": "gaie-pattern1-epp",
            "port": {"number": 9002},
        }


def _route_headers() -> dict[str, str]:
    """base model -> InferencePool, from the HTTPRoutes."""
    out = {}
    for d in DOCS:
        if d.body["kind"] != "HTTPRoute":
            continue
        spec = d.body["spec"]
        assert spec["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": GATEWAY}]
        for rule in spec["rules"]:
            (ref,) = rule["backendRefs"]
            assert ref["group"] == "inference.networking.k8s.io" and ref["kind"] == "InferencePool"
            for m in rule["matches"]:
                assert m["path"] == {"type": "PathPrefix", "value": "/v1/"}
                (h,) = m["headers"]
                assert h["type"] == "Exact" and h["name"].lower() == "x-gateway-base-model-name"
                out[h["value"]] = ref["name"]
    return out


def test_httproutes_are_the_seeds():
    assert _route_headers() == {QWEN: "qwen-pool", PHI: "phi-pool"}


def _envoyfilter_config() -> dict:
    return json.loads(ic.filter_configuration(ic.extension_config(doc("EnvoyFilter", "bbr-wasm"))["typed_config"]))


def test_filter_config_matches_the_routes():
    """Every base model in the filter's configuration has an HTTPRoute on its exact name and
    every route's header value is a base model: otherwise requests get 404 route_not_found or
    a route never matches. Same configuration in the EnvoyFilter and the WasmPlugin."""
    cfg = _envoyfilter_config()
    bases = [m["name"] for m in cfg["models"]]
    assert sorted(bases) == sorted(_route_headers())
    assert {a for m in cfg["models"] for a in m.get("adapters", [])} == {LORA}
    assert doc("WasmPlugin", "bbr-wasm")["spec"]["pluginConfig"] == cfg
    # The header the routes match is the filter's (default) header.
    assert cfg.get("baseModelHeader", "x-gateway-base-model-name") == "x-gateway-base-model-name"


def test_envoyfilter_wiring():
    ef = doc("EnvoyFilter", "bbr-wasm")
    assert ef["spec"]["workloadSelector"] == {"labels": {"gateway.networking.k8s.io/gateway-name": GATEWAY}}
    for p in ef["spec"]["configPatches"]:
        assert p["match"]["context"] == "GATEWAY", p
    ext = ic.extension_config(ef)
    tc = ext["typed_config"]
    assert tc["@type"] == ic.WASM_TYPE
    config = tc["config"]
    assert config["allow_on_headers_stop_iteration"] is True
    assert config["failure_policy"] == "FAIL_CLOSED"
    assert config["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
    remote = config["vm_config"]["code"]["remote"]
    assert remote["http_uri"]["uri"].startswith("oci://")
    hf, marker = ic.patches(ef, "HTTP_FILTER")
    assert hf["patch"]["operation"] == "INSERT_FIRST"
    assert hf["match"]["listener"]["filterChain"]["filter"]["name"] == ic.HCM
    cd = hf["patch"]["value"]["config_discovery"]
    assert hf["patch"]["value"]["name"] == ext["name"]
    # The Wasm filter, and the agent's RBAC fallback for a module it cannot pull.
    assert cd["type_urls"] == [ic.WASM_TYPE, ic.RBAC_TYPE]
    assert cd["config_source"]["ads"] == {}
    # The marker right after it, whose metadata namespace the fallback's local reply tests.
    assert marker["patch"]["operation"] == "INSERT_AFTER"
    assert marker["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == ext["name"]
    (md,) = marker["patch"]["value"]["typed_config"]["metadata"]
    mappers = ic.one_patch(ef, "NETWORK_FILTER")["patch"]["value"]["typed_config"]["local_reply_config"]["mappers"]
    (cel,) = [f["extension_filter"]["typed_config"]["expression"] for f in mappers[0]["filter"]["or_filter"]["filters"] if "extension_filter" in f]
    assert f"!('{md['metadata_namespace']}' in metadata.filter_metadata)" in cel
    ext_patch = ic.one_patch(ef, "EXTENSION_CONFIG")
    assert ext_patch["patch"]["operation"] == "ADD"
    listener = ic.one_patch(ef, "LISTENER")
    assert listener["patch"]["operation"] == "MERGE"
    # A little above the filter's maxBodyBytes (default 8 MiB), like envoy/envoy.yaml.
    max_body = _envoyfilter_config().get("maxBodyBytes", 8 * 1024 * 1024)
    assert max_body < listener["patch"]["value"]["per_connection_buffer_limit_bytes"] <= max_body + 128 * 1024


def test_wasmplugin_and_envoyfilter_pin_the_same_image():
    ef = doc("EnvoyFilter", "bbr-wasm")
    wp = doc("WasmPlugin", "bbr-wasm")
    remote = ic.extension_config(ef)["typed_config"]["config"]["vm_config"]["code"]["remote"]
    assert wp["spec"]["url"] == remote["http_uri"]["uri"]
    assert wp["spec"]["sha256"] == remote["sha256"]
    assert len(remote["sha256"]) == 64 and int(remote["sha256"], 16) >= 0
    assert wp["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": GATEWAY}]
    assert wp["spec"]["failStrategy"] == "FAIL_CLOSE" and wp["spec"]["type"] == "HTTP"
    for key in ("bbr-wasm/module-sha256", "bbr-wasm/built-with"):
        assert ef["metadata"]["annotations"][key] == wp["metadata"]["annotations"][key]


def test_epp_destinationrule_targets_the_seeds_epp():
    dr = doc("DestinationRule", "gaie-pattern1-epp-tls")
    assert dr["spec"]["host"] == f"gaie-pattern1-epp.{NAMESPACE}.svc.cluster.local"
    assert dr["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}
