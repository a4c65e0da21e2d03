"""bench-routing's processes and gateway: the mock-vllm replicas (their cache counters and reset),
Envoy with bbr-wasm (envoy/envoy.yaml's settings, one listener and cluster per strategy), and the
probe that tells whether the built filter computes the prefix key itself."""
from __future__ import annotations

import copy
import http.client
import json
import os
import re
from pathlib import Path

import yaml

from settings import (BASE_TTFT_MS, BLOCK_TOKENS, HEADER, ITL_MS, KEY_BLOCK_BYTES, MAX_NUM_SEQS, MOCK, MODEL,
                      PATH, PICKER_POLICY_YAML, PREFILL_TOKENS_PER_S, ROOT, SHIPPED_ENVOY_YAML, START_TIMEOUT,
                      STOP_TIMEOUT, WASM)
from strategies import KeySource, Strategy
from workloads import body_of
import prefix_key  # bench/routing/prefix_key.py
import procs  # tests/procs.py (settings put tests/ on sys.path)


http_get = procs.http_get


def http_post(port: int, path: str, timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=b"")
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


class Mock:
    """One replica; its ready line gives the bound port."""

    def __init__(self, i: int, cache_blocks: int, work: Path):
        self.id = f"replica-{i}"
        argv = [str(MOCK), "--listen", "127.0.0.1:0", "--model", MODEL, "--id", self.id,
                "--prefix-cache-blocks", str(cache_blocks), "--block-tokens", str(BLOCK_TOKENS),
                "--prefill-tokens-per-s", str(PREFILL_TOKENS_PER_S), "--ttft-ms", str(BASE_TTFT_MS),
                "--itl-ms", str(ITL_MS), "--max-num-seqs", str(MAX_NUM_SEQS)]
        self.proc = procs.Child(self.id, argv, work / f"{self.id}.log", cwd=ROOT, stdout_pipe=True,
                                stop_timeout=STOP_TIMEOUT)
        line = self.proc.popen.stdout.readline().decode()   # printed once bound, then flushed
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.stop()
            raise SystemExit(f"bench-routing: {self.id} did not start: {line!r}\n{procs.tail(work / f'{self.id}.log', 20)}")
        self.port = int(m.group(1))

    def counters(self) -> tuple[float, float]:
        status, text = http_get(self.port, "/metrics")
        if status != 200:
            raise RuntimeError(f"{self.id} /metrics: {status}")
        vals = {}
        for line in text.splitlines():
            for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
                if line.startswith(name + "{"):
                    vals[name] = float(line.rsplit(" ", 1)[1])
        return vals["vllm:prefix_cache_queries_total"], vals["vllm:prefix_cache_hits_total"]

    def reset_cache(self) -> None:
        if http_post(self.port, "/reset_prefix_cache") != 200:
            raise RuntimeError(f"{self.id} /reset_prefix_cache failed")


def shipped() -> dict:
    return yaml.safe_load(SHIPPED_ENVOY_YAML.read_text())


