"""The grounder's training script (``tools/train_grounder.py``): its examples go through the
project's own sampling plan and position ids, they ask about what is shown and what is not, with the
right answers (windows, short and repeated events, absent ones), its batching shortcuts change nothing,
and a short run writes a checkpoint the engine serves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moments.tools import train_grounder as tg
from moments.workers.model import prompt
from moments.workers.model.answer_parser import parse_segments
from moments.workers.model.engine import Engine
from moments.workers.model.positions import mrope_positions
from moments.workers.model.preprocessing import VideoProcessing


@pytest.fixture(scope="module")
def grounder(tmp_path_factory):
    """A random-init grounder (the shipped sizes) with the project's tokenizer and processor files."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from moments.tools.tiny_model import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("grounder"), seed=3)
    cfg = tg.grounder_config(json.loads((Path(out) / "config.json").read_text()))
    tg.patch_vision_attention()
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg)).eval()
    return model, AutoTokenizer.from_pretrained(str(out)), VideoProcessing.from_model_dir(Path(out))


def answer_text(tok, ids, n):
    return tok.decode(ids[len(ids) - n:len(ids) - 1])


def test_examples_are_reproducible_and_follow_the_options(grounder):
    _, tok, _ = grounder
    examples = tg.Examples(tok, seed=4, mix=tg.DataMix(min_events=2, max_duration_s=1200))
    a, b = examples(3), examples(3)
    assert np.array_equal(a["frames"], b["frames"]) and a["rows"] == b["rows"]
    assert examples(4)["rows"] != a["rows"]
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    absent_rows = total_rows = windows = 0
    for i in range(24):
        ex = examples(i)
        scene, plan = ex["scene"], ex["plan"]
        assert 20 <= scene.duration_s <= 1200 and scene.duration_s not in tg.HELD_OUT_DURATIONS_S
        assert ex["frames"].shape == (plan.frames, plan.height, plan.width, 3) == (plan.frames, 56, 84, 3)
        windows += plan.frame_times_s[0] > 0 or plan.frame_times_s[-1] < scene.duration_s - 60
        # Position ids made in the render process are the engine's, row by row.
        for (ids, _), pos in zip(ex["rows"], ex["positions"]):
            want, _ = mrope_positions(ids, video_id, ex["grid"], plan.second_per_grid_ts, 2, 2)
            assert np.array_equal(pos, want.numpy())
        assert ex["asked_visible"].shape == (len(ex["rows"]), plan.frames // 2)
        shown = tg.shown_times_s(scene, plan)
        for (ids, n), vis in zip(ex["rows"], ex["asked_visible"]):
            total_rows += 1
            answer = answer_text(tok, ids, n)
            if answer == prompt.ABSENT_ANSWER:
                absent_rows += 1
                assert not vis.any()
                continue
            # A present answer names, relative to the first sampled frame, exactly the occurrences some
            # sampled frame shows, clipped to the view; its row's binding target is that event's visibility.
            asked = [e for e in scene.events if tg.seen_occurrences(e, plan, shown, scene.duration_s)
                     and np.array_equal(vis, tg.step_visibility(e, shown))]
            assert asked and vis.any()
            end = plan.frame_times_s[-1] + 1.0
            want = tg.seen_occurrences(asked[0], plan, shown, min(scene.duration_s, end + 1200))
            got = parse_segments(answer, None).segments
            assert got and got[0][0] == pytest.approx(want[0][0], abs=0.051)
    assert absent_rows / total_rows >= 0.3  # at least 30% of the questions are about absent things
    assert windows >= 4  # some examples see a window of the video, as search passes do


def test_black_and_empty_scenes_only_get_absent_answers(grounder):
    _, tok, _ = grounder
    examples = tg.Examples(tok, seed=8, mix=tg.DataMix(empty_fraction=0.5, black_fraction=0.5))
    for i in range(4):
        ex = examples(i)
        assert ex["scene"].events == ()
        assert all(answer_text(tok, ids, n) == prompt.ABSENT_ANSWER for ids, n in ex["rows"])
        if ex["scene"].black:
            assert not ex["frames"].any()


def test_one_grid_for_the_batch_equals_one_grid_per_example(grounder):
    model, tok, proc = grounder
    batch = [tg.Examples(tok, seed=9)(i) for i in range(3)]
    assert len({ex["frames"].shape[0] for ex in batch}) > 1  # different lengths in one grid
    with torch.no_grad():
        fast = tg.video_features(model, batch, proc, torch.device("cpu"), one_grid=True)
        slow = tg.video_features(model, batch, proc, torch.device("cpu"), one_grid=False)
    assert [f.shape for f in fast] == [s.shape for s in slow]
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-4, atol=1e-5)


def test_binding_loss_rewards_the_asked_event(grounder):
    """Scores that mark the asked event's steps give a lower binding loss than scores marking another."""
    model, tok, proc = grounder
    batch = [tg.Examples(tok, seed=5, mix=tg.DataMix(min_events=2, absent_fraction=0.01, window_fraction=0.0,
                                                     short_event_fraction=0.0))(0)]
    rows = [(0, k) for k in range(len(batch[0]["rows"]))]
    steps = batch[0]["frames"].shape[0] // 2
    per_step = 6
    feats = [torch.zeros(steps * per_step, 4)]
    hidden = 8

    class Oracle(torch.nn.Module):
        """Fixed scores in place of :class:`BindHead`."""

        def __init__(self, marks):
            super().__init__()
            self.marks = marks

        def forward(self, h_query, h_video):
            return self.marks

    vis = torch.as_tensor(batch[0]["asked_visible"])
    right = (vis * 20 - 10).repeat_interleave(per_step, dim=1)
    wrong = right.roll(1, dims=0)  # each row scored with another row's event
    middle = torch.zeros(len(rows), 3 + steps * per_step + 2, hidden)
    mask = torch.zeros(middle.shape[:2], dtype=torch.bool)
    mask[:, 3:3 + steps * per_step] = True
    last = np.full(len(rows), middle.shape[1] - 1)
    args = (middle, mask, rows, batch, feats, last, torch.device("cpu"))
    good = tg.bind_loss(Oracle(right), *args)
    bad = tg.bind_loss(Oracle(wrong), *args)
    assert good < 0.01 < bad


@pytest.mark.slow
def test_a_short_training_run_writes_a_checkpoint_the_engine_serves(tmp_path):
    out = tmp_path / "g"
    summary = tg.train(out, steps=3, batch_size=2, lr=1e-3, seed=0, eval_every=3, threads=1,
                       time_limit_s=300, workers=1, reuse=2, bind_weight=0.5, aux_weight=0.3,
                       mix=tg.DataMix(min_events=2, max_duration_s=600))
    assert summary["steps"] == 3 and summary["fresh_examples"] + summary["reused_examples"] == 6
    assert [h["step"] for h in summary["history"]] == [3]
    assert 0.0 <= summary["history"][0]["miou"] <= 1.0 and 0.0 <= summary["history"][0]["auroc"] <= 1.0
    assert json.loads((out / "training.json").read_text())["bind_weight"] == 0.5
    assert json.loads((out / tg.SAMPLING_FILE).read_text()) == tg.checkpoint_bounds()
    engine = Engine.load(str(out), device="cpu")
    scene = tg.random_scene(random.Random(1), 30.5)
    plan = tg.plan_for(scene, tg.sampling_options())
    answers = engine.generate(engine.encode(tg.scene_frames(scene, plan), plan), [scene.events[0].query],
                              max_new_tokens=8)
    assert len(answers) == 1 and isinstance(answers[0].text, str) and answers[0].text
