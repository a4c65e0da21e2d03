#!/usr/bin/env python3
"""`make bench`'s response side: what reading token usage from responses costs the gateway.

One gateway Envoy (--concurrency 1, its worker pinned as in bench/run.py) holds the shipped
configuration (envoy/envoy.yaml, bbr-wasm with the accounting on) on one listener and the
same with `usage.enabled: false` on a second, side by side. Two mock-vllm upstreams answer:

  json  POST /v1/chat/completions, a non-streamed completion of 64 tokens (about 900 bytes,
        usage at the end), from a mock with no delays;
  sse   the same request with `stream: true` and `include_usage`: 300 token events plus the
        role, usage and [DONE] events (about 55 KB), from a mock releasing one token per ms,
        so that Envoy receives the events one by one, as from a real model.

wrk POSTs each workload to both listeners in interleaved rounds (on, off / off, on, ...);
the gateway's CPU per request (utime + stime from /proc over a run, divided by the responses
wrk completed) is compared round by round: the ratio on / off is the median of the rounds'
ratios. The filter's `bbr_wasm_memory_bytes` gauge is read after each workload and after
one stream of 4096 tokens (about 0.75 MB): flat in the response size.

Environment: BENCH_USAGE_ROUNDS (default 5), BENCH_USAGE_DURATION (seconds per run, 3),
BENCH_OUT (default bench/results); writes usage.json and usage.md there.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import run as bench  # bench/run.py: processes, ports, wrk, the worker pin

ROOT = bench.ROOT
MOCK = ROOT / "target" / "release" / "mock-vllm"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr_wasm.wasm"
QWEN = "Qwen/Qwen2.5-3B-Instruct"
PHI = "microsoft/Phi-3-mini-4k-instruct"
# (workload, model (which mock), connections, body)
WORKLOADS = [
    ("json", QWEN, 8, {"model": QWEN, "max_tokens": 64,
                        "messages": [{"role": "user", "content": "Tell me about lighthouses."}]}),
    ("sse", PHI, 8, {"model": PHI, "max_tokens": 300, "stream": True,
                      "stream_options": {"include_usage": True},
                      "messages": [{"role": "user", "content": "Tell me about lighthouses."}]}),
]


def start_mock(name: str, port: int, model: str, work: Path, itl_ms: int) -> bench.Proc:
    p = bench.Proc(name, [str(MOCK), "--listen", f"127.0.0.1:{port}", "--model", model, "--id", name,
                          "--itl-ms", str(itl_ms)], work / f"{name}.log")
    deadline = time.monotonic() + bench.START_TIMEOUT
    while "listening" not in p.log.read_text(errors="replace"):
        if not p.alive() or time.monotonic() > deadline:
            raise SystemExit(f"bench-usage: {name} did not start:\n{p.tail()}")
        time.sleep(0.05)
    return p


def gateway_config(ports: dict[str, int]) -> dict:
    cfg = bench.yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=ports["admin"])
    on = cfg["static_resources"]["listeners"][0]
    on["name"] = "usage_on"
    on["address"]["socket_address"].update(address="127.0.0.1", port_value=ports["on"])
    hcm = next(f for f in on["filter_chains"][0]["filters"]
               if f["name"] == "envoy.filters.network.http_connection_manager")["typed_config"]
    plugin = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]
    plugin["vm_config"]["code"]["local"]["filename"] = str(WASM)
    # The shipped access log goes to stdout; here to /dev/null, for both listeners alike.
    for log in hcm.get("access_log", []):
        log["name"] = "envoy.access_loggers.file"
        log["typed_config"]["@type"] = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
        log["typed_config"]["path"] = "/dev/null"
    off = copy.deepcopy(on)
    off["name"] = "usage_off"
    off["address"]["socket_address"]["port_value"] = ports["off"]
    off_hcm = next(f for f in off["filter_chains"][0]["filters"]
                   if f["name"] == "envoy.filters.network.http_connection_manager")["typed_config"]
    off_plugin = next(f for f in off_hcm["http_filters"]
                      if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]
    filter_config = json.loads(off_plugin["configuration"]["value"])
    filter_config["usage"] = {"enabled": False}
    off_plugin["configuration"]["value"] = json.dumps(filter_config)
    # Its own VM, so the two listeners' metrics and memory do not mix.
    off_plugin["vm_config"]["vm_id"] = "bbr-usage-off"
    off_plugin["name"] = "bbr-usage-off"
    cfg["static_resources"]["listeners"].append(off)
    for c in cfg["static_resources"]["clusters"]:
        port = {"qwen-vllm": ports["json"], "phi-vllm": ports["sse"]}.get(c["name"])
        if port:
            for group in c["load_assignment"]["endpoints"]:
                for ep in group["lb_endpoints"]:
                    ep["endpoint"]["address"]["socket_address"]["port_value"] = port
    return cfg


def wait_healthy(gw: bench.Envoy) -> None:
    deadline = time.monotonic() + bench.START_TIMEOUT
    while True:
        _, text = bench.http_get(gw.admin, "/clusters")
        flags = [l.rsplit("::", 1)[1] for l in text.splitlines() if "::health_flags::" in l
                 and (l.startswith("qwen-vllm::") or l.startswith("phi-vllm::"))]
        if flags and all(f == "healthy" for f in flags):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"bench-usage: upstreams not healthy: {flags}")
        time.sleep(0.2)


def memory_gauge(gw: bench.Envoy, port: int, body: dict) -> int:
    """The accounting VM's memory: both VMs write the one gauge, so one request through the
    metered listener first makes it that VM's figure."""
    bench.http_post(port, json.dumps(body).encode(), {}, timeout=120)
    return gw.stats("bbr_wasm_memory_bytes").get("wasmcustom.bbr_wasm_memory_bytes", 0)


