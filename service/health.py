"""Standard health (``grpc.health.v1``) that follows the workers: SERVING only while one is alive.

A front end without a live worker can store videos but answer no question, so load balancers and
``moments serve``'s users should see it as not ready. Liveness is the workers' heartbeats in Redis
(``keys.WORKERS_HASH``, fresh within ``Settings.worker_stale_s``); Redis being unreachable counts as
no worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from grpc_health.v1 import health, health_pb2
from redis.exceptions import RedisError

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health.aio.HealthServicer):
    """grpcio-health-checking's servicer plus ``List`` (in grpc.health.v1, unimplemented there)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: dict[str, int] = {}

    async def set(self, service: str, status) -> None:
        self.statuses[service] = status
        await super().set(service, status)

    async def List(self, request, context) -> health_pb2.HealthListResponse:  # noqa: N802 - gRPC name
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self.statuses.items()})


async def set_health(servicer: HealthServicer, names: Iterable[str], status) -> None:
    for name in names:
        await servicer.set(name, status)


class WorkerHealth:
    """Keeps the health of ``names`` at SERVING while ``live_workers()`` is positive."""

    def __init__(self, servicer, names: Iterable[str], live_workers: Callable[[], Awaitable[int]],
                 *, interval_s: float) -> None:
        self.servicer = servicer
        self.names = tuple(names)
        self.live_workers = live_workers
        self.interval_s = interval_s
        self.status = None

    async def check(self) -> int:
        """Look once and set the status; returns the number of live workers (0 when Redis is down)."""
        try:
            live = await self.live_workers()
        except (RedisError, OSError):
            live = 0
        status = SERVING if live else NOT_SERVING
        if status != self.status:
            if self.status is not None or status == SERVING:
                log.info("%s: %d live worker(s)", health_pb2.HealthCheckResponse.ServingStatus.Name(status), live)
            else:
                log.info("NOT_SERVING until a worker is up (loading its model)")
            await set_health(self.servicer, self.names, status)
            self.status = status
        return live

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)
