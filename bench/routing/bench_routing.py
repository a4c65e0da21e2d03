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

    .venv/bin/python bench/routing/bench_routing.py [--quick] [--key-source auto]
Results: bench/results/routing/{results.json,results.md,routing.png}.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as dt
import hashlib
import http.client
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402  (tests/procs.py)
import prefix_key  # noqa: E402

# BENCH_ROUTING_WASM: another build of the filter (to compare two builds run after run).
WASM = Path(os.environ.get("BENCH_ROUTING_WASM") or ROOT / "target" / "wasm32-wasip1" / "release" / "bbr_wasm.wasm")
MOCK = ROOT / "target" / "release" / "mock-vllm"
SHIPPED_ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
PICKER_POLICY_YAML = ROOT / "envoy" / "picker-lb-policy.yaml"
OUT = ROOT / "bench" / "results" / "routing"
MODEL = "Qwen/Qwen2.5-3B-Instruct"
PATH = "/v1/chat/completions"
HEADER = "x-gateway-prefix-hash"
REPLICAS = 4

# The simulated replica (mock-vllm flags). A block is 16 tokens (vLLM's default) of 4 bytes.
BLOCK_TOKENS = 16
BLOCK_BYTES = BLOCK_TOKENS * 4
PREFILL_TOKENS_PER_S = 25_000   # uncached prompt tokens per second, one prefill at a time
ITL_MS = 40                     # decode: 40 ms per token, all running requests in parallel
BASE_TTFT_MS = 2                # fixed cost before the first token, on top of queue and prefill
MAX_NUM_SEQS = 64
MAX_TOKENS = 16                 # tokens per answer: ~0.6 s in flight, so Envoy sees ~10 per replica
UTILISATION = 0.6               # offered load / the pool's prefill capacity with nothing cached

# The key: 256-byte blocks (about 64 tokens), as llm-d's prefix scorer uses.
KEY_BLOCK_BYTES = 256
DEFAULT_PREFIX_BLOCKS = 8
DEFAULT_LB = "MAGLEV"
DEFAULT_HBF = 125               # hash_balance_factor, percent: 1.25x the mean in-flight load (envoy.yaml)

