"""A tiny Qwen2.5-VL checkpoint for tests, written in the hub's on-disk layout.

Same classes and file set as ``Qwen/Qwen2.5-VL-7B-Instruct(-AWQ)`` (flat legacy ``config.json``,
``model.*`` / ``visual.*`` weight names, byte-level BPE ``tokenizer.json`` with the real special
tokens in the real order after the ordinary vocabulary, the real chat template, image and video
preprocessor configs), with tiny sizes and random weights. Nothing is downloaded: the tokenizer is
trained here on a generated corpus.

CLI: ``python -m moments.tools.tiny_model OUT [--awq] [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Qwen2 special tokens, in the order they follow the ordinary vocabulary (151643.. in the real model).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Tokens that are not "special" (kept in decoded text) in the hub tokenizer_config.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}

# The hub Qwen2.5-VL chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
VISION_HIDDEN = 32
VISION_HEADS = 2
VISION_DEPTH = 2
VISION_INTERMEDIATE = 64
BPE_VOCAB = 2048
AWQ_GROUP_SIZE = 32
"""AWQ group size for the tiny model: the hub uses 128, which does not divide 64-wide layers."""
AWQ_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_WORDS = (
    "the a an person man woman child dog cat car ball door window table chair kitchen steak pan "
    "oil salt pepper knife cup water phone book bag box shoe hat light laptop screen camera bike "
    "road street tree grass field room house wall floor bed sofa picture paper food bread egg "
    "opens closes picks puts takes holds throws catches runs walks sits stands jumps falls turns "
    "seasoning cooking cutting washing pouring eating drinking reading writing talking laughing "
    "smiling waving playing watching looking going coming entering leaving starts ends happens "
    "occurs describes video query content moment event scene shot frame second seconds minute "
    "minutes hour time start end begin from to between and or at in on up down into out of with "
    "when where what who how is are was were be been has have had does do did not no yes it its "
    "this that these those there here then now first last next before after during while again "
    "red blue green white black small large big little old new long short fast slow quickly "
    "slowly you are helpful assistant given described give answer question please json segment "
    "start_time end_time about around approximately near roughly"
).split()


def _corpus(rng: random.Random) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    pseudo = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(1500)]
    lines: list[str] = [" ".join(rng.sample(pseudo, 12)) for _ in range(600)]
    for _ in range(3000):
        a = rng.randint(0, 600) / rng.choice((1, 2, 10))
        b = a + rng.randint(1, 120) / rng.choice((1, 2, 10))
        phrase = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6)))
        ma, sa = divmod(a, 60)
        mb, sb = divmod(b, 60)
        lines.append(rng.choice((
            f"The given query happens in {a:.1f} - {b:.1f} seconds.",
            f"Give the query: '{phrase}', when does the described content occur in the video?",
            f"from {int(ma)}:{int(sa):02d} to {int(mb)}:{int(sb):02d}",
            f"00:{int(ma):02d}:{sa:04.1f} to 00:{int(mb):02d}:{sb:04.1f}",
            f"between {a:g} and {b:g} s",
            json.dumps([{"start_time": f"{int(ma):02d}:{sa:05.2f}", "end_time": f"{int(mb):02d}:{sb:05.2f}",
                         "description": phrase}]),
            f"{{\"start_time\": {a}, \"end_time\": {b}}}",
            phrase.capitalize() + ".",
            "You are a helpful assistant.",
            " ".join(str(rng.randint(0, 9999)) for _ in range(4)),
        )))
    return lines


def build_tokenizer(seed: int = 0, vocab_size: int = BPE_VOCAB):
    """Train a Qwen2-style byte-level BPE tokenizer on a generated corpus; specials go last."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    tok.add_special_tokens([
        AddedToken(t, special=t not in _NOT_SPECIAL, normalized=False) for t in SPECIAL_TOKENS
    ])
    return tok


def _tokenizer_config(tok) -> dict:
    decoder = {}
    for t in SPECIAL_TOKENS:
        decoder[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": t not in _NOT_SPECIAL,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:14]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _preprocessor_config() -> dict:
    return {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def _video_preprocessor_config() -> dict:
    cfg = _preprocessor_config()
    cfg.pop("image_processor_type")
    cfg["video_processor_type"] = "Qwen2VLVideoProcessor"
    cfg["size"] = {"shortest_edge": cfg.pop("min_pixels"), "longest_edge": cfg.pop("max_pixels")}
    return cfg


def _model_config(vocab_size: int, ids: dict[str, int], max_position_embeddings: int, dtype: str) -> dict:
    head_dim = TEXT_HIDDEN // TEXT_HEADS
    # The 7B splits head_dim/2 = 64 rotary pairs as [16, 24, 24]; same proportions here.
    half = head_dim // 2
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": TEXT_HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": TEXT_INTERMEDIATE,
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": TEXT_LAYERS,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": TEXT_HEADS,
        "num_hidden_layers": TEXT_LAYERS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": VISION_DEPTH,
            "hidden_act": "silu",
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "num_heads": VISION_HEADS,
            "in_chans": 3,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [VISION_DEPTH - 1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": section},
        "vocab_size": vocab_size,
    }


def legacy_key(key: str) -> str:
    """transformers v5 parameter name -> the hub checkpoint name (``model.layers.*``, ``visual.*``)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def build_tiny_model(out_dir, *, awq: bool = False, seed: int = 0,
                     max_position_embeddings: int = 32768) -> Path:
    """Write a complete tiny Qwen2.5-VL checkpoint to ``out_dir`` and return its path.

    Deterministic in ``seed``. With ``awq`` the language-model linears are stored in AutoAWQ GEMM
    format (4 bit, group size ``AWQ_GROUP_SIZE``) with the hub AWQ ``quantization_config``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from moments.workers.model.awq import quantize_awq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(seed)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = (n_tokens + 63) // 64 * 64  # padded like the hub model (152064 > 151665 tokens)
    dtype = "float16" if awq else "float32"
    cfg_dict = _model_config(vocab_size, ids, max_position_embeddings, dtype)

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(**json.loads(json.dumps(cfg_dict)))
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Random weights with enough spread that greedy decoding is not a coin toss between near-ties.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "embed_tokens" in name else 0.12))
    state = {legacy_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}

    if awq:
        cfg_dict["quantization_config"] = {
            "bits": 4,
            "group_size": AWQ_GROUP_SIZE,
            "modules_to_not_convert": ["visual"],
            "quant_method": "awq",
            "version": "gemm",
            "zero_point": True,
        }
        packed: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            parts = key.split(".")
            if key.startswith("model.layers.") and parts[-2] in AWQ_MODULES and parts[-1] == "weight":
                qweight, qzeros, scales = quantize_awq(value.float(), AWQ_GROUP_SIZE)
                base = key[: -len(".weight")]
                packed[base + ".qweight"] = qweight
                packed[base + ".qzeros"] = qzeros
                packed[base + ".scales"] = scales
            else:
                packed[key] = value.half()
        state = packed

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": False,
    }, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(
        json.dumps(_video_preprocessor_config(), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny Qwen2.5-VL checkpoint for tests.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--awq", action="store_true", help="store LM linears in AutoAWQ GEMM format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-position-embeddings", type=int, default=32768)
    args = parser.parse_args(argv)
    path = build_tiny_model(args.out, awq=args.awq, seed=args.seed,
                            max_position_embeddings=args.max_position_embeddings)
    print(path)


if __name__ == "__main__":
    main()
