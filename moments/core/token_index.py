"""The token cache's names and its per-video index, shared by the workers (who write entries) and the
front end (whose DeleteVideo drops them). Entry layout and the read/write protocol live in
``moments.workers.token_cache``; only naming and the index are here."""

from __future__ import annotations

import redis.asyncio as aioredis

from moments.core import keys


def entry_names(cache_key: str, chunks: int) -> list[str]:
    """Every Redis key of one entry: the manifest, then its chunks."""
    return [keys.token_cache_manifest(cache_key)] + [keys.token_cache_chunk(cache_key, i) for i in range(chunks)]


def index(pipe, video_id: str, cache_key: str, names: list[str], ttl_s: int) -> None:
    """Record (in a pipeline) that ``names`` belong to ``video_id``'s entry ``cache_key``."""
    pipe.sadd(keys.video_token_keys(video_id), *names)
    pipe.sadd(keys.video_token_entries(video_id), cache_key)
    pipe.expire(keys.video_token_keys(video_id), ttl_s)
    pipe.expire(keys.video_token_entries(video_id), ttl_s)


async def drop_video(redis: aioredis.Redis, video_id: str) -> int:
    """Delete every cached visual-token entry of a video; returns how many entries there were."""
    names = [m.decode() for m in await redis.smembers(keys.video_token_keys(video_id))]
    entries = await redis.scard(keys.video_token_entries(video_id))
    async with redis.pipeline(transaction=True) as pipe:
        if names:
            pipe.delete(*names)
        pipe.delete(keys.video_token_keys(video_id), keys.video_token_entries(video_id))
        await pipe.execute()
    return int(entries)


def corrupt_entries(redis_sync) -> list[str]:
    """Token-cache entries (key prefix, without ``:manifest``) whose chunks do not add up to their
    manifest's sha256, scanned with a blocking client: the check of fault drills and the chaos run."""
    import hashlib
    import json

    bad = []
    for name in redis_sync.scan_iter(match=f"{keys.PREFIX}:tok:*:manifest"):
        raw = redis_sync.get(name)
        if raw is None:
            continue  # expired or deleted between SCAN and GET
        manifest = json.loads(raw)
        base = name.decode().removesuffix(":manifest")
        data = b"".join(redis_sync.get(f"{base}:chunk:{i}") or b"" for i in range(manifest["chunks"]))
        if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            bad.append(base)
    return bad
