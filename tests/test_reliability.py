"""Fault tests with real processes and a real Redis: killed workers, model errors, dead devices,
no workers, full queues, expired deadlines, a Redis restart. What does the client see; is anything
lost?"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from moments.app.client import NO_RETRY, MomentsClient
from moments.core import keys
from moments.core.records import SamplingRequest
from moments.core.token_index import corrupt_entries
from moments.tools.synthetic import Event, write_event_video
from tests.conftest import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return write_event_video(tmp_path_factory.mktemp("v") / "r.mp4", [Event("green", "square", 2, 4)],
                             seconds=8, fps=6)


def running_worker(r: redis.Redis, timeout_s: float = 180.0) -> str:
    """The worker of the first job seen running. Waits on the condition with a generous deadline
    (a loaded 2-core machine can take long to start a worker's first job); a job that finished
    before it was seen says so instead of timing out."""
    deadline = time.monotonic() + timeout_s
    finished = []
    while time.monotonic() < deadline:
        finished = []
        for job_key in r.scan_iter(match="moments:job:*", count=1000):
            if job_key.count(b":") != 2:
                continue
            state, worker = r.hmget(job_key, "state", "worker")
            if state == b"running" and worker:
                return worker.decode()
            if state in (b"done", b"failed") and worker:
                finished.append(job_key)
        time.sleep(0.02)
    raise AssertionError(f"no job was seen running within {timeout_s} s (finished meanwhile: {finished})")


def call_in_thread(fn, *args, **kwargs):
    box = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_killed_worker_job_completes_on_another(redis_url, stack_factory, video_file):
    with stack_factory(faults={"encode_sleep_s": 1.0},
                       worker_stale_s=60.0) as s, MomentsClient(s.target) as client:
        video_id = client.upload(video_file).video.video_id
        thread, box = call_in_thread(client.localize, video_id, ["q"], timeout_s=120)
        r = redis.Redis.from_url(s.settings.redis_url)
        running_worker(r)
        victim = s.stack.workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        s.stack.start_worker(1)  # a healthy replacement reclaims the job after the lease
        thread.join(120)
        assert "error" not in box, box.get("error")
        response = box["result"]
        assert response.stats.attempt == 2
        assert len(response.results) == 1
        assert r.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP)["pending"] == 0
        assert r.zcard(keys.OPEN_JOBS) == 0


def test_model_error_fails_job_after_bounded_retries_and_worker_survives(redis_url, stack_factory, video_file):
    with stack_factory(faults={"answer_error_after": 0},
                       job_max_attempts=2) as s, MomentsClient(s.target) as client:
        video_id = client.upload(video_file).video.video_id
        with pytest.raises(grpc.RpcError) as err:
            client.localize(video_id, ["q"], timeout_s=60)
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "injected model error" in err.value.details() and "2 times" in err.value.details()
        r = redis.Redis.from_url(s.settings.redis_url)
        dead = r.xrange(keys.DEAD_LETTER_STREAM)
        assert len(dead) == 1 and b"injected model error" in dead[0][1][b"reason"]
        assert s.stack.workers[0].poll() is None, "a model error must not kill the worker"
        assert r.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP)["pending"] == 0


def test_fatal_device_error_takes_worker_out_and_job_survives(redis_url, stack_factory,
                                                              video_file):
    with stack_factory(faults={"device_error_after": 0},
                       worker_stale_s=60.0) as s, \
            MomentsClient(s.target) as client:
        video_id = client.upload(video_file).video.video_id
        thread, box = call_in_thread(client.localize, video_id, ["q"], timeout_s=120)
        sick = s.stack.workers[0]
        assert sick.wait(60) == 3, "the worker exits non-zero on a dead device"
        s.stack.start_worker(1, faults="")  # a healthy replacement
        thread.join(120)
        assert "error" not in box, box.get("error")
        assert box["result"].stats.attempt == 2


def test_no_workers_means_unavailable_quickly(redis_url, stack_factory, video_file):
    with stack_factory(workers=0) as s, MomentsClient(s.target, retry=NO_RETRY) as client:
        video_id = client.upload(video_file).video.video_id
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.localize(video_id, ["q"], timeout_s=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5


def test_all_workers_stop_mid_job_gives_unavailable_within_deadline(redis_url, stack_factory,
                                                                    video_file):
    with stack_factory(faults={"encode_sleep_s": 2.0}) as s, \
            MomentsClient(s.target, retry=NO_RETRY) as client:
        video_id = client.upload(video_file).video.video_id
        thread, box = call_in_thread(client.localize, video_id, ["q"], timeout_s=60)
        running_worker(redis.Redis.from_url(s.settings.redis_url))
        os.kill(s.stack.workers[0].pid, signal.SIGKILL)
        started = time.monotonic()
        thread.join(60)
        assert box["error"].code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < s.settings.worker_stale_s + 5


def test_full_queue_gets_resource_exhausted_with_retry_info(redis_url, stack_factory, video_file):
    with stack_factory(faults={"encode_sleep_s": 1.0},
                    max_queue_jobs=1) as s, MomentsClient(s.target, retry=NO_RETRY) as client:
        video_id = client.upload(video_file).video.video_id
        thread, box = call_in_thread(client.localize, video_id, ["first"], timeout_s=120)
        running_worker(redis.Redis.from_url(s.settings.redis_url))
        with pytest.raises(grpc.RpcError) as err:
            client.localize(video_id, ["second"], timeout_s=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = rpc_status.from_call(err.value).details
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)
        thread.join(120)
        assert "result" in box, box.get("error")


def test_expired_deadline_cancels_the_job(redis_url, stack_factory, video_file):
    with stack_factory(faults={"encode_sleep_s": 5.0}) as s, \
            MomentsClient(s.target) as client:
        video_id = client.upload(video_file).video.video_id
        with pytest.raises(grpc.RpcError) as err:
            client.localize(video_id, ["q"], timeout_s=2.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        r = redis.Redis.from_url(s.settings.redis_url)
        deadline = time.monotonic() + 30
        states = []
        while time.monotonic() < deadline:
            states = [r.hget(k, "state") for k in r.scan_iter(match="moments:job:*") if k.count(b":") == 2]
            if states and all(st == b"failed" for st in states):
                break
            time.sleep(0.2)
        assert states == [b"failed"], "the worker stopped the cancelled job"
        outcome = json.loads(r.hget(next(k for k in r.scan_iter(match="moments:job:*") if k.count(b":") == 2),
                                    "outcome"))
        assert "cancel" in outcome["reason"] or "deadline" in outcome["reason"]


def test_cache_check_catches_a_corrupt_entry(redis_url):
    """The self-test of the check the restart test and the chaos run rely on: one flipped byte in
    one chunk of a real entry (written by the worker's TokenCache) is reported, the others not."""
    import asyncio

    import torch

    from moments.core.redis_client import connect
    from moments.workers.model.engine import VisualTokens
    from moments.workers.token_cache import TokenCache

    async def write():
        client = connect(redis_url)
        cache = TokenCache(client, ttl_s=600, chunk_bytes=1024)
        for key in ("a", "b"):
            tokens = VisualTokens(embeds=torch.arange(4096, dtype=torch.float32).reshape(64, 64), grid_thw=(2, 8, 8),
                                  second_per_grid_ts=1.0, frame_times_s=(0.0, 1.0), fingerprint="f")
            await cache.put(key, "v" * 64, tokens)
        await client.aclose()

    asyncio.run(write())
    r = redis.Redis.from_url(redis_url)
    assert corrupt_entries(r) == []
    chunk = keys.token_cache_chunk("b", 2)
    data = bytearray(r.get(chunk))
    data[5] ^= 0xFF
    r.set(chunk, bytes(data))
    assert corrupt_entries(r) == [keys.token_cache_manifest("b").removesuffix(":manifest")]


def test_redis_restart_mid_job_keeps_every_entry_whole(stack_factory, tmp_path, video_file):
    """A Redis with an append-only file fsynced every second (the production setting, so the last
    second of writes can be lost: the check below can fail), killed while a worker encodes: the
    call ends (answer or a retryable error), and what Redis kept is whole: the video, and every
    cached token entry (``test_cache_check_catches_a_corrupt_entry`` shows the check fails on a
    bad one)."""
    server = RedisServer(tmp_path / "aof", appendonly=True, appendfsync="everysec")
    server.start()
    try:
        with stack_factory(redis_url=server.url, faults={"encode_sleep_s": 2.0}) as s, \
                MomentsClient(s.target) as client:
            video_id = client.upload(video_file).video.video_id
            client.localize(video_id, ["warm the token cache"], timeout_s=60)
            other_plan = SamplingRequest(max_frames=8)  # not cached yet: the worker decodes and encodes
            thread, box = call_in_thread(client.localize, video_id, ["q"], sampling=other_plan, timeout_s=60)
            running_worker(server.client())
            server.stop()  # SIGKILL: no shutdown save; only the append-only file survives
            server.start()
            thread.join(120)
            assert not thread.is_alive(), "the call hung"
            if "error" in box:
                assert box["error"].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
            r = server.client()
            assert list(r.scan_iter(match="moments:tok:*:manifest")), "the append-only file kept no entry"
            assert corrupt_entries(r) == []
            assert client.get_video(video_id).video_id == video_id
            # The check can fail: one flipped byte in a chunk is seen.
            entry = next(r.scan_iter(match="moments:tok:*:chunk:0")).decode()
            data = bytearray(r.get(entry))
            data[0] ^= 0xFF
            r.set(entry, bytes(data))
            assert corrupt_entries(r) == [entry.removesuffix(":chunk:0")]
    finally:
        server.stop()
