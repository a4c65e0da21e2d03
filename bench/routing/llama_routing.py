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

import datetime as dt
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import httpx

import real_servers as rs  # bench/routing/real_servers.py: shared with vllm_routing.py

sys.path.insert(0, str(rs.ROOT / "tests"))
import llama_pool  # noqa: E402
import procs  # noqa: E402

OUT = rs.OUT
RUN = rs.ROOT / ".run" / "bench-routing-llama"

TENANTS = 6
QUESTIONS = 8
SLOTS = 2
SYSTEM_BYTES = 1600
MAX_TOKENS = 4
STRATEGIES = {"round_robin": "smollm-rr", "affinity": llama_pool.CLUSTER}


def say(msg: str) -> None:
    print(f"bench-routing-llama: {msg}", file=sys.stderr, flush=True)


def workload(rng: random.Random) -> list[tuple[int, list[dict]]]:
    return rs.workload(rng, TENANTS, QUESTIONS, SYSTEM_BYTES)


class Replica:
    """One llama-server on 127.0.0.1:port (`--metrics` on), started and healthy; `stop` by pid.
    llama_direct.py starts its replicas with other slots and its own run folder."""

    def __init__(self, server: str, i: int, port: int, slots: int = SLOTS, cache_ram_mib: int = 0,
                 run: Path = RUN):
        self.i, self.port = i, port
        argv = llama_pool.server_argv(server, port, parallel=slots, cache_ram_mib=cache_ram_mib)
        self.proc = procs.Child(f"llama-server {i}", argv, run / f"llama-{i}.log")
        deadline = time.monotonic() + 60
        while True:
            if not self.proc.alive():
                self.proc.stop()
                raise SystemExit(f"llama-server {i} exited; see {run}/llama-{i}.log")
            if llama_pool.healthy(port):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"llama-server {i} not healthy in 60 s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.stop()


def envoy_config(port: int, admin: int, replica_ports: list[int]) -> dict:
    return rs.gateway_config(port, admin, lambda cfg: llama_pool.add_pool(cfg, replica_ports),
                             llama_pool.CLUSTER, llama_pool.ROUTE)


def one(client: httpx.Client, strategy: str, messages: list[dict]) -> dict:
    body = {"model": llama_pool.MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True,
            "temperature": 0}
    try:
        return rs.stream_chat(client, body, {rs.STRATEGY_HEADER: strategy})
    except rs.RequestFailed as e:
        raise SystemExit(f"{strategy}: {e}") from None


def main() -> int:
    RUN.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    say("llama-server (built once by scripts/llama-deps.sh)")
    server = llama_pool.install()
    envoy_bin = rs.envoy_bin()
    reqs = workload(random.Random(42))
    replica_ports = [procs.free_port(), procs.free_port()]
    port, admin = procs.free_port(), procs.free_port()
    cfg = envoy_config(port, admin, replica_ports)
    results = {}
    started = time.monotonic()
    for strategy in STRATEGIES:
        # Fresh replicas (empty slots) and a fresh Envoy (no pooled connections to the old
        # processes), started in that order so the first health check finds the replicas up.
        replicas = [Replica(server, i, p) for i, p in enumerate(replica_ports)]
        envoy = None
        try:
            envoy = rs.Envoy(envoy_bin, cfg, RUN, strategy, admin, (rs.RR, llama_pool.CLUSTER), 4)
            say(f"{strategy}: {len(reqs)} requests, {TENANTS} tenants, {SLOTS} slots per replica")
            rows = []
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                for tenant, messages in reqs:
                    try:
                        row = one(client, strategy, messages)
                    except SystemExit:
                        say("\n".join(envoy.host_lines()))
                        raise
                    row["tenant"] = tenant
                    rows.append(row)
            results[strategy] = rows
        finally:
            if envoy is not None:
                envoy.stop()
            for r in replicas:
                r.stop()

    def summary(rows):
        out = rs.summary(rows)
        out["prompt_n"] = sum(r["timings"].get("prompt_n", 0) for r in rows)
        out["cache_n"] = sum(r["timings"].get("cache_n", 0) for r in rows)
        return out

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
