"""How an Istio gateway's Envoy gets its bootstrap: the Deployment istiod renders for a Gateway API
Gateway, the `parametersRef` overlay, and the istio-agent's bootstrap override.

Emulated from Istio's source at tag 1.28.0 (docs/istio-fidelity.md has the table, with the
lines; 1.30 moved the controller to pilot/pkg/config/kube/gatewaycommon/ unchanged in these
respects):

- kube_gateway_deployment: the parts of the Deployment that
  manifests/charts/istio-control/istio-discovery/files/kube-gateway.yaml renders that matter
  here: the pod's labels (sidecar.istio.io/inject "false": no injector ever sees the pod) and
  annotations (the Gateway's infrastructure annotations, copied, and read by nothing that
  builds the bootstrap), and the istio-proxy container: its environment (no
  ISTIO_BOOTSTRAP_OVERRIDE), mounts, volumes and resources (values.global.proxy.resources).
- render: pilot/pkg/config/kube/gateway/deploymentcontroller.go, DeploymentController.render:
  the overlays are the GatewayClass defaults ConfigMap (none here) and then the ConfigMap named
  by spec.infrastructure.parametersRef (fetchParameters: kind ConfigMap, group "", in the
  Gateway's namespace; a missing ConfigMap is an error and nothing is rendered).
- apply_overlay: applyOverlay: every key of the ConfigMap must be a supported overlay, the
  `deployment` key is applied as a strategic merge patch (strategicMergePatchYAML, with the
  patch metadata of appsv1.Deployment), and the object's identity must not change.
- bootstrap_override: what the agent reads: pkg/envoy/proxy.go, envoy.args and
  readBootstrapToJSON: the file named by ISTIO_BOOTSTRAP_OVERRIDE in the container's environment
  (here found through the container's volumeMounts and a ConfigMap volume, as the kubelet
  projects each key as a file), YAML turned into JSON, "$(HOST_IP)" replaced, passed to Envoy as
  --config-yaml after -c <the generated bootstrap>. A file that cannot be read is only logged:
  Envoy starts without it.
"""

from __future__ import annotations

import copy
import json
import posixpath
from typing import Any, Optional

import yaml

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
OVERRIDE_ENV = "ISTIO_BOOTSTRAP_OVERRIDE"

# deploymentcontroller.go: supportedOverlays.
SUPPORTED_OVERLAYS = {"deployment", "service", "serviceAccount", "horizontalPodAutoscaler", "podDisruptionBudget"}

# manifests/charts/istio-control/istio-discovery/values.yaml (1.28.0): global.proxy.resources,
# which kube-gateway.yaml gives the istio-proxy container.
DEFAULT_PROXY_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2000m", "memory": "1024Mi"}}

# The agent's Envoy flags (pkg/envoy/proxy.go, envoy.args) that change how Envoy reads its
# configuration. --allow-unknown-static-fields: an unknown field in the bootstrap (the override
# included) is ignored, not refused.
AGENT_ENVOY_FLAGS = ["--allow-unknown-static-fields", "--disable-hot-restart"]

# Strategic merge patch keys of the Kubernetes types in a Deployment's pod template
# (k8s.io/api core/v1 types.go, `patchMergeKey`). A list without a merge key is replaced.
MERGE_KEYS = {
    ("spec", "template", "spec", "containers"): "name",
    ("spec", "template", "spec", "initContainers"): "name",
    ("spec", "template", "spec", "volumes"): "name",
    ("spec", "template", "spec", "imagePullSecrets"): "name",
    ("spec", "template", "spec", "containers", "*", "env"): "name",
    ("spec", "template", "spec", "containers", "*", "volumeMounts"): "mountPath",
    ("spec", "template", "spec", "containers", "*", "ports"): "containerPort",
}


class RenderError(ValueError):
    """istiod refuses to render the gateway (it logs the error; no Deployment is applied)."""


