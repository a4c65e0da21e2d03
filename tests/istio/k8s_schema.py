"""Offline validation of Kubernetes manifests, as strict as `kubectl apply` against a server.

- Core kinds (Service, Deployment, ConfigMap, ...) are checked by kubernetes-validate
  (PyPI), which ships the Kubernetes OpenAPI schemas, in strict mode.
- Custom resources (Istio, Gateway API, InferencePool) are checked against the
  `openAPIV3Schema` of their CRD (the files in shared/schemas/crds) with jsonschema, after
  translating the Kubernetes extensions of OpenAPI v3 into plain JSON Schema:
    nullable: true                          -> null is allowed too
    x-kubernetes-int-or-string: true        -> an integer or a string
    x-kubernetes-preserve-unknown-fields    -> unknown fields allowed below it (e.g. an
                                               EnvoyFilter patch value)
    any other object schema with properties -> unknown fields are an error, as the API
                                               server's strict field validation makes them
    x-kubernetes-list-type: set / map       -> items / their list-map-keys must be unique
    x-kubernetes-embedded-resource          -> apiVersion, kind and metadata allowed
  CEL rules (x-kubernetes-validations) are NOT evaluated: there is no CEL interpreter here.
  The version must be one the CRD serves.
- metadata is checked on every document: a DNS-1123 name, a namespace, and label and
  annotation keys and values that the API server accepts.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import jsonschema
import yaml

# API groups whose kinds are built into Kubernetes: kubernetes-validate knows them.
CORE_GROUPS = {
    "",
    "apps",
    "batch",
    "autoscaling",
    "policy",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
    "storage.k8s.io",
    "scheduling.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "node.k8s.io",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "certificates.k8s.io",
    "events.k8s.io",
    "flowcontrol.apiserver.k8s.io",
}

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*"
_QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = rf"({_QUALIFIED_NAME})?"

METADATA_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": rf"^{_DNS1123_SUBDOMAIN}$"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": rf"^{_DNS1123_LABEL}$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63, "pattern": rf"^{_LABEL_VALUE}$"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _valid_key(key: str) -> bool:
    """A label or annotation key: [DNS-1123 subdomain prefix '/'] name (max 63)."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not re.fullmatch(_DNS1123_SUBDOMAIN, prefix)):
        return False
    return 0 < len(name) <= 63 and re.fullmatch(_QUALIFIED_NAME, name) is not None


@dataclass(frozen=True)
class Doc:
    """One YAML document of a manifest file."""

    path: Path
    index: int
    body: Any

    @property
    def where(self) -> str:
        kind = self.body.get("kind", "?") if isinstance(self.body, dict) else "?"
        name = (self.body.get("metadata") or {}).get("name", "?") if isinstance(self.body, dict) else "?"
        return f"{self.path}#{self.index} ({kind} {name})"


def load_docs(path: Path) -> list[Doc]:
    with open(path) as f:
        return [Doc(path, i, body) for i, body in enumerate(yaml.safe_load_all(f)) if body is not None]


