"""The visual-token cache in Redis: a repeat question skips decoding and the vision encoder.

An entry is a manifest (JSON: shape, dtype, grid, ``second_per_grid_ts``, frame times, chunk
count, sha256) plus the raw embedding bytes split in chunks. Chunks are written first and the
manifest last, in one transaction, so a reader never sees half an entry; a reader checks the
checksum and shape, and treats a bad entry as a miss and deletes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import json
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import torch

from moments.core import keys, token_index
from moments.core.locks import RedisLock

if TYPE_CHECKING:
    from moments.media.sampling import SamplingPlan
    from moments.workers.model.engine import VisualTokens

log = logging.getLogger(__name__)
LOCK_TTL_S = 30
DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32)}


def cache_key(video_id: str, plan: "SamplingPlan", fingerprint: str) -> str:
    """Key of one (video, sampling plan, encoder) triple."""
    identity = json.dumps(
        {"video": video_id, "plan": asdict(plan), "encoder": fingerprint}, sort_keys=True
    )
    return f"{video_id[:16]}-{hashlib.sha256(identity.encode()).hexdigest()[:32]}"


class TokenCache:
    """Reads and writes visual tokens; every Redis failure degrades to a miss, never an error."""

    def __init__(self, redis: aioredis.Redis, *, ttl_s: int, chunk_bytes: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.chunk_bytes = chunk_bytes

    async def get(self, key: str) -> "VisualTokens | None":
        from moments.workers.model.engine import VisualTokens

        raw = await self.redis.get(keys.token_cache_manifest(key))
        if raw is None:
            await self.redis.incr(keys.TOKEN_CACHE_MISSES)
            return None
        try:
            manifest = json.loads(raw)
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in range(manifest["chunks"]):
                    pipe.get(keys.token_cache_chunk(key, i))
                parts = await pipe.execute()
            if any(p is None for p in parts):
                raise ValueError("missing chunk")
            data = b"".join(parts)
            if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
                raise ValueError("checksum mismatch")
            dtype = DTYPES[manifest["dtype"]]
            shape = tuple(manifest["shape"])
            embeds = torch.frombuffer(bytearray(data), dtype=dtype)
            if embeds.numel() != shape[0] * shape[1]:
                raise ValueError("shape mismatch")
            tokens = VisualTokens(
                embeds=embeds.view(shape),
                grid_thw=tuple(manifest["grid_thw"]),
                second_per_grid_ts=manifest["second_per_grid_ts"],
                frame_times_s=tuple(manifest["frame_times_s"]),
                fingerprint=manifest["fingerprint"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("token cache entry %s is corrupt (%s); deleting it", key, exc)
            await self.delete(key)
            await self.redis.incr(keys.TOKEN_CACHE_MISSES)
            return None
        await self.redis.incr(keys.TOKEN_CACHE_HITS)
        return tokens

    async def put(self, key: str, video_id: str, tokens: "VisualTokens") -> None:
        embeds = tokens.embeds.detach().to("cpu").contiguous()
        data = embeds.view(torch.uint8).numpy().tobytes()
        chunks = [data[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)] or [b""]
        manifest = {
            "shape": list(embeds.shape),
            "dtype": str(embeds.dtype),
            "grid_thw": list(tokens.grid_thw),
            "second_per_grid_ts": tokens.second_per_grid_ts,
            "frame_times_s": list(tokens.frame_times_s),
            "fingerprint": tokens.fingerprint,
            "chunks": len(chunks),
            "sha256": hashlib.sha256(data).hexdigest(),
            "created_s": time.time(),
        }
        names = token_index.entry_names(key, len(chunks))
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, chunk in zip(names[1:], chunks):
                pipe.set(name, chunk, ex=self.ttl_s)
            pipe.set(names[0], json.dumps(manifest), ex=self.ttl_s)
            token_index.index(pipe, video_id, key, names, self.ttl_s)
            await pipe.execute()
        log.info("token cache stored %s: %d tokens, %.1f MiB in %d chunks", key,
                 embeds.shape[0], len(data) / 2**20, len(chunks))

    async def delete(self, key: str) -> None:
        names = [keys.token_cache_manifest(key)]
        async for name in self.redis.scan_iter(match=f"{keys.PREFIX}:tok:{key}:chunk:*", count=1000):
            names.append(name)
        await self.redis.delete(*names)

    def encode_lock(self, key: str, owner: str) -> RedisLock:
        """The lock of the one worker that encodes ``key`` (its token names the worker)."""
        return RedisLock(self.redis, keys.token_cache_lock(key), LOCK_TTL_S,
                         token=f"{owner}:{secrets.token_hex(8)}")

    async def wait_for_other(self, key: str, poll_s: float = 0.2) -> "VisualTokens | None":
        """Wait while another worker holds the lock; its entry, or None if it died without one."""
        while await self.redis.exists(keys.token_cache_lock(key)):
            await asyncio.sleep(poll_s)
        if await self.redis.exists(keys.token_cache_manifest(key)):
            return await self.get(key)
        return None

    async def stats(self) -> dict[str, int]:
        hits, misses = await self.redis.mget(keys.TOKEN_CACHE_HITS, keys.TOKEN_CACHE_MISSES)
        return {"hits": int(hits or 0), "misses": int(misses or 0)}