def _omit(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


_OMITTED_ANNOTATIONS = (
    "kubectl.kubernetes.io/last-applied-configuration",
    "gateway.istio.io/name-override",
    "gateway.istio.io/service-account",
    "gateway.istio.io/controller-version",
)


def infrastructure_meta(gw: dict, field: str) -> dict:
    """extractInfrastructureMetadata: spec.infrastructure.{labels,annotations} without keys
    prefixed gateway.networking.k8s.io/ (translateInfraMeta) if set, else a copy of the
    Gateway's own metadata (PILOT_ENABLE_GATEWAY_API_COPY_LABELS_ANNOTATIONS, on by default)."""
    meta = (gw["spec"].get("infrastructure") or {}).get(field)
    if meta is not None:
        return {k: v for k, v in meta.items() if not k.startswith("gateway.networking.k8s.io/")}
    return dict(gw["metadata"].get(field) or {})


def kube_gateway_deployment(gw: dict, resources: Optional[dict] = None) -> dict:
    """The Deployment kube-gateway.yaml renders for `gw` (gatewayClassName istio), reduced to what
    decides the bootstrap: names, pod labels and annotations, and the istio-proxy container's
    environment variable names, mounts, volumes and resources."""
    name = gw["metadata"]["name"]
    ns = gw["metadata"]["namespace"]
    deployment_name = f"{name}-{gw['spec']['gatewayClassName']}"  # getDefaultName
    annotations = _omit(infrastructure_meta(gw, "annotations"), *_OMITTED_ANNOTATIONS)
    labels = infrastructure_meta(gw, "labels")
    pod_labels = {
        "sidecar.istio.io/inject": "false",
        "service.istio.io/canonical-name": deployment_name,
        "service.istio.io/canonical-revision": "latest",
        **labels,
        GATEWAY_NAME_LABEL: name,
        "gateway.networking.k8s.io/gateway-class-name": gw["spec"]["gatewayClassName"],
        "gateway.istio.io/managed": "istio.io-gateway-controller",
    }
    pod_annotations = {
        **annotations,
        "istio.io/rev": "default",
        "prometheus.io/path": "/stats/prometheus",
        "prometheus.io/port": "15020",
        "prometheus.io/scrape": "true",
    }
    env_names = [
        "PILOT_CERT_PROVIDER", "CA_ADDR", "POD_NAME", "POD_NAMESPACE", "INSTANCE_IP", "SERVICE_ACCOUNT",
        "HOST_IP", "ISTIO_CPU_LIMIT", "PROXY_CONFIG", "ISTIO_META_POD_PORTS", "ISTIO_META_APP_CONTAINERS",
        "GOMEMLIMIT", "GOMAXPROCS", "ISTIO_META_CLUSTER_ID", "ISTIO_META_NODE_NAME",
        "ISTIO_META_INTERCEPTION_MODE", "ISTIO_META_WORKLOAD_NAME", "ISTIO_META_OWNER",
    ]
    mounts = [
        ("workload-socket", "/var/run/secrets/workload-spiffe-uds"),
        ("credential-socket", "/var/run/secrets/credential-uds"),
        ("workload-certs", "/var/run/secrets/workload-spiffe-credentials"),
        ("istiod-ca-cert", "/var/run/secrets/istio"),
        ("istio-data", "/var/lib/istio/data"),
        ("istio-envoy", "/etc/istio/proxy"),
        ("istio-token", "/var/run/secrets/tokens"),
        ("istio-podinfo", "/etc/istio/pod"),
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name,
            "namespace": ns,
            "annotations": annotations,
            "labels": {**labels, GATEWAY_NAME_LABEL: name},
        },
        "spec": {
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": {
                "metadata": {"annotations": pod_annotations, "labels": pod_labels},
                "spec": {
                    "serviceAccountName": deployment_name,
                    "containers": [
                        {
                            "name": "istio-proxy",
                            "args": ["proxy", "router"],
                            "resources": copy.deepcopy(resources or DEFAULT_PROXY_RESOURCES),
                            "env": [{"name": n, "value": f"<{n}>"} for n in env_names],
                            "volumeMounts": [{"name": v, "mountPath": p} for v, p in mounts],
                        }
                    ],
                    "volumes": [
                        {"name": "workload-socket", "emptyDir": {}},
                        {"name": "credential-socket", "emptyDir": {}},
                        {"name": "workload-certs", "emptyDir": {}},
                        {"name": "istio-envoy", "emptyDir": {"medium": "Memory"}},
                        {"name": "istio-data", "emptyDir": {}},
                        {"name": "istio-podinfo", "downwardAPI": {}},
                        {"name": "istio-token", "projected": {}},
                        {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
                    ],
                }
            },
        },
    }


def fetch_parameters(gw: dict) -> Optional[tuple[str, str]]:
    """fetchParameters: (namespace, name) of the parametersRef ConfigMap, or None."""
    ref = (gw["spec"].get("infrastructure") or {}).get("parametersRef")
    if ref is None:
        return None
    if ref.get("kind") != "ConfigMap" or ref.get("group") != "":
        raise RenderError(f"invalid parameters: unknown infrastructure parameters type {ref.get('group')}/{ref.get('kind')}")
    return gw["metadata"]["namespace"], ref["name"]


def render(gw: dict, configmaps: list[dict], resources: Optional[dict] = None) -> dict:
    """DeploymentController.render for the Deployment: the template, then each overlay."""
    overlays = []
    params = fetch_parameters(gw)
    if params is not None:
        hits = [c for c in configmaps if (c["metadata"]["namespace"], c["metadata"]["name"]) == params]
        if not hits:
            raise RenderError(f"parametersRef targeting configmap {params[0]}/{params[1]}, but configmap does not exist")
        overlays.append(hits[0].get("data") or {})
    return apply_overlay(kube_gateway_deployment(gw, resources), overlays)


