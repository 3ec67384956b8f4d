"""AutoAWQ GEMM format: quantize/pack (for the tiny test model), unpack/dequantize, and loading.

Layout (AutoAWQ ``WQLinear_GEMM``, read by gptqmodel's AWQ kernels), for a Linear with weight
``[out, in]`` and group size ``g``:

- ``qweight``  int32 ``[in, out / 8]``: eight 4-bit values per word; nibble ``i`` (bits ``4i..4i+3``)
  of word ``c`` holds output column ``8c + AWQ_ORDER[i]``.
- ``qzeros``   int32 ``[in / g, out / 8]``: zero points, packed the same way (no ``-1`` offset, unlike GPTQ).
- ``scales``   fp16  ``[in / g, out]``.
- ``W[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o]``.

Loading: with ``gptqmodel`` importable, transformers loads the checkpoint natively (fused 4-bit
kernels). Otherwise the AWQ tensors are dequantized into plain ``Linear.weight`` at load time.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BITS = 4
PACK = 32 // BITS
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble ``i`` of a packed word holds column ``AWQ_ORDER[i]`` of its 8-column block."""
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""Unpacked nibble order -> natural column order (the inverse permutation of ``AWQ_ORDER``)."""


def quantize_awq(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit round-to-nearest quantization of ``weight [out, in]`` into packed AWQ GEMM tensors.

    Same rule as AutoAWQ (``scale = (max - min) / 15``, ``zero = -round(min / scale)``), except the
    integers are computed against the fp16-rounded scales, so ``dequantize_awq`` reproduces exactly
    the weights this quantizer intended.
    """
    out_f, in_f = weight.shape
    if in_f % group_size or out_f % PACK:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit group size {group_size} / pack {PACK}")
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    max_val = w.amax(dim=-1, keepdim=True)
    min_val = w.amin(dim=-1, keepdim=True)
    scales = ((max_val - min_val).clamp(min=1e-5) / (2**BITS - 1)).half().float()
    zeros = (-torch.round(min_val / scales)).clamp(0, 2**BITS - 1)
    q = (torch.round(w / scales) + zeros).clamp(0, 2**BITS - 1)
    intweight = q.reshape(out_f, in_f).t().contiguous().to(torch.int32)  # [in, out]
    intzeros = zeros.squeeze(-1).t().contiguous().to(torch.int32)  # [in/g, out]
    return pack_awq(intweight), pack_awq(intzeros), scales.squeeze(-1).t().contiguous().half()


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Pack int values ``[rows, cols]`` in 0..15 into int32 ``[rows, cols / 8]`` in AWQ order."""
    rows, cols = values.shape
    v = values.to(torch.int64).reshape(rows, cols // PACK, PACK)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    words = (v << shifts).sum(dim=-1)  # < 2**32, fits int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq`: int32 ``[rows, cols / 8]`` -> int ``[rows, cols]`` in natural column order."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=packed.device)
    nibbles = torch.bitwise_and(torch.bitwise_right_shift(packed[:, :, None], shifts), 2**BITS - 1)
    rows, words, _ = nibbles.shape
    return nibbles[:, :, list(AWQ_REVERSE_ORDER)].reshape(rows, words * PACK)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """AWQ GEMM tensors -> Linear weight ``[out, in]``.

    With ``dtype=float16`` this is bit-identical to AutoAWQ's ``dequantize_gemm`` (integer difference
    times the fp16 scale, rounded once to fp16); with ``float32`` the product is exact.
    """
    iweight = unpack_awq(qweight)  # [in, out]
    izeros = unpack_awq(qzeros).repeat_interleave(group_size, dim=0)  # [in, out]
    s = scales.repeat_interleave(group_size, dim=0)
    if iweight.shape != s.shape or iweight.shape != izeros.shape:
        raise ValueError(f"AWQ shapes disagree: qweight {tuple(iweight.shape)}, zeros {tuple(izeros.shape)}, "
                         f"scales {tuple(s.shape)} (group size {group_size})")
    w = (iweight - izeros).to(dtype) * s.to(dtype)
    return w.t().contiguous()


def native_awq_available() -> bool:
    """Whether transformers can load AWQ checkpoints itself (it needs gptqmodel in v5)."""
    return importlib.util.find_spec("gptqmodel") is not None


def hub_key_to_module_key(key: str) -> str:
    """Hub Qwen2.5-VL checkpoint name (``model.layers.*``, ``visual.*``) -> transformers v5 name."""
    if key.startswith(("model.language_model.", "model.visual.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def dequantized_state_dict(model_dir: Path, group_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read every ``*.safetensors`` in ``model_dir``, dequantizing AWQ triplets into ``*.weight``."""
    from safetensors.torch import load_file

    raw: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        raw.update(load_file(str(f)))
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key.endswith((".qzeros", ".scales")):
            continue
        if key.endswith(".qweight"):
            base = key[: -len(".qweight")]
            w = dequantize_awq(value, raw[base + ".qzeros"], raw[base + ".scales"], group_size, dtype=torch.float32)
            state[hub_key_to_module_key(base + ".weight")] = w.to(dtype)
        else:
            state[hub_key_to_module_key(key)] = value.to(dtype) if value.is_floating_point() else value
    return state


