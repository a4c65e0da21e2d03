"""What istiod and the istio-agent make of the manifests in istio/, as static Envoy config.

A real Istio gateway gets its configuration over xDS: istiod serves the EnvoyFilter's
EXTENSION_CONFIG patch over ECDS, the istio-agent pulls the module and rewrites the remote
code source into a local file, and the HTTP_FILTER patch refers to the extension through
`config_discovery` (ADS). A static Envoy has no ADS, so this builds the equivalent static
configuration: the extension's `typed_config` inlined where the `config_discovery`
reference stands, with the agent's rewrite applied (code.local.filename = the module pulled
from the registry). The HTTPRoutes become Envoy routes (PathPrefix + Exact header -> one
cluster per InferencePool), each pool a cluster on a mock backend, and the LISTENER MERGE
patch is merged into the listener. Sources mirrored: istio/istio pkg/wasm/convert.go
(rewriteVMConfig), pilot/pkg/model/extensions.go (WasmPlugin -> Envoy Wasm).
"""

from __future__ import annotations

import copy
import json
import math
from decimal import Decimal
from typing import Any, Optional

WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"
HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"


def find(docs: list[dict], kind: str, name: Optional[str] = None) -> dict:
    hits = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    if len(hits) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(hits)}")
    return hits[0]


def patches(envoyfilter: dict, apply_to: str) -> list[dict]:
    return [p for p in envoyfilter["spec"]["configPatches"] if p["applyTo"] == apply_to]


def one_patch(envoyfilter: dict, apply_to: str) -> dict:
    ps = patches(envoyfilter, apply_to)
    if len(ps) != 1:
        raise AssertionError(f"expected one {apply_to} patch, found {len(ps)}")
    return ps[0]


def extension_config(envoyfilter: dict) -> dict:
    """The TypedExtensionConfig {name, typed_config} of the EXTENSION_CONFIG patch."""
    return copy.deepcopy(one_patch(envoyfilter, "EXTENSION_CONFIG")["patch"]["value"])


def filter_configuration(typed_config: dict) -> str:
    """The JSON the filter receives (the StringValue `configuration`)."""
    conf = typed_config["config"]["configuration"]
    assert conf["@type"] == STRING_VALUE_TYPE, conf
    return conf["value"]


def agent_localize(typed_config: dict, module_path: str, manifest_digest: Optional[str]) -> dict:
    """The istio-agent's rewrite (pkg/wasm/convert.go rewriteVMConfig): the remote OCI source
    becomes a local file once the pulled image's manifest digest matched `sha256`
    (pkg/wasm/cache.go). With manifest_digest None the check is skipped (local module)."""
    tc = copy.deepcopy(typed_config)
    vm = tc["config"]["vm_config"]
    remote = vm["code"]["remote"]
    sha = remote.get("sha256", "")
    if sha == "nil":
        sha = ""
    if manifest_digest is not None and sha and sha != manifest_digest:
        raise ValueError(
            f"module downloaded from {remote['http_uri']['uri']} has checksum {manifest_digest}, which does not match: {sha}"
        )
    vm["code"] = {"local": {"filename": module_path}}
    env = vm.get("environment_variables", {}).get("key_values")
    if env is not None:
        for k in [k for k in env if k.startswith("ISTIO_META_")]:
            del env[k]
        if not env and not vm["environment_variables"].get("host_env_keys"):
            del vm["environment_variables"]
    return tc


def go_protojson(value: Any) -> str:
    """google.protobuf.Struct -> JSON as istiod writes a WasmPlugin's pluginConfig
    (protomarshal.ToJSON): every number is a double, printed like Go's encoding/json
    (integral values without a fraction, exponent form only below 1e-6 or from 1e21)."""

    def enc(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            f = float(v)
            if math.isnan(f) or math.isinf(f):
                raise ValueError("NaN and Infinity are not valid in a Struct")
            a = abs(f)
            if a != 0 and (a < 1e-6 or a >= 1e21):
                s = repr(f)  # shortest round-trip digits, e.g. 1e-07, 1.5e+21
                if "e-0" in s:  # Go cleans e-07 up to e-7
                    s = s.replace("e-0", "e-")
                return s
            if f.is_integer():
                return str(int(f))
            return format(Decimal(repr(f)), "f")  # shortest digits, never an exponent
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ",".join(enc(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ",".join(json.dumps(str(k)) + ":" + enc(v[k]) for k in sorted(v)) + "}"
        raise TypeError(f"not representable in a Struct: {type(v).__name__}")

    return enc(value)


def wasmplugin_to_typed_config(wasmplugin: dict, module_path: str) -> dict:
    """The Envoy Wasm filter istiod builds from a WasmPlugin (pilot/pkg/model/extensions.go),
    after the agent's rewrite. Note what is NOT there: allow_on_headers_stop_iteration, which
    the WasmPlugin API cannot express."""
    spec = wasmplugin["spec"]
    meta = wasmplugin["metadata"]
    config: dict = {
        "name": f"{meta.get('namespace', 'default')}.{meta['name']}",
        "root_id": spec.get("pluginName", ""),
        "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": module_path}}},
    }
    if spec.get("pluginConfig"):
        config["configuration"] = {"@type": STRING_VALUE_TYPE, "value": go_protojson(spec["pluginConfig"])}
    strategy = spec.get("failStrategy", "FAIL_CLOSE")
    config["failure_policy"] = {"FAIL_CLOSE": "FAIL_CLOSED", "FAIL_OPEN": "FAIL_OPEN", "FAIL_RELOAD": "FAIL_RELOAD"}[strategy]
    return {"@type": WASM_TYPE, "config": config}


