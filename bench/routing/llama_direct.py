"""make bench-routing BACKEND=llama WORKLOAD=direct: load the gateway cannot see, on real servers.

Three llama-server replicas of SmolLM2-135M-Instruct (tests/llama_pool.py's command line, with
`--metrics`), one Envoy with bbr-wasm (envoy/envoy.yaml with the SmolLM2 pool added), and four
strategies over the same three replicas, one after the other, each with fresh replicas (empty
slots and prompt caches) and a fresh Envoy (empty picker tables):
- picker_metrics: the shipped switch on (prefixAffinity.picker.enabled, `hosts: {}`,
  `serverMetrics: {}`, every setting at its shipped default): the hosts from Envoy's admin, and
  each replica's own `llamacpp:requests_deferred` / `requests_processing` from its /metrics
  (every 100 ms, 500 ms timeout; the pinned llama-server exports no `kv_cache_usage_ratio`,
  the sampler records -1 for it);
- picker: the same without `serverMetrics`: the hosts from the admin, the load from this Envoy's
  own in-flight counts only;
- affinity: the picker off, so the shipped cluster's fallback chooses: MAGLEV on the filter's
  x-gateway-prefix-hash, hash_balance_factor 125;
- least_request: a twin of the pool's cluster with LEAST_REQUEST (Envoy's default: the less
  loaded of two random hosts, by this Envoy's requests in flight), on its own route
  (bench/routing/real_servers.py's twins, selected by the bench-only x-bench-strategy header).

Direct load: replica-0 also serves DIRECT_SENDERS closed-loop clients that talk to it directly,
not through the gateway, from WARMUP_S before the gateway's first request until its last one
has answered. Each sends a unique prompt (a numbered opening, so no slot or cache reuses it) of
DIRECT_BYTES of the seeds' English and asks for DIRECT_TOKENS tokens. Every replica has SLOTS
slots (`--parallel`), so with more senders than slots llama-server defers the rest: replica-0
has deferred requests all the time the gateway's workload runs (measured, below).

Gateway workload (real_servers.workload): TENANTS tenants, each with its own system prompt of
SYSTEM_BYTES of the seeds' English (ASCII only), QUESTIONS questions each, in one seeded order,
sent open-loop at Poisson arrivals of RATE per second (at most MAX_IN_FLIGHT at once), streamed,
GATEWAY_TOKENS output tokens. The replicas keep prompts in host memory after a slot is reused
(`--cache-ram`, llama_pool's 256 MiB, as `make run BACKEND=llama`), so a replica that has seen a
tenant prefills only its question.

The split while replica-0 has deferred requests. A sampler thread reads every replica's
/metrics every SAMPLE_S (llama-server answers it between decode steps, also while it decodes:
tools/server/server-context.cpp, process_single_task, METRICS is taken while yielding). A
gateway request counts as sent while replica-0 had deferred requests when the last sample of
replica-0 that *answered before the request was sent*, at most FRESH_S before it, read
`llamacpp:requests_deferred` >= 1. Before, not after: a request the gateway sends to replica-0
is itself deferred there, so a later sample would count the strategy's own choice as the
state. Which replica served each request is Envoy's own record, %UPSTREAM_REMOTE_ADDRESS%, set
as a response header (x-bench-upstream). Checked against the servers: the change of each
replica's `llamacpp:tokens_predicted_total` over the strategy must equal the `timings.predicted_n`
of the answers (gateway and direct) the header attributes to it.

Reported per strategy: that split (target for picker_metrics: >= 80 % elsewhere), requests per
replica, TTFT p50 / p95 (client side, to the first streamed token) of the gateway's requests,
and split by replica-0 / elsewhere; the tokens prefilled and reused (timings.prompt_n,
cache_n); the direct clients' requests and TTFT; how much of the run replica-0 had deferred
requests, and replicas 1-2 had any; the samples' /metrics latency; the load average (at the
start and end, and sampled every 5 s); for the pickers, their scrape and poll counters.
Results: bench/results/routing/llama-direct.{md,json}.

Sizes: prefill ran at 55-130 tokens/s per replica here (three replicas on two shared cores,
one busy with its direct load; a smoke run), so the prompts are short: a tenant's prompt is
about 150 tokens, a direct one about 100.

Bounds: requests / RATE sets the gateway's part (about 90 s per strategy); every request has a
client timeout; the direct senders stop with the gateway's workload and are joined; the whole
run stops at --max-minutes; replicas and Envoy are stopped by pid in `finally`.
Options: --only (strategies), --requests N (the first N of the sequence: a smoke run), --out DIR.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

import llama_routing  # bench/routing/llama_routing.py: its Replica
import real_servers as rs  # bench/routing/real_servers.py

sys.path.insert(0, str(rs.ROOT / "tests"))
import llama_pool  # noqa: E402
import procs  # noqa: E402

RUN = rs.ROOT / ".run" / "bench-routing-llama-direct"

REPLICAS = 3
SLOTS = 2
TENANTS = 6
QUESTIONS = 6
SYSTEM_BYTES = 500
GATEWAY_TOKENS = 8
RATE = 0.4                 # gateway requests per second (Poisson)
MAX_IN_FLIGHT = 8
DIRECT_SENDERS = 5         # > SLOTS: llama-server defers the rest
DIRECT_BYTES = 300
DIRECT_TOKENS = 24
WARMUP_S = 4.0             # direct load before the gateway's first request
SAMPLE_S = 0.1
FRESH_S = 0.25
TIMEOUT_S = 120.0
TARGET_ELSEWHERE = 0.80
STRATEGIES = ("picker_metrics", "picker", "affinity", "least_request")
HOT = 0                    # the replica with direct load


def say(msg: str) -> None:
    print(f"bench-routing-llama-direct [{time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f}]: {msg}",
          file=sys.stderr, flush=True)


def no_keepalive_client(base_url: str) -> httpx.Client:
    # llama-server closes the connection after a streamed response while it advertises
    # keep-alive (tests/llama_pool.py, add_pool): one connection per request.
    return httpx.Client(base_url=base_url, timeout=TIMEOUT_S, limits=httpx.Limits(max_keepalive_connections=0))


def envoy_config(port: int, admin: int, replica_ports: list[int], strategy: str) -> dict:
    cfg = rs.gateway_config(port, admin, lambda c: llama_pool.add_pool(c, replica_ports), llama_pool.CLUSTER,
                            llama_pool.ROUTE, twins=("least_request",))
    plugin = rs.wasm_plugin(cfg)
    fc = json.loads(plugin["configuration"]["value"])
    picker = fc["prefixAffinity"]["picker"]
    # The shipped switch, and the SmolLM2 pool for it (the shipped mock pools are not started).
    picker["enabled"] = strategy in ("picker", "picker_metrics")
    picker["pools"] = [{"cluster": llama_pool.CLUSTER, "baseModels": [llama_pool.MODEL]}]
    if strategy == "picker":
        del picker["serverMetrics"]  # in-flight counts only; the hosts still from the admin
    plugin["configuration"]["value"] = json.dumps(fc, separators=(",", ":"))
    return cfg


def metrics(port: int) -> dict[str, float]:
    """llama-server's llamacpp:* gauges and counters (one series each)."""
    out = {}
    with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        text = c.get(f"http://127.0.0.1:{port}/metrics").text
    for line in text.splitlines():
        if line.startswith("llamacpp:"):
            name, _, value = line.partition(" ")
            out[name.split(":", 1)[1]] = float(value)
    return out


