"""Fenced writes of a running job: only the current lease holder may publish, hold or finish it.

A worker takes a job's lease by writing a fresh token into the job hash (field ``lease``) when it
starts a delivery. Every later write of that delivery (an event, the hold on the stream entry, the
final state with its XACK, a requeue) runs as one Lua script that first compares the hash's token
with its own and does nothing when they differ. So a worker that was stopped past its lease (its
entry reclaimed, the job rerun by another) and then continues cannot add a second result, steal
the entry back or acknowledge someone else's delivery; a terminal state is never written twice.
The scripts run atomically on the primary, and are replicated whole, so a failover keeps either
all of one write or none of it.
"""

from __future__ import annotations

import secrets
import time

import redis.asyncio as aioredis

from moments.core import jobs, keys, webhooks


class LeaseLost(Exception):
    """Another delivery holds the job now (or the job is finished, or its record is gone)."""


_EMIT = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], '*', 'kind', ARGV[2], 'data', ARGV[3])
return 1
"""

_HOLD = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'JUSTID')
return 1
"""

# KEYS: job hash, job events, open jobs, jobs stream, webhook delivery, webhooks due. ARGV: token
# ('' = the delivery took no lease yet), state, outcome json, ttl, job id, group, entry id, then the
# webhook's url ('' = none), tenant, body, due ms, ttl: scheduled only by the write that wins.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' or state == 'failed' then
  redis.call('XACK', KEYS[4], ARGV[6], ARGV[7])
  return 0
end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'outcome', ARGV[3])
redis.call('XADD', KEYS[2], '*', 'kind', ARGV[2], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[5])
local dedupe = redis.call('HGET', KEYS[1], 'dedupe')
if dedupe then redis.call('DEL', dedupe) end
redis.call('XACK', KEYS[4], ARGV[6], ARGV[7])
if ARGV[8] ~= '' and redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('HSET', KEYS[5], 'url', ARGV[8], 'tenant', ARGV[9], 'job_id', ARGV[5], 'body', ARGV[10],
             'attempts', 0)
  redis.call('EXPIRE', KEYS[5], ARGV[12])
  redis.call('ZADD', KEYS[6], ARGV[11], ARGV[5])
end
return 1
"""

# KEYS: job hash, jobs stream. ARGV: token, group, entry id, last error, job id.
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'last_error', ARGV[4], 'lease', '')
redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[5])
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


class Fence:
    """The scripts above, registered once per Redis client (redis-py reloads them after a failover)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._emit = redis.register_script(_EMIT)
        self._hold = redis.register_script(_HOLD)
        self._finish = redis.register_script(_FINISH)
        self._requeue = redis.register_script(_REQUEUE)

    async def take(self, job_id: str, worker: str, attempt: int) -> str:
        """Take the job's lease for this delivery; returns the token its writes carry."""
        token = f"{worker}:{attempt}:{secrets.token_hex(6)}"
        await self.redis.hset(keys.job(job_id), mapping={"state": jobs.RUNNING, "worker": worker,
                                                        "lease": token})
        return token

    async def emit(self, job_id: str, token: str, fields: dict[str, str]) -> None:
        if not await self._emit(keys=[keys.job(job_id), keys.job_events(job_id)],
                                args=[token, fields["kind"], fields["data"]]):
            raise LeaseLost(f"job {job_id}: another delivery holds the lease")

    async def hold(self, job_id: str, token: str, worker: str, entry_id) -> bool:
        return bool(await self._hold(keys=[keys.job(job_id), keys.JOBS_STREAM],
                                     args=[token, keys.JOBS_GROUP, worker, entry_id]))

    async def finish(self, job_id: str, token: str, entry_id, state: str, outcome: str,
                     webhook: dict[str, str] | None = None) -> bool:
        """Write the terminal state, its event, the XACK and the ``webhook`` delivery (fields of
        ``webhooks.delivery_fields``, due now) at once; False when fenced out (nothing written; a
        finished job's entry is still acknowledged)."""
        hook = webhook or {}
        return bool(await self._finish(
            keys=[keys.job(job_id), keys.job_events(job_id), keys.OPEN_JOBS, keys.JOBS_STREAM,
                  keys.webhook(job_id), keys.WEBHOOKS_DUE],
            args=[token, state, outcome, jobs.EVENTS_TTL_S, job_id, keys.JOBS_GROUP, entry_id,
                  hook.get("url", ""), hook.get("tenant", ""), hook.get("body", ""),
                  int(time.time() * 1000), webhooks.DELIVERY_TTL_S]))

    async def requeue(self, job_id: str, token: str, entry_id, reason: str) -> bool:
        return bool(await self._requeue(keys=[keys.job(job_id), keys.JOBS_STREAM],
                                        args=[token, keys.JOBS_GROUP, entry_id, reason, job_id]))
