"""Content-addressed blob store on a local (or shared) directory, plus upload temp files."""

from __future__ import annotations

import os
import re
from pathlib import Path

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    """``root/sha256/ab/<sha256>`` holds each video once; ``uploads/`` holds partial uploads."""

    def __init__(self, blob_dir: Path, upload_dir: Path) -> None:
        self.blob_dir = blob_dir
        self.upload_dir = upload_dir
        blob_dir.mkdir(parents=True, exist_ok=True)
        upload_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.blob_dir / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def part_path(self, upload_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
            raise ValueError(f"not an upload id: {upload_id!r}")
        return self.upload_dir / f"{upload_id}.part"

    @staticmethod
    def sync(part: Path) -> None:
        """Flush a finished upload's bytes to disk (before :meth:`commit`, outside any lock)."""
        with open(part, "rb") as f:
            os.fsync(f.fileno())

    def commit(self, part: Path, sha256: str) -> Path:
        """Rename a synced ``part`` into place; if the blob already exists keep that one."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            part.unlink(missing_ok=True)
            return target
        os.replace(part, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return target

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
