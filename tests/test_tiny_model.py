"""The tiny checkpoint loads like the hub model; the AWQ GEMM format round-trips bit-exactly."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moments.workers.model import prompt
from moments.workers.model.awq import AWQ_ORDER, dequantize_awq, hub_key_to_module_key, pack_awq, quantize_awq, unpack_awq
from moments.tools.tiny_model import AWQ_GROUP_SIZE, SPECIAL_TOKENS, build_tiny_model


def test_checkpoint_loads_with_the_real_classes(tiny_model_dir):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_model_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = model.config
    assert cfg.model_type == "qwen2_5_vl"
    text, vision = cfg.text_config, cfg.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (64, 2, 2)
    assert vision.out_hidden_size == text.hidden_size and vision.tokens_per_second == 2
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (14, 2, 2)
    assert vision.fullatt_block_indexes == [vision.depth - 1]

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert type(tok).__name__ == "Qwen2Tokenizer"
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    # The real layout: specials follow the ordinary vocabulary, in order (151643, 151644, ...).
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert ids[0] == len(tok) - len(SPECIAL_TOKENS)
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert text.vocab_size >= len(tok) and 1000 <= len(tok) <= 4096
    assert tok.eos_token == "<|im_end|>"

    size = sum(f.stat().st_size for f in tiny_model_dir.iterdir())
    assert size < 5 * 1024 * 1024


def test_tokenizer_round_trips_and_renders_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    answer = "The given query happens in 64.0 - 72.0 seconds."
    ids = tok(answer, add_special_tokens=False).input_ids
    assert tok.decode(ids) == answer
    assert {"6", "4", "7", "2"} <= set(tok.convert_ids_to_tokens(ids))  # Qwen splits digits one by one
    assert tok("héllo ✓ 日本", add_special_tokens=False).input_ids  # byte-level: nothing is unknown
    assert tok.decode(tok("héllo ✓ 日本", add_special_tokens=False).input_ids) == "héllo ✓ 日本"

    rendered = tok.apply_chat_template(prompt.grounding_messages("seasoning the steak"), tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == prompt.video_prefix_text(1) + prompt.question_suffix_text("seasoning the steak")
    # Prefix and question tokenize independently: their concatenation is the joint tokenization.
    n = 7
    joint = tok(prompt.video_prefix_text(n) + prompt.question_suffix_text("a dog runs"),
                add_special_tokens=False).input_ids
    split = (tok(prompt.video_prefix_text(n), add_special_tokens=False).input_ids
             + tok(prompt.question_suffix_text("a dog runs"), add_special_tokens=False).input_ids)
    assert joint == split
    assert joint.count(tok.convert_tokens_to_ids("<|video_pad|>")) == n


def test_auto_processor_reads_it(tiny_model_dir):
    pytest.importorskip("torchvision")  # the hub processors need torchvision (not on the CPU test image)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_model_dir))
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    assert type(proc.video_processor).__name__ == "Qwen2VLVideoProcessor"


def test_builder_is_deterministic(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_awq_checkpoint_matches_the_hub_layout(tiny_model_dir, tiny_awq_model_dir):
    cfg = json.loads((tiny_awq_model_dir / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "bits": 4, "group_size": AWQ_GROUP_SIZE, "modules_to_not_convert": ["visual"],
        "quant_method": "awq", "version": "gemm", "zero_point": True,
    }
    q = load_file(str(tiny_awq_model_dir / "model.safetensors"))
    plain = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not any(k.startswith("visual.") and k.endswith("qweight") for k in q)
    quantized = [k[: -len(".qweight")] for k in q if k.endswith(".qweight")]
    assert len(quantized) == 2 * 7  # q/k/v/o + gate/up/down in both layers
    for base in quantized:
        w = plain[base + ".weight"]  # same seed: the fp32 weights the AWQ ones were made from
        out_f, in_f = w.shape
        assert q[base + ".qweight"].dtype == torch.int32 and q[base + ".qweight"].shape == (in_f, out_f // 8)
        assert q[base + ".qzeros"].shape == (in_f // AWQ_GROUP_SIZE, out_f // 8)
        assert q[base + ".scales"].dtype == torch.float16
        assert q[base + ".scales"].shape == (in_f // AWQ_GROUP_SIZE, out_f)
        deq = dequantize_awq(q[base + ".qweight"], q[base + ".qzeros"], q[base + ".scales"], AWQ_GROUP_SIZE,
                             dtype=torch.float32)
        # Round-to-nearest with an integer zero point: within one step everywhere (half a step but at
        # the clipped ends), a quarter step on average; a packing-order mistake moves whole columns.
        step = q[base + ".scales"].float().repeat_interleave(AWQ_GROUP_SIZE, dim=0).t()
        err = (deq - w).abs() / step
        assert float(err.max()) <= 1.0 and float(err.mean()) < 0.3, base
    assert hub_key_to_module_key("model.layers.0.mlp.up_proj.weight") == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert hub_key_to_module_key("visual.merger.mlp.0.weight") == "model.visual.merger.mlp.0.weight"


# --- AWQ packing and dequantization, bit-exact --------------------------------------------------------

def test_pack_order_hand_computed():
    row = torch.arange(8, dtype=torch.int32)[None]  # column c holds value c
    word = pack_awq(row)
    # Nibble i holds column AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7): 0x75316420.
    assert int(word[0, 0]) == 0x75316420
    assert unpack_awq(torch.tensor([[0x75316420]], dtype=torch.int32)).tolist() == [list(range(8))]
    # A high nibble >= 8 makes the int32 negative: still unpacked right.
    neg = torch.tensor([[15, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.int32)
    assert int(pack_awq(neg)[0, 0]) < 0
    assert unpack_awq(pack_awq(neg)).tolist() == neg.tolist()


def _reference_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Element by element, straight from the format description."""
    rows, words = packed.shape
    out = torch.zeros(rows, words * 8, dtype=torch.int64)
    for r in range(rows):
        for c in range(words * 8):
            nibble = AWQ_ORDER.index(c % 8)
            out[r, c] = (int(packed[r, c // 8]) & 0xFFFFFFFF) >> (4 * nibble) & 0xF
    return out


def test_dequantize_hand_computed():
    in_f, out_f, g = 64, 16, 32
    q = torch.tensor([[(i + o) % 16 for o in range(out_f)] for i in range(in_f)], dtype=torch.int32)
    z = torch.tensor([[(o + gi) % 16 for o in range(out_f)] for gi in range(in_f // g)], dtype=torch.int32)
    s = torch.tensor([[0.5 * (o + 1) + gi for o in range(out_f)] for gi in range(in_f // g)], dtype=torch.float16)
    w = dequantize_awq(pack_awq(q), pack_awq(z), s, g, dtype=torch.float32)
    assert w.shape == (out_f, in_f)
    for o in range(out_f):
        for i in range(in_f):
            gi = i // g
            assert float(w[o, i]) == ((i + o) % 16 - (o + gi) % 16) * (0.5 * (o + 1) + gi)


def test_quantize_pack_dequantize_against_independent_reference():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 96, generator=gen)
    g = 32
    qweight, qzeros, scales = quantize_awq(weight, g)
    assert torch.equal(_reference_unpack(qweight), unpack_awq(qweight).long())
    assert torch.equal(_reference_unpack(qzeros), unpack_awq(qzeros).long())
    # Independent quantizer: loop over groups, AutoAWQ's rule with the fp16 scale.
    expected = torch.empty_like(weight)
    for o in range(weight.shape[0]):
        for gi in range(weight.shape[1] // g):
            chunk = weight[o, gi * g:(gi + 1) * g]
            f32 = np.float32
            scale = float(np.float16((f32(chunk.max()) - f32(chunk.min())) / f32(15)))
            zero = min(max(-float(np.round(f32(chunk.min()) / f32(scale))), 0), 15)
            assert float(scales[gi, o]) == scale
            assert int(_reference_unpack(qzeros)[gi, o]) == zero
            for i, x in enumerate(chunk.tolist()):
                qv = min(max(float(np.round(f32(x) / f32(scale))) + zero, 0), 15)
                expected[o, gi * g + i] = (qv - zero) * scale
    got32 = dequantize_awq(qweight, qzeros, scales, g, dtype=torch.float32)
    assert torch.equal(got32, expected)
    assert float((got32 - weight).abs().max()) <= float(scales.float().max()) * 0.5 + 1e-6
    # fp16 output = the exact product rounded once (what AutoAWQ's dequantize_gemm yields).
    assert torch.equal(dequantize_awq(qweight, qzeros, scales, g, dtype=torch.float16), got32.half())