class Sampler(threading.Thread):
    """Every replica's /metrics every SAMPLE_S, and the load average every 5 s, until stopped."""

    def __init__(self, ports: list[int], t0: float):
        super().__init__(daemon=True)
        self.ports, self.t0 = ports, t0
        self.samples: list[dict] = []   # {replica, sent, answered (s since t0), deferred, processing, kv}
        self.loadavg: list[tuple[float, float]] = []
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        next_load = 0.0
        while not self.halt.is_set():
            for i, port in enumerate(self.ports):
                sent = time.monotonic() - self.t0
                try:
                    m = metrics(port)
                except (httpx.HTTPError, ValueError):
                    self.errors += 1
                    continue
                self.samples.append({"replica": i, "sent": sent, "answered": time.monotonic() - self.t0,
                                     "deferred": m.get("requests_deferred", -1),
                                     "processing": m.get("requests_processing", -1),
                                     "kv": m.get("kv_cache_usage_ratio", -1)})
            now = time.monotonic() - self.t0
            if now >= next_load:
                self.loadavg.append((round(now, 1), os.getloadavg()[0]))
                next_load = now + 5.0
            self.halt.wait(SAMPLE_S)


def direct_prompt(n: int, text: str) -> list[dict]:
    """A prompt no cache holds: numbered from its first token, then seeds' English."""
    start = (n * 997) % max(1, len(text) - DIRECT_BYTES)
    return [{"role": "user", "content": f"Direct request {n}. Summarise this:\n" + text[start:start + DIRECT_BYTES]}]


