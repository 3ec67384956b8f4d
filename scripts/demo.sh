#!/usr/bin/env bash
# The README's demo command: make a fresh machine ready (scripts/bootstrap.sh: Debian packages, a venv
# with the CPU build of torch and Moments), then run `moments demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=worker
source scripts/bootstrap.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$PY" -m moments.app.cli demo --data-dir "${MOMENTS_DATA_DIR:-./var/demo}" "$@"
