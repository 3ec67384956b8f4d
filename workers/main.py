"""Worker process: load the engine once, then consume jobs until told to stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from moments.core import errors
from moments.core.blob_backends import open_blob_store
from moments.core.config import Settings
from moments.core.redis_client import connect
from moments.workers.job_loop import JobLoop
from moments.workers.kv_cache import KVPrefixCache, drop_deleted_videos
from moments.workers.model.engine import Engine, EngineOptions
from moments.workers.pipeline import Pipeline
from moments.workers.token_cache import TokenCache

log = logging.getLogger(__name__)
EXIT_FATAL_DEVICE = 3


def engine_options(settings: Settings) -> EngineOptions:
    """The engine options ``settings`` ask for (the fast paths stay off where the device has none)."""
    return EngineOptions(device=settings.device, dtype=settings.dtype,
                         attn_implementation=settings.attn_implementation,
                         fast_decode=None if settings.fast_decode else False,
                         compile=None if settings.compile else False,
                         fused_prefill=None if settings.fused_prefill else False, awq_kernel=settings.awq_kernel)


def load_engine(settings: Settings) -> Engine:
    return Engine.load(settings.model, engine_options(settings))


async def run_worker(settings: Settings, engine: Engine | None = None, *, ready: asyncio.Event | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT (finishes the job in hand); returns the exit code."""
    name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    if engine is None:
        engine = await asyncio.to_thread(load_engine, settings)
    redis = connect(settings, socket_timeout_s=30.0)
    kv_cache = KVPrefixCache(settings.kv_cache_bytes)
    pipeline = Pipeline(
        settings,
        engine,
        TokenCache(redis, ttl_s=settings.token_cache_ttl_s, chunk_bytes=settings.token_cache_chunk_bytes),
        kv_cache,
        open_blob_store(settings),
        owner=name,
    )
    concurrency = settings.worker_jobs or (8 if engine.device.type == "cuda" else 1)
    loop = JobLoop(settings, redis, pipeline, name, affinity=settings.kv_affinity, concurrency=concurrency)
    running = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            running.add_signal_handler(sig, loop.stop)
        except (NotImplementedError, RuntimeError):
            pass
    log.info("worker %s serving model %s on %s", name, engine.model_name, engine.device)
    if ready is not None:
        ready.set()
    deletions = asyncio.create_task(drop_deleted_videos(redis, kv_cache))
    try:
        await loop.run()
    except errors.FatalDeviceError:
        log.critical("worker %s exits: device unusable", name)
        return EXIT_FATAL_DEVICE
    finally:
        deletions.cancel()
        await redis.aclose()
    return 0
