"""The job protocol both sides speak over Redis.

A job is a hash (``keys.job``) holding its payload and state; the jobs stream carries only job ids,
so trimming it never loses a payload. A worker writes progress, per-query results and the final
state to the job's event stream (``keys.job_events``), which any number of waiters read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Job states in the job hash.
QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"

EVENTS_TTL_S = 3600
"""A finished job's hash and events stay this long for late readers and retried calls."""
HEARTBEAT_INTERVAL_S = 1.0
"""Workers write their heartbeat this often (``Settings.worker_stale_s`` says when the front end
calls the service unavailable)."""
WORKER_DEAD_AFTER_S = 2.5
"""A worker whose heartbeat is older than this (or gone) is dead to the other workers: nothing is
handed to it, and the entries in its pending list are claimed back at once, not after the lease."""


@dataclass(frozen=True)
class Event:
    kind: str
    data: dict[str, Any]

    def to_fields(self) -> dict[str, str]:
        return {"kind": self.kind, "data": json.dumps(self.data)}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> "Event":
        return cls(fields[b"kind"].decode(), json.loads(fields[b"data"]))


def request_key(*parts: Any) -> str:
    """Stable identity of a request, so a retried call joins the running job instead of a new one."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

