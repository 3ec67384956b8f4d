"""Resumable, verified uploads into the blob store, and ingest from a source URI."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from moments.core import errors, keys
from moments.core.blobs import SHA256_RE, BlobStore, Staging, check_upload_id
from moments.core.config import Settings
from moments.core.locks import RedisLock
from moments.core.records import IngestRequest, UploadChunk, UploadHeader, VideoInfo
from moments.media.probe import SNIFF_BYTES, probe_file_async, sniff_format
from moments.service import metrics
from moments.service.catalog import VideoCatalog
from moments.service.ingest import Source, open_source, unavailable

log = logging.getLogger(__name__)
MAX_CHUNK_BYTES = 1024 * 1024
LOCK_TTL_S = 10
"""The writer lock of an upload lasts this long past its holder's last refresh: the stream holding it
refreshes it every third of that (:meth:`UploadService._hold`), so a front end killed mid-upload
keeps its client waiting (UPLOAD_BUSY with a RetryInfo) seconds, not a minute."""
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


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
        self._open_streams: dict[str, int] = {}
        """Upload streams open on this front end, per tenant (each holds a staging file)."""
        self._probes = asyncio.Semaphore(settings.max_probes or os.cpu_count() or 1)
        """Probe children at once: a burst of uploads waits its turn here instead of starving every
        probe of CPU past probe_timeout_s (the chaos soak saw 32 at once fail as INVALID_ARGUMENT)."""

    async def receive(
        self, tenant: str, header: UploadHeader, chunks: AsyncIterator[UploadChunk]
    ) -> UploadOutcome:
        with self._stream_slot(tenant):
            return await self._receive_stream(tenant, header, chunks)

    @contextlib.contextmanager
    def _stream_slot(self, tenant: str):
        """Count one open stream of ``tenant`` against ``max_open_uploads`` (on this front end: the
        files a stream keeps open are this process's)."""
        cap = self.settings.max_open_uploads
        open_now = self._open_streams.get(tenant, 0)
        if cap and open_now >= cap:
            raise errors.ResourceExhausted(f"{open_now} upload streams of this caller are open (limit {cap}); "
                                           "finish or close one", retry_after_s=5.0, quota="open_uploads")
        self._open_streams[tenant] = open_now + 1
        try:
            yield
        finally:
            left = self._open_streams.pop(tenant) - 1
            if left:
                self._open_streams[tenant] = left

    async def _reserve(self, state: UploadState) -> None:
        """Count a new upload's declared bytes against the tenant's ``max_pending_upload_bytes``."""
        cap = self.settings.max_pending_upload_bytes
        name = keys.tenant_pending_uploads(state.tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            _, sizes = await pipe.hset(name, state.upload_id, state.size_bytes).hgetall(name).execute()
        pending = sum(int(v) for v in sizes.values())
        if cap and pending > cap:
            gone = [u for u in sizes if not await self.redis.exists(keys.upload(u.decode()))]
            if gone:  # entries of uploads removed without their index (e.g. a lost write)
                await self.redis.hdel(name, *gone)
                pending -= sum(int(sizes[u]) for u in gone)
        if cap and pending > cap:
            await self.redis.hdel(name, state.upload_id)
            raise errors.ResourceExhausted(
                f"unfinished uploads of this caller would declare {pending} bytes (limit {cap}); finish some "
                "or let them expire", retry_after_s=60.0, quota="pending_upload_bytes")

    async def _forget(self, state: UploadState) -> None:
        """The upload is finished or gone: drop its record, expiry and pending bytes."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.upload(state.upload_id))
            pipe.zrem(keys.UPLOADS_BY_EXPIRY, state.upload_id)
            pipe.hdel(keys.tenant_pending_uploads(state.tenant), state.upload_id)
            await pipe.execute()

    async def _receive_stream(
        self, tenant: str, header: UploadHeader, chunks: AsyncIterator[UploadChunk]
    ) -> UploadOutcome:
        state = await self._start(tenant, header)
        if isinstance(state, UploadOutcome):
            return state
        async with self._hold(state.upload_id) as lock:
            if lock is None:
                left_ms = await self.redis.pttl(keys.upload_writer(state.upload_id))
                raise errors.FailedPrecondition(
                    "another stream is writing this upload; retry when it ends",
                    committed_bytes=None, upload_id=state.upload_id,
                    retry_after_s=min(float(LOCK_TTL_S), max(0.5, left_ms / 1000)),
                )
            try:
                return await self._receive(state, chunks, lock)
            finally:
                # A cut stream gets a full TTL to resume, however long it ran.
                await self._refresh_expiry(state)

    async def _receive(self, state: UploadState, chunks: AsyncIterator[UploadChunk], lock: RedisLock) -> UploadOutcome:
        staging = None
        try:
            staging = await asyncio.to_thread(self.blobs.open_staging, state.upload_id)
            received = staging.durable_bytes
            async for chunk in chunks:
                received = await self._write(state, staging, received, chunk)
                await self._keep_hold(state, lock, staging)
            if received < state.size_bytes:
                committed = await asyncio.to_thread(staging.settle)
                raise errors.FailedPrecondition(
                    f"upload incomplete: {committed} of {state.size_bytes} bytes committed",
                    committed_bytes=committed,
                    upload_id=state.upload_id,
                )
            return await self._finish(state, staging)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            # Nothing half-written stays behind: the client starts over once there is room.
            await self._discard(state, staging)
            log.warning("upload %s dropped: %s", state.upload_id, exc.strerror)
            raise errors.ResourceExhausted("server disk is full", retry_after_s=60.0) from exc
        finally:
            if staging is not None:
                await asyncio.to_thread(staging.close)

    async def status(self, tenant: str, upload_id: str) -> tuple[UploadState, int]:
        state = await self._load(tenant, upload_id)
        return state, await asyncio.to_thread(self.blobs.staged_bytes, upload_id)

    async def expire_abandoned(self) -> int:
        """Remove partial uploads whose expiry passed; returns how many went.

        An upload a stream is writing holds the writer lock and is skipped: its expiry is pushed
        back when the stream ends. The janitor takes the same lock, so no stream can start
        writing a file while it is being removed.
        """
        now = time.time()
        removed = 0
        for raw in await self.redis.zrangebyscore(keys.UPLOADS_BY_EXPIRY, 0, now):
            upload_id = raw.decode()
            async with self._hold(upload_id) as lock:
                if lock is None:
                    log.info("upload %s is past its expiry but a stream is writing it", upload_id)
                    continue
                expire_s = await self.redis.zscore(keys.UPLOADS_BY_EXPIRY, upload_id)
                if expire_s is None or expire_s > now:  # finished or resumed meanwhile
                    continue
                try:
                    await asyncio.to_thread(self.blobs.discard_staging, upload_id)
                except ValueError:  # not an upload id: drop the stray entry
                    pass
                tenant = await self.redis.hget(keys.upload(upload_id), "tenant")
                if tenant is not None:
                    await self.redis.hdel(keys.tenant_pending_uploads(tenant.decode()), upload_id)
                await self.redis.delete(keys.upload(upload_id))
                await self.redis.zrem(keys.UPLOADS_BY_EXPIRY, upload_id)
                removed += 1
                log.info("upload %s expired and was removed", upload_id)
        return removed

    @contextlib.asynccontextmanager
    async def _hold(self, upload_id: str) -> AsyncIterator[RedisLock | None]:
        """The writer lock of an upload: yields it, or None when someone else holds it. While held it
        is refreshed in the background (a probe or a slow disk between chunks keeps it too)."""
        lock = RedisLock(self.redis, keys.upload_writer(upload_id), LOCK_TTL_S)
        async with lock.held() as taken:
            keeper = asyncio.create_task(self._keep_lock(lock)) if taken else None
            try:
                yield lock if taken else None
            finally:
                if keeper is not None:
                    keeper.cancel()

    @staticmethod
    async def _keep_lock(lock: RedisLock) -> None:
        while True:
            await asyncio.sleep(LOCK_TTL_S / 3)
            try:
                if not await lock.refresh():
                    return  # taken over: the stream's own check (_keep_hold) stops it
            except RedisError:
                log.warning("could not refresh the writer lock %s", lock.name)

    async def _keep_hold(self, state: UploadState, lock: RedisLock, staging: Staging) -> None:
        # A lapsed hold nobody took is taken back, while the upload still exists (the janitor may
        # have removed it meanwhile).
        if not await lock.refresh(retake_while=keys.upload(state.upload_id)):  # the stream stalled past the lock and the upload expired or was taken over
            raise errors.FailedPrecondition(
                "the upload expired or another stream took it over while this one was idle",
                committed_bytes=await asyncio.to_thread(staging.settle), upload_id=state.upload_id,
            )

    async def _refresh_expiry(self, state: UploadState) -> None:
        try:
            if await self.redis.zscore(keys.UPLOADS_BY_EXPIRY, state.upload_id) is None:
                return  # finished or discarded
            state.expire_s = time.time() + self.settings.upload_ttl_s
            await self._save(state)
        except RedisError:  # the expiry set at the start still stands
            log.warning("could not push back the expiry of upload %s", state.upload_id)

    async def _start(self, tenant: str, header: UploadHeader) -> UploadState | UploadOutcome:
        if header.upload_id:
            state = await self._load(tenant, header.upload_id)
            if (header.sha256 and header.sha256 != state.sha256) or (
                header.size_bytes and header.size_bytes != state.size_bytes
            ):
                raise errors.InvalidArgument(
                    f"upload {header.upload_id} is of other bytes (sha256/size differ)",
                    field="header.upload_id",
                )
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
            return await self._start(tenant, UploadHeader(0, "", "", "", upload_id))
        state = UploadState(
            upload_id=upload_id,
            tenant=tenant,
            size_bytes=header.size_bytes,
            sha256=header.sha256,
            filename=header.filename[:255],
            content_type=header.content_type[:100],
            expire_s=time.time() + self.settings.upload_ttl_s,
        )
        await self._reserve(state)
        await self._save(state)
        return state

    async def _write(self, state: UploadState, staging: Staging, received: int, chunk: UploadChunk) -> int:
        if chunk.offset != received:
            committed = await asyncio.to_thread(staging.settle)
            raise errors.FailedPrecondition(
                f"chunk offset {chunk.offset} != committed offset {committed}",
                committed_bytes=committed,
                upload_id=state.upload_id,
            )
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise errors.InvalidArgument(
                f"chunk of {len(chunk.data)} bytes exceeds {MAX_CHUNK_BYTES}", field="chunk.data"
            )
        if received + len(chunk.data) > state.size_bytes:
            raise errors.InvalidArgument(
                f"data beyond the declared size of {state.size_bytes} bytes", field="chunk.data"
            )
        await asyncio.to_thread(staging.append, chunk.data)
        metrics.UPLOAD_BYTES.inc(len(chunk.data))
        return received + len(chunk.data)

    async def _finish(self, state: UploadState, staging: Staging) -> UploadOutcome:
        digest = await asyncio.to_thread(staging.finish)
        if digest != state.sha256:
            await self._discard(state, staging)
            raise errors.InvalidArgument(
                f"sha256 of the received bytes is {digest}, not {state.sha256}",
                field="header.sha256",
            )
        return await self._probe_and_commit(state, staging)

    async def _probe_and_commit(self, state: UploadState, staging: Staging) -> UploadOutcome:
        """Probe the verified bytes (discarding them if they are no video), then store them."""
        started = time.monotonic()
        try:
            async with self._probes:
                info = await probe_file_async(
                    await asyncio.to_thread(staging.probe_target),
                    video_id=state.sha256,
                    size_bytes=state.size_bytes,
                    filename=state.filename,
                    timeout_s=self.settings.probe_timeout_s,
                    memory_bytes=self.settings.probe_memory_bytes,
                    max_duration_s=self.settings.max_duration_s,
                    max_pixels=self.settings.max_pixels_per_frame,
                )
        except errors.InvalidVideo:
            await self._discard(state, staging)
            raise
        probed = time.monotonic()
        async with self.catalog.exclusive(state.sha256):
            await asyncio.to_thread(self.blobs.commit, staging, state.sha256)
            video = await self.catalog.add(state.tenant, replace(info, content_type=state.content_type))
        await self._forget(state)
        log.info("upload %s stored video %s (%d bytes; probe %.2f s, commit %.2f s)", state.upload_id, state.sha256,
                 state.size_bytes, probed - started, time.monotonic() - probed)
        return UploadOutcome(video, False, state.upload_id)

    async def ingest(self, tenant: str, request: IngestRequest) -> UploadOutcome:
        """Fetch a video from a source URI (``moments.service.ingest`` has the rules), verify,
        sniff, probe and store it like an upload. Nothing stays behind when it fails."""
        if request.sha256:
            if not SHA256_RE.match(request.sha256):
                raise errors.InvalidArgument("sha256 must be 64 lower-case hex characters", field="sha256")
            existing = await self.catalog.get_owned(tenant, request.sha256, missing_ok=True)
            if existing is not None and await asyncio.to_thread(self.blobs.exists, request.sha256):
                return UploadOutcome(existing, True, "")
        if request.size_bytes < 0:
            raise errors.InvalidArgument("size_bytes must not be negative (0 = unknown)", field="size_bytes")
        if request.size_bytes > self.settings.max_upload_bytes:
            raise errors.InvalidArgument(f"size_bytes {request.size_bytes} exceeds the limit of "
                                         f"{self.settings.max_upload_bytes}", field="size_bytes")
        deadline = time.monotonic() + self.settings.ingest_timeout_s
        source = await asyncio.to_thread(open_source, request.source_uri, self.settings)
        # Registered like an upload, so the janitor removes what a front end that dies leaves.
        state = UploadState(upload_id=secrets.token_hex(16), tenant=tenant, size_bytes=source.size_bytes or 0,
                            sha256="", filename=(request.filename or source.filename)[:255], content_type="",
                            expire_s=time.time() + self.settings.upload_ttl_s)
        staging: Staging | None = None
        try:
            await self._save(state)
            async with self._hold(state.upload_id) as lock:
                staging = await asyncio.to_thread(self.blobs.open_staging, state.upload_id)
                received = await self._copy_in(request, source, staging, lock, deadline)
                digest = await asyncio.to_thread(staging.finish)
                if request.sha256 and digest != request.sha256:
                    raise errors.InvalidArgument(f"the source's sha256 is {digest}, not {request.sha256}",
                                                 field="sha256")
                state.sha256, state.size_bytes = digest, received
                existing = await self.catalog.get_owned(tenant, digest, missing_ok=True)
                if existing is not None and await asyncio.to_thread(self.blobs.exists, digest):
                    await self._discard(state, staging)
                    return UploadOutcome(existing, True, "")
                return await self._probe_and_commit(state, staging)
        except BaseException:
            try:
                await asyncio.shield(self._discard(state, staging))
            except Exception:  # noqa: BLE001 - the store or Redis is down: the janitor removes it later
                log.warning("ingest %s: could not discard what was staged", state.upload_id, exc_info=True)
            raise
        finally:
            if staging is not None:
                await asyncio.to_thread(staging.close)
            await asyncio.to_thread(source.close)

    async def _copy_in(self, request: IngestRequest, source: Source, staging: Staging, lock: RedisLock,
                       deadline: float) -> int:
        """Stream the source into the staging: size-capped, sniffed at the start, within the deadline."""
        limit = self.settings.max_upload_bytes
        received, head, refreshed = 0, b"", time.monotonic()
        reading = _read_next(source)
        try:
            while (block := await reading) is not None:
                reading = _read_next(source)  # the next block arrives while this one is hashed and stored
                received += len(block)
                if received > limit:
                    raise errors.InvalidArgument(f"the source is larger than the limit of {limit} bytes",
                                                 field="source_uri")
                if len(head) < SNIFF_BYTES:
                    head += block[:SNIFF_BYTES - len(head)]
                    if len(head) >= SNIFF_BYTES:
                        sniff_format(head)  # refuse a web page or a playlist before fetching the rest
                await asyncio.to_thread(staging.append, block)
                if time.monotonic() > deadline:
                    raise unavailable(request.source_uri, f"took longer than {self.settings.ingest_timeout_s:g} s")
                if time.monotonic() - refreshed > LOCK_TTL_S / 4:
                    await lock.refresh()
                    refreshed = time.monotonic()
        finally:
            if not reading.done():  # closing the source ends the read; nobody waits for it
                reading.add_done_callback(lambda f: f.cancelled() or f.exception())
        sniff_format(head)
        declared = request.size_bytes or source.size_bytes
        if declared and received != declared:
            raise unavailable(request.source_uri, f"got {received} bytes, expected {declared}")
        metrics.UPLOAD_BYTES.inc(received)
        return received

    async def _discard(self, state: UploadState, staging: Staging | None) -> None:
        if staging is not None:
            await asyncio.to_thread(staging.discard)
        else:
            await asyncio.to_thread(self.blobs.discard_staging, state.upload_id)
        await self._forget(state)

    async def _load(self, tenant: str, upload_id: str) -> UploadState:
        try:
            check_upload_id(upload_id)
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


def _read_next(source: Source) -> asyncio.Future:
    """The source's next block (None at the end), read in a thread."""
    return asyncio.ensure_future(asyncio.to_thread(next, source.chunks, None))
