"""Shared fixtures: a private redis-server per test session, the tiny Qwen2.5-VL checkpoints."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, restartable for fault tests."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
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
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL checkpoint (plain weights) written by the project's own builder."""
    from workers.tiny_model import build_tiny_model

    cached = os.environ.get("MOMENTS_TEST_TINY_MODEL")
    if cached and Path(cached, "config.json").exists():
        return Path(cached)
    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(out, awq=False, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_awq_model_dir(tmp_path_factory) -> Path:
    """The same tiny model saved as an AWQ (4-bit, group 128 style) checkpoint."""
    from workers.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-awq-model")
    build_tiny_model(out, awq=True, seed=0)
    return out
