"""Accuracy end to end with the shipped tiny grounder (``tools/grounder``).

A video the grounder never saw (a length and native frame rate outside its training set,
variable frame rate) goes through the whole service: upload, probe, sampling plan, decode, encode,
prefill, generate, parse, gRPC. Every query must come back with IoU >= 0.5. The grounder can
only know *when* from the temporal position ids (2 per second), so a wrong sampled fps, wrong
frame times or wrong ``second_per_grid_ts`` anywhere on the path fails this test; the second test
shows it by breaking ``second_per_grid_ts`` on purpose.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from moments.app.client import MomentsClient
from moments.app.evaluate import temporal_iou
from moments.core.config import Settings
from moments.workers.pipeline import answer_file
from moments.core.records import duration_s
from moments.tools.synthetic import Event, random_scene, write_event_video, write_scene
from moments.tools import GROUNDER_DIR as GROUNDER

DURATION_S = 71.5  # training videos are whole seconds
NATIVE_FPS = 20.0  # not one of the training rates
MAX_NEW_TOKENS = 24
SERVICE_MAX_FRAMES, SERVICE_BUDGET_TOKENS = 64, 512
"""What the grounder was trained with (also the tests' stack_settings)."""

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (GROUNDER / "config.json").exists(),
    reason=f"the shipped grounder is absent ({GROUNDER}); train it with python -m moments.tools.train_grounder")]


@pytest.fixture(scope="module")
def scene_video(tmp_path_factory):
    scene = random_scene(random.Random(20240), DURATION_S, fps=NATIVE_FPS, vfr=True, max_events=3)
    path = write_scene(tmp_path_factory.mktemp("acc") / "unseen.mp4", scene)
    return scene, path


def engine_answers(engine, path: Path, queries, *, break_spgt: bool = False):
    settings = Settings.from_env(environ={}, max_frames=SERVICE_MAX_FRAMES, budget_tokens=SERVICE_BUDGET_TOKENS,
                                 max_new_tokens=MAX_NEW_TOKENS)
    # The classic bug: the temporal step of the position ids is off by 2x.
    hook = (lambda t: replace(t, second_per_grid_ts=t.second_per_grid_ts * 2)) if break_spgt else None
    return answer_file(engine, settings, path, queries, tokens_hook=hook)


def assert_grpc_answers_overlap(redis_server, stack_factory, tmp_path, monkeypatch, path: Path, events) -> None:
    """Upload ``path`` and ask about every event through gRPC: each answer must have IoU >= 0.5."""
    redis_server.client().flushall()
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "uploads.json")
    queries = [e.query for e in events]
    with stack_factory(model=GROUNDER, max_new_tokens=MAX_NEW_TOKENS, max_frames=SERVICE_MAX_FRAMES,
                       budget_tokens=SERVICE_BUDGET_TOKENS) as stack, MomentsClient(stack.target) as client:
        video_id = client.upload(path).video.video_id
        response = client.localize(video_id, queries, timeout_s=120)
    # The grounder was trained on 56x84 frames: the service must plan with the checkpoint's bounds.
    assert (response.stats.frame_width, response.stats.frame_height) == (84, 56), (
        "the worker ignored moments_sampling.json of the checkpoint (frame "
        f"{response.stats.frame_width}x{response.stats.frame_height}, trained at 84x56)")
    for event, result in zip(events, response.results):
        assert result.segments, f"{event.query!r}: no segment in {result.raw_answer!r}"
        seg = result.segments[0]
        got = (duration_s(seg.start_offset), duration_s(seg.end_offset))
        score = temporal_iou(got, (event.start_s, event.end_s))
        assert score >= 0.5, f"{event.query!r}: {got} vs truth {(event.start_s, event.end_s)} (IoU {score:.2f})"


def test_unseen_video_through_grpc_every_query_iou_over_half(redis_server, stack_factory, scene_video, tmp_path,
                                                             monkeypatch):
    scene, path = scene_video
    assert_grpc_answers_overlap(redis_server, stack_factory, tmp_path, monkeypatch, path, scene.events)


def test_moving_objects_through_grpc_every_query_iou_over_half(redis_server, stack_factory, tmp_path, monkeypatch):
    """Objects on screen the whole time that slide left during their interval ("moves left"),
    beside one that appears: the answer must come from the motion, not from visibility."""
    events = [Event("yellow", "triangle", 12.0, 40.0, lane=1, kind="move"),
              Event("blue", "square", 30.0, 61.0, lane=0),
              Event("red", "circle", 5.0, 22.0, lane=2, kind="move")]
    path = write_event_video(tmp_path / "moves.mp4", events, seconds=DURATION_S, fps=NATIVE_FPS, vfr=True, seed=5)
    assert_grpc_answers_overlap(redis_server, stack_factory, tmp_path, monkeypatch, path, events)


def test_wrong_second_per_grid_ts_moves_the_answers(scene_video):
    """Same video, engine in process: right ids give IoU >= 0.5; doubled temporal ids do not."""
    from moments.workers.model.engine import Engine

    scene, path = scene_video
    engine = Engine.load(str(GROUNDER), device="cpu")
    truths = [(e.start_s, e.end_s) for e in scene.events]
    queries = [e.query for e in scene.events]

    def mean_iou(answers):
        return sum(temporal_iou((a.segments[0].start_s, a.segments[0].end_s), t) if a.segments else 0.0
                   for a, t in zip(answers, truths)) / len(truths)

    right = mean_iou(engine_answers(engine, path, queries))
    wrong = mean_iou(engine_answers(engine, path, queries, break_spgt=True))
    assert right >= 0.5, right
    assert wrong < right - 0.25, (right, wrong)
