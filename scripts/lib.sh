# Shared steps of the install scripts (scripts/*-deps.sh). Source it after defining say() and
# die(); everything here is idempotent and quiet when there is nothing to do.

# pip_requirements VENV REQS STAMP IMPORTS: installs REQS into VENV unless STAMP holds REQS's
# sha256 and `import IMPORTS` works (a changed requirements file or a broken package reinstalls).
pip_requirements() {
  local venv="$1" reqs="$2" stamp="$3" imports="$4" want
  want="$(sha256sum "$reqs" | cut -d' ' -f1)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]] \
     || ! "$venv/bin/python" -c "import $imports" >/dev/null 2>&1; then
    say "installing ${reqs#"$ROOT"/} into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs" >&2 \
      || die "pip install -r ${reqs#"$ROOT"/} failed (is PyPI reachable?)"
    printf '%s\n' "$want" >"$stamp"
  fi
}

# apt_install PACKAGE COMMAND HINT: installs Debian's PACKAGE (with sudo when not root) unless
# COMMAND is on PATH; HINT says what else the user can do where apt-get is not available.
apt_install() {
  local pkg="$1" cmd="$2" hint="$3"
  command -v "$cmd" >/dev/null 2>&1 && return 0
  local sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "$cmd is missing: apt-get install $pkg (as root), or $hint"
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null 2>&1 || die "$cmd is missing and there is no apt-get: $hint"
  say "installing Debian's $pkg"
  "${sudo[@]}" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$pkg" >&2 \
    || die "apt-get install $pkg failed"
  command -v "$cmd" >/dev/null 2>&1 || die "$cmd still not found after apt-get install $pkg"
}
