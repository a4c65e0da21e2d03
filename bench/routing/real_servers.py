"""What `make bench-routing BACKEND=llama` (llama_routing.py, llama_direct.py) and `BACKEND=vllm`
(vllm_routing.py) share: the tenants workload cut from the seeds, the gateway's configuration with
round-robin (and least-request) twins of the real pool, starting Envoy and waiting for the pool's
hosts, one streamed request timed to its first token, the picker's counters, and the per-strategy
summary.

Each bench keeps what only its server needs (how replicas start and stop, what their counters
are called, how a strategy's filter configuration differs).
"""
from __future__ import annotations

import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import procs  # noqa: E402  (tests/procs.py)

WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr_wasm.wasm"
OUT = ROOT / "bench" / "results" / "routing"
SEEDS = ROOT.parent / "shared" / "seeds"
# Bench only: picks the round-robin route; the shipped config has no such route.
STRATEGY_HEADER = "x-bench-strategy"
# Bench only: which replica answered (Envoy's %UPSTREAM_REMOTE_ADDRESS%).
UPSTREAM_HEADER = "x-bench-upstream"
RR = "smollm-rr"
LR = "smollm-lr"
# Twins of the pool's route and cluster, each selected by its x-bench-strategy value:
# strategy -> (cluster name, lb_policy).
TWINS = {"round_robin": (RR, "ROUND_ROBIN"), "least_request": (LR, "LEAST_REQUEST")}

QUESTIONS_TEXT = [
    "What should I do first?", "Summarise the key point in one sentence.", "Which step is the riskiest?",
    "What is required before starting?", "How do I verify it worked?", "What is the most common mistake?",
    "Which component routes the request?", "How many models are deployed?",
]


def seed_text(ascii_only: bool = False) -> str:
    """Real English: the seeds (llm-d guides), whitespace folded. `ascii_only` drops every
    other character first: the seeds' box drawings are mis-decoded UTF-8 (three characters
    each), which cost a tokenizer about one token per byte and make equal byte counts very
    unequal token counts (2420 against 944-1124 tokens for 3000 bytes with SmolLM2's)."""
    files = sorted(SEEDS.glob("*.txt")) if SEEDS.is_dir() else []
    if not files:
        raise SystemExit(f"no seed documents in {SEEDS} (the shared seeds beside the repository)")
    texts = [f.read_text(errors="replace") for f in files]
    if ascii_only:
        texts = [t.encode("ascii", "ignore").decode() for t in texts]
    return " ".join(" ".join(t.split()) for t in texts)


def tenant_systems(tenants: int, system_bytes: int, ascii_only: bool = False) -> list[str]:
    """One system prompt per tenant: distinct consecutive pieces of the seeds, each opened by a
    line naming the tenant (so no two tenants share even their first cache block)."""
    text = seed_text(ascii_only)
    if len(text) < tenants * system_bytes:
        raise SystemExit("the seeds are too short for the tenants' system prompts")
    return [
        f"You are the assistant of tenant {t}. Answer from this guide only.\n"
        + text[t * system_bytes:(t + 1) * system_bytes]
        for t in range(tenants)
    ]


def workload(rng: random.Random, tenants: int, questions: int, system_bytes: int,
             ascii_only: bool = False) -> list[tuple[int, list[dict]]]:
    """Every tenant asks each of `questions` questions once, in one seeded random order."""
    if questions > len(QUESTIONS_TEXT):
        raise SystemExit(f"at most {len(QUESTIONS_TEXT)} questions per tenant")
    systems = tenant_systems(tenants, system_bytes, ascii_only)
    reqs = [(t, q) for t in range(tenants) for q in range(questions)]
    rng.shuffle(reqs)
    return [
        (t, [{"role": "system", "content": systems[t]}, {"role": "user", "content": QUESTIONS_TEXT[q]}])
        for t, q in reqs
    ]


