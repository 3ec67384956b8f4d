"""The worker's job loop: at-least-once delivery over a Redis Streams consumer group.

Order of reads: this consumer's own pending entries (after a restart under the same name), then
entries idle past the lease in other consumers' lists (XAUTOCLAIM: their worker died), then new
entries. A job is acknowledged only after its result (or its final failure) is stored. While a job
runs, its entry's idle time is reset every few seconds (XCLAIM ... JUSTID), so live work is never
stolen. Retries are bounded; the last failure goes to the dead-letter stream.

Each delivery takes the job's lease (a fresh token in the job hash); its events, its hold, its
final state and its XACK are fenced by that token (``moments.workers.fencing``). A worker that was
stopped past the lease and then continues finds another token there: it drops the job without
writing anything, so a job has one result however often it was delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from moments.core import errors, jobs, keys
from moments.core.config import Settings
from moments.core.jobs import Event
from moments.core.records import EVENT_PROGRESS, EVENT_RESULT, Job, JobStats, QueryResult, VideoInfo, progress_data
from moments.workers.fencing import Fence, LeaseLost

log = logging.getLogger(__name__)

CALLER_FAULTS = (errors.InvalidArgument, errors.NotFound, errors.FailedPrecondition)
"""Errors that no retry can fix: the job fails at once with the reason."""


class JobHandler(Protocol):
    """What the loop runs: ``prepare`` (cheap: plan and cache key, once per delivery), an optional
    affinity hint, then ``run``."""

    def prepare(self, job: Job, info: VideoInfo) -> Any: ...

    async def preferred_worker(self, work: Any) -> "str | None":
        """The worker that would serve the job fastest (it holds the job's KV prefix), if any."""

    async def run(self, work: Any, ctx: "JobContext") -> JobStats: ...


class JobCancelled(Exception):
    """The caller went away or the deadline passed; stop the job's remaining work."""


class JobContext:
    """What a running job may do: publish events, check whether it should stop."""

    def __init__(self, redis: aioredis.Redis, job: Job, attempt: int, fence: Fence | None = None,
                 token: str = "") -> None:
        self.redis = redis
        self.job = job
        self.attempt = attempt
        self.fence = fence
        self.token = token
        self.lease_lost = False
        """Set when the hold found another delivery's token: the next check stops the job."""

    async def emit(self, kind: str, data: dict) -> None:
        if self.fence is None:
            await self.redis.xadd(keys.job_events(self.job.job_id), Event(kind, data).to_fields())
            return
        await self.fence.emit(self.job.job_id, self.token, Event(kind, data).to_fields())

    async def progress(self, stage: str, done: int = 0, total: int = 0, message: str = "", round: int = 0) -> None:
        await self.emit(EVENT_PROGRESS, progress_data(stage, done, total, message, round))

    async def result(self, result: QueryResult) -> None:
        await self.emit(EVENT_RESULT, result.to_dict())

    async def check_cancelled(self) -> None:
        if self.lease_lost:
            raise LeaseLost(f"job {self.job.job_id}: another delivery holds the lease")
        if self.job.deadline_s and time.time() > self.job.deadline_s:
            raise JobCancelled("deadline passed")
        if await self.redis.exists(keys.job_cancel(self.job.job_id)):
            waiters = await self.redis.hget(keys.job(self.job.job_id), "waiters")
            if waiters is not None and int(waiters) > 0:  # a caller joined after the last one left
                await self.redis.delete(keys.job_cancel(self.job.job_id))
                return
            raise JobCancelled("cancelled by the caller")


class JobLoop:
    """Consumes jobs one at a time and runs them with ``handler`` (KV-prefix affinity when ``affinity``)."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, handler: JobHandler, name: str, *,
                 affinity: bool = False, concurrency: int = 1) -> None:
        self.settings = settings
        self.redis = redis
        self.handler = handler
        self.name = name
        self.affinity = affinity
        self.concurrency = max(1, concurrency)
        """Jobs run at once (their questions decode in the same steps)."""
        self.handed_over = 0
        self.lease_ms = int(settings.job_lease_s * 1000)
        self._stopping = asyncio.Event()
        self._running: dict[str, asyncio.Task] = {}
        self._fatal: BaseException | None = None
        self.jobs_done = 0
        self.fence = Fence(redis)
        self.fenced_out = 0
        """Deliveries dropped because another one held the job's lease (e.g. after SIGSTOP)."""

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Run until ``stop()``; raises FatalDeviceError (unacknowledged jobs go to others)."""
        await self._ensure_group()
        beat = asyncio.create_task(self._heartbeat())
        slots = asyncio.Semaphore(self.concurrency)
        try:
            await self._drain_own_pending()
            while not self._stopping.is_set():
                await slots.acquire()
                if self._stopping.is_set():
                    slots.release()
                    break
                entry = await self._next_entry()
                if entry is None:
                    slots.release()
                else:
                    self._start(entry, slots)
                    if self.concurrency == 1:
                        await asyncio.gather(*self._running.values())
                if self.affinity and not self._stopping.is_set() and len(self._running) < self.concurrency:
                    await self._drain_own_pending()  # jobs other workers handed to us
            await asyncio.gather(*self._running.values())  # the jobs in hand finish
            if self._fatal is not None:
                raise self._fatal
        finally:
            beat.cancel()
            try:
                await self.redis.hdel(keys.WORKERS_HASH, self.name)
                await self.redis.hdel(keys.WORKERS_BUSY, self.name)
            except Exception:  # noqa: BLE001 - Redis gone; the heartbeat goes stale by itself
                pass

    def _start(self, entry, slots: asyncio.Semaphore) -> None:
        """Run one entry as a task; a fatal device error stops the loop and is raised by :meth:`run`."""
        key = str(entry[0])

        async def run_one():
            try:
                await self._handle(*entry)
            except errors.FatalDeviceError as exc:
                self._fatal = exc
                self.stop()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                # Redis went away for longer than the client's retries (a failover whose sentinels
                # still name the demoted primary): the entry stays pending and is reclaimed after
                # the lease; the worker lives on (the chaos soak saw workers exit here).
                log.warning("Redis unreachable while handling entry %s; it stays pending", entry[0],
                            exc_info=True)
                await asyncio.sleep(1.0)
            finally:
                self._running.pop(key, None)
                slots.release()

        self._running[key] = asyncio.create_task(run_one())

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.JOBS_STREAM, keys.JOBS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.redis.hset(keys.WORKERS_HASH, self.name, time.time())
            except Exception:  # noqa: BLE001 - keep beating once Redis is back
                log.warning("heartbeat failed; Redis unreachable")
            await asyncio.sleep(jobs.HEARTBEAT_INTERVAL_S)

    async def _drain_own_pending(self) -> None:
        reply = await self.redis.xreadgroup(
            keys.JOBS_GROUP, self.name, {keys.JOBS_STREAM: "0"}, count=1000
        )
        for entry_id, fields in reply[0][1] if reply else []:
            if self._stopping.is_set():
                return
            if fields and str(entry_id) not in self._running:  # not a job this worker runs right now
                await self._handle(entry_id, fields)

    async def _next_entry(self):
        try:
            claimed = await self.redis.xautoclaim(
                keys.JOBS_STREAM, keys.JOBS_GROUP, self.name, self.lease_ms, "0-0", count=1
            )
            if claimed[1]:
                entry_id, fields = claimed[1][0]
                log.info("reclaimed entry %s from a silent worker", entry_id)
                return entry_id, fields
            reply = await self.redis.xreadgroup(
                keys.JOBS_GROUP, self.name, {keys.JOBS_STREAM: ">"}, count=1,
                block=250 if self.affinity else 1000,
            )
        except (RedisConnectionError, RedisTimeoutError, OSError):
            log.warning("Redis unreachable; retrying in 1 s")
            await asyncio.sleep(1.0)
            return None
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                await self._ensure_group()
                return None
            raise
        if not reply or not reply[0][1]:
            return None
        return reply[0][1][0]

    async def _handle(self, entry_id, fields) -> None:
        job_id = fields[b"job_id"].decode()
        raw = await self.redis.hgetall(keys.job(job_id))
        if not raw or raw.get(b"state") in (jobs.DONE.encode(), jobs.FAILED.encode()):
            await self._ack(entry_id)
            return
        job = Job.from_json(raw[b"payload"])
        try:
            info_raw = await self.redis.hgetall(keys.video(job.video_id))
            if not info_raw:
                raise errors.NotFound(f"video {job.video_id} was deleted")
            work = self.handler.prepare(job, VideoInfo.from_redis(info_raw))
        except CALLER_FAULTS as exc:
            await self._fail(entry_id, job, str(exc))
            return
        if self.affinity and b"handed_to" not in raw and await self._hand_over(entry_id, job, work):
            return
        attempt = await self.redis.hincrby(keys.job(job_id), "attempts", 1)
        if attempt > self.settings.job_max_attempts:
            reason = raw.get(b"last_error", b"unknown error").decode()
            await self._fail(entry_id, job, f"gave up after {attempt - 1} attempts: {reason}",
                             dead_letter=True)
            return
        started = time.monotonic()
        token = await self.fence.take(job_id, self.name, attempt)
        if len(self._running) >= self.concurrency:  # full: affinity hands it no more jobs
            await self.redis.hset(keys.WORKERS_BUSY, self.name, job_id)
        log.info("job %s running video=%s attempt=%d", job_id, job.video_id, attempt)
        context = JobContext(self.redis, job, attempt, self.fence, token)
        hold = asyncio.create_task(self._hold(entry_id, context))
        try:
            await context.check_cancelled()
            stats = await self.handler.run(work, context)
        except LeaseLost:
            self._fenced(job)
            return
        except JobCancelled as exc:
            await self._fail(entry_id, job, str(exc), token=token)
            return
        except errors.FatalDeviceError:
            log.critical("job %s hit a fatal device error; leaving the group", job_id)
            self.stop()
            raise
        except CALLER_FAULTS as exc:
            await self._fail(entry_id, job, str(exc), token=token)
            return
        except Exception as exc:  # noqa: BLE001 - a model error (or a bug) fails the job, not the worker
            log.exception("job %s attempt %d failed", job_id, attempt)
            await self._retry_or_fail(entry_id, job, attempt, f"{type(exc).__name__}: {exc}", token)
            return
        finally:
            hold.cancel()
            await self.redis.hset(keys.WORKERS_BUSY, self.name, "")  # a lane is free again
        stats.worker = self.name
        stats.attempt = attempt
        stats.stage_ms["total"] = (time.monotonic() - started) * 1000
        stats.stage_ms["queue"] = max(0.0, (time.time() - job.created_s) * 1000 - stats.stage_ms["total"])
        if not await self._finish(entry_id, job, jobs.DONE, stats.__dict__, token=token):
            self._fenced(job)
            return
        self.jobs_done += 1
        log.info("job %s done video=%s in %.0f ms (cache %s)", job_id, job.video_id,
                 stats.stage_ms["total"], stats.cache)

    async def _hand_over(self, entry_id, job: Job, work: Any) -> bool:
        """Give the entry to the idle, live worker holding the job's KV prefix (once per job)."""
        try:
            target = await self.handler.preferred_worker(work)
        except Exception:  # noqa: BLE001 - affinity is a hint; run the job here
            log.warning("affinity lookup failed for job %s", job.job_id, exc_info=True)
            return False
        if not target or target == self.name:
            return False
        beat, busy = await self.redis.hget(keys.WORKERS_HASH, target), await self.redis.hget(keys.WORKERS_BUSY, target)
        if beat is None or time.time() - float(beat) > 2 * jobs.HEARTBEAT_INTERVAL_S or busy:
            return False
        await self.redis.hset(keys.job(job.job_id), "handed_to", target)
        await self.redis.xclaim(keys.JOBS_STREAM, keys.JOBS_GROUP, target, 0, [entry_id], justid=True)
        self.handed_over += 1
        log.info("job %s handed to %s, which holds its KV prefix", job.job_id, target)
        return True

    def _fenced(self, job: Job) -> None:
        self.fenced_out += 1
        log.warning("job %s dropped: another delivery holds its lease (this worker was stopped or "
                    "cut off past the lease); nothing written", job.job_id)

    async def _hold(self, entry_id, context: JobContext) -> None:
        """Reset the entry's idle time so XAUTOCLAIM never takes live work, while this delivery
        holds the lease; once another holds it, mark the context so the job stops."""
        interval_s = max(0.5, self.settings.job_lease_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            try:
                if not await self.fence.hold(context.job.job_id, context.token, self.name, entry_id):
                    context.lease_lost = True
                    return
            except Exception:  # noqa: BLE001
                log.warning("could not refresh the hold on %s", entry_id)

    async def _retry_or_fail(self, entry_id, job: Job, attempt: int, reason: str, token: str) -> None:
        if attempt >= self.settings.job_max_attempts:
            await self.redis.hset(keys.job(job.job_id), "last_error", reason)
            await self._fail(entry_id, job, f"failed {attempt} times: {reason}", dead_letter=True, token=token)
            return
        if not await self.fence.requeue(job.job_id, token, entry_id, reason):
            self._fenced(job)
            return
        log.info("job %s requeued after attempt %d: %s", job.job_id, attempt, reason)

    async def _fail(self, entry_id, job: Job, reason: str, *, dead_letter: bool = False, token: str = "") -> None:
        if not await self._finish(entry_id, job, jobs.FAILED, {"reason": reason}, token=token):
            if token:
                self._fenced(job)
            return
        log.info("job %s failed video=%s: %s", job.job_id, job.video_id, reason)
        if dead_letter:
            await self.redis.xadd(
                keys.DEAD_LETTER_STREAM,
                {"job_id": job.job_id, "video_id": job.video_id, "reason": reason, "time": time.time()},
            )

    async def _finish(self, entry_id, job: Job, state: str, data: dict, *, token: str = "") -> bool:
        """Store the final state and acknowledge, fenced by ``token`` ('' before a lease was taken)."""
        return await self.fence.finish(job.job_id, token, entry_id, state, Event(state, data).to_fields()["data"])

    async def _ack(self, entry_id) -> None:
        await self.redis.xack(keys.JOBS_STREAM, keys.JOBS_GROUP, entry_id)
