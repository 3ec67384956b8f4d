"""KV-prefix affinity: with two workers, repeat questions reach the worker holding the prefix."""

from __future__ import annotations

import pytest

from moments.app.client import MomentsClient
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("affinity", [True, False])
def test_repeat_questions_follow_the_kv_prefix(redis_url, stack_factory, tmp_path, affinity, monkeypatch):
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "state.json")
    video = write_event_video(tmp_path / "a.mp4", [Event("red", "circle", 2, 5)], seconds=8, fps=6)
    with stack_factory(workers=2, kv_affinity=affinity) as s, MomentsClient(s.target) as client:
        video_id = client.upload(video).video.video_id
        first = client.localize(video_id, ["question 0"], timeout_s=120)
        assert first.stats.cache == pb.CACHE_MISS
        outcomes = [client.localize(video_id, [f"question {i}"], timeout_s=120).stats
                    for i in range(1, 6)]
        kv_hits = sum(o.cache == pb.CACHE_HIT_KV for o in outcomes)
        if affinity:
            assert kv_hits == len(outcomes)
            assert {o.worker for o in outcomes} == {first.stats.worker}
        else:
            # Without affinity any idle worker takes a repeat: a worker's first question about the
            # video reads the Redis token cache and prefills; after that it holds the KV prefix.
            served = {first.stats.worker}
            for o in outcomes:
                assert o.cache == (pb.CACHE_HIT_KV if o.worker in served else pb.CACHE_HIT_TOKENS), (o.worker, served)
                served.add(o.worker)
            assert kv_hits == len(outcomes) - (len(served) - 1)
