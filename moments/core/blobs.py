"""Where video bytes live: a content-addressed blob store behind one interface.

Blobs are named by their sha256 (the video id). An upload is staged (:class:`Staging`: appended
to, hashed as it arrives, resumable from what the store durably holds), verified, probed, then
committed under its id; workers read a blob by id, never by a path the front end chose.

* :class:`LocalBlobStore` keeps blobs in a local (or shared) directory; staging is a part file.
* :class:`moments.core.s3_blobs.S3BlobStore` keeps them in an S3-compatible bucket; staging is a
  multipart upload, and workers read through a bounded local cache.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
HASH_STATES_KEPT = 256
"""Unfinished uploads whose sha256 state this process keeps for a resume without re-reading."""


def check_video_id(video_id: str) -> str:
    if not SHA256_RE.match(video_id):
        raise ValueError(f"not a sha256: {video_id!r}")
    return video_id


def check_upload_id(upload_id: str) -> str:
    if not UPLOAD_ID_RE.match(upload_id):
        raise ValueError(f"not an upload id: {upload_id!r}")
    return upload_id


class HashStates:
    """sha256 states of unfinished uploads at their durable offset, kept in this process.

    Python's hashlib cannot export a hash state (OpenSSL 3 keeps it opaque), so a stream that
    resumes an upload in the process that received its first part continues the hash from here;
    anywhere else the store re-reads what it holds (local) or verifies after completing (S3).
    """

    def __init__(self, kept: int = HASH_STATES_KEPT) -> None:
        self.kept = kept
        self._states: OrderedDict[str, tuple[int, "hashlib._Hash"]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, upload_id: str, offset: int, hasher) -> None:
        with self._lock:
            self._states[upload_id] = (offset, hasher.copy())
            self._states.move_to_end(upload_id)
            while len(self._states) > self.kept:
                self._states.popitem(last=False)

    def take(self, upload_id: str, offset: int):
        """The state at exactly ``offset`` (a copy), or None."""
        with self._lock:
            kept = self._states.pop(upload_id, None)
        if kept is None or kept[0] != offset:
            return None
        return kept[1]

    def drop(self, upload_id: str) -> None:
        with self._lock:
            self._states.pop(upload_id, None)


class Staging(abc.ABC):
    """The bytes of one unfinished upload as the store holds them, open for appending.

    Methods block (call them from a thread). ``durable_bytes`` is what the store holds for sure:
    the offset a client resumes from. Appended bytes beyond it may still be buffered.
    """

    upload_id: str

    @property
    @abc.abstractmethod
    def durable_bytes(self) -> int: ...

    @abc.abstractmethod
    def append(self, data: bytes) -> None:
        """Add the next bytes (hashing them); may wait for the store."""

    def settle(self) -> int:
        """Wait for writes in flight; returns :attr:`durable_bytes`."""
        return self.durable_bytes

    @abc.abstractmethod
    def finish(self) -> str:
        """Every byte is appended: make them all durable and readable; returns their sha256 (hex)."""

    @abc.abstractmethod
    def probe_target(self) -> str:
        """After :meth:`finish`: what the probe child reads (a local path or an http(s) URL)."""

    @abc.abstractmethod
    def close(self) -> None:
        """The stream ended: release buffers; what is durable stays for a resume."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Remove everything staged (nothing partial stays behind)."""


class BlobStore(abc.ABC):
    """Content-addressed video bytes plus the staging area of unfinished uploads."""

    backend: str

    @abc.abstractmethod
    def exists(self, video_id: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, video_id: str) -> None: ...

    @abc.abstractmethod
    def reader(self, video_id: str) -> contextlib.AbstractContextManager[Path]:
        """A local file holding the blob's bytes, for as long as the context is open."""

    @abc.abstractmethod
    def open_staging(self, upload_id: str) -> Staging:
        """Open (or start) the staging of ``upload_id`` at what the store durably holds of it."""

    @abc.abstractmethod
    def staged_bytes(self, upload_id: str) -> int:
        """Bytes of an unfinished upload the store durably holds (0 if none)."""

    @abc.abstractmethod
    def discard_staging(self, upload_id: str) -> None:
        """Remove whatever is staged for ``upload_id`` (an abandoned or failed upload)."""

    @abc.abstractmethod
    def commit(self, staging: Staging, video_id: str) -> None:
        """Make a finished, verified, probed staging the blob ``video_id`` (keeps an existing one).

        Called under the video's lock."""


