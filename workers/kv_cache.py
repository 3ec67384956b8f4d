"""Hot KV prefixes in worker memory: a question about a hot video prefills only its own tokens."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import torch

log = logging.getLogger(__name__)


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

    def discard_video(self, video_id: str) -> None:
        with self._lock:
            for key in [k for k in self._entries if k.startswith(video_id[:16])]:
                self.used_bytes -= self._entries.pop(key)[1]
