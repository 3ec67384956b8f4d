"""Loading a Qwen2.5-VL checkpoint: a local folder or a hub id already in the local cache.

Plain checkpoints load through transformers. AWQ checkpoints (``quantization_config.quant_method
== "awq"``) load through gptqmodel when it is importable (transformers v5's path), else by
dequantizing the 4-bit tensors into plain ``Linear`` weights (on the GPU when the model goes there:
minutes less for a 7B than doing it on the CPU in float32). A checkpoint may carry
``moments_sampling.json``: the sampling bounds it was trained with (the tiny grounder), which
always bound the sampling plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moments.workers.model.awq import (
    dequantize_awq,
    empty_unquantized_model,
    hub_key_to_module_key,
    load_awq_model,
    native_awq_available,
)
from moments.workers.model.preprocessing import VideoProcessing

log = logging.getLogger(__name__)

SAMPLING_FILE = "moments_sampling.json"
"""Per-checkpoint sampling bounds (``min_pixels``, ``max_pixels``, ``max_frames``, ``budget_tokens``)."""
BOUND_KEYS = ("min_pixels", "max_pixels", "max_frames", "budget_tokens")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint and the facts about it the engine needs."""

    model: object
    tokenizer: object
    directory: Path
    revision: str
    """The hub snapshot commit, or a hash of the config and weight file sizes."""
    processing: VideoProcessing
    quantization: str
    """"none", or how AWQ weights are executed (e.g. "awq-gptqmodel", "awq-dequantized")."""
    sampling_bounds: dict[str, int] = field(default_factory=dict)


def resolve_dir(model: str) -> Path:
    model_dir = Path(model)
    if not (model_dir / "config.json").exists():
        from huggingface_hub import snapshot_download

        model_dir = Path(snapshot_download(model))
    return model_dir


def revision(model_dir: Path) -> str:
    if "snapshots" in model_dir.parts:  # a hub cache snapshot: the folder is the commit
        return model_dir.name
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def sampling_bounds(model_dir: Path) -> dict[str, int]:
    """The bounds in a checkpoint's ``moments_sampling.json`` ({} when it has none)."""
    f = Path(model_dir) / SAMPLING_FILE
    if not f.is_file():
        return {}
    return {k: int(v) for k, v in json.loads(f.read_text()).items() if k in BOUND_KEYS}


def load_checkpoint(model: str, *, device: torch.device, dtype: torch.dtype, attn_implementation: str) -> Checkpoint:
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model_dir = resolve_dir(model)
    config = json.loads((model_dir / "config.json").read_text())
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant == "awq" and device.type == "cuda" and not native_awq_available():
        m = load_awq_dequantized_on_device(model_dir, dtype=dtype, device=device,
                                           attn_implementation=attn_implementation)
        quantization = "awq-dequantized"
    elif quant == "awq":
        m = load_awq_model(model_dir, dtype=dtype, device=device, attn_implementation=attn_implementation)
        quantization = "awq-gptqmodel" if native_awq_available() else "awq-dequantized"
    else:
        m = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation=attn_implementation).to(device)
        quantization = "none"
    m.eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return Checkpoint(model=m, tokenizer=tok, directory=model_dir, revision=revision(model_dir),
                      processing=VideoProcessing.from_model_dir(model_dir), quantization=quantization,
                      sampling_bounds=sampling_bounds(model_dir))


def dequantized_state_dict_on(model_dir: Path, group_size: int, dtype: torch.dtype,
                              device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor read with ``safe_open(device=...)``; AWQ triplets dequantized there (float32
    product, then ``dtype``: the same values as the CPU path)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            for key in list(sf.keys()):
                if key.endswith((".qzeros", ".scales")):
                    continue
                if key.endswith(".qweight"):
                    base = key[: -len(".qweight")]
                    w = dequantize_awq(sf.get_tensor(key), sf.get_tensor(base + ".qzeros"),
                                       sf.get_tensor(base + ".scales"), group_size, dtype=torch.float32)
                    state[hub_key_to_module_key(base + ".weight")] = w.to(dtype)
                    del w
                else:
                    value = sf.get_tensor(key)
                    state[hub_key_to_module_key(key)] = value.to(dtype) if value.is_floating_point() else value
    return state


def load_awq_dequantized_on_device(model_dir: Path, *, dtype: torch.dtype, device: torch.device,
                                   attn_implementation: str):
    """The dequantizing branch of :func:`load_awq_model`, with the work done on ``device``."""
    model, group_size = empty_unquantized_model(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    state = dequantized_state_dict_on(Path(model_dir), group_size, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.to(device)
    log.info("AWQ loaded by dequantizing on %s to %s Linear weights (gptqmodel not installed; "
             "no 4-bit kernels)", device, dtype)
    return model
