"""Prefix prefill of Qwen2.5-VL's language model with the elementwise work fused.

Per decoder layer: [input RMSNorm, one q/k/v product, M-RoPE] -> SDPA -> [o_proj + residual,
RMSNorm, one gate/up product, silu * up, down + residual], the bracketed parts through
``torch.compile`` (see :class:`FusedPrefill`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moments.workers.model.kernels.common import rms_norm as _rms_norm
from moments.workers.model.kernels.common import rotate_half as _rotate_half
from moments.workers.model.kernels.common import run_compiled


def lm_pre_attention(h: torch.Tensor, norm_w: torch.Tensor, eps: float, qkv_w: torch.Tensor, qkv_b: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int):
    """input norm -> q/k/v (one product) -> M-RoPE (cos/sin already sectioned): q, k, v [b, heads, n, d]."""
    b, n, _ = h.shape
    qkv = F.linear(_rms_norm(h, norm_w, eps), qkv_w, qkv_b)
    d = qkv.shape[-1] // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, n, kv_heads, d).transpose(1, 2)
    v = v.view(b, n, kv_heads, d).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s, v


def lm_post_attention(h: torch.Tensor, attn: torch.Tensor, o_w: torch.Tensor, norm_w: torch.Tensor, eps: float,
                      gate_up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """o_proj + residual, post-attention norm, gate/up (one product) -> silu * up -> down, + residual."""
    b, n, _ = h.shape
    h = h + F.linear(attn.transpose(1, 2).reshape(b, n, -1), o_w)
    gu = F.linear(_rms_norm(h, norm_w, eps), gate_up_w)
    width = gu.shape[-1] // 2
    return h + F.linear(F.silu(gu[..., :width]) * gu[..., width:], down_w)


def _shared(parts: list[torch.nn.Linear], attr: str) -> torch.Tensor | None:
    """Concatenate the linears' ``attr`` along outputs; each linear keeps a view of the shared tensor."""
    tensors = [getattr(p, attr) for p in parts]
    if any(t is None for t in tensors):
        return None
    with torch.no_grad():
        joined = torch.cat(tensors)
        start = 0
        for p, t in zip(parts, tensors):
            setattr(p, attr, torch.nn.Parameter(joined[start:start + t.shape[0]], requires_grad=False))
            start += t.shape[0]
    return joined


class FusedPrefill:
    """Prefix prefill of the language model (KV cache only) with the elementwise work fused.

    Per layer: [input RMSNorm, one q/k/v product, M-RoPE] -> SDPA (causal, GQA) -> [o_proj + residual,
    RMSNorm, one gate/up product, silu * up, down + residual]; the bracketed parts run through
    ``torch.compile`` when ``compile`` (one graph for every prompt length), eager otherwise. The K/V
    written to the transformers cache are the same tensors the stock forward writes. The prefix
    prefill needs no logits, so the last layer stops after writing its K/V (its attention and MLP
    only feed the final hidden states).

    q/k/v and gate/up weights are concatenated once; the model's own linears become views of them
    (no extra memory; the stock forward and the decoder read the same values).
    """

    def __init__(self, model, *, compile: bool) -> None:
        lm = model.model.language_model
        cfg = lm.config
        self.lm = lm
        self.compile = compile
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.layers = []
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            qkv_w = _shared([a.q_proj, a.k_proj, a.v_proj], "weight")
            qkv_b = _shared([a.q_proj, a.k_proj, a.v_proj], "bias")
            gate_up = _shared([m.gate_proj, m.up_proj], "weight")
            self.layers.append((layer, qkv_w, qkv_b, gate_up, float(a.scaling)))

    @staticmethod
    def supported(model) -> bool:
        lm = model.model.language_model
        cfg = lm.config
        if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "hidden_act", "silu") != "silu":
            return False
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            if not all(type(x) is torch.nn.Linear for x in linears):  # quantized linears: not fused
                return False
            if a.q_proj.bias is None or m.gate_proj.bias is not None or a.o_proj.bias is not None:
                return False
        return True

    def _call(self, name, fn, *args, dynamic):
        if not self.compile:
            return fn(*args)
        return run_compiled(name, fn, *args, dynamic=dynamic)

    def __call__(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache) -> None:
        """embeds [1, n, hidden], position_ids [3, 1, n]: fills ``cache`` (a transformers DynamicCache)."""
        hidden = embeds
        cos, sin = self.lm.rotary_emb(hidden, position_ids)
        cos, sin = cos.to(hidden.dtype), sin.to(hidden.dtype)
        last = len(self.layers) - 1
        for i, (layer, qkv_w, qkv_b, gate_up, scale) in enumerate(self.layers):
            ln1 = layer.input_layernorm
            q, k, v = self._call("lm_pre", lm_pre_attention, hidden, ln1.weight, ln1.variance_epsilon, qkv_w, qkv_b,
                                 cos, sin, self.heads, self.kv_heads, dynamic={0: 1, 5: 1, 6: 1})
            cache.update(k, v, i)
            if i == last:
                break
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            ln2 = layer.post_attention_layernorm
            hidden = self._call("lm_post", lm_post_attention, hidden, attn, layer.self_attn.o_proj.weight,
                                ln2.weight, ln2.variance_epsilon, gate_up, layer.mlp.down_proj.weight,
                                dynamic={0: 1, 1: 2})


__all__ = ["FusedPrefill"]
