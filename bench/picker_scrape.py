#!/usr/bin/env python3
"""`make bench`'s endpoint-picker part: what reading the cluster's hosts and the servers' own
load costs the gateway, with 4, 16 and 64 replicas.

Per pool size N, N mock-vllm replicas (`/metrics` in vLLM's names) and three gateway Envoys
(--concurrency 1, the shipped envoy/envoy.yaml with the picker on, the qwen-vllm cluster over
the N replicas, access logs to /dev/null), running side by side over the same replicas:

  static    the picker with a static endpoint list: no admin read, no scrape (the floor)
  hosts     `hosts: {}`: the hosts and their health from Envoy's admin every 250 ms
  metrics   `hosts: {}` and `serverMetrics: {}` (the shipped switch): also each healthy host's
            `/metrics` every 100 ms

Two figures per gateway, each measured on the three at once or in rotation, so that the
shared machine's noise falls on all of them alike:
  - idle: the process's CPU (utime + stime from /proc) per second with no requests, over
    BENCH_SCRAPE_IDLE seconds (default 10), the three sampled over the same seconds: the
    timers' whole cost, reads and scrapes;
  - loaded: wrk (8 connections, a 1 KiB chat body, BENCH_SCRAPE_DURATION seconds, default 3)
    against each in rotation, BENCH_SCRAPE_ROUNDS rounds (default 3): the gateway's CPU per
    request (the median of the rounds) and requests per second.
The scrape's cost is `metrics - hosts`, the admin read's `hosts - static`.

Environment: BENCH_SCRAPE_SIZES (default "4,16,64"), the above, BENCH_OUT (default
bench/results); writes picker-scrape.json and picker-scrape.md there.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf.extproc import pin_envoy_worker, worker_cpus  # noqa: E402
from perf.processes import Envoy, Proc, free_port, http_get, http_post  # noqa: E402
from perf.runs import run_wrk  # noqa: E402
from perf.settings import ROOT, say  # noqa: E402

MOCK = ROOT / "target" / "release" / "mock-vllm"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr_wasm.wasm"
QWEN = "Qwen/Qwen2.5-3B-Instruct"
PHI = "microsoft/Phi-3-mini-4k-instruct"
VARIANTS = ("static", "hosts", "metrics")
BODY = {"model": QWEN, "max_tokens": 16,
        "messages": [{"role": "user", "content": "Tell me about lighthouses. " * 36}]}  # about 1 KiB


def start_mocks(n: int, work: Path) -> tuple[list[Proc], list[int]]:
    procs, ports = [], []
    try:
        for i in range(n):
            port = free_port()
            procs.append(Proc(f"replica-{n}-{i}", [str(MOCK), "--listen", f"127.0.0.1:{port}",
                                                         "--model", QWEN, "--id", f"r{i}"],
                                    work / f"replica-{n}-{i}.log"))
            ports.append(port)
        deadline = time.monotonic() + 30.0
        for p in procs:
            while "listening" not in p.text():
                if not p.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"bench-scrape: {p.name} did not start:\n{p.tail()}")
                time.sleep(0.05)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs, ports


def gateway_config(variant: str, ports: dict[str, int], replicas: list[int]) -> dict:
    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=ports["admin"])
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=ports["listener"])
    hcm = next(f for f in listener["filter_chains"][0]["filters"]
               if f["name"] == "envoy.filters.network.http_connection_manager")["typed_config"]
    for log in hcm.get("access_log", []):
        log["name"] = "envoy.access_loggers.file"
        log["typed_config"]["@type"] = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
        log["typed_config"]["path"] = "/dev/null"
    plugin = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]
    plugin["vm_config"]["code"]["local"]["filename"] = str(WASM)
    filter_config = json.loads(plugin["configuration"]["value"])
    picker = filter_config["prefixAffinity"]["picker"]
    picker["enabled"] = True
    # One pool: the replicas under test (the shipped phi pool would scrape a cluster of its own).
    picker["pools"] = [p for p in picker["pools"] if p["cluster"] == "qwen-vllm"]
    addresses = [f"127.0.0.1:{p}" for p in replicas]
    if variant == "static":
        del picker["hosts"], picker["serverMetrics"]
        picker["pools"][0]["endpoints"] = addresses
    elif variant == "hosts":
        del picker["serverMetrics"]
    plugin["configuration"]["value"] = json.dumps(filter_config)
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == "qwen-vllm":
            group = c["load_assignment"]["endpoints"][0]
            template = group["lb_endpoints"][0]
            group["lb_endpoints"] = []
            for p in replicas:
                ep = copy.deepcopy(template)
                ep["endpoint"]["address"]["socket_address"].update(address="127.0.0.1", port_value=p)
                group["lb_endpoints"].append(ep)
            c["load_assignment"]["endpoints"] = [group]
        elif c["name"] == "phi-vllm":
            for group in c["load_assignment"]["endpoints"]:
                for ep in group["lb_endpoints"]:
                    ep["endpoint"]["address"]["socket_address"].update(address="127.0.0.1", port_value=replicas[0])
        elif c["name"] == "bbr-envoy-admin":
            for group in c["load_assignment"]["endpoints"]:
                for ep in group["lb_endpoints"]:
                    ep["endpoint"]["address"]["socket_address"].update(address="127.0.0.1",
                                                                       port_value=ports["admin"])
    return cfg


def counters(gw: Envoy) -> dict[str, int]:
    return gw.stats("bbr_picker|bbr_endpoint_picked_total")


def wait_ready(gws: dict[str, Envoy], n: int) -> None:
    """Every replica healthy in every gateway, and the hosts / metrics read at least once."""
    deadline = time.monotonic() + 60
    while True:
        ok = True
        for name, gw in gws.items():
            _, text = http_get(gw.admin, "/clusters")
            flags = [l.rsplit("::", 1)[1] for l in text.splitlines()
                     if l.startswith("qwen-vllm::") and "::health_flags::" in l]
            ok &= len(flags) == n and all(f == "healthy" for f in flags)
            c = counters(gw)
            if name != "static":
                ok &= any(v > 0 for k, v in c.items() if "host_polls_total" in k and "=ok;" in k)
            if name == "metrics":
                ok &= sum(v for k, v in c.items() if "metric_scrapes_total" in k and "=ok;" in k) >= n
        if ok:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"bench-scrape: gateways not ready with {n} replicas")
        time.sleep(0.2)


def scrape_counts(gw: Envoy) -> tuple[int, int]:
    c = counters(gw)
    polls = sum(v for k, v in c.items() if "host_polls_total" in k)
    scrapes = sum(v for k, v in c.items() if "metric_scrapes_total" in k)
    return polls, scrapes


def measure(n: int, work: Path, wrk: str, idle_s: float, rounds: int, duration: float) -> dict:
    mocks, replica_ports = start_mocks(n, work)
    gws: dict[str, Envoy] = {}
    try:
        env_bin = subprocess.run(["bash", str(ROOT / "scripts" / "envoy-bin.sh")], cwd=ROOT,
                                       capture_output=True, text=True, check=True).stdout.split()[-1]
        cpus = worker_cpus()
        for v in VARIANTS:
            ports = {"admin": free_port(), "listener": free_port()}
            gws[v] = Envoy(f"gateway-{n}-{v}", env_bin, gateway_config(v, ports, replica_ports), ports, work)
            pin_envoy_worker(gws[v], cpus)
        wait_ready(gws, n)
        body_file = work / "body.json"
        body_file.write_text(json.dumps(BODY))
        for v, gw in gws.items():
            status, headers, data = http_post(gw.ports["listener"], json.dumps(BODY).encode(), {})
            if status != 200:
                raise SystemExit(f"bench-scrape: {v} with {n} replicas: {status} {data[:200]!r}")
        # Idle: the three over the same seconds.
        before = {v: (gw.proc.cpu_seconds(), *scrape_counts(gw)) for v, gw in gws.items()}
        t0 = time.monotonic()
        time.sleep(idle_s)
        elapsed = time.monotonic() - t0
        idle = {}
        for v, gw in gws.items():
            cpu, polls, scrapes = gw.proc.cpu_seconds(), *scrape_counts(gw)
            idle[v] = {"cpu_ms_per_s": 1e3 * (cpu - before[v][0]) / elapsed,
                       "host_polls_per_s": (polls - before[v][1]) / elapsed,
                       "metric_scrapes_per_s": (scrapes - before[v][2]) / elapsed}
        # Loaded: wrk against each in rotation.
        for gw in gws.values():  # warm-up, unrecorded
            run_wrk(wrk, gw.ports["listener"], body_file, 8, 1, None, work)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            for v in order:
                gw = gws[v]
                cpu0 = gw.proc.cpu_seconds()
                res = run_wrk(wrk, gw.ports["listener"], body_file, 8, duration, None, work)
                cpu = gw.proc.cpu_seconds() - cpu0
                runs[v].append({"requests": res["requests"], "rps": res["rps"], "cpu_s": cpu,
                                "errors": res["errors_total"],
                                "cpu_us_per_request": cpu / res["requests"] * 1e6 if res["requests"] else float("nan")})
        loaded = {v: {"cpu_us_per_request": statistics.median(x["cpu_us_per_request"] for x in runs[v] if x["requests"]),
                      "rps": statistics.median(x["rps"] for x in runs[v]),
                      "errors": sum(x["errors"] for x in runs[v]), "runs": runs[v]} for v in VARIANTS}
        picked = {v: counters(gw).get("wasmcustom.bbr_endpoint_picked_total", 0) for v, gw in gws.items()}
        return {"replicas": n, "idle_s": elapsed, "idle": idle, "loaded": loaded, "picked": picked}
    finally:
        for gw in gws.values():
            gw.proc.stop()
        for p in mocks:
            p.stop()


def main() -> int:
    sizes = [int(s) for s in os.environ.get("BENCH_SCRAPE_SIZES", "4,16,64").split(",")]
    idle_s = float(os.environ.get("BENCH_SCRAPE_IDLE", "10"))
    rounds = int(os.environ.get("BENCH_SCRAPE_ROUNDS", "3"))
    duration = float(os.environ.get("BENCH_SCRAPE_DURATION", "3"))
    out_dir = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    wrk = os.environ.get("WRK_BIN") or shutil.which("wrk")
    if not wrk:
        raise SystemExit("bench-scrape: no wrk (scripts/bench-deps.sh installs it)")
    for p in (MOCK, WASM):
        if not p.is_file():
            raise SystemExit(f"bench-scrape: missing {p}; make build builds it")
    work = Path(tempfile.mkdtemp(prefix="bbr-bench-scrape-"))
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = []
    for n in sizes:
        r = measure(n, work, wrk, idle_s, rounds, duration)
        results.append(r)
        say(f"bench-scrape: {n} replicas: idle CPU ms/s " + ", ".join(
            f"{v} {r['idle'][v]['cpu_ms_per_s']:.1f}" for v in VARIANTS) + "; loaded CPU us/request " + ", ".join(
            f"{v} {r['loaded'][v]['cpu_us_per_request']:.1f}" for v in VARIANTS))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": load_start,
            "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()), "idle_s": idle_s, "rounds": rounds,
            "duration_s": duration, "cpus": os.cpu_count()}
    lines = [f"# The picker's host reads and metrics scrape: gateway CPU ({meta['date']})", "",
             f"Load average (1/5/15 min) at the start {meta['loadavg_start']}, at the end {meta['loadavg_end']} "
             f"({meta['cpus']} CPUs). Three gateways side by side over the same replicas: `static` (endpoint list), "
             "`hosts` (admin read every 250 ms), `metrics` (also each host's /metrics every 100 ms).", "",
             "| replicas | idle CPU ms/s: static / hosts / metrics | scrape (metrics - hosts) | admin read (hosts - static) "
             "| metrics scrapes/s | loaded CPU µs/request: static / hosts / metrics | metrics / hosts | req/s: static / hosts / metrics |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        i, l = r["idle"], r["loaded"]
        lines.append(
            f"| {r['replicas']} | {i['static']['cpu_ms_per_s']:.1f} / {i['hosts']['cpu_ms_per_s']:.1f} / "
            f"{i['metrics']['cpu_ms_per_s']:.1f} | {i['metrics']['cpu_ms_per_s'] - i['hosts']['cpu_ms_per_s']:+.1f} ms/s | "
            f"{i['hosts']['cpu_ms_per_s'] - i['static']['cpu_ms_per_s']:+.1f} ms/s | "
            f"{i['metrics']['metric_scrapes_per_s']:.0f} | {l['static']['cpu_us_per_request']:.1f} / "
            f"{l['hosts']['cpu_us_per_request']:.1f} / {l['metrics']['cpu_us_per_request']:.1f} | "
            f"{l['metrics']['cpu_us_per_request'] / l['hosts']['cpu_us_per_request']:.2f}x | "
            f"{l['static']['rps']:.0f} / {l['hosts']['rps']:.0f} / {l['metrics']['rps']:.0f} |")
    md = "\n".join(lines)
    print(md)
    (out_dir / "picker-scrape.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out_dir / "picker-scrape.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
