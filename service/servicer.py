"""The Moments gRPC servicer: each RPC decodes the request, calls one domain function, encodes."""

from __future__ import annotations

import time
from typing import AsyncIterator

from moments import errors, jobs
from moments.records import Job, JobStats, QueryResult, SamplingRequest, timestamp_pb
from moments.v1 import moments_pb2 as pb
from moments.v1 import moments_pb2_grpc as pb_grpc
from service import metrics
from service.auth import current_tenant
from service.blobstore import BlobStore
from service.jobs import JobClient
from service.uploads import Chunk, Header, Uploads
from service.videos import VideoCatalog
from moments.config import Settings
from moments.records import STAGES


MIN_BUDGET_TOKENS = 512
"""Four frames at Qwen's minimum frame size fit in this many tokens at any aspect ratio."""


class MomentsServicer(pb_grpc.MomentsServicer):
    def __init__(
        self,
        settings: Settings,
        uploads: Uploads,
        catalog: VideoCatalog,
        job_client: JobClient,
        blobs: BlobStore,
        token_cache_dropper,
    ) -> None:
        self.settings = settings
        self.uploads = uploads
        self.catalog = catalog
        self.jobs = job_client
        self.blobs = blobs
        self.drop_token_cache = token_cache_dropper

    async def UploadVideo(self, request_iterator, context) -> pb.UploadVideoResponse:
        stream = request_iterator.__aiter__()
        first = await anext(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise errors.InvalidArgument("the first message must be a header", field="header")
        h = first.header
        header = Header(h.size_bytes, h.sha256.lower(), h.filename, h.content_type, h.upload_id)

        async def chunks() -> AsyncIterator[Chunk]:
            async for message in stream:
                if message.WhichOneof("part") != "chunk":
                    raise errors.InvalidArgument("only the first message may be a header", field="header")
                yield Chunk(message.chunk.offset, message.chunk.data)

        outcome = await self.uploads.receive(current_tenant.get(), header, chunks())
        return pb.UploadVideoResponse(
            video=outcome.video.to_pb(), deduplicated=outcome.deduplicated, upload_id=outcome.upload_id
        )

    async def GetUpload(self, request, context) -> pb.Upload:
        state, committed = await self.uploads.status(current_tenant.get(), request.upload_id)
        return pb.Upload(
            upload_id=state.upload_id,
            committed_bytes=committed,
            size_bytes=state.size_bytes,
            sha256=state.sha256,
            expire_time=timestamp_pb(state.expire_s),
        )

    async def GetVideo(self, request, context) -> pb.Video:
        return (await self.catalog.get_owned(current_tenant.get(), request.video_id)).to_pb()

    async def ListVideos(self, request, context) -> pb.ListVideosResponse:
        videos, token = await self.catalog.list(
            current_tenant.get(), request.page_size, request.page_token
        )
        return pb.ListVideosResponse(videos=[v.to_pb() for v in videos], next_page_token=token)

    async def DeleteVideo(self, request, context) -> pb.DeleteVideoResponse:
        last_owner = await self.catalog.remove(current_tenant.get(), request.video_id)
        removed = await self.drop_token_cache(request.video_id) if last_owner else 0
        return pb.DeleteVideoResponse(cache_entries_removed=removed)

    async def IndexVideo(self, request, context) -> AsyncIterator[pb.JobEvent]:
        job = await self._job("index", request.video_id, (), request.sampling, 0)
        async for event in self._follow(job, context):
            yield event

    async def Localize(self, request, context) -> pb.LocalizeResponse:
        job = await self._job(
            "localize", request.video_id, tuple(request.queries), request.sampling, request.max_new_tokens
        )
        results: list[QueryResult] = []
        stats = None
        async for event in self._follow(job, context):
            if event.WhichOneof("event") == "result":
                results.append(event.result)
            elif event.WhichOneof("event") == "done":
                stats = event.done
        results.sort(key=lambda r: r.query_index)
        return pb.LocalizeResponse(job_id=job.job_id, results=results, stats=stats)

    async def StreamLocalize(self, request, context) -> AsyncIterator[pb.JobEvent]:
        job = await self._job(
            "localize", request.video_id, tuple(request.queries), request.sampling, request.max_new_tokens
        )
        async for event in self._follow(job, context):
            yield event

    async def _job(self, kind, video_id, queries, sampling_pb, max_new_tokens) -> Job:
        tenant = current_tenant.get()
        _validate_queries(kind, queries, self.settings)
        if max_new_tokens < 0 or max_new_tokens > 1024:
            raise errors.InvalidArgument("max_new_tokens must be in [0, 1024]", field="max_new_tokens")
        sampling = _validate_sampling(SamplingRequest.from_pb(sampling_pb))
        video = await self.catalog.get_owned(tenant, video_id)
        if sampling.start_s is not None and sampling.start_s >= video.duration_s:
            raise errors.InvalidArgument("sampling.start_offset is past the end of the video",
                                         field="sampling.start_offset")
        return Job(
            kind=kind,
            video_id=video_id,
            blob_path=str(self.blobs.path(video_id)),
            queries=queries,
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            tenant=tenant,
        )

    async def _follow(self, job: Job, context) -> AsyncIterator[pb.JobEvent]:
        remaining = context.time_remaining()
        timeout_s = self.settings.job_timeout_s if remaining is None else min(remaining, self.settings.job_timeout_s)
        job_id = await self.jobs.submit(job)
        async for event in self.jobs.events(job_id, time.time() + timeout_s):
            yield _event_pb(job_id, event)


def _validate_queries(kind: str, queries: tuple[str, ...], settings: Settings) -> None:
    if kind == "index":
        return
    if not queries:
        raise errors.InvalidArgument("at least one query is required", field="queries")
    if len(queries) > settings.max_queries:
        raise errors.InvalidArgument(
            f"{len(queries)} queries; at most {settings.max_queries} per request", field="queries"
        )
    for i, query in enumerate(queries):
        if not query.strip():
            raise errors.InvalidArgument("a query is empty", field=f"queries[{i}]")
        if len(query) > settings.max_query_chars:
            raise errors.InvalidArgument(
                f"query of {len(query)} characters; at most {settings.max_query_chars}",
                field=f"queries[{i}]",
            )
        if any(ord(c) < 32 and c not in "\t\n" for c in query):
            raise errors.InvalidArgument("a query contains control characters", field=f"queries[{i}]")


def _validate_sampling(s: SamplingRequest) -> SamplingRequest:
    if s.max_fps < 0 or s.max_fps > 2:
        raise errors.InvalidArgument("sampling.max_fps must be in (0, 2]", field="sampling.max_fps")
    if s.max_frames < 0 or s.max_frames == 1 or s.max_frames > 4096:
        raise errors.InvalidArgument("sampling.max_frames must be in [2, 4096]", field="sampling.max_frames")
    if s.budget_tokens and not MIN_BUDGET_TOKENS <= s.budget_tokens <= 1_000_000:
        raise errors.InvalidArgument(f"sampling.budget_tokens must be 0 (default) or in [{MIN_BUDGET_TOKENS}, 1000000]",
                                     field="sampling.budget_tokens")
    if s.start_s is not None and s.start_s < 0:
        raise errors.InvalidArgument("sampling.start_offset is negative", field="sampling.start_offset")
    if s.start_s is not None and s.end_s is not None and s.end_s <= s.start_s:
        raise errors.InvalidArgument("sampling.end_offset must be after start_offset",
                                     field="sampling.end_offset")
    return s


def _event_pb(job_id: str, event: jobs.Event) -> pb.JobEvent:
    if event.kind == "progress":
        d = event.data
        return pb.JobEvent(
            job_id=job_id,
            progress=pb.Progress(
                stage=STAGES.get(d.get("stage", ""), pb.STAGE_UNSPECIFIED),
                done=int(d.get("done", 0)),
                total=int(d.get("total", 0)),
                message=d.get("message", ""),
            ),
        )
    if event.kind == "result":
        return pb.JobEvent(job_id=job_id, result=QueryResult.from_dict(event.data).to_pb())
    if event.kind == jobs.DONE:
        stats = JobStats.from_dict(event.data)
        metrics.CACHE_EVENTS.labels(stats.cache or "none").inc()
        for stage, ms in stats.stage_ms.items():
            metrics.STAGE_SECONDS.labels(stage).observe(ms / 1000)
        return pb.JobEvent(job_id=job_id, done=stats.to_pb())
    raise errors.JobFailed(f"job {job_id} failed: {event.data.get('reason', 'unknown error')}")
