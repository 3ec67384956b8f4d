"""Scale-out on one host: two CPU workers share one Redis; repeat questions go to the worker holding
the video's KV prefix, and a worker killed mid-job loses nothing (the other finishes it, once)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from moments.app.client import MomentsClient
from moments.core import jobs, keys
from moments.core.records import EVENT_RESULT
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb

pytestmark = pytest.mark.slow


def _worker_of(db: redis.Redis, job_id: str) -> str:
    return db.hget(keys.job(job_id), "worker").decode()


def test_repeats_from_two_clients_land_on_the_prefix_holder(redis_url, stack_factory, tmp_path, monkeypatch):
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "state.json")
    paths = [write_event_video(tmp_path / f"{c}.mp4", [Event(c, "circle", 1, 4)], seconds=6, fps=6)
             for c in ("red", "blue")]
    with stack_factory(workers=2) as s, MomentsClient(s.target) as client:
        db = redis.Redis.from_url(redis_url)
        videos = [client.upload(p).video.video_id for p in paths]
        holder = {}
        for video_id in videos:
            answer = client.localize(video_id, ["question 0"], timeout_s=120)
            holder[video_id] = _worker_of(db, answer.job_id)
        outcomes: list[tuple[str, str, int]] = []
        lock = threading.Lock()

        def ask(client_index: int) -> None:
            with MomentsClient(s.target) as own:
                for i in range(6):
                    video_id = videos[(client_index + i) % 2]
                    answer = own.localize(video_id, [f"question {client_index}-{i}"], timeout_s=120)
                    with lock:
                        outcomes.append((video_id, _worker_of(db, answer.job_id), answer.stats.cache))

        threads = [threading.Thread(target=ask, args=(c,)) for c in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert len(outcomes) == 12
    on_holder = [w == holder[v] and cache == pb.CACHE_HIT_KV for v, w, cache in outcomes]
    assert sum(on_holder) / len(outcomes) >= 0.95, (holder, outcomes)


def test_worker_killed_mid_job_its_job_finishes_on_the_other(redis_url, stack_factory, tiny_model_dir, tmp_path,
                                                            monkeypatch):
    """The holder of the prefix is killed while answering a handed repeat; the other worker claims the
    entry back in seconds (the lease is 60 s), takes a new lease, and the caller gets one result."""
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "state.json")
    video = write_event_video(tmp_path / "a.mp4", [Event("red", "circle", 1, 4)], seconds=6, fps=6)
    with stack_factory(workers=0, model=tiny_model_dir, job_lease_s=60.0) as s, MomentsClient(s.target) as client:
        db = redis.Redis.from_url(redis_url)
        # The slow worker answers its first question at once, every later one after 120 s.
        slow = s.stack.start_worker(0, faults=json.dumps({"answer_sleep_s": 120, "answer_sleep_after": 1}))
        slow_name = s.stack.worker_names[-1]
        s.stack.wait_for_workers(1)
        video_id = client.upload(video).video.video_id
        first = client.localize(video_id, ["question 0"], timeout_s=120)
        assert _worker_of(db, first.job_id) == slow_name
        s.stack.start_worker(1)
        other_name = s.stack.worker_names[-1]
        s.stack.wait_for_workers(2)

        answers = []
        asking = threading.Thread(target=lambda: answers.append(
            client.localize(video_id, ["question 1", "question 2"], timeout_s=120)))
        asking.start()
        deadline = time.monotonic() + 60
        job_id = None
        while time.monotonic() < deadline:  # the repeat runs on the holder, the slow worker
            for open_id in db.zrange(keys.OPEN_JOBS, 0, -1):
                raw = db.hgetall(keys.job(open_id.decode()))
                if raw.get(b"state") == b"running" and raw.get(b"worker") == slow_name.encode():
                    job_id = open_id.decode()
            if job_id:
                break
            time.sleep(0.1)
        assert job_id is not None, "the repeat never ran on the worker holding its prefix"
        time.sleep(1.0)  # well inside its answer
        slow.kill()
        killed = time.monotonic()
        asking.join(120)
        recovered_s = time.monotonic() - killed
        assert answers, "the call got no answer"
        answer = answers[0]
        assert answer.job_id == job_id
        assert slow_name.encode() not in db.hkeys(keys.WORKERS_HASH)  # the reaper dropped its heartbeat
    raw = db.hgetall(keys.job(job_id))
    assert raw[b"state"] == jobs.DONE.encode()
    assert raw[b"worker"].decode() == other_name
    assert raw[b"lease"].decode().startswith(other_name)  # a new lease: the dead one could write nothing
    assert int(raw[b"attempts"]) == 2
    assert recovered_s < 30, f"recovered after {recovered_s:.1f} s: that is the lease, not the claim-back"
    events = [jobs.Event.from_fields(f) for _, f in db.xrange(keys.job_events(job_id))]
    results = [e for e in events if e.kind == EVENT_RESULT]
    assert sorted(r.data["query"] for r in results) == ["question 1", "question 2"]
    assert [e.kind for e in events].count(jobs.DONE) == 1
    assert len(answer.results) == 2
    assert not [f for _, f in db.xrange(keys.DEAD_LETTER_STREAM) if f[b"job_id"].decode() == job_id]
