"""Webhook deliveries: checking callback URLs, and the front end's loop that POSTs due events.

A job with a ``callback_url`` gets one delivery when it ends: the worker's fenced final write
schedules it (``moments.workers.fencing``), so only the delivery that won the job's lease does; a
front end schedules the ``lost`` event of a job whose record vanished. A delivery is a hash
(``keys.webhook``) and a member of ``keys.WEBHOOKS_DUE`` scored by the unix ms it is due.

Rules, stated once here (the proto repeats them for callers):

* At least once. A front end claims due deliveries in one Lua script that moves their score to the
  end of a lease (``_CLAIM``); other front ends do not see them until the lease ends, so several
  front ends never send the same event at once, and one that dies mid-send leaves the delivery to
  be claimed again when the lease runs out. Settling (``_SETTLE``) is fenced by that score: a front
  end whose lease ran out and was taken over writes nothing.
* A 2xx answer is success; anything else (status, timeout, refused connection) is a failed attempt,
  retried after ``webhook_backoff_s * 2**(attempt-1)`` (at most :data:`MAX_BACKOFF_S`), scaled by a
  random factor in [0.5, 1) (jitter), up to ``webhook_max_attempts`` attempts; then the event goes
  to ``keys.WEBHOOKS_DEAD`` with its body and last error. A URL the address rules refuse at send
  time (its DNS changed) goes there at once. Each outcome counts in
  ``moments_webhook_deliveries_total{outcome=delivered|retried|dead}``.
* The URL is checked with ``moments.core.netrules`` when the request arrives and again before each
  attempt; the POST goes to a checked address (the host is the Host header and the TLS name), no
  redirects are followed and the environment's proxies are ignored.
* Signed per attempt with the tenant's secret (``moments.core.webhooks``); the secret is read from
  the settings at send time and never stored in Redis.

The HTTP client is httpx (already a dependency for ingest): one ``AsyncClient`` kept for the
front end's life, so connections to a receiver are reused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import time
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis.asyncio as aioredis

from moments.core import errors, keys, webhooks
from moments.core.config import Settings
from moments.core.netrules import Target, check_url, parse_networks
from moments.core.records import Job
from moments.service import metrics

log = logging.getLogger(__name__)

FIELD = "callback_url"
SCHEMES = ("https", "http")
MAX_BACKOFF_S = 3600.0
POLL_INTERVAL_S = 0.2
"""How often an idle deliverer looks for due deliveries."""
CLAIM_BATCH = 16
"""Most deliveries one front end sends at once."""

# KEYS: due zset. ARGV: now ms, lease-until ms, count. Returns the claimed ids; their new score
# (lease-until) is the claim's fence.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""

# KEYS: due zset, delivery hash, dead stream. ARGV: id, claimed score, outcome (delivered | retry |
# dead), next due ms, last error, attempts. 0 when another front end holds the delivery now.
_SETTLE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
  redis.call('HSET', KEYS[2], 'attempts', ARGV[6], 'last_error', ARGV[5])
  return 1
end
if ARGV[3] == 'dead' then
  local d = redis.call('HMGET', KEYS[2], 'job_id', 'url', 'tenant', 'body')
  redis.call('XADD', KEYS[3], '*', 'delivery_id', ARGV[1], 'job_id', d[1] or '', 'url', d[2] or '',
             'tenant', d[3] or '', 'body', d[4] or '', 'attempts', ARGV[6], 'last_error', ARGV[5])
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: delivery hash, due zset. ARGV: url, tenant, job id, body, due ms, ttl.
_SCHEDULE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'url', ARGV[1], 'tenant', ARGV[2], 'job_id', ARGV[3], 'body', ARGV[4],
           'attempts', 0)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[3])
return 1
"""


class Refused(Exception):
    """The URL breaks the address rules now: no retry can deliver it."""


def secret_for(settings: Settings, tenant: str) -> str:
    return webhooks.secret_for(tenant, settings.webhook_secret, settings.webhook_tenant_secrets)


def check_target(url: str, settings: Settings) -> Target:
    """The checked target of a callback URL, or InvalidArgument (blocking: resolves the host)."""
    allow = parse_networks(settings.allow_networks)
    target = check_url(url, schemes=SCHEMES, allow=allow, field=FIELD)
    if target.scheme == "http" and not all(any(ipaddress.ip_address(a) in net for net in allow)
                                           for a in target.addresses):
        raise errors.InvalidArgument("http:// callbacks are accepted only for allow-listed networks; "
                                     "use https://", field=FIELD)
    return target


async def check_callback(job: Job, settings: Settings) -> None:
    """Raise InvalidArgument (field callback_url) unless the job's webhook may be delivered."""
    if not job.callback_url:
        return
    if not secret_for(settings, job.tenant):
        raise errors.InvalidArgument("webhooks are off on this server (no webhook secret for this "
                                     "caller)", field=FIELD)
    await asyncio.to_thread(check_target, job.callback_url, settings)


