"""bench-routing's settings, shared by its modules: paths, the simulated replica, the key's and the
strategies' defaults, the capacities swept. Importing it also puts tests/ (procs.py) and this
directory (prefix_key.py) on sys.path, for every module here."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

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
DEFAULT_PICKER_BALANCE = 125            # prefixAffinity.picker.balanceFactor's default

CAPACITIES = (0.25, 0.5, 1.0, 2.0)
TARGET_CAPACITY = 0.5
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