def to_json_schema(node: Any) -> Any:
    """Translates a CRD's structural OpenAPI v3 schema into JSON Schema (see module doc)."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, (dict, list)):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(v) for v in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "default", "example", "externalDocs"):
            continue  # handled below, or no validation meaning
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        t = out["type"]
        out["type"] = (t if isinstance(t, list) else [t]) + ["null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if node.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {})
        for k in ("apiVersion", "kind"):
            out["properties"].setdefault(k, {"type": "string"})
        out["properties"].setdefault("metadata", {"type": "object"})
    if node.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_errors(schema: Any, value: Any, where: str) -> list[str]:
    """x-kubernetes-list-type: map -> the list-map-keys of the items must be unique."""
    errs: list[str] = []
    if not isinstance(schema, dict):
        return errs
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for k, v in value.items():
            sub = props.get(k)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                errs += _list_map_errors(sub, v, f"{where}.{k}")
    elif isinstance(value, list):
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = set()
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    t = tuple(item.get(k) for k in keys)
                    if t in seen:
                        errs.append(f"{where}[{i}]: duplicate entry for list-map keys {keys}={list(t)}")
                    seen.add(t)
        for i, item in enumerate(value):
            errs += _list_map_errors(schema.get("items") or {}, item, f"{where}[{i}]")
    return errs


@dataclass
class CrdVersion:
    group: str
    kind: str
    version: str
    served: bool
    openapi: dict
    schema: dict


class Validator:
    def __init__(self, crd_dir: Path, kubernetes_version: Optional[str] = None):
        import kubernetes_validate

        self.kubernetes_version = kubernetes_version or kubernetes_validate.latest_version()
        self.crds: dict[tuple[str, str, str], CrdVersion] = {}
        for path in sorted(Path(crd_dir).glob("*.yaml")):
            for doc in load_docs(path):
                body = doc.body
                if not isinstance(body, dict) or body.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = body["spec"]["group"], body["spec"]["names"]["kind"]
                for v in body["spec"]["versions"]:
                    openapi = (v.get("schema") or {}).get("openAPIV3Schema") or {}
                    schema = to_json_schema(openapi)
                    # Every object has these at its root, whatever the CRD lists; metadata
                    # is checked on its own (_metadata_errors).
                    props = schema.setdefault("properties", {})
                    props["apiVersion"] = {"type": "string"}
                    props["kind"] = {"type": "string"}
                    props["metadata"] = {"type": "object"}
                    self.crds[(group, v["name"], kind)] = CrdVersion(
                        group, kind, v["name"], bool(v.get("served")), openapi, schema
                    )
        if not self.crds:
            raise FileNotFoundError(f"no CustomResourceDefinition found in {crd_dir}")

    def knows(self, api_version: str, kind: str) -> bool:
        group, _, version = api_version.rpartition("/")
        return group in CORE_GROUPS or (group, version, kind) in self.crds

    def validate(self, body: Any) -> list[str]:
        """Every problem with one document; empty when the API server would take it."""
        if not isinstance(body, dict):
            return ["not a mapping"]
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            return ["apiVersion and kind are required strings"]
        errs = self._metadata_errors(body.get("metadata"))
        group, _, version = api_version.rpartition("/")
        if group in CORE_GROUPS:
            return errs + self._core_errors(body)
        crd = self.crds.get((group, version, kind))
        if crd is None:
            known = sorted(f"{g}/{v}" for (g, v, k) in self.crds if k == kind)
            hint = f" (the CRDs have {', '.join(known)})" if known else ""
            return errs + [f"no schema for {api_version} {kind}{hint}"]
        if not crd.served:
            errs.append(f"{api_version} {kind} is not served by its CRD")
        validator = jsonschema.Draft7Validator(crd.schema)
        for e in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in e.absolute_path) or "(root)"
            errs.append(f"{path}: {e.message}")
        errs += _list_map_errors(crd.openapi, body, "")
        return errs

    def _metadata_errors(self, meta: Any) -> list[str]:
        errs = [f"metadata.{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in jsonschema.Draft7Validator(METADATA_SCHEMA).iter_errors(meta)]
        if isinstance(meta, dict):
            for field in ("labels", "annotations"):
                for key in (meta.get(field) or {}):
                    if not isinstance(key, str) or not _valid_key(key):
                        errs.append(f"metadata.{field}: invalid key {key!r}")
        return errs

    def _core_errors(self, body: dict) -> list[str]:
        import kubernetes_validate

        try:
            kubernetes_validate.validate(body, self.kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(root)"
            return [f"{path}: {e.message}"]
        except kubernetes_validate.SchemaNotFoundError:
            return [f"kubernetes-validate has no schema for {body['apiVersion']} {body['kind']} "
                    f"(Kubernetes {self.kubernetes_version})"]
        return []


def yaml_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


KUSTOMIZATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "resources"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "namespace": {"type": "string", "pattern": rf"^{_DNS1123_LABEL}$"},
        "resources": {"type": "array", "minItems": 1, "items": {"type": "string"}, "uniqueItems": True},
    },
}


def kustomize_resources(kdir: Path, seen: Optional[set] = None) -> list[Path]:
    """The manifest files a kustomization pulls in, recursively (what `kubectl kustomize`
    reads; only the subset of kustomize used here: resources and namespace)."""
    seen = seen if seen is not None else set()
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    errs = list(jsonschema.Draft7Validator(KUSTOMIZATION_SCHEMA).iter_errors(k))
    if errs:
        raise ValueError(f"{kdir}/kustomization.yaml: {errs[0].message}")
    out: list[Path] = []
    for res in k["resources"]:
        target = (kdir / res).resolve()
        if target in seen:
            raise ValueError(f"{kdir}: {res} is included twice")
        seen.add(target)
        if target.is_dir():
            if not (target / "kustomization.yaml").is_file():
                raise ValueError(f"{kdir}: {res} is a directory without kustomization.yaml")
            out += kustomize_resources(target, seen)
        elif target.is_file():
            out.append(target)
        else:
            raise ValueError(f"{kdir}: resource {res} does not exist")
    return out


def kustomize_build(kdir: Path) -> list[dict]:
    """The documents of a kustomization with its `namespace:` applied (outermost wins)."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    docs = [copy.deepcopy(d.body) for p in kustomize_resources(kdir) for d in load_docs(p)]
    if k.get("namespace"):
        for d in docs:
            d.setdefault("metadata", {})["namespace"] = k["namespace"]
    return docs


def iter_docs(paths: Iterable[Path]) -> Iterable[Doc]:
    for p in paths:
        yield from load_docs(p)
