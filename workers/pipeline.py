"""One job, start to finish: plan -> visual tokens (KV prefix, Redis cache or decode+encode) ->
answers. Heavy steps run in a thread so the worker's event loop keeps heartbeating."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from redis.exceptions import RedisError

from moments import keys
from moments.config import Settings
from moments.records import Job, JobStats, QueryResult, VideoInfo
from workers.decode import decode_frames, default_threads
import torch

from workers.engine import Engine, VisualTokens
from workers.job_loop import JobContext
from workers.kv_cache import KVPrefixCache
from workers.sampling import SamplingOptions, SamplingPlan, plan_sampling
from workers.token_cache import TokenCache, cache_key

log = logging.getLogger(__name__)
DECODE_CHUNK_FRAMES = 32
KV_ADVERT_TTL_S = 600


class Pipeline:
    """Runs jobs against one engine, with the Redis token cache and the hot KV prefixes."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        token_cache: TokenCache,
        kv_cache: KVPrefixCache,
        owner: str,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.token_cache = token_cache
        self.kv_cache = kv_cache
        self.owner = owner

    def plan(self, job: Job, info: VideoInfo) -> SamplingPlan:
        s = job.sampling
        options = SamplingOptions(
            max_fps=s.max_fps or 2.0,
            max_frames=s.max_frames or self.settings.max_frames,
            budget_tokens=s.budget_tokens or self.settings.budget_tokens,
            start_s=s.start_s,
            end_s=s.end_s,
            **self.engine.sampling_bounds,
        )
        return plan_sampling(info.duration_s, info.native_fps, info.width, info.height, options)

    async def run(self, job: Job, info: VideoInfo, ctx: JobContext) -> JobStats:
        plan = self.plan(job, info)
        stats = JobStats(
            sampled_fps=plan.fps,
            frames=plan.frames,
            visual_tokens=plan.visual_tokens,
            frame_width=plan.width,
            frame_height=plan.height,
            model=self.engine.model_name,
        )
        key = cache_key(job.video_id, plan, self.engine.fingerprint)
        prefix = self.kv_cache.get(key) if job.kind == "localize" else None
        if prefix is not None:
            tokens, prefix = prefix
            stats.cache = "kv"
        else:
            tokens = await self._visual_tokens(job, info, plan, key, ctx, stats)
        if job.kind == "index":
            return stats
        if prefix is None:
            await ctx.check_cancelled()
            await ctx.progress("prefilling", 0, tokens.embeds.shape[0])
            started = time.perf_counter()
            prefix = await asyncio.to_thread(self.engine.prefill, tokens)
            stats.stage_ms["prefill"] = (time.perf_counter() - started) * 1000
            if self.kv_cache.put(key, (tokens, prefix)):
                await self._advertise(key)
        generate_ms = 0.0
        for index, query in enumerate(job.queries):
            await ctx.check_cancelled()
            await ctx.progress("generating", index, len(job.queries), query)
            started = time.perf_counter()
            [answer] = await asyncio.to_thread(
                self.engine.answer,
                tokens,
                [query],
                max_new_tokens=job.max_new_tokens or self.settings.max_new_tokens,
                prefix=prefix,
                duration_s=info.duration_s,
            )
            generate_ms += (time.perf_counter() - started) * 1000
            result = QueryResult(index, query, answer.segments, answer.text)
            await ctx.emit("result", result.to_dict())
        stats.stage_ms["generate"] = generate_ms
        return stats

    async def preferred_worker(self, job: Job, info: VideoInfo) -> str | None:
        """The worker holding this job's KV prefix, if one advertised it (an affinity hint)."""
        if job.kind != "localize" or self.kv_cache.budget_bytes == 0:
            return None
        key = cache_key(job.video_id, self.plan(job, info), self.engine.fingerprint)
        if self.kv_cache.get(key) is not None:
            return self.owner
        owner = await self.token_cache.redis.get(keys.kv_owner(key))
        return owner.decode() if owner else None

    async def _advertise(self, key: str) -> None:
        try:
            await self.token_cache.redis.set(keys.kv_owner(key), self.owner, ex=KV_ADVERT_TTL_S)
        except RedisError:
            pass

    async def _visual_tokens(self, job, info, plan, key, ctx, stats) -> VisualTokens:
        try:
            tokens = await self.token_cache.get(key)
            if tokens is None and not await self.token_cache.lock(key, self.owner):
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
            tokens = await self._decode_and_encode(job, info, plan, key, ctx, stats)
            if stats.cache == "miss":
                await self.token_cache.put(key, job.video_id, tokens)
        except RedisError as exc:
            log.warning("could not store visual tokens (%s)", exc)
            stats.cache = "bypassed"
        finally:
            if stats.cache == "miss":
                try:
                    await self.token_cache.unlock(key, self.owner)
                except RedisError:
                    pass
        return tokens

    async def _decode_and_encode(self, job, info, plan, key, ctx, stats) -> VisualTokens:
        """Decode and encode chunk by chunk: frames are never all in memory at once."""
        frames_iter = decode_frames(
            job.blob_path, plan, info, backend=self.settings.decode_backend,
            chunk_frames=DECODE_CHUNK_FRAMES, threads=self.settings.decode_threads or default_threads(),
        )
        parts: list[VisualTokens] = []
        done = 0
        decode_ms = encode_ms = 0.0
        await ctx.progress("decoding", 0, plan.frames)
        while True:
            await ctx.check_cancelled()
            started = time.perf_counter()
            chunk = await asyncio.to_thread(next, frames_iter, None)
            decode_ms += (time.perf_counter() - started) * 1000
            if chunk is None:
                break
            sub_plan = _sub_plan(plan, done, len(chunk))
            started = time.perf_counter()
            parts.append(await asyncio.to_thread(self.engine.encode, chunk, sub_plan))
            encode_ms += (time.perf_counter() - started) * 1000
            done += len(chunk)
            await ctx.progress("encoding", done, plan.frames)
            if stats.cache == "miss":
                await self.token_cache.refresh_lock(key, self.owner)
        if done != plan.frames:
            raise RuntimeError(f"decoded {done} frames, planned {plan.frames}")
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
