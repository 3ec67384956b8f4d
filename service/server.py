"""Builds and runs the gRPC front end: servicer, health, reflection, metrics, graceful stop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from moments.core.blob_backends import open_blob_store
from moments.core.config import Settings
from moments.core.redis_client import connect
from moments.service.auth import Authenticator, parse_api_keys
from moments.service.catalog import VideoCatalog
from moments.service.event_reader import EventReader
from moments.service.health import NOT_SERVING, HealthServicer, WorkerHealth, set_health
from moments.service.interceptor import MomentsInterceptor
from moments.service.reflection import enable_reflection
from moments.service.servicer import MomentsServicer
from moments.service.submission import JobClient
from moments.service.uploads import Uploads
from moments.service.webhooks import Webhooks
from moments.v1 import moments_pb2, moments_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = moments_pb2.DESCRIPTOR.services_by_name["Moments"].full_name
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
JANITOR_INTERVAL_S = 60.0
CANCEL_CONNECTIONS = 4
"""The pool of its own that cancellations write on (a short script each)."""


HEALTH_NAMES = ("", SERVICE_NAME)
"""Health reports these services (the whole server and moments.v1.Moments) the same way."""


@dataclass
class FrontEnd:
    server: grpc.aio.Server
    health: WorkerHealth
    redis: aioredis.Redis
    uploads: Uploads
    port: int
    jobs: JobClient
    tasks: tuple[asyncio.Task, ...] = ()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Report NOT_SERVING, then let calls in flight finish for up to ``grace_s``."""
        for task in self.tasks:
            task.cancel()
        await set_health(self.health.servicer, HEALTH_NAMES, NOT_SERVING)
        await self.server.stop(grace_s)
        await self.jobs.reader.close()
        for client in (self.jobs.reader.redis, self.jobs.cancel_redis, self.redis):
            await client.aclose()


async def start_front_end(settings: Settings) -> FrontEnd:
    redis = connect(settings)
    blobs = open_blob_store(settings)
    catalog = VideoCatalog(redis, blobs)
    uploads = Uploads(settings, redis, blobs, catalog)
    auth = Authenticator(parse_api_keys(settings.api_keys), redis, failures_max=settings.auth_failures_max,
                         failure_window_s=settings.auth_failure_window_s)
    server = grpc.aio.server(
        interceptors=[MomentsInterceptor(auth)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )
    job_client = JobClient(settings, redis, reader=EventReader(connect(settings, max_connections=2)),
                           cancel_redis=connect(settings, max_connections=CANCEL_CONNECTIONS))
    hooks = Webhooks(settings, redis)
    moments_pb2_grpc.add_MomentsServicer_to_server(MomentsServicer(settings, uploads, catalog, job_client, hooks),
                                                   server)
    health = WorkerHealth(HealthServicer(), HEALTH_NAMES, job_client.live_workers,
                          interval_s=min(1.0, settings.worker_stale_s / 4))
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    enable_reflection(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    port = server.add_secure_port(settings.listen, _credentials(settings)) if settings.tls_cert \
        else server.add_insecure_port(settings.listen)
    await health.check()  # NOT_SERVING (not UNKNOWN) from the first call on
    await server.start()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="127.0.0.1")
    front = FrontEnd(server, health, redis, uploads, port, job_client,
                     tasks=(asyncio.create_task(health.run()), asyncio.create_task(_janitor(uploads)),
                            asyncio.create_task(hooks.run())))
    log.info("front end listening on port %d (tls=%s, auth=%s)", port, bool(settings.tls_cert),
             auth.enabled)
    return front


def _credentials(settings: Settings) -> grpc.ServerCredentials:
    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    client_ca = read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(settings.tls_key), read(settings.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def _janitor(uploads: Uploads) -> None:
    while True:
        try:
            await uploads.expire_abandoned()
        except Exception:  # noqa: BLE001 - Redis may be briefly down; try again next round
            log.warning("upload janitor could not run", exc_info=True)
        await asyncio.sleep(JANITOR_INTERVAL_S)
