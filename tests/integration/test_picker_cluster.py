"""The endpoint picker on Envoy's own cluster (prefixAffinity.picker.hosts): no endpoint list in
the filter's configuration; the candidates and their health are the cluster's hosts as Envoy's
admin /clusters page reports them, whatever the cluster's discovery (EDS from a file here, so
hosts come and go at run time; STRICT_DNS; STATIC). The route's retry is off in every test
here: a request picked for a host Envoy knows is gone or unhealthy would fail.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import (
    DEFAULT_FILTER_CONFIG,
    QWEN,
    cluster,
    free_port,
    routes,
    set_filter_config,
)
from test_picker import PICKER_HEADER, SEEN, chat, counter, tenant_messages, use_picker_policy

# The admin page is read every 100 ms here; the stated bound for a change Envoy reports to
# reach every worker's picker is the read interval plus a tick (50 ms) plus the call: 1 s
# leaves room for a loaded machine.
BOUND_S = 1.0
ADMIN_CLUSTER = "bbr-envoy-admin"


def without_retry(cfg: dict) -> None:
    for r in routes(cfg):
        if r["route"].get("cluster") == "qwen-vllm":
            r["route"].pop("retry_policy", None)


def fast_health_checks(c: dict) -> None:
    """The shipped checks, every 300 ms (the shipped 15 s would make the test wait)."""
    hc = c["health_checks"][0]
    hc.update(interval="0.3s", timeout="0.3s", no_traffic_interval="0.3s", unhealthy_threshold=1,
              healthy_threshold=1)


def eds_document(ports: list[int], unhealthy: tuple[int, ...] = ()) -> dict:
    return {"resources": [{
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": "qwen-vllm",
        "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}},
             **({"health_status": "UNHEALTHY"} if p in unhealthy else {})}
            for p in ports
        ]}],
    }]}


def write_eds(path: Path, ports: list[int], unhealthy: tuple[int, ...] = ()) -> None:
    """Envoy watches the directory and reloads on a move into it (atomic)."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(yaml.safe_dump(eds_document(ports, unhealthy)))
    tmp.rename(path)


def picker_cluster_envoy(envoy_factory, backends, replicas, name, kind="EDS", eds_path=None, picker_extra=None,
                         concurrency=2, mutate=None):
    """Envoy with `concurrency` workers, the picker on qwen-vllm with `hosts` (no endpoints),
    the retry off, qwen-vllm's hosts from an EDS file (`kind` EDS), DNS (STRICT_DNS, each
    replica as `localhost`) or the static list (STATIC)."""
    def mutate_cfg(cfg):
        c = cluster(cfg, "qwen-vllm")
        use_picker_policy(c, routes(cfg))
        without_retry(cfg)
        fast_health_checks(c)
        if kind == "EDS":
            # A file-based EDS subscription needs the node's id and cluster.
            cfg["node"] = {"id": "bbr-test", "cluster": "bbr-test"}
            c["type"] = "EDS"
            c.pop("load_assignment", None)
            c["eds_cluster_config"] = {"eds_config": {
                "path_config_source": {"path": str(eds_path), "watched_directory": {"path": str(eds_path.parent)}},
                "resource_api_version": "V3",
            }}
        else:
            c["type"] = kind
            host = "localhost" if kind == "STRICT_DNS" else "127.0.0.1"
            if kind == "STRICT_DNS":
                c["dns_lookup_family"] = "V4_ONLY"
                c["dns_refresh_rate"] = "0.5s"
            c["load_assignment"]["endpoints"] = [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": m.port}}}}
                for m in replicas]}]
        for r in routes(cfg):
            r.setdefault("response_headers_to_add", []).append(
                {"header": {"key": SEEN, "value": f"%REQ({PICKER_HEADER})%"}})
        # The shipped bbr-envoy-admin cluster, which the harness points at this Envoy's admin.
        admin_port = cfg["admin"]["address"]["socket_address"]["port_value"]
        admin = cluster(cfg, ADMIN_CLUSTER)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        assert admin["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": admin_port}
        config = json.loads(json.dumps(DEFAULT_FILTER_CONFIG))
        picker = {"hosts": {"intervalMs": 100}, "pools": [{"cluster": "qwen-vllm", "baseModels": [QWEN]}]}
        picker.update(picker_extra or {})
        config["prefixAffinity"] = {"enabled": True, "picker": picker}
        set_filter_config(cfg, config)
        if mutate is not None:
            mutate(cfg)

    ports = {"phi-vllm": backends.phi.port}
    if kind != "EDS":
        ports["qwen-vllm"] = replicas[0].port
    return envoy_factory(ports, mutate=mutate_cfg, name=name, concurrency=concurrency)