CAPACITIES = (0.25, 0.5, 1.0, 2.0)
TARGET_CAPACITY = 0.5
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def say(msg: str) -> None:
    print(f"bench-routing: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    name: str
    lb: str                             # ROUND_ROBIN, LEAST_REQUEST, MAGLEV, RING_HASH, PICKER
    hbf: Optional[int] = None           # hash_balance_factor (picker: balanceFactor) in percent; None: unbounded
    prefix_blocks: Optional[int] = None  # the key's prefixBlocks (hashing strategies only)
    lru_matched: bool = False           # picker: lruBlocks = the replica's cache, in key blocks
    load_weight: Optional[int] = None   # picker: loadWeight (None: the filter's default, 2)
    metrics: bool = False               # picker: hosts from Envoy's admin, the servers' own load
    consistent: bool = True             # picker: consistentPlacement (False: a new prefix placed by load alone)

    @property
    def hashed(self) -> bool:
        return self.lb in ("MAGLEV", "RING_HASH")

    @property
    def picker(self) -> bool:
        return self.lb == "PICKER"


DEFAULT_PICKER_BALANCE = 125            # prefixAffinity.picker.balanceFactor's default

MAIN = (
    Strategy("round_robin", "ROUND_ROBIN"),
    Strategy("least_request", "LEAST_REQUEST"),
    Strategy("affinity", DEFAULT_LB, DEFAULT_HBF, DEFAULT_PREFIX_BLOCKS),
    Strategy("picker", "PICKER", DEFAULT_PICKER_BALANCE),
    Strategy("picker_metrics", "PICKER", DEFAULT_PICKER_BALANCE, metrics=True),
)
HEAD_TO_HEAD = ("affinity", "picker")    # the strategies the targets are checked for


def variants() -> tuple[Strategy, ...]:
    """Affinity with one setting changed at a time: bounded load, the hash table, the key."""
    out = [Strategy(f"affinity_hbf_{h or 'none'}", DEFAULT_LB, h, DEFAULT_PREFIX_BLOCKS)
           for h in (None, 125, 150, 200) if h != DEFAULT_HBF]
    out.append(Strategy("affinity_ring_hash", "RING_HASH", DEFAULT_HBF, DEFAULT_PREFIX_BLOCKS))
    out += [Strategy(f"affinity_blocks_{n}", DEFAULT_LB, DEFAULT_HBF, n)
            for n in (2, 4, 16, 32) if n != DEFAULT_PREFIX_BLOCKS]
    out += [Strategy(f"picker_bf_{b or 'none'}", "PICKER", b)
            for b in (None, 110, 150, 200) if b != DEFAULT_PICKER_BALANCE]
    out.append(Strategy("picker_lru_matched", "PICKER", DEFAULT_PICKER_BALANCE, lru_matched=True))
    out.append(Strategy("picker_load_weight_1", "PICKER", DEFAULT_PICKER_BALANCE, load_weight=1))
    # The picker before consistent placement (a new prefix placed by load alone), to compare side by side.
    out.append(Strategy("picker_by_load", "PICKER", DEFAULT_PICKER_BALANCE, consistent=False))
    out.append(Strategy("picker_metrics_by_load", "PICKER", DEFAULT_PICKER_BALANCE, metrics=True, consistent=False))
    return tuple(out)


class KeySource:
    """Where the x-gateway-prefix-hash header comes from: the filter ("filter") or, until the
    filter computes it, the load generator ("client", prefix_key.py). The only place that knows."""

    def __init__(self, mode: str):
        assert mode in ("filter", "client")
        self.mode = mode

    def filter_config(self, strategy: Strategy, endpoints: list[str], cache_blocks: int) -> dict:
        cfg: dict = {"models": [{"name": MODEL}]}
        if self.mode == "filter" and strategy.hashed:
            cfg["prefixAffinity"] = {"enabled": True, "header": HEADER, "blockBytes": KEY_BLOCK_BYTES,
                                     "prefixBlocks": strategy.prefix_blocks}
        if strategy.picker:
            # The filter always chooses here, whatever the key source: the picker needs the
            # prompt's blocks, which only the filter reads.
            picker: dict = {"balanceFactor": strategy.hbf,
                            "pools": [{"cluster": strategy.name, "baseModels": [MODEL], "endpoints": endpoints}]}
            if strategy.metrics:
                # The shipped switch's sources: the hosts and their health from Envoy's admin,
                # each server's waiting/running/KV from its /metrics (every 50 ms, as llm-d's EPP).
                picker["hosts"] = {"intervalMs": 100}
                picker["serverMetrics"] = {"intervalMs": 50}
                del picker["pools"][0]["endpoints"]
            if strategy.load_weight is not None:
                picker["loadWeight"] = strategy.load_weight
            if not strategy.consistent:
                picker["consistentPlacement"] = False
            if strategy.lru_matched:
                # What the replica can hold, in the picker's 256-byte blocks.
                picker["lruBlocks"] = max(1, math.ceil(cache_blocks * BLOCK_BYTES / KEY_BLOCK_BYTES))
            cfg["prefixAffinity"] = {"enabled": True, "blockBytes": KEY_BLOCK_BYTES, "picker": picker}
        return cfg

    def expected(self, body: dict, strategy: Strategy) -> Optional[str]:
        if not strategy.hashed:
            return None
        return prefix_key.prefix_key(MODEL, body, KEY_BLOCK_BYTES, strategy.prefix_blocks)

    def headers(self, body: dict, strategy: Strategy) -> dict[str, str]:
        key = self.expected(body, strategy) if self.mode == "client" else None
        return {HEADER: key} if key else {}


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------

_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "xu", "qe", "zo", "fa",
              "gi", "hu", "ja", "be", "co", "wy", "ol", "an", "er", "is", "um"]


