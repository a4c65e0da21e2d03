"""The gateway's Envoy configuration: one listener per configuration, derived from
bench/envoy/gateway.yaml and the shipped filter block of envoy/envoy.yaml."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from . import settings
from .settings import BENCH, FLOOR_MODES, FLOOR_WASM, MODEL, ROOT, SHIPPED_ENVOY_YAML, WASM
from .processes import Envoy


def fill(template: Path, ports: dict[str, int]) -> dict:
    text = template.read_text()
    for key, value in ports.items():
        text = text.replace(f"__{key}__", str(value))
    left = re.findall(r"__[A-Z_]+__", text)
    left = [x for x in left if not x.startswith("__SHIPPED_BBR_WASM_FILTER")]
    if left:
        raise SystemExit(f"bench: unfilled placeholders in {template}: {left}")
    return yaml.safe_load(text)


def shipped_wasm_filter(early: bool = False) -> dict:
    """The wasm filter entry of envoy/envoy.yaml (the shipped configuration), .wasm made absolute.

    early: the bbr_early diagnostic, the same plus "routeBeforeBodyEnds": true, in its own VM."""
    cfg = yaml.safe_load(SHIPPED_ENVOY_YAML.read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    if len(wasm) != 1:
        raise SystemExit("bench: envoy/envoy.yaml has no single envoy.filters.http.wasm filter")
    entry = json.loads(json.dumps(wasm[0]))
    config = entry["typed_config"]["config"]
    config["vm_config"]["code"]["local"]["filename"] = str(WASM)
    if early:
        plugin = json.loads(config["configuration"]["value"])
        plugin["routeBeforeBodyEnds"] = True
        config["configuration"]["value"] = json.dumps(plugin)
        config["name"] = config["name"] + "_early"
        config["vm_config"]["vm_id"] = config["vm_config"].get("vm_id", "bbr") + "_early"
    return entry


def gateway_config(ports: dict[str, int]) -> dict:
    cfg = fill(BENCH / "envoy" / "gateway.yaml", ports)
    wasm = {"__SHIPPED_BBR_WASM_FILTER__": shipped_wasm_filter(),
            "__SHIPPED_BBR_WASM_FILTER_EARLY__": shipped_wasm_filter(early=True)}
    replaced = 0
    for listener in cfg["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        filters = hcm["http_filters"]
        for i, f in enumerate(filters):
            if f["name"] in wasm:
                filters[i] = wasm[f["name"]]
                replaced += 1
    assert replaced == len(wasm)
    # The floor listeners: copies of the `buffer` listener (routed on the client's header)
    # with the C++ buffer filter replaced by the floor filter in one of its modes.
    for mode in FLOOR_MODES:
        add_listener_copy(cfg, "buffer", f"wasm_{mode}", ports, floor_wasm_filter(mode))
    alt = os.environ.get("BENCH_ALT_WASM")
    if alt:
        # A copy of the bbr listener running the other build, in its own VM.
        entry = shipped_wasm_filter()
        config = entry["typed_config"]["config"]
        config["name"] = config["name"] + "_alt"
        config["vm_config"]["vm_id"] = config["vm_config"].get("vm_id", "bbr") + "_alt"
        config["vm_config"]["code"]["local"]["filename"] = str(Path(alt).resolve())
        add_listener_copy(cfg, "bbr", "bbr_alt", ports, entry)
    # The shipped filter with prefixAffinity off, in its own VM: what the prompt capture and the
    # key cost the gateway, against `bbr`, which runs the shipped configuration.
    entry = shipped_wasm_filter()
    config = entry["typed_config"]["config"]
    plugin = json.loads(config["configuration"]["value"])
    plugin["prefixAffinity"] = {"enabled": False}
    config["configuration"]["value"] = json.dumps(plugin)
    config["name"] = config["name"] + "_noprefix"
    config["vm_config"]["vm_id"] = config["vm_config"].get("vm_id", "bbr") + "_noprefix"
    add_listener_copy(cfg, "bbr", "bbr_noprefix", ports, entry)
    for name in PICKER_CONFIGS:  # optional: the default gateway stays as it was
        if name in settings.CONFIGS:
            add_picker_listener(cfg, ports, name, retry=name == "bbr_picker")
    return cfg


PICKER_POLICY = ROOT / "envoy" / "picker-lb-policy.yaml"
PICKER_CLUSTER = "qwen-pool-picker"
PICKER_CONFIGS = ("bbr_picker", "bbr_picker_noretry")
PICKER_STATS = r"^wasmcustom\.bbr_endpoint_(picked|failed_over)_total$"


def add_picker_listener(cfg: dict, ports: dict[str, int], name: str = "bbr_picker", retry: bool = True) -> None:
    """bbr_picker: the shipped filter with prefixAffinity.picker on, in its own VM, and the
    deployment docs/prefix-affinity.md describes around it: the qwen routes go to a copy of the
    qwen cluster whose lb_policy is envoy/picker-lb-policy.yaml's override_host (fallback least
    request), with that file's retry policy on the routes. The picker's pool lists the bench's
    one upstream (the qwen port), so every qwen request is scored, picked, recorded in the
    endpoint's block LRU and sent where x-gateway-destination-endpoint says; against `bbr`
    (same filter, picker off, plain cluster) the difference is what replica choice costs the
    gateway. One endpoint: the scores are computed over one candidate, as small a pool as
    there is (the cost of a larger pool's scoring is not measured here).

    retry=False (bbr_picker_noretry, a diagnostic): the same without the routes' retry policy.
    Both share the cluster; each listener has its own VM, so its own picker table."""
    example = yaml.safe_load(PICKER_POLICY.read_text())
    entry = shipped_wasm_filter()
    config = entry["typed_config"]["config"]
    plugin = json.loads(config["configuration"]["value"])
    endpoint = f"127.0.0.1:{ports['UPSTREAM_QWEN']}"
    plugin["prefixAffinity"] = {"enabled": True, "picker": {"pools": [
        {"cluster": PICKER_CLUSTER, "baseModels": [MODEL], "endpoints": [endpoint]}]}}
    config["configuration"]["value"] = json.dumps(plugin)
    suffix = name.removeprefix("bbr")
    config["name"] = config["name"] + suffix
    config["vm_config"]["vm_id"] = config["vm_config"].get("vm_id", "bbr") + suffix
    add_listener_copy(cfg, "bbr", name, ports, entry)
    listener = cfg["static_resources"]["listeners"][-1]
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    qwen_routes = [r for r in routes if r["route"].get("cluster") == "qwen-pool"]
    if len(qwen_routes) != 1:
        raise SystemExit("bench: the bbr listener has no single route to qwen-pool")
    qwen_routes[0]["route"]["cluster"] = PICKER_CLUSTER
    if retry:
        qwen_routes[0]["route"].update(json.loads(json.dumps(example["route"])))
    clusters = cfg["static_resources"]["clusters"]
    if any(c["name"] == PICKER_CLUSTER for c in clusters):
        return
    cluster = json.loads(json.dumps(next(c for c in clusters if c["name"] == "qwen-pool")))
    cluster["name"] = PICKER_CLUSTER
    cluster["load_assignment"]["cluster_name"] = PICKER_CLUSTER
    cluster.pop("lb_policy", None)
    cluster.update(json.loads(json.dumps(example["cluster"])))
    clusters.append(cluster)


def picker_stats(gw: Envoy) -> dict[str, int]:
    """The filter's picker counters (all bbr VMs define them; only bbr_picker's picks)."""
    return {k.removeprefix("wasmcustom.bbr_"): v for k, v in gw.stats(PICKER_STATS).items()}


def add_listener_copy(cfg: dict, template: str, name: str, ports: dict[str, int], first_filter: dict) -> None:
    """Appends a copy of the `template` listener as `name` (port PORT_<NAME>, its own stat prefix
    and route config name), with its first HTTP filter replaced by `first_filter`."""
    source = next(l for l in cfg["static_resources"]["listeners"] if l["name"] == template)
    listener = json.loads(json.dumps(source))
    listener["name"] = name
    listener["address"]["socket_address"]["port_value"] = ports[f"PORT_{name.upper()}"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = name
    hcm["route_config"]["name"] = f"{name}_routes"
    hcm["http_filters"][0] = first_filter
    cfg["static_resources"]["listeners"].append(listener)


def floor_wasm_filter(mode: str) -> dict:
    """The floor filter in `mode`, with the same VM settings as the shipped filter."""
    entry = shipped_wasm_filter()
    config = entry["typed_config"]["config"]
    config["name"] = f"floor_{mode}"
    config["configuration"]["value"] = mode
    config["vm_config"]["vm_id"] = "floor"
    config["vm_config"]["code"]["local"]["filename"] = str(FLOOR_WASM)
    return entry
