#!/usr/bin/env bash
# The README's demo command: install what Moments needs on a fresh machine, then run `moments demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -e '.[worker]'
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec $PY -m moments.cli demo --data-dir "${MOMENTS_DATA_DIR:-./var/demo}" "$@"