def apply_overlay(obj: dict, overlays: list[dict]) -> dict:
    """applyOverlay for a Deployment."""
    out = copy.deepcopy(obj)
    for data in overlays:
        unsupported = sorted(set(data) - SUPPORTED_OVERLAYS)
        if unsupported:
            raise RenderError(f"unsupported overlay {unsupported[0]!r} (supported: {sorted(SUPPORTED_OVERLAYS)})")
        if "deployment" not in data:
            continue
        patch = yaml.safe_load(data["deployment"]) or {}
        out = strategic_merge(out, patch, ())
    a, b = obj["metadata"], out["metadata"]
    for k in ("name", "generateName", "namespace", "uid", "ownerReferences", "finalizers"):
        if a.get(k) != b.get(k):
            raise RenderError("illegal metadata change")
    return out


def _merge_key(path: tuple) -> Optional[str]:
    for pattern, key in MERGE_KEYS.items():
        if len(pattern) == len(path) and all(p == "*" or p == q for p, q in zip(pattern, path)):
            return key
    return None


def strategic_merge(orig: Any, patch: Any, path: tuple) -> Any:
    """The subset of Kubernetes' strategic merge patch the overlay uses: maps merge key by key
    (null deletes), lists with a merge key merge item by item on it (new items appended in the
    patch's order), other lists and scalars are replaced. Patch directives ($patch,
    $setElementOrder, $retainKeys, $deleteFromPrimitiveList) are refused rather than guessed."""
    if isinstance(patch, dict):
        for k in patch:
            if isinstance(k, str) and k.startswith("$"):
                raise NotImplementedError(f"strategic merge directive {k} at {'/'.join(path)}")
        if not isinstance(orig, dict):
            return copy.deepcopy(patch)
        out = copy.deepcopy(orig)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = strategic_merge(out.get(k), v, path + (k,))
        return out
    if isinstance(patch, list):
        key = _merge_key(path)
        if key is None or not isinstance(orig, list):
            return copy.deepcopy(patch)
        out = copy.deepcopy(orig)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise ValueError(f"{'/'.join(path)}: list item without its merge key {key!r}: {item!r}")
            for i, cur in enumerate(out):
                if cur.get(key) == item[key]:
                    out[i] = strategic_merge(cur, item, path + ("*",))
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def proxy_container(deploy: dict) -> dict:
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "istio-proxy"]
    return c


def env_value(container: dict, name: str) -> Optional[str]:
    for e in container.get("env", []):
        if e["name"] == name:
            return e.get("value")
    return None


def mounted_file(deploy: dict, container: dict, path: str, configmaps: list[dict]) -> Optional[str]:
    """The text of the file at `path` inside the container, if a ConfigMap volume provides it
    (the kubelet writes each key, or each `items` entry, as a file under the mount path)."""
    ns = deploy["metadata"]["namespace"]
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"].get("volumes", [])}
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        if not path.startswith(mount + "/"):
            continue
        rel = path[len(mount) + 1:]
        if m.get("subPath"):
            raise NotImplementedError("subPath mounts")
        cm_ref = volumes.get(m["name"], {}).get("configMap")
        if cm_ref is None:
            return None
        hits = [c for c in configmaps if c["metadata"]["namespace"] == ns and c["metadata"]["name"] == cm_ref["name"]]
        if not hits:
            return None  # the pod would not start (a missing non-optional ConfigMap volume)
        data = hits[0].get("data") or {}
        items = cm_ref.get("items")
        files = {it["path"]: data.get(it["key"]) for it in items} if items else dict(data)
        return files.get(posixpath.normpath(rel))
    return None


def bootstrap_override(deploy: dict, configmaps: list[dict], host_ip: str = "127.0.0.1") -> Optional[str]:
    """The JSON the agent passes to Envoy as --config-yaml, or None (no override, or a file the
    agent cannot read: it logs "Failed to read bootstrap override" and starts Envoy without)."""
    c = proxy_container(deploy)
    path = env_value(c, OVERRIDE_ENV)
    if not path:
        return None
    text = mounted_file(deploy, c, path, configmaps)
    if text is None:
        return None
    text = text.replace("$(HOST_IP)", host_ip)  # readBootstrapToJSON
    return json.dumps(yaml.safe_load(text))


def agent_envoy_args(override_json: Optional[str]) -> list[str]:
    """The flags the agent adds to `-c <bootstrap>` that matter here (envoy.args)."""
    args = list(AGENT_ENVOY_FLAGS)
    if override_json is not None:
        args += ["--config-yaml", override_json]
    return args
