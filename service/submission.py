"""Job submission and waiting: backpressure, idempotent retries, deadlines and cancellation."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis

from moments.core import errors, jobs, keys
from moments.core.config import Settings
from moments.core.jobs import Event
from moments.core.records import EVENT_RESULT, Job
from moments.service import metrics
from moments.service.event_reader import EventReader

log = logging.getLogger(__name__)
READ_BLOCK_MS = 1000
ABANDON = """
if redis.call('HEXISTS', KEYS[1], 'payload') == 0 then return false end
local waiters = redis.call('HINCRBY', KEYS[1], 'waiters', -1)
if waiters <= 0 then redis.call('SET', KEYS[2], 1, 'EX', ARGV[1]) end
return waiters
"""
"""A caller leaves a job: one fewer waiter, and the cancel mark when it was the last (nil: the job is lost)."""


class JobClient:
    """Puts jobs on the stream and follows their event streams until they finish.

    Waiting calls hold no Redis connection: they read from ``reader`` (one XREAD for all of them),
    and a caller that leaves marks its job on ``cancel_redis``, a pool of its own, so a cancellation
    never waits behind the commands of other calls."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, *, reader: EventReader | None = None,
                 cancel_redis: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.reader = reader or EventReader(redis)
        self.cancel_redis = cancel_redis or redis

    async def live_workers(self) -> int:
        beats = await self.redis.hgetall(keys.WORKERS_HASH)
        now = time.time()
        return sum(1 for v in beats.values() if now - float(v) < self.settings.worker_stale_s)

    async def newest_heartbeat(self) -> float:
        beats = await self.redis.hvals(keys.WORKERS_HASH)
        return max((float(v) for v in beats), default=0.0)

    async def submit(self, job: Job) -> str:
        """Enqueue ``job`` (or join an identical open one); returns the id to follow."""
        if not await self.live_workers():
            raise errors.Unavailable("no worker is running; try again when one is up")
        request_id = jobs.request_key(
            job.tenant, job.kind, job.video_id, job.queries, job.sampling, job.max_new_tokens,
            *((job.callback_url,) if job.callback_url else ()),  # each webhook its own job
        )
        dedupe = keys.job_dedupe(request_id)
        if not await self.redis.set(dedupe, job.job_id, nx=True, ex=int(self.settings.job_timeout_s) + 60):
            existing = await self.redis.get(dedupe)
            if existing and await self.redis.hget(keys.job(existing.decode()), "state") in (
                jobs.QUEUED.encode(),
                jobs.RUNNING.encode(),
            ):
                # A retry often joins the job its own cut call just cancelled (it was the last
                # waiter): the cancel mark goes, or the worker fails the job under the new caller.
                await self.redis.delete(keys.job_cancel(existing.decode()))
                log.info("job %s joins identical open job %s", job.job_id, existing.decode())
                return existing.decode()
            await self.redis.set(dedupe, job.job_id, ex=int(self.settings.job_timeout_s) + 60)
        depth = await self.redis.zcard(keys.OPEN_JOBS)
        metrics.QUEUE_DEPTH.set(depth)
        if depth >= self.settings.max_queue_jobs:
            await self.redis.delete(dedupe)
            raise errors.ResourceExhausted(
                f"{depth} jobs are waiting (limit {self.settings.max_queue_jobs})", retry_after_s=2.0
            )
        job = replace(job, deadline_s=job.deadline_s or time.time() + self.settings.job_timeout_s)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                keys.job(job.job_id),
                mapping={"payload": job.to_json(), "state": jobs.QUEUED, "attempts": 0,
                         "dedupe": dedupe},
            )
            pipe.zadd(keys.OPEN_JOBS, {job.job_id: job.created_s})
            pipe.xadd(keys.job_events(job.job_id), Event("progress", {"stage": "queued"}).to_fields())
            pipe.xadd(keys.JOBS_STREAM, {"job_id": job.job_id})
            try:
                await pipe.execute()
            except asyncio.CancelledError:  # it may be queued now, and nobody will follow it: stop it
                await self.redis.set(keys.job_cancel(job.job_id), 1, ex=jobs.EVENTS_TTL_S)
                raise
        log.info("job %s queued video=%s kind=%s queries=%d", job.job_id, job.video_id, job.kind,
                 len(job.queries))
        return job.job_id

    async def events(self, job_id: str, deadline_s: float,
                     on_lost: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[Event]:
        """Yield the job's events until it is done or failed.

        Raises DeadlineExceeded at ``deadline_s``, Unavailable when every worker is gone, and
        JobLost within about ``READ_BLOCK_MS`` once the job's record has vanished (a failover
        dropped it): in each case, and when the caller goes away, the job is asked to stop. A
        query's result is yielded once, even when a rerun of the job (after a lost lease or a
        failover) publishes it again. ``on_lost`` runs before JobLost is raised (the job's webhook).
        """
        finished = False
        last_beat_s = time.time()
        seen_results: set[int] = set()
        try:
            # Inside the try: a cancel that arrives while it runs (it ran, most likely) still gives the
            # job up, so a job nobody follows any more never runs on unattended.
            await self.redis.hincrby(keys.job(job_id), "waiters", 1)
            async with self.reader.follow(keys.job_events(job_id)) as queue:
                while True:
                    remaining_s = deadline_s - time.time()
                    if remaining_s <= 0:
                        raise errors.DeadlineExceeded(f"job {job_id} did not finish within the deadline")
                    try:
                        _, fields = await asyncio.wait_for(queue.get(), min(READ_BLOCK_MS / 1000, remaining_s))
                    except TimeoutError:
                        await self._check_alive(job_id, on_lost)
                        last_beat_s = max(last_beat_s, await self.newest_heartbeat())
                        if time.time() - last_beat_s > self.settings.worker_stale_s:
                            raise errors.Unavailable(f"every worker stopped; job {job_id} was not finished")
                        continue
                    event = Event.from_fields(fields)
                    if event.kind == EVENT_RESULT:
                        index = int(event.data.get("query_index", -1))
                        if index in seen_results:
                            continue
                        seen_results.add(index)
                    finished = event.kind in (jobs.DONE, jobs.FAILED)
                    yield event
                    if finished:
                        return
        finally:
            if not finished:
                await asyncio.shield(self._abandon(job_id))

    async def _check_alive(self, job_id: str, on_lost: Callable[[], Awaitable[None]] | None = None) -> None:
        """Raise JobLost when the job's record is gone: its payload is what a worker needs, and
        only a lost write (a failover to a replica behind the primary, a restart) removes it while
        the job is open. What is left of it (a waiter count) is dropped."""
        if await self.redis.hexists(keys.job(job_id), "payload"):
            return
        await self.redis.delete(keys.job(job_id), keys.job_events(job_id))
        metrics.JOBS_LOST.inc()
        if on_lost is not None:
            await on_lost()
        log.warning("job %s lost: its record vanished from Redis (failover or restart); the caller "
                    "is told to submit it again", job_id)
        raise errors.JobLost(f"job {job_id} was lost (Redis failed over or restarted without it); "
                             "call again to resubmit", job_id=job_id)

    async def _abandon(self, job_id: str) -> None:
        try:
            waiters = await self.cancel_redis.eval(ABANDON, 2, keys.job(job_id), keys.job_cancel(job_id),
                                                   jobs.EVENTS_TTL_S)
            if waiters is not None and waiters <= 0:
                log.info("job %s cancelled: no caller waits for it", job_id)
        except Exception:  # noqa: BLE001 - Redis down: the worker's deadline check stops it
            log.warning("could not mark job %s cancelled", job_id, exc_info=True)
