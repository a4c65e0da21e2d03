#!/usr/bin/env bash
# Installs what `make oci` and tests/istio need beyond scripts/bootstrap.sh:
#   - the Python packages of tests/requirements-istio.txt (oras, jsonschema,
#     kubernetes-validate), into ./.venv;
#   - Debian's docker-registry (the OCI registry the tests start on a loopback port), unless
#     it is on PATH or DOCKER_REGISTRY_BIN names one.
# Idempotent and quiet when everything is there. The tests start their own registry process
# and never use the package's system service, whether or not it runs.
#
#   bash scripts/istio-deps.sh
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv"
REQS="$ROOT/tests/requirements-istio.txt"
STAMP="$VENV/.requirements-istio.sha256"

say() { printf 'istio-deps: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[[ -x "$VENV/bin/python" ]] || bash "$ROOT/scripts/bootstrap.sh"

want="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]] \
   || ! "$VENV/bin/python" -c 'import oras.provider, jsonschema, kubernetes_validate' >/dev/null 2>&1; then
  say "installing tests/requirements-istio.txt into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS" >&2 \
    || die "pip install -r tests/requirements-istio.txt failed (is PyPI reachable?)"
  printf '%s\n' "$want" >"$STAMP"
fi

if [[ -z "${DOCKER_REGISTRY_BIN:-}" ]] && ! command -v docker-registry >/dev/null 2>&1; then
  sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "docker-registry is missing: apt-get install docker-registry (as root)"
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null 2>&1 \
    || die "docker-registry is missing and there is no apt-get: install a registry (distribution v2) and set DOCKER_REGISTRY_BIN"
  say "installing Debian's docker-registry"
  "${sudo[@]}" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends docker-registry >&2 \
    || die "apt-get install docker-registry failed"
fi
command -v docker-registry >/dev/null 2>&1 || [[ -n "${DOCKER_REGISTRY_BIN:-}" ]] || die "docker-registry still not found"