def direct_sender(k: int, port: int, text: str, halt: threading.Event, deadline: float, t0: float,
                  rows: list[dict], errors: list[str]) -> None:
    n = k
    while not halt.is_set() and time.monotonic() < deadline:
        body = {"model": llama_pool.MODEL, "messages": direct_prompt(n, text), "max_tokens": DIRECT_TOKENS,
                "stream": True, "temperature": 0}
        sent = time.monotonic() - t0
        try:
            with no_keepalive_client(f"http://127.0.0.1:{port}") as client:
                row = rs.stream_chat(client, body, {})
        except (httpx.HTTPError, rs.RequestFailed) as e:
            errors.append(f"direct {k}: {e}")
            if halt.wait(0.5):
                return
            continue
        row.update(sent=sent, upstream=f"127.0.0.1:{port}")
        rows.append(row)
        n += DIRECT_SENDERS


def gateway_request(port: int, strategy: str, tenant: int, messages: list[dict], t0: float) -> dict:
    body = {"model": llama_pool.MODEL, "messages": messages, "max_tokens": GATEWAY_TOKENS, "stream": True,
            "temperature": 0}
    sent = time.monotonic() - t0
    with no_keepalive_client(f"http://127.0.0.1:{port}") as client:
        row = rs.stream_chat(client, body, {rs.STRATEGY_HEADER: strategy})
    row.update(sent=sent, tenant=tenant)
    return row


def state_at_send(samples: list[dict], sent: float) -> float | None:
    """replica-0's requests_deferred in its last sample answered before `sent`, if fresh."""
    before = [s for s in samples if s["replica"] == HOT and s["answered"] <= sent]
    if not before or sent - before[-1]["answered"] > FRESH_S:
        return None
    return before[-1]["deferred"]


def run_strategy(strategy: str, reqs, server: str, envoy_bin: str, replica_ports: list[int], text: str,
                 deadline: float) -> dict:
    port, admin = procs.free_port(), procs.free_port()
    replicas: list[llama_routing.Replica] = []
    envoy = None
    halt = threading.Event()
    senders: list[threading.Thread] = []
    sampler = None
    try:
        for i, p in enumerate(replica_ports):
            replicas.append(llama_routing.Replica(server, i, p, slots=SLOTS, cache_ram_mib=llama_pool.CACHE_RAM_MIB,
                                                  run=RUN))
        envoy = rs.Envoy(envoy_bin, envoy_config(port, admin, replica_ports, strategy), RUN, strategy, admin,
                         (rs.LR, llama_pool.CLUSTER), 2 * REPLICAS)
        before = {i: metrics(p) for i, p in enumerate(replica_ports)}
        load0, t0 = rs.loadavg(), time.monotonic()
        sampler = Sampler(replica_ports, t0)
        sampler.start()
        direct_rows: list[dict] = []
        direct_errors: list[str] = []
        senders = [threading.Thread(target=direct_sender, daemon=True,
                                    args=(k, replica_ports[HOT], text, halt, deadline, t0, direct_rows, direct_errors))
                   for k in range(DIRECT_SENDERS)]
        for s in senders:
            s.start()
        time.sleep(WARMUP_S)  # replica-0 fills its slots and defers; the picker scrapes meanwhile
        say(f"{strategy}: {len(reqs)} gateway requests at {RATE}/s, {DIRECT_SENDERS} direct senders on replica-0")
        rng = random.Random(7)  # the same arrival times for every strategy
        futures = []
        start = time.monotonic()
        at = 0.0
        with cf.ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT) as pool:
            for tenant, messages in reqs:
                at += rng.expovariate(RATE)
                delay = start + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if time.monotonic() > deadline:
                    raise SystemExit(f"{strategy}: past the run's time limit")
                futures.append(pool.submit(gateway_request, port, strategy, tenant, messages, t0))
            rows, failed = [], []
            for f in futures:
                try:
                    rows.append(f.result())
                except (httpx.HTTPError, rs.RequestFailed) as e:
                    failed.append(str(e)[:300])
        halt.set()
        for s in senders:
            s.join(TIMEOUT_S)
        sampler.halt.set()
        sampler.join(10)
        stats = envoy.picker_stats() if strategy.startswith("picker") else {}
        after = {i: metrics(p) for i, p in enumerate(replica_ports)}
        return {"rows": rows, "failed": failed, "direct_rows": direct_rows, "direct_errors": direct_errors,
                "samples": sampler.samples, "sample_errors": sampler.errors, "loadavg_series": sampler.loadavg,
                "before": before, "after": after, "picker_stats": stats, "load_start": load0,
                "load_end": rs.loadavg(), "seconds": round(time.monotonic() - t0),
                "senders_alive": sum(s.is_alive() for s in senders)}
    finally:
        halt.set()
        if sampler is not None:
            sampler.halt.set()
        if envoy is not None:
            envoy.stop()
        for r in replicas:
            r.stop()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.median(values) if q == 0.5 else rs.p95(values)


