"""make bench-routing: which replica gets a prompt, and what its prefix cache makes of it.

One Envoy with bbr-wasm in front of one pool of 4 mock-vllm replicas that simulate vLLM's prefix
caching and one-prefill-at-a-time scheduling (tests/mock-vllm, "Prefix caching"). Envoy has one
listener per strategy, each routing to its own cluster over the same 4 replicas:

  round_robin      lb_policy ROUND_ROBIN
  least_request    lb_policy LEAST_REQUEST (what envoy/envoy.yaml ships today)
  affinity         lb_policy MAGLEV hashing on x-gateway-prefix-hash, bounded load
                   (common_lb_config.consistent_hashing_lb_config.hash_balance_factor)
  picker           the filter's endpoint picker (prefixAffinity.picker): per replica, an LRU of
                   the block hashes it sent there and its in-flight count, scored like llm-d's
                   EPP (prefix 3, load 2, bounded at balanceFactor); the cluster uses
                   envoy/picker-lb-policy.yaml (override_host, least-request fallback)
  + variants of affinity (RING_HASH, other hash_balance_factor and prefixBlocks values)
    and of picker (other balanceFactor values; lruBlocks matched to the replica's cache)

The same request sequence is replayed against each strategy, the replicas' caches emptied
(POST /reset_prefix_cache) in between. Arrivals are open-loop (Poisson, seeded), paced so that
the pool would run at UTILISATION of its prefill capacity if nothing were cached; a conversation's
next turn is also held until its previous turn has answered. Workloads:

  tenants        many tenants, each with a long system prompt (all of them opening with the same
                 company preamble), short user questions; tenant popularity Zipf-like
  conversations  multi-turn chats growing turn by turn, all opening with one app system prompt
  control        no shared prefixes at all

and a sweep of each replica's cache capacity as a multiple of the workload's working set (the
distinct blocks some later request reuses). Hit rates come from the replicas' own counters
(vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total); the oracle is one infinite
cache seeing the whole sequence in order.

The prefix key: when the built filter supports `prefixAffinity`, the filter computes it (and
every response's x-echo-prefix-hash is checked against bench/routing/prefix_key.py's); until
then the load generator sends the header itself, computed by prefix_key.py. `KeySource` is the
one place that decides. --key-source {auto,filter,client}.

Modules: settings.py (paths, parameters), workloads.py (the request sequences, the oracle),
strategies.py (the strategies, KeySource), gateway.py (the mocks, Envoy), replay.py (the load
generator), report.py (placement, targets, tables, chart); this file: run_one and main.

    .venv/bin/python bench/routing/bench_routing.py [--quick] [--key-source auto]
Results: bench/results/routing/{results.json,results.md,routing.png}.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from settings import (BASE_TTFT_MS, BLOCK_TOKENS, CAPACITIES, DEFAULT_HBF, DEFAULT_LB, DEFAULT_PREFIX_BLOCKS,
                      HEADER, ITL_MS, KEY_BLOCK_BYTES, MAX_TOKENS, MOCK, OUT, PREFILL_TOKENS_PER_S, REPLICAS,
                      TARGET_CAPACITY, UTILISATION, WASM)
from strategies import MAIN, KeySource, Strategy, variants
from workloads import (Workload, background_workload, control_workload, conversations_workload, oracle,
                       tenants_workload)
from gateway import Envoy, Mock, gateway_config, probe_filter
from replay import replay
from report import chart, gateway_targets, markdown, pct, placement, tail, targets
import procs  # tests/procs.py (settings put tests/ on sys.path)


def say(msg: str) -> None:
    print(f"bench-routing: {msg}", file=sys.stderr, flush=True)


def run_one(w: Workload, strategy: Strategy, gateways: list[dict[str, int]], mocks: list[Mock],
            keys: KeySource, capacity: float, split: str = "alternate") -> dict:
    for m in mocks:
        m.reset_cache()
    before = [m.counters() for m in mocks]
    outcomes, wall = asyncio.run(replay(w, [p[strategy.name] for p in gateways], strategy, keys,
                                        background_port=mocks[0].port if w.background else 0, split=split))
    after = [m.counters() for m in mocks]
    queries = sum(a[0] - b[0] for a, b in zip(after, before))
    hits = sum(a[1] - b[1] for a, b in zip(after, before))
    ok = [o for o in outcomes if o.status == 200 and not o.error]
    ttfts = [o.ttft_ms for o in ok if not math.isnan(o.ttft_ms)]
    per_replica = {m.id: 0 for m in mocks}
    for o in ok:
        per_replica[o.backend] = per_replica.get(o.backend, 0) + 1
    counts = list(per_replica.values())
    mismatched = 0
    if strategy.hashed:
        mismatched = sum(1 for r, o in zip(w.reqs, outcomes)
                         if o.status == 200 and o.echo_key != keys.expected(r.body, strategy))
    span = max((o.done_at for o in ok), default=wall)
    return {
        "workload": w.name, "strategy": strategy.name, "capacity": capacity, "gateways": len(gateways),
        "split": split if len(gateways) > 1 else "",
        "per_gateway": [sum(1 for o in ok if o.gateway == g) for g in range(len(gateways))],
        "placement": placement(w, outcomes),
        "tail": tail(w, outcomes, pct(ttfts, 95)),
        "lb": strategy.lb, "hash_balance_factor": strategy.hbf, "prefix_blocks": strategy.prefix_blocks,
        "requests": len(outcomes), "ok": len(ok),
        "errors": sorted({o.error or f"HTTP {o.status}" for o in outcomes if o not in ok})[:5],
        "hit_rate": hits / queries if queries else 0.0,
        "hit_rate_from_headers": (sum(o.hit_tokens for o in ok) / queries) if queries else 0.0,
        "oracle_hit_rate": w.oracle_hit_rate,
        "ttft_p50_ms": pct(ttfts, 50), "ttft_p95_ms": pct(ttfts, 95), "ttft_p99_ms": pct(ttfts, 99),
        "latency_p50_ms": pct([o.latency_ms for o in ok], 50),
        "latency_p95_ms": pct([o.latency_ms for o in ok], 95),
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "offered_rps": w.rate,
        "per_replica": per_replica,
        "latency_p95_ms_by_replica": {b: pct([o.latency_ms for o in ok if o.backend == b], 95) for b in per_replica},
        "ttft_p95_ms_by_replica": {b: pct([o.ttft_ms for o in ok if o.backend == b], 95) for b in per_replica},
        "max_over_mean": max(counts) / statistics.mean(counts) if counts and statistics.mean(counts) else float("nan"),
        "key_mismatches": mismatched,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key-source", choices=("auto", "filter", "client"), default="auto")
    ap.add_argument("--quick", action="store_true", help="fewer requests, 0.5x capacity only, no variants")
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", default="", help="comma-separated strategy names (exploring; the committed "
                    "results come from a full run)")
    ap.add_argument("--capacities", default="", help="comma-separated capacities, e.g. 0.5")
    ap.add_argument("--workloads", default="", help="comma-separated workload names (exploring)")
    ap.add_argument("--gateways", type=int, default=1,
                    help="N > 1: run each cell with one gateway and again with N Envoy processes (same "
                         "config, same replicas), the client alternating requests between them")
    ap.add_argument("--split", choices=("alternate", "prefix"), default="alternate",
                    help="with --gateways: request i to gateway i mod n (alternate), or each tenant's / "
                         "conversation's requests all to one gateway (prefix; a diagnostic)")
    ap.add_argument("--workers", type=int, default=1,
                    help="Envoy worker threads (--concurrency); each keeps its own affinity counts and "
                         "picker tables, so more workers show what a production Envoy's split costs")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every workload's requests (tenants, conversations, ...) at the same "
                         "rate: a TTFT p95 of 256 requests is the 13th slowest, and moved by 20 %% run to "
                         "run on an idle machine")
    args = ap.parse_args()
    for f in (WASM, MOCK):
        if not f.is_file():
            raise SystemExit(f"bench-routing: {f} missing: run make build")
    began = time.monotonic()
    # The machine is shared (2 cores): the load average goes into the results.
    loadavg_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    scale = (0.4 if args.quick else 1.0) * args.scale
    rng = random.Random(15)
    workloads = [tenants_workload(int(480 * scale), rng),
                 conversations_workload(int(32 * scale) or 1, 8, rng),
                 control_workload(int(360 * scale), rng),
                 background_workload(int(480 * scale), rng)]
    if args.workloads:
        workloads = [w for w in workloads if w.name in args.workloads.split(",")]
    for w in workloads:
        oracle(w)
        say(f"workload {w.name}: {len(w.reqs)} requests at {w.rate:.1f}/s, working set {w.working_set_blocks} "
            f"blocks, oracle hit rate {w.oracle_hit_rate:.3f}")
    strategies = list(MAIN) + ([] if (args.quick or args.no_variants) else list(variants()))
    capacities = (TARGET_CAPACITY,) if args.quick else CAPACITIES
    if args.only:
        wanted = set(args.only.split(","))
        everything = list(MAIN) + list(variants())
        unknown = wanted - {s.name for s in everything}
        if unknown:
            raise SystemExit(f"bench-routing: unknown strategies {sorted(unknown)}")
        # The affinity strategy stays: the filter probe runs on its listener.
        strategies = [s for s in everything if s.name in wanted or s.name == "affinity"]
    if args.capacities:
        capacities = tuple(float(c) for c in args.capacities.split(","))

    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    # --gateways N runs every cell with one gateway and then with N gateway processes (same
    # config, each its own listener and admin ports, over the same replicas), in that order.
    gateway_counts = [1] if args.gateways == 1 else [1, args.gateways]
    gw_ports = [{"admin": procs.free_port(), **{s.name: procs.free_port() for s in strategies}}
                for _ in range(max(gateway_counts))]
    mode = args.key_source
    key_note = ""
    mocks: list[Mock] = []
    envoys: list[Envoy] = []

    def start_gateways(n: int, mock_ports: list[int], blocks: int) -> list[Envoy]:
        """n fresh gateways (no picker state carried over from another run); decides the key source
        on the first start."""
        nonlocal mode, key_note
        if mode in ("auto", "filter"):
            try:
                first = Envoy(gateway_config(strategies, gw_ports[0], mock_ports, KeySource("filter"), blocks),
                              work, gw_ports[0]["admin"], args.workers, tag="-0")
                ok, key_note = probe_filter(gw_ports[0]["affinity"], MAIN[2])
            except RuntimeError as e:
                first, ok, key_note = None, False, str(e).splitlines()[0]
            if ok:
                mode = "filter"
            elif mode == "filter":
                raise SystemExit(f"bench-routing: the filter does not compute the key: {key_note}")
            else:
                say(f"the filter does not set {HEADER} ({key_note}): the load generator sends it")
                if first is not None:
                    first.stop()
                mode = "client"
        if mode == "client":
            first = Envoy(gateway_config(strategies, gw_ports[0], mock_ports, KeySource("client"), blocks),
                          work, gw_ports[0]["admin"], args.workers, tag="-0")
        out = [first]
        try:
            for g in range(1, n):
                out.append(Envoy(gateway_config(strategies, gw_ports[g], mock_ports, KeySource(mode), blocks),
                                 work, gw_ports[g]["admin"], args.workers, tag=f"-{g}"))
        except BaseException:
            for e in out:
                e.stop()
            raise
        return out

    try:
        for cap in capacities:
            for w in workloads:
                if w.name in ("control", "background") and cap != TARGET_CAPACITY:
                    continue       # nothing is shared: capacity changes nothing
                blocks = max(1, round(cap * w.working_set_blocks)) if w.working_set_blocks else 1000
                mocks = [Mock(i, blocks, work) for i in range(REPLICAS)]
                for n_gw in gateway_counts:
                    # New Envoys for new replicas (their ports are in the picker's endpoints), a new
                    # capacity (picker_lru_matched's lruBlocks), and each gateway count (the pickers'
                    # tables start empty in both the one- and the two-gateway run).
                    envoys = start_gateways(n_gw, [m.port for m in mocks], blocks)
                    keys = KeySource(mode)
                    for s in strategies:
                        if s not in MAIN and cap != TARGET_CAPACITY:
                            continue
                        row = run_one(w, s, gw_ports[:n_gw], mocks, keys, cap, args.split)
                        rows.append(row)
                        say(f"{w.name} {cap}x {s.name} gateways {n_gw}: hit {row['hit_rate']:.3f} (oracle {row['oracle_hit_rate']:.3f}) "
                            f"TTFT p50/p95/p99 {row['ttft_p50_ms']:.1f}/{row['ttft_p95_ms']:.1f}/{row['ttft_p99_ms']:.1f} ms "
                            f"{row['throughput_rps']:.1f} req/s replicas {list(row['per_replica'].values())} "
                            f"home share {row['placement']['home_share']:.2f} "
                            f"tail: {row['tail']['n']} at/past p95, away {row['tail'].get('away_from_home', 0):.2f}, "
                            f"prefill {row['tail'].get('prefill_ms_mean', 0):.1f} ms, queue {row['tail'].get('queue_ms_mean', 0):.1f} ms; "
                            f"errors {row['requests'] - row['ok']}{' key mismatches ' + str(row['key_mismatches']) if row['key_mismatches'] else ''}")
                    for e in envoys:
                        e.stop()
                    envoys = []
                for m in mocks:
                    m.proc.stop()
                mocks = []
    finally:
        for m in mocks:
            m.proc.stop()
        for e in envoys:
            e.stop()

    # The single-gateway targets on the one-gateway rows; the two-gateway ones beside them.
    checks = targets([r for r in rows if r.get("gateways", 1) == 1]) + gateway_targets(rows)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": time.monotonic() - began, "key_source": mode, "key_note": key_note, "quick": args.quick, "scale": args.scale,
        "envoy_workers": args.workers, "gateways": gateway_counts, "split": args.split,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "loadavg_start": loadavg_start, "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "workloads": [{"name": w.name, "description": w.description, "requests": len(w.reqs), "rate": w.rate,
                       "working_set_blocks": w.working_set_blocks, "oracle_hit_rate": w.oracle_hit_rate,
                       "prompt_tokens_mean": w.prompt_tokens_mean} for w in workloads],
        "settings": {"replicas": REPLICAS, "prefill_tokens_per_s": PREFILL_TOKENS_PER_S, "itl_ms": ITL_MS,
                     "base_ttft_ms": BASE_TTFT_MS, "max_tokens": MAX_TOKENS, "block_tokens": BLOCK_TOKENS,
                     "utilisation": UTILISATION, "key_block_bytes": KEY_BLOCK_BYTES,
                     "default_prefix_blocks": DEFAULT_PREFIX_BLOCKS, "default_lb": DEFAULT_LB,
                     "default_hash_balance_factor": DEFAULT_HBF},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": checks}, indent=1))
    md = markdown(meta, rows, checks)
    (args.out / "results.md").write_text(md)
    note = chart(args.out / "routing.png", [r for r in rows if r.get("gateways", 1) == 1])
    if note:
        say(note)
    print(md)
    for c in checks:
        print(f"{'met    ' if c['met'] else 'NOT MET'}  {c['target']}: {c['text']}")
    say(f"done in {meta['seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
