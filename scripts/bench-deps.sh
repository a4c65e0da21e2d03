#!/usr/bin/env bash
# Installs what `make bench` needs beyond scripts/bootstrap.sh (Envoy and pyyaml in ./.venv):
#   - wrk, the load generator, from Debian's packages (apt-get), unless it is on PATH or
#     WRK_BIN names one;
#   - the Python packages of bench/requirements.txt (matplotlib, for the chart), into ./.venv.
# Idempotent and quiet when everything is there.
#
#   bash scripts/bench-deps.sh          (`make bench` runs it)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv"
REQS="$ROOT/bench/requirements.txt"
STAMP="$VENV/.requirements-bench.sha256"

say() { printf 'bench-deps: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[[ -x "$VENV/bin/envoy" && -x "$VENV/bin/python" ]] || bash "$ROOT/scripts/bootstrap.sh"

want="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]] \
   || ! "$VENV/bin/python" -c 'import matplotlib' >/dev/null 2>&1; then
  say "installing bench/requirements.txt into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS" >&2 \
    || die "pip install -r bench/requirements.txt failed (is PyPI reachable?)"
  printf '%s\n' "$want" >"$STAMP"
fi

if [[ -n "${WRK_BIN:-}" ]]; then
  [[ -x "$WRK_BIN" ]] || die "WRK_BIN=$WRK_BIN is not an executable file"
elif ! command -v wrk >/dev/null 2>&1; then
  sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "wrk is missing: apt-get install wrk (as root), or set WRK_BIN"
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null 2>&1 \
    || die "wrk is missing and there is no apt-get: install wrk 4.x and set WRK_BIN"
  say "installing Debian's wrk"
  "${sudo[@]}" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends wrk >&2 \
    || die "apt-get install wrk failed"
  command -v wrk >/dev/null 2>&1 || die "wrk still not found after apt-get install"
fi
