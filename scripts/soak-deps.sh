#!/usr/bin/env bash
# Installs what tests/soak needs beyond the venv: wrk, Debian's package (the load generator).
# Idempotent; CI machines start without it.
set -euo pipefail
say() { printf 'soak-deps: %s\n' "$*" >&2; }
if command -v wrk >/dev/null 2>&1; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  say "installing wrk (Debian package) for tests/soak"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk >&2
else
  say "error: tests/soak needs wrk: sudo apt-get install wrk"
  exit 1
fi
