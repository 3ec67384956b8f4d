"""The job lease fence and lost-job detection, against a real Redis: a delivery whose lease was
taken by another writes nothing, a finished job is never finished twice, and a caller waiting for
a job whose record vanished (a failover dropped it) gets JOB_LOST within seconds, not a hang."""

from __future__ import annotations

import asyncio
import time

import pytest

from moments.core import errors, jobs, keys
from moments.core.config import Settings
from moments.core.redis_client import connect
from moments.service.submission import JobClient
from moments.workers.fencing import Fence, LeaseLost


async def _fenced_run(url: str) -> None:
    redis = connect(url)
    try:
        await redis.xgroup_create(keys.JOBS_STREAM, keys.JOBS_GROUP, id="0", mkstream=True)
        await redis.hset(keys.job("j1"), mapping={"payload": "{}", "state": jobs.QUEUED})
        entry = await redis.xadd(keys.JOBS_STREAM, {"job_id": "j1"})
        await redis.xreadgroup(keys.JOBS_GROUP, "stale", {keys.JOBS_STREAM: ">"})
        fence = Fence(redis)
        stale = await fence.take("j1", "stale", 1)
        fresh = await fence.take("j1", "fresh", 2)  # the entry was reclaimed past the lease
        with pytest.raises(LeaseLost):
            await fence.emit("j1", stale, {"kind": "result", "data": "{}"})
        assert not await fence.hold("j1", stale, "stale", entry)
        assert not await fence.finish("j1", stale, entry, jobs.DONE, "{}")
        assert not await fence.requeue("j1", stale, entry, "boom")
        assert await redis.xlen(keys.job_events("j1")) == 0, "the stale delivery wrote nothing"
        assert (await redis.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP))["pending"] == 1, "nor acknowledged"
        await fence.emit("j1", fresh, {"kind": "result", "data": "{}"})
        assert await fence.finish("j1", fresh, entry, jobs.DONE, "{}")
        assert not await fence.finish("j1", "", entry, jobs.FAILED, "{}"), "a terminal state is written once"
        assert await redis.hget(keys.job("j1"), "state") == jobs.DONE.encode()
        assert (await redis.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP))["pending"] == 0
        assert [f[b"kind"] for _, f in await redis.xrange(keys.job_events("j1"))] == [b"result", b"done"]
    finally:
        await redis.aclose()


def test_stale_delivery_writes_nothing(redis_url):
    asyncio.run(_fenced_run(redis_url))


async def _lost_job(url: str) -> float:
    redis = connect(url)
    try:
        client = JobClient(Settings.from_env(environ={}, redis_url=url, worker_stale_s=600.0), redis)
        await redis.hset(keys.WORKERS_HASH, "w", time.time())
        await redis.hset(keys.job("lost"), mapping={"payload": "{}", "state": jobs.RUNNING})
        await redis.xadd(keys.job_events("lost"), {"kind": "progress", "data": "{}"})
        started = time.monotonic()

        async def wait():
            async for _ in client.events("lost", time.time() + 120):
                await redis.delete(keys.job("lost"))  # what a failover to a lagging replica does
        with pytest.raises(errors.JobLost) as err:
            await wait()
        assert err.value.job_id == "lost"
        assert not await redis.exists(keys.job("lost")), "no stray waiter count is left behind"
        return time.monotonic() - started
    finally:
        await redis.aclose()


def test_waiting_for_a_vanished_job_raises_job_lost_not_a_hang(redis_url):
    elapsed_s = asyncio.run(_lost_job(redis_url))
    assert elapsed_s < 30, "reported within a few read blocks, far before the 120 s deadline"


async def _rejoin(url: str) -> tuple[str, str, bool, bool]:
    """A call cut while waiting (its front end answered UNAVAILABLE), then its retry."""
    from moments.core.records import Job
    from moments.workers.job_loop import JobContext

    redis = connect(url)
    try:
        client = JobClient(Settings.from_env(environ={}, redis_url=url, worker_stale_s=600.0), redis)
        await redis.hset(keys.WORKERS_HASH, "w", time.time())
        first = await client.submit(Job(kind="localize", video_id="v" * 64, queries=("q",)))
        waiting = client.events(first, time.time() + 60)
        await waiting.__anext__()  # the 'queued' event: this caller waits
        await waiting.aclose()  # ... and goes away: it was the last waiter, the job is marked cancelled
        cancelled = bool(await redis.exists(keys.job_cancel(first)))
        again = await client.submit(Job(kind="localize", video_id="v" * 64, queries=("q",)))
        joined_clears = not await redis.exists(keys.job_cancel(first))
        # The worker's check, when the cancel mark is set again but a caller waits: it runs on.
        await redis.set(keys.job_cancel(first), 1)
        await redis.hincrby(keys.job(first), "waiters", 1)
        job = Job.from_json(await redis.hget(keys.job(first), "payload"))
        await JobContext(redis, job, 1).check_cancelled()
        return first, again, cancelled and joined_clears, not await redis.exists(keys.job_cancel(first))
    finally:
        await redis.aclose()


def test_a_retry_that_joins_its_own_cancelled_job_keeps_it_running(redis_url):
    """Found by the chaos soak: a call cut while waiting cancels its job (no caller left); the
    client's retry joins the same open job, which then failed 'cancelled by the caller' under it
    (ABORTED, not retryable). The join clears the mark, and a worker honours a cancel only while
    nobody waits."""
    first, again, cleared, worker_ran_on = asyncio.run(_rejoin(redis_url))
    assert again == first, "the retry joined the open job"
    assert cleared, "joining cleared the cancel mark the cut call left"
    assert worker_ran_on, "a worker seeing a cancel mark while a caller waits clears it and runs on"


def test_a_worker_outlives_redis_going_away_mid_entry(tmp_path):
    """Found by the chaos soak: after a failover a worker's command met 'The previous master is now
    a slave' past its retries, the error left the job loop and the worker process exited (then every
    call got UNAVAILABLE 'no worker is running'). Now the entry stays pending and the loop runs on."""
    from tests.conftest import RedisServer
    from moments.workers.job_loop import JobLoop

    server = RedisServer(tmp_path / "r")
    server.start()

    async def handle_while_gone() -> JobLoop:
        redis = connect(server.url)
        try:
            loop = JobLoop(Settings.from_env(environ={}, redis_url=server.url), redis, handler=None, name="w")
            server.stop()  # SIGKILL: every command now fails after the client's retries
            slots = asyncio.Semaphore(1)
            await slots.acquire()
            loop._start((b"1-0", {b"job_id": b"j"}), slots)
            await asyncio.gather(*loop._running.values())  # raised ConnectionError before the fix
            assert not slots.locked(), "the lane was given back"
            return loop
        finally:
            await redis.aclose()

    try:
        loop = asyncio.run(handle_while_gone())
        assert loop._fatal is None and not loop._stopping.is_set(), "the worker keeps serving"
    finally:
        server.stop()
