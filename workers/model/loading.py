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
    check_awq_tensors,
    dequantize_awq,
    empty_unquantized_model,
    hub_key_to_module_key,
    load_awq_gptqmodel,
    load_awq_model,
    native_awq_available,
)
from moments.workers.model.preprocessing import VideoProcessing
from moments.workers.model.quant import Int4Linear, QuantizationError, int4_kernel_available

log = logging.getLogger(__name__)

CALIBRATION_FILE = "moments_calibration.json"
"""Per-checkpoint score calibration (Platt ``a``, ``b`` over the raw presence log-odds), fitted by
``moments eval --write-calibration`` on held-out annotations with absent queries."""
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
    calibration: dict[str, float] = field(default_factory=dict)


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


def calibration(model_dir: Path) -> dict[str, float]:
    """The checkpoint's score calibration ({} when it has none: raw probabilities)."""
    f = Path(model_dir) / CALIBRATION_FILE
    if not f.is_file():
        return {}
    d = json.loads(f.read_text())
    return {k: float(d[k]) for k in ("a", "b") if k in d}


AWQ_KERNELS = ("auto", "int4", "gptqmodel", "dequantize")


def awq_kernel_for(kernel: str, device: torch.device) -> str:
    """``auto``: torch's int4 kernel on CUDA, else dequantize (CPU)."""
    if kernel not in AWQ_KERNELS:
        raise ValueError(f"awq_kernel {kernel!r}: one of {', '.join(AWQ_KERNELS)}")
    if kernel == "auto":
        return "int4" if int4_kernel_available(device) else "dequantize"
    return kernel


def load_checkpoint(model: str, *, device: torch.device, dtype: torch.dtype, attn_implementation: str,
                    awq_kernel: str = "auto") -> Checkpoint:
    """Load a checkpoint. An AWQ one runs with ``awq_kernel`` (see :data:`AWQ_KERNELS`); a checkpoint
    the kernels cannot run raises QuantizationError naming the field; a kernel that cannot be built
    or checked here falls back to dequantized weights with one warning, and ``quantization`` says which."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model_dir = resolve_dir(model)
    config = json.loads((model_dir / "config.json").read_text())
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant == "awq":
        m, quantization = _load_awq(model_dir, awq_kernel_for(awq_kernel, device), device=device, dtype=dtype,
                                    attn_implementation=attn_implementation)
    else:
        m = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation=attn_implementation).to(device)
        quantization = "none"
    m.eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return Checkpoint(model=m, tokenizer=tok, directory=model_dir, revision=revision(model_dir),
                      processing=VideoProcessing.from_model_dir(model_dir), quantization=quantization,
                      sampling_bounds=sampling_bounds(model_dir), calibration=calibration(model_dir))


def _load_awq(model_dir: Path, kernel: str, *, device: torch.device, dtype: torch.dtype, attn_implementation: str):
    kwargs = dict(device=device, attn_implementation=attn_implementation)
    if kernel == "int4":
        try:
            return load_awq_int4(model_dir, dtype=dtype, **kwargs), "awq-int4"
        except QuantizationError as exc:
            if exc.field != "kernel":
                raise  # the checkpoint is at fault: no fallback hides it
            log.warning("torch's int4 kernel is unusable here (%s): running AWQ dequantized", exc)
    elif kernel == "gptqmodel":
        if not native_awq_available():
            log.warning("awq_kernel gptqmodel asked for but gptqmodel is not installed: running AWQ dequantized")
        else:
            try:
                return load_awq_gptqmodel(model_dir, dtype=dtype, **kwargs), "awq-gptqmodel"
            except QuantizationError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. its kernels failed to build: fall back, say why
                log.warning("gptqmodel could not load the checkpoint (%s: %s): running AWQ dequantized",
                            type(exc).__name__, str(exc)[:300])
    if device.type == "cuda":
        return load_awq_dequantized_on_device(model_dir, dtype=dtype, **kwargs), "awq-dequantized"
    return load_awq_model(model_dir, dtype=dtype, **kwargs), "awq-dequantized"


def load_awq_int4(model_dir: Path, *, dtype: torch.dtype, device: torch.device, attn_implementation: str):
    """An AWQ checkpoint with its language-model linears kept 4-bit (:class:`.quant.Int4Linear`) and
    everything else (embeddings, norms, lm_head, the vision tower) in ``dtype`` on ``device``."""
    from safetensors import safe_open

    model, group_size = empty_unquantized_model(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    triplets: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                for suffix in (".qweight", ".qzeros", ".scales"):
                    if key.endswith(suffix):
                        triplets.setdefault(key[: -len(suffix)], {})[suffix[1:]] = sf.get_tensor(key)
                        break
                else:
                    value = sf.get_tensor(key)
                    state[hub_key_to_module_key(key)] = value.to(device, dtype) if value.is_floating_point() \
                        else value.to(device)
    for base, parts in triplets.items():
        name = hub_key_to_module_key(base + ".weight")[: -len(".weight")]
        check_awq_tensors(base, parts.get("qweight"), parts.get("qzeros"), parts.get("scales"), group_size)
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear):
            raise QuantizationError("names no linear layer of the model", f"{base}.qweight")
        if (linear.in_features, linear.out_features) != (parts["qweight"].shape[0], parts["qweight"].shape[1] * 8):
            raise QuantizationError(f"shape {tuple(parts['qweight'].shape)} does not fit the layer "
                                    f"[{linear.out_features}, {linear.in_features}]", f"{base}.qweight")
        bias = state.pop(name + ".bias", None)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, Int4Linear(parts["qweight"], parts["qzeros"], parts["scales"], bias,
                                                        group_size, device=device, dtype=dtype))
        del parts
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False) or \
            getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.language_model.embed_tokens.weight  # the 3B ties them
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta or unexpected:
        raise QuantizationError(f"missing {still_meta[:3]}, unexpected {unexpected[:3]}", "checkpoint")
    model.to(device)
    n = sum(isinstance(m, Int4Linear) for m in model.modules())
    log.info("AWQ loaded with %d linears kept 4-bit (%s), the rest as %s", n,
             "torch int4 kernel" if int4_kernel_available(device) else "dequantized per call", dtype)
    return model


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
