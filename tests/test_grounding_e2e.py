"""What users ask, through gRPC, with the shipped tiny grounder and the service's own defaults:
a five-minute video answered at the default plan (the checkpoint's sampling bounds win), questions
about things that are not there answered "not found", an all-black video with no segment, and a short
event (and one that happens twice) in a fifteen-minute video found by the coarse-to-fine search,
with its rounds on the progress stream."""

from __future__ import annotations

import pytest

from moments.app.client import MomentsClient, search_options
from moments.app.evaluate import temporal_iou
from moments.core.config import Settings
from moments.core.records import duration_s
from moments.tools import GROUNDER_DIR as GROUNDER
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (GROUNDER / "config.json").exists(), reason=f"the shipped grounder is absent ({GROUNDER})")]

DEFAULTS = Settings.from_env(environ={})


def default_stack(stack_factory, **overrides):
    """A stack at the service's defaults for everything that shapes an answer."""
    return stack_factory(model=GROUNDER, budget_tokens=DEFAULTS.budget_tokens, max_frames=DEFAULTS.max_frames,
                         max_new_tokens=DEFAULTS.max_new_tokens, min_confidence=DEFAULTS.min_confidence,
                         search_mode=DEFAULTS.search_mode, job_timeout_s=600.0, **overrides)


def segments_of(result) -> list[tuple[float, float]]:
    return [(duration_s(s.start_offset), duration_s(s.end_offset)) for s in result.segments]


def best_iou(result, truth: tuple[float, float]) -> float:
    return max((temporal_iou(seg, truth) for seg in segments_of(result)), default=0.0)


def test_five_minutes_at_the_defaults_present_and_absent(redis_server, stack_factory, tmp_path, monkeypatch):
    events = [Event("blue", "square", 121.0, 203.0, lane=0), Event("red", "circle", 34.0, 71.0, lane=2)]
    path = write_event_video(tmp_path / "five.mp4", events, seconds=318.5, fps=4.0, seed=3)
    absent = ["the green triangle appears", "a man opens the door"]
    wrong_shape = "the blue circle appears"  # a present colour with another shape: the grounder's known weakness
    redis_server.client().flushall()
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "uploads.json")
    with default_stack(stack_factory) as stack, MomentsClient(stack.target) as client:
        video_id = client.upload(path).video.video_id
        response = client.localize(video_id, [e.query for e in events] + absent + [wrong_shape], timeout_s=600)
    stats = response.stats
    assert stats.frames <= 64 and (stats.frame_width, stats.frame_height) == (84, 56), (
        "the checkpoint's sampling bounds must bound the default plan")
    for event, result in zip(events, response.results):
        assert result.found, (event.query, result.raw_answer)
        iou = best_iou(result, (event.start_s, event.end_s))
        assert iou >= 0.5, (event.query, segments_of(result), result.raw_answer)
        assert result.score >= DEFAULTS.min_confidence
    for query, result in zip(absent, response.results[len(events):]):
        assert not result.found and not result.segments, (query, result.raw_answer, result.score)
        assert result.score < DEFAULTS.min_confidence
    last = response.results[-1]
    if last.found:  # measured: most false positives of the held-out sets are of this kind (README)
        pytest.xfail(f"wrong shape for a present colour answered {last.raw_answer!r} (score {last.score:.2f})")


def test_an_all_black_video_has_no_segment(redis_server, stack_factory, tmp_path, monkeypatch):
    path = write_event_video(tmp_path / "black.mp4", [], seconds=95.0, fps=4.0, black=True)
    queries = ["the red circle appears", "the yellow square moves left", "a dog jumps", "RED TRIANGLE"]
    redis_server.client().flushall()
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "uploads.json")
    with default_stack(stack_factory) as stack, MomentsClient(stack.target) as client:
        video_id = client.upload(path).video.video_id
        response = client.localize(video_id, queries, timeout_s=600)
    assert [(r.found, len(r.segments)) for r in response.results] == [(False, 0)] * len(queries), [
        (r.query, r.raw_answer, r.score) for r in response.results]


def test_search_finds_a_short_event_and_both_occurrences_of_a_repeat(redis_server, stack_factory, tmp_path,
                                                                      monkeypatch):
    short = Event("yellow", "square", 611.0, 617.0, lane=1)
    twice = Event("green", "circle", 148.0, 155.0, lane=0, repeats=((702.0, 709.0),))
    path = write_event_video(tmp_path / "fifteen.mp4", [short, twice], seconds=905.5, fps=2.0, seed=9)
    queries = [short.query, twice.query, "the red triangle appears"]
    redis_server.client().flushall()
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "uploads.json")
    with default_stack(stack_factory) as stack, MomentsClient(stack.target) as client:
        video_id = client.upload(path).video.video_id
        events = list(client.stream_localize(video_id, queries, timeout_s=900))
        off = client.localize(video_id, queries[:1], search=search_options("off"), timeout_s=600)
    progress = [e.progress for e in events if e.HasField("progress")]
    rounds = {p.round for p in progress if p.stage == pb.SEARCHING}
    assert rounds == {1, 2}, rounds
    [stats] = [e.done for e in events if e.HasField("done")]
    assert stats.rounds == 2 and stats.passes > 1
    assert stats.total_visual_tokens <= DEFAULTS.search_max_visual_tokens
    results = sorted((e.result for e in events if e.HasField("result")), key=lambda r: r.query_index)
    assert [r.query for r in results] == queries  # each query's result once
    r_short, r_twice, r_absent = results
    assert best_iou(r_short, (short.start_s, short.end_s)) >= 0.5, (segments_of(r_short), r_short.raw_answer)
    for occurrence in [(twice.start_s, twice.end_s), *twice.repeats]:
        assert best_iou(r_twice, occurrence) >= 0.5, (occurrence, segments_of(r_twice))
    assert not r_absent.found and not r_absent.segments, segments_of(r_absent)
    # Search off: one pass over the whole video (at one frame every ~14 s a 6 s event is seldom seen).
    assert off.stats.passes == 1 and off.stats.rounds <= 1
