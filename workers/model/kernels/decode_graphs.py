"""Greedy decoding of Qwen2.5-VL's language model from a static KV buffer, one CUDA graph per step.

The eager path (a transformers forward per token on a ``DynamicCache``) spends most of each step
in Python and kernel launches, and its GQA attention expands K/V 7x (``repeat_kv``). Here:

* K/V live in preallocated buffers ``[layers][kv_heads, capacity, head_dim]``. A question copies the
  prefix's KV in once (skipped when the same prefix is already loaded: questions only write past it,
  so the prefix region is never touched) and writes its own tokens after it.
* Attention reads K and V once per kv head (the query heads of a group are rows of one matrix
  product), over ``attend`` keys, a multiple of ``bucket`` tokens; keys past the current position
  are masked. The softmax is exact (fp32) over all keys; ``P @ V`` is split into ``bucket``-long
  chunks so the long reduction spreads over the GPU.
* On CUDA each decode step (embedding, 28 layers, norm, lm_head, argmax and its probability) is
  captured once per ``attend`` length as a CUDA graph and replayed; inputs go in static tensors.

Only text positions are decoded here (all three M-RoPE axes equal), which is all that follows the
``[system][video]`` prefix. The weights are the model's own modules (plain or quantized linears).
"""

from __future__ import annotations

import logging

import torch


log = logging.getLogger(__name__)