def summarize(run: dict, replica_ports: list[int]) -> dict:
    index = {f"127.0.0.1:{p}": i for i, p in enumerate(replica_ports)}
    rows = run["rows"]
    for r in rows:
        r["replica"] = index.get(r["upstream"], -1)
        r["hot_deferred_at_send"] = state_at_send(run["samples"], r["sent"])
    window = [r for r in rows if (r["hot_deferred_at_send"] or 0) >= 1]
    unknown = [r for r in rows if r["hot_deferred_at_send"] is None]
    to_hot = sum(r["replica"] == HOT for r in window)
    ttft = lambda rs_: [r["ttft"] * 1000 for r in rs_]  # noqa: E731
    hot_rows = [r for r in rows if r["replica"] == HOT]
    other_rows = [r for r in rows if r["replica"] != HOT]
    samples = run["samples"]
    by = {i: [s for s in samples if s["replica"] == i] for i in range(len(replica_ports))}
    latency = [(s["answered"] - s["sent"]) * 1000 for s in samples]
    # The servers' own count of the tokens they generated, against the answers attributed to them.
    served_tokens = {i: 0 for i in range(len(replica_ports))}
    for r in rows + run["direct_rows"]:
        if r["upstream"] in index:
            served_tokens[index[r["upstream"]]] += int(r["timings"].get("predicted_n", 0))
    predicted = {i: int(run["after"][i].get("tokens_predicted_total", 0) - run["before"][i].get("tokens_predicted_total", 0))
                 for i in range(len(replica_ports))}
    load_series = [v for _, v in run["loadavg_series"]]
    return {
        "requests": len(rows), "failed": len(run["failed"]),
        "in_window": len(window), "window_to_hot": to_hot,
        "window_elsewhere": (1 - to_hot / len(window)) if window else None,
        "no_fresh_sample": len(unknown),
        "per_replica": [sum(r["replica"] == i for r in rows) for i in range(len(replica_ports))],
        "ttft_p50_ms": pct(ttft(rows), 0.5), "ttft_p95_ms": pct(ttft(rows), 0.95),
        "ttft_hot_p50_ms": pct(ttft(hot_rows), 0.5), "ttft_elsewhere_p95_ms": pct(ttft(other_rows), 0.95),
        "ttft_hot_p95_ms": pct(ttft(hot_rows), 0.95), "ttft_elsewhere_p50_ms": pct(ttft(other_rows), 0.5),
        "prompt_n": sum(r["timings"].get("prompt_n", 0) for r in rows),
        "cache_n": sum(r["timings"].get("cache_n", 0) for r in rows),
        "direct_requests": len(run["direct_rows"]), "direct_errors": len(run["direct_errors"]),
        "direct_ttft_p50_ms": pct(ttft(run["direct_rows"]), 0.5),
        "hot_deferred_share": (sum(s["deferred"] >= 1 for s in by[HOT]) / len(by[HOT])) if by[HOT] else None,
        "hot_deferred_mean": statistics.mean(s["deferred"] for s in by[HOT]) if by[HOT] else None,
        "others_deferred_share": [(sum(s["deferred"] >= 1 for s in by[i]) / len(by[i])) if by[i] else None
                                  for i in by if i != HOT],
        "samples": len(samples), "sample_errors": run["sample_errors"],
        "metrics_latency_p50_ms": pct(latency, 0.5), "metrics_latency_p95_ms": pct(latency, 0.95),
        "metrics_latency_max_ms": max(latency) if latency else None,
        "tokens_check": {"server": predicted, "answers": served_tokens, "equal": predicted == served_tokens},
        "load_start": run["load_start"], "load_end": run["load_end"],
        "load_during": [min(load_series), max(load_series)] if load_series else None,
        "seconds": run["seconds"], "senders_alive": run["senders_alive"],
        "picker_stats": {short_stat(k): v for k, v in run["picker_stats"].items()
                         if any(w in k for w in ("scrape", "poll", "fallback", "stale"))},
    }


