"""bench-routing's analysis and report: percentiles, placement (how consistently a prefix stayed on
one replica) and the TTFT tail, the targets, and results.md's tables and routing.png."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

from settings import (BASE_TTFT_MS, BLOCK_TOKENS, DEFAULT_HBF, DEFAULT_LB, DEFAULT_PICKER_BALANCE,
                      DEFAULT_PREFIX_BLOCKS, ITL_MS, KEY_BLOCK_BYTES, MAX_TOKENS, PREFILL_TOKENS_PER_S, REPLICAS,
                      TARGET_CAPACITY, UTILISATION)
from strategies import HEAD_TO_HEAD, MAIN
from workloads import Workload, prefix_group, tokens_of
from replay import Outcome


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def group_counts(w: Workload, outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Per prefix group, how many of its answered requests each replica served."""
    groups: dict[str, dict[str, int]] = {}
    for r, o in zip(w.reqs, outcomes):
        if o.status == 200 and not o.error:
            g = groups.setdefault(prefix_group(w, r.body), {})
            g[o.backend] = g.get(o.backend, 0) + 1
    return groups


def placement(w: Workload, outcomes: list[Outcome]) -> dict:
    """How consistently each shared prefix was placed: the share of requests served by their
    group's most-used replica ("home share"), and the mean number of replicas a group used."""
    groups = group_counts(w, outcomes)
    total = sum(sum(g.values()) for g in groups.values())
    return {"home_share": (sum(max(g.values()) for g in groups.values()) / total) if total else float("nan"),
            "replicas_per_group": statistics.mean(len(g) for g in groups.values()) if groups else float("nan"),
            "groups": len(groups)}


def tail(w: Workload, outcomes: list[Outcome], p95: float) -> dict:
    """What the requests at or past the TTFT p95 were: the share served away from their group's
    home (its most-used replica, as in `placement`), and their mean prefill (uncached tokens at the mock's rate)
    and queueing (the rest of the replica's TTFT after the base), in ms. Says whether the tail
    is re-prefilled history (spills) or waiting (load)."""
    home = {k: max(g, key=lambda b: g[b]) for k, g in group_counts(w, outcomes).items()}
    rows = [(prefix_group(w, r.body), tokens_of(r.body), o) for r, o in zip(w.reqs, outcomes)
            if o.status == 200 and not o.error and not math.isnan(o.ttft_ms)]
    slow = [(k, t, o) for k, t, o in rows if not math.isnan(p95) and o.ttft_ms >= p95]
    if not slow:
        return {"n": 0}
    prefill = [max(t - o.hit_tokens, 0) / PREFILL_TOKENS_PER_S * 1000 for _, t, o in slow]
    queue = [max(o.ttft_ms - BASE_TTFT_MS - pf, 0.0) for (_, _, o), pf in zip(slow, prefill)]
    return {"n": len(slow),
            "away_from_home": sum(1 for k, _, o in slow if o.backend != home[k]) / len(slow),
            "prefill_ms_mean": statistics.mean(prefill), "queue_ms_mean": statistics.mean(queue),
            "away_from_home_all": sum(1 for k, _, o in rows if o.backend != home[k]) / len(rows)}


# --------------------------------------------------------------------------------------
# Targets, report
# --------------------------------------------------------------------------------------


