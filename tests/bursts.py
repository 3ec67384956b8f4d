"""A burst of waiting calls, some cancelled, and upload streams cut off mid-way (issue 20).

Shared by tests/test_bursts.py (small) and benchmarks/bursts.py (500 calls). Every call asks a
different question (a job each) and stays waiting, the worker's answers being slowed by a fault.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import redis.asyncio as aioredis

from moments.core import jobs, keys
from moments.v1 import moments_pb2 as pb
from moments.v1 import moments_pb2_grpc as pb_grpc

CALLS_PER_CHANNEL = 50
UPLOAD_BYTES = 2 * 1024 * 1024
CHUNK_BYTES = 64 * 1024


@dataclass
class BurstReport:
    calls: int
    cancelled: int
    codes: Counter = field(default_factory=Counter)
    """Status code name of every Localize call's end (OK, CANCELLED by us, DEADLINE_EXCEEDED ...)."""
    details: list[str] = field(default_factory=list)
    """The messages of calls that ended in anything but OK, CANCELLED or DEADLINE_EXCEEDED."""
    marked_s: list[float] = field(default_factory=list)
    """Seconds from cancelling a call to its job being marked cancelled (or finished)."""
    unmarked: int = 0
    """Cancelled calls whose job was neither marked cancelled nor finished within ``mark_wait_s``."""
    peak_open_jobs: int = 0
    redis_clients_idle: int = 0
    """Redis connections before the burst, with one call waiting."""
    redis_clients_peak: int = 0
    """Redis connections with every call of the burst waiting."""
    writer_locks_left: int = 0
    upload_codes: Counter = field(default_factory=Counter)


async def _redis_clients(redis: aioredis.Redis) -> int:
    return int((await redis.info("clients"))["connected_clients"])


async def _writer_locks(redis: aioredis.Redis) -> int:
    return len([k async for k in redis.scan_iter(match=keys.upload_writer("*"))])


async def _follow(stub, index: int, request, timeout_s: float, job_ids: asyncio.Queue,
                  report: BurstReport) -> None:
    call = stub.StreamLocalize(request, timeout=timeout_s)
    known = False
    try:
        first = await call.read()
        known = True
        await job_ids.put((index, first.job_id))
        while await call.read() is not grpc.aio.EOF:
            pass
        report.codes["OK"] += 1
    except asyncio.CancelledError:
        call.cancel()
        report.codes["CANCELLED"] += 1
    except grpc.aio.AioRpcError as exc:
        report.codes[exc.code().name] += 1
        if exc.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            report.details.append(exc.details() or "")
    finally:
        if not known:  # it ended before it was queued
            job_ids.put_nowait((index, ""))


async def _cut_upload(stub, index: int, started: asyncio.Queue, report: BurstReport) -> None:
    """Send a header and one chunk, then hang until cancelled."""
    hold = asyncio.Event()

    async def parts():
        digest = hashlib.sha256(f"burst upload {index}".encode()).hexdigest()
        yield pb.UploadVideoRequest(header=pb.UploadHeader(size_bytes=UPLOAD_BYTES, sha256=digest,
                                                           filename=f"cut-{index}.mp4"))
        yield pb.UploadVideoRequest(chunk=pb.UploadChunk(offset=0, data=os.urandom(CHUNK_BYTES)))
        await started.put(index)
        await hold.wait()

    call = stub.UploadVideo(parts())
    try:
        await call
        report.upload_codes["OK"] += 1
    except asyncio.CancelledError:
        call.cancel()
        report.upload_codes["CANCELLED"] += 1
    except grpc.aio.AioRpcError as exc:
        report.upload_codes[exc.code().name] += 1


async def _marked(redis: aioredis.Redis, job_ids: list[str]) -> list[str]:
    """The jobs of ``job_ids`` marked cancelled or finished, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(keys.job_cancel(job_id)).hget(keys.job(job_id), "state")
        replies = await pipe.execute()
    return [job_id for job_id, cancel, state in zip(job_ids, replies[::2], replies[1::2])
            if cancel or state in (jobs.DONE.encode(), jobs.FAILED.encode())]


async def burst(target: str, redis_url: str, video_id: str, *, calls: int, cancel: int, uploads: int = 0,
                wait_s: float = 8.0, mark_wait_s: float = 5.0) -> BurstReport:
    """``calls`` waiting StreamLocalize calls; once all wait, ``cancel`` of them are cancelled and
    ``uploads`` upload streams (header and one chunk sent) are cut; the rest end at ``wait_s``."""
    report = BurstReport(calls, cancel)
    redis = aioredis.Redis.from_url(redis_url)
    channels = [grpc.aio.insecure_channel(target) for _ in range(-(-max(calls, 1) // CALLS_PER_CHANNEL))]
    stubs = [pb_grpc.MomentsStub(c) for c in channels]
    try:
        report.redis_clients_idle = await _redis_clients(redis)
        job_ids: asyncio.Queue = asyncio.Queue()
        started: asyncio.Queue = asyncio.Queue()
        followers = [asyncio.create_task(_follow(
            stubs[i % len(stubs)], i,
            pb.LocalizeRequest(video_id=video_id, queries=[f"the red square, burst question {i}"]),
            wait_s if i >= cancel else wait_s + 60, job_ids, report)) for i in range(calls)]
        cutters = [asyncio.create_task(_cut_upload(stubs[i % len(stubs)], i, started, report))
                   for i in range(uploads)]
        waiting: dict[int, str] = {}
        for _ in range(calls):
            index, job_id = await asyncio.wait_for(job_ids.get(), wait_s)
            waiting[index] = job_id
        for _ in range(uploads):
            await asyncio.wait_for(started.get(), wait_s)
        report.peak_open_jobs = await redis.zcard(keys.OPEN_JOBS)
        report.redis_clients_peak = await _redis_clients(redis)
        cancelled_at = time.monotonic()
        for task in followers[:cancel] + cutters:  # followers[i] asked question i; cancel the first ones
            task.cancel()
        await asyncio.gather(*followers[:cancel], *cutters, return_exceptions=True)
        pending = {waiting[i] for i in range(cancel) if waiting[i]}
        report.unmarked = cancel - len(pending)  # calls that failed before their job was queued
        while pending and time.monotonic() - cancelled_at < mark_wait_s:
            for job_id in await _marked(redis, list(pending)):
                report.marked_s.append(time.monotonic() - cancelled_at)
                pending.discard(job_id)
            await asyncio.sleep(0.02)
        report.unmarked += len(pending)
        await asyncio.gather(*followers, return_exceptions=True)
        await asyncio.sleep(0.5)  # the front end's finally blocks run
        report.writer_locks_left = await _writer_locks(redis)
    finally:
        for channel in channels:
            await channel.close()
        await redis.aclose()
    return report
