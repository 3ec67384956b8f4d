"""Shared fixtures: a private redis-server per test session, the tiny Qwen2.5-VL checkpoints, and
one factory for real stacks (front end + worker processes) on that Redis."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import urllib.request
from pathlib import Path

import pytest
import redis
from hypothesis import settings as hypothesis_settings

# Property tests draw the same examples on every run (a CI run is repeatable); set
# HYPOTHESIS_PROFILE=explore to search with fresh random examples.
hypothesis_settings.register_profile("repeatable", derandomize=True, database=None)
hypothesis_settings.register_profile("explore", derandomize=False)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, restartable for fault tests."""

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.appendonly = appendonly
        """Keep an append-only file (fsync on every write), so a restart keeps everything written."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persist,
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """A clean database on the session's redis-server."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.client().flushall()
    return redis_server.url


class S3Server:
    """moto in server mode: a real S3 HTTP API on a free loopback port, in a subprocess.

    moto is the S3-compatible server installable here from the registries (MinIO and the other
    object stores are not packaged on PyPI or Debian's main archive); it speaks the S3 REST API
    over HTTP with signature checks, multipart uploads (5 MiB minimum part), ranged GETs and
    presigned URLs, which is all the blob store uses. Its state lives in memory, so a restart
    empties it: outage tests cut the network in front of it instead (``tests/netproxy.py``).
    """

    ACCESS_KEY_ID = "moments-test"
    SECRET_ACCESS_KEY = "moments-test-secret"
    REGION = "us-east-1"

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def settings(self, bucket: str, endpoint_url: str | None = None) -> dict:
        """Settings overrides for a blob store in ``bucket`` (through ``endpoint_url``, default direct)."""
        return dict(blob_backend="s3", s3_endpoint_url=endpoint_url or self.url, s3_bucket=bucket,
                    s3_region=self.REGION, s3_access_key_id=self.ACCESS_KEY_ID,
                    s3_secret_access_key=self.SECRET_ACCESS_KEY, s3_part_bytes=5 * 1024**2, s3_timeout_s=5.0)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=self.REGION,
                            aws_access_key_id=self.ACCESS_KEY_ID, aws_secret_access_key=self.SECRET_ACCESS_KEY)

    def new_bucket(self) -> str:
        name = f"moments-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL checkpoint (plain weights) written by the project's own builder."""
    from moments.tools.tiny_model import build_tiny_model

    cached = os.environ.get("MOMENTS_TEST_TINY_MODEL")
    if cached and Path(cached, "config.json").exists():
        return Path(cached)
    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(out, awq=False, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_awq_model_dir(tmp_path_factory) -> Path:
    """The same tiny model saved as an AWQ (4-bit, group 128 style) checkpoint."""
    from moments.tools.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-awq-model")
    build_tiny_model(out, awq=True, seed=0)
    return out


@pytest.fixture(scope="session")
def stack_factory(request, redis_server, tmp_path_factory):
    """Start real stacks on the session's Redis: ``with stack_factory(workers=0, api_keys=...) as s``.

    Settings are sized for 2 cores and the tiny model (``tests.stack.stack_settings``); keywords
    override them. ``model`` defaults to the tiny model, ``data_dir`` to a fresh folder, ``redis_url``
    to the session's server; ``faults`` (a dict) switches fault injection on in the workers;
    ``blob_backend="s3"`` puts the blobs in a fresh bucket of the session's S3 server.
    """
    from tests.stack import ThreadedStack, stack_settings

    def make(*, workers: int = 1, model=None, data_dir=None, redis_url=None, faults=None, **overrides):
        if faults is not None:
            overrides["faults"] = json.dumps(faults)
        if overrides.get("blob_backend") == "s3" and not overrides.get("s3_bucket"):
            # A fresh bucket on the session's S3 server (explicit s3_* overrides win).
            server = request.getfixturevalue("s3_server")
            overrides = {**server.settings(server.new_bucket()), **overrides}
        if model is None:  # a front end alone loads no model: do not build one for it
            model = request.getfixturevalue("tiny_model_dir") if workers else "unused"
        settings = stack_settings(redis_url or redis_server.url, data_dir or tmp_path_factory.mktemp("stack"),
                                  model, **overrides)
        return ThreadedStack(settings, workers=workers)

    return make
