"""A bounded local cache of blobs for workers reading from a remote store.

Decoders need a seekable local file (decord takes only a path; parallel chunk decoders each open
the file), so a worker copies a blob into ``root/<sha256>`` on first use and keeps it for the
next question. The cache holds at most ``max_bytes``: before a copy, the least recently used
files are evicted until it fits. A file in use is never evicted: readers hold a shared ``flock``
on it and eviction takes an exclusive one without waiting, skipping files it cannot lock, so any
number of worker processes on one host can share the directory. A blob larger than the whole
cache is still copied (and is the first to go). Copies land under a temporary name and are renamed
into place, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 3600.0
"""A temporary copy this old belongs to a process that died: eviction removes it."""


class BlobCache:
    """``pinned(video_id)`` yields a local path holding the blob, fetched on a miss."""

    def __init__(self, root: Path, max_bytes: int, fetch: Callable[[str, Path], None],
                 size_of: Callable[[str], int | None]) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fetch = fetch
        self.size_of = size_of
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.hits = self.misses = 0

    @contextlib.contextmanager
    def pinned(self, video_id: str) -> Iterator[Path]:
        path = self.root / video_id
        fd = self._open_locked(path)
        if fd is None:
            with self._fetch_lock(video_id):  # one copy per blob in this process
                fd = self._open_locked(path)
                if fd is None:
                    self.misses += 1
                    self._copy_in(video_id, path)
                    fd = self._open_locked(path)
                    if fd is None:
                        raise FileNotFoundError(f"blob {video_id} vanished from the cache right after its copy")
                else:
                    self.hits += 1
        else:
            self.hits += 1
        try:
            os.utime(path)  # least recently *used* goes first
            yield path
        finally:
            os.close(fd)  # releases the shared lock

    def cached_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    # ------------------------------------------------------------------------------ internals

    def _fetch_lock(self, video_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(video_id, threading.Lock())

    def _open_locked(self, path: Path) -> int | None:
        """An fd of ``path`` holding a shared lock, or None if it is not (or no longer) there."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # evicted between open and lock
        return None

    def _copy_in(self, video_id: str, path: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        size = self.size_of(video_id)
        if size is None:
            raise FileNotFoundError(f"blob {video_id} is not in the store")
        self._make_room(size)
        tmp = self.root / f"{TMP_PREFIX}{video_id}-{secrets.token_hex(4)}"
        started = time.monotonic()
        try:
            self.fetch(video_id, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("blob %s copied into the cache (%d bytes, %.2f s)", video_id, size, time.monotonic() - started)

    def _entries(self) -> list[tuple[Path, int, float]]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    if entry.name.startswith(TMP_PREFIX):
                        if time.time() - st.st_mtime > STALE_TMP_S:
                            Path(entry.path).unlink(missing_ok=True)
                            continue
                    out.append((Path(entry.path), st.st_size, st.st_mtime))
        return out

    def _make_room(self, incoming_bytes: int) -> None:
        entries = self._entries()
        total = sum(size for _, size, _ in entries) + incoming_bytes
        for path, size, _ in sorted(entries, key=lambda e: e[2]):
            if total <= self.max_bytes:
                return
            if path.name.startswith(TMP_PREFIX):
                continue  # another process's copy in progress
            if self._evict(path):
                total -= size

    def _evict(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # in use
        try:
            path.unlink(missing_ok=True)
            log.info("blob %s evicted from the cache", path.name)
            return True
        finally:
            os.close(fd)
