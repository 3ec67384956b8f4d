"""API keys (stored hashed), tenants and per-tenant quotas."""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from moments.core import errors, keys

DEFAULT_TENANT = "default"
current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar(
    "current_tenant", default=DEFAULT_TENANT
)


@dataclass(frozen=True)
class ApiKey:
    tenant: str
    key_sha256: str
    rate_per_s: int = 0
    """Requests per second (0 = unlimited)."""
    max_concurrent: int = 0
    """Calls in flight at once (0 = unlimited)."""


def peer_host(peer: str) -> str:
    """The address of a gRPC peer ("ipv4:10.0.0.1:5000", "ipv6:[::1]:5000") without its port."""
    kind, _, rest = peer.partition(":")
    return f"{kind}:{rest.rsplit(':', 1)[0]}" if kind in ("ipv4", "ipv6") else peer


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_api_keys(spec: str) -> list[ApiKey]:
    """Parse ``tenant:sha256[:rate_per_s[:max_concurrent]]`` entries separated by commas."""
    result = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = entry.split(":")
        if len(parts) < 2 or len(parts[1]) != 64:
            raise ValueError(f"api key entry {entry!r}: want tenant:sha256hex[:rate[:concurrency]]")
        numbers = [int(p) for p in parts[2:4]]
        result.append(ApiKey(parts[0], parts[1].lower(), *numbers))
    return result


class Authenticator:
    """Checks ``authorization: Bearer <key>`` metadata and enforces the key's quotas in Redis.

    Failed attempts are counted per peer address and per presented key (its hash); past
    ``failures_max`` within ``failure_window_s`` every call from that peer, or with that key, gets
    RESOURCE_EXHAUSTED before its key is looked at, so the answer never says whether a key exists."""

    def __init__(self, api_keys: list[ApiKey], redis: aioredis.Redis, *, failures_max: int = 10,
                 failure_window_s: float = 60.0) -> None:
        self.by_hash = {k.key_sha256: k for k in api_keys}
        self.redis = redis
        self.failures_max = failures_max
        self.failure_window_s = failure_window_s

    async def identify(self, metadata: dict[str, str], peer: str) -> ApiKey:
        """The caller's key, with failed attempts throttled (``authenticate`` without the throttle)."""
        if not self.enabled or not self.failures_max:
            return self.authenticate(metadata)
        token = metadata.get("authorization", "").partition(" ")[2].strip()
        subjects = [keys.auth_failures(f"peer:{peer_host(peer)}")]
        if token:
            subjects.append(keys.auth_failures(f"key:{hash_key(token)}"))
        counts = await self.redis.mget(subjects)
        if any(int(c or 0) >= self.failures_max for c in counts):
            raise errors.ResourceExhausted("too many failed authentications; retry later",
                                           retry_after_s=self.failure_window_s, quota="failed_auth")
        try:
            return self.authenticate(metadata)
        except errors.Unauthenticated:
            async with self.redis.pipeline(transaction=True) as pipe:
                for name in subjects:
                    pipe.incr(name).expire(name, int(self.failure_window_s) or 1, nx=True)
                await pipe.execute()
            raise

    @property
    def enabled(self) -> bool:
        return bool(self.by_hash)

    def authenticate(self, metadata: dict[str, str]) -> ApiKey:
        if not self.enabled:
            return ApiKey(DEFAULT_TENANT, "")
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        digest = hash_key(token.strip())
        for known, key in self.by_hash.items():
            if hmac.compare_digest(known, digest):
                return key
        raise errors.Unauthenticated("unknown API key")

    async def acquire(self, key: ApiKey) -> bool:
        """Count one call against the key's quotas; True if a concurrency slot was taken."""
        if key.rate_per_s:
            second = int(time.time())
            name = keys.rate(key.tenant, second)
            async with self.redis.pipeline(transaction=True) as pipe:
                count, _ = await pipe.incr(name).expire(name, 2).execute()
            if count > key.rate_per_s:
                raise errors.ResourceExhausted(
                    f"rate quota of {key.rate_per_s} requests/s exceeded", retry_after_s=1.0
                )
        if key.max_concurrent:
            name = keys.inflight(key.tenant)
            count = await self.redis.incr(name)
            await self.redis.expire(name, 3600)
            if count > key.max_concurrent:
                await self.redis.decr(name)
                raise errors.ResourceExhausted(
                    f"concurrency quota of {key.max_concurrent} calls exceeded", retry_after_s=1.0
                )
            return True
        return False

    async def release(self, key: ApiKey) -> None:
        await self.redis.decr(keys.inflight(key.tenant))
