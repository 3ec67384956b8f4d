"""Helpers shared by the fused kernels: the models' RMSNorm and rotate-half, and compiled calls."""

from __future__ import annotations

import logging

import torch

from moments.workers.model.device_errors import is_device_error

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' Qwen2_5_VLRMSNorm, operation for operation (fp32 statistics, cast back, scale).
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)



_COMPILED: dict[str, object] = {}
_COMPILE_FAILED: set[str] = set()


def run_compiled(name: str, fn, *args, dynamic: dict[int, int] | None = None):
    """``fn(*args)`` through ``torch.compile`` (compiled once per process and name).

    ``dynamic`` maps argument index -> dimension to mark dynamic (the token count), so one graph
    serves every chunk / prompt length. If compiling fails (not a device error, not out of memory),
    the name falls back to eager ``fn`` for the rest of the process, with a warning.
    """
    if name in _COMPILE_FAILED:
        return fn(*args)
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    for i, dim in (dynamic or {}).items():
        torch._dynamo.maybe_mark_dynamic(args[i], dim)
    try:
        return _COMPILED[name](*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        if is_device_error(exc):
            raise
        log.warning("torch.compile of %s failed (%s: %s); running it eagerly", name, type(exc).__name__,
                    str(exc)[:500])
        _COMPILE_FAILED.add(name)
        return fn(*args)
