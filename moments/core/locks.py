"""One Redis lock: a random token with an expiry, extended and released only by its holder.

Used for an upload's writer, a video's store/delete section and the one worker that encodes an
uncached (video, plan, encoder). Release and refresh are Lua scripts, so a holder whose lock
expired and was taken by someone else can never delete or extend the new holder's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# KEYS: the lock, [a key that must exist to re-take it]. ARGV: token, ttl, retake (0/1).
# Extends our hold; with retake, takes a free lock back (while KEYS[2] exists). 0: someone else holds it.
_REFRESH = """
local v = redis.call('get', KEYS[1])
if v == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end
if v or ARGV[3] == '0' then return 0 end
if KEYS[2] and redis.call('exists', KEYS[2]) == 0 then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


class RedisLock:
    """``name`` held with a random token for ``ttl_s`` seconds at a time."""

    def __init__(self, redis: aioredis.Redis, name: str, ttl_s: float, token: str | None = None) -> None:
        self.redis = redis
        self.name = name
        self.ttl_s = max(1, int(round(ttl_s)))
        self.token = token or secrets.token_hex(16)

    async def acquire(self, *, wait_s: float = 0.0, poll_s: float = 0.02) -> bool:
        """Take the lock, waiting up to ``wait_s`` for its holder to let go; False if not taken."""
        deadline = time.monotonic() + wait_s
        while not await self.redis.set(self.name, self.token, nx=True, ex=self.ttl_s):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def refresh(self, *, retake_while: str | None = None) -> bool:
        """Extend our hold. With ``retake_while`` (a key), a lapsed lock nobody took is taken back
        while that key exists. False when another holder has it."""
        keys = [self.name] + ([retake_while] if retake_while else [])
        return bool(await self.redis.eval(_REFRESH, len(keys), *keys, self.token, self.ttl_s,
                                          1 if retake_while else 0))

    async def release(self) -> None:
        try:
            await self.redis.eval(_RELEASE, 1, self.name, self.token)
        except RedisError:  # it expires by itself; keep the caller's own outcome
            log.warning("could not release lock %s", self.name)

    async def holder(self) -> str | None:
        raw = await self.redis.get(self.name)
        return raw.decode() if raw is not None else None

    @contextlib.asynccontextmanager
    async def held(self, *, wait_s: float = 0.0) -> AsyncIterator[bool]:
        """Yields whether the lock was taken; releases it on exit when it was."""
        taken = await self.acquire(wait_s=wait_s)
        try:
            yield taken
        finally:
            if taken:
                await self.release()
