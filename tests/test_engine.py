"""The grounding engine on the real tiny Qwen2.5-VL: encoding, rope ids, prefix reuse, isolation."""

from __future__ import annotations

import logging
import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from moments.core.errors import FatalDeviceError, Internal
from moments.tools.tiny_model import build_tiny_model
from moments.workers.model import prompt
from moments.workers.model.engine import Engine, Generation, VisualTokens
from moments.workers.model.positions import mrope_positions
from moments.workers.model.preprocessing import VideoProcessing, pixel_values_videos
from moments.workers.answers import answer_segments
from tests.plans import QUERIES, make_frames, make_plan

@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(str(tiny_model_dir))


@pytest.fixture
def captured(engine):
    """position_ids of every call into the language model."""
    calls: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        calls.append(kwargs["position_ids"].detach().cpu().clone())

    handle = engine.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    yield calls
    handle.remove()


def test_load_defaults(engine):
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    assert engine.model.training is False
    assert len(engine.fingerprint) == 24


def test_patch_layout_matches_the_vision_tower():
    """Row r, column k of pixel_values_videos hold the pixel the Qwen2-VL layout says they hold."""
    plan = make_plan(4, 2.0)
    frames = make_frames(plan, 1)
    proc = VideoProcessing()
    pixels, grid = pixel_values_videos(frames, proc)
    gt, gh, gw = grid
    assert grid == (2, 4, 6) and pixels.shape == (gt * gh * gw, 3 * 2 * 14 * 14)
    rng = np.random.default_rng(0)
    for _ in range(200):
        t, bh, bw, mh, mw = (int(rng.integers(n)) for n in (gt, gh // 2, gw // 2, 2, 2))
        c, tt, py, px = (int(rng.integers(n)) for n in (3, 2, 14, 14))
        row = ((t * (gh // 2) + bh) * (gw // 2) + bw) * 4 + mh * 2 + mw
        col = ((c * 2 + tt) * 14 + py) * 14 + px
        value = frames[2 * t + tt, (bh * 2 + mh) * 14 + py, (bw * 2 + mw) * 14 + px, c]
        expected = (np.float32(value) - np.float32(proc.image_mean[c] * 255)) / np.float32(proc.image_std[c] * 255)
        assert float(pixels[row, col]) == pytest.approx(float(expected), rel=1e-6, abs=1e-6)


def test_pixels_equal_the_real_video_processor(tiny_model_dir):
    pytest.importorskip("torchvision")  # Qwen2VLVideoProcessor needs it; absent on the CPU test image
    from transformers import AutoVideoProcessor

    plan = make_plan(6, 1.0)
    frames = make_frames(plan, 2)
    ref = AutoVideoProcessor.from_pretrained(str(tiny_model_dir))(
        videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)], do_resize=False, return_tensors="pt")
    ours, grid = pixel_values_videos(frames, Engine.load(str(tiny_model_dir)).processing)
    assert torch.equal(ref["pixel_values_videos"], ours)
    assert ref["video_grid_thw"].tolist() == [list(grid)]


def test_chunked_encoding_equals_one_shot(engine):
    plan = make_plan(12, 1.0)
    frames = make_frames(plan, 3)
    seen = []
    whole = engine.encode(frames, plan, chunk_frames=64)
    chunked = engine.encode(frames, plan, chunk_frames=5, progress=lambda done, total: seen.append((done, total)))
    assert whole.embeds.shape == (plan.visual_tokens, 64) and whole.grid_thw == (6, 4, 6)
    assert seen == [(4, 12), (8, 12), (12, 12)]  # 5 rounds down to whole 2-frame groups
    torch.testing.assert_close(chunked.embeds, whole.embeds, rtol=1e-5, atol=1e-5)
    assert whole.fingerprint == engine.fingerprint and whole.second_per_grid_ts == 2.0
    with pytest.raises(Internal):
        engine.encode(frames[:, :28], plan)


@pytest.mark.parametrize("fps", [2.0, 0.5, 0.2])
def test_temporal_position_ids_follow_absolute_time(engine, captured, fps):
    plan = make_plan(8, fps)
    tokens = engine.encode(make_frames(plan, 4), plan)
    engine.generate(tokens, ["the dog jumps"], max_new_tokens=2)
    prefill, question = captured[0][:, 0], captured[1][:, 0]  # [3, L]
    video_ids = engine.tokenizer(prompt.video_prefix_text(tokens.n_tokens),
                                 add_special_tokens=False).input_ids
    is_video = torch.tensor(video_ids) == engine.video_token_id
    start = int(torch.nonzero(is_video)[0])
    per_step = tokens.n_tokens // plan.grid_t
    t = torch.arange(plan.grid_t).repeat_interleave(per_step)
    tps = engine.model.config.vision_config.tokens_per_second
    assert torch.equal(prefill[0, is_video], (tps * plan.second_per_grid_ts * t).long() + start)
    assert int(prefill[0, is_video].max()) == start + round(tps * (2 / fps) * (plan.grid_t - 1))
    # Same video ids as the model's own get_rope_index (which transformers computes differently only
    # for the text after the video).
    ids = torch.tensor([video_ids])
    ref, _ = engine.model.model.get_rope_index(
        ids, (ids == engine.video_token_id).int() * 2, video_grid_thw=torch.tensor([tokens.grid_thw]),
        second_per_grid_ts=torch.tensor([plan.second_per_grid_ts]))
    assert torch.equal(prefill[:, is_video], ref[:, 0, is_video])
    # Text after the video continues at max + 1, the question after that, all three axes equal.
    after = prefill[:, int(torch.nonzero(is_video)[-1]) + 1:]
    video_max = int(prefill[:, is_video].max())
    assert after[:, 0].tolist() == [video_max + 1] * 3
    assert question[0, 0] == video_max + 1 + after.shape[1]
    assert torch.equal(question[0], question[1]) and torch.equal(question[0], question[2])
    # The question's call also scores the "not in the video" answer after it (teacher forcing): the
    # first generated token takes the position right after the question itself.
    q_len = len(engine.tokenizer(prompt.question_suffix_text("the dog jumps"), add_special_tokens=False).input_ids)
    assert question.shape[1] == q_len + len(engine.absent_ids) - 1
    assert captured[2][:, 0, 0].tolist() == [int(question[0, 0]) + q_len] * 3  # first generated token


def test_mrope_positions_reference():
    ids = [5, 6, 9, 9, 9, 9, 9, 9, 9, 9, 7]
    pos, nxt = mrope_positions(ids, 9, (2, 4, 4), 4.0, 2, 2)
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 10, 10, 10, 10, 11]
    assert pos[1].tolist() == [0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 11]
    assert pos[2].tolist() == [0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 11]
    assert nxt == 12
    with pytest.raises(Internal):
        mrope_positions(ids[:-3], 9, (2, 4, 4), 4.0, 2, 2)


def test_prefix_reuse_gives_the_same_answers_with_less_work(engine):
    plan = make_plan(32, 0.5, 112, 112)  # 256 visual tokens
    tokens = engine.encode(make_frames(plan, 5), plan)
    seen: list[int] = []  # tokens through each language-model forward
    handle = engine.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        scratch = [engine.generate(tokens, [q], max_new_tokens=8)[0] for q in QUERIES]
        scratch_tokens, seen[:] = sum(seen), []
        prefix = engine.prefill(tokens)
        reused = engine.generate(tokens, QUERIES, max_new_tokens=8, prefix=prefix)
        reused_tokens = sum(seen)
    finally:
        handle.remove()
    assert [a.text for a in reused] == [a.text for a in scratch]
    assert all(a.text for a in reused) and len({a.text for a in reused}) > 1
    assert set(reused[0].stage_ms) == {"prefill", "generate"}
    # From scratch every question runs the prefix again; with reuse it runs once.
    assert scratch_tokens - reused_tokens == (len(QUERIES) - 1) * prefix.length
    # The prefix is untouched by its use: answering again gives the same.
    assert [a.text for a in engine.generate(tokens, QUERIES, max_new_tokens=8, prefix=prefix)] == \
        [a.text for a in reused]
    other = engine.encode(make_frames(plan, 6), plan)
    with pytest.raises(Internal):
        engine.generate(other, QUERIES[:1], prefix=prefix)


def test_no_state_leaks_between_videos(engine):
    plan_a, plan_b = make_plan(8, 2.0), make_plan(6, 0.2, 84, 56)
    a = engine.encode(make_frames(plan_a, 7), plan_a)
    b = engine.encode(make_frames(plan_b, 8), plan_b)
    b_alone = [x.text for x in engine.generate(b, QUERIES[:2], max_new_tokens=12)]
    engine.generate(a, QUERIES[:2], max_new_tokens=12)
    engine.model.model.rope_deltas = torch.tensor([[12345]])  # stale module state must not matter
    assert [x.text for x in engine.generate(b, QUERIES[:2], max_new_tokens=12)] == b_alone


def test_concurrent_callers_are_serialized(engine):
    plan = make_plan(8, 1.0)
    tokens = engine.encode(make_frames(plan, 9), plan)
    expected = [a.text for a in engine.generate(tokens, QUERIES, max_new_tokens=6)]
    results: list[list[str]] = []
    inside = {"now": 0, "most": 0}
    guard = threading.Lock()

    def enter(module, args, kwargs):
        with guard:
            inside["now"] += 1
            inside["most"] = max(inside["most"], inside["now"])
        time.sleep(0.002)  # widen the window: without the engine's lock, other threads get in here

    def leave(module, args, kwargs, output):
        with guard:
            inside["now"] -= 1

    lm = engine.model.model.language_model
    handles = [lm.register_forward_pre_hook(enter, with_kwargs=True),
               lm.register_forward_hook(leave, with_kwargs=True)]

    def run():
        results.append([a.text for a in engine.generate(tokens, QUERIES, max_new_tokens=6)])

    try:
        threads = [threading.Thread(target=run) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        for h in handles:
            h.remove()
    assert results == [expected] * 3
    assert inside["most"] == 1, "two threads were inside the model at once"


def test_long_prompt_raises_max_position_embeddings(tiny_model_dir, tmp_path, caplog):
    small = build_tiny_model(tmp_path / "small", seed=0, max_position_embeddings=64)
    eng = Engine.load(str(small))
    plan = make_plan(8, 0.2)  # temporal ids reach 2 * 10 * 3 = 60 past the system prompt
    frames = make_frames(plan, 10)
    tokens = eng.encode(frames, plan)
    with caplog.at_level(logging.WARNING, logger="moments.workers.model.engine"):
        got = eng.generate(tokens, ["the dog jumps"], max_new_tokens=8)
    limit = eng.model.config.text_config.max_position_embeddings
    assert limit > 64 and "max_position_embeddings" in caplog.text
    full = Engine.load(str(tiny_model_dir))
    assert got[0].text == full.generate(full.encode(frames, plan), ["the dog jumps"], max_new_tokens=8)[0].text


def test_cuda_errors_become_fatal(engine):
    plan = make_plan(4, 2.0)
    tokens = engine.encode(make_frames(plan, 11), plan)

    def boom(module, args, kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    handle = engine.model.model.language_model.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(FatalDeviceError):
            engine.generate(tokens, ["x"], max_new_tokens=2)
    finally:
        handle.remove()

    def other(module, args, kwargs):
        raise RuntimeError("shape mismatch")

    handle = engine.model.model.language_model.register_forward_pre_hook(other, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            engine.generate(tokens, ["x"], max_new_tokens=2)
    finally:
        handle.remove()
    assert engine.generate(tokens, ["x"], max_new_tokens=2)[0].text  # lock released, engine still usable


def test_pieces_add_up_to_the_text(engine):
    text = "The given query happens in 6.0 - 9.5 seconds."
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    probs = [0.5 + 0.5 * (k % 2) for k in range(len(ids))]
    decoded, pieces = engine._detokenize(ids, probs)
    assert decoded == text and "".join(p for p, _ in pieces) == text
    assert [pr for _, pr in pieces] == probs


def test_absence_score_is_the_teacher_forced_probability_of_the_absent_answer(engine):
    """absent_logprob equals the log-probability of the absence sentence computed token by token with
    transformers' own forward, on both decoders; the score is 1 - that probability (no calibration)."""
    plan = make_plan(8, 1.0)
    tokens = engine.encode(make_frames(plan, 13), plan)
    prefix = engine.prefill(tokens)
    [g] = engine.generate(tokens, ["the dog jumps"], max_new_tokens=6, prefix=prefix)
    q_ids = engine.tokenizer(prompt.question_suffix_text("the dog jumps"), add_special_tokens=False).input_ids
    ids = q_ids + engine.absent_ids
    embeds = engine.model.get_input_embeddings()(torch.tensor([ids]))
    cache = __import__("copy").deepcopy(prefix.cache)
    pos = torch.arange(prefix.next_position, prefix.next_position + len(ids)).expand(3, -1)
    with torch.inference_mode():
        logits = engine._language_model(embeds, pos, cache, last=len(ids))
    logp = torch.log_softmax(logits[len(q_ids) - 1:-1], -1)
    want = float(logp.gather(1, torch.tensor(engine.absent_ids)[:, None]).sum())
    assert g.absent_logprob == pytest.approx(want, abs=1e-4)
    assert engine.presence_score(g) == pytest.approx(1 - np.exp(want), rel=1e-4)
    # The teacher-forced tokens leave no trace: the answer is the one plain greedy decoding gives.
    again = engine.generate(tokens, ["the dog jumps"], max_new_tokens=6)[0]
    assert again.text == g.text


def test_awq_checkpoint_loads_by_dequantizing(tiny_awq_model_dir, caplog):
    from safetensors.torch import load_file

    from moments.workers.model.awq import dequantize_awq, native_awq_available

    if native_awq_available():
        pytest.skip("gptqmodel installed: transformers loads AWQ natively")
    with caplog.at_level(logging.INFO, logger="moments.workers.model.awq"):
        eng = Engine.load(str(tiny_awq_model_dir))
    assert "dequantizing" in caplog.text
    raw = load_file(str(tiny_awq_model_dir / "model.safetensors"))
    base = "model.layers.1.mlp.gate_proj"
    expected = dequantize_awq(raw[base + ".qweight"], raw[base + ".qzeros"], raw[base + ".scales"], 32,
                              dtype=torch.float32)
    assert torch.equal(eng.model.model.language_model.layers[1].mlp.gate_proj.weight.detach(), expected)
    assert torch.equal(eng.model.model.visual.merger.mlp[0].weight.detach(),
                       raw["visual.merger.mlp.0.weight"].float())
    plan = make_plan(4, 2.0)
    assert eng.generate(eng.encode(make_frames(plan, 12), plan), ["x"], max_new_tokens=4)[0].text


def test_segments_are_shifted_to_video_time():
    # A clip sampled from 30 s to 40 s: the model's "2 - 5 seconds" is 32 - 35 s of the video, and
    # nothing is said past the end of what it saw (40 s), however long the video is.
    tokens = VisualTokens(torch.zeros(2, 4), (1, 2, 2), 4.0, tuple(30.0 + 2 * i for i in range(5)), "x")
    answer = Generation("The given query happens in 2.0 - 5.0 seconds. Also 8 - 20 s.", None)
    segs = answer_segments(answer, tokens, 600.0)
    assert [(s.start_s, s.end_s) for s in segs] == [(32.0, 35.0), (38.0, 40.0)]
