"""The visual-token cache against a real Redis and real encodings of the tiny model."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import torch

from moments.core import keys
from moments.core.blobs import LocalBlobStore
from moments.core.config import Settings
from moments.core.records import Job, SamplingRequest
from moments.tools.synthetic import Event, write_event_video
from tests.conftest import free_port
from moments.workers.model.engine import Engine
from moments.workers.job_loop import JobContext
from moments.workers.kv_cache import KVPrefixCache
from moments.workers.pipeline import Pipeline
from moments.media.sampling import SamplingOptions, plan_sampling
from moments.workers.token_cache import TokenCache, cache_key


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def tokens(engine):
    plan = plan_sampling(8.0, 8.0, 224, 168, SamplingOptions(budget_tokens=512))
    frames = np.random.default_rng(0).integers(0, 255, (plan.frames, plan.height, plan.width, 3), dtype=np.uint8)
    return plan, engine.encode(frames, plan)


@pytest.fixture
def cache(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    return TokenCache(client, ttl_s=60, chunk_bytes=4096)


async def test_round_trip_is_exact_and_chunked(cache, tokens, redis_url):
    plan, vt = tokens
    await cache.put("k1", "a" * 64, vt)
    sync = redis.Redis.from_url(redis_url)
    manifest = json.loads(sync.get(keys.token_cache_manifest("k1")))
    assert manifest["chunks"] == -(-vt.embeds.numel() * vt.embeds.element_size() // 4096)
    assert 0 < sync.ttl(keys.token_cache_manifest("k1")) <= 60
    got = await cache.get("k1")
    assert torch.equal(got.embeds, vt.embeds) and got.embeds.dtype == vt.embeds.dtype
    assert got.grid_thw == vt.grid_thw and got.second_per_grid_ts == vt.second_per_grid_ts
    assert got.frame_times_s == vt.frame_times_s and got.fingerprint == vt.fingerprint
    assert await cache.stats() == {"hits": 1, "misses": 0}


@pytest.mark.parametrize("damage", ["flip", "drop", "truncate"])
async def test_corrupt_entry_is_a_miss_and_is_deleted(cache, tokens, redis_url, damage):
    _, vt = tokens
    await cache.put("k2", "b" * 64, vt)
    sync = redis.Redis.from_url(redis_url)
    chunk = keys.token_cache_chunk("k2", 1)
    if damage == "flip":
        data = bytearray(sync.get(chunk))
        data[10] ^= 0xFF
        sync.set(chunk, bytes(data))
    elif damage == "drop":
        sync.delete(chunk)
    else:
        sync.set(chunk, sync.get(chunk)[:-2])
    assert await cache.get("k2") is None
    assert not sync.exists(keys.token_cache_manifest("k2"))
    assert not list(sync.scan_iter(match=f"{keys.PREFIX}:tok:k2:chunk:*"))
    assert (await cache.stats())["misses"] == 1


def test_key_depends_on_video_plan_and_encoder(tokens):
    plan, _ = tokens
    base = cache_key("a" * 64, plan, "enc1")
    other_plan = plan_sampling(8.0, 8.0, 224, 168, SamplingOptions(budget_tokens=512, start_s=2.0))
    assert base == cache_key("a" * 64, plan, "enc1")
    assert len({base, cache_key("b" * 64, plan, "enc1"), cache_key("a" * 64, plan, "enc2"),
                cache_key("a" * 64, other_plan, "enc1")}) == 4


async def test_second_worker_waits_for_the_first_or_takes_over(cache, tokens):
    _, vt = tokens
    first = cache.encode_lock("k3", "worker-a")
    assert await first.acquire()
    assert not await cache.encode_lock("k3", "worker-b").acquire()

    async def first_worker_finishes():
        await asyncio.sleep(0.3)
        await cache.put("k3", "c" * 64, vt)
        await first.release()

    finisher = asyncio.create_task(first_worker_finishes())
    got = await cache.wait_for_other("k3", poll_s=0.05)
    await finisher
    assert got is not None and torch.equal(got.embeds, vt.embeds)

    dead = cache.encode_lock("k4", "worker-a")
    assert await dead.acquire()
    await cache.redis.delete(keys.token_cache_lock("k4"))  # worker-a died: its lock expired
    assert await cache.wait_for_other("k4", poll_s=0.05) is None
    taker = cache.encode_lock("k4", "worker-b")
    assert await taker.acquire()
    await dead.release()  # the dead holder's late release must not free the new holder's lock
    assert (await taker.holder()) == taker.token


class CountingEngine:
    """The real engine, counting encode calls."""

    def __init__(self, engine):
        self.engine = engine
        self.encode_calls = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def encode(self, *args, **kwargs):
        self.encode_calls += 1
        return self.engine.encode(*args, **kwargs)


def _job_and_info(tmp_path):
    """A job about a real video placed in a local blob store (returned too)."""
    path = write_event_video(tmp_path / "v.mp4", [Event("red", "square", 1, 3)], seconds=6, fps=6)
    import hashlib

    from moments.media.probe import probe_file

    video_id = hashlib.sha256(path.read_bytes()).hexdigest()
    info = probe_file(path, video_id=video_id)
    blobs = LocalBlobStore(tmp_path / "blobs", tmp_path / "uploads")
    blobs.commit_file(path, video_id)
    job = Job(kind="localize", video_id=video_id, queries=("q",), sampling=SamplingRequest())
    return job, info, blobs


async def test_two_workers_same_uncached_video_encode_once(redis_url, engine, tmp_path):
    job, info, blobs = _job_and_info(tmp_path)
    settings = Settings.from_env(environ={}, budget_tokens=512, max_new_tokens=4)
    counting = CountingEngine(engine)
    client = aioredis.Redis.from_url(redis_url)
    pipelines = [Pipeline(settings, counting, TokenCache(client, ttl_s=60, chunk_bytes=1 << 20),
                          KVPrefixCache(0), blobs, owner=name) for name in ("w1", "w2")]
    works = [p.prepare(job, info) for p in pipelines]
    results = await asyncio.gather(*(p.run(w, JobContext(client, job, 1)) for p, w in zip(pipelines, works)))
    assert sorted(r.cache for r in results) == ["miss", "tokens"]
    assert counting.encode_calls == -(-works[0].plan.frames // 32)  # one worker's chunks, not two


async def test_redis_down_still_answers_with_cache_bypassed(redis_url, engine, tmp_path, caplog):
    job, info, blobs = _job_and_info(tmp_path)
    settings = Settings.from_env(environ={}, budget_tokens=512, max_new_tokens=4)
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    events = aioredis.Redis.from_url(redis_url)
    pipeline = Pipeline(settings, engine, TokenCache(dead, ttl_s=60, chunk_bytes=1 << 20),
                        KVPrefixCache(0), blobs, owner="w")
    stats = await asyncio.wait_for(pipeline.run(pipeline.prepare(job, info), JobContext(events, job, 1)), 60)
    assert stats.cache == "bypassed"
    results = [e for e in await events.xrange(keys.job_events(job.job_id)) if e[1][b"kind"] == b"result"]
    assert len(results) == 1
    assert "token cache unavailable" in caplog.text