def backoff_s(settings: Settings, attempt: int) -> float:
    """Pause after failed attempt ``attempt`` (1 = the first): doubling from the base, jittered."""
    return min(MAX_BACKOFF_S, settings.webhook_backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class Webhooks:
    """Schedules front-end events (a lost job) and runs the deliverer loop of this front end."""

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._claim = redis.register_script(_CLAIM)
        self._settle = redis.register_script(_SETTLE)
        self._schedule = redis.register_script(_SCHEDULE)
        self.client = httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                        timeout=httpx.Timeout(settings.webhook_timeout_s))
        self.lease_ms = int((settings.webhook_timeout_s * 3 + 30) * 1000)
        """A claimed delivery is another front end's to take after this (a sender died)."""

    async def job_lost(self, job: Job) -> None:
        """Schedule the ``lost`` event of a job whose record vanished (once, however many callers saw it)."""
        if not job.callback_url:
            return
        body = webhooks.event_body(job, webhooks.LOST, reason="the job's record vanished from Redis "
                                                              "(failover or restart)")
        await self._schedule(keys=[keys.webhook(job.job_id), keys.WEBHOOKS_DUE],
                             args=[job.callback_url, job.tenant, job.job_id, body, int(time.time() * 1000),
                                   webhooks.DELIVERY_TTL_S])

    async def run(self) -> None:
        """Deliver due events until cancelled; Redis outages pause the loop, never end it."""
        try:
            while True:
                try:
                    sent = await self.deliver_due()
                except Exception:  # noqa: BLE001 - Redis briefly down: try again next round
                    log.warning("webhook deliverer could not run", exc_info=True)
                    sent = 0
                if not sent:
                    await asyncio.sleep(POLL_INTERVAL_S)
        finally:
            await self.client.aclose()

    async def deliver_due(self) -> int:
        """Claim the deliveries due now and send them (concurrently); returns how many."""
        now_ms = int(time.time() * 1000)
        lease_ms = now_ms + self.lease_ms
        ids = await self._claim(keys=[keys.WEBHOOKS_DUE], args=[now_ms, lease_ms, CLAIM_BATCH])
        await asyncio.gather(*(self._deliver(i.decode(), lease_ms) for i in ids))
        return len(ids)

    async def _deliver(self, delivery_id: str, lease_ms: int) -> None:
        raw = await self.redis.hgetall(keys.webhook(delivery_id))
        if not raw:  # expired: nothing left to send
            await self.redis.zrem(keys.WEBHOOKS_DUE, delivery_id)
            return
        d = {k.decode(): v.decode() for k, v in raw.items()}
        attempt = int(d.get("attempts", 0)) + 1
        try:
            status = await self._post(d, delivery_id, attempt)
        except Refused as exc:
            await self._settled(delivery_id, lease_ms, "dead", attempt, str(exc), d)
            return
        except httpx.HTTPError as exc:
            status, error = 0, f"{type(exc).__name__}: {exc}".rstrip(": ")
        else:
            error = f"HTTP {status}"
        if 200 <= status < 300:
            await self._settled(delivery_id, lease_ms, "delivered", attempt, "", d)
        elif attempt >= self.settings.webhook_max_attempts:
            await self._settled(delivery_id, lease_ms, "dead", attempt, error, d)
        else:
            await self._settled(delivery_id, lease_ms, "retry", attempt, error, d)

    async def _post(self, d: dict[str, str], delivery_id: str, attempt: int) -> int:
        """POST the event to a checked address of its URL; returns the status."""
        url, body = d["url"], d["body"].encode()
        secret = secret_for(self.settings, d.get("tenant", ""))
        if not secret:
            raise Refused("no webhook secret for the tenant any more")
        try:
            target = await asyncio.to_thread(check_target, url, self.settings)
        except errors.InvalidArgument as exc:
            raise Refused(f"the URL is refused now: {exc.message}") from None
        parts = urlsplit(url)
        headers = webhooks.signed_headers(secret, body, delivery_id, attempt)
        headers["Host"] = parts.netloc
        last: httpx.HTTPError | None = None
        for address in target.addresses:
            literal = f"[{address}]" if ":" in address else address
            pinned = urlunsplit((parts.scheme, f"{literal}:{target.port}", parts.path or "/", parts.query, ""))
            request = self.client.build_request(
                "POST", pinned, content=body, headers=headers,
                extensions={"sni_hostname": target.host} if target.scheme == "https" else {})
            try:
                response = await self.client.send(request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # try the next address
                last = exc
                continue
            await response.aclose()
            return response.status_code
        raise last or httpx.ConnectError("no address connects")

    async def _settled(self, delivery_id: str, lease_ms: int, outcome: str, attempt: int, error: str,
                       d: dict[str, str]) -> None:
        next_ms = int((time.time() + backoff_s(self.settings, attempt)) * 1000)
        won = await self._settle(keys=[keys.WEBHOOKS_DUE, keys.webhook(delivery_id), keys.WEBHOOKS_DEAD],
                                 args=[delivery_id, lease_ms, outcome, next_ms, error, attempt])
        if not won:
            log.warning("webhook %s: another front end took the delivery over; outcome %s dropped",
                        delivery_id, outcome)
            return
        metrics.WEBHOOK_DELIVERIES.labels("retried" if outcome == "retry" else outcome).inc()
        state = json.loads(d["body"]).get("state", "")
        if outcome == "delivered":
            log.info("webhook %s delivered job=%s state=%s attempt=%d", delivery_id, d.get("job_id"), state,
                     attempt)
        elif outcome == "retry":
            log.info("webhook %s attempt %d failed (%s); retrying in %.1f s", delivery_id, attempt, error,
                     next_ms / 1000 - time.time())
        else:
            log.warning("webhook %s dead after %d attempts job=%s: %s", delivery_id, attempt, d.get("job_id"),
                        error)