def hcm(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def wasm_plugin(cfg: dict) -> dict:
    return next(f for f in hcm(cfg)["http_filters"] if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]


def gateway_config(port: int, admin: int, add_pool: Callable[[dict], None], cluster: str, route: str,
                   twins: tuple[str, ...] = ("round_robin",)) -> dict:
    """envoy/envoy.yaml on free loopback ports with the real pool added by `add_pool` (its
    `cluster` and `route` as shipped: override_host with MAGLEV on the prefix key), plus a twin
    of both per name in `twins` (TWINS: e.g. route and cluster `smollm-rr`, selected by
    x-bench-strategy: round_robin, no hash policy, the same hosts, health checks and limits,
    ROUND_ROBIN; `least_request`: `smollm-lr`, LEAST_REQUEST)."""
    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    add_pool(cfg)
    h = hcm(cfg)
    h.pop("access_log", None)
    wasm_plugin(cfg)["vm_config"]["code"]["local"]["filename"] = str(WASM)
    routes = h["route_config"]["virtual_hosts"][0]["routes"]
    clusters = cfg["static_resources"]["clusters"]
    shipped_route = next(r for r in routes if r.get("name") == route)
    shipped = next(c for c in clusters if c["name"] == cluster)
    for strategy in twins:
        name, lb_policy = TWINS[strategy]
        twin_route = copy.deepcopy(shipped_route)
        twin_route["name"] = name
        twin_route["match"]["headers"].append({"name": STRATEGY_HEADER, "string_match": {"exact": strategy}})
        twin_route["route"]["cluster"] = name
        twin_route["route"].pop("hash_policy", None)
        routes.insert(routes.index(shipped_route), twin_route)
        twin = copy.deepcopy(shipped)
        twin["name"] = twin["load_assignment"]["cluster_name"] = name
        # The shipped policy (override_host, MAGLEV fallback) would take precedence over lb_policy.
        twin.pop("load_balancing_policy", None)
        twin["lb_policy"] = lb_policy
        twin["common_lb_config"].pop("consistent_hashing_lb_config", None)
        clusters.append(twin)
    keep = {cluster, *(TWINS[t][0] for t in twins)}
    for c in clusters:  # the mock pools are not started here
        if c["name"] not in keep:
            c.pop("health_checks", None)
        if c["name"] == "bbr-envoy-admin":  # the picker's view of the hosts: this Envoy's admin
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                "port_value"] = admin
    for r in routes:
        r.setdefault("response_headers_to_add", []).append(
            {"header": {"key": UPSTREAM_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"}})
    return cfg


def envoy_bin() -> str:
    return subprocess.run(["bash", str(ROOT / "scripts" / "envoy-bin.sh")], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]


class Envoy:
    """One Envoy (one worker) on `cfg`, ready once its admin says LIVE and every host of
    `clusters` is healthy (n_hosts in all)."""

    def __init__(self, binary: str, cfg: dict, run: Path, tag: str, admin: int, clusters: tuple[str, ...],
                 n_hosts: int, timeout: float = 60.0):
        path = run / f"envoy-{tag}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.admin = admin
        self.log_path = run / f"envoy-{tag}.log"
        self.proc = procs.Child(f"Envoy {tag}", [binary, "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
                                                 "--base-id-path", str(run / "base-id"), "--log-level", "warning"],
                                self.log_path)
        self.clusters = clusters
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready = self.get("/ready").strip() == "LIVE"
                flags = [ln for ln in self.host_lines() if "::health_flags::" in ln]
                if ready and len(flags) == n_hosts and all(ln.endswith("::healthy") for ln in flags):
                    return
            except httpx.HTTPError:
                pass
            if not self.proc.alive() or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"Envoy not ready with healthy replicas; see {self.log_path}")
            time.sleep(0.2)

    def get(self, path: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.admin}{path}", timeout=2).text

    def host_lines(self) -> list[str]:
        return [ln for ln in self.get("/clusters").splitlines() if ln.startswith(tuple(f"{c}::" for c in self.clusters))]

    def picker_stats(self) -> dict[str, int]:
        """The filter's bbr_picker_* counters (scrape and admin-poll outcomes, fallbacks)."""
        out = {}
        for line in self.get("/stats?filter=bbr_picker").splitlines():
            key, _, value = line.rpartition(": ")
            if value.strip().isdigit():
                out[key.strip()] = int(value)
        return out

    def stop(self) -> None:
        self.proc.stop()


def stream_chat(client: httpx.Client, body: dict, headers: dict[str, str]) -> dict:
    """One streamed chat request: seconds to the first chunk with content (the client's TTFT),
    the last `timings` (llama-server) and `usage` (vLLM, with stream_options.include_usage)
    seen, and the replica that answered."""
    t0 = time.monotonic()
    first, timings, usage = None, None, None
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RequestFailed(f"{r.status_code} {r.read()[:300]!r}")
        upstream = r.headers.get(UPSTREAM_HEADER)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                first = time.monotonic() - t0
            if chunk.get("timings"):
                timings = chunk["timings"]
            if chunk.get("usage"):
                usage = chunk["usage"]
    return {"ttft": first if first is not None else time.monotonic() - t0, "timings": timings or {},
            "usage": usage or {}, "upstream": upstream}


class RequestFailed(Exception):
    pass


def p95(values: list[float]) -> float:
    """The nearest-rank 95th percentile of what the benches report (one definition for both)."""
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def summary(rows: list[dict]) -> dict:
    """TTFT p50/p95 (ms), requests and tenants per replica: what every backend reports."""
    ttft = [r["ttft"] * 1000 for r in rows]
    per: dict[str, int] = {}
    tenants: dict[str, set] = {}
    for r in rows:
        per[r["upstream"]] = per.get(r["upstream"], 0) + 1
        tenants.setdefault(r["upstream"], set()).add(r["tenant"])
    return {
        "requests": len(rows),
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p95_ms": p95(ttft),
        "per_replica": per,
        "tenants_per_replica": {k: sorted(v) for k, v in tenants.items()},
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
