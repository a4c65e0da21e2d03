"""The gateway's Deployment as Istio renders it (istio_deploy.py): the Gateway's parametersRef
overlay sets ISTIO_BOOTSTRAP_OVERRIDE and mounts the overload bootstrap, which the agent then
passes to Envoy; the sidecar annotation istio/ used before reaches nothing. Sources:
docs/istio-fidelity.md."""

from __future__ import annotations

import copy
import json

import pytest

import istio_deploy as idep
from conftest import all_docs, doc

GATEWAY = "infra-pattern1-inference-gateway"
MOUNT = "/etc/istio/custom-bootstrap/custom_bootstrap.json"


def configmaps() -> list[dict]:
    return [d.body for d in all_docs() if d.body["kind"] == "ConfigMap"]


def test_the_overlay_brings_the_override_to_the_agent():
    deploy = idep.render(doc("Gateway", GATEWAY), configmaps())
    c = idep.proxy_container(deploy)
    assert idep.env_value(c, idep.OVERRIDE_ENV) == MOUNT
    assert {"name": "bbr-wasm-overload", "mountPath": "/etc/istio/custom-bootstrap", "readOnly": True} in c["volumeMounts"]
    # The template's own env, mounts and volumes are kept (merged by their keys, not replaced).
    assert idep.env_value(c, "PROXY_CONFIG") is not None
    assert {"name": "istio-data", "mountPath": "/var/lib/istio/data"} in c["volumeMounts"]
    assert len(deploy["spec"]["template"]["spec"]["volumes"]) == len(
        idep.kube_gateway_deployment(doc("Gateway", GATEWAY))["spec"]["template"]["spec"]["volumes"]
    ) + 1
    override = idep.bootstrap_override(deploy, configmaps())
    assert json.loads(override) == json.loads(doc("ConfigMap", "bbr-wasm-overload")["data"]["custom_bootstrap.json"])
    assert idep.agent_envoy_args(override)[-2:] == ["--config-yaml", override]


def test_gateway_pods_are_never_injected():
    """kube-gateway.yaml labels the pod sidecar.istio.io/inject "false": no injector, so no
    sidecar.istio.io/* annotation is acted on."""
    deploy = idep.render(doc("Gateway", GATEWAY), configmaps())
    assert deploy["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"


def test_the_sidecar_bootstrap_annotation_reaches_nothing():
    """What istio/ did before: spec.infrastructure.annotations sidecar.istio.io/bootstrapOverride.
    The annotation is copied onto the pod, and nothing in the rendered Deployment reads it: no
    override reaches Envoy."""
    gw = copy.deepcopy(doc("Gateway", GATEWAY))
    gw["spec"]["infrastructure"] = {"annotations": {"sidecar.istio.io/bootstrapOverride": "bbr-wasm-overload"}}
    deploy = idep.render(gw, configmaps())
    assert deploy["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/bootstrapOverride"] == "bbr-wasm-overload"
    assert idep.env_value(idep.proxy_container(deploy), idep.OVERRIDE_ENV) is None
    assert idep.bootstrap_override(deploy, configmaps()) is None
    assert "--config-yaml" not in idep.agent_envoy_args(None)


def test_the_parameters_configmap_holds_only_overlays():
    """istiod refuses to render a gateway whose parameters ConfigMap has any other key, which is
    why the bootstrap has its own ConfigMap."""
    params = doc("ConfigMap", "bbr-wasm-gateway")
    assert set(params["data"]) <= idep.SUPPORTED_OVERLAYS
    broken = copy.deepcopy(params)
    broken["data"]["custom_bootstrap.json"] = "{}"
    others = [c for c in configmaps() if c["metadata"]["name"] != "bbr-wasm-gateway"]
    with pytest.raises(idep.RenderError, match="unsupported overlay"):
        idep.render(doc("Gateway", GATEWAY), others + [broken])


def test_a_missing_parameters_configmap_renders_nothing():
    others = [c for c in configmaps() if c["metadata"]["name"] != "bbr-wasm-gateway"]
    with pytest.raises(idep.RenderError, match="does not exist"):
        idep.render(doc("Gateway", GATEWAY), others)


def test_a_missing_bootstrap_configmap_gives_no_override():
    """(The pod would not even start: the ConfigMap volume is not optional.)"""
    deploy = idep.render(doc("Gateway", GATEWAY), configmaps())
    assert idep.bootstrap_override(deploy, [doc("ConfigMap", "bbr-wasm-gateway")]) is None


def test_the_parameters_ref_must_be_a_core_configmap():
    gw = copy.deepcopy(doc("Gateway", GATEWAY))
    gw["spec"]["infrastructure"]["parametersRef"]["group"] = "v1"
    with pytest.raises(idep.RenderError, match="unknown infrastructure parameters type"):
        idep.render(gw, configmaps())


BASE = {
    "metadata": {"name": "d", "namespace": "n"},
    "spec": {"template": {"spec": {
        "containers": [{"name": "istio-proxy", "env": [{"name": "A", "value": "1"}], "args": ["proxy", "router"]}],
        "volumes": [{"name": "v", "emptyDir": {}}],
    }}},
}

MERGES = {
    "env merged by name": (
        {"spec": {"template": {"spec": {"containers": [{"name": "istio-proxy", "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}]}]}}}},
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"] == [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}],
    ),
    "a new container is appended": (
        {"spec": {"template": {"spec": {"containers": [{"name": "other"}]}}}},
        lambda d: [c["name"] for c in d["spec"]["template"]["spec"]["containers"]] == ["istio-proxy", "other"],
    ),
    "a list without a merge key is replaced": (
        {"spec": {"template": {"spec": {"containers": [{"name": "istio-proxy", "args": ["x"]}]}}}},
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["args"] == ["x"],
    ),
    "null deletes a field": (
        {"spec": {"template": {"spec": {"volumes": None}}}},
        lambda d: "volumes" not in d["spec"]["template"]["spec"],
    ),
}


@pytest.mark.parametrize("case", sorted(MERGES))
def test_strategic_merge(case):
    patch, check = MERGES[case]
    assert check(idep.strategic_merge(BASE, patch, ()))


def test_strategic_merge_refuses_directives_and_identity_changes():
    with pytest.raises(NotImplementedError):
        idep.strategic_merge(BASE, {"spec": {"template": {"spec": {"$patch": "replace"}}}}, ())
    with pytest.raises(idep.RenderError, match="illegal metadata change"):
        idep.apply_overlay(BASE, [{"deployment": "metadata:\n  name: other\n"}])


def test_the_rendered_deployment_is_valid(validator):
    """The overlay's fields are the Deployment's (a misspelt key such as `volumeMount` would be
    refused as by the API server, which is what would refuse istiod's apply)."""
    deploy = idep.render(doc("Gateway", GATEWAY), configmaps())
    assert validator.validate(deploy) == []
    broken = copy.deepcopy(doc("ConfigMap", "bbr-wasm-gateway"))
    broken["data"]["deployment"] = broken["data"]["deployment"].replace("volumeMounts:", "volumeMount:")
    others = [c for c in configmaps() if c["metadata"]["name"] != "bbr-wasm-gateway"]
    assert validator.validate(idep.render(doc("Gateway", GATEWAY), others + [broken]))
