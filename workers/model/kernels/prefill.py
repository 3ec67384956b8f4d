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


class _Int4Layer:
    """One decoder layer whose linears are :class:`~moments.workers.model.quant.Int4Linear`: its weights
    are dequantized for the prefill call (AWQ tensors fetched from the pinned host copy on a side
    stream while the previous layer computes), concatenated as the plain path keeps them."""

    def __init__(self, layer) -> None:
        a, m = layer.self_attn, layer.mlp
        self.qkv = (a.q_proj, a.k_proj, a.v_proj)
        self.gate_up = (m.gate_proj, m.up_proj)
        self.o, self.down = a.o_proj, m.down_proj
        self.qkv_b = torch.cat([p.bias for p in self.qkv]) if self.qkv[0].bias is not None else None

    def linears(self):
        return (*self.qkv, self.o, *self.gate_up, self.down)

    def fetch(self, device) -> list:
        return [lin.fetch(device) for lin in self.linears()]

    def weights(self, fetched: list, dtype) -> tuple:
        w = [lin.dequantized(dtype, awq=awq) for lin, awq in zip(self.linears(), fetched)]
        return torch.cat(w[0:3]), self.qkv_b, w[3], torch.cat(w[4:6]), w[6]


class FusedPrefill:
    """Prefix prefill of the language model (KV cache only) with the elementwise work fused.

    Per layer: [input RMSNorm, one q/k/v product, M-RoPE] -> SDPA (causal, GQA) -> [o_proj + residual,
    RMSNorm, one gate/up product, silu * up, down + residual]; the bracketed parts run through
    ``torch.compile`` when ``compile`` (one graph for every prompt length), eager otherwise. The K/V
    written to the transformers cache are the same tensors the stock forward writes. The prefix
    prefill needs no logits, so the last layer stops after writing its K/V (its attention and MLP
    only feed the final hidden states).

    Plain linears: q/k/v and gate/up weights are concatenated once; the model's own linears become
    views of them (no extra memory; the stock forward and the decoder read the same values). 4-bit
    linears: each layer's weights are dequantized for the call (cuBLAS products at prefill sizes),
    the next layer's 4-bit tensors copied in on a side stream meanwhile.
    """

    def __init__(self, model, *, compile: bool) -> None:
        from moments.workers.model.quant import Int4Linear

        lm = model.model.language_model
        cfg = lm.config
        self.lm = lm
        self.compile = compile
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.layers = []
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            if isinstance(a.q_proj, Int4Linear):
                self.layers.append((layer, _Int4Layer(layer), float(a.scaling)))
                continue
            qkv_w = _shared([a.q_proj, a.k_proj, a.v_proj], "weight")
            qkv_b = _shared([a.q_proj, a.k_proj, a.v_proj], "bias")
            gate_up = _shared([m.gate_proj, m.up_proj], "weight")
            self.layers.append((layer, (qkv_w, qkv_b, a.o_proj.weight, gate_up, m.down_proj.weight), float(a.scaling)))

    @staticmethod
    def supported(model) -> bool:
        from moments.workers.model.quant import Int4Linear

        lm = model.model.language_model
        cfg = lm.config
        if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "hidden_act", "silu") != "silu":
            return False
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            kinds = {type(x) for x in linears}
            if kinds not in ({torch.nn.Linear}, {Int4Linear}):  # other quantized linears: not fused
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
        side = torch.cuda.Stream() if hidden.is_cuda else None
        prefetched = self._fetch(0, hidden.device, side)
        for i, (layer, weights, scale) in enumerate(self.layers):
            if isinstance(weights, _Int4Layer):
                if side is not None:
                    torch.cuda.current_stream().wait_stream(side)
                fetched, prefetched = prefetched, self._fetch(i + 1, hidden.device, side)
                qkv_w, qkv_b, o_w, gate_up, down_w = weights.weights(fetched, hidden.dtype)
            else:
                qkv_w, qkv_b, o_w, gate_up, down_w = weights
            ln1 = layer.input_layernorm
            q, k, v = self._call("lm_pre", lm_pre_attention, hidden, ln1.weight, ln1.variance_epsilon, qkv_w, qkv_b,
                                 cos, sin, self.heads, self.kv_heads, dynamic={0: 1, 5: 1, 6: 1})
            cache.update(k, v, i)
            if i == last:
                break
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            ln2 = layer.post_attention_layernorm
            hidden = self._call("lm_post", lm_post_attention, hidden, attn, o_w,
                                ln2.weight, ln2.variance_epsilon, gate_up, down_w, dynamic={0: 1, 1: 2})

    def _fetch(self, i: int, device, side):
        """Start copying layer ``i``'s 4-bit tensors to ``device`` (on ``side`` when there is one)."""
        if i >= len(self.layers) or not isinstance(self.layers[i][1], _Int4Layer):
            return None
        if side is None:
            return self.layers[i][1].fetch(device)
        with torch.cuda.stream(side):
            return self.layers[i][1].fetch(device)


__all__ = ["FusedPrefill"]