def admin_hosts(env) -> dict[str, dict]:
    """qwen-vllm's hosts on the admin page: address -> health_status."""
    page = json.loads(env.admin("/clusters?format=json"))
    out = {}
    for cs in page["cluster_statuses"]:
        if cs["name"] == "qwen-vllm":
            for h in cs.get("host_statuses", []):
                sa = h["address"]["socket_address"]
                out[f"{sa['address']}:{sa['port_value']}"] = h["health_status"]
    return out


def healthy(status: dict) -> bool:
    return not any(v is True for v in status.values()) and status.get("eds_health_status", "HEALTHY") == "HEALTHY"


def wait_admin(env, predicate, what: str, timeout: float = 20.0) -> float:
    """Until the admin page satisfies `predicate`; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(admin_hosts(env)):
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"admin never showed {what}: {admin_hosts(env)}")


def unique(client, i: int, tag: str) -> httpx.Response:
    return chat(client, tenant_messages(90000 + i, f"{tag} {i}?"))


@pytest.fixture(scope="module")
def eds_pool(mock_factory, envoy_factory, backends, tmp_path_factory):
    replicas = [mock_factory(QWEN, rid, extra=("--ttft-ms", "5")) for rid in ("eds-1", "eds-2", "eds-3")]
    eds_dir = tmp_path_factory.mktemp("eds")
    eds_path = eds_dir / "qwen.yaml"
    write_eds(eds_path, [m.port for m in replicas[:2]])
    env = picker_cluster_envoy(envoy_factory, backends, replicas, "picker-eds", kind="EDS", eds_path=eds_path)
    return env, replicas, eds_path


def test_no_endpoint_list_and_hosts_come_from_the_cluster(eds_pool):
    env, replicas, _ = eds_pool
    filter_cfg = json.loads(env.config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                            ["typed_config"]["http_filters"][0]["typed_config"]["config"]["configuration"]["value"])
    assert "endpoints" not in filter_cfg["prefixAffinity"]["picker"]["pools"][0]
    wait_admin(env, lambda h: len(h) == 2 and all(healthy(s) for s in h.values()), "two healthy hosts")
    time.sleep(BOUND_S)
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        served = []
        for i in range(12):
            r = unique(client, i, "First")
            assert r.status_code == 200, r.text[:300]
            # Picked (the header names a host), and Envoy sent it there.
            assert r.headers[SEEN] == f"127.0.0.1:{next(m.port for m in replicas if m.id == r.headers['x-mock-backend'])}"
            served.append(r.headers["x-mock-backend"])
    assert set(served) == {"eds-1", "eds-2"}, served
    assert counter(env, "bbr_endpoint_picked_total") >= 12


def test_a_host_added_is_picked_and_one_removed_never_again_within_the_bound(eds_pool):
    env, replicas, eds_path = eds_pool
    new, old = replicas[2], replicas[0]
    write_eds(eds_path, [m.port for m in replicas])
    t0 = wait_admin(env, lambda h: f"127.0.0.1:{new.port}" in h and healthy(h[f"127.0.0.1:{new.port}"]),
                    "the new host healthy")
    first = None
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        i = 0
        while time.monotonic() < t0 + 5.0:
            r = unique(client, 100 + i, "Added")
            i += 1
            assert r.status_code == 200, r.text[:300]
            if r.headers[SEEN] == f"127.0.0.1:{new.port}":
                first = time.monotonic()
                break
        assert first is not None, "the added host was never picked"
        assert first - t0 <= BOUND_S, f"picked {first - t0:.2f} s after Envoy listed it healthy"
        # Removed: once Envoy no longer lists it, no pick names it after the bound.
        write_eds(eds_path, [m.port for m in replicas[1:]])
        # Envoy keeps a removed host that still passes its health checks, flagged
        # pending_dynamic_removal, until its connections drain: removed all the same.
        gone = f"127.0.0.1:{old.port}"
        t1 = wait_admin(env, lambda h: gone not in h or h[gone].get("pending_dynamic_removal") is True,
                        "the old host removed")
        last_pick = t1
        named = []
        while time.monotonic() < t1 + BOUND_S + 2.0:
            r = unique(client, 1000 + i, "Removed")
            i += 1
            assert r.status_code == 200, r.text[:300]
            if r.headers[SEEN] == f"127.0.0.1:{old.port}":
                last_pick = time.monotonic()
                named.append(last_pick - t1)
        assert last_pick - t1 <= BOUND_S, f"the removed host was still picked {named} s after it left"
        assert all(t <= BOUND_S for t in named), named


def test_a_host_marked_unhealthy_by_eds_gets_nothing(eds_pool):
    env, replicas, eds_path = eds_pool
    sick = replicas[1]
    write_eds(eds_path, [m.port for m in replicas[1:]], unhealthy=(sick.port,))
    wait_admin(env, lambda h: h.get(f"127.0.0.1:{sick.port}", {}).get("eds_health_status") == "UNHEALTHY",
               "the EDS health status")
    time.sleep(BOUND_S)
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        where = []
        for i in range(15):
            r = unique(client, 3000 + i, "Sick")
            assert r.status_code == 200, r.text[:300]
            where.append(r.headers["x-mock-backend"])
    assert sick.id not in where, where
    write_eds(eds_path, [m.port for m in replicas[1:]])
    # The hosts were read all along (the fixture's Envoy has run for seconds, past the 2 s a
    # snapshot takes to be called stale): never stale, every read answered.
    assert counter(env, "bbr_picker_hosts_stale_total") == 0
    assert _tagged(env, "bbr_picker_host_polls_total", "ok") > 20


def test_a_host_failing_health_checks_gets_zero_requests_without_retry(mock_factory, envoy_factory, backends):
    """Kill one replica: Envoy's active health check fails it (every 300 ms here); from then on,
    with the route's retry off, every request is answered by the others, and none is picked
    for it (a pick there would be a 503: override_host does not look at health)."""
    replicas = [mock_factory(QWEN, rid, extra=("--ttft-ms", "5")) for rid in ("hc-1", "hc-2", "hc-3")]
    env = picker_cluster_envoy(envoy_factory, backends, replicas, "picker-hc", kind="STATIC")
    assert "retry_policy" not in next(r for r in routes(env.config) if r["route"].get("cluster") == "qwen-vllm")["route"]
    victim = replicas[0]
    time.sleep(BOUND_S)
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        before = [unique(client, 4000 + i, "Before") for i in range(9)]
        assert all(r.status_code == 200 for r in before)
        assert victim.id in {r.headers["x-mock-backend"] for r in before}
        victim.kill()
        wait_admin(env, lambda h: h.get(f"127.0.0.1:{victim.port}", {}).get("failed_active_health_check") is True,
                   "the failed health check")
        time.sleep(BOUND_S)
        after = [unique(client, 5000 + i, "After") for i in range(30)]
    assert all(r.status_code == 200 for r in after), [r.status_code for r in after]
    assert all(r.headers[SEEN] != f"127.0.0.1:{victim.port}" for r in after)
    assert {r.headers["x-mock-backend"] for r in after} == {"hc-2", "hc-3"}
    assert env.stat("cluster.qwen-vllm.upstream_rq_retry") == 0


def test_strict_dns_hosts_are_the_candidates(mock_factory, envoy_factory, backends):
    """envoy/envoy-k8s.yaml's kind of cluster: replicas resolved by DNS (here `localhost`)."""
    replicas = [mock_factory(QWEN, rid, extra=("--ttft-ms", "5")) for rid in ("dns-1", "dns-2")]
    env = picker_cluster_envoy(envoy_factory, backends, replicas, "picker-dns", kind="STRICT_DNS", concurrency=1)
    time.sleep(BOUND_S)
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        where = []
        for i in range(8):
            r = unique(client, 6000 + i, "Dns")
            assert r.status_code == 200, r.text[:300]
            assert r.headers[SEEN] in {f"127.0.0.1:{m.port}" for m in replicas}
            where.append(r.headers["x-mock-backend"])
    assert set(where) == {"dns-1", "dns-2"}, where


