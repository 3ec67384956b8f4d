"""Dequantizing AWQ loader that reads and dequantizes straight on the GPU.

``workers.awq.load_awq_model`` without gptqmodel dequantizes on the CPU in float32: minutes for a
7B. Here every tensor is read with ``safe_open(device=...)`` and the same
:func:`workers.awq.dequantize_awq` runs on the device (float32 product, then the model dtype:
the same values as the CPU path).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from workers.awq import dequantize_awq, empty_unquantized_model, hub_key_to_module_key

log = logging.getLogger(__name__)


def dequantized_state_dict_on(model_dir: Path, group_size: int, dtype: torch.dtype,
                              device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            names = list(sf.keys())
            for key in names:
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
    """The dequantizing branch of ``workers.awq.load_awq_model``, with the work done on ``device``."""
    model, group_size = empty_unquantized_model(model_dir, dtype=dtype, attn_implementation=attn_implementation)
    state = dequantized_state_dict_on(Path(model_dir), group_size, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.to(device)
    log.info("AWQ loaded by dequantizing on %s to %s Linear weights (gptqmodel not installed; "
             "no 4-bit kernels)", device, dtype)
    return model
