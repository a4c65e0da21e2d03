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
source "$ROOT/scripts/lib.sh"

[[ -x "$VENV/bin/python" ]] || bash "$ROOT/scripts/bootstrap.sh"

pip_requirements "$VENV" "$REQS" "$STAMP" "oras.provider, jsonschema, kubernetes_validate"

if [[ -z "${DOCKER_REGISTRY_BIN:-}" ]]; then
  apt_install docker-registry docker-registry \
    "install a registry (distribution v2) and set DOCKER_REGISTRY_BIN"
fi
