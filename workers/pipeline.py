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
from moments.core.jobs import WORKER_DEAD_AFTER_S
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
    SearchRequest,
    VideoInfo,
)
from moments.media.decode import decode_frames, default_threads
from moments.media.sampling import SamplingOptions, SamplingPlan, plan_sampling, resolve_options
from moments.workers.job_loop import JobContext
from moments.workers.kv_cache import KVPrefixCache
from moments.workers import search
from moments.workers.search import add_ms
from moments.workers.model.engine import Engine, VisualTokens
from moments.workers.token_cache import TokenCache, cache_key

log = logging.getLogger(__name__)
DECODE_CHUNK_FRAMES = 32
KV_ADVERT_TTL_S = 600

# KEYS: the prefix's owner key, the heartbeats. ARGV: this worker, ttl, now (unix s), dead after (s).
# A live other owner keeps the advert: this copy was made because that one had too many jobs.
_ADVERTISE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then
  local beat = redis.call('HGET', KEYS[2], owner)
  if beat and tonumber(ARGV[3]) - tonumber(beat) < tonumber(ARGV[4]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

# KEYS: the prefix's owner key. ARGV: this worker. Only the owner's own advert goes.
_WITHDRAW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class PreparedJob:
    """A job with its video, effective sampling options, plan and token-cache key (computed once)."""

    job: Job
    info: VideoInfo
    options: SamplingOptions
    plan: SamplingPlan
    key: str


def answer_file(engine: Engine, settings: Settings, path, queries, *, info: VideoInfo | None = None,
                sampling: SamplingRequest = SamplingRequest(), search_request: SearchRequest = SearchRequest(),
                tokens_hook=None, min_confidence: float = 0.0, stats: JobStats | None = None) -> list[QueryResult]:
    """The worker's steps on a local file, in this process (no Redis, no caches): probe, plan (the same
    resolution as a job), the same search, decode, encode, prefill, generate, parse. For evaluation and
    tests; ``stats`` (if given) collects passes, tokens and stage times.

    ``tokens_hook(tokens) -> tokens`` may alter each pass's visual tokens (tests break
    ``second_per_grid_ts`` with it)."""
    from moments.media.decode import decode_all
    from moments.media.probe import probe_file

    if info is None:
        info = probe_file(path, timeout_s=settings.probe_timeout_s, memory_bytes=settings.probe_memory_bytes)
    options = resolve_options(sampling, settings, engine.sampling_bounds)
    stats = stats if stats is not None else JobStats()

    async def view(window: search.Window):
        started = time.perf_counter()
        frames = decode_all(path, window.plan, info, backend=settings.decode_backend)
        add_ms(stats, "decode", started)
        started = time.perf_counter()
        tokens = engine.encode(frames, window.plan)
        add_ms(stats, "encode", started)
        if tokens_hook is not None:
            tokens = tokens_hook(tokens)
        started = time.perf_counter()
        prefix = engine.prefill(tokens)
        add_ms(stats, "prefill", started)
        return tokens, prefix

    searcher = search.Searcher(engine, view, stats, max_new_tokens=settings.max_new_tokens)
    return asyncio.run(searcher.answer(info, options, list(queries), search_request.with_defaults(settings),
                                       min_confidence or settings.min_confidence))


class Pipeline:
    """Runs jobs against one engine, with the Redis token cache and the hot KV prefixes: one pass per
    window a search looks at (one pass in all for a video the model sees densely enough)."""

    def __init__(self, settings: Settings, engine: Engine, token_cache: TokenCache, kv_cache: KVPrefixCache,
                 blobs: BlobStore, owner: str) -> None:
        self.settings = settings
        self.engine = engine
        self.token_cache = token_cache
        self.kv_cache = kv_cache
        self.blobs = blobs
        self.owner = owner
        self._advertise_script = token_cache.redis.register_script(_ADVERTISE)
        self._withdraw_script = token_cache.redis.register_script(_WITHDRAW)

    def prepare(self, job: Job, info: VideoInfo) -> PreparedJob:
        """The job's effective options (request, server defaults, model bounds) and its first plan."""
        options = resolve_options(job.sampling, self.settings, self.engine.sampling_bounds)
        try:
            plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height, options)
        except ValueError as exc:  # e.g. a budget too small for the video's frames
            raise InvalidArgument(f"no sampling plan fits the request: {exc}", field="sampling") from exc
        return PreparedJob(job, info, options, plan, cache_key(job.video_id, plan, self.engine.fingerprint))

    async def run(self, work: PreparedJob, ctx: JobContext) -> JobStats:
        job, plan = work.job, work.plan
        stats = JobStats(sampled_fps=plan.fps, frames=plan.frames, visual_tokens=plan.visual_tokens,
                         frame_width=plan.width, frame_height=plan.height, model=self.engine.model_name,
                         weights=self.engine.quantization,
                         effective_sampling=_request_fields(work.options), rounds=1)
        coarse = search.coarse_windows(work.info, work.options, job.search)
        if job.kind == KIND_INDEX:  # warm what the questions' coarse passes will read
            overview = search.overview_window(work.info, work.options, coarse)
            passes = coarse + ([overview] if overview is not None else [])
            for i, window in enumerate(passes):
                await ctx.check_cancelled()
                if len(passes) > 1:
                    await ctx.progress("searching", i, len(passes), "indexing windows", round=1)
                stats.passes += 1
                stats.total_visual_tokens += window.plan.visual_tokens
                await self._tokens(work, window, ctx, stats)
            return stats
        searcher = search.Searcher(self.engine, lambda window: self._prefix(work, window, ctx, stats), stats,
                                   max_new_tokens=job.max_new_tokens or self.settings.max_new_tokens,
                                   progress=ctx.progress, check=ctx.check_cancelled)
        results = await searcher.answer(work.info, work.options, list(job.queries), job.search,
                                        job.min_confidence or self.settings.min_confidence, coarse)
        for result in results:
            await ctx.result(result)
        return stats

    async def _prefix(self, work: PreparedJob, window: search.Window, ctx: JobContext, stats: JobStats):
        """The window's visual tokens and hot prefix: from the KV cache, else tokens (Redis or decode +
        encode) and a prefill kept hot for the next question."""
        key = cache_key(work.job.video_id, window.plan, self.engine.fingerprint)
        hot = self.kv_cache.get(key)
        if hot is not None:
            _outcome(stats, "kv")
            return hot
        tokens = await self._tokens(work, window, ctx, stats, key=key)
        await ctx.check_cancelled()
        await ctx.progress("prefilling", 0, tokens.n_tokens)
        started = time.perf_counter()
        prefix = await asyncio.to_thread(self.engine.prefill, tokens)
        add_ms(stats, "prefill", started)
        if self.kv_cache.put(key, (tokens, prefix)):
            await self._advertise(key)
        for evicted in self.kv_cache.take_evicted():
            await self._withdraw(evicted)
        return tokens, prefix

    async def preferred_worker(self, work: PreparedJob) -> str | None:
        """The worker holding this job's (first) KV prefix, if one advertised it (an affinity hint)."""
        if work.job.kind != KIND_LOCALIZE or self.kv_cache.budget_bytes == 0:
            return None
        if self.kv_cache.get(work.key) is not None:
            return self.owner
        owner = await self.token_cache.redis.get(keys.kv_owner(work.key))
        return owner.decode() if owner else None

    async def _advertise(self, key: str) -> None:
        """Name this worker as the prefix's holder, unless another live worker holds it too."""
        try:
            await self._advertise_script(keys=[keys.kv_owner(key), keys.WORKERS_HASH],
                                         args=[self.owner, KV_ADVERT_TTL_S, time.time(), WORKER_DEAD_AFTER_S])
        except RedisError:
            pass

    async def _withdraw(self, key: str) -> None:
        try:
            await self._withdraw_script(keys=[keys.kv_owner(key)], args=[self.owner])
        except RedisError:
            pass

    async def _tokens(self, work: PreparedJob, window: search.Window, ctx: JobContext, stats: JobStats, *,
                      key: str | None = None) -> VisualTokens:
        """From the Redis token cache (or from another worker encoding the same key), else decoded and
        encoded here and stored for the next job."""
        plan = window.plan
        key = key or cache_key(work.job.video_id, plan, self.engine.fingerprint)
        lock = self.token_cache.encode_lock(key, self.owner)
        outcome = "miss"
        try:
            tokens = await self.token_cache.get(key)
            if tokens is None and not await lock.acquire():
                await ctx.progress("encoding", 0, plan.frames, "waiting for another worker")
                tokens = await self.token_cache.wait_for_other(key)
            if tokens is not None:
                _outcome(stats, "tokens")
                return tokens
        except RedisError as exc:
            log.warning("token cache unavailable (%s); decoding without it", exc)
            outcome = "bypassed"
        _outcome(stats, outcome)
        try:
            tokens = await self._decode_and_encode(work, plan, ctx, stats, lock if outcome == "miss" else None)
            if outcome == "miss":
                await self.token_cache.put(key, work.job.video_id, tokens)
        except RedisError as exc:
            log.warning("could not store visual tokens (%s)", exc)
            _outcome(stats, "bypassed")
        finally:
            if outcome == "miss":
                await lock.release()
        return tokens

    async def _decode_and_encode(self, work: PreparedJob, plan: SamplingPlan, ctx: JobContext, stats: JobStats,
                                 lock) -> VisualTokens:
        """Decode and encode chunk by chunk: frames are never all in memory at once."""
        parts: list[VisualTokens] = []
        done = 0
        await ctx.progress("decoding", 0, plan.frames)
        with self.blobs.reader(work.job.video_id) as path:
            frames_iter = decode_frames(path, plan, work.info, backend=self.settings.decode_backend,
                                        chunk_frames=DECODE_CHUNK_FRAMES,
                                        threads=self.settings.decode_threads or default_threads())
            while True:
                await ctx.check_cancelled()
                started = time.perf_counter()
                chunk = await asyncio.to_thread(next, frames_iter, None)
                add_ms(stats, "decode", started)
                if chunk is None:
                    break
                started = time.perf_counter()
                parts.append(await asyncio.to_thread(self.engine.encode, chunk, _sub_plan(plan, done, len(chunk))))
                add_ms(stats, "encode", started)
                done += len(chunk)
                await ctx.progress("encoding", done, plan.frames)
                if lock is not None:
                    await lock.refresh()
        if done != plan.frames:
            raise Internal(f"decoded {done} frames, planned {plan.frames}")
        return concat_visual_tokens(parts, plan)


_OUTCOME_ORDER = ("kv", "tokens", "miss", "bypassed")
"""A job's cache outcome is the least cached of its passes'."""


def _outcome(stats: JobStats, outcome: str) -> None:
    if not stats.cache or _OUTCOME_ORDER.index(outcome) > _OUTCOME_ORDER.index(stats.cache):
        stats.cache = outcome


def _request_fields(options: SamplingOptions) -> dict:
    """Effective options as ``SamplingRequest`` fields (what JobStats.effective_sampling shows)."""
    return {"max_fps": options.max_fps, "max_frames": options.max_frames, "budget_tokens": options.budget_tokens,
            "start_s": options.start_s, "end_s": options.end_s}


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
