"""Chaos, for real: a Sentinel-managed Redis that fails over, a worker stopped past its lease, and a
short run of the soak harness (``moments.app.chaos``; the long run is ``benchmarks/chaos.py``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from moments.app.client import MomentsClient, RetryPolicy
from moments.core import jobs, keys
from moments.app.chaos import FAULT_KINDS, ChaosConfig, RedisDeployment, run
from moments.tools.synthetic import Event, write_event_video
from tests.test_reliability import call_in_thread, running_worker

pytestmark = pytest.mark.slow


@pytest.fixture
def sentinels(tmp_path):
    deployment = RedisDeployment(tmp_path / "redis")
    deployment.start()
    yield deployment
    deployment.close()


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    return write_event_video(tmp_path_factory.mktemp("v") / "c.mp4", [Event("red", "square", 1, 3)],
                             seconds=6, fps=6)


def test_sentinel_failover_keeps_the_service_answering(stack_factory, sentinels, video_file, tmp_path):
    """SIGKILL the primary: the sentinels promote the replica, the front end and the worker follow
    it, and calls made after the promotion are answered (the video uploaded before is still there)."""
    with stack_factory(redis_sentinels=sentinels.sentinel_setting, redis_master="moments",
                       worker_stale_s=30.0) as s, \
            MomentsClient(s.target, state_path=tmp_path / "state.json",
                          retry=RetryPolicy(attempts=12, max_delay_s=5.0)) as client:
        video_id = client.upload(video_file).video.video_id
        assert len(client.localize(video_id, ["the red square appears"], timeout_s=60).results) == 1
        time.sleep(1.5)  # the replica has the last writes (replication is asynchronous)
        before = sentinels.primary_port()
        note = sentinels.kill_primary()
        assert sentinels.primary_port() != before, note
        answer = client.localize(video_id, ["a question asked after the failover"], timeout_s=60)
        assert len(answer.results) == 1
        assert client.get_video(video_id).video_id == video_id
        assert redis.Redis(port=sentinels.primary_port()).info("replication")["role"] == "master"


def _worker_pid(stack, name: str) -> int:
    for proc in stack.workers:
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        if f"MOMENTS_WORKER_NAME={name}".encode() in environ:
            return proc.pid
    raise AssertionError(f"no worker process is named {name}")


def test_a_worker_stopped_past_its_lease_writes_no_second_result(stack_factory, redis_url, video_file):
    """SIGSTOP the worker running a job past the lease: the other worker reclaims and finishes it;
    SIGCONT: the stopped one finishes its copy but is fenced out, so the job has one result per
    query and one terminal event, and nothing stays pending."""
    with stack_factory(workers=2, faults={"encode_sleep_s": 3.0}, job_lease_s=2.0, worker_stale_s=60.0,
                       kv_affinity=False) as s, MomentsClient(s.target) as client:
        video_id = client.upload(video_file).video.video_id
        thread, box = call_in_thread(client.localize, video_id, ["the red square appears"], timeout_s=120)
        r = redis.Redis.from_url(redis_url)
        stopped = running_worker(r)
        pid = _worker_pid(s.stack, stopped)
        os.kill(pid, signal.SIGSTOP)
        try:
            thread.join(90)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert "error" not in box, box.get("error")
        assert len(box["result"].results) == 1
        assert box["result"].stats.attempt == 2, "the other worker's delivery answered"
        job_key = next(k for k in r.scan_iter(match=f"{keys.PREFIX}:job:*") if k.count(b":") == 2)
        events = keys.job_events(job_key.decode().split(":", 2)[2])
        time.sleep(3.0 + 2.0)  # the continued worker ends its encode and tries to write
        kinds = [f[b"kind"] for _, f in r.xrange(events)]
        assert kinds.count(b"result") == 1 and kinds.count(jobs.DONE.encode()) == 1, kinds
        assert r.hget(job_key, "state") == jobs.DONE.encode()
        assert r.xpending(keys.JOBS_STREAM, keys.JOBS_GROUP)["pending"] == 0
        assert all(p.poll() is None for p in s.stack.workers), "the fenced worker keeps serving"


def test_short_chaos_run_loses_nothing(tmp_path):
    """Every fault kind once, with clients calling all along: nothing lost, duplicated, corrupt or
    left behind, every error retryable, the service recovered from each fault."""
    config = ChaosConfig(workdir=tmp_path, duration_s=34.0, baseline_s=5.0, front_ends=2, workers=2, clients=3,
                         fault_every_s=5.5, max_faults=len(FAULT_KINDS), job_lease_s=3.0, fill_s=2.0,
                         call_timeout_s=60.0, drain_s=60.0)
    report = run(config)
    table = report.table()
    print(table)
    assert [f.kind for f in report.faults] == [k for k in FAULT_KINDS if k not in report.skipped_faults]
    assert not report.lost, table
    assert not report.stores["terminal_twice"] and not report.client_duplicates, table
    assert report.stores["corrupt"] == [] and report.stores["self_test"] == "caught", table
    assert report.stores["leftover"] == [], table
    assert report.non_retryable == [], table
    assert report.final_call == "ok", table
    assert report.exited == [], table
    # Recovery times are the benchmark's figure (benchmarks/chaos.py): in a 34 s run a call kind made
    # every fourth round may not come round again after the last fault, so they are printed, not
    # asserted here.
    assert sum(c.outcome == "ok" for c in report.calls) > 10, table