def gateway_config(strategies: list[Strategy], ports: dict[str, int], mock_ports: list[int],
                   keys: KeySource, cache_blocks: int) -> dict:
    """envoy/envoy.yaml's listener, filter and cluster settings; one listener + cluster per strategy."""
    base = shipped()
    picker_example = yaml.safe_load(PICKER_POLICY_YAML.read_text())
    endpoints = [f"127.0.0.1:{p}" for p in mock_ports]
    listener_t = base["static_resources"]["listeners"][0]
    cluster_t = next(c for c in base["static_resources"]["clusters"] if c["name"] == "qwen-vllm")
    listeners, clusters = [], []
    for s in strategies:
        lst = copy.deepcopy(listener_t)
        lst["name"] = s.name
        lst["address"]["socket_address"]["port_value"] = ports[s.name]
        hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["stat_prefix"] = s.name
        hcm.pop("access_log", None)        # one line per request would cost CPU and disk
        hcm["route_config"]["name"] = f"{s.name}_routes"
        # A model's route (a fixed cluster), not the discovery route (cluster_header).
        route = copy.deepcopy(next(r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
                                   if "cluster" in r["route"]))
        route["name"] = s.name
        route["match"]["headers"][0]["string_match"] = {"exact": MODEL}
        route["route"]["cluster"] = s.name
        route["route"].pop("hash_policy", None)
        if s.hashed:
            route["route"]["hash_policy"] = [{"header": {"header_name": HEADER}}]
        if s.picker:
            route["route"].update(copy.deepcopy(picker_example["route"]))
        hcm["route_config"]["virtual_hosts"][0]["routes"] = [route]
        for f in hcm["http_filters"]:
            if f["name"] == "envoy.filters.http.wasm":
                conf = f["typed_config"]["config"]
                conf["name"] = f"bbr_{s.name}"
                conf["vm_config"]["code"]["local"]["filename"] = str(WASM)
                conf["configuration"]["value"] = json.dumps(keys.filter_config(s, endpoints, cache_blocks),
                                                            separators=(",", ":"))
        listeners.append(lst)
        if s.metrics and not any(c["name"] == "bbr-envoy-admin" for c in clusters):
            admin = copy.deepcopy(next(c for c in base["static_resources"]["clusters"] if c["name"] == "bbr-envoy-admin"))
            admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                "port_value"] = ports["admin"]
            clusters.append(admin)

        c = copy.deepcopy(cluster_t)
        c["name"] = s.name
        # The shipped cluster's policy (override_host, MAGLEV fallback) would take precedence.
        c.pop("load_balancing_policy", None)
        c["lb_policy"] = s.lb
        c.get("common_lb_config", {}).pop("consistent_hashing_lb_config", None)
        if s.hashed and s.hbf is not None:
            c.setdefault("common_lb_config", {})["consistent_hashing_lb_config"] = {
                "hash_balance_factor": s.hbf}
        if s.picker:
            # envoy/picker-lb-policy.yaml in place of lb_policy; health checks, outlier detection kept.
            c.pop("lb_policy", None)
            c.update(copy.deepcopy(picker_example["cluster"]))
        c["load_assignment"] = {"cluster_name": s.name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in mock_ports]}]}
        clusters.append(c)
    base["admin"]["address"]["socket_address"]["port_value"] = ports["admin"]
    base["static_resources"]["listeners"] = listeners
    base["static_resources"]["clusters"] = clusters
    return base


class Envoy:
    def __init__(self, config: dict, work: Path, admin: int, workers: int = 1, tag: str = ""):
        # tag: one file set per gateway process when two run side by side.
        path = work / f"gateway{tag}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        envoy = ROOT / ".venv" / "bin" / "envoy"
        self.log = work / f"envoy{tag}.log"
        argv = [str(envoy), "-c", str(path), "--concurrency", str(workers), "--use-dynamic-base-id",
                "--base-id-path", str(work / f"envoy{tag}.base-id"), "--log-level", "warn"]
        # A diagnostic: e.g. "wasm:debug" logs the picker's every load report.
        if os.environ.get("BENCH_ROUTING_ENVOY_LOG"):
            argv += ["--component-log-level", os.environ["BENCH_ROUTING_ENVOY_LOG"]]
        self.proc = procs.Child("envoy", argv, self.log, cwd=ROOT, stop_timeout=STOP_TIMEOUT)
        procs.wait_live(self.proc, admin, START_TIMEOUT)

    def stop(self) -> None:
        self.proc.stop()


def probe_filter(port: int, strategy: Strategy) -> tuple[bool, str]:
    """Does the filter set the key, and is it the key prefix_key.py computes?"""
    body = body_of([{"role": "system", "content": "probe " * 400}, {"role": "user", "content": "hi"}])
    body["stream"] = False
    want = prefix_key.prefix_key(MODEL, body, KEY_BLOCK_BYTES, strategy.prefix_blocks)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", PATH, body=json.dumps(body), headers={"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        got = r.getheader("x-echo-prefix-hash")
        if r.status != 200:
            return False, f"probe answered {r.status}"
        if got != want:
            return False, f"filter key {got!r}, prefix_key.py {want!r}"
        return True, f"filter key {got} = prefix_key.py's"
    except OSError as e:
        return False, f"probe failed: {e}"
    finally:
        conn.close()
