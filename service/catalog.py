"""The video catalog: probed facts per blob, ownership per tenant, paging, deletion."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from moments.core import errors, keys, token_index
from moments.core.blobs import SHA256_RE, BlobStore
from moments.core.locks import RedisLock
from moments.core.records import VideoInfo

log = logging.getLogger(__name__)
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
VIDEO_LOCK_TTL_S = 30
VIDEO_LOCK_WAIT_S = 10.0
TOKEN_TAG_BYTES = 16
VIEWS_TTL_S = 7 * 24 * 3600
"""A tenant's record of what it asked about lives as long as the token cache's default TTL."""
DELETED_STREAM_LEN = 10_000


class VideoCatalog:
    """Videos are stored once per content and owned by every tenant that uploaded them."""

    def __init__(self, redis: aioredis.Redis, blobs: BlobStore) -> None:
        self.redis = redis
        self.blobs = blobs
        self._token_secret: bytes | None = None

    @contextlib.asynccontextmanager
    async def exclusive(self, video_id: str) -> AsyncIterator[None]:
        """Hold the video's lock. An upload places the blob and adds its owner under it, and the
        last owner's delete removes record and blob under it, so a delete can never take the blob
        from under another tenant's upload of the same bytes that was just told it is stored."""
        lock = RedisLock(self.redis, keys.video_lock(video_id), VIDEO_LOCK_TTL_S)
        async with lock.held(wait_s=VIDEO_LOCK_WAIT_S) as taken:
            if not taken:
                raise errors.Unavailable(f"video {video_id} is being stored or deleted; retry")
            keeper = asyncio.create_task(_keep(lock))  # a large copy inside an object store takes a while
            try:
                yield
            finally:
                keeper.cancel()

    async def add(self, tenant: str, info: VideoInfo) -> VideoInfo:
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            for field, value in info.to_redis().items():
                pipe.hsetnx(keys.video(info.video_id), field, value)
            for field, value in info.owner_redis().items():  # this owner's first upload names it
                pipe.hsetnx(keys.owned_video(tenant, info.video_id), field, value)
            pipe.zadd(keys.VIDEO_INDEX, {info.video_id: now}, nx=True)
            pipe.zadd(keys.tenant_videos(tenant), {info.video_id: now}, nx=True)
            pipe.sadd(keys.video_owners(info.video_id), tenant)
            await pipe.execute()
        return await self.get_owned(tenant, info.video_id)

    async def get_owned(
        self, tenant: str, video_id: str, *, missing_ok: bool = False
    ) -> VideoInfo | None:
        if not SHA256_RE.match(video_id):
            raise errors.InvalidArgument("video_id must be a lower-case hex sha256", field="video_id")
        created = await self.redis.zscore(keys.tenant_videos(tenant), video_id)
        raw = owner = None
        if created is not None:
            async with self.redis.pipeline(transaction=False) as pipe:
                raw, owner = await pipe.hgetall(keys.video(video_id)).hgetall(
                    keys.owned_video(tenant, video_id)).execute()
        if not raw:
            if missing_ok:
                return None
            raise errors.NotFound(f"video {video_id} not found")
        return VideoInfo.from_redis(raw, owner, created)

    async def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[VideoInfo], str]:
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        start = await self._read_token(tenant, page_token) if page_token else 0
        ids = await self.redis.zrevrange(keys.tenant_videos(tenant), start, start + size)
        videos = []
        for raw_id in ids[:size]:
            video = await self.get_owned(tenant, raw_id.decode(), missing_ok=True)
            if video is not None:
                videos.append(video)
        token = await self._make_token(tenant, start + size) if len(ids) > size else ""
        return videos, token

    async def owned_ids(self, tenant: str, most: int) -> list[str]:
        """Ids of up to ``most`` of the tenant's videos, newest first."""
        return [raw.decode() for raw in await self.redis.zrevrange(keys.tenant_videos(tenant), 0, most - 1)]

    async def _secret(self) -> bytes:
        """The key page tokens are signed with: one random secret in Redis, shared by every front end."""
        if self._token_secret is None:
            await self.redis.set(keys.PAGE_TOKEN_SECRET, secrets.token_bytes(32), nx=True)
            self._token_secret = await self.redis.get(keys.PAGE_TOKEN_SECRET)
        return self._token_secret

    def _tag(self, secret: bytes, tenant: str, body: bytes) -> bytes:
        return hmac.new(secret, tenant.encode() + b"\0" + body, hashlib.sha256).digest()[:TOKEN_TAG_BYTES]

    async def _make_token(self, tenant: str, offset: int) -> str:
        """An opaque page token: the offset, signed for this tenant (another's token is refused)."""
        body = offset.to_bytes(8, "big")
        return base64.urlsafe_b64encode(body + self._tag(await self._secret(), tenant, body)).decode().rstrip("=")

    async def _read_token(self, tenant: str, token: str) -> int:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            raw = b""
        body, tag = raw[:8], raw[8:]
        if len(raw) != 8 + TOKEN_TAG_BYTES or not hmac.compare_digest(tag, self._tag(await self._secret(), tenant, body)):
            raise errors.InvalidArgument("page_token was not made by this server for this caller (or has expired)",
                                         field="page_token")
        return int.from_bytes(body, "big")

    async def first_view(self, tenant: str, video_id: str, view: str) -> bool:
        """Record that ``tenant`` asked about ``view`` of the video; True the first time it does."""
        async with self.redis.pipeline(transaction=True) as pipe:
            added, _ = await pipe.sadd(keys.tenant_views(tenant, video_id), view).expire(
                keys.tenant_views(tenant, video_id), VIEWS_TTL_S).execute()
        return bool(added)

    async def remove(self, tenant: str, video_id: str) -> int:
        """Drop the tenant's ownership; returns how many cached views of the video the tenant had
        asked about (the same whether or not others own it). When no owner remains, the record, the
        blob and the cached visual tokens go too, and every worker is told to drop its KV prefixes."""
        await self.get_owned(tenant, video_id)
        async with self.exclusive(video_id):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.scard(keys.tenant_views(tenant, video_id))
                pipe.delete(keys.tenant_views(tenant, video_id))
                pipe.zrem(keys.tenant_videos(tenant), video_id)
                pipe.delete(keys.owned_video(tenant, video_id))
                pipe.srem(keys.video_owners(video_id), tenant)
                pipe.scard(keys.video_owners(video_id))
                views, *_, remaining = await pipe.execute()
            if remaining:
                return int(views)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.video(video_id), keys.video_owners(video_id))
                pipe.zrem(keys.VIDEO_INDEX, video_id)
                await pipe.execute()
            await asyncio.to_thread(self.blobs.delete, video_id)
            await token_index.drop_video(self.redis, video_id)
            await self.redis.xadd(keys.VIDEOS_DELETED, {"video_id": video_id}, maxlen=DELETED_STREAM_LEN,
                                  approximate=True)
        return int(views)


async def _keep(lock: RedisLock) -> None:
    while True:
        await asyncio.sleep(lock.ttl_s / 3)
        try:
            await lock.refresh()
        except RedisError:
            log.warning("could not extend lock %s", lock.name)
