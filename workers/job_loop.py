"""The worker's job loop: at-least-once delivery over a Redis Streams consumer group.

Order of reads, each time a lane is free: this consumer's own pending entries that it does not run
yet (handed to it by another worker, or left from a restart under the same name), then the pending
entries of a dead consumer (its heartbeat gone or older than ``jobs.WORKER_DEAD_AFTER_S``: claimed at
once, not after the lease), then entries idle past the lease in any consumer's list (XAUTOCLAIM: a
worker that stopped holding them), then new entries. A job is acknowledged only after its result (or
its final failure) is stored. While a job runs, its entry's idle time is reset every few seconds
(XCLAIM ... JUSTID), so live work is never stolen. Retries are bounded; the last failure goes to the
dead-letter stream.

KV-prefix affinity: a worker that reads a question whose KV prefix another live worker holds hands
the entry to it (XCLAIM into its pending list, plus a note on its wake stream so its blocked read
returns), once per job, unless that worker already has ``HANDOFF_PER_LANE`` x its lanes entries
pending (running or waiting): then the job runs where it was read. Handed jobs run through the
holder's lanes like any other.

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

from moments.core import errors, jobs, keys, webhooks
from moments.core.config import Settings
from moments.core.jobs import Event
from moments.core.records import EVENT_PROGRESS, EVENT_RESULT, Job, JobStats, QueryResult, VideoInfo, progress_data
from moments.workers.fencing import Fence, LeaseLost

log = logging.getLogger(__name__)

CALLER_FAULTS = (errors.InvalidArgument, errors.NotFound, errors.FailedPrecondition)
"""Errors that no retry can fix: the job fails at once with the reason."""
HANDOFF_PER_LANE = 2
"""A worker holding a job's KV prefix is handed it while it has fewer than this many entries pending
per lane; past that the job runs where it was read (a prefill there beats a long wait)."""
CLAIM_MIN_IDLE_MS = 200
"""Claiming a dead consumer's entry needs it idle this long, so of two workers claiming it at once
one wins (the first claim resets the idle time)."""


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
        self.results: dict[int, QueryResult] = {}
        """The answers published so far, by query index (for the job's webhook event)."""

    async def emit(self, kind: str, data: dict) -> None:
        if self.fence is None:
            await self.redis.xadd(keys.job_events(self.job.job_id), Event(kind, data).to_fields())
            return
        await self.fence.emit(self.job.job_id, self.token, Event(kind, data).to_fields())

    async def progress(self, stage: str, done: int = 0, total: int = 0, message: str = "", round: int = 0) -> None:
        await self.emit(EVENT_PROGRESS, progress_data(stage, done, total, message, round))

    async def result(self, result: QueryResult) -> None:
        await self.emit(EVENT_RESULT, result.to_dict())
        self.results[result.query_index] = result

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
        self.kept_local = 0
        """Jobs run here although another worker held their prefix (it had too many pending)."""
        self.claimed_back = 0
        """Entries taken from dead consumers' pending lists."""
        self.wake = keys.worker_wake(name)
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
        await self.redis.hset(keys.WORKER_LANES, self.name, self.concurrency)
        await self.redis.hset(keys.WORKERS_HASH, self.name, time.time())  # alive before it reads
        beat = asyncio.create_task(self._heartbeat())
        slots = asyncio.Semaphore(self.concurrency)
        try:
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
            await asyncio.gather(*self._running.values())  # the jobs in hand finish
            if self._fatal is not None:
                raise self._fatal
        finally:
            beat.cancel()
            try:  # gone: what was handed to it and not started is claimed back by the others at once
                await self.redis.hdel(keys.WORKERS_HASH, self.name)
                await self.redis.hdel(keys.WORKER_LANES, self.name)
                await self.redis.delete(self.wake)
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
        for stream, first in ((keys.JOBS_STREAM, "0"), (self.wake, "$")):
            try:
                await self.redis.xgroup_create(stream, keys.JOBS_GROUP, id=first, mkstream=True)
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

    async def _next_entry(self):
        try:
            entry = await self._own_pending() or await self._claim_from_dead() or await self._claim_idle()
            if entry is not None:
                return entry
            streams = {keys.JOBS_STREAM: ">", self.wake: ">"} if self.affinity else {keys.JOBS_STREAM: ">"}
            reply = await self.redis.xreadgroup(keys.JOBS_GROUP, self.name, streams, count=1, block=1000)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            log.warning("Redis unreachable; retrying in 1 s")
            await asyncio.sleep(1.0)
            return None
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                await self._ensure_group()
                return None
            raise
        found = None
        for stream, entries in reply or []:
            if _text(stream) == self.wake:  # a job was handed to us: the next read takes it
                await self.redis.xack(self.wake, keys.JOBS_GROUP, *[e[0] for e in entries])
            elif entries:
                found = entries[0]
        return found

    async def _own_pending(self):
        """An entry in this consumer's pending list that it does not run yet."""
        reply = await self.redis.xreadgroup(keys.JOBS_GROUP, self.name, {keys.JOBS_STREAM: "0"},
                                            count=len(self._running) + 16)
        for entry_id, fields in reply[0][1] if reply else []:
            if str(entry_id) in self._running:
                continue
            if not fields:  # trimmed or deleted from the stream: nothing to run
                await self._ack(entry_id)
                continue
            return entry_id, fields
        return None

    async def _claim_from_dead(self):
        """One pending entry of a consumer whose heartbeat is gone or stale, claimed for this worker."""
        summary = await self.redis.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP)
        others = [_text(c["name"]) for c in summary.get("consumers") or ()
                  if int(c["pending"]) and _text(c["name"]) != self.name]
        if not others:
            return None
        now = time.time()
        for name, beat in zip(others, await self.redis.hmget(keys.WORKERS_HASH, others)):
            if beat is not None and now - float(beat) < jobs.WORKER_DEAD_AFTER_S:
                continue
            rows = await self.redis.xpending_range(keys.JOBS_STREAM, keys.JOBS_GROUP, "-", "+", 1,
                                                   consumername=name)
            if not rows:
                continue
            for entry_id, fields in await self.redis.xclaim(keys.JOBS_STREAM, keys.JOBS_GROUP, self.name,
                                                             CLAIM_MIN_IDLE_MS, [rows[0]["message_id"]]):
                if not fields:
                    await self._ack(entry_id)
                    continue
                self.claimed_back += 1
                log.info("claimed entry %s back from %s, whose heartbeat is gone", entry_id, name)
                return entry_id, fields
        return None

    async def _claim_idle(self):
        """An entry idle past the lease (its consumer looks alive but stopped holding it)."""
        claimed = await self.redis.xautoclaim(
            keys.JOBS_STREAM, keys.JOBS_GROUP, self.name, self.lease_ms, "0-0", count=1
        )
        if claimed[1]:
            entry_id, fields = claimed[1][0]
            log.info("reclaimed entry %s idle past the lease", entry_id)
            return entry_id, fields
        return None

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
            await self._fail(entry_id, job, str(exc), token=token, webhook_state=webhooks.CANCELLED,
                             results=context.results.values())
            return
        except errors.FatalDeviceError:
            log.critical("job %s hit a fatal device error; leaving the group", job_id)
            self.stop()
            raise
        except CALLER_FAULTS as exc:
            await self._fail(entry_id, job, str(exc), token=token, results=context.results.values())
            return
        except Exception as exc:  # noqa: BLE001 - a model error (or a bug) fails the job, not the worker
            log.exception("job %s attempt %d failed", job_id, attempt)
            await self._retry_or_fail(entry_id, job, attempt, f"{type(exc).__name__}: {exc}", token,
                                      context.results.values())
            return
        finally:
            hold.cancel()
        stats.worker = self.name
        stats.attempt = attempt
        stats.stage_ms["total"] = (time.monotonic() - started) * 1000
        stats.stage_ms["queue"] = max(0.0, (time.time() - job.created_s) * 1000 - stats.stage_ms["total"])
        if not await self._finish(entry_id, job, jobs.DONE, stats.__dict__, token=token,
                                  results=context.results.values()):
            self._fenced(job)
            return
        self.jobs_done += 1
        log.info("job %s done video=%s in %.0f ms (cache %s)", job_id, job.video_id,
                 stats.stage_ms["total"], stats.cache)

    async def _hand_over(self, entry_id, job: Job, work: Any) -> bool:
        """Give the entry to the live worker holding the job's KV prefix, unless that worker has
        ``HANDOFF_PER_LANE`` x its lanes entries pending already (then the job runs here)."""
        try:
            target = await self.handler.preferred_worker(work)
        except Exception:  # noqa: BLE001 - affinity is a hint; run the job here
            log.warning("affinity lookup failed for job %s", job.job_id, exc_info=True)
            return False
        if not target or target == self.name:
            return False
        beat, lanes = await self.redis.hget(keys.WORKERS_HASH, target), await self.redis.hget(keys.WORKER_LANES, target)
        if beat is None or time.time() - float(beat) > jobs.WORKER_DEAD_AFTER_S:
            return False
        limit = HANDOFF_PER_LANE * max(1, int(lanes or 1))
        pending = await self.redis.xpending_range(keys.JOBS_STREAM, keys.JOBS_GROUP, "-", "+", limit,
                                                  consumername=target)
        if len(pending) >= limit:
            self.kept_local += 1
            log.debug("job %s runs here: %s, which holds its KV prefix, has %d pending", job.job_id, target, limit)
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.job(job.job_id), "handed_to", target)
            pipe.xclaim(keys.JOBS_STREAM, keys.JOBS_GROUP, target, 0, [entry_id], justid=True)
            pipe.xadd(keys.worker_wake(target), {"job_id": job.job_id}, maxlen=64, approximate=True)
            await pipe.execute()
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

    async def _retry_or_fail(self, entry_id, job: Job, attempt: int, reason: str, token: str,
                             results=()) -> None:
        if attempt >= self.settings.job_max_attempts:
            await self.redis.hset(keys.job(job.job_id), "last_error", reason)
            await self._fail(entry_id, job, f"failed {attempt} times: {reason}", dead_letter=True, token=token,
                             results=results)
            return
        if not await self.fence.requeue(job.job_id, token, entry_id, reason):
            self._fenced(job)
            return
        log.info("job %s requeued after attempt %d: %s", job.job_id, attempt, reason)

    async def _fail(self, entry_id, job: Job, reason: str, *, dead_letter: bool = False, token: str = "",
                    webhook_state: str = webhooks.FAILED, results=()) -> None:
        if not await self._finish(entry_id, job, jobs.FAILED, {"reason": reason}, token=token,
                                  webhook_state=webhook_state, results=results):
            if token:
                self._fenced(job)
            return
        log.info("job %s failed video=%s: %s", job.job_id, job.video_id, reason)
        if dead_letter:
            await self.redis.xadd(
                keys.DEAD_LETTER_STREAM,
                {"job_id": job.job_id, "video_id": job.video_id, "reason": reason, "time": time.time()},
            )

    async def _finish(self, entry_id, job: Job, state: str, data: dict, *, token: str = "",
                      webhook_state: str = "", results=()) -> bool:
        """Store the final state and acknowledge, fenced by ``token`` ('' before a lease was taken);
        the same write schedules the job's webhook event (``webhook_state``, default ``state``)."""
        hook = None
        if job.callback_url:
            body = webhooks.event_body(job, webhook_state or state, reason=data.get("reason", ""),
                                       results=results, stats=data if state == jobs.DONE else None)
            hook = webhooks.delivery_fields(job, body)
        return await self.fence.finish(job.job_id, token, entry_id, state, Event(state, data).to_fields()["data"],
                                       webhook=hook)

    async def _ack(self, entry_id) -> None:
        await self.redis.xack(keys.JOBS_STREAM, keys.JOBS_GROUP, entry_id)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
