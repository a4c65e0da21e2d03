"""Settings of `make bench-llm`: paths, the models and the backend serving each, the scenarios
and their sizes, timeouts, and the small helpers every part uses."""

from __future__ import annotations

import sys
from pathlib import Path



ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
import procs  # noqa: E402  (tests/procs.py)
import llama_pool  # noqa: E402  (tests/llama_pool.py)
import vllm_pool  # noqa: E402  (tests/vllm_pool.py)

# The test helpers the other parts use (they import them from here, after the sys.path line).
TEST_MODULES = (procs, llama_pool, vllm_pool)

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
    # One vLLM on two cores answers 0.3-0.5 requests/s at concurrency 1: the seeds' 100-request
    # runs took 22 minutes for two models. These sizes keep the whole run near 10 minutes
    # (vLLM's start-up included) with the seeds' three scenarios and concurrencies.
    for name, n in VLLM_REQUESTS.items():
        title, _, conc, profile = SCENARIOS[name]
        SCENARIOS[name] = (title, n, conc, profile)


LLAMA_REPLICAS = 2

# name -> (title, requests, concurrency, GuideLLM profile)
SCENARIOS = {
    "quick": ("Quick Validation", 10, 1, {"kind": "synchronous"}),
    "latency": ("Latency Benchmark", 100, 1, {"kind": "synchronous"}),
    "concurrent": ("Concurrent", 100, 10, {"kind": "concurrent", "streams": [10]}),
}

# Requests per model and scenario with BACKEND=vllm (see use_vllm).
VLLM_REQUESTS = {"quick": 10, "latency": 30, "concurrent": 50}

START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
RUN_TIMEOUT = 300.0  # seconds for one GuideLLM run (100 requests at concurrency 1: ~1 min)
VLLM_RUN_TIMEOUT = 900.0  # the same with BACKEND=vllm (100 adapter requests: ~8 min measured)


def say(msg: str) -> None:
    print(f"bench-llm: {msg}", file=sys.stderr, flush=True)


class SetupError(Exception):
    pass
