"""The Moments gRPC servicer: each RPC decodes the request, calls one domain function, encodes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextlib import aclosing
from dataclasses import replace
from typing import AsyncIterator

from moments.core import errors, jobs
from moments.core.config import Settings
from moments.core.library import LibrarySearch
from moments.core.records import (
    KIND_INDEX,
    KIND_LOCALIZE,
    IngestRequest,
    Job,
    JobStats,
    UploadChunk,
    UploadHeader,
    event_pb,
    timestamp_pb,
)
from moments.service import metrics, webhooks
from moments.service.auth import current_tenant
from moments.service.catalog import VideoCatalog
from moments.service.library import LibrarySearcher
from moments.service.submission import JobClient
from moments.service.uploads import Uploads
from moments.v1 import moments_pb2 as pb
from moments.v1 import moments_pb2_grpc as pb_grpc


HITS = ("tokens", "kv")


class MomentsServicer(pb_grpc.MomentsServicer):
    def __init__(self, settings: Settings, uploads: Uploads, catalog: VideoCatalog, job_client: JobClient,
                 hooks: webhooks.Webhooks) -> None:
        self.settings = settings
        self.uploads = uploads
        self.catalog = catalog
        self.jobs = job_client
        self.hooks = hooks
        self.library = LibrarySearcher(settings, catalog, job_client)

    async def UploadVideo(self, request_iterator, context) -> pb.UploadVideoResponse:
        stream = request_iterator.__aiter__()
        first = await anext(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise errors.InvalidArgument("the first message must be a header", field="header")

        async def chunks() -> AsyncIterator[UploadChunk]:
            async for message in stream:
                if message.WhichOneof("part") != "chunk":
                    raise errors.InvalidArgument("only the first message may be a header", field="header")
                yield UploadChunk.from_pb(message.chunk)

        outcome = await self.uploads.receive(current_tenant.get(), UploadHeader.from_pb(first.header), chunks())
        return pb.UploadVideoResponse(
            video=outcome.video.to_pb(), deduplicated=outcome.deduplicated, upload_id=outcome.upload_id
        )

    async def IngestVideo(self, request, context) -> pb.UploadVideoResponse:
        outcome = await self.uploads.ingest(current_tenant.get(), IngestRequest.from_pb(request))
        return pb.UploadVideoResponse(
            video=outcome.video.to_pb(), deduplicated=outcome.deduplicated, upload_id=outcome.upload_id
        )

    async def GetUpload(self, request, context) -> pb.Upload:
        state, committed = await self.uploads.status(current_tenant.get(), request.upload_id)
        return pb.Upload(upload_id=state.upload_id, committed_bytes=committed, size_bytes=state.size_bytes,
                         sha256=state.sha256, expire_time=timestamp_pb(state.expire_s))

    async def GetVideo(self, request, context) -> pb.Video:
        return (await self.catalog.get_owned(current_tenant.get(), request.video_id)).to_pb()

    async def ListVideos(self, request, context) -> pb.ListVideosResponse:
        videos, token = await self.catalog.list(current_tenant.get(), request.page_size, request.page_token)
        return pb.ListVideosResponse(videos=[v.to_pb() for v in videos], next_page_token=token)

    async def DeleteVideo(self, request, context) -> pb.DeleteVideoResponse:
        removed = await self.catalog.remove(current_tenant.get(), request.video_id)
        return pb.DeleteVideoResponse(cache_entries_removed=removed)

    async def IndexVideo(self, request, context) -> AsyncIterator[pb.JobEvent]:
        async with aclosing(self._run(KIND_INDEX, request, context)) as events:
            async for event in events:
                yield event

    async def Localize(self, request, context) -> pb.LocalizeResponse:
        results: list[pb.QueryResult] = []
        stats, job_id = None, ""
        async with aclosing(self._run(KIND_LOCALIZE, request, context)) as events:
            async for event in events:
                job_id = event.job_id
                if event.WhichOneof("event") == "result":
                    results.append(event.result)
                elif event.WhichOneof("event") == "done":
                    stats = event.done
        results.sort(key=lambda r: r.query_index)
        return pb.LocalizeResponse(job_id=job_id, results=results, stats=stats)

    async def StreamLocalize(self, request, context) -> AsyncIterator[pb.JobEvent]:
        async with aclosing(self._run(KIND_LOCALIZE, request, context)) as events:
            async for event in events:
                yield event

    async def SearchVideos(self, request, context) -> AsyncIterator[pb.SearchVideosEvent]:
        tenant = current_tenant.get()
        search = LibrarySearch.from_pb(request, tenant=tenant, settings=self.settings)
        async for event in self.library.search(tenant, search, time.time() + self._timeout_s(context)):
            yield event.to_pb()

    def _timeout_s(self, context) -> float:
        """The call's deadline, cut to the server's job timeout (the timeout when it sets none)."""
        remaining = context.time_remaining()
        return self.settings.job_timeout_s if remaining is None else min(remaining, self.settings.job_timeout_s)

    async def _run(self, kind: str, request, context) -> AsyncIterator[pb.JobEvent]:
        """Validate, submit (or join the identical open job), then stream its events until it ends."""
        job = Job.from_request(kind, request, tenant=current_tenant.get(), settings=self.settings)
        await webhooks.check_callback(job, self.settings)
        job.check_video(await self.catalog.get_owned(job.tenant, job.video_id))
        timeout_s = self._timeout_s(context)
        job_id = await self.jobs.submit(job)
        # Closed at once however this call ends, so a caller that leaves cancels its job now: also
        # when gRPC cancels the call while this generator waits at a yield (it never resumes then).
        events = self.jobs.events(job_id, time.time() + timeout_s,
                                  on_lost=lambda: self.hooks.job_lost(replace(job, job_id=job_id)))
        context.add_done_callback(lambda _: _close_soon(events))
        async with aclosing(events):
            async for event in events:
                message = event_pb(job_id, event.kind, event.data)
                if message is None:
                    raise errors.JobFailed(f"job {job_id} failed: {event.data.get('reason', 'unknown error')}",
                                           job_id=job_id)
                if event.kind == jobs.DONE:
                    stats = JobStats.from_dict(event.data)
                    _observe(stats)  # operators see the true outcome
                    if await self.catalog.first_view(job.tenant, job.video_id, job.view) and stats.cache in HITS:
                        # As this tenant would have seen it alone: another tenant's work is not shown.
                        message = pb.JobEvent(job_id=job_id, done=replace(stats, cache="miss").to_pb())
                yield message


_closing: set[asyncio.Task] = set()


def _close_soon(generator) -> None:
    async def close() -> None:
        with contextlib.suppress(RuntimeError):  # running: it is ending (its cancellation) by itself
            await generator.aclose()

    task = asyncio.get_running_loop().create_task(close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _observe(stats: JobStats) -> None:
    metrics.CACHE_EVENTS.labels(stats.cache or "none").inc()
    for stage, ms in stats.stage_ms.items():
        metrics.STAGE_SECONDS.labels(stage).observe(ms / 1000)
