"""Shared fixtures: a private redis-server per test session, the tiny Qwen2.5-VL checkpoints, and
one factory for real stacks (front end + worker processes) on that Redis."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
from hypothesis import settings as hypothesis_settings

from tests.s3_server import S3Server

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

    def __init__(self, workdir: Path, *, appendonly: bool = False, appendfsync: str = "always") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.appendonly = appendonly
        """Keep an append-only file, fsynced per ``appendfsync`` (``always``: a restart keeps every
        write; ``everysec``, the production setting: Redis writes the file at once, fsyncs each second)."""
        self.appendfsync = appendfsync

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        persist = ["--appendonly", "yes", "--appendfsync", self.appendfsync] if self.appendonly else ["--appendonly", "no"]
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