def main() -> int:
    rounds = int(os.environ.get("BENCH_USAGE_ROUNDS", "5"))
    duration = float(os.environ.get("BENCH_USAGE_DURATION", "3"))
    out_dir = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    wrk = os.environ.get("WRK_BIN") or shutil.which("wrk")
    if not wrk:
        raise SystemExit("bench-usage: no wrk (scripts/bench-deps.sh installs it)")
    for p in (MOCK, WASM):
        if not p.is_file():
            raise SystemExit(f"bench-usage: missing {p}; make bench builds it")
    work = Path(tempfile.mkdtemp(prefix="bbr-bench-usage-"))
    ports = {k: bench.free_port() for k in ("admin", "on", "off", "json", "sse")}
    procs: list[bench.Proc] = []
    try:
        procs.append(start_mock("mock-json", ports["json"], QWEN, work, 0))
        procs.append(start_mock("mock-sse", ports["sse"], PHI, work, 1))
        env_bin = bench.subprocess.run(["bash", str(ROOT / "scripts" / "envoy-bin.sh")], cwd=ROOT,
                                       capture_output=True, text=True, check=True).stdout.split()[-1]
        gw = bench.Envoy("gateway-usage", env_bin, gateway_config(ports), ports, work)
        procs.append(gw.proc)
        cpus = bench.worker_cpus()
        bench.pin_envoy_worker(gw, cpus)
        wait_healthy(gw)
        results: dict = {"rounds": rounds, "duration_s": duration, "worker_cpu": sorted(cpus), "workloads": {}}
        memory: dict[str, int] = {"start": memory_gauge(gw, ports["on"], WORKLOADS[0][3])}
        for name, model, conns, body in WORKLOADS:
            body_file = work / f"{name}.json"
            body_file.write_text(json.dumps(body))
            # Sanity: both listeners answer 200 with usage, from the right mock.
            for which in ("on", "off"):
                status, headers, data = bench.http_post(ports[which], json.dumps(body).encode(), {})
                if status != 200 or b'"usage"' not in data:
                    raise SystemExit(f"bench-usage: {name} via {which}: {status} {data[:200]!r}")
            per: dict[str, list[dict]] = {"on": [], "off": []}
            for which in ("on", "off"):  # warm-up, unrecorded
                bench.run_wrk(wrk, ports[which], body_file, conns, 1, None, work)
            for r in range(rounds):
                order = ("on", "off") if r % 2 == 0 else ("off", "on")
                for which in order:
                    cpu0 = gw.proc.cpu_seconds()
                    res = bench.run_wrk(wrk, ports[which], body_file, conns, duration, None, work)
                    cpu = gw.proc.cpu_seconds() - cpu0
                    per[which].append({"requests": res["requests"], "cpu_s": cpu, "rps": res["rps"],
                                       "errors": res["errors_total"], "bytes": res["bytes"],
                                       "cpu_us_per_request": cpu / res["requests"] * 1e6 if res["requests"] else float("nan")})
            # A run that completed no response (the shared machine starved it) has no figure.
            ratios = [a["cpu_us_per_request"] / b["cpu_us_per_request"] for a, b in zip(per["on"], per["off"])
                      if a["requests"] and b["requests"]]
            if not ratios:
                raise SystemExit(f"bench-usage: {name}: no round completed a response on both listeners")
            results["workloads"][name] = {
                "connections": conns,
                "runs": per,
                "cpu_us_per_request": {w: statistics.median(x["cpu_us_per_request"] for x in per[w] if x["requests"])
                                       for w in per},
                "rps": {w: statistics.median(x["rps"] for x in per[w]) for w in per},
                "response_bytes": per["on"][0]["bytes"] / max(1, per["on"][0]["requests"]),
                "ratio_on_off": statistics.median(ratios),
                "ratios": ratios,
            }
            memory[name] = memory_gauge(gw, ports["on"], body)
        long_body = dict(WORKLOADS[1][3], max_tokens=4096)
        status, _, data = bench.http_post(ports["on"], json.dumps(long_body).encode(), {}, timeout=120)
        memory["sse_4096_tokens"] = memory_gauge(gw, ports["on"], long_body)
        memory["sse_4096_tokens_bytes"] = len(data)
        results["wasm_memory_bytes"] = memory
        stats = gw.stats("bbr_usage_responses_total|bbr_tokens_total")
        results["filter_counters"] = stats
    finally:
        for p in reversed(procs):
            p.stop()
    lines = ["| workload | response | conns | gateway CPU µs/request, accounting off | on | on / off (median of rounds) | target ≤ 1.05 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, w in results["workloads"].items():
        lines.append(f"| {name} | {w['response_bytes']:.0f} B | {w['connections']} | "
                     f"{w['cpu_us_per_request']['off']:.1f} | {w['cpu_us_per_request']['on']:.1f} | "
                     f"{w['ratio_on_off']:.3f} ({', '.join(f'{r:.3f}' for r in w['ratios'])}) | "
                     f"{'met' if w['ratio_on_off'] <= 1.05 else 'not met'} |")
    m = results["wasm_memory_bytes"]
    lines.append("")
    lines.append(f"wasm memory (bbr_wasm_memory_bytes, accounting on): start {m['start']}, after json {m['json']}, "
                 f"after sse {m['sse']}, after one {m['sse_4096_tokens_bytes']}-byte stream {m['sse_4096_tokens']}: "
                 f"{'flat' if m['sse_4096_tokens'] == m['sse'] else 'grew'}")
    md = "\n".join(lines)
    print(md)
    (out_dir / "usage.json").write_text(json.dumps(results, indent=2))
    (out_dir / "usage.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
