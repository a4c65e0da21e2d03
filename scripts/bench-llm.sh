#!/usr/bin/env bash
# `make bench-llm`: the seeds' benchmark tables, measured by GuideLLM (a real LLM benchmark
# client, from PyPI) through Envoy + bbr-wasm to two mock vLLM backends, all on loopback.
#
#   1. builds the filter and mock-vllm (cargo), finds Envoy (scripts/envoy-bin.sh);
#   2. installs bench/requirements-llm.txt (GuideLLM, pinned) into ./.venv-llm, a venv of its
#      own (GuideLLM pulls in torch: ~6 GB, a few minutes the first time; reinstalled only when
#      that file changes);
#   3. runs bench/llm/bench_llm.py: starts the mocks and Envoy on free ports, runs
#      `guidellm run` per model and scenario (10 requests; 100 at concurrency 1; 100 at
#      concurrency 10), stops everything by pid, and writes bench/results/llm/ (summary.md,
#      summary.json, GuideLLM's JSON and HTML reports). Logs: .run/bench-llm/
#
# Offline: prompts come from bench/llm/prompts.jsonl, no tokenizer or data set is downloaded.
# Bounded: the whole run is stopped after BENCH_LLM_TIMEOUT seconds (default 1800; 3000 with
# BACKEND=vllm, whose LoRA adapter answered 0.2 requests/s at concurrency 1 on a loaded machine).
#
# BACKEND=llama or BACKEND=vllm adds a real model server as a third pool (tests/llama_pool.py,
# tests/vllm_pool.py; installed by scripts/llama-deps.sh or scripts/vllm-deps.sh on first use).
#
# Environment: see bench/llm/bench_llm.py (BENCH_LLM_MODELS, BENCH_LLM_SCENARIOS, timings...),
#              ENVOY_BIN, CARGO (default cargo), PYTHON (default python3, for a new .venv-llm).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
CARGO="${CARGO:-cargo}"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv-llm"
REQS="$ROOT/bench/requirements-llm.txt"
STAMP="$VENV/.requirements.sha256"
if [[ "${BACKEND:-}" == vllm ]]; then TIMEOUT="${BENCH_LLM_TIMEOUT:-3000}"; else TIMEOUT="${BENCH_LLM_TIMEOUT:-1800}"; fi

say() { printf 'bench-llm: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

command -v "$CARGO" >/dev/null 2>&1 || die "cargo not found; install Rust from https://rustup.rs"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"

# --- build ---------------------------------------------------------------------------------
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx wasm32-wasip1; then
  say "adding the wasm32-wasip1 Rust target"
  rustup target add wasm32-wasip1 >&2
fi
say "building the filter and the mock backend"
"$CARGO" build --release --target wasm32-wasip1 -p bbr-wasm >&2
"$CARGO" build --release -p mock-vllm >&2

ENVOY_BIN="$(bash scripts/envoy-bin.sh)" || die "no usable Envoy (see above)"
export ENVOY_BIN

# --- GuideLLM in its own venv --------------------------------------------------------------
want="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  say "$VENV is broken; recreating it"
  rm -rf "$VENV"
fi
if [[ ! -d "$VENV" ]]; then
  say "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]] || ! "$VENV/bin/guidellm" --version >/dev/null 2>&1; then
  say "installing bench/requirements-llm.txt into $VENV (GuideLLM + torch, ~6 GB; first time takes minutes)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2 \
    || say "warning: could not upgrade pip; continuing with the bundled one"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS" >&2 \
    || die "pip install -r bench/requirements-llm.txt failed (is PyPI reachable?)"
  printf '%s\n' "$want" >"$STAMP"
fi
say "$("$VENV/bin/guidellm" --version 2>&1 | tail -n1)"

# --- run -------------------------------------------------------------------------------------
# bench_llm.py starts and stops every process itself (by pid; its children also die with it).
# timeout sends SIGTERM, then SIGKILL 30 s later.
status=0
timeout --kill-after=30 "$TIMEOUT" "$VENV/bin/python" bench/llm/bench_llm.py || status=$?
if ((status == 124 || status == 137)); then
  say "error: the benchmark did not finish within ${TIMEOUT}s"
fi
exit "$status"
