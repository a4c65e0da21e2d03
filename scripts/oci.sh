#!/usr/bin/env bash
# The bbr-wasm OCI artifact for Istio: a reproducible build of the filter, packaged as a Wasm
# image (compat variant: one tar+gzip layer holding plugin.wasm), and the digests pinned in
# istio/. `make oci` runs `scripts/oci.sh pin`, plus `--push REF` when OCI_REF is set.
#
#   scripts/oci.sh build                  # module + OCI image layout in target/oci/
#   scripts/oci.sh pin [--push REF]       # build, (push to REF and rewrite the image ref,)
#                                         #   rewrite sha256 + module annotations in istio/
#   scripts/oci.sh check                  # build and fail if istio/ does not pin it
#   scripts/oci.sh push REF [--insecure]  # build and push REF, verify by pulling it back
#   scripts/oci.sh reproducible           # a clean build in a fresh target dir must match
#                                         #   target/oci's module (built first if absent)
#
# The module is built with the machine's Rust toolchain, with --locked and with the
# absolute paths that end up in panic locations (the cargo registry, the checkout)
# remapped, into its own target dir (target/oci/cargo): its bytes then depend on the
# source, Cargo.lock and the rustc version only, not on where the repository or
# CARGO_HOME live. Registry credentials: ~/.docker/config.json, or OCI_USERNAME and
# OCI_PASSWORD. OCI_INSECURE=1 talks plain HTTP (a local registry).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="$ROOT/target/oci"
MODULE="$OUT/bbr_wasm.wasm"
PY="$ROOT/.venv/bin/python"
TOOL="$ROOT/tests/istio/bbr_oci.py"
CARGO="${CARGO:-cargo}"

say() { printf 'oci: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need_python() {
  [[ -x "$PY" ]] || die "$PY is missing; run \`make venv\` (scripts/bootstrap.sh) first"
  "$PY" -c 'import oras, jsonschema' 2>/dev/null \
    || die "the venv lacks oras/jsonschema; run: $PY -m pip install -r tests/requirements-istio.txt"
}

# build_module TARGET_DIR: prints the path of the built module.
build_module() {
  local target_dir="$1" cargo_home="${CARGO_HOME:-$HOME/.cargo}"
  rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1 >&2
  # RUSTFLAGS replaces (does not extend) .cargo/config.toml's rustflags for the target, so
  # the SIMD128 flag set there is repeated here.
  RUSTFLAGS="-C target-feature=+simd128 --remap-path-prefix=$cargo_home/registry/src=/cargo/registry/src --remap-path-prefix=$ROOT=/bbr-wasm" \
  CARGO_TARGET_DIR="$target_dir" \
    "$CARGO" build --quiet --locked --release --target wasm32-wasip1 -p bbr-wasm >&2
  printf '%s\n' "$target_dir/wasm32-wasip1/release/bbr_wasm.wasm"
}

build() {
  need_python
  mkdir -p "$OUT"
  local built
  built="$(build_module "$OUT/cargo")"
  cp "$built" "$MODULE.tmp" && mv "$MODULE.tmp" "$MODULE"
  rm -rf "$OUT/image"
  "$PY" "$TOOL" package "$MODULE" "$OUT/image" >"$OUT/summary.json"
  say "module $MODULE ($(stat -c %s "$MODULE") bytes), image layout $OUT/image"
  cat "$OUT/summary.json"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  build)
    build
    ;;
  pin)
    ref=""
    if [[ "${1:-}" == "--push" ]]; then
      ref="${2:-}"; [[ -n "$ref" ]] || die "--push needs a reference: registry/repo:tag"
    fi
    build >/dev/null
    if [[ -n "$ref" ]]; then
      insecure=(); [[ "${OCI_INSECURE:-}" == 1 ]] && insecure=(--insecure)
      "$PY" "$TOOL" push "$MODULE" "$ref" "${insecure[@]}"
      "$PY" "$TOOL" pin "$MODULE" --ref "$ref"
    else
      "$PY" "$TOOL" pin "$MODULE"
    fi
    ;;
  check)
    build >/dev/null
    "$PY" "$TOOL" check "$MODULE"
    ;;
  push)
    ref="${1:-}"; [[ -n "$ref" ]] || die "usage: scripts/oci.sh push REGISTRY/REPO:TAG [--insecure]"
    shift
    build >/dev/null
    "$PY" "$TOOL" push "$MODULE" "$ref" "$@"
    ;;
  reproducible)
    # One clean build, in a fresh directory elsewhere, against target/oci's module: two builds
    # in two target directories. (A second clean build would add minutes to make test and
    # prove nothing more: target/oci/cargo is itself a clean build in a fresh clone, and the
    # pins in istio/ already compare this build with one made on another machine.)
    [[ -s "$MODULE" ]] || build >/dev/null
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    b="$(build_module "$tmp/clean")"
    ha="$(sha256sum "$MODULE" | cut -d' ' -f1)"; hb="$(sha256sum "$b" | cut -d' ' -f1)"
    say "target/oci build: $ha"
    say "clean build: $hb"
    [[ "$ha" == "$hb" ]] || die "a clean build differs from target/oci's: the module is not reproducible"
    say "reproducible ($(rustc --version))"
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
