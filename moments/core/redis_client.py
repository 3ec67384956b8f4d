"""The one way Moments processes connect to Redis: a URL, or the primary that Redis Sentinel names.

Every command is retried a few times with a short exponential backoff when the connection breaks
(redis-py's own ``Retry``), so a Redis restart costs a call a moment, not an error: the first
command after a restart otherwise meets the dead pooled connection.

With ``Settings.redis_sentinels`` the client asks the sentinels for the primary of
``Settings.redis_master`` on every new connection (redis-py's ``SentinelConnectionPool``); a
connection to a primary that was demoted (READONLY) is dropped and the command retried, so after a
failover every front end and worker follows the promoted replica by itself. The retries are wider
there (``SENTINEL_RETRIES``): sentinels take a few seconds to agree that the primary is gone.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry
from redis.sentinel import Sentinel as SyncSentinel

from moments.core.config import Settings

RETRIES = 3
POOL_WAIT_S = 20.0
"""How long a command waits for a free pooled connection before failing (UNAVAILABLE)."""
SENTINEL_RETRIES = 8
"""About 6 s of backoff (cap 1 s): long enough for a failover's election on loopback."""


def _common(socket_timeout_s: float) -> dict:
    return dict(socket_connect_timeout=2.0, socket_timeout=socket_timeout_s, health_check_interval=10,
                retry_on_error=[RedisConnectionError, RedisTimeoutError])


def connect(target: "str | Settings", *, socket_timeout_s: float = 10.0, max_connections: int | None = None,
            **kwargs) -> aioredis.Redis:
    """An asyncio client for a URL or for ``Settings`` (URL or sentinels) that retries a broken
    connection. Its pool holds at most ``max_connections`` (default ``Settings.redis_max_connections``);
    a command finding every one busy waits up to ``POOL_WAIT_S`` for one instead of failing (with
    sentinels, redis-py's sentinel pool, which does not wait, keeps its own bound)."""
    settings = target if isinstance(target, Settings) else None
    if max_connections is None:
        max_connections = settings.redis_max_connections if settings is not None else Settings.redis_max_connections
    if settings is not None and settings.redis_sentinels:
        sentinel = Sentinel(settings.sentinel_addresses, sentinel_kwargs={"socket_connect_timeout": 1.0,
                                                                          "socket_timeout": 1.0})
        return sentinel.master_for(
            settings.redis_master, **_common(socket_timeout_s),
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), SENTINEL_RETRIES), **kwargs)
    url = settings.redis_url if settings is not None else target
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S, **_common(socket_timeout_s),
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES), **kwargs)
    return aioredis.Redis.from_pool(pool)


def connect_sync(settings: Settings, *, socket_timeout_s: float = 10.0) -> redis.Redis:
    """The blocking twin of :func:`connect`, for the CLI, ``moments serve`` and tools."""
    if settings.redis_sentinels:
        sentinel = SyncSentinel(settings.sentinel_addresses, sentinel_kwargs={"socket_connect_timeout": 1.0,
                                                                              "socket_timeout": 1.0})
        return sentinel.master_for(
            settings.redis_master, **_common(socket_timeout_s),
            retry=SyncRetry(ExponentialBackoff(cap=1.0, base=0.1), SENTINEL_RETRIES))
    return redis.Redis.from_url(settings.redis_url, **_common(socket_timeout_s),
                                retry=SyncRetry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES))
