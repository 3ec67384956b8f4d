"""Cache outcomes and delete counts reveal nothing across tenants (issue 20), and a video's last
delete drops its KV prefixes on every worker: a real stack with API keys and the tiny model."""

from __future__ import annotations

import pytest

from moments.app.client import MomentsClient
from moments.service import metrics
from moments.service.auth import hash_key
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb

KEYS = {"alice": "alice-key", "bob": "bob-key"}
QUERY = ["the red square appears"]


def true_outcomes() -> dict[str, float]:
    """What the front end counted (the workers' real outcomes, which operators see)."""
    return {o: metrics.CACHE_EVENTS.labels(o)._value.get() for o in ("miss", "tokens", "kv")}


def delta(before: dict[str, float]) -> dict[str, float]:
    return {o: n - before[o] for o, n in true_outcomes().items() if n != before[o]}


@pytest.mark.slow
def test_outcomes_and_deletes_are_what_a_tenant_alone_would_see(stack_factory, redis_server, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "state.json")
    redis_server.client().flushall()
    video = write_event_video(tmp_path / "v.mp4", [Event("red", "square", 1, 2)], seconds=4, fps=4)
    spec = ",".join(f"{t}:{hash_key(k)}" for t, k in KEYS.items())
    with stack_factory(workers=1, api_keys=spec) as s, \
            MomentsClient(s.target, api_key=KEYS["alice"]) as alice, \
            MomentsClient(s.target, api_key=KEYS["bob"]) as bob:
        video_id = alice.upload(video).video.video_id
        assert alice.localize(video_id, QUERY).stats.cache == pb.CACHE_MISS
        assert alice.localize(video_id, QUERY).stats.cache == pb.CACHE_HIT_KV
        assert bob.upload(video).video.video_id == video_id
        # Bob's first question runs on Alice's hot prefix, but he is told what he alone would see.
        before = true_outcomes()
        assert bob.localize(video_id, QUERY).stats.cache == pb.CACHE_MISS
        assert delta(before) == {"kv": 1}
        assert bob.localize(video_id, QUERY).stats.cache == pb.CACHE_HIT_KV
        # Alice's delete counts the same while Bob owns the bytes as Bob's, the last one, does.
        assert alice.delete_video(video_id).cache_entries_removed == 1
        assert bob.delete_video(video_id).cache_entries_removed == 1
        # The last delete dropped the prefix on the worker: a re-upload starts cold.
        assert alice.upload(video).video.video_id == video_id
        before = true_outcomes()
        assert alice.localize(video_id, QUERY).stats.cache == pb.CACHE_MISS
        assert delta(before) == {"miss": 1}
