"""KV-prefix affinity: with two workers, repeat questions reach the worker holding the prefix."""

from __future__ import annotations

import pytest

from moments.client import MomentsClient
from moments.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb
from tests.stack import ThreadedStack, stack_settings

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("affinity", [True, False])
def test_repeat_questions_follow_the_kv_prefix(redis_url, tmp_path, tiny_model_dir, affinity, monkeypatch):
    monkeypatch.setattr("moments.client.RESUME_STATE", tmp_path / "state.json")
    video = write_event_video(tmp_path / "a.mp4", [Event("red", "circle", 2, 5)], seconds=8, fps=6)
    settings = stack_settings(redis_url, tmp_path / "data", tiny_model_dir, kv_affinity=affinity)
    with ThreadedStack(settings, workers=2) as s, MomentsClient(s.target) as client:
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
            # Without affinity the other worker takes some repeats and pays the prefill again.
            assert {o.cache for o in outcomes} <= {pb.CACHE_HIT_KV, pb.CACHE_HIT_TOKENS}
