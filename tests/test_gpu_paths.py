"""The engine's GPU fast paths checked against the stock paths on the tiny model.

CPU parts run everywhere: the packed vision attention (block-diagonal SDPA) against transformers'
per-window loop, the static-KV decoder (without CUDA graphs) against the eager decoding loop, the
device-side AWQ loader against the CPU one. The CUDA parts (varlen kernel, CUDA graphs, uint8
patchify on the GPU) skip without a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from moments.workers.model.engine import Engine
from moments.workers.model.kernels import vision_attention as va
from moments.workers.model.preprocessing import VideoProcessing, pixel_values_videos
from tests.plans import QUERIES, make_frames, make_plan

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(str(tiny_model_dir), device="cpu", fast_decode=False)


def _vision(engine: Engine, frames: np.ndarray) -> torch.Tensor:
    pixels, grid = pixel_values_videos(frames, engine.processing)
    with torch.inference_mode():
        out = engine.model.get_video_features(pixels.to(engine.device, engine.dtype),
                                              torch.tensor([grid], device=engine.device))
    return out.pooler_output[0].float().cpu()


@pytest.mark.parametrize("size", [(112, 168), (224, 140)])  # several windows per frame, odd window counts
def test_packed_vision_attention_equals_the_window_loop(engine, size):
    plan = make_plan(6, 1.0, *size)
    frames = make_frames(plan, 21)
    assert engine.vision_attention == "loop"  # CPU default: transformers' own forward
    ref = _vision(engine, frames)
    try:
        assert va.install(engine.model, "sdpa_mask") == "sdpa_mask"
        got = _vision(engine, frames)
    finally:
        va.uninstall(engine.model)
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    assert torch.equal(_vision(engine, frames), ref)  # uninstall restores the stock forward


def test_fast_decoder_gives_the_eager_tokens(tiny_model_dir, engine):
    # Small buckets and growth steps: several chunks and buckets on the tiny model.
    fast = Engine.load(str(tiny_model_dir), device="cpu", fast_decode=True, decode_bucket=64, decode_grow=128)
    plan = make_plan(32, 0.5, 112, 112)  # 256 visual tokens
    tokens = engine.encode(make_frames(plan, 22), plan)
    prefix_e, prefix_f = engine.prefill(tokens), fast.prefill(tokens)
    eager = engine.generate(tokens, QUERIES, max_new_tokens=24, prefix=prefix_e)
    quick = fast.generate(tokens, QUERIES, max_new_tokens=24, prefix=prefix_f)
    assert [a.text for a in quick] == [a.text for a in eager]
    assert len({a.text for a in eager}) > 1 and all(a.text for a in eager)
    for q, e in zip(quick, eager):  # confidences come from the same probabilities
        assert [p for p, _ in q.pieces] == [p for p, _ in e.pieces]
        assert [x for _, x in q.pieces] == pytest.approx([x for _, x in e.pieces], rel=1e-3)
    assert set(quick[0].stage_ms) == {"prefill", "generate"}
    # The hot prefix stays loaded across questions, and the prefix object itself is untouched.
    assert fast._scheduler.decoder.slot_of((id(prefix_f.cache), prefix_f.length, prefix_f.key)) is not None
    assert [a.text for a in fast.generate(tokens, QUERIES[:2], max_new_tokens=24, prefix=prefix_f)] == \
        [a.text for a in eager[:2]]
    # Another video (another prefix) replaces it; then back to the first one.
    plan_b = make_plan(8, 0.2, 84, 56)
    b = engine.encode(make_frames(plan_b, 23), plan_b)
    assert [a.text for a in fast.generate(b, QUERIES[:2], max_new_tokens=16)] == \
        [a.text for a in engine.generate(b, QUERIES[:2], max_new_tokens=16)]
    assert [a.text for a in fast.generate(tokens, QUERIES[:1], max_new_tokens=24, prefix=prefix_f)] == \
        [eager[0].text]


def test_vision_tower_rewrites_are_exact(tiny_model_dir):
    eng = Engine.load(str(tiny_model_dir), device="cpu", fast_decode=False)
    frames = make_frames(make_plan(6, 1.0, 112, 168), 27)
    ref = _vision(eng, frames)
    changed = va.speed_up_vision_tower(eng.model, multiple=48)  # 64 -> 96 wide
    assert changed == {"mlp_padded": len(eng.model.model.visual.blocks), "patch_embed": True}
    assert eng.model.model.visual.blocks[0].mlp.gate_proj.weight.shape[0] == 96
    got = _vision(eng, frames)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_device_awq_loader_equals_the_cpu_loader(tiny_awq_model_dir):
    from moments.workers.model.awq import load_awq_model
    from moments.workers.model.loading import load_awq_dequantized_on_device

    ref = load_awq_model(tiny_awq_model_dir, dtype=torch.float32, device=torch.device("cpu"),
                         attn_implementation="sdpa").state_dict()
    got = load_awq_dequantized_on_device(tiny_awq_model_dir, dtype=torch.float32, device=torch.device("cpu"),
                                         attn_implementation="sdpa").state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@cuda
def test_cuda_patchify_equals_cpu():
    frames = make_frames(make_plan(4, 2.0), 24)
    cpu, grid = pixel_values_videos(frames, VideoProcessing())
    gpu, grid_gpu = pixel_values_videos(torch.from_numpy(frames).cuda(), VideoProcessing())
    assert grid == grid_gpu and torch.equal(gpu.cpu(), cpu)


@cuda
def test_cuda_varlen_vision_attention_matches_the_loop(tiny_model_dir):
    eng = Engine.load(str(tiny_model_dir), dtype="float16")
    if eng.vision_attention not in ("varlen", "flash_attn"):
        pytest.skip(f"no packed kernel here ({eng.vision_attention})")
    frames = make_frames(make_plan(8, 1.0, 224, 168), 25)
    got = _vision(eng, frames)
    va.uninstall(eng.model)
    ref = _vision(eng, frames)
    assert float((got - ref).norm() / ref.norm()) < 1e-2


@cuda
def test_cuda_graph_decoder_matches_eager(tiny_model_dir):
    eager = Engine.load(str(tiny_model_dir), dtype="float32", fast_decode=False)
    fast = Engine.load(str(tiny_model_dir), dtype="float32", fast_decode=True)
    plan = make_plan(16, 0.5, 112, 112)
    tokens = eager.encode(make_frames(plan, 26), plan)
    want = [a.text for a in eager.generate(tokens, QUERIES, max_new_tokens=24)]
    assert [a.text for a in fast.generate(tokens, QUERIES, max_new_tokens=24)] == want
    assert fast._scheduler.decoder.graphs and fast._scheduler.decoder._graphs


def _fresh(tiny_model_dir, **kw) -> Engine:
    return Engine.load(str(tiny_model_dir), device="cpu", fast_decode=False, **kw)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    os.environ.get("MOMENTS_TEST_COMPILE") != "1", reason="torch.compile on CPU: set MOMENTS_TEST_COMPILE=1"))])
def test_fused_vision_blocks_equal_the_loop(tiny_model_dir, compiled):
    eng = _fresh(tiny_model_dir)
    frames = make_frames(make_plan(6, 1.0, 112, 168), 31)
    ref = _vision(eng, frames)
    va.speed_up_vision_tower(eng.model, multiple=48)
    va.install(eng.model, "sdpa_mask")
    assert va.fuse_vision_blocks(eng.model, "sdpa_mask", compile=compiled) == len(eng.model.model.visual.blocks)
    got = _vision(eng, frames)
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    other = make_frames(make_plan(4, 1.0, 224, 140), 32)  # another token count: same graph when compiled
    got_other = _vision(eng, other)
    va.uninstall(eng.model)  # back to the stock block and attention on the same (shared) weights
    assert not any(getattr(b, "_moments_fused", False) for b in eng.model.model.visual.blocks)
    assert float((got_other - _vision(eng, other)).norm() / got_other.norm()) < 1e-5
    assert torch.equal(_vision(eng, frames), ref) or float((_vision(eng, frames) - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    os.environ.get("MOMENTS_TEST_COMPILE") != "1", reason="torch.compile on CPU: set MOMENTS_TEST_COMPILE=1"))])
def test_fused_prefill_gives_the_stock_cache(tiny_model_dir, compiled):
    eng = _fresh(tiny_model_dir)
    plan = make_plan(32, 0.5, 112, 112)
    tokens = eng.encode(make_frames(plan, 33), plan)
    assert not eng.prefill_fused  # CPU default: transformers' forward
    ref = eng.prefill(tokens)
    fused = _fresh(tiny_model_dir, fused_prefill=True, compile=compiled)
    assert fused.prefill_fused
    got = fused.prefill(tokens)
    assert (got.length, got.next_position) == (ref.length, ref.next_position)
    for a, b in zip(ref.cache.layers, got.cache.layers):
        assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape
        assert float((a.keys - b.keys).norm() / a.keys.norm()) < 1e-5
        assert float((a.values - b.values).norm() / a.values.norm()) < 1e-5
    want = [a.text for a in eng.generate(tokens, QUERIES, max_new_tokens=24, prefix=ref)]
    assert [a.text for a in fused.generate(tokens, QUERIES, max_new_tokens=24, prefix=got)] == want
    # The q/k/v and gate/up linears now view shared weights: the stock forward gives the same cache.
    again = _fresh(tiny_model_dir)
    again.model.load_state_dict(fused.model.state_dict())
    stock = again.prefill(tokens)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(ref.cache.layers, stock.cache.layers))


def test_stock_load_is_unmodified(tiny_model_dir):
    stock = Engine.load(str(tiny_model_dir), optimize=False)
    assert stock.vision_attention == "loop" and not stock.fast_decode and not stock.prefill_fused
    assert not stock.compile
    visual = stock.model.model.visual
    assert all("forward" not in vars(m) for m in stock.model.modules())  # no instance-level patches
    assert visual.blocks[0].mlp.gate_proj.out_features == stock.model.config.vision_config.intermediate_size


@cuda
def test_cuda_fused_compiled_vision_and_prefill(tiny_model_dir):
    eng = Engine.load(str(tiny_model_dir), dtype="float16")
    if eng.vision_attention not in ("varlen", "flash_attn"):
        pytest.skip(f"no packed kernel here ({eng.vision_attention})")
    assert any(getattr(b, "_moments_fused", False) for b in eng.model.model.visual.blocks)
    frames = make_frames(make_plan(8, 1.0, 224, 168), 34)
    got = _vision(eng, frames)
    stock = Engine.load(str(tiny_model_dir), dtype="float16", optimize=False)
    ref = _vision(stock, frames)
    assert float((got - ref).norm() / ref.norm()) < 1e-2
    plan = make_plan(16, 0.5, 112, 112)
    tokens = stock.encode(make_frames(plan, 35), plan)
    a, b = stock.prefill(tokens), eng.prefill(tokens)
    for x, y in zip(a.cache.layers, b.cache.layers):
        assert float((x.keys - y.keys).norm() / x.keys.norm()) < 1e-2


@cuda
def test_cuda_int4_logits_match_the_dequantized_fp16_path(tiny_awq_model_dir):
    """The AWQ checkpoint kept 4-bit (torch's int4 kernel, bf16) against the same weights dequantized
    to fp16: every position's logits close, the same argmax almost everywhere; the vision tower is not
    quantized."""
    from moments.workers.model.numerics import compare_logits
    from moments.workers.model.quant import Int4Linear

    int4 = Engine.load(str(tiny_awq_model_dir), device="cuda", awq_kernel="int4", compile=False)
    fp16 = Engine.load(str(tiny_awq_model_dir), device="cuda", awq_kernel="dequantize", dtype="float16", compile=False)
    try:
        assert int4.quantization == "awq-int4"
        assert any(isinstance(m, Int4Linear) for m in int4.model.model.language_model.modules())
        assert not any(isinstance(m, Int4Linear) for m in int4.model.model.visual.modules())
        plan = make_plan(8, 4.0)
        tokens = int4.encode(make_frames(plan, seed=3), plan)
        r = compare_logits(int4, fp16, tokens, QUERIES[0])
        assert r["positions"] > 20
        assert r["mean_abs"] < 0.05 * r["logit_scale"] and r["max_abs"] < 0.5 * r["logit_scale"] + 0.05
        assert r["argmax_same"] >= 0.9
    finally:
        int4.close()
        fp16.close()
