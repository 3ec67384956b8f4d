"""Container health checks (compose `healthcheck`), with settings from ``MOMENTS_*`` like the service.

    python /app/healthcheck.py frontend   # the front end reports SERVING (a worker is alive behind it)
    python /app/healthcheck.py worker     # this container's worker heartbeats in Redis
Exit 0 when healthy, 1 otherwise, with one line saying why."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from moments.core.config import Settings

WORKER_NAME_FILE = Path("/tmp/moments-worker-name")


def frontend(settings: Settings) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = settings.listen.rsplit(":", 1)[1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
    return "" if status == health_pb2.HealthCheckResponse.SERVING else health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def worker(settings: Settings) -> str:
    from moments.core import keys
    from moments.core.redis_client import connect_sync

    name = WORKER_NAME_FILE.read_text().strip()
    beat = connect_sync(settings, socket_timeout_s=2).hget(keys.WORKERS_HASH, name)
    if beat is None:
        return f"no heartbeat from {name} yet (loading the model)"
    age_s = time.time() - float(beat)
    return "" if age_s < settings.worker_stale_s else f"last heartbeat of {name} {age_s:.0f} s ago"


def main() -> int:
    check = {"frontend": frontend, "worker": worker}[sys.argv[1]]
    try:
        problem = check(Settings.from_env())
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(problem)
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