class LocalStaging(Staging):
    """A part file appended to and flushed chunk by chunk (every flushed byte counts as held)."""

    def __init__(self, store: "LocalBlobStore", upload_id: str) -> None:
        self.upload_id = upload_id
        self.path = store.part_path(upload_id)
        self._states = store.hash_states
        self._file = open(self.path, "ab")
        self._size = self._file.tell()
        self._hasher = self._states.take(upload_id, self._size) or _rehash(self.path, self._size)
        self._finished = False

    @property
    def durable_bytes(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        self._hasher.update(data)
        self._size += len(data)

    def finish(self) -> str:
        os.fsync(self._file.fileno())
        self._finished = True
        return self._hasher.hexdigest()

    def probe_target(self) -> str:
        return str(self.path)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            if not self._finished:
                self._states.put(self.upload_id, self._size, self._hasher)

    def discard(self) -> None:
        self._finished = True
        self.close()
        self._states.drop(self.upload_id)
        self.path.unlink(missing_ok=True)


def _rehash(path: Path, size: int):
    """The sha256 state after the first ``size`` bytes of ``path`` (a resume in a new process)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left and (block := f.read(min(left, 4 * 1024 * 1024))):
            hasher.update(block)
            left -= len(block)
    return hasher


class LocalBlobStore(BlobStore):
    """``root/sha256/ab/<sha256>`` holds each video once; ``uploads/`` holds partial uploads."""

    backend = "local"

    def __init__(self, blob_dir: Path, upload_dir: Path) -> None:
        self.blob_dir = Path(blob_dir)
        self.upload_dir = Path(upload_dir)
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        self.hash_states = HashStates()

    def path(self, video_id: str) -> Path:
        check_video_id(video_id)
        return self.blob_dir / "sha256" / video_id[:2] / video_id

    def exists(self, video_id: str) -> bool:
        return self.path(video_id).is_file()

    def delete(self, video_id: str) -> None:
        self.path(video_id).unlink(missing_ok=True)

    @contextlib.contextmanager
    def reader(self, video_id: str) -> Iterator[Path]:
        path = self.path(video_id)
        if not path.is_file():
            raise FileNotFoundError(f"blob {video_id} is not in {self.blob_dir}")
        yield path

    def part_path(self, upload_id: str) -> Path:
        """The staging file of an unfinished upload (raises ValueError for a malformed id)."""
        return self.upload_dir / f"{check_upload_id(upload_id)}.part"

    def open_staging(self, upload_id: str) -> LocalStaging:
        return LocalStaging(self, upload_id)

    def staged_bytes(self, upload_id: str) -> int:
        try:
            return self.part_path(upload_id).stat().st_size
        except FileNotFoundError:
            return 0

    def discard_staging(self, upload_id: str) -> None:
        self.hash_states.drop(upload_id)
        self.part_path(upload_id).unlink(missing_ok=True)

    def commit(self, staging: Staging, video_id: str) -> None:
        """Rename the synced part file into place; if the blob already exists keep that one."""
        assert isinstance(staging, LocalStaging)
        self.commit_file(staging.path, video_id)

    def commit_file(self, part: Path, video_id: str) -> None:
        """Move a complete, synced file into place as ``video_id`` (keeps an existing blob)."""
        target = self.path(video_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            part.unlink(missing_ok=True)
            return
        os.replace(part, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