def check_awq_config(qcfg: dict) -> int:
    """The group size of a runnable AWQ GEMM config; a QuantizationError naming the field otherwise."""
    from moments.workers.model.quant import QuantizationError

    if qcfg.get("bits", 4) != BITS:
        raise QuantizationError(f"{qcfg.get('bits')} bits; only {BITS}-bit AWQ runs here", "quantization_config.bits")
    if str(qcfg.get("version", "gemm")).lower() != "gemm":
        raise QuantizationError(f"AWQ version {qcfg.get('version')!r}; only the GEMM layout runs here",
                                "quantization_config.version")
    if not qcfg.get("zero_point", True):
        raise QuantizationError("symmetric AWQ (no zero points) is not supported", "quantization_config.zero_point")
    group = qcfg.get("group_size")
    if not isinstance(group, int) or group <= 0 or group % 8:
        raise QuantizationError(f"group size {group!r} must be a positive multiple of 8",
                                "quantization_config.group_size")
    return group


def check_awq_tensors(base: str, qweight, qzeros, scales, group_size: int) -> None:
    """Raise QuantizationError naming the tensor when one is missing or the shapes disagree."""
    from moments.workers.model.quant import QuantizationError

    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if t is None:
            raise QuantizationError("missing from the checkpoint", f"{base}.{name}")
    in_f, words = qweight.shape
    if in_f % group_size:
        raise QuantizationError(f"input width {in_f} is not a multiple of the group size {group_size}",
                                f"{base}.qweight")
    if tuple(qzeros.shape) != (in_f // group_size, words):
        raise QuantizationError(f"shape {tuple(qzeros.shape)}, expected {(in_f // group_size, words)}",
                                f"{base}.qzeros")
    if tuple(scales.shape) != (in_f // group_size, words * PACK):
        raise QuantizationError(f"shape {tuple(scales.shape)}, expected {(in_f // group_size, words * PACK)}",
                                f"{base}.scales")


def fix_modules_to_not_convert(names: list[str] | None) -> list[str]:
    """The published Qwen2.5-VL AWQ config says ``["visual"]``; transformers v5 names the tower
    ``model.visual.*`` and matches an entry only at a name's start or end, so ``"visual"`` matches
    nothing and the vision tower gets quantized (its fp16 weights dropped, silently). Entries that
    name the hub layout's top-level modules are rewritten to v5 names."""
    out = []
    for name in names or []:
        out.append("model.visual" if name in ("visual", "visual.") else
                   ("model.language_model." + name[len("model."):] if name.startswith("model.layers") else name))
    return out or ["model.visual"]


def empty_unquantized_model(model_dir: Path, *, dtype: torch.dtype, attn_implementation: str):
    """A weightless (meta) plain-Linear model for an AWQ checkpoint, and its group size."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    qcfg = json.loads((Path(model_dir) / "config.json").read_text())["quantization_config"]
    group = check_awq_config(qcfg)
    config = AutoConfig.from_pretrained(str(model_dir))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._attn_implementation = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    return model, group


def load_awq_gptqmodel(model_dir: Path, *, dtype: torch.dtype, device: torch.device, attn_implementation: str):
    """transformers v5's own AWQ path (gptqmodel kernels), with the vision tower kept unquantized."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(str(model_dir))
    qcfg = config.quantization_config
    names = qcfg.get("modules_to_not_convert") if isinstance(qcfg, dict) else getattr(qcfg, "modules_to_not_convert", None)
    fixed = fix_modules_to_not_convert(names)
    if isinstance(qcfg, dict):
        qcfg["modules_to_not_convert"] = fixed
    else:
        qcfg.modules_to_not_convert = fixed
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(model_dir), config=config, dtype=dtype, device_map=str(device), attn_implementation=attn_implementation)
    quantized_vision = [n for n, m in model.model.visual.named_modules() if "Linear" in type(m).__name__
                        and type(m) is not torch.nn.Linear]
    if quantized_vision:
        raise RuntimeError(f"gptqmodel quantized the vision tower ({quantized_vision[:3]}...): its weights were dropped")
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    log.info("AWQ loaded through gptqmodel: kernel %s", type(q_proj).__name__)
    return model


def load_awq_model(model_dir: Path, *, dtype: torch.dtype, device: torch.device, attn_implementation: str):
    """Load an AWQ Qwen2.5-VL checkpoint by dequantizing it to plain Linear weights (on the CPU)."""
    model, group_size = empty_unquantized_model(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    state = dequantized_state_dict(model_dir, group_size, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device)
    log.info("AWQ loaded by dequantizing to %s Linear weights (no 4-bit kernels)", dtype)
    return model