def text(rng: random.Random, nbytes: int) -> str:
    """Random pseudo-words: unrelated texts share no 64-byte block."""
    words = []
    n = 0
    while n < nbytes:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        words.append(w)
        n += len(w) + 1
    return " ".join(words)[:nbytes]


@dataclass
class Req:
    at: float                 # seconds after the start
    body: dict
    after: Optional[int]      # index of a request that must have answered first (previous turn)


@dataclass
class Workload:
    name: str
    description: str
    reqs: list[Req]
    rate: float = 0.0
    working_set_blocks: int = 0
    oracle_hit_rate: float = 0.0
    prompt_tokens_mean: float = 0.0
    background: int = 0        # direct senders to replica-0 during the replay


def body_of(messages: list[dict]) -> dict:
    # Not streamed: the replica reports its TTFT (x-mock-ttft-ms, simulated time), so the
    # client's own CPU shortage on a shared 2-core machine does not enter the figures, and one
    # response body instead of MAX_TOKENS events keeps Envoy's and the client's work small.
    return {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS}


def tokens_of(body: dict) -> int:
    return -(-len(prefix_key.capture(body)) // 4)


def pace(reqs_bodies: list[dict], rng: random.Random) -> tuple[list[float], float]:
    """Poisson arrival times for the bodies, at the rate that makes the pool's no-cache prefill
    load UTILISATION."""
    mean_s = statistics.mean(tokens_of(b) for b in reqs_bodies) / PREFILL_TOKENS_PER_S
    rate = UTILISATION * REPLICAS / mean_s
    t, out = 0.0, []
    for _ in reqs_bodies:
        t += rng.expovariate(rate)
        out.append(t)
    return out, rate


def tenants_workload(n: int, rng: random.Random) -> Workload:
    tenants = 24
    preamble = "Company policy. " + text(rng, 496)      # shared by every tenant: 2 key blocks
    prompts = [preamble + " " + text(rng, 3584) for _ in range(tenants)]
    weights = [1.0 / (i + 1) ** 0.6 for i in range(tenants)]
    bodies = []
    for _ in range(n):
        t = rng.choices(range(tenants), weights)[0]
        bodies.append(body_of([{"role": "system", "content": prompts[t]},
                               {"role": "user", "content": text(rng, rng.randint(80, 400))}]))
    times, rate = pace(bodies, rng)
    return Workload("tenants", f"{tenants} tenants, 4 KiB system prompts opening with a shared 512-byte "
                    "preamble, 80-400-byte questions, Zipf(0.6) popularity",
                    [Req(t, b, None) for t, b in zip(times, bodies)], rate)


def conversations_workload(n_conv: int, turns: int, rng: random.Random) -> Workload:
    system = "You are the assistant of an online shop. " + text(rng, 1500)   # every conversation
    convs = [[{"role": "system", "content": system}] for _ in range(n_conv)]
    left = [turns] * n_conv
    order = []                 # (conversation, body) in arrival order
    while any(left):
        c = rng.choices(range(n_conv), [l for l in left])[0]
        convs[c].append({"role": "user", "content": text(rng, rng.randint(150, 600))})
        order.append((c, body_of(copy.deepcopy(convs[c]))))
        # The assistant's answer as the client will send it back next turn.
        convs[c].append({"role": "assistant", "content": text(rng, rng.randint(300, 900))})
        left[c] -= 1
    times, rate = pace([b for _, b in order], rng)
    last: dict[int, int] = {}
    reqs = []
    for i, ((c, b), t) in enumerate(zip(order, times)):
        reqs.append(Req(t, b, last.get(c)))
        last[c] = i
    return Workload("conversations", f"{n_conv} conversations x {turns} turns, one shared 1.5 KiB system "
                    "prompt, 150-600-byte user turns, 300-900-byte answers sent back",
                    reqs, rate)


def control_workload(n: int, rng: random.Random) -> Workload:
    bodies = [body_of([{"role": "system", "content": text(rng, 4096)},
                       {"role": "user", "content": text(rng, rng.randint(80, 400))}]) for _ in range(n)]
    times, rate = pace(bodies, rng)
    return Workload("control", "no shared prefixes: a unique 4 KiB system prompt per request",
                    [Req(t, b, None) for t, b in zip(times, bodies)], rate)


# Background load: direct senders to replica-0, around the gateway, in a closed loop for the
# whole replay; each a unique 4 KiB prompt (a prefill of ~1024 tokens) and MAX_TOKENS tokens.
BACKGROUND_SENDERS = 12


def background_workload(n: int, rng: random.Random) -> Workload:
    w = tenants_workload(n, rng)
    w.name = "background"
    w.description = (f"the tenants workload while replica-0 also serves {BACKGROUND_SENDERS} closed-loop "
                     "clients of its own (unique 4 KiB prompts), which the gateway does not see")
    w.background = BACKGROUND_SENDERS
    return w


def oracle(w: Workload) -> None:
    """One infinite cache with the mock's accounting (16-token blocks, last token recomputed),
    and the working set: the distinct blocks that some later request finds cached."""
    seen: set[bytes] = set()
    reused: set[bytes] = set()
    queries = hits = 0
    for r in w.reqs:
        prompt = prefix_key.capture(r.body)
        tokens = -(-len(prompt) // 4)
        h = hashlib.blake2b(MODEL.encode(), digest_size=16).digest()
        cached_run, still = 0, True
        chain = []
        for i in range(len(prompt) // BLOCK_BYTES):
            h = hashlib.blake2b(h + prompt[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES], digest_size=16).digest()
            chain.append(h)
            if still and h in seen:
                cached_run += 1
                reused.add(h)
            else:
                still = False
        queries += tokens
        hits += min(cached_run * BLOCK_TOKENS, max(tokens - 1, 0))
        seen.update(chain)
    w.oracle_hit_rate = hits / queries if queries else 0.0
    w.working_set_blocks = len(reused)
    w.prompt_tokens_mean = queries / len(w.reqs)


# --------------------------------------------------------------------------------------
# Processes and configuration
# --------------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path, stdout_pipe: bool = False):
        self.name, self.log = name, log
        self._log = open(log, "ab", buffering=0)
        self.popen = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE if stdout_pipe else self._log,
                                      stderr=self._log, preexec_fn=procs.die_with_parent)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        procs.stop(self.popen, STOP_TIMEOUT)
        if self.popen.stdout:
            self.popen.stdout.close()
        self._log.close()


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


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
        self.proc = Proc(self.id, argv, work / f"{self.id}.log", stdout_pipe=True)
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
        self.proc = Proc("envoy", [str(envoy), "-c", str(path), "--concurrency", str(workers), "--use-dynamic-base-id",
                                   "--base-id-path", str(work / f"envoy{tag}.base-id"), "--log-level", "warn"]
                               # A diagnostic: e.g. "wasm:debug" logs the picker's every load report.
                               + (["--component-log-level", os.environ["BENCH_ROUTING_ENVOY_LOG"]]
                                  if os.environ.get("BENCH_ROUTING_ENVOY_LOG") else []), self.log)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not self.proc.alive():
                raise RuntimeError(f"Envoy exited at start:\n{procs.tail(self.log, 30)}")
            try:
                if http_get(admin, "/ready", 1.0)[1].strip() == "LIVE":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.stop()
                raise RuntimeError(f"Envoy not ready in {START_TIMEOUT:.0f}s:\n{procs.tail(self.log, 30)}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.stop()


# --------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int = 0
    ttft_ms: float = float("nan")       # the replica's (x-mock-ttft-ms)
    latency_ms: float = float("nan")    # the client's, request sent to response read
    done_at: float = 0.0
    backend: str = ""
    hit_tokens: int = 0
    echo_key: Optional[str] = None
    error: str = ""
    gateway: int = 0                    # which gateway process the client sent it to


async def send(client: httpx.AsyncClient, port: int, body: dict, headers: dict, t0: float) -> Outcome:
    out = Outcome()
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        r = await client.post(f"http://127.0.0.1:{port}{PATH}", content=json.dumps(body),
                              headers={"content-type": "application/json", **headers})
        out.latency_ms = (loop.time() - start) * 1000
        out.status = r.status_code
        out.backend = r.headers.get("x-mock-backend", "")
        out.hit_tokens = int(r.headers.get("x-mock-prefix-cache-hit-tokens", "0") or 0)
        out.echo_key = r.headers.get("x-echo-prefix-hash")
        out.ttft_ms = float(r.headers.get("x-mock-ttft-ms", "nan"))
    except (httpx.HTTPError, OSError, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}"
    out.done_at = loop.time() - t0
    return out


async def replay(w: Workload, ports: list[int], strategy: Strategy, keys: KeySource,
                 background_port: int = 0, split: str = "alternate") -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        brng = random.Random(99)

        async def background(k: int) -> None:
            n = 0
            while not stop.is_set():   # bounded: ends with the replay
                body = body_of([{"role": "user", "content": f"{k} {n} " + text(brng, 4096)}])
                n += 1
                try:
                    await client.post(f"http://127.0.0.1:{background_port}{PATH}", json=body)
                except (httpx.HTTPError, OSError):
                    await asyncio.sleep(0.1)

        senders = [asyncio.create_task(background(k)) for k in range(w.background if background_port else 0)]
        if senders:
            await asyncio.sleep(2.0)   # the queue builds before the gateway's first request
        t0 = loop.time() + 0.05
        done: list[asyncio.Event] = [asyncio.Event() for _ in w.reqs]
        results: list[Optional[Outcome]] = [None] * len(w.reqs)

        async def one(i: int, r: Req) -> None:
            await asyncio.sleep(max(0.0, t0 + r.at - loop.time()))
            if r.after is not None:
                await done[r.after].wait()
            # Two gateways, split "alternate": request i to gateway i mod n, as an L4 balancer
            # spreading requests would; a tenant's or a conversation's requests cross gateways.
            # Split "prefix": every request of one prefix group to one gateway (a diagnostic: each
            # gateway's picker then sees all of a prefix's traffic, as with one gateway).
            if split == "prefix":
                g = int.from_bytes(hashlib.blake2b(prefix_group(w, r.body).encode(), digest_size=8).digest(),
                                   "big") % len(ports)
            else:
                g = i % len(ports)
            results[i] = await send(client, ports[g], r.body, keys.headers(r.body, strategy), t0)
            results[i].gateway = g
            done[i].set()

        await asyncio.gather(*(one(i, r) for i, r in enumerate(w.reqs)))
        wall = loop.time() - t0
        stop.set()
        await asyncio.gather(*senders)
    return [r or Outcome(error="not sent") for r in results], wall


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def prefix_group(w: Workload, body: dict) -> str:
    """The prefix a request shares with others: its tenant's system prompt (tenants, background),
    its conversation's first user turn (conversations); control shares nothing."""
    msgs = body["messages"]
    if w.name == "conversations":
        return msgs[1]["content"]
    if w.name == "control":
        return msgs[0]["content"] + msgs[-1]["content"]
    return msgs[0]["content"]


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


def gateway_targets(rows: list[dict]) -> list[dict]:
    """Two gateways against one, per strategy: hit rate >= 0.9x, TTFT p95 <= 1.15x (the picker's
    targets; printed for every strategy, checked the same way)."""
    out = []
    for r2 in rows:
        if r2.get("gateways", 1) == 1:
            continue
        r1 = next((r for r in rows if r.get("gateways", 1) == 1 and r["workload"] == r2["workload"]
                   and r["strategy"] == r2["strategy"] and r["capacity"] == r2["capacity"]), None)
        if r1 is None:
            continue
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
    for r2 in rows:
        if r2.get("gateways", 1) == 1:
            continue
        r1 = next((r for r in rows if r.get("gateways", 1) == 1 and r["workload"] == r2["workload"]
                   and r["strategy"] == r2["strategy"] and r["capacity"] == r2["capacity"]), None)
        if r1 is None:
            continue
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


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


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
    ports = gw_ports[0]
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
