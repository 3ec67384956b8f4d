"""KV-prefix affinity: with two workers, repeat questions reach the worker holding the prefix."""

from __future__ import annotations

import pytest
import redis

from moments.app.client import MomentsClient
from moments.core import keys
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("affinity", [True, False])
def test_repeat_questions_follow_the_kv_prefix(redis_url, stack_factory, tmp_path, affinity, monkeypatch):
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "state.json")
    video = write_event_video(tmp_path / "a.mp4", [Event("red", "circle", 2, 5)], seconds=8, fps=6)
    with stack_factory(workers=2, kv_affinity=affinity) as s, MomentsClient(s.target) as client:
        video_id = client.upload(video).video.video_id
        db = redis.Redis.from_url(redis_url)

        def ask(query: str):
            """The answer's stats and the worker that ran it (tenants' stats name no worker: Redis does)."""
            answer = client.localize(video_id, [query], timeout_s=120)
            return answer.stats, db.hget(keys.job(answer.job_id), "worker")

        first, first_worker = ask("question 0")
        assert first.cache == pb.CACHE_MISS
        outcomes = [ask(f"question {i}") for i in range(1, 6)]
        kv_hits = sum(o.cache == pb.CACHE_HIT_KV for o, _ in outcomes)
        if affinity:
            assert kv_hits == len(outcomes)
            assert {w for _, w in outcomes} == {first_worker}
        else:
            # Without affinity any idle worker takes a repeat: a worker's first question about the
            # video reads the Redis token cache and prefills; after that it holds the KV prefix.
            served = {first_worker}
            for o, worker in outcomes:
                assert o.cache == (pb.CACHE_HIT_KV if worker in served else pb.CACHE_HIT_TOKENS), (worker, served)
                served.add(worker)
            assert kv_hits == len(outcomes) - (len(served) - 1)