# --- The one switch, as shipped: envoy/envoy.yaml and envoy/envoy-k8s.yaml with nothing changed
# but prefixAffinity.picker.enabled (and the addresses a test must use).

SWITCH_OFF = '"picker":{"enabled":false'
SWITCH_ON = '"picker":{"enabled":true'


def turn_on(cfg: dict) -> None:
    """The documented one-step change: the filter configuration's picker.enabled to true."""
    conf = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    plugin = next(f for f in conf["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    value = plugin["typed_config"]["config"]["configuration"]["value"]
    assert value.count(SWITCH_OFF) == 1, value
    plugin["typed_config"]["config"]["configuration"]["value"] = value.replace(SWITCH_OFF, SWITCH_ON)


def replicas_as(c: dict, replicas, host: str) -> None:
    c["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": m.port}}}} for m in replicas]}]


@pytest.mark.parametrize("shipped", ["envoy.yaml", "envoy-k8s.yaml"])
def test_one_switch_turns_the_picker_on_in_the_shipped_configs(shipped, mock_factory, envoy_factory, backends):
    """Off as shipped: no pick, MAGLEV on the prefix key places the requests (the fallback).
    On: every request picked over the cluster's hosts, read from Envoy's admin (STATIC in
    envoy.yaml, STRICT_DNS in envoy-k8s.yaml, where `localhost` stands for the headless
    Service), unique prompts spread over them, a tenant stays home, and the servers' metrics are
    scraped."""
    import conftest

    replicas = [mock_factory(QWEN, f"sw-{shipped[6:9]}-{k}", extra=("--ttft-ms", "5")) for k in range(3)]
    ids = {m.id for m in replicas}

    def from_shipped(on: bool):
        def mutate(cfg):
            if shipped == "envoy-k8s.yaml":
                k8s = conftest.load_envoy_yaml(conftest.ROOT / "envoy" / shipped)
                # envoy-k8s.yaml's own clusters and filter; the harness's loopback addresses.
                k8s["admin"] = cfg["admin"]
                k8s["static_resources"]["listeners"][0]["address"] = cfg["static_resources"]["listeners"][0]["address"]
                conftest.wasm_plugin(k8s)["vm_config"]["code"]["local"]["filename"] = str(conftest.WASM)
                cfg.clear()
                cfg.update(k8s)
                conftest.set_cluster_port(cfg, "bbr-envoy-admin", cfg["admin"]["address"]["socket_address"]["port_value"])
                replicas_as(cluster(cfg, "qwen-vllm"), replicas, "localhost")
                cluster(cfg, "phi-vllm")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
                    "socket_address"].update(address="localhost", port_value=backends.phi.port)
            else:
                replicas_as(cluster(cfg, "qwen-vllm"), replicas, "127.0.0.1")
            if on:
                turn_on(cfg)
        return mutate

    ports = {"phi-vllm": backends.phi.port}
    off = envoy_factory(ports, mutate=from_shipped(False), name=f"switch-off-{shipped}")
    with httpx.Client(base_url=off.url, timeout=30.0) as client:
        r = unique(client, 7000, "Off")
        assert r.status_code == 200, r.text[:300]
    assert counter(off, "bbr_endpoint_picked_total") == 0
    off.stop()

    env = envoy_factory(ports, mutate=from_shipped(True), name=f"switch-on-{shipped}")
    time.sleep(BOUND_S)
    with httpx.Client(base_url=env.url, timeout=30.0) as client:
        spread = []
        for i in range(9):
            r = unique(client, 7100 + i, "On")
            assert r.status_code == 200, r.text[:300]
            spread.append(r.headers["x-mock-backend"])
        home = {chat(client, tenant_messages(7200, f"Again {q}?")).headers["x-mock-backend"] for q in range(4)}
    assert set(spread) == ids, spread
    assert len(home) == 1, home
    assert counter(env, "bbr_endpoint_picked_total") == 13
    assert _tagged(env, "bbr_picker_metric_scrapes_total", "ok") > 0
    assert _tagged(env, "bbr_picker_host_polls_total", "ok") > 0


def _tagged(env, name: str, outcome: str) -> int:
    for line in env.admin(f"/stats?filter={name}").splitlines():
        key, _, value = line.rpartition(": ")
        if name in key and f"={outcome};" in key and value.strip().isdigit():
            return int(value)
    return 0
