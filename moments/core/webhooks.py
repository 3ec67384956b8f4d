"""Webhook events: what a job's end looks like to a receiver, how it is signed, how to check it.

Both sides use this module: a worker builds the event when it finishes a job (the delivery is
scheduled in the same fenced write as the job's final state, ``moments.workers.fencing``), the
front end signs and POSTs it (``moments.service.webhooks``), and a receiver checks it with
:func:`verify`. The proto (``LocalizeRequest.callback_url``) states the event schema for callers.

Signature: ``Moments-Signature: v1=<hex HMAC-SHA256(secret, "<Moments-Timestamp>.<raw body>")>``.
The timestamp is that of the attempt (each retry is signed anew), so a receiver that refuses
timestamps older than its replay window (:data:`DEFAULT_TOLERANCE_S`) refuses replays of a
captured request; the delivery id (``Moments-Delivery``, also ``id`` in the body) stays the same
on every attempt, for deduplication (delivery is at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from moments.core.records import Job, QueryResult

DONE, FAILED, CANCELLED, LOST = "done", "failed", "cancelled", "lost"
STATES = (DONE, FAILED, CANCELLED, LOST)
DEFAULT_TOLERANCE_S = 300.0
"""Replay window of :func:`verify`: an attempt signed longer ago than this is refused."""
DELIVERY_TTL_S = 7 * 24 * 3600
"""A scheduled delivery's record lives at most this long (retries end well before)."""
TIMESTAMP_HEADER = "Moments-Timestamp"
SIGNATURE_HEADER = "Moments-Signature"
DELIVERY_HEADER = "Moments-Delivery"
ATTEMPT_HEADER = "Moments-Attempt"


class SignatureError(ValueError):
    """A webhook request that is not signed with the secret, or was signed too long ago."""


def event_body(job: Job, state: str, *, reason: str = "", results: Iterable[QueryResult] = (),
               stats: Mapping[str, Any] | None = None, time_s: float | None = None) -> str:
    """The JSON event of a job that ended in ``state`` (one of :data:`STATES`)."""
    if state not in STATES:
        raise ValueError(f"unknown webhook state {state!r}")
    shown_stats = {k: v for k, v in (stats or {}).items() if k != "worker"}  # the operator's, not the tenant's
    event = {
        "id": job.job_id,
        "type": f"job.{state}",
        "state": state,
        "job_id": job.job_id,
        "video_id": job.video_id,
        "kind": job.kind,
        "reason": reason,
        "time": round(time.time() if time_s is None else time_s, 3),
        "results": [_result(r) for r in sorted(results, key=lambda r: r.query_index)],
        "stats": shown_stats,
    }
    return json.dumps(event, separators=(",", ":"), sort_keys=True)


def _result(result: QueryResult) -> dict[str, Any]:
    return {"query_index": result.query_index, "query": result.query, "found": result.found,
            "score": result.score,
            "segments": [{"start_s": s.start_s, "end_s": s.end_s, "confidence": s.confidence}
                         for s in result.segments]}


def delivery_fields(job: Job, body: str) -> dict[str, str]:
    """The Redis hash of a scheduled delivery (``keys.webhook``); the secret is never stored."""
    return {"url": job.callback_url, "tenant": job.tenant, "job_id": job.job_id, "body": body,
            "attempts": "0"}


def signature(secret: str | bytes, timestamp: str, body: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return "v1=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def signed_headers(secret: str | bytes, body: bytes, delivery_id: str, attempt: int,
                   now_s: float | None = None) -> dict[str, str]:
    """The headers of one attempt: content type, timestamp, signature, delivery id, attempt number."""
    timestamp = str(int(time.time() if now_s is None else now_s))
    return {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(secret, timestamp, body), DELIVERY_HEADER: delivery_id,
            ATTEMPT_HEADER: str(attempt), "User-Agent": "moments-webhooks/1"}


def verify(secret: str | bytes, headers: Mapping[str, str], body: bytes,
           tolerance_s: float = DEFAULT_TOLERANCE_S, *, now_s: float | None = None) -> dict[str, Any]:
    """Check a received webhook; returns its event, or raises SignatureError.

    ``headers`` is any mapping of the request's headers (names in any case); ``body`` the raw bytes
    as received (before any JSON parsing). An attempt signed more than ``tolerance_s`` ago (or that
    far in the future) is refused, which bounds replays of a captured request.
    """
    lowered = {str(k).lower(): v for k, v in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    offered = [s.strip() for s in lowered.get(SIGNATURE_HEADER.lower(), "").split(",")]
    if not timestamp.isdigit():
        raise SignatureError(f"missing or malformed {TIMESTAMP_HEADER} header")
    age_s = (time.time() if now_s is None else now_s) - int(timestamp)
    if abs(age_s) > tolerance_s:
        raise SignatureError(f"timestamp is {age_s:.0f} s old, outside the {tolerance_s:.0f} s window")
    expected = signature(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, s) for s in offered if s.startswith("v1=")):
        raise SignatureError("signature does not match the body")
    return json.loads(body)


def secret_for(tenant: str, default_secret: str, tenant_secrets: str) -> str:
    """The webhook key of ``tenant``: its own from ``tenant_secrets`` ("t1:s1,t2:s2"), else the default."""
    for item in filter(None, (p.strip() for p in tenant_secrets.split(","))):
        name, _, secret = item.partition(":")
        if name == tenant and secret:
            return secret
    return default_secret
