#!/usr/bin/env bash
# Installs what tests/soak needs beyond the venv: wrk, Debian's package (the load generator).
# Idempotent; CI machines start without it.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"

say() { printf 'soak-deps: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
source "$ROOT/scripts/lib.sh"

apt_install wrk wrk "install wrk 4.x (tests/soak needs it)"
