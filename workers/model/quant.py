"""AWQ weights kept 4-bit on the GPU: decode on torch's own int4 kernel, prefill on cuBLAS.

An AWQ GEMM checkpoint stores each language-model linear as ``qweight``/``qzeros``/``scales``
(:mod:`.awq`). :class:`Int4Linear` keeps it 4-bit:

* **Decode and short inputs** (at most ``INT4_KERNEL_MAX_ROWS`` rows): ``torch._weight_int4pack_mm``,
  PyTorch's tinygemm kernel (bf16 activations, groups of 32-256): the weights are read once as
  4-bit, which is what bounds decoding. The AWQ integers convert exactly: tinygemm computes
  ``(q - 8) * scale + zero`` per group, so ``zero = (8 - z) * scale`` for AWQ's ``(q - z) * scale``.
* **Prefill** (many rows): tinygemm is slow at large M, so the layer's weight is dequantized for
  the call (the same :func:`.awq.dequantize_awq` as the dequantizing loader) and multiplied by
  cuBLAS. The AWQ tensors for that come from a pinned host copy, so GPU memory holds only the
  4-bit weights; :class:`.kernels.prefill.FusedPrefill` fetches the next layer's copy while the
  current one computes.

Elsewhere (CPU: tests) the module dequantizes per call from the AWQ tensors it keeps. The int4
layout torch expects is checked against the exact dequantization once per process
(:func:`check_kernel`); a mismatch is an error at load, never wrong numbers mid-job.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F

from moments.workers.model.awq import dequantize_awq, unpack_awq

log = logging.getLogger(__name__)

INT4_KERNEL_MAX_ROWS = 256
"""Up to this many rows (tokens x batch: every batched decode step, 16 slots x 16 lanes) the int4
kernel runs; above it (prefill), dequantize + cuBLAS. A step being captured as a CUDA graph always
takes the kernel: a graph must never copy the weights from the host."""
TINYGEMM_GROUPS = (32, 64, 128, 256)
_CHECKED: dict[str, bool] = {}
_CHECK_LOCK = threading.Lock()


class QuantizationError(ValueError):
    """A checkpoint the 4-bit kernels cannot run; ``field`` names the config entry or tensor at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def int4_kernel_available(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(torch, "_weight_int4pack_mm") and \
        hasattr(torch, "_convert_weight_to_int4pack")


def inner_k_tiles(in_features: int) -> int:
    """The largest tinygemm tile count (8, 4, 2) that divides the input width (in 16-column tiles)."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    raise QuantizationError(f"input width {in_features} is not a multiple of 32", "in_features")


def to_tinygemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                *, high_nibble_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ GEMM tensors (on a CUDA device) -> (int4 packed weight, scales_and_zeros) for tinygemm."""
    q = unpack_awq(qweight).t().contiguous()  # [out, in], 0..15
    even, odd = q[:, ::2], q[:, 1::2]
    packed = ((even << 4) | odd) if high_nibble_first else ((odd << 4) | even)
    packed = torch._convert_weight_to_int4pack(packed.to(torch.uint8).contiguous(), inner_k_tiles(q.shape[1]))
    z = unpack_awq(qzeros).float()  # [in / g, out]
    s = scales.float()
    scales_and_zeros = torch.stack([s, (8.0 - z) * s], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros


def check_kernel(device: torch.device, group_size: int) -> bool:
    """Which nibble order makes torch's int4 kernel equal the exact dequantization (once per process);
    raises QuantizationError when neither does."""
    key = f"{device}:{group_size}"
    with _CHECK_LOCK:
        if key in _CHECKED:
            return _CHECKED[key]
        from moments.workers.model.awq import quantize_awq

        gen = torch.Generator(device="cpu").manual_seed(0)
        w = torch.randn(256, 512, generator=gen) * 0.05
        qw, qz, sc = (t.to(device) for t in quantize_awq(w, group_size))
        x = torch.randn(8, 512, generator=gen).to(device, torch.bfloat16)
        ref = x.float() @ dequantize_awq(qw, qz, sc, group_size, dtype=torch.float32).t()
        errors = []
        for order in (True, False):
            try:
                packed, sz = to_tinygemm(qw, qz, sc, group_size, high_nibble_first=order)
                got = torch._weight_int4pack_mm(x, packed, group_size, sz).float()
            except RuntimeError as exc:  # e.g. a torch whose kernel takes another layout
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            err = float((got - ref).norm() / ref.norm())
            if err < 2e-2:
                _CHECKED[key] = order
                return order
            errors.append(f"relative error {err:.3g}")
        raise QuantizationError("torch's int4 kernel does not reproduce the AWQ dequantization on this device "
                                f"({'; '.join(errors)})", "kernel")


class Int4Linear(torch.nn.Module):
    """A Linear whose weight stays 4-bit; see the module docstring."""

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = int(qweight.shape[0])
        self.out_features = int(qweight.shape[1]) * 8
        self.group_size = group_size
        self.dtype = dtype
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(device, dtype), requires_grad=False)
        self.kernel = int4_kernel_available(device)
        if self.kernel:
            order = check_kernel(device, group_size)
            on = [t.to(device) for t in (qweight, qzeros, scales)]
            packed, sz = to_tinygemm(*on, group_size, high_nibble_first=order)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales_and_zeros", sz, persistent=False)
            # The AWQ tensors stay on the host (pinned) for the prefill's dequantization.
            self.host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
                              for t in (qweight, qzeros, scales))
        else:
            self.host = tuple(t.to(device) for t in (qweight, qzeros, scales))

    @property
    def weight_bytes(self) -> int:
        """Bytes this layer keeps on its device for the weight itself."""
        if self.kernel:
            return self.packed.numel() * self.packed.element_size() + \
                self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()
        return sum(t.numel() * t.element_size() for t in self.host)

    def dequantized(self, dtype: torch.dtype | None = None, device: torch.device | None = None,
                    awq: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The weight [out, in] as ``dtype`` on ``device`` (from ``awq``: AWQ tensors already fetched there)."""
        dtype = dtype or self.dtype
        device = device or (self.packed.device if self.kernel else self.host[0].device)
        qw, qz, sc = awq if awq is not None else (t.to(device, non_blocking=True) for t in self.host)
        return dequantize_awq(qw, qz, sc, self.group_size, dtype=torch.float32).to(dtype)

    def fetch(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Start copying the AWQ tensors to ``device`` (on the current stream); for :meth:`dequantized`."""
        return tuple(t.to(device, non_blocking=True) for t in self.host)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel and (x2.shape[0] <= INT4_KERNEL_MAX_ROWS or torch.cuda.is_current_stream_capturing()):
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size,
                                          self.scales_and_zeros).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            y = F.linear(x2, self.dequantized(x.dtype, x2.device), None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel={'int4 (torch tinygemm)' if self.kernel else 'dequantize per call'}")


def int4_weight_bytes(model: torch.nn.Module) -> int:
    return sum(m.weight_bytes for m in model.modules() if isinstance(m, Int4Linear))
