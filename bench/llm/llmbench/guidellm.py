"""GuideLLM: its command line for one model and scenario, running it with a deadline, and
reading its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


from .settings import PROMPTS, RUN_TIMEOUT, SCENARIOS, SHORT, say
from .servers import Proc

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
    # GuideLLM 0.8.1 can end a run with a request it created still "processing" in its
    # scheduler although the request was answered (seen on the real servers: created 100,
    # recorded 99, processing 1 in `scheduler_state`, while Envoy and the server counted 100
    # answered). Such a request has no record, so the statistics cover one fewer; the check
    # below counts it as sent and takes its outcome from the backends' counts.
    state = bench.get("scheduler_state") or {}
    return {
        "guidellm_version": doc["metadata"]["guidellm_version"],
        "created": state.get("created_requests", sent),
        "unrecorded": state.get("processing_requests", 0),
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
