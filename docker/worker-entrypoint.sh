#!/bin/sh
# With host networking every container has the host's name and numbers its own pids, so the default
# worker name (host-pid) would be the same in each replica: give each container a name of its own
# (kept in a file for the health check).
set -eu
if [ -z "${MOMENTS_WORKER_NAME:-}" ]; then
  MOMENTS_WORKER_NAME="$(hostname)-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
fi
export MOMENTS_WORKER_NAME
echo "$MOMENTS_WORKER_NAME" >/tmp/moments-worker-name
exec moments worker "$@"