def short_stat(key: str) -> str:
    """`wasmcustom.outcome=.=ok;.;bbr_picker_metric_scrapes_total` -> `metric_scrapes[ok]`."""
    key = key.removeprefix("wasmcustom.")
    tag = ""
    if ";.;" in key:
        tags, key = key.rsplit(";.;", 1)
        tag = f"[{tags.split('=.=', 1)[-1]}]"
    return key.removeprefix("bbr_picker_").removesuffix("_total") + tag


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def report(summ: dict, meta: dict) -> tuple[str, bool | None]:
    lines = [
        f"# make bench-routing BACKEND=llama WORKLOAD=direct ({meta['date']})", "",
        f"Three llama-server replicas (SmolLM2-135M-Instruct Q4_1, one thread each, `--parallel {SLOTS}`, "
        f"`--metrics`, `--cache-ram {llama_pool.CACHE_RAM_MIB}`), one Envoy with bbr-wasm. replica-0 also serves "
        f"{DIRECT_SENDERS} closed-loop clients of its own (unique prompts of {DIRECT_BYTES} bytes, {DIRECT_TOKENS} "
        f"tokens). Gateway: {meta['requests']} requests ({TENANTS} tenants, system prompts of {SYSTEM_BYTES} bytes, "
        f"{GATEWAY_TOKENS} tokens), Poisson at {RATE}/s. {meta['machine']}; {meta['seconds']} s.", "",
        "| strategy | sent while replica-0 had deferred requests | of those to replica-0 | elsewhere | "
        "requests per replica (0 / 1 / 2) | TTFT p50 | TTFT p95 | TTFT p50 / p95 at replica-0 | "
        "TTFT p50 / p95 elsewhere | prompt tokens prefilled / reused | load average start -> end (min-max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s, v in summ.items():
        el = "-" if v["window_elsewhere"] is None else f"{100 * v['window_elsewhere']:.0f} %"
        during = "" if not v["load_during"] else f" ({v['load_during'][0]:.1f}-{v['load_during'][1]:.1f})"
        lines.append(
            f"| {s} | {v['in_window']} of {v['requests']} | {v['window_to_hot']} | {el} | "
            f"{' / '.join(map(str, v['per_replica']))} | {fmt_ms(v['ttft_p50_ms'])} | {fmt_ms(v['ttft_p95_ms'])} | "
            f"{fmt_ms(v['ttft_hot_p50_ms'])} / {fmt_ms(v['ttft_hot_p95_ms'])} | "
            f"{fmt_ms(v['ttft_elsewhere_p50_ms'])} / {fmt_ms(v['ttft_elsewhere_p95_ms'])} | "
            f"{v['prompt_n']} / {v['cache_n']} | {v['load_start'][0]:.1f} -> {v['load_end'][0]:.1f}{during} |")
    lines += ["", "| strategy | replica-0 deferred (share of samples, mean) | replicas 1 / 2 with any deferred | "
              "direct requests done (errors), TTFT p50 | /metrics latency p50 / p95 / max | tokens: servers = answers | "
              "failed | picker counters |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s, v in summ.items():
        others = " / ".join("-" if x is None else f"{100 * x:.0f} %" for x in v["others_deferred_share"])
        hd = "-" if v["hot_deferred_share"] is None else f"{100 * v['hot_deferred_share']:.0f} %, {v['hot_deferred_mean']:.1f}"
        stats = ", ".join(f"{k} {n}" for k, n in sorted(v["picker_stats"].items()) if n) or "-"
        lines.append(
            f"| {s} | {hd} | {others} | {v['direct_requests']} ({v['direct_errors']}), {fmt_ms(v['direct_ttft_p50_ms'])} | "
            f"{fmt_ms(v['metrics_latency_p50_ms'])} / {fmt_ms(v['metrics_latency_p95_ms'])} / "
            f"{fmt_ms(v['metrics_latency_max_ms'])} | {'yes' if v['tokens_check']['equal'] else 'NO ' + json.dumps(v['tokens_check'])} | "
            f"{v['failed']} | {stats} |")
    pm = summ.get("picker_metrics")
    met = None
    if pm and pm["window_elsewhere"] is not None:
        met = pm["window_elsewhere"] >= TARGET_ELSEWHERE
        lines += ["", f"Target: picker_metrics sends >= {100 * TARGET_ELSEWHERE:.0f} % of the gateway's new requests "
                      f"elsewhere while replica-0 has deferred requests: {100 * pm['window_elsewhere']:.0f} % "
                      f"({pm['in_window'] - pm['window_to_hot']} of {pm['in_window']}): **{'met' if met else 'NOT MET'}**."]
    lines += ["", "A request counts as sent while replica-0 had deferred requests when replica-0's last /metrics "
                  f"sample answered before it was sent (at most {FRESH_S * 1000:.0f} ms before) read "
                  "`llamacpp:requests_deferred` >= 1; the replica that served it is Envoy's upstream address.", ""]
    return "\n".join(lines), met


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(STRATEGIES), help="comma-separated strategies, in this order")
    ap.add_argument("--requests", type=int, default=0, help="only the first N gateway requests (smoke run)")
    ap.add_argument("--out", type=Path, default=rs.OUT)
    ap.add_argument("--max-minutes", type=float, default=20.0)
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    if any(s not in STRATEGIES for s in only):
        raise SystemExit(f"--only: strategies are {', '.join(STRATEGIES)}")
    RUN.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    say("llama-server (built once by scripts/llama-deps.sh)")
    server = llama_pool.install()
    envoy_bin = rs.envoy_bin()
    reqs = rs.workload(random.Random(42), TENANTS, QUESTIONS, SYSTEM_BYTES, ascii_only=True)
    if args.requests:
        reqs = reqs[:args.requests]
    # Direct prompts from the seeds' text past the tenants' system prompts (no shared blocks).
    text = rs.seed_text(ascii_only=True)[TENANTS * SYSTEM_BYTES:]
    replica_ports = [procs.free_port() for _ in range(REPLICAS)]
    started = time.monotonic()
    deadline = started + 60 * args.max_minutes
    runs, summ = {}, {}
    for strategy in only:
        runs[strategy] = run_strategy(strategy, reqs, server, envoy_bin, replica_ports, text, deadline)
        summ[strategy] = summarize(runs[strategy], replica_ports)
        v = summ[strategy]
        say(f"{strategy}: {v['window_to_hot']} of {v['in_window']} to replica-0 while it deferred; per replica "
            f"{v['per_replica']}; TTFT p50 {fmt_ms(v['ttft_p50_ms'])}, p95 {fmt_ms(v['ttft_p95_ms'])}")
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end",
        "seconds": round(time.monotonic() - started), "requests": len(reqs), "strategies": only,
        "settings": {"replicas": REPLICAS, "slots": SLOTS, "tenants": TENANTS, "questions": QUESTIONS,
                     "system_bytes": SYSTEM_BYTES, "gateway_tokens": GATEWAY_TOKENS, "rate": RATE,
                     "direct_senders": DIRECT_SENDERS, "direct_bytes": DIRECT_BYTES, "direct_tokens": DIRECT_TOKENS,
                     "warmup_s": WARMUP_S, "sample_s": SAMPLE_S, "fresh_s": FRESH_S,
                     "cache_ram_mib": llama_pool.CACHE_RAM_MIB},
    }
    md, met = report(summ, meta)
    # The raw /metrics samples (about 2,000 per strategy) stay in the run folder; the results
    # keep each gateway request's replica-0 state at send (hot_deferred_at_send).
    (RUN / "samples.json").write_text(json.dumps({s: r["samples"] for s, r in runs.items()}))
    (args.out / "llama-direct.json").write_text(json.dumps(
        {"meta": meta, "summary": summ, "target_met": met,
         "runs": {s: {k: v for k, v in r.items() if k != "samples"} for s, r in runs.items()}}, indent=1) + "\n")
    (args.out / "llama-direct.md").write_text(md)
    print(md)
    return 0 if met in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
