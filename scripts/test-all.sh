#!/usr/bin/env bash
# `make test`: every suite, in an order that lets the two real model servers install while the
# rest runs.
#
# Why: llama-server is compiled from source (about 11 CPU-minutes in unity mode, see
# scripts/llama-deps.sh; the machine is busy from start to end, so CPU saved is wall time
# saved) and vLLM is 3.7 GB of wheels
# plus a model conversion. Run one after the other they were a third of a fresh clone's
# `make test`. Yet the Envoy suites (integration, soak, Istio) leave much of the two cores idle:
# they wait on sockets, timeouts and process start-ups. So both installs start first, in the
# background, at the kernel's idle scheduling class (SCHED_IDLE), the idle I/O class and, for
# their session's scheduling group, nice 19 (see start_bg: with autogroups that is what keeps
# them off the CPU the tests want: about 1.5 % of it while a test is busy);
# the suites that need the servers run last, after waiting for what is left of the installs.
# The same holds for what the suites build before they start (the wasm-bindgen test runner,
# the release build, cargo-fuzz): lint and test-native leave the CPU idle too, waiting on the
# linker and the disk, so those builds start at t=0 as well (see LOW below), and each suite
# waits only for what is left of its own.
#
# Each phase prints its wall time at the end, and the installs' output goes to .run/*.log
# (printed if one fails).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
MAKE="${MAKE:-make}"
mkdir -p .run

