"""Hot KV prefixes in worker memory: a question about a hot video prefills only its own tokens."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from typing import Any

import redis.asyncio as aioredis
import torch
from redis.exceptions import RedisError

from moments.core import keys

log = logging.getLogger(__name__)
DELETIONS_BLOCK_MS = 2000


def tensor_bytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes held by the tensors reachable from ``obj`` (a KV cache, a prefix object)."""
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


class KVPrefixCache:
    """Least-recently-used prefixes within a byte budget; entries larger than it are not kept."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.used_bytes = 0
        self._evicted: list[str] = []

    def get(self, key: str) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: str, prefix: Any) -> bool:
        """Keep ``prefix``; False when it is larger than the whole budget (not kept)."""
        size = tensor_bytes(prefix)
        if size > self.budget_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used_bytes -= old[1]
            while self._entries and self.used_bytes + size > self.budget_bytes:
                evicted, (_, evicted_size) = self._entries.popitem(last=False)
                self.used_bytes -= evicted_size
                self._evicted.append(evicted)
                log.info("kv prefix %s evicted (%.1f MiB)", evicted, evicted_size / 2**20)
            self._entries[key] = (prefix, size)
            self.used_bytes += size
        return True

    def take_evicted(self) -> list[str]:
        """Keys evicted since the last call (so the worker stops advertising them)."""
        with self._lock:
            evicted, self._evicted = self._evicted, []
            return evicted

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def discard_video(self, video_id: str) -> int:
        """Drop every prefix of the video; returns how many there were."""
        with self._lock:
            gone = [k for k in self._entries if k.startswith(video_id[:16])]
            for key in gone:
                self.used_bytes -= self._entries.pop(key)[1]
        return len(gone)


async def drop_deleted_videos(redis: aioredis.Redis, cache: KVPrefixCache) -> None:
    """Forever: drop the prefixes of every video whose last owner deleted it (``keys.VIDEOS_DELETED``,
    which every worker reads), so a re-upload of the same bytes starts cold."""
    last_id = None
    while True:
        try:
            if last_id is None:  # deletions before this worker started left nothing in its memory
                newest = await redis.xrevrange(keys.VIDEOS_DELETED, count=1)
                last_id = newest[0][0] if newest else "0-0"
            reply = await redis.xread({keys.VIDEOS_DELETED: last_id}, block=DELETIONS_BLOCK_MS)
        except RedisError as exc:
            log.warning("cannot read deleted videos (%s); retrying", exc)
            await asyncio.sleep(1.0)
            continue
        for _, entries in reply or ():
            for entry_id, fields in entries:
                last_id = entry_id
                video_id = fields[b"video_id"].decode()
                if cache.discard_video(video_id):
                    log.info("kv prefixes of deleted video %s dropped", video_id)
