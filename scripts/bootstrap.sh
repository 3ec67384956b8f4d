# Sourced by scripts/demo.sh and .ci/run: make a fresh Debian/Ubuntu machine ready for Moments.
#   - Debian packages it needs, when missing: redis-server, python3-venv, openssl (as root or via sudo);
#   - a virtual environment in $MOMENTS_VENV (default .venv), since the system python3 is
#     externally managed (PEP 668) and often has no pip;
#   - the CPU build of torch first (so nothing pulls a multi-GB CUDA build), then Moments with $EXTRAS.
# Afterwards $PY is the environment's python.
set -euo pipefail

_sudo() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
_apt_updated=""
_apt_install() {
  [ -n "$_apt_updated" ] || { _sudo apt-get update -qq; _apt_updated=1; }
  _sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  _apt_install "${need[@]}"
fi

VENV=${MOMENTS_VENV:-.venv}
BASE_PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$BASE_PY" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian ships venv's pip bootstrap separately (python3-venv / python3.X-venv).
    rm -rf "$VENV"
    ver=$("$BASE_PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "installing python${ver}-venv"
    _apt_install "python${ver}-venv" || _apt_install python3-venv
    "$BASE_PY" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >/dev/null 2>&1 || true
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[${EXTRAS:-worker}]"
export PY
