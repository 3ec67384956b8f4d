"""One job, start to finish: plan -> visual tokens (hot KV prefix, Redis token cache, or decode +
encode) -> prefill -> generate -> parse answers into segments. Heavy steps run in a thread so the
worker's event loop keeps heartbeating.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

import torch
from redis.exceptions import RedisError

from moments.core import keys
from moments.core.blobs import BlobStore
from moments.core.config import Settings
from moments.core.errors import Internal, InvalidArgument
from moments.core.records import (
    KIND_INDEX,
    KIND_LOCALIZE,
    Job,
    JobStats,
    QueryResult,
    SamplingRequest,
    Segment,
    VideoInfo,
)
from moments.media.decode import decode_frames, default_threads
from moments.media.sampling import SamplingOptions, SamplingPlan, plan_sampling, resolve_options
from moments.workers.job_loop import JobContext
from moments.workers.kv_cache import KVPrefixCache
from moments.workers.model.answer_parser import parse_answer
from moments.workers.model.engine import Engine, Generation, VisualTokens
from moments.workers.token_cache import TokenCache, cache_key

log = logging.getLogger(__name__)
DECODE_CHUNK_FRAMES = 32
KV_ADVERT_TTL_S = 600


@dataclass(frozen=True)
class PreparedJob:
    """A job with its video, effective sampling options, plan and token-cache key (computed once)."""

    job: Job
    info: VideoInfo
    options: SamplingOptions
    plan: SamplingPlan
    key: str


def answer_segments(generation: Generation, tokens: VisualTokens, duration_s: float) -> tuple[Segment, ...]:
    """Segments of an answer in video time: the model counts from the first sampled frame (rope id 0)."""
    first = tokens.first_frame_s
    relative = parse_answer(generation.text, max(0.0, duration_s - first), generation.pieces)
    return tuple(Segment(s.start_s + first, s.end_s + first, s.confidence) for s in relative)


def answer_file(engine: Engine, settings: Settings, path, queries, *, info: VideoInfo | None = None,
                sampling: SamplingRequest = SamplingRequest(), tokens_hook=None) -> list[QueryResult]:
    """The worker's steps on a local file, in this process (no Redis): probe, plan (the same
    resolution as a job), decode, encode, generate, parse. For evaluation and tests.

    ``tokens_hook(tokens) -> tokens`` may alter the visual tokens before the answers (tests break
    ``second_per_grid_ts`` with it)."""
    from moments.media.decode import decode_all
    from moments.media.probe import probe_file

    if info is None:
        info = probe_file(path, timeout_s=settings.probe_timeout_s, memory_bytes=settings.probe_memory_bytes)
    options = resolve_options(sampling, settings, engine.sampling_bounds)
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height, options)
    tokens = engine.encode(decode_all(path, plan, info, backend=settings.decode_backend), plan)
    if tokens_hook is not None:
        tokens = tokens_hook(tokens)
    generations = engine.generate(tokens, list(queries), max_new_tokens=settings.max_new_tokens)
    return [QueryResult(i, q, answer_segments(g, tokens, info.duration_s), g.text)
            for i, (q, g) in enumerate(zip(queries, generations))]


class Pipeline:
    """Runs jobs against one engine, with the Redis token cache and the hot KV prefixes."""

    def __init__(self, settings: Settings, engine: Engine, token_cache: TokenCache, kv_cache: KVPrefixCache,
                 blobs: BlobStore, owner: str) -> None:
        self.settings = settings
        self.engine = engine
        self.token_cache = token_cache
        self.kv_cache = kv_cache
        self.blobs = blobs
        self.owner = owner

    def prepare(self, job: Job, info: VideoInfo) -> PreparedJob:
        """The job's effective options (request, server defaults, model bounds) and plan."""
        options = resolve_options(job.sampling, self.settings, self.engine.sampling_bounds)
        try:
            plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height, options)
        except ValueError as exc:  # e.g. a budget too small for the video's frames
            raise InvalidArgument(f"no sampling plan fits the request: {exc}", field="sampling") from exc
        return PreparedJob(job, info, options, plan, cache_key(job.video_id, plan, self.engine.fingerprint))

    async def run(self, work: PreparedJob, ctx: JobContext) -> JobStats:
        job, info, plan, key = work.job, work.info, work.plan, work.key
        stats = JobStats(sampled_fps=plan.fps, frames=plan.frames, visual_tokens=plan.visual_tokens,
                         frame_width=plan.width, frame_height=plan.height, model=self.engine.model_name)
        hot = self.kv_cache.get(key) if job.kind == KIND_LOCALIZE else None
        if hot is not None:
            tokens, prefix = hot
            stats.cache = "kv"
        else:
            tokens, prefix = await self._visual_tokens(work, ctx, stats), None
        if job.kind == KIND_INDEX:
            return stats
        if prefix is None:
            await ctx.check_cancelled()
            await ctx.progress("prefilling", 0, tokens.n_tokens)
            started = time.perf_counter()
            prefix = await asyncio.to_thread(self.engine.prefill, tokens)
            stats.stage_ms["prefill"] = (time.perf_counter() - started) * 1000
            if self.kv_cache.put(key, (tokens, prefix)):
                await self._advertise(key)
        generate_ms = 0.0
        max_new = job.max_new_tokens or self.settings.max_new_tokens
        for index, query in enumerate(job.queries):
            await ctx.check_cancelled()
            await ctx.progress("generating", index, len(job.queries), query)
            started = time.perf_counter()
            [generation] = await asyncio.to_thread(self.engine.generate, tokens, [query], max_new_tokens=max_new,
                                                   prefix=prefix)
            generate_ms += (time.perf_counter() - started) * 1000
            result = QueryResult(index, query, answer_segments(generation, tokens, info.duration_s), generation.text)
            await ctx.result(result)
        stats.stage_ms["generate"] = generate_ms
        return stats

    async def preferred_worker(self, work: PreparedJob) -> str | None:
        """The worker holding this job's KV prefix, if one advertised it (an affinity hint)."""
        if work.job.kind != KIND_LOCALIZE or self.kv_cache.budget_bytes == 0:
            return None
        if self.kv_cache.get(work.key) is not None:
            return self.owner
        owner = await self.token_cache.redis.get(keys.kv_owner(work.key))
        return owner.decode() if owner else None

    async def _advertise(self, key: str) -> None:
        try:
            await self.token_cache.redis.set(keys.kv_owner(key), self.owner, ex=KV_ADVERT_TTL_S)
        except RedisError:
            pass

    async def _visual_tokens(self, work: PreparedJob, ctx: JobContext, stats: JobStats) -> VisualTokens:
        """From the Redis token cache (or from another worker encoding the same key), else decoded and
        encoded here and stored for the next job."""
        plan, key = work.plan, work.key
        lock = self.token_cache.encode_lock(key, self.owner)
        try:
            tokens = await self.token_cache.get(key)
            if tokens is None and not await lock.acquire():
                await ctx.progress("encoding", 0, plan.frames, "waiting for another worker")
                tokens = await self.token_cache.wait_for_other(key)
            if tokens is not None:
                stats.cache = "tokens"
                return tokens
            stats.cache = "miss"
        except RedisError as exc:
            log.warning("token cache unavailable (%s); decoding without it", exc)
            stats.cache = "bypassed"
        try:
            tokens = await self._decode_and_encode(work, ctx, stats, lock)
            if stats.cache == "miss":
                await self.token_cache.put(key, work.job.video_id, tokens)
        except RedisError as exc:
            log.warning("could not store visual tokens (%s)", exc)
            stats.cache = "bypassed"
        finally:
            if stats.cache == "miss":
                await lock.release()
        return tokens

    async def _decode_and_encode(self, work: PreparedJob, ctx: JobContext, stats: JobStats, lock) -> VisualTokens:
        """Decode and encode chunk by chunk: frames are never all in memory at once."""
        plan = work.plan
        parts: list[VisualTokens] = []
        done = 0
        decode_ms = encode_ms = 0.0
        await ctx.progress("decoding", 0, plan.frames)
        with self.blobs.reader(work.job.video_id) as path:
            frames_iter = decode_frames(path, plan, work.info, backend=self.settings.decode_backend,
                                        chunk_frames=DECODE_CHUNK_FRAMES,
                                        threads=self.settings.decode_threads or default_threads())
            while True:
                await ctx.check_cancelled()
                started = time.perf_counter()
                chunk = await asyncio.to_thread(next, frames_iter, None)
                decode_ms += (time.perf_counter() - started) * 1000
                if chunk is None:
                    break
                started = time.perf_counter()
                parts.append(await asyncio.to_thread(self.engine.encode, chunk, _sub_plan(plan, done, len(chunk))))
                encode_ms += (time.perf_counter() - started) * 1000
                done += len(chunk)
                await ctx.progress("encoding", done, plan.frames)
                if stats.cache == "miss":
                    await lock.refresh()
        if done != plan.frames:
            raise Internal(f"decoded {done} frames, planned {plan.frames}")
        stats.stage_ms["decode"] = decode_ms
        stats.stage_ms["encode"] = encode_ms
        return concat_visual_tokens(parts, plan)


def concat_visual_tokens(parts: list[VisualTokens], plan: SamplingPlan) -> VisualTokens:
    """Join chunk encodings: visual tokens are independent per 2-frame group."""
    first = parts[0]
    return VisualTokens(
        embeds=torch.cat([p.embeds for p in parts]) if len(parts) > 1 else first.embeds,
        grid_thw=(plan.grid_t, plan.grid_h, plan.grid_w),
        second_per_grid_ts=plan.second_per_grid_ts,
        frame_times_s=plan.frame_times_s,
        fingerprint=first.fingerprint,
    )


def _sub_plan(plan: SamplingPlan, start: int, count: int) -> SamplingPlan:
    """The part of ``plan`` covering frames [start, start + count) (whole 2-frame groups)."""
    grid_t = count // 2
    return replace(
        plan,
        frame_times_s=plan.frame_times_s[start : start + count],
        grid_t=grid_t,
        visual_tokens=grid_t * plan.grid_h * plan.grid_w // 4,
    )
