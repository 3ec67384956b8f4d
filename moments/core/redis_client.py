"""The one way Moments processes connect to Redis.

Every command is retried a few times with a short exponential backoff when the connection breaks
(redis-py's own ``Retry``), so a Redis restart costs a call a moment, not an error: the first
command after a restart otherwise meets the dead pooled connection.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

RETRIES = 3


def connect(url: str, *, socket_timeout_s: float = 10.0, **kwargs) -> aioredis.Redis:
    """An asyncio client for ``url`` that retries a broken connection ``RETRIES`` times."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout_s,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **kwargs,
    )