def routes_from_httproutes(httproutes: list[dict]) -> list[dict]:
    """Gateway API HTTPRoute rules -> Envoy routes (PathPrefix and Exact header matches only,
    the subset istio/base uses; anything else is an error here rather than a silent skip)."""
    out = []
    for hr in httproutes:
        for ri, rule in enumerate(hr["spec"]["rules"]):
            refs = rule["backendRefs"]
            if len(refs) != 1 or refs[0].get("kind") != "InferencePool":
                raise AssertionError(f"{hr['metadata']['name']}: expected one InferencePool backendRef")
            for mi, m in enumerate(rule["matches"]):
                path = m.get("path", {"type": "PathPrefix", "value": "/"})
                if path["type"] != "PathPrefix":
                    raise AssertionError(f"unsupported path match {path}")
                match: dict = {"prefix": path["value"]}
                headers = []
                for h in m.get("headers", []):
                    if h.get("type", "Exact") != "Exact":
                        raise AssertionError(f"unsupported header match {h}")
                    headers.append({"name": h["name"].lower(), "string_match": {"exact": h["value"]}})
                if headers:
                    match["headers"] = headers
                out.append(
                    {
                        "name": f"{hr['metadata']['name']}.{ri}.{mi}",
                        "match": match,
                        "route": {"cluster": refs[0]["name"], "timeout": "0s"},
                    }
                )
    return out


def static_gateway(
    http_filter: dict,
    routes: list[dict],
    cluster_ports: dict[str, int],
    listener_port: int,
    admin_port: int,
    listener_merge: Optional[dict] = None,
    hcm_merge: Optional[dict] = None,
    bootstrap_merge: Optional[dict] = None,
) -> dict:
    """A static Envoy bootstrap standing in for the Istio gateway. `hcm_merge` is the value of a
    NETWORK_FILTER MERGE patch on the HTTP connection manager (its typed_config's fields are
    merged into the HCM's, as istiod merges the patch)."""
    listener = {
        "name": "gateway",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": HCM,
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "gateway",
                            "codec_type": "AUTO",
                            "route_config": {
                                "name": "gateway",
                                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
                            },
                            "http_filters": [
                                http_filter,
                                {
                                    "name": ROUTER,
                                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                                },
                            ],
                        },
                    }
                ]
            }
        ],
    }
    if listener_merge:
        listener.update(copy.deepcopy(listener_merge))
    if hcm_merge:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        merge = copy.deepcopy(hcm_merge.get("typed_config", {}))
        if merge.pop("@type", hcm["@type"]) != hcm["@type"]:
            raise AssertionError("the NETWORK_FILTER patch is not for the HTTP connection manager")
        hcm.update(merge)
    clusters = [
        {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "5s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}
                ],
            },
        }
        for name, port in cluster_ports.items()
    ]
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
        # What Istio's own bootstrap template has (tools/packaging/common/envoy_bootstrap.json):
        # the connection-count monitor, so that a merged custom bootstrap must not repeat it.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 2147483647,
                    },
                }
            ]
        },
    }
    if bootstrap_merge:
        merge_bootstrap(bootstrap, bootstrap_merge)
    return bootstrap


def merge_bootstrap(into: dict, custom: dict) -> None:
    """The istio-agent's merge of a custom bootstrap (sidecar.istio.io/bootstrapOverride) into
    its own: protobuf MergeFrom semantics, i.e. messages merged field by field, repeated fields
    appended, scalars replaced."""
    for key, value in custom.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_bootstrap(into[key], value)
        elif isinstance(value, list) and isinstance(into.get(key), list):
            into[key].extend(copy.deepcopy(value))
        else:
            into[key] = copy.deepcopy(value)


def http_filter_from_envoyfilter(envoyfilter: dict, typed_config: dict) -> dict:
    """The HTTP_FILTER patch with its config_discovery reference replaced by the (localized)
    extension config it names: the static equivalent of ECDS."""
    value = copy.deepcopy(one_patch(envoyfilter, "HTTP_FILTER")["patch"]["value"])
    ext = extension_config(envoyfilter)
    if value["name"] != ext["name"]:
        raise AssertionError(f"HTTP_FILTER refers to {value['name']!r}, EXTENSION_CONFIG is {ext['name']!r}")
    cd = value.pop("config_discovery")
    if typed_config["@type"] not in cd["type_urls"]:
        raise AssertionError(f"{typed_config['@type']} not in config_discovery.type_urls {cd['type_urls']}")
    value["typed_config"] = typed_config
    return value
