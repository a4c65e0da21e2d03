#!/usr/bin/env bash
# Installs what `make bench` needs beyond scripts/bootstrap.sh (Envoy and pyyaml in ./.venv):
#   - wrk, the load generator, from Debian's packages (apt-get), unless it is on PATH or
#     WRK_BIN names one;
#   - the Python packages of bench/requirements.txt (matplotlib, for the chart), into ./.venv.
# Idempotent and quiet when everything is there.
#
#   bash scripts/bench-deps.sh          (`make bench` runs it)
#   bash scripts/bench-deps.sh --python-only   (`make bench-routing`: matplotlib, no wrk)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv"
REQS="$ROOT/bench/requirements.txt"
STAMP="$VENV/.requirements-bench.sha256"

say() { printf 'bench-deps: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
source "$ROOT/scripts/lib.sh"

[[ -x "$VENV/bin/envoy" && -x "$VENV/bin/python" ]] || bash "$ROOT/scripts/bootstrap.sh"

pip_requirements "$VENV" "$REQS" "$STAMP" matplotlib
[[ "${1:-}" == "--python-only" ]] && exit 0

if [[ -n "${WRK_BIN:-}" ]]; then
  [[ -x "$WRK_BIN" ]] || die "WRK_BIN=$WRK_BIN is not an executable file"
else
  apt_install wrk wrk "install wrk 4.x and set WRK_BIN"
fi
