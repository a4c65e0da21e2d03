"""What istiod and the istio-agent make of the manifests in istio/, as Envoy configuration.

A real Istio gateway gets its listeners over LDS and its extension configs over ECDS, both from
istiod through the istio-agent. Here:
- the gateway listener starts from what istiod builds for a Gateway API gateway's HTTP port
  (istio_gateway_listener: the connection manager's fields, stream_idle_timeout 0s among them,
  and the HTTP filters of upstream Envoy that Istio puts there), the HTTPRoutes inlined as its
  route configuration (istiod serves them over RDS);
- the EnvoyFilter's patches are applied to it as istiod applies them (apply_envoyfilter);
- ECDS stays ECDS: the HTTP filter keeps its `config_discovery`, type_urls and initial fetch
  timeout, with the ADS source replaced by a file that holds what the agent would forward
  (agent_convert: the module pulled and localized, or the agent's RBAC fallback). Envoy itself
  then applies its checks to it, the type_urls check included;
- the bootstrap is Istio's, for the parts that matter here (istio_bootstrap), and the agent's
  bootstrap override is passed as Envoy's --config-yaml (istio_deploy.py).
Each emulated behaviour and its source, file and function at Istio 1.28.0, is listed in
docs/istio-fidelity.md.
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


RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
TYPED_EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

# pkg/wasm/convert.go: DefaultAllowStatPrefix, DefaultDenyStatPrefix.
DEFAULT_ALLOW_STAT_PREFIX = "wasm-default-allow"
DEFAULT_DENY_STAT_PREFIX = "wasm-default-deny"


def istio_gateway_hcm(routes: list[dict], stat_prefix: str = "outbound_0.0.0.0_80") -> dict:
    """The HTTP connection manager istiod builds for a gateway's plain-HTTP server:
    pilot/pkg/networking/core/gateway.go buildGatewayConnectionManager (forward_client_cert_details
    SANITIZE_SET with set_current_client_cert_details, http_protocol_options) and
    createGatewayHTTPFilterChainOpts (use_remote_address), then listener_builder.go
    buildHTTPConnectionManager (codec AUTO, normalize_path, path_with_escaped_slashes_action,
    the websocket upgrade, stream_idle_timeout 0s, an empty access log list) with the mesh
    defaults. The route configuration comes over RDS in Istio; here it is inline."""
    return {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "route_config": {"name": "http.80", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_protocol_options": {},
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"subject": True, "cert": True, "dns": True, "uri": True},
        "use_remote_address": True,
        "normalize_path": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        # Istio: "0s", i.e. no stream idle timeout on any connection manager it builds.
        "stream_idle_timeout": "0s",
        "http_filters": istio_gateway_http_filters(),
    }


def istio_gateway_http_filters() -> list[dict]:
    """listener_builder.go buildHTTPConnectionManager's filter list for a gateway, the filters
    of upstream Envoy only (pilot/pkg/xds/filters/filters.go GrpcStats, Fault, Cors and the
    router). Left out: Istio's own istio.alpn and istio.stats (not in upstream Envoy), the
    authn/authz filters (no policies here) and the InferencePool ext_proc (no endpoint picker
    here). bbr-wasm goes before all of them (INSERT_FIRST)."""
    return [
        {
            "name": "envoy.filters.http.grpc_stats",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                "emit_filter_state": True,
                "stats_for_all_methods": False,
            },
        },
        {"name": "envoy.filters.http.fault", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.cors", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": ROUTER, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
    ]


def istio_gateway_listener(routes: list[dict], port: int) -> dict:
    return {
        "name": "0.0.0.0_80",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": HCM, "typed_config": istio_gateway_hcm(routes)}]}],
    }


def proto_merge(dst: dict, src: dict, where: str = "") -> dict:
    """proto.Merge on the JSON form, as istiod merges a MERGE patch (pilot/pkg/networking/util
    MergeAnyWithAny for typed configs): message fields merged recursively, repeated fields
    appended, scalars replaced. Two typed configs of different types are not merged."""
    if "@type" in dst and "@type" in src and dst["@type"] != src["@type"]:
        raise AssertionError(f"{where}: cannot merge {src['@type']} into {dst['@type']}")
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            proto_merge(dst[k], v, f"{where}.{k}")
        elif isinstance(v, list) and isinstance(dst.get(k), list):
            dst[k].extend(copy.deepcopy(v))
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _http_filter_match(p: dict) -> Optional[str]:
    return ((p.get("match") or {}).get("listener") or {}).get("filterChain", {}).get("filter", {}).get("subFilter", {}).get("name")


def apply_envoyfilter(listener: dict, envoyfilter: dict) -> dict:
    """pilot/pkg/networking/core/envoyfilter/listener_patch.go: patchListener (LISTENER MERGE),
    then per filter chain patchNetworkFilter (NETWORK_FILTER MERGE into the connection
    manager), then patchHTTPFilters (HTTP_FILTER operations, in the order of the patches).
    Only the operations istio/ uses are emulated; any other is an error here."""
    out = copy.deepcopy(listener)
    for p in patches(envoyfilter, "LISTENER"):
        if p["patch"]["operation"] != "MERGE":
            raise AssertionError(f"LISTENER {p['patch']['operation']} not emulated")
        proto_merge(out, p["patch"]["value"], "listener")
    hcm_filter = out["filter_chains"][0]["filters"][0]
    hcm = hcm_filter["typed_config"]
    for p in patches(envoyfilter, "NETWORK_FILTER"):
        if p["patch"]["operation"] != "MERGE":
            raise AssertionError(f"NETWORK_FILTER {p['patch']['operation']} not emulated")
        if p["match"]["listener"]["filterChain"]["filter"]["name"] != HCM:
            raise AssertionError("NETWORK_FILTER patch does not match the HTTP connection manager")
        proto_merge(hcm, p["patch"]["value"]["typed_config"], "hcm")
    filters = hcm["http_filters"]
    for p in patches(envoyfilter, "HTTP_FILTER"):
        op, value, sub = p["patch"]["operation"], copy.deepcopy(p["patch"]["value"]), _http_filter_match(p)
        if op == "INSERT_FIRST":
            filters.insert(0, value)
        elif op == "ADD" or (op == "INSERT_AFTER" and sub is None):
            filters.append(value)
        elif op == "INSERT_AFTER":
            at = [i for i, f in enumerate(filters) if f["name"] == sub]
            for i in reversed(at):  # insertAfterFunc: after every match
                filters.insert(i + 1, copy.deepcopy(value))
        else:
            raise AssertionError(f"HTTP_FILTER {op} not emulated")
    return out


def ecds_from_file(listener: dict, ecds_path: str) -> dict:
    """Every HTTP filter's ADS `config_discovery` source becomes a file source at ecds_path,
    everything else in it (type_urls, initial_fetch_timeout, the API version) unchanged."""
    out = copy.deepcopy(listener)
    for f in out["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
        cd = f.get("config_discovery")
        if cd is None:
            continue
        src = cd["config_source"]
        if src.pop("ads", None) != {}:
            raise AssertionError(f"{f['name']}: config_discovery is not over ADS: {src}")
        src["path_config_source"] = {"path": ecds_path}
    return out


def ecds_response(configs: list[dict], version: str = "1") -> dict:
    """A DiscoveryResponse of TypedExtensionConfigs, as Envoy reads it from a file source."""
    return {
        "version_info": version,
        "resources": [{"@type": TYPED_EXTENSION_CONFIG, **copy.deepcopy(c)} for c in configs],
    }


def rbac_fallback(name: str, fail_open: bool) -> dict:
    """pkg/wasm/convert.go createHTTPDefaultFilter: the TypedExtensionConfig the agent forwards
    under the filter's own name when it cannot pull or verify the module: an RBAC filter with no
    rules (allow all) for fail-open, with empty rules (deny all) otherwise."""
    if fail_open:
        tc = {"@type": RBAC_TYPE, "rules_stat_prefix": DEFAULT_ALLOW_STAT_PREFIX}
    else:
        tc = {"@type": RBAC_TYPE, "rules": {}, "rules_stat_prefix": DEFAULT_DENY_STAT_PREFIX}
    return {"name": name, "typed_config": tc}


def http_wasm_fail_open(typed_config: dict) -> bool:
    """convert.go httpWasmFailOpen: failure_policy if set, else the deprecated fail_open."""
    config = typed_config.get("config", {})
    policy = config.get("failure_policy", "UNSPECIFIED")
    if policy != "UNSPECIFIED":
        return policy == "FAIL_OPEN"
    return bool(config.get("fail_open", False))


def agent_convert(ext: dict, pull) -> dict:
    """convert.go MaybeConvertWasmExtensionConfig for one HTTP Wasm extension config with a
    remote source: `pull(uri, sha256)` returns (module_path, manifest_digest) or raises; on any
    error the agent logs it and forwards the RBAC fallback instead (rbac_fallback)."""
    tc = ext["typed_config"]
    if tc["@type"] != WASM_TYPE or "remote" not in tc["config"]["vm_config"]["code"]:
        return copy.deepcopy(ext)
    remote = tc["config"]["vm_config"]["code"]["remote"]
    try:
        path, digest = pull(remote["http_uri"]["uri"], remote.get("sha256", ""))
        return {"name": ext["name"], "typed_config": agent_localize(tc, path, digest)}
    except (RuntimeError, ValueError, OSError):  # the agent falls back on every fetch or check error
        return rbac_fallback(ext["name"], http_wasm_fail_open(tc))


def istio_bootstrap(listener: dict, cluster_ports: dict[str, int], admin_port: int) -> dict:
    """The agent's generated bootstrap (tools/packaging/common/envoy_bootstrap.json), for the
    parts that matter here: a node (Envoy needs one for a file ECDS source; the ID in Istio's
    router~IP~pod.namespace~namespace.svc.cluster.local form), the admin listener, and the overload
    manager with only the connection-count monitor. Listeners and clusters come over xDS in Istio;
    here they are static, one STATIC cluster per InferencePool on its mock backend."""
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
    return {
        "node": {
            "id": "router~127.0.0.1~infra-pattern1-inference-gateway-istio-0.llm-d-inference-scheduling~llm-d-inference-scheduling.svc.cluster.local",
            "cluster": "infra-pattern1-inference-gateway-istio.llm-d-inference-scheduling",
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
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
