"""Where video bytes live: a content-addressed blob store behind one interface.

Blobs are named by their sha256 (the video id). The front end stages an upload in a part file,
then commits it under its id; workers read a blob by id (never by a path the front end chose).
:class:`LocalBlobStore` keeps blobs in a local (or shared) directory.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def check_video_id(video_id: str) -> str:
    if not SHA256_RE.match(video_id):
        raise ValueError(f"not a sha256: {video_id!r}")
    return video_id


class BlobStore(abc.ABC):
    """Content-addressed video bytes plus the staging area of unfinished uploads."""

    @abc.abstractmethod
    def exists(self, video_id: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, video_id: str) -> None: ...

    @abc.abstractmethod
    def reader(self, video_id: str) -> contextlib.AbstractContextManager[Path]:
        """A local file holding the blob's bytes, for as long as the context is open."""

    @abc.abstractmethod
    def part_path(self, upload_id: str) -> Path:
        """The staging file of an unfinished upload (raises ValueError for a malformed id)."""

    def sync(self, part: Path) -> None:
        """Make a staging file's bytes durable (before :meth:`commit`, outside any lock)."""

    @abc.abstractmethod
    def commit(self, part: Path, video_id: str) -> None:
        """Make a complete, verified staging file the blob ``video_id`` (keeps an existing one)."""


class LocalBlobStore(BlobStore):
    """``root/sha256/ab/<sha256>`` holds each video once; ``uploads/`` holds partial uploads."""

    def __init__(self, blob_dir: Path, upload_dir: Path) -> None:
        self.blob_dir = Path(blob_dir)
        self.upload_dir = Path(upload_dir)
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.upload_dir.mkdir(parents=True, exist_ok=True)

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
        if not UPLOAD_ID_RE.match(upload_id):
            raise ValueError(f"not an upload id: {upload_id!r}")
        return self.upload_dir / f"{upload_id}.part"

    def sync(self, part: Path) -> None:
        with open(part, "rb") as f:
            os.fsync(f.fileno())

    def commit(self, part: Path, video_id: str) -> None:
        """Rename a synced ``part`` into place; if the blob already exists keep that one."""
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


def open_blob_store(settings) -> BlobStore:
    """The blob store ``settings`` name (a local directory under ``data_dir``)."""
    return LocalBlobStore(settings.blob_dir, settings.upload_dir)