def find(rows: list[dict], workload: str, strategy: str, capacity: float) -> Optional[dict]:
    return next((r for r in rows if r["workload"] == workload and r["strategy"] == strategy
                 and r["capacity"] == capacity), None)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, for prefix affinity and for the picker, each side by side with round
    robin and least request of the same run."""
    out = []

    def check(name: str, value: float, limit: float, ok: bool, text: str) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": bool(ok), "text": text})

    c = TARGET_CAPACITY
    for st in HEAD_TO_HEAD:
        for wl in ("tenants", "conversations"):
            rr, lr, af = (find(rows, wl, s, c) for s in ("round_robin", "least_request", st))
            if not (rr and lr and af):
                continue
            check(f"{wl}: {st} hit rate >= 2x round robin's", af["hit_rate"] / max(rr["hit_rate"], 1e-9), 2.0,
                  af["hit_rate"] >= 2 * rr["hit_rate"],
                  f"{af['hit_rate']:.3f} vs {rr['hit_rate']:.3f}")
            check(f"{wl}: {st} hit rate >= 0.8x the oracle's", af["hit_rate"] / max(af["oracle_hit_rate"], 1e-9),
                  0.8, af["hit_rate"] >= 0.8 * af["oracle_hit_rate"],
                  f"{af['hit_rate']:.3f} vs {af['oracle_hit_rate']:.3f}")
            check(f"{wl}: {st} TTFT p95 <= 0.6x round robin's", af["ttft_p95_ms"] / rr["ttft_p95_ms"], 0.6,
                  af["ttft_p95_ms"] <= 0.6 * rr["ttft_p95_ms"],
                  f"{af['ttft_p95_ms']:.1f} ms vs {rr['ttft_p95_ms']:.1f} ms")
            check(f"{wl}: {st} TTFT p95 below least request's", af["ttft_p95_ms"] / lr["ttft_p95_ms"], 1.0,
                  af["ttft_p95_ms"] < lr["ttft_p95_ms"],
                  f"{af['ttft_p95_ms']:.1f} ms vs {lr['ttft_p95_ms']:.1f} ms")
            check(f"{wl}: {st} max/mean requests per replica <= 1.25", af["max_over_mean"], 1.25,
                  af["max_over_mean"] <= 1.25, f"{af['max_over_mean']:.2f} ({af['per_replica']})")
        lr, af = find(rows, "control", "least_request", c), find(rows, "control", st, c)
        if lr and af:
            check(f"control: {st} TTFT p95 within 5% of least request's", af["ttft_p95_ms"] / lr["ttft_p95_ms"], 1.05,
                  abs(af["ttft_p95_ms"] / lr["ttft_p95_ms"] - 1) <= 0.05,
                  f"{af['ttft_p95_ms']:.1f} ms vs {lr['ttft_p95_ms']:.1f} ms"
                  + (" (lower: better than least request)" if af["ttft_p95_ms"] < 0.95 * lr["ttft_p95_ms"] else ""))
            check(f"control: {st} throughput within 5% of least request's",
                  af["throughput_rps"] / lr["throughput_rps"], 1.05,
                  abs(af["throughput_rps"] / lr["throughput_rps"] - 1) <= 0.05,
                  f"{af['throughput_rps']:.1f} vs {lr['throughput_rps']:.1f} req/s")
    # The picker with the servers' own load against the picker with in-flight counts alone.
    pm, pi = find(rows, "background", "picker_metrics", c), find(rows, "background", "picker", c)
    if pm and pi:
        check("background: picker_metrics TTFT p95 <= 0.6x picker's (in-flight only)",
              pm["ttft_p95_ms"] / pi["ttft_p95_ms"], 0.6, pm["ttft_p95_ms"] <= 0.6 * pi["ttft_p95_ms"],
              f"{pm['ttft_p95_ms']:.1f} ms vs {pi['ttft_p95_ms']:.1f} ms; replica-0 got "
              f"{pm['per_replica'].get('replica-0', 0)} / {pi['per_replica'].get('replica-0', 0)} of {pm['ok']}")
    for wl in ("tenants", "conversations", "control"):
        pm, pi = find(rows, wl, "picker_metrics", c), find(rows, wl, "picker", c)
        if pm and pi:
            if wl != "control":    # nothing to hit there
                check(f"{wl}: picker_metrics hit rate >= picker's / 1.05", pm["hit_rate"] / max(pi["hit_rate"], 1e-9),
                      1 / 1.05, pm["hit_rate"] * 1.05 >= pi["hit_rate"], f"{pm['hit_rate']:.3f} vs {pi['hit_rate']:.3f}")
            check(f"{wl}: picker_metrics TTFT p95 <= 1.05x picker's", pm["ttft_p95_ms"] / pi["ttft_p95_ms"], 1.05,
                  pm["ttft_p95_ms"] <= 1.05 * pi["ttft_p95_ms"],
                  f"{pm['ttft_p95_ms']:.1f} ms vs {pi['ttft_p95_ms']:.1f} ms")
    # Consistent placement against the picker placing a new prefix by load alone (its behaviour
    # before), when both ran: no worse than 1.05x in hit rate and TTFT p95.
    for new, old in (("picker", "picker_by_load"), ("picker_metrics", "picker_metrics_by_load")):
        for wl in ("tenants", "conversations", "control", "background"):
            a, b = find(rows, wl, new, c), find(rows, wl, old, c)
            if not (a and b):
                continue
            if wl != "control":
                check(f"{wl}: {new} hit rate >= {old}'s / 1.05", a["hit_rate"] / max(b["hit_rate"], 1e-9),
                      1 / 1.05, a["hit_rate"] * 1.05 >= b["hit_rate"], f"{a['hit_rate']:.3f} vs {b['hit_rate']:.3f}")
            check(f"{wl}: {new} TTFT p95 <= 1.05x {old}'s", a["ttft_p95_ms"] / b["ttft_p95_ms"], 1.05,
                  a["ttft_p95_ms"] <= 1.05 * b["ttft_p95_ms"], f"{a['ttft_p95_ms']:.1f} ms vs {b['ttft_p95_ms']:.1f} ms")
    return out


def gateway_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """Each row run with more than one gateway, with its one-gateway row (the same workload,
    strategy and capacity); rows without such a twin are left out."""
    pairs = []
    for r2 in rows:
        if r2.get("gateways", 1) == 1:
            continue
        r1 = next((r for r in rows if r.get("gateways", 1) == 1 and r["workload"] == r2["workload"]
                   and r["strategy"] == r2["strategy"] and r["capacity"] == r2["capacity"]), None)
        if r1 is not None:
            pairs.append((r1, r2))
    return pairs


def gateway_targets(rows: list[dict]) -> list[dict]:
    """Two gateways against one, per strategy: hit rate >= 0.9x, TTFT p95 <= 1.15x (the picker's
    targets; printed for every strategy, checked the same way)."""
    out = []
    for r1, r2 in gateway_pairs(rows):
        n, tag = r2["gateways"], f"{r2['workload']} {r2['capacity']}x: {r2['strategy']}"
        if r2["workload"] != "control":
            v = r2["hit_rate"] / max(r1["hit_rate"], 1e-9)
            out.append({"target": f"{tag} hit rate with {n} gateways >= 0.9x one gateway's", "value": v,
                        "limit": 0.9, "met": bool(v >= 0.9), "text": f"{r2['hit_rate']:.3f} vs {r1['hit_rate']:.3f}"})
        v = r2["ttft_p95_ms"] / r1["ttft_p95_ms"]
        out.append({"target": f"{tag} TTFT p95 with {n} gateways <= 1.15x one gateway's", "value": v,
                    "limit": 1.15, "met": bool(v <= 1.15),
                    "text": f"{r2['ttft_p95_ms']:.1f} ms vs {r1['ttft_p95_ms']:.1f} ms"})
    return out


def gateway_table(rows: list[dict]) -> str:
    head = ("| workload | capacity | strategy | hit rate 1 gw | hit rate 2 gw | ratio | TTFT p95 1 gw | TTFT p95 2 gw "
            "| ratio | home share 1 / 2 gw | replicas per prefix 1 / 2 gw | max/mean 1 / 2 gw |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r1, r2 in gateway_pairs(rows):
        p1, p2 = r1["placement"], r2["placement"]
        lines.append(
            f"| {r2['workload']} | {r2['capacity']}x | {r2['strategy']} | {r1['hit_rate']:.3f} | {r2['hit_rate']:.3f} "
            f"| {r2['hit_rate'] / max(r1['hit_rate'], 1e-9):.2f}x | {r1['ttft_p95_ms']:.1f} | {r2['ttft_p95_ms']:.1f} "
            f"| {r2['ttft_p95_ms'] / r1['ttft_p95_ms']:.2f}x | {p1['home_share']:.2f} / {p2['home_share']:.2f} "
            f"| {p1['replicas_per_group']:.2f} / {p2['replicas_per_group']:.2f} "
            f"| {r1['max_over_mean']:.2f} / {r2['max_over_mean']:.2f} |")
    return head + "\n".join(lines) + "\n"


def table(rows: list[dict]) -> str:
    head = ("| workload | capacity | gateways | strategy | hit rate | oracle | TTFT p50 | p95 | p99 (ms) | req/s "
            "| client p95 | per replica | max/mean | errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['capacity']}x | {r.get('gateways', 1)} | {r['strategy']} | {r['hit_rate']:.3f} | {r['oracle_hit_rate']:.3f} "
            f"| {r['ttft_p50_ms']:.1f} | {r['ttft_p95_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['throughput_rps']:.1f} "
            f"| {r['latency_p95_ms']:.0f} "
            f"| {'/'.join(str(v) for v in r['per_replica'].values())} | {r['max_over_mean']:.2f} "
            f"| {r['requests'] - r['ok']} |")
    return head + "\n".join(lines) + "\n"


def markdown(meta: dict, rows: list[dict], checks: list[dict]) -> str:
    md = [f"# make bench-routing ({meta['date']})", "",
          f"Key source: **{meta['key_source']}**. Replicas: {REPLICAS} mock-vllm, prefill "
          f"{PREFILL_TOKENS_PER_S} tokens/s one at a time, decode {ITL_MS} ms/token in parallel, "
          f"{MAX_TOKENS} tokens per answer, {BLOCK_TOKENS}-token cache blocks (tokens = 4 bytes). "
          f"Offered load: {UTILISATION:.0%} of the pool's prefill capacity with nothing cached. "
          f"Affinity: {DEFAULT_LB}, hash_balance_factor {DEFAULT_HBF}, {KEY_BLOCK_BYTES}-byte key blocks, "
          f"prefixBlocks {DEFAULT_PREFIX_BLOCKS}. Picker: prefixAffinity.picker defaults (prefix weight 3, "
          f"load weight 2, balanceFactor {DEFAULT_PICKER_BALANCE}, lruBlocks 8192, maxBlocks 32), "
          f"envoy/picker-lb-policy.yaml. Envoy workers: {meta.get('envoy_workers', 1)}. "
          f"Wall time {meta['seconds']:.0f} s. "
          f"Load average (1/5/15 min) at the start: {meta.get('loadavg_start', '?')}, at the end: "
          f"{meta.get('loadavg_end', '?')} ({meta['machine']['cpus']} CPUs).", ""]
    md.append("TTFT is the replica's own (x-mock-ttft-ms: queueing + prefill + base, simulated time); "
              "'client p95' is the client's request-to-response latency (includes decoding and this "
              "machine's CPU noise). Per replica: requests answered by replica-0..3.")
    md += ["", "## Workloads", ""]
    for w in meta["workloads"]:
        md.append(f"- **{w['name']}**: {w['description']}; {w['requests']} requests at {w['rate']:.1f}/s, "
                  f"{w['prompt_tokens_mean']:.0f} prompt tokens on average, working set {w['working_set_blocks']} "
                  f"blocks, oracle hit rate {w['oracle_hit_rate']:.3f}.")
    md += ["", f"## Targets (capacity {TARGET_CAPACITY}x the working set)", ""]
    for c in checks:
        md.append(f"- {'met' if c['met'] else 'NOT MET'}: {c['target']}: {c['text']} (ratio {c['value']:.2f}, limit {c['limit']})")
    md += ["", "## Strategies across cache capacities", "", table([r for r in rows if r["strategy"] in
                                                                  [s.name for s in MAIN]])]
    if any(r.get("gateways", 1) > 1 for r in rows):
        md += [f"## Two gateways: {max(meta['gateways'])} Envoy processes against one", "",
               "Each gateway is a separate Envoy process with the same config (its own listener and admin "
               "ports) over the same replicas. Split: " + ("the client sends request i to gateway i mod n. "
               if meta.get("split", "alternate") == "alternate" else "every request of one tenant or "
               "conversation goes to the same gateway (a hash of its prefix group). ") + "Home share: "
               "the share of requests served by the replica that served their prefix (tenant's system "
               "prompt, conversation) most often; replicas per prefix: how many replicas a prefix used.", "",
               gateway_table(rows)]
    var = [r for r in rows if r["strategy"].startswith("affinity_") or
           (r["strategy"] == "affinity" and r["capacity"] == TARGET_CAPACITY)]
    if var:
        md += ["## Affinity settings (one changed at a time)", "", table(var)]
    var = [r for r in rows if r["strategy"].startswith("picker_") or
           (r["strategy"] == "picker" and r["capacity"] == TARGET_CAPACITY)]
    if var:
        md += ["## Picker settings (one changed at a time)", "", table(var)]
    return "\n".join(md) + "\n"


def chart(path: Path, rows: list[dict]) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no chart: {e}"
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, wl in enumerate(("tenants", "conversations")):
        for strat, style in (("round_robin", "o-"), ("least_request", "s-"), ("affinity", "^-"), ("picker", "D-")):
            pts = sorted((r["capacity"], r) for r in rows if r["workload"] == wl and r["strategy"] == strat)
            if not pts:
                continue
            caps = [p[0] for p in pts]
            axes[0][col].plot(caps, [p[1]["hit_rate"] for p in pts], style, label=strat)
            axes[1][col].plot(caps, [p[1]["ttft_p95_ms"] for p in pts], style, label=strat)
        pts = sorted((r["capacity"], r["oracle_hit_rate"]) for r in rows if r["workload"] == wl and r["strategy"] == "affinity")
        if pts:
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], "k--", label="oracle (one infinite cache)")
        axes[0][col].set_title(f"{wl}: prefix-cache hit rate")
        axes[1][col].set_title(f"{wl}: TTFT p95 (ms)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("cache per replica / working set")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][col].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
