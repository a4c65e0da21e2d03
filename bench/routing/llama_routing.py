"""make bench-routing BACKEND=llama: round robin against prefix affinity on real servers.

Two replicas of llama.cpp's llama-server running SmolLM2-135M-Instruct (tests/llama_pool.py;
scripts/llama-deps.sh builds it), one Envoy with bbr-wasm (envoy/envoy.yaml with the SmolLM2
pool added) and two clusters over the same two replicas: `smollm-rr` (ROUND_ROBIN) and
`smollm-llama` as shipped (MAGLEV on x-gateway-prefix-hash, hash_balance_factor 125). A request
header, x-bench-strategy, picks the route (bench only; the shipped config has no such route).

Workload: TENANTS tenants, each with its own system prompt of about 1.6 KB of real English (the
seeds, cut in distinct pieces: about 400 tokens, which this CPU prefills in about 1.5 s), and
QUESTIONS short questions each, in one seeded random order, one request at a time (concurrency 1,
so load never spills and the comparison is about the cache). Each replica gets `--parallel
SLOTS` slots and no host-memory prompt cache (`--cache-ram 0`): a replica keeps at most SLOTS
prompts, so the two replicas together hold 2 x SLOTS < TENANTS system prompts, below the working
set. With affinity each tenant's requests meet one replica; with round robin every replica sees
every tenant.

The replicas are restarted between strategies (empty caches). Reported per strategy: TTFT p50 /
p95 (client side, to the first streamed token), the servers' own `timings` (prompt_n: tokens
prefilled; cache_n: tokens reused from a slot) summed over the run, and the requests per replica.
Target: affinity's TTFT p50 <= 0.5x round robin's. Results: bench/results/routing/llama.{md,json}.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import llama_pool  # noqa: E402
import procs  # noqa: E402

WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr_wasm.wasm"
OUT = ROOT / "bench" / "results" / "routing"
RUN = ROOT / ".run" / "bench-routing-llama"
SEEDS = ROOT.parent / "shared" / "seeds"

TENANTS = 6
QUESTIONS = 8
SLOTS = 2
SYSTEM_BYTES = 1600
MAX_TOKENS = 4
STRATEGIES = {"round_robin": "smollm-rr", "affinity": llama_pool.CLUSTER}
QUESTIONS_TEXT = [
    "What should I do first?", "Summarise the key point in one sentence.", "Which step is the riskiest?",
    "What is required before starting?", "How do I verify it worked?", "What is the most common mistake?",
    "Which component routes the request?", "How many models are deployed?",
]


def say(msg: str) -> None:
    print(f"bench-routing-llama: {msg}", file=sys.stderr, flush=True)


def seed_text() -> str:
    """Real English: the seeds (llm-d guides), whitespace folded."""
    files = sorted(SEEDS.glob("*.txt")) if SEEDS.is_dir() else []
    if not files:
        raise SystemExit(f"no seed documents in {SEEDS} (the shared seeds beside the repository)")
    return " ".join(" ".join(f.read_text(errors="replace").split()) for f in files)


def workload(rng: random.Random) -> list[tuple[int, list[dict]]]:
    text = seed_text()
    if len(text) < TENANTS * SYSTEM_BYTES:
        raise SystemExit("the seeds are too short for the tenants' system prompts")
    systems = [
        f"You are the assistant of tenant {t}. Answer from this guide only.\n"
        + text[t * SYSTEM_BYTES:(t + 1) * SYSTEM_BYTES]
        for t in range(TENANTS)
    ]
    reqs = [(t, q) for t in range(TENANTS) for q in range(QUESTIONS)]
    rng.shuffle(reqs)
    return [
        (t, [{"role": "system", "content": systems[t]}, {"role": "user", "content": QUESTIONS_TEXT[q]}])
        for t, q in reqs
    ]


class Replica:
    def __init__(self, server: str, i: int, port: int):
        self.i, self.port = i, port
        argv = llama_pool.server_argv(server, port, parallel=SLOTS, cache_ram_mib=0)
        self.log = open(RUN / f"llama-{i}.log", "ab")
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                      preexec_fn=procs.die_with_parent)
        deadline = time.monotonic() + 60
        while True:
            if self.popen.poll() is not None:
                raise SystemExit(f"llama-server {i} exited; see {RUN}/llama-{i}.log")
            if llama_pool.healthy(port):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"llama-server {i} not healthy in 60 s")
            time.sleep(0.2)

    def stop(self) -> None:
        procs.stop(self.popen, 10)
        self.log.close()


def envoy_config(port: int, admin: int, replica_ports: list[int]) -> dict:
    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    llama_pool.add_pool(cfg, replica_ports)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.pop("access_log", None)
    for f in hcm["http_filters"]:
        if f["name"] == "envoy.filters.http.wasm":
            f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(WASM)
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    affinity = next(r for r in routes if r.get("name") == llama_pool.ROUTE)
    rr = copy.deepcopy(affinity)
    rr["name"] = "smollm-rr"
    rr["match"]["headers"].append({"name": "x-bench-strategy", "string_match": {"exact": "round_robin"}})
    rr["route"]["cluster"] = "smollm-rr"
    rr["route"].pop("hash_policy", None)
    routes.insert(routes.index(affinity), rr)
    clusters = cfg["static_resources"]["clusters"]
    shipped = next(c for c in clusters if c["name"] == llama_pool.CLUSTER)
    rr_cluster = copy.deepcopy(shipped)
    rr_cluster["name"] = rr_cluster["load_assignment"]["cluster_name"] = "smollm-rr"
    # The shipped policy (override_host, MAGLEV fallback) would take precedence over lb_policy.
    rr_cluster.pop("load_balancing_policy", None)
    rr_cluster["lb_policy"] = "ROUND_ROBIN"
    rr_cluster["common_lb_config"].pop("consistent_hashing_lb_config", None)
    clusters.append(rr_cluster)
    for c in clusters:  # the mock pools are not started here
        if c["name"] not in (llama_pool.CLUSTER, "smollm-rr"):
            c.pop("health_checks", None)
    return cfg


def one(client: httpx.Client, strategy: str, messages: list[dict]) -> dict:
    body = {"model": llama_pool.MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True,
            "temperature": 0}
    t0 = time.monotonic()
    first, timings, upstream = None, None, None
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"x-bench-strategy": strategy}) as r:
        if r.status_code != 200:
            raise SystemExit(f"{strategy}: {r.status_code} {r.read()[:300]!r}")
        upstream = r.headers.get("x-bench-upstream")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                first = time.monotonic() - t0
            if chunk.get("timings"):
                timings = chunk["timings"]
    return {"ttft": first if first is not None else time.monotonic() - t0, "timings": timings or {},
            "upstream": upstream}


def main() -> int:
    RUN.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    say("llama-server (built once by scripts/llama-deps.sh)")
    server = llama_pool.install()
    envoy_bin = subprocess.run(["bash", str(ROOT / "scripts" / "envoy-bin.sh")], capture_output=True, text=True,
                               check=True).stdout.strip().splitlines()[-1]
    reqs = workload(random.Random(42))
    replica_ports = [procs.free_port(), procs.free_port()]
    port, admin = procs.free_port(), procs.free_port()
    cfg = envoy_config(port, admin, replica_ports)
    # Test-only: which replica answered.
    for r in cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "route_config"]["virtual_hosts"][0]["routes"]:
        r.setdefault("response_headers_to_add", []).append(
            {"header": {"key": "x-bench-upstream", "value": "%UPSTREAM_REMOTE_ADDRESS%"}})
    cfg_path = RUN / "envoy.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    results = {}
    started = time.monotonic()
    for strategy in STRATEGIES:
        # Fresh replicas (empty slots) and a fresh Envoy (no pooled connections to the old
        # processes), started in that order so the first health check finds the replicas up.
        replicas = [Replica(server, i, p) for i, p in enumerate(replica_ports)]
        envoy_log = open(RUN / f"envoy-{strategy}.log", "ab")
        envoy = subprocess.Popen([envoy_bin, "-c", str(cfg_path), "--concurrency", "1", "--use-dynamic-base-id",
                                  "--base-id-path", str(RUN / "base-id"), "--log-level", "warning"],
                                 stdin=subprocess.DEVNULL, stdout=envoy_log, stderr=subprocess.STDOUT,
                                 preexec_fn=procs.die_with_parent)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    ready = httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=2).text.strip() == "LIVE"
                    flags = [ln for ln in httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=2).text.splitlines()
                             if ln.startswith(("smollm-rr::", f"{llama_pool.CLUSTER}::")) and "::health_flags::" in ln]
                    if ready and len(flags) == 4 and all(ln.endswith("::healthy") for ln in flags):
                        break
                except httpx.HTTPError:
                    pass
                if envoy.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"Envoy not ready with healthy replicas; see {RUN}/envoy-{strategy}.log")
                time.sleep(0.2)
            say(f"{strategy}: {len(reqs)} requests, {TENANTS} tenants, {SLOTS} slots per replica")
            rows = []
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                for tenant, messages in reqs:
                    try:
                        row = one(client, strategy, messages)
                    except SystemExit:
                        clusters = httpx.get(f"http://127.0.0.1:{admin}/clusters", timeout=2).text
                        say("\n".join(ln for ln in clusters.splitlines() if ln.startswith(("smollm-rr::", f"{llama_pool.CLUSTER}::"))))
                        raise
                    row["tenant"] = tenant
                    rows.append(row)
            results[strategy] = rows
        finally:
            procs.stop(envoy, 10)
            envoy_log.close()
            for r in replicas:
                r.stop()

    def summary(rows):
        ttft = sorted(r["ttft"] * 1000 for r in rows)
        per = {}
        for r in rows:
            per[r["upstream"]] = per.get(r["upstream"], 0) + 1
        tenants_per_replica = {}
        for r in rows:
            tenants_per_replica.setdefault(r["upstream"], set()).add(r["tenant"])
        return {
            "requests": len(rows),
            "ttft_p50_ms": statistics.median(ttft),
            "ttft_p95_ms": ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))],
            "prompt_n": sum(r["timings"].get("prompt_n", 0) for r in rows),
            "cache_n": sum(r["timings"].get("cache_n", 0) for r in rows),
            "per_replica": per,
            "tenants_per_replica": {k: sorted(v) for k, v in tenants_per_replica.items()},
        }

    summ = {s: summary(rows) for s, rows in results.items()}
    ratio = summ["affinity"]["ttft_p50_ms"] / summ["round_robin"]["ttft_p50_ms"]
    met = ratio <= 0.5
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end",
        "seconds": round(time.monotonic() - started),
        "tenants": TENANTS, "questions": QUESTIONS, "slots_per_replica": SLOTS, "system_bytes": SYSTEM_BYTES,
    }
    (OUT / "llama.json").write_text(json.dumps({"meta": meta, "summary": summ, "ratio_p50": ratio,
                                                 "target_met": met, "rows": results}, indent=1) + "\n")
    lines = [
        f"# make bench-routing BACKEND=llama ({meta['date']})", "",
        f"Two llama-server replicas (SmolLM2-135M-Instruct, Q4_1, one thread each, `--parallel {SLOTS}`, "
        f"`--cache-ram 0`), one Envoy with bbr-wasm; {TENANTS} tenants x {QUESTIONS} questions, system prompts "
        f"of about {SYSTEM_BYTES} bytes of the seeds' English, one request at a time, {MAX_TOKENS} output tokens. "
        f"{meta['machine']}; {meta['seconds']} s.", "",
        "| strategy | requests | TTFT p50 | TTFT p95 | prompt tokens prefilled (prompt_n) | reused from a slot (cache_n) | requests per replica | tenants per replica |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s, v in summ.items():
        lines.append(
            f"| {s} | {v['requests']} | {v['ttft_p50_ms']:.0f} ms | {v['ttft_p95_ms']:.0f} ms | {v['prompt_n']} | "
            f"{v['cache_n']} | {' / '.join(str(n) for n in v['per_replica'].values())} | "
            f"{' / '.join(str(len(t)) for t in v['tenants_per_replica'].values())} |")
    lines += ["", f"Target: affinity's TTFT p50 <= 0.5x round robin's: {ratio:.2f}x: **{'met' if met else 'NOT MET'}**.", ""]
    (OUT / "llama.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
