"""Resumable, verified uploads into the blob store."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import redis.asyncio as aioredis

from moments import errors, keys
from moments.config import Settings
from moments.probe import probe_file_async
from moments.records import VideoInfo
from service import metrics
from service.blobstore import SHA256_RE, BlobStore
from service.videos import VideoCatalog

log = logging.getLogger(__name__)
MAX_CHUNK_BYTES = 1024 * 1024
LOCK_TTL_S = 60


@dataclass
class UploadState:
    upload_id: str
    tenant: str
    size_bytes: int
    sha256: str
    filename: str
    content_type: str
    expire_s: float

    def to_redis(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_redis(cls, h: dict[bytes, bytes]) -> "UploadState":
        d = {k.decode(): v.decode() for k, v in h.items()}
        return cls(
            upload_id=d["upload_id"],
            tenant=d["tenant"],
            size_bytes=int(d["size_bytes"]),
            sha256=d["sha256"],
            filename=d["filename"],
            content_type=d["content_type"],
            expire_s=float(d["expire_s"]),
        )


@dataclass(frozen=True)
class Header:
    size_bytes: int
    sha256: str
    filename: str
    content_type: str
    upload_id: str


@dataclass(frozen=True)
class Chunk:
    offset: int
    data: bytes


@dataclass(frozen=True)
class UploadOutcome:
    video: VideoInfo | None
    deduplicated: bool
    upload_id: str


class Uploads:
    """Receives upload streams: validates, writes, verifies, probes and stores videos."""

    def __init__(
        self, settings: Settings, redis: aioredis.Redis, blobs: BlobStore, catalog: VideoCatalog
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.blobs = blobs
        self.catalog = catalog

    async def receive(
        self, tenant: str, header: Header, chunks: AsyncIterator[Chunk]
    ) -> UploadOutcome:
        state = await self._start(tenant, header)
        if isinstance(state, UploadOutcome):
            return state
        lock = keys.upload(state.upload_id) + ":writer"
        if not await self.redis.set(lock, 1, nx=True, ex=LOCK_TTL_S):
            raise errors.FailedPrecondition(
                "another stream is writing this upload; retry when it ends",
                committed_bytes=None, upload_id=state.upload_id,
            )
        try:
            return await self._receive(state, chunks, lock)
        finally:
            await self.redis.delete(lock)

    async def _receive(self, state: UploadState, chunks: AsyncIterator[Chunk], lock: str) -> UploadOutcome:
        part = self.blobs.part_path(state.upload_id)
        hasher = hashlib.sha256()
        committed = await asyncio.to_thread(_rehash, part, hasher)
        try:
            with open(part, "ab") as f:
                async for chunk in chunks:
                    committed = await self._write(state, f, hasher, committed, chunk)
                    await self.redis.expire(lock, LOCK_TTL_S)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                await self._discard(state)
                raise errors.ResourceExhausted("server disk is full", retry_after_s=60.0) from exc
            raise
        if committed < state.size_bytes:
            raise errors.FailedPrecondition(
                f"upload incomplete: {committed} of {state.size_bytes} bytes committed",
                committed_bytes=committed,
                upload_id=state.upload_id,
            )
        return await self._finish(state, part, hasher.hexdigest())

    async def status(self, tenant: str, upload_id: str) -> tuple[UploadState, int]:
        state = await self._load(tenant, upload_id)
        part = self.blobs.part_path(upload_id)
        return state, part.stat().st_size if part.exists() else 0

    async def expire_abandoned(self) -> int:
        """Remove partial uploads whose expiry passed; returns how many went."""
        now = time.time()
        expired = await self.redis.zrangebyscore(keys.UPLOADS_BY_EXPIRY, 0, now)
        for raw in expired:
            upload_id = raw.decode()
            self.blobs.part_path(upload_id).unlink(missing_ok=True)
            await self.redis.delete(keys.upload(upload_id))
            await self.redis.zrem(keys.UPLOADS_BY_EXPIRY, upload_id)
            log.info("upload %s expired and was removed", upload_id)
        return len(expired)

    async def _start(self, tenant: str, header: Header) -> UploadState | UploadOutcome:
        if header.upload_id:
            state = await self._load(tenant, header.upload_id)
            state.expire_s = time.time() + self.settings.upload_ttl_s
            await self._save(state)
            return state
        if not SHA256_RE.match(header.sha256):
            raise errors.InvalidArgument(
                "sha256 must be 64 lower-case hex characters", field="header.sha256"
            )
        if header.size_bytes <= 0:
            raise errors.InvalidArgument("size_bytes must be positive", field="header.size_bytes")
        if header.size_bytes > self.settings.max_upload_bytes:
            raise errors.InvalidArgument(
                f"size_bytes {header.size_bytes} exceeds the limit of "
                f"{self.settings.max_upload_bytes}",
                field="header.size_bytes",
            )
        # Only the tenant that already owns these bytes skips sending them: anyone else must
        # prove it has them, so a video id says nothing about what other tenants uploaded.
        existing = await self.catalog.get_owned(tenant, header.sha256, missing_ok=True)
        if existing is not None and self.blobs.exists(header.sha256):
            return UploadOutcome(existing, True, "")
        # The id is derived from (tenant, bytes): a client that lost its upload id after a cut
        # stream resumes by sending the same header again.
        upload_id = hashlib.sha256(f"{tenant}\0{header.sha256}\0{header.size_bytes}".encode()).hexdigest()[:32]
        if await self.redis.exists(keys.upload(upload_id)):
            return await self._start(tenant, Header(0, "", "", "", upload_id))
        state = UploadState(
            upload_id=upload_id,
            tenant=tenant,
            size_bytes=header.size_bytes,
            sha256=header.sha256,
            filename=header.filename[:255],
            content_type=header.content_type[:100],
            expire_s=time.time() + self.settings.upload_ttl_s,
        )
        await self._save(state)
        return state

    async def _write(self, state, f, hasher, committed: int, chunk: Chunk) -> int:
        if chunk.offset != committed:
            raise errors.FailedPrecondition(
                f"chunk offset {chunk.offset} != committed offset {committed}",
                committed_bytes=committed,
                upload_id=state.upload_id,
            )
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise errors.InvalidArgument(
                f"chunk of {len(chunk.data)} bytes exceeds {MAX_CHUNK_BYTES}", field="chunk.data"
            )
        if committed + len(chunk.data) > state.size_bytes:
            raise errors.InvalidArgument(
                f"data beyond the declared size of {state.size_bytes} bytes", field="chunk.data"
            )
        await asyncio.to_thread(_append, f, chunk.data)
        hasher.update(chunk.data)
        metrics.UPLOAD_BYTES.inc(len(chunk.data))
        return committed + len(chunk.data)

    async def _finish(self, state: UploadState, part: Path, digest: str) -> UploadOutcome:
        if digest != state.sha256:
            await self._discard(state)
            raise errors.InvalidArgument(
                f"sha256 of the received bytes is {digest}, not {state.sha256}",
                field="header.sha256",
            )
        try:
            info = await probe_file_async(
                part,
                video_id=state.sha256,
                size_bytes=state.size_bytes,
                filename=state.filename,
                timeout_s=self.settings.probe_timeout_s,
                memory_bytes=self.settings.probe_memory_bytes,
                max_duration_s=self.settings.max_duration_s,
                max_pixels=self.settings.max_pixels_per_frame,
            )
        except errors.InvalidVideo:
            await self._discard(state)
            raise
        await asyncio.to_thread(self.blobs.commit, part, state.sha256)
        video = await self.catalog.add(state.tenant, info)
        await self.redis.delete(keys.upload(state.upload_id))
        await self.redis.zrem(keys.UPLOADS_BY_EXPIRY, state.upload_id)
        log.info("upload %s stored video %s (%d bytes)", state.upload_id, state.sha256, state.size_bytes)
        return UploadOutcome(video, False, state.upload_id)

    async def _discard(self, state: UploadState) -> None:
        self.blobs.part_path(state.upload_id).unlink(missing_ok=True)
        await self.redis.delete(keys.upload(state.upload_id))
        await self.redis.zrem(keys.UPLOADS_BY_EXPIRY, state.upload_id)

    async def _load(self, tenant: str, upload_id: str) -> UploadState:
        try:
            self.blobs.part_path(upload_id)
        except ValueError:
            raise errors.InvalidArgument("malformed upload_id", field="upload_id") from None
        raw = await self.redis.hgetall(keys.upload(upload_id))
        if not raw:
            raise errors.NotFound(f"upload {upload_id} not found (finished, expired or never started)")
        state = UploadState.from_redis(raw)
        if state.tenant != tenant:
            raise errors.NotFound(f"upload {upload_id} not found (finished, expired or never started)")
        return state

    async def _save(self, state: UploadState) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.upload(state.upload_id), mapping=state.to_redis())
            pipe.zadd(keys.UPLOADS_BY_EXPIRY, {state.upload_id: state.expire_s})
            await pipe.execute()


def _append(f, data: bytes) -> None:
    f.write(data)
    f.flush()


def _rehash(part: Path, hasher) -> int:
    """Feed an existing partial file into ``hasher`` (on resume); returns its size."""
    if not part.exists():
        part.touch()
        return 0
    size = 0
    with open(part, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            hasher.update(block)
            size += len(block)
    return size
