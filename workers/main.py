"""Worker process: load the engine once, then consume jobs until told to stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

import redis.asyncio as aioredis

from moments import errors
from moments.config import Settings
from workers.engine import Engine
from workers.faults import maybe_faulty
from workers.job_loop import JobLoop
from workers.kv_cache import KVPrefixCache
from workers.pipeline import Pipeline
from workers.token_cache import TokenCache

log = logging.getLogger(__name__)
EXIT_FATAL_DEVICE = 3


async def run_worker(settings: Settings, engine: Engine | None = None, *, ready: asyncio.Event | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT (finishes the job in hand); returns the exit code."""
    name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    if engine is None:
        engine = await asyncio.to_thread(
            Engine.load, settings.model, device=settings.device, dtype=settings.dtype,
            attn_implementation=settings.attn_implementation,
            fast_decode=None if settings.fast_decode else False,  # None: on where the device allows
            compile=settings.compile, fused_prefill=settings.fused_prefill,
        )
    engine = maybe_faulty(engine)
    redis = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=30.0)
    pipeline = Pipeline(
        settings,
        engine,
        TokenCache(redis, ttl_s=settings.token_cache_ttl_s, chunk_bytes=settings.token_cache_chunk_bytes),
        KVPrefixCache(settings.kv_cache_bytes),
        owner=name,
    )
    loop = JobLoop(settings, redis, pipeline.run, name,
                   affinity=pipeline.preferred_worker if settings.kv_affinity else None)
    running = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            running.add_signal_handler(sig, loop.stop)
        except (NotImplementedError, RuntimeError):
            pass
    log.info("worker %s serving model %s on %s", name, engine.model_name, engine.device)
    if ready is not None:
        ready.set()
    try:
        await loop.run()
    except errors.FatalDeviceError:
        log.critical("worker %s exits: device unusable", name)
        return EXIT_FATAL_DEVICE
    finally:
        await redis.aclose()
    return 0