class FastDecoder:
    """Static-KV greedy decoder over ``model.model.language_model`` (see the module docstring)."""

    def __init__(self, model, *, graphs: bool | None = None, bucket: int = 1024, grow: int = 4096) -> None:
        lm = model.model.language_model
        cfg = lm.config
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported by the fast decoder")
        self.lm = lm
        self.lm_head = model.lm_head
        self.layers = list(lm.layers)
        attn = self.layers[0].self_attn
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.groups = self.heads // self.kv_heads
        self.scale = float(attn.scaling)
        p = next(lm.parameters())
        self.device, self.dtype = p.device, lm.embed_tokens.weight.dtype
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        self.bucket, self.grow = bucket, grow
        self.inv_freq = lm.rotary_emb.inv_freq.to(self.device, torch.float32)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.loaded: tuple | None = None
        # Static inputs/outputs of the captured step.
        self.token_in = torch.zeros(1, dtype=torch.long, device=self.device)
        self.rope_in = torch.zeros(1, dtype=torch.long, device=self.device)
        self.index_in = torch.zeros(1, dtype=torch.long, device=self.device)
        self.out = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # --- KV buffer ------------------------------------------------------------------------------

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` positions (drops the loaded prefix and the graphs when it grows)."""
        if tokens <= self.capacity:
            return
        cap = -(-tokens // self.grow) * self.grow
        self.k = self.v = []
        self._graphs.clear()
        self.loaded = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        shape = (self.kv_heads, cap, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.capacity = cap
        log.info("fast decoder KV buffer: %d positions (%.2f GiB)", cap,
                 2 * len(self.layers) * self.kv_heads * cap * self.head_dim * self.k[0].element_size() / 2**30)

    def load_prefix(self, cache, length: int, identity: tuple) -> bool:
        """Copy a transformers cache's first ``length`` positions in; False if already there."""
        if self.loaded == identity:
            return False
        for i, layer in enumerate(cache.layers):
            self.k[i][:, :length].copy_(layer.keys[0, :, :length])
            self.v[i][:, :length].copy_(layer.values[0, :, :length])
        self.loaded = identity
        return True

    # --- the model --------------------------------------------------------------------------------

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Text tokens: the three M-RoPE axes carry the same id, so every section rotates alike.
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attention(self, q: torch.Tensor, i: int, index: torch.Tensor, attend: int) -> torch.Tensor:
        """q [n, heads, d] at cache positions ``index`` [n] -> [n, heads * d] over keys [0, attend)."""
        n = q.shape[0]
        kv, g, d = self.kv_heads, self.groups, self.head_dim
        keys = self.k[i][:, :attend]  # [kv, L, d]
        values = self.v[i][:, :attend]
        qg = (q * self.scale).transpose(0, 1).reshape(kv, g * n, d)  # row r: head kv*g + r // n, token r % n
        scores = torch.matmul(qg, keys.transpose(1, 2)).float()  # [kv, g*n, L]
        key_pos = torch.arange(attend, device=q.device)
        masked = (key_pos[None, :] > index[:, None]).repeat(g, 1)  # [g*n, L]
        probs = torch.softmax(scores.masked_fill_(masked, float("-inf")), dim=-1).to(self.dtype)
        chunks = attend // self.bucket
        if chunks > 1:  # split the long P @ V reduction, sum the partial products in fp32
            pc = probs.view(kv, g * n, chunks, self.bucket).transpose(1, 2)
            vc = values.reshape(kv, chunks, self.bucket, d)
            out = torch.matmul(pc, vc).float().sum(dim=1).to(self.dtype)
        else:
            out = torch.matmul(probs, values)  # [kv, g*n, d]
        return out.view(kv, g, n, d).permute(2, 0, 1, 3).reshape(n, kv * g * d)

    def _forward(self, hidden: torch.Tensor, rope: torch.Tensor, index: torch.Tensor, attend: int) -> torch.Tensor:
        """hidden [n, hidden] at rope ids / cache positions [n]: writes K/V, returns final-norm states."""
        n = hidden.shape[0]
        cos, sin = self._rope(rope)
        cos, sin = cos[:, None, :], sin[:, None, :]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, self.heads, self.head_dim)
            k = attn.k_proj(x).view(n, self.kv_heads, self.head_dim)
            v = attn.v_proj(x).view(n, self.kv_heads, self.head_dim)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.k[i].index_copy_(1, index, k.transpose(0, 1))
            self.v[i].index_copy_(1, index, v.transpose(0, 1))
            hidden = hidden + attn.o_proj(self._attention(q, i, index, attend))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.lm.norm(hidden)

    def _attend(self, last_index: int) -> int:
        return min(self.capacity, -(-(last_index + 1) // self.bucket) * self.bucket)

    def prefill(self, embeds: torch.Tensor, rope_start: int, index_start: int) -> torch.Tensor:
        """Run the question's embeddings [n, hidden] (eager); fp32 logits of its last token."""
        n = embeds.shape[0]
        if index_start + n > self.capacity:
            raise ValueError(f"{index_start + n} positions exceed the reserved {self.capacity}")
        rope = torch.arange(rope_start, rope_start + n, device=self.device)
        index = torch.arange(index_start, index_start + n, device=self.device)
        hidden = self._forward(embeds.to(self.dtype), rope, index, self._attend(index_start + n - 1))
        return self.lm_head(hidden[-1:]).float()[0]

    def _step_body(self, attend: int) -> None:
        hidden = self.lm.embed_tokens(self.token_in)
        hidden = self._forward(hidden, self.rope_in, self.index_in, attend)
        logits = self.lm_head(hidden).float()[0]
        probs = torch.softmax(logits, dim=-1)
        token = torch.argmax(logits, dim=-1, keepdim=True)
        self.out[0:1] = token.double()
        self.out[1:2] = probs.gather(0, token).double()

    def step(self, token: int, rope: int, index: int) -> tuple[int, float]:
        """Feed ``token`` at rope id / cache position; the greedy next token and its probability."""
        if index >= self.capacity:
            raise ValueError(f"position {index} exceeds the reserved {self.capacity}")
        self.token_in.fill_(token)
        self.rope_in.fill_(rope)
        self.index_in.fill_(index)
        attend = self._attend(index)
        if not self.graphs:
            self._step_body(attend)
        else:
            graph = self._graphs.get(attend)
            if graph is None:
                graph = self._capture(attend)
            graph.replay()
        nxt, prob = self.out.tolist()
        return int(nxt), float(prob)

    def _capture(self, attend: int) -> "torch.cuda.CUDAGraph":
        # Warm-up and capture run the real step on the real inputs: they write the same K/V at the
        # same position that the replay writes, so they leave no trace.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step_body(attend)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step_body(attend)
        self._graphs[attend] = graph
        log.debug("captured decode step over %d keys", attend)
        return graph


__all__ = ["FastDecoder"]
