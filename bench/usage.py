#!/usr/bin/env python3
"""`make bench`'s response side: what reading token usage from responses costs the gateway.

One gateway Envoy (--concurrency 1, its worker pinned as in bench/run.py) holds the shipped
configuration (envoy/envoy.yaml, bbr-wasm with the accounting on, the shipped access log
reading its filter state) on one listener and the same with `usage.enabled: false` on a
second, side by side, each in its own VM. Two mock-vllm upstreams answer, the same for both:

  json  POST /v1/chat/completions, a non-streamed completion of 64 tokens (about 900 bytes,
        usage at the end), from a mock with no delays;
  sse   the same request with `stream: true` and `include_usage`: 300 token events plus the
        role, usage and [DONE] events (about 55 KB), from a mock releasing one token per ms,
        so that Envoy receives the events one by one, as from a real model.

wrk (the same script, connections and duration for every listener) POSTs each workload to
the listeners in interleaved rounds, the order rotated each round (on, off / off, on, ...).
The gateway's CPU over a run (from wrk's start until the gateway has no request open) is read
from /proc/<pid>/task/*/schedstat (nanoseconds on CPU, every thread: the worker and the main
thread) and divided by the responses wrk completed;
the worker thread's own CPU is reported beside it. The ratio on / off is taken round by
round (the two runs of a round are adjacent in time); the bench prints the median of the
rounds' ratios, their range and a confidence interval of that median (order statistics,
distribution-free). Each run is checked: no wrk error, and the filter counted (on) or did
not count (off) the run's responses.

The filter's `bbr_wasm_memory_bytes` gauge is read after each workload and after one stream
of 4096 tokens (about 0.75 MB): flat in the response size.

Environment:
  BENCH_USAGE_ROUNDS     rounds per workload (default 9)
  BENCH_USAGE_DURATION   seconds per json run (default 2); sse runs last 3x as long, so that
                         the streams cut at a run's end (at most 8) weigh little
  BENCH_USAGE_WORKLOADS  default "json,sse"
  BENCH_USAGE_ALT        more builds of the filter, run with the accounting on next to "on"
                         and "off", each on its own listener and VM: "name=path.wasm,...".
                         An A/B comparison of builds in one run (how the cost was profiled:
                         docs/usage-metrics.md); each is reported as name / off, and "on"
                         as on / name (the read-only floor: bench/results/usage-profile/
                         floor.patch). Their runs
                         are not checked against the filter's counters (a diagnostic build
                         may count nothing); each run records what was counted
  BENCH_OUT              default bench/results; writes usage.json and usage.md there
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf.processes  # noqa: E402
from perf.extproc import ENVOY_WORKER_COMM, pin_envoy_worker, worker_cpus  # noqa: E402
from perf.processes import Envoy, Proc, free_port, http_get, http_post  # noqa: E402
from perf.runs import run_wrk  # noqa: E402
from perf.settings import ROOT, START_TIMEOUT  # noqa: E402

import yaml  # noqa: E402

MOCK = ROOT / "target" / "release" / "mock-vllm"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr_wasm.wasm"
QWEN = "Qwen/Qwen2.5-3B-Instruct"
PHI = "microsoft/Phi-3-mini-4k-instruct"
TARGET = 1.05
# (workload, model (which mock), connections, duration factor, body)
WORKLOADS = {
    "json": (QWEN, 8, 1, {"model": QWEN, "max_tokens": 64,
                          "messages": [{"role": "user", "content": "Tell me about lighthouses."}]}),
    "sse": (PHI, 8, 3, {"model": PHI, "max_tokens": 300, "stream": True,
                        "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": "Tell me about lighthouses."}]}),
}
COUNTED = "wasmcustom.outcome=.=counted;.;bbr_usage_responses_total"


def start_mock(name: str, port: int, model: str, work: Path, itl_ms: int) -> Proc:
    p = Proc(name, [str(MOCK), "--listen", f"127.0.0.1:{port}", "--model", model, "--id", name,
                    "--itl-ms", str(itl_ms)], work / f"{name}.log")
    deadline = time.monotonic() + START_TIMEOUT
    while "listening" not in p.text():
        if not p.alive() or time.monotonic() > deadline:
            raise SystemExit(f"bench-usage: {name} did not start:\n{p.tail()}")
        time.sleep(0.05)
    return p


def hcm_of(listener: dict) -> dict:
    return next(f for f in listener["filter_chains"][0]["filters"]
                if f["name"] == "envoy.filters.network.http_connection_manager")["typed_config"]


def plugin_of(listener: dict) -> dict:
    return next(f for f in hcm_of(listener)["http_filters"]
                if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]


def gateway_config(ports: dict[str, int], configs: dict[str, tuple[Path, bool]], mutate=None) -> dict:
    """One listener per configuration (name -> (wasm, accounting on)), each its own VM;
    `mutate(cfg)` changes the shipped configuration first (bench/ttft.py adds a pool)."""
    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    if mutate:
        mutate(cfg)
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=ports["admin"])
    template = cfg["static_resources"]["listeners"][0]
    # The shipped access log goes to stdout; here to /dev/null, for every listener alike (the
    # format, with its three filter-state fields, is the shipped one).
    for log in hcm_of(template).get("access_log", []):
        log["name"] = "envoy.access_loggers.file"
        log["typed_config"]["@type"] = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
        log["typed_config"]["path"] = "/dev/null"
    listeners = []
    for name, (wasm, enabled) in configs.items():
        lst = copy.deepcopy(template)
        lst["name"] = f"usage_{name}"
        lst["address"]["socket_address"].update(address="127.0.0.1", port_value=ports[name])
        plugin = plugin_of(lst)
        plugin["vm_config"]["code"]["local"]["filename"] = str(wasm)
        # Its own VM, so that the listeners' code and memory do not mix.
        plugin["vm_config"]["vm_id"] = f"bbr-usage-{name}"
        plugin["name"] = f"bbr-usage-{name}"
        filter_config = json.loads(plugin["configuration"]["value"])
        filter_config.setdefault("usage", {})["enabled"] = enabled
        plugin["configuration"]["value"] = json.dumps(filter_config)
        listeners.append(lst)
    cfg["static_resources"]["listeners"] = listeners
    for c in cfg["static_resources"]["clusters"]:
        port = {"qwen-vllm": ports["json"], "phi-vllm": ports["sse"]}.get(c["name"])
        if port:
            for group in c["load_assignment"]["endpoints"]:
                for ep in group["lb_endpoints"]:
                    ep["endpoint"]["address"]["socket_address"]["port_value"] = port
    return cfg


def wait_healthy(gw: Envoy) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        _, text = http_get(gw.admin, "/clusters")
        flags = [l.rsplit("::", 1)[1] for l in text.splitlines() if "::health_flags::" in l
                 and (l.startswith("qwen-vllm::") or l.startswith("phi-vllm::"))]
        if flags and all(f == "healthy" for f in flags):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"bench-usage: upstreams not healthy: {flags}")
        time.sleep(0.2)


def cpu_ns(pid: int) -> tuple[int, int]:
    """Nanoseconds on CPU of the process (all threads) and of its worker thread, from
    /proc/<pid>/task/*/schedstat (the scheduler's own clock, not 10 ms ticks)."""
    total = worker = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns = int((task / "schedstat").read_text().split()[0])
            comm = (task / "comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue
        total += ns
        if comm == ENVOY_WORKER_COMM:
            worker += ns
    return total, worker


def settle(gw: Envoy) -> None:
    """Waits until the gateway has no request open: a stream wrk cut at a run's end is torn
    down, and a response the worker had not finished is finished, before the run's CPU and
    counters are read (on a busy machine the worker lags behind wrk)."""
    deadline = time.monotonic() + 30
    while gw.stats(r"^http\.llm_gateway\.downstream_rq_active$").get("http.llm_gateway.downstream_rq_active", 0):
        if time.monotonic() > deadline:
            raise SystemExit("bench-usage: requests still open 30 s after a run")
        time.sleep(0.02)


def counted(gw: Envoy) -> int:
    return gw.stats("bbr_usage_responses_total").get(COUNTED, 0)


def median_ci(xs: list[float]) -> tuple[float, float, float]:
    """The median and a distribution-free confidence interval for it (order statistics: the
    widest symmetric pair whose binomial coverage is at least 90 %, or the range when there
    are too few rounds for that): (low, high, coverage)."""
    s = sorted(xs)
    n = len(s)
    best = (s[0], s[-1], 1 - 2 * 0.5 ** n)
    for k in range(1, n // 2):
        # P(X_(k+1) <= median <= X_(n-k)) = 1 - 2 P(Binomial(n, 1/2) <= k)
        cov = 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
        if cov < 0.90:
            break
        best = (s[k], s[n - 1 - k], cov)
    return best


def memory_gauge(gw: Envoy, port: int, body: dict) -> int:
    """The accounting VM's memory: every VM writes the one gauge, so one request through the
    metered listener first makes it that VM's figure."""
    http_post(port, json.dumps(body).encode(), {}, timeout=120)
    return gw.stats("bbr_wasm_memory_bytes").get("wasmcustom.bbr_wasm_memory_bytes", 0)


def main() -> int:
    rounds = int(os.environ.get("BENCH_USAGE_ROUNDS", "9"))
    duration = float(os.environ.get("BENCH_USAGE_DURATION", "2"))
    workloads = [w.strip() for w in os.environ.get("BENCH_USAGE_WORKLOADS", "json,sse").split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"bench-usage: BENCH_USAGE_WORKLOADS: unknown {w!r}")
    out_dir = Path(os.environ.get("BENCH_OUT", ROOT / "bench" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    wrk = os.environ.get("WRK_BIN") or shutil.which("wrk")
    if not wrk:
        raise SystemExit("bench-usage: no wrk (scripts/bench-deps.sh installs it)")
    configs: dict[str, tuple[Path, bool]] = {"on": (WASM, True), "off": (WASM, False)}
    for item in filter(None, (s.strip() for s in os.environ.get("BENCH_USAGE_ALT", "").split(","))):
        name, _, path = item.partition("=")
        if not name.isidentifier() or name in configs or not path:
            raise SystemExit(f"bench-usage: BENCH_USAGE_ALT: {item!r} is not a new name=path.wasm")
        configs[name] = (Path(path).resolve(), True)
    for p in [MOCK] + [w for w, _ in configs.values()]:
        if not p.is_file():
            raise SystemExit(f"bench-usage: missing {p}; make bench-usage builds it")
    work = Path(tempfile.mkdtemp(prefix="bbr-bench-usage-"))
    ports = {k: free_port() for k in ["admin", "json", "sse", *configs]}
    procs: list[Proc] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load0 = os.getloadavg()
    try:
        procs.append(start_mock("mock-json", ports["json"], QWEN, work, 0))
        procs.append(start_mock("mock-sse", ports["sse"], PHI, work, 1))
        env_bin = subprocess.run(["bash", str(ROOT / "scripts" / "envoy-bin.sh")], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.split()[-1]
        # Every listener's VM compiles the module at start: more builds, a longer start.
        perf.processes.START_TIMEOUT = START_TIMEOUT * len(configs)
        gw = Envoy("gateway-usage", env_bin, gateway_config(ports, configs), ports, work)
        procs.append(gw.proc)
        cpus = worker_cpus()
        pin_envoy_worker(gw, cpus)
        wait_healthy(gw)
        results: dict = {"started": started, "rounds": rounds, "duration_s": duration,
                         "worker_cpu": sorted(cpus), "configs": {k: str(v[0]) for k, v in configs.items()},
                         "workloads": {}}
        memory: dict[str, int] = {"start": memory_gauge(gw, ports["on"], WORKLOADS["json"][3])}
        for name in workloads:
            model, conns, factor, body = WORKLOADS[name]
            seconds = duration * factor
            body_file = work / f"{name}.json"
            body_file.write_text(json.dumps(body))
            # Sanity: every listener answers 200 with usage, from the right mock.
            for which in configs:
                status, headers, data = http_post(ports[which], json.dumps(body).encode(), {})
                if status != 200 or b'"usage"' not in data:
                    raise SystemExit(f"bench-usage: {name} via {which}: {status} {data[:200]!r}")
            per: dict[str, list[dict]] = {w: [] for w in configs}
            for which in configs:  # warm-up, unrecorded
                run_wrk(wrk, ports[which], body_file, conns, 1, None, work)
            settle(gw)
            names = list(configs)
            for r in range(rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                if (r // len(names)) % 2:
                    order.reverse()
                for which in order:
                    c0 = counted(gw)
                    (t0, w0), s0 = cpu_ns(gw.proc.pid), time.monotonic()
                    res = run_wrk(wrk, ports[which], body_file, conns, seconds, None, work)
                    settle(gw)
                    (t1, w1), s1 = cpu_ns(gw.proc.pid), time.monotonic()
                    moved = counted(gw) - c0
                    n = res["requests"]
                    if res["errors_total"]:
                        raise SystemExit(f"bench-usage: {name} via {which}: wrk errors {res['errors']}")
                    # The filter counted exactly the responses it saw to the end (on), or none
                    # (off); wrk's cut streams at the run's end are no response of the run.
                    if which == "on" and not n <= moved <= n + conns:
                        raise SystemExit(f"bench-usage: {name} via {which}: {n} responses, {moved} counted")
                    if not configs[which][1] and moved:
                        raise SystemExit(f"bench-usage: {name} via {which}: accounting off counted {moved}")
                    per[which].append({
                        "round": r, "requests": n, "counted": moved, "rps": res["rps"], "bytes": res["bytes"],
                        "wall_s": s1 - s0, "cpu_s": (t1 - t0) / 1e9, "worker_cpu_s": (w1 - w0) / 1e9,
                        "cpu_us_per_request": (t1 - t0) / 1e3 / n if n else float("nan"),
                        "worker_us_per_request": (w1 - w0) / 1e3 / n if n else float("nan"),
                        "load_1m": os.getloadavg()[0]})
            entry: dict = {"connections": conns, "seconds_per_run": seconds, "runs": per,
                           "response_bytes": per["on"][0]["bytes"] / max(1, per["on"][0]["requests"]),
                           "vs_off": {}, "on_vs": {}}
            for key in ("cpu_us_per_request", "worker_us_per_request"):
                entry[key] = {w: statistics.median(x[key] for x in per[w] if x["requests"]) for w in per}
            for which in configs:
                if which == "off":
                    continue
                cmp: dict = {}
                for key, label in (("cpu_us_per_request", "process"), ("worker_us_per_request", "worker")):
                    ratios = [a[key] / b[key] for a, b in zip(per[which], per["off"])
                              if a["requests"] and b["requests"]]
                    if not ratios:
                        raise SystemExit(f"bench-usage: {name}: no round completed a response on both listeners")
                    lo, hi, cov = median_ci(ratios)
                    cmp[label] = {"median": statistics.median(ratios), "ci": [lo, hi], "ci_coverage": cov,
                                  "min": min(ratios), "max": max(ratios), "ratios": ratios}
                entry["vs_off"][which] = cmp
            # "on" against each other build, round by round (for the read-only floor: what the
            # scan and the bookkeeping add to copying every chunk in).
            for which in configs:
                if which in ("on", "off"):
                    continue
                ratios = [a["cpu_us_per_request"] / b["cpu_us_per_request"]
                          for a, b in zip(per["on"], per[which]) if a["requests"] and b["requests"]]
                if ratios:
                    lo, hi, cov = median_ci(ratios)
                    entry["on_vs"][which] = {"median": statistics.median(ratios), "ci": [lo, hi],
                                             "ci_coverage": cov, "min": min(ratios), "max": max(ratios),
                                             "ratios": ratios}
            results["workloads"][name] = entry
            memory[name] = memory_gauge(gw, ports["on"], body)
        if "sse" in workloads:
            long_body = dict(WORKLOADS["sse"][3], max_tokens=4096)
            _, _, data = http_post(ports["on"], json.dumps(long_body).encode(), {}, timeout=120)
            memory["sse_4096_tokens"] = memory_gauge(gw, ports["on"], long_body)
            memory["sse_4096_tokens_bytes"] = len(data)
        results["wasm_memory_bytes"] = memory
        results["filter_counters"] = gw.stats("bbr_usage_responses_total|bbr_tokens_total")
    finally:
        for p in reversed(procs):
            p.stop()
    load1 = os.getloadavg()
    results["load_average"] = {"start": load0, "end": load1}
    lines = [f"bench-usage {started}, load average (1, 5, 15 min) {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} "
             f"at the start, {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at the end; {rounds} rounds, "
             f"wrk -c8, gateway worker pinned to CPU {sorted(results['worker_cpu'])}",
             "",
             f"| workload | response | gateway CPU µs/request (process; worker), off | on | "
             f"on / off, process: median [CI] (range) | worker: median [CI] | target ≤ {TARGET} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, w in results["workloads"].items():
        for which, cmp in w["vs_off"].items():
            p, k = cmp["process"], cmp["worker"]
            label = name if which == "on" else f"{name} ({which})"
            lines.append(
                f"| {label} | {w['response_bytes']:.0f} B | {w['cpu_us_per_request']['off']:.1f}; "
                f"{w['worker_us_per_request']['off']:.1f} | {w['cpu_us_per_request'][which]:.1f}; "
                f"{w['worker_us_per_request'][which]:.1f} | {p['median']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}] "
                f"({p['min']:.3f}-{p['max']:.3f}) | {k['median']:.3f} [{k['ci'][0]:.3f}, {k['ci'][1]:.3f}] | "
                f"{'met' if p['median'] <= TARGET else 'not met'} |")
    others = [(name, which, c) for name, w in results["workloads"].items() for which, c in w["on_vs"].items()]
    if others:
        lines += ["", "| workload | on / build, process: median [CI] (range) |", "| --- | --- |"]
        for name, which, c in others:
            lines.append(f"| {name}: on / {which} | {c['median']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] "
                         f"({c['min']:.3f}-{c['max']:.3f}) |")
    cov = min((c["process"]["ci_coverage"] for w in results["workloads"].values() for c in w["vs_off"].values()),
              default=0)
    lines.append("")
    lines.append(f"CI: the median's distribution-free confidence interval over the rounds (coverage ≥ {cov:.0%}).")
    m = results["wasm_memory_bytes"]
    if "sse_4096_tokens" in m:
        lines.append("")
        lines.append(f"wasm memory (bbr_wasm_memory_bytes, accounting on): start {m['start']}, "
                     + ", ".join(f"after {w} {m[w]}" for w in workloads)
                     + f", after one {m['sse_4096_tokens_bytes']}-byte stream {m['sse_4096_tokens']}: "
                     f"{'flat' if m['sse_4096_tokens'] == m['sse'] else 'grew'}")
    md = "\n".join(lines)
    print(md)
    (out_dir / "usage.json").write_text(json.dumps(results, indent=2))
    (out_dir / "usage.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
