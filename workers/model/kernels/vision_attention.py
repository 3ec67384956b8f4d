"""One packed (varlen) attention call per vision layer instead of transformers' per-window loop.

transformers' ``Qwen2_5_VLVisionAttention.forward`` with ``sdpa``/``eager`` splits q/k/v at
``cu_seqlens`` and runs one attention call per window (thousands per layer for a long video):
the GPU mostly waits on Python. The windows are independent, so one variable-length attention
over the packed tokens computes the same thing. Backends, best first:

* ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (PyTorch >= 2.11, CUDA, fp16/bf16).
* ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` when the package is importable.
* ``sdpa_mask``: one SDPA call with a block-diagonal boolean mask (memory grows with tokens^2:
  for tests and small inputs on CPU).
* ``loop``: transformers' own forward (the reference).

:func:`install` binds the chosen forward to each vision attention module of one model (not the
class), so :func:`uninstall` brings the stock path back on the same weights.
"""

from __future__ import annotations

import importlib.util
import logging
import types

import torch
import torch.nn.functional as F

from moments.workers.model.kernels.common import rms_norm, rotate_half, run_compiled

log = logging.getLogger(__name__)

BACKENDS = ("varlen", "flash_attn", "sdpa_mask", "loop")
_ORIGINAL = "_moments_original_forward"


def varlen_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend that runs on ``device`` / ``dtype``."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if varlen_available(device):
            return "varlen"
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attn"
    return "loop"


def _packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int | None, scale: float, backend: str) -> torch.Tensor:
    """q, k, v [tokens, heads, dim] -> [tokens, heads, dim]; attention only within each segment."""
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    max_seqlen = int(max_seqlen)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_seqlen, max_seqlen, scale=scale)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=False)
    if backend == "sdpa_mask":
        n = q.shape[0]
        segment = torch.bucketize(torch.arange(n, device=q.device), cu[1:].long(), right=True)
        mask = segment[:, None] == segment[None, :]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask, scale=scale)
        return out[0].transpose(0, 1)
    raise ValueError(f"unknown packed attention backend {backend!r}")


def _make_forward(backend: str):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
        # Same operations as transformers' forward up to the attention call.
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        out = _packed_attention(q, k, v.to(q.dtype), cu_seqlens, max_seqlen, self.scaling, backend)
        return self.proj(out.reshape(seq_length, -1).contiguous())

    return forward


def vision_attention_modules(model) -> list[torch.nn.Module]:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    return [m for m in model.modules() if isinstance(m, Qwen2_5_VLVisionAttention)]


def install(model, backend: str = "auto") -> str:
    """Make every vision attention of ``model`` use ``backend`` ("auto": :func:`choose_backend`)."""
    modules = vision_attention_modules(model)
    if not modules:
        return "none"
    if backend == "auto":
        p = next(modules[0].parameters())
        backend = choose_backend(p.device, p.dtype)
    if backend not in BACKENDS:
        raise ValueError(f"vision attention backend must be one of {BACKENDS}, got {backend!r}")
    uninstall(model)
    if backend == "loop":
        return backend
    # flash_attention_2 already packs; only the looping implementations gain.
    impl = getattr(modules[0].config, "_attn_implementation", "sdpa")
    if impl not in (None, "sdpa", "eager"):
        log.info("vision attention %s already packs windows; not patched", impl)
        return "loop"
    forward = _make_forward(backend)
    for m in modules:
        setattr(m, _ORIGINAL, True)
        m.forward = types.MethodType(forward, m)
    log.info("vision attention: one %s call per layer (%d layers)", backend, len(modules))
    return backend


def uninstall(model) -> None:
    """Back to transformers' own forward (attention and, if fused, the blocks)."""
    unfuse_vision_blocks(model)
    for m in vision_attention_modules(model):
        if getattr(m, _ORIGINAL, False):
            del m.forward  # the instance attribute; the class method shows through again
            delattr(m, _ORIGINAL)


def _patch_embed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # Conv3d with kernel == stride over one patch each: the same product as one matrix multiply.
    w = self.proj.weight
    return F.linear(hidden_states.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(w.shape[0], -1))