say() { printf 'make test: %s\n' "$*" >&2; }
elapsed() { local s=$(($(date +%s) - $1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# The idle classes when the machine offers them; plain `nice -n 19` otherwise (a container may
# refuse SCHED_IDLE; nice alone still gives the tests twenty times the CPU share).
IDLE=(nice -n 19)
if command -v chrt >/dev/null 2>&1 && chrt -i 0 true 2>/dev/null; then
  IDLE=(chrt -i 0 "${IDLE[@]}")
fi
if command -v ionice >/dev/null 2>&1 && ionice -c 3 true 2>/dev/null; then
  IDLE=(ionice -c 3 "${IDLE[@]}")
fi

# name -> pid (each in its own session, so a stop reaches the compilers and pip it started)
declare -A BG=()
T0=$(date +%s)
declare -A BG_T0=()

# The two Rust tools the suites need later are compiled from crates.io, and start at t=0 too:
# wasm-bindgen-cli (the runner of test-wasm, about 6 CPU-minutes, 3 minutes of wall time when
# it ran inside test-wasm) at nice 19 in the normal class, which on a kernel without autogroups
# ranks it ahead of the idle class's jobs for the CPU lint and test-native leave idle (they
# wait on the linker and the disk); with autogroups every background session shares alike
# (start_bg). cargo-fuzz with the fuzz targets' build (for fuzz-smoke, much later) goes in the
# idle class.
LOW=(nice -n 19)

start_bg() { # start_bg NAME idle|low COMMAND...
  local name="$1" class=("${IDLE[@]}")
  [[ "$2" == low ]] && class=("${LOW[@]}")
  shift 2
  # setsid: a session of its own, so stop_bg reaches everything it starts. But with Linux's
  # autogroups (kernel.sched_autogroup_enabled=1, the default on desktop and many server
  # kernels) each session is a scheduling group with an equal share of the CPU whatever the
  # nice values or the scheduling class inside it: a nice-19 job in its own session took as
  # much CPU as the tests (lint ran 5m27s against 2m51s alone), and SCHED_IDLE does not reach
  # across groups either. So the job first sets its session's autogroup nice
  # (/proc/self/autogroup; absent without autogroups; without CAP_SYS_ADMIN the kernel takes
  # one such change per 100 ms, hence the retries): 19 for every job (weight 15 against the
  # tests' 1024). Measured from fresh clones on 2 cores: 30m45s in all; with 10 for the low
  # class, its jobs were ready sooner (test-wasm waited 5m00s instead of 9m24s) but llama-server's
  # build fell behind and test-llama waited 6m58s for it (37m15s in all).
  setsid "${class[@]}" bash -c 'for _ in 1 2 3 4 5; do
      [[ -w /proc/self/autogroup ]] || break
      echo 19 2>/dev/null >/proc/self/autogroup && break
      sleep 0.2
    done
    exec "$@"' bash "$@" >".run/$name.log" 2>&1 </dev/null &
  BG[$name]=$!
  BG_T0[$name]=$(date +%s)
  say "started $name in the background at $([[ "$class" == nice ]] && echo 'nice 19' || echo 'idle priority') (pid ${BG[$name]}, log .run/$name.log)"
}

stop_bg() {
  local name pid
  for name in "${!BG[@]}"; do
    pid="${BG[$name]}"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || true
    fi
  done
}
trap 'stop_bg; stop_vllm' EXIT

wait_bg() { # wait_bg NAME: the install's exit status; its log on failure
  local name="$1" pid="${BG[$1]}" rc=0 t
  t=$(date +%s)
  if kill -0 "$pid" 2>/dev/null; then
    say "waiting for the $name install (started $(elapsed "${BG_T0[$name]}") ago): $(tail -n 1 ".run/$name.log" 2>/dev/null)"
  fi
  wait "$pid" || rc=$?
  unset "BG[$name]"
  if ((rc != 0)); then
    say "the $name install failed (exit $rc); its log, .run/$name.log:"
    tail -n 40 ".run/$name.log" >&2
    exit "$rc"
  fi
  say "$name installed ($(elapsed "${BG_T0[$name]}") since its start; waited $(elapsed "$t") for it)"
}

# vLLM takes 1.5-4.5 minutes to start (it loads torch, the model and the adapters). Started
# as soon as its install is done, at normal priority, it starts while the suites before it run
# (one core for those minutes), and tests/vllm takes it over through BBR_VLLM_PORT. The
# session is its own, so the stop at the end reaches its engine and worker processes too.
VLLM_PID=""
VLLM_PORT=""
VLLM_T0=0
start_vllm() {
  local argv=()
  # tests/procs.py's free_port: outside the kernel's ephemeral range, so no connection takes it
  VLLM_PORT="$(.venv/bin/python -c 'import sys; sys.path.insert(0, "tests"); import procs; print(procs.free_port())')"
  mapfile -d '' argv < <(.venv/bin/python tests/vllm_pool.py argv "$VLLM_PORT")
  ((${#argv[@]})) || { say "tests/vllm_pool.py gave no command line for vLLM"; exit 1; }
  setsid env "${argv[@]}" >.run/test-vllm-server.log 2>&1 </dev/null &
  VLLM_PID=$!
  VLLM_T0=$(date +%s)
  say "starting vLLM for tests/vllm on 127.0.0.1:$VLLM_PORT (pid $VLLM_PID, log .run/test-vllm-server.log)"
}
stop_vllm() {
  [[ -n "$VLLM_PID" ]] || return 0
  kill -TERM -- "-$VLLM_PID" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$VLLM_PID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$VLLM_PID" 2>/dev/null || true
  VLLM_PID=""
}
# Once the vLLM install has finished (it runs in the background), start the server.
maybe_start_vllm() {
  [[ -z "$VLLM_PID" && -n "${BG[vllm-deps]:-}" ]] || return 0
  kill -0 "${BG[vllm-deps]}" 2>/dev/null && return 0
  wait_bg vllm-deps
  start_vllm
}
wait_vllm() {
  local deadline=$(($(date +%s) + 600))
  until .venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); import vllm_pool; sys.exit(0 if vllm_pool.healthy($VLLM_PORT) else 1)"; do
    if ! kill -0 "$VLLM_PID" 2>/dev/null; then
      say "vLLM exited during start-up; the end of .run/test-vllm-server.log:"; tail -n 40 .run/test-vllm-server.log >&2; exit 1
    fi
    (($(date +%s) < deadline)) || { say "vLLM did not answer /health within 10 minutes"; exit 1; }
    sleep 1
  done
  say "vLLM answers on 127.0.0.1:$VLLM_PORT, $(elapsed "$VLLM_T0") after its start"
}

phase() { # phase TARGET...: one make call, timed
  local t
  t=$(date +%s)
  "$MAKE" --no-print-directory "$@"
  say "$* passed in $(elapsed "$t") (total $(elapsed "$T0"))"
}

# The Rust targets first: the background makes and the suites' makes would otherwise each run
# `rustup target add` at once.
"$MAKE" --no-print-directory targets
# -o targets: done just above.
start_bg wasm-bindgen low "$MAKE" --no-print-directory -o targets wasm-bindgen
# The release build the Envoy suites load (the filter and mock-vllm: 2 minutes of
# test-integration's wall time when built there). Cargo locks each profile's directory and
# this one is target/release, the suites before it use target/debug, so neither waits on the
# other's lock.
start_bg build low "$MAKE" --no-print-directory -o targets build
start_bg cargo-fuzz idle "$MAKE" --no-print-directory cargo-fuzz
start_bg llama-deps idle bash scripts/llama-deps.sh
start_bg vllm-deps idle bash scripts/vllm-deps.sh

phase lint
phase test-native
# The Envoy suites before test-wasm: the release build they need is small and ready first,
# while wasm-bindgen-cli shares the CPU with four other background jobs. With test-wasm third,
# fresh clones waited 9m24s and 13m02s for it with nothing else to run.
wait_bg build
phase test-integration
maybe_start_vllm
phase test-soak
maybe_start_vllm
phase test-istio
maybe_start_vllm
wait_bg wasm-bindgen
phase test-wasm
maybe_start_vllm
wait_bg cargo-fuzz
phase fuzz-smoke
# vLLM's suite before llama-server's: vLLM has usually been started by now, and while its suite
# runs (one OpenMP thread) llama-server's build still gets the other core.
if [[ -z "$VLLM_PID" ]]; then
  wait_bg vllm-deps
  start_vllm
fi
wait_vllm
BBR_VLLM_PORT="$VLLM_PORT" phase test-vllm
stop_vllm
wait_bg llama-deps
phase test-llama
say "all suites passed in $(elapsed "$T0")"
