"""One reader of job event streams per front end, shared by every waiting call (issue 20).

A waiting Localize used to hold a pooled Redis connection in its own blocking XREAD, so a burst of
waiting calls larger than the pool failed with "Too many connections", and their cancellations with
them. Here one task runs one blocking XREAD over the event streams of every waiter, on a connection
of its own, and hands each entry to the waiters of its stream: any number of waiting calls cost one
connection. A waiter whose stream the running read does not name wakes it with an entry on the
reader's own wake stream, so its stream is read at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from moments.core import keys

log = logging.getLogger(__name__)
BLOCK_MS = 1000
RETRY_S = 0.5
WAKE_TTL_S = 3600

Entry = tuple[bytes, dict[bytes, bytes]]


def _order(entry_id: str | bytes) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class _Waiter:
    def __init__(self, last_id: str) -> None:
        self.last = _order(last_id)
        self.queue: asyncio.Queue[Entry] = asyncio.Queue()


class EventReader:
    """Follows any number of streams with one blocking XREAD on ``redis`` (a client of its own)."""

    def __init__(self, redis: aioredis.Redis, *, block_ms: int = BLOCK_MS) -> None:
        self.redis = redis
        self.block_ms = block_ms
        self.wake_key = keys.event_reader_wake(secrets.token_hex(8))
        self._waiters: dict[str, set[_Waiter]] = {}
        self._cursors: dict[str, str] = {}
        self._woken = False
        self._task: asyncio.Task | None = None

    @property
    def streams_followed(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def follow(self, stream: str, last_id: str = "0-0") -> AsyncIterator[asyncio.Queue[Entry]]:
        """A queue of the stream's entries after ``last_id``, in order, while the block runs."""
        waiter = _Waiter(last_id)
        self._waiters.setdefault(stream, set()).add(waiter)
        cursor = self._cursors.get(stream)
        if cursor is None or _order(last_id) < _order(cursor):
            self._cursors[stream] = last_id
        try:
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._run())
            else:
                await self._wake()
            yield waiter.queue
        finally:
            followers = self._waiters.get(stream, set())
            followers.discard(waiter)
            if not followers:
                self._waiters.pop(stream, None)
                self._cursors.pop(stream, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError):
                await self._task
        with contextlib.suppress(RedisError):
            await self.redis.delete(self.wake_key)

    async def _wake(self) -> None:
        if self._woken:
            return  # the read in flight is already told to start over
        self._woken = True
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                await pipe.xadd(self.wake_key, {"w": "1"}, maxlen=16).expire(self.wake_key, WAKE_TTL_S).execute()
        except RedisError:
            self._woken = False  # the stream is read within one block anyway
            log.warning("could not wake the event reader")

    async def _run(self) -> None:
        wake_id = None
        while self._waiters:
            try:
                if wake_id is None:  # read wakes that come after this one
                    wake_id = (await self.redis.xadd(self.wake_key, {"w": "1"}, maxlen=16)).decode()
                    await self.redis.expire(self.wake_key, WAKE_TTL_S)
                self._woken = False
                sent = dict(self._cursors)
                reply = await self.redis.xread({self.wake_key: wake_id, **sent}, block=self.block_ms)
            except asyncio.CancelledError:
                raise
            except RedisError as exc:  # waiters check Redis themselves when nothing arrives
                log.warning("event reader: %s; reading again in %.1f s", exc, RETRY_S)
                await asyncio.sleep(RETRY_S)
                continue
            for raw_stream, entries in reply or ():
                stream = raw_stream.decode()
                if stream == self.wake_key:
                    wake_id = entries[-1][0].decode()
                    continue
                self._deliver(stream, entries, sent.get(stream))
        self._task = None

    def _deliver(self, stream: str, entries: list[Entry], sent_cursor: str | None) -> None:
        followers = self._waiters.get(stream)
        if not followers:
            return
        if self._cursors.get(stream) == sent_cursor:  # else a waiter joined meanwhile from further back
            self._cursors[stream] = entries[-1][0].decode()
        for waiter in followers:
            for entry_id, fields in entries:
                order = _order(entry_id)
                if order > waiter.last:
                    waiter.last = order
                    waiter.queue.put_nowait((entry_id, fields))