def speed_up_vision_tower(model, multiple: int = 64) -> dict:
    """Exact rewrites of the vision tower for tensor cores; returns what was changed.

    * MLP intermediate width padded to a multiple of ``multiple`` (the 7B's 3420 is not even a
      multiple of 8, which keeps fp16 GEMMs off the fast tensor-core paths): the new rows of
      gate/up are zero (so silu(0) * 0 = 0) and the new columns of down are zero.
    * The patch embedding Conv3d as one matrix multiply.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    visual = model.model.visual
    changed = {"mlp_padded": 0, "patch_embed": False}
    with torch.no_grad():
        for blk in visual.blocks:
            mlp = blk.mlp
            width = mlp.gate_proj.out_features
            pad = -width % multiple
            if not pad:
                continue
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight = torch.nn.Parameter(F.pad(lin.weight, (0, 0, 0, pad)), requires_grad=False)
                if lin.bias is not None:
                    lin.bias = torch.nn.Parameter(F.pad(lin.bias, (0, pad)), requires_grad=False)
                lin.out_features = width + pad
            down = mlp.down_proj
            down.weight = torch.nn.Parameter(F.pad(down.weight, (0, pad)), requires_grad=False)
            down.in_features = width + pad
            changed["mlp_padded"] += 1
    if isinstance(visual.patch_embed, Qwen2_5_VisionPatchEmbed):
        visual.patch_embed.forward = types.MethodType(_patch_embed_forward, visual.patch_embed)
        changed["patch_embed"] = True
    if changed["mlp_padded"]:
        log.info("vision MLP width padded to %d in %d blocks", visual.blocks[0].mlp.gate_proj.out_features,
                 changed["mlp_padded"])
    return changed


# --- fused vision blocks (norm / rotary / SiLU-gate / residual between the matrix products) -----------

def vision_pre_attention(x: torch.Tensor, norm_w: torch.Tensor, eps: float, qkv_w: torch.Tensor,
                         qkv_b: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int):
    """norm1 -> qkv -> vision rotary (fp32, as ``apply_rotary_pos_emb_vision``): contiguous q, k, v [N, heads, d]."""
    n = x.shape[0]
    qkv = F.linear(rms_norm(x, norm_w, eps), qkv_w, qkv_b).view(n, 3, heads, -1)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    c, s = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    q = (qf * c + rotate_half(qf) * s).to(x.dtype)
    k = (kf * c + rotate_half(kf) * s).to(x.dtype)
    return q.contiguous(), k.contiguous(), v.contiguous()


def vision_post_attention(x: torch.Tensor, attn: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor,
                          norm_w: torch.Tensor, eps: float, gate_up_w: torch.Tensor, gate_up_b: torch.Tensor,
                          down_w: torch.Tensor, down_b: torch.Tensor) -> torch.Tensor:
    """proj + residual, norm2, gate/up (one product) -> silu(gate) * up -> down, + residual."""
    x = x + F.linear(attn.reshape(x.shape[0], -1), proj_w, proj_b)
    gu = F.linear(rms_norm(x, norm_w, eps), gate_up_w, gate_up_b)
    width = gu.shape[-1] // 2
    return x + F.linear(F.silu(gu[:, :width]) * gu[:, width:], down_w, down_b)


def _share_gate_up(mlp) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [2I, d] weight (and bias) holding gate then up; gate_proj / up_proj become views of it."""
    gate, up = mlp.gate_proj, mlp.up_proj
    if getattr(mlp, "_moments_gate_up", None) is not None:
        return mlp._moments_gate_up
    with torch.no_grad():
        w = torch.cat([gate.weight, up.weight])
        b = torch.cat([gate.bias, up.bias]) if gate.bias is not None else None
        width = gate.weight.shape[0]
        gate.weight = torch.nn.Parameter(w[:width], requires_grad=False)
        up.weight = torch.nn.Parameter(w[width:], requires_grad=False)
        if b is not None:
            gate.bias = torch.nn.Parameter(b[:width], requires_grad=False)
            up.bias = torch.nn.Parameter(b[width:], requires_grad=False)
    mlp._moments_gate_up = (w, b)
    return w, b


def _make_block_forward(backend: str, compile: bool):
    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
        attn, mlp = self.attn, self.mlp
        cos, sin = position_embeddings
        args = (hidden_states, self.norm1.weight, self.norm1.variance_epsilon, attn.qkv.weight, attn.qkv.bias,
                cos, sin, attn.num_heads)
        if compile:
            q, k, v = run_compiled("vision_pre", vision_pre_attention, *args, dynamic={0: 0, 5: 0, 6: 0})
        else:
            q, k, v = vision_pre_attention(*args)
        out = _packed_attention(q, k, v, cu_seqlens, max_seqlen, attn.scaling, backend)
        gate_up_w, gate_up_b = mlp._moments_gate_up
        args = (hidden_states, out, attn.proj.weight, attn.proj.bias, self.norm2.weight, self.norm2.variance_epsilon,
                gate_up_w, gate_up_b, mlp.down_proj.weight, mlp.down_proj.bias)
        if compile:
            return run_compiled("vision_post", vision_post_attention, *args, dynamic={0: 0, 1: 0})
        return vision_post_attention(*args)

    return forward


def fuse_vision_blocks(model, backend: str, *, compile: bool | None = None) -> int:
    """Replace each vision block's forward by pre-attention / packed attention / post-attention.

    ``backend`` is the packed attention (:data:`BACKENDS` minus "loop"). ``compile`` (default: on
    CUDA) runs the two elementwise-heavy halves through ``torch.compile``, which fuses RMSNorm,
    rotary, SiLU * up and the residual adds into a few kernels around the cuBLAS products. Same
    operations as transformers' block; returns the number of blocks changed.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock

    if backend not in ("varlen", "flash_attn", "sdpa_mask"):
        raise ValueError(f"fused vision blocks need a packed attention backend, got {backend!r}")
    blocks = [m for m in model.modules() if isinstance(m, Qwen2_5_VLVisionBlock)]
    if not blocks:
        return 0
    if type(blocks[0].mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        log.info("vision MLP activation %s is not SiLU: blocks not fused", type(blocks[0].mlp.act_fn).__name__)
        return 0
    if compile is None:
        compile = next(blocks[0].parameters()).device.type == "cuda"
    forward = _make_block_forward(backend, compile)
    for blk in blocks:
        _share_gate_up(blk.mlp)
        blk.forward = types.MethodType(forward, blk)
        blk._moments_fused = True
    log.info("vision blocks fused (%d, attention %s, compiled %s)", len(blocks), backend, compile)
    return len(blocks)


def unfuse_vision_blocks(model) -> None:
    """Back to transformers' block forward (the shared gate/up storage stays: same values)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock

    for m in model.modules():
        if isinstance(m, Qwen2_5_VLVisionBlock) and getattr(m, "_moments_fused", False):
            del m.forward
            del m._moments_fused
