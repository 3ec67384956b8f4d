"""Run the real ``moments serve`` stack (front end in a thread's event loop, worker processes).

Tests get stacks from the ``stack_factory`` fixture (``tests/conftest.py``), which builds them here."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from moments.core.config import Settings
from moments.app.serve import Stack


def stack_settings(redis_url: str, data_dir: Path, model_dir: Path, **overrides) -> Settings:
    """Settings sized for 2 CPU cores and the tiny model."""
    base = dict(
        redis_url=redis_url,
        data_dir=str(data_dir),
        listen="127.0.0.1:0",
        model=str(model_dir),
        device="cpu",
        budget_tokens=512,
        max_frames=64,
        max_new_tokens=12,
        job_timeout_s=120.0,
        job_lease_s=6.0,
        probe_timeout_s=20.0,
        kv_cache_bytes=256 * 1024**2,
        # Every test's client is the same loopback peer on the session's Redis: failed-auth throttling
        # (on by default) would carry one test's wrong keys into the next. Its own test switches it on.
        auth_failures_max=0,
    )
    base.update(overrides)
    return Settings.from_env(environ={}, **base)


class ThreadedStack:
    """A Stack whose event loop runs in a background thread, so tests use the blocking client."""

    def __init__(self, settings: Settings, workers: int = 1) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stack = Stack(settings, workers=workers)

    def run(self, coro, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def __enter__(self) -> "ThreadedStack":
        self.run(self.stack.__aenter__())
        if self.stack.worker_count:
            self.stack.wait_for_workers(timeout_s=120)
        self.run(self.stack.front.health.check())  # health says SERVING now, not at the next poll
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.run(self.stack.close(), timeout_s=90)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def target(self) -> str:
        return self.stack.target

    @property
    def settings(self) -> Settings:
        return self.stack.settings


# ------------------------------------------------------------------- what the blob store holds


def _s3(settings: Settings):
    from moments.core.s3_blobs import s3_client

    return s3_client(settings)


def stored_blob_ids(stack) -> list[str]:
    """Video ids the stack's blob store holds (local directory or bucket)."""
    settings = stack.settings
    if settings.blob_backend == "local":
        return sorted(p.name for p in settings.blob_dir.rglob("*") if p.is_file())
    listed = _s3(settings).list_objects_v2(Bucket=settings.s3_bucket, Prefix=f"{settings.s3_prefix}blobs/")
    return sorted(o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", ()))


def staged_uploads(stack) -> dict[str, int]:
    """Upload id -> bytes staged, for every unfinished upload the store holds anything of
    (local part files; S3 multipart uploads in progress and staging objects)."""
    settings = stack.settings
    if settings.blob_backend == "local":
        return {p.stem: p.stat().st_size for p in settings.upload_dir.glob("*.part")}
    client, bucket, prefix = _s3(settings), settings.s3_bucket, f"{settings.s3_prefix}uploads/"
    out: dict[str, int] = {}
    for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", ()):
        parts = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]).get("Parts", ())
        out[upload["Key"].rsplit("/", 1)[1]] = sum(p["Size"] for p in parts)
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", ()):
        out[obj["Key"].rsplit("/", 1)[1]] = obj["Size"]
    return out
