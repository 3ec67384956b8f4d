"""Greedy decoding of many questions at once from static KV buffers, one CUDA graph per step shape.

Layout: ``slots`` hold ``[system][video]`` prefixes (one video window each, prefilled once and
shared by every question about it: never copied per question); each slot has ``lanes``, one per
question, with its own suffix KV (the question, the "not in the video" answer scored after it, the
generated tokens). A decode step advances every active lane of every slot together:

* the linear layers run once over all lanes (``slots * lanes`` rows: the weights, which bound
  decoding, are read once per step, whatever the number of questions and videos);
* attention reads each slot's prefix keys once for all of its lanes (``[slot, lane]`` queries times
  ``[slot]`` keys) plus each lane's own suffix keys; one fp32 softmax over both.

Questions join free lanes between steps (their question is prefilled alone, eagerly) and leave at
once when done or cancelled, so concurrent jobs share steps (continuous batching); a prefix joins a
free slot by a device copy of its KV. On CUDA each step shape (slots, lanes and attended prefix
length, in buckets) is captured once as a CUDA graph and replayed; elsewhere it runs eagerly (tests).
Only text positions are decoded here (all three M-RoPE axes equal). The weights are the model's
own modules: plain or 4-bit linears.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

LANE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SLOT_BUCKETS = (1, 2, 4, 8, 16)
PREFILL_SCORE_BYTES = 2 * 2**30
"""Device memory the attention scores of one batched question prefill may take."""


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= n), buckets[-1])


class BatchDecoder:
    """Static-KV greedy decoding over ``max_slots`` prefixes x ``max_lanes`` questions each."""

    def __init__(self, model, *, max_slots: int = 4, max_lanes: int = 16, suffix: int = 384,
                 graphs: bool | None = None, bucket_tokens: int = 1024, grow_tokens: int = 4096) -> None:
        lm = model.model.language_model
        cfg = lm.config
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported by the batch decoder")
        self.lm, self.lm_head, self.layers = lm, model.lm_head, list(lm.layers)
        attn = self.layers[0].self_attn
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.groups = self.heads // self.kv_heads
        self.scale = float(attn.scaling)
        p = next(lm.parameters())
        self.device, self.dtype = p.device, lm.embed_tokens.weight.dtype
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        self.max_slots, self.max_lanes, self.suffix = max_slots, max_lanes, suffix
        self.bucket_tokens, self.grow_tokens = bucket_tokens, grow_tokens
        self.inv_freq = lm.rotary_emb.inv_freq.to(self.device, torch.float32)
        kv, d, L = self.kv_heads, self.head_dim, len(self.layers)
        self.sk = [torch.zeros(max_slots, max_lanes, kv, suffix, d, dtype=self.dtype, device=self.device) for _ in range(L)]
        self.sv = [torch.zeros_like(t) for t in self.sk]
        self.capacity = 0
        self.pk: list[torch.Tensor] = []
        self.pv: list[torch.Tensor] = []
        self.slot_identity: list[tuple | None] = [None] * max_slots
        self.prefix_len = torch.zeros(max_slots, dtype=torch.long, device=self.device)
        self.prefix_len_host = [0] * max_slots
        """The same lengths on the host: choosing a step's shape needs no device sync."""
        # Static step inputs / outputs [slot, lane].
        shape = (max_slots, max_lanes)
        self.token_in = torch.zeros(shape, dtype=torch.long, device=self.device)
        self.rope_in = torch.zeros(shape, dtype=torch.long, device=self.device)
        self.pos_in = torch.zeros(shape, dtype=torch.long, device=self.device)
        self.out_token = torch.zeros(shape, dtype=torch.long, device=self.device)
        self.out_prob = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # --- prefixes ---------------------------------------------------------------------------------

    def _reserve(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        cap = -(-tokens // self.grow_tokens) * self.grow_tokens
        old_k, old_v, old_cap = self.pk, self.pv, self.capacity
        # Graphs read the old buffers: drop them with their private memory pool (a fresh pool for the
        # new ones: reusing a pool whose graphs are gone trips the caching allocator).
        self._graphs.clear()
        self._pool = None
        shape = (self.max_slots, self.kv_heads, cap, self.head_dim)
        self.pk = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.pv = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        for i in range(len(old_k)):  # loaded prefixes survive a growth
            self.pk[i][:, :, :old_cap].copy_(old_k[i])
            self.pv[i][:, :, :old_cap].copy_(old_v[i])
        del old_k, old_v
        self.capacity = cap
        log.info("batch decoder prefix KV: %d slots x %d positions (%.2f GiB)", self.max_slots, cap,
                 2 * len(self.layers) * self.max_slots * self.kv_heads * cap * self.head_dim *
                 self.pk[0].element_size() / 2**30)

    def slot_of(self, identity: tuple) -> int | None:
        return self.slot_identity.index(identity) if identity in self.slot_identity else None

    def load(self, slot: int, cache, length: int, identity: tuple) -> None:
        """Copy a transformers cache's first ``length`` positions into ``slot``."""
        if self.slot_identity[slot] == identity:
            return
        if identity in self.slot_identity:  # it moves here: one copy of a prefix at a time
            self.slot_identity[self.slot_identity.index(identity)] = None
        self._reserve(length)
        for i, layer in enumerate(cache.layers):
            self.pk[i][slot, :, :length].copy_(layer.keys[0, :, :length])
            self.pv[i][slot, :, :length].copy_(layer.values[0, :, :length])
        self.prefix_len[slot] = length
        self.prefix_len_host[slot] = length
        self.slot_identity[slot] = identity

    # --- the model ---------------------------------------------------------------------------------

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """Rotary embedding in three kernels: x*cos + swap_halves(x) * [-sin, sin]."""
        half = x.shape[-1] // 2
        return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin_signed)

    @staticmethod
    def _norm(x: torch.Tensor, norm) -> torch.Tensor:
        """The model's RMSNorm (fp32 statistics, weight applied in the model's dtype), fused."""
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
        return norm.weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    def _attention(self, q, i, slots: slice, lanes, prefix_mask, causal, attend: int):
        """q [P, R, n, heads, d] -> [P, R, n, heads*d], over slot prefixes (the first ``attend`` keys,
        those past each slot's length masked by ``prefix_mask`` [P, 1, 1, A]) and the lanes' suffix
        keys (``causal`` [P, R, 1, n*g, S] masks those after each query). One softmax (fp32) over
        both key sets, as the model's eager attention does over one."""
        P, R, n = q.shape[:3]
        kv, g, d = self.kv_heads, self.groups, self.head_dim
        q = q * self.scale
        qg = q.view(P, R, n, kv, g, d).permute(0, 3, 1, 2, 4, 5).reshape(P, kv, R * n * g, d)
        pk, pv = self.pk[i][slots, :, :attend], self.pv[i][slots, :, :attend]  # [P, kv, A, d]
        sp = torch.matmul(qg, pk.transpose(-1, -2)).masked_fill_(prefix_mask, float("-inf"))  # [P, kv, R*n*g, A]
        if isinstance(lanes, slice):
            sk, sv = self.sk[i][slots, lanes], self.sv[i][slots, lanes]  # [P, R, kv, S, d]
        else:  # a gathered copy of the few lanes being prefilled
            sk, sv = self.sk[i][slots][:, lanes], self.sv[i][slots][:, lanes]
        qs = q.view(P, R, n, kv, g, d).permute(0, 1, 3, 2, 4, 5).reshape(P, R, kv, n * g, d)
        ss = torch.matmul(qs, sk.transpose(-1, -2)).masked_fill_(causal, float("-inf"))  # [P, R, kv, n*g, S]
        ss = ss.permute(0, 2, 1, 3, 4).reshape(P, kv, R * n * g, self.suffix)
        w = torch.softmax(torch.cat((sp, ss), dim=-1), dim=-1, dtype=torch.float32).to(self.dtype)
        out_p = torch.matmul(w[..., :attend], pv).view(P, kv, R, n * g, d).permute(0, 2, 1, 3, 4)
        ws = w[..., attend:].reshape(P, kv, R, n * g, self.suffix).permute(0, 2, 1, 3, 4)  # [P, R, kv, n*g, S]
        out = out_p + torch.matmul(ws, sv)  # [P, R, kv, n*g, d]
        return out.view(P, R, kv, n, g, d).permute(0, 1, 3, 2, 4, 5).reshape(P, R, n, kv * g * d)

    def _forward(self, hidden, rope, pos, slots: slice, lanes, attend: int):
        """hidden [P, R, n, hidden] at rope ids / suffix positions [P, R, n]; writes the lanes' K/V.
        ``lanes``: a slice, or a tensor of lane indices (with one slot). Everything that is the same
        in every layer (rotary tables, masks, scatter indices) is built once here."""
        P, R, n, _ = hidden.shape
        cos, sin = self._rope(rope)
        half = cos.shape[-1] // 2
        sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[..., None, :]
        cos = cos[..., None, :]
        key = torch.arange(attend, device=hidden.device)
        prefix_mask = (key[None, :] >= self.prefix_len[slots][:, None])[:, None, None, :]
        skey = torch.arange(self.suffix, device=hidden.device)
        causal = (skey.view(1, 1, 1, -1) > pos[..., None]).repeat_interleave(self.groups, dim=2).unsqueeze(2)
        pi = torch.arange(slots.start, slots.start + P, device=hidden.device).view(P, 1, 1).expand(P, R, n)
        lane_ids = torch.arange(lanes.start, lanes.start + R, device=hidden.device) if isinstance(lanes, slice) else lanes
        li = lane_ids.view(1, R, 1).expand(P, R, n)
        x = hidden.reshape(P * R * n, -1)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            h = self._norm(x, layer.input_layernorm)
            q = a.q_proj(h).view(P, R, n, self.heads, self.head_dim)
            k = a.k_proj(h).view(P, R, n, self.kv_heads, self.head_dim)
            v = a.v_proj(h).view(P, R, n, self.kv_heads, self.head_dim)
            q, k = self._rotate(q, cos, sin_signed), self._rotate(k, cos, sin_signed)
            self.sk[i][pi, li, :, pos] = k
            self.sv[i][pi, li, :, pos] = v
            att = self._attention(q, i, slots, lanes, prefix_mask, causal, attend)
            x = x + a.o_proj(att.reshape(P * R * n, -1))
            x = x + layer.mlp(self._norm(x, layer.post_attention_layernorm))
        return self._norm(x, self.lm.norm).view(P, R, n, -1)

    def _attend(self, slots: slice) -> int:
        longest = max(self.prefix_len_host[slots], default=1)
        return min(self.capacity, max(1, -(-longest // self.bucket_tokens) * self.bucket_tokens))

    # --- a question's own tokens --------------------------------------------------------------------

    def prefill_rows(self, slot: int, n_tokens: int) -> int:
        """How many questions of ``n_tokens`` tokens one prefill forward takes: their attention scores
        (bf16, then fp32 probabilities and their bf16 copy) stay within PREFILL_SCORE_BYTES."""
        keys = self._attend(slice(slot, slot + 1)) + self.suffix
        per_row = n_tokens * self.heads * keys * (2 + 4 + 2)
        return max(1, int(PREFILL_SCORE_BYTES // per_row))


    def prefill(self, slot: int, lanes: list[int], embeds: list[torch.Tensor], rope_start: int,
                picks: list[list[int]]) -> list[torch.Tensor]:
        """Several questions about the prefix in ``slot`` in one forward (eager): ``embeds[k]`` [n_k,
        hidden] into lane ``lanes[k]`` from suffix position 0, padded to the longest (the padding lies
        after each question, so causal attention keeps it out, and decoding overwrites it). Returns, per
        question, fp32 logits [len(picks[k]), vocab] at its positions ``picks[k]``."""
        n = max(e.shape[0] for e in embeds)
        if n > self.suffix:
            raise ValueError(f"{n} question tokens exceed the lane's {self.suffix} positions")
        k = len(embeds)
        hidden = torch.zeros(1, k, n, embeds[0].shape[-1], dtype=self.dtype, device=self.device)
        for r, e in enumerate(embeds):
            hidden[0, r, : e.shape[0]] = e.to(self.dtype)
        steps = torch.arange(n, device=self.device)
        rope = (rope_start + steps).view(1, 1, n).expand(1, k, n)
        pos = steps.view(1, 1, n).expand(1, k, n)
        slots = slice(slot, slot + 1)
        out = self._forward(hidden, rope, pos, slots, torch.tensor(lanes, device=self.device), self._attend(slots))
        return [self.lm_head(out[0, r, torch.tensor(p, device=self.device)]).float() for r, p in enumerate(picks)]

    # --- one step of every lane ----------------------------------------------------------------------

    def _step_body(self, P: int, R: int, attend: int) -> None:
        slots, lanes = slice(0, P), slice(0, R)
        hidden = self.lm.embed_tokens(self.token_in[:P, :R]).unsqueeze(2)  # [P, R, 1, hidden]
        out = self._forward(hidden, self.rope_in[:P, :R, None], self.pos_in[:P, :R, None], slots, lanes, attend)
        logits = self.lm_head(out[:, :, 0]).float()  # [P, R, vocab]
        token = logits.argmax(-1)
        self.out_token[:P, :R] = token
        self.out_prob[:P, :R] = torch.softmax(logits, -1).gather(-1, token[..., None])[..., 0]

    def step(self, used_slots: int, used_lanes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance lanes [0, used_lanes) of slots [0, used_slots) by the tokens in ``token_in`` (at
        ``rope_in`` / ``pos_in``); (next tokens, their probabilities) [slots, lanes] on the CPU. Lanes
        not in use compute on whatever their inputs hold; their outputs are not read."""
        P, R = bucket(used_slots, SLOT_BUCKETS), bucket(used_lanes, LANE_BUCKETS)
        P, R = min(P, self.max_slots), min(R, self.max_lanes)
        attend = self._attend(slice(0, P))
        if not self.graphs:
            self._step_body(P, R, attend)
        else:
            key = (P, R, attend)
            graph = self._graphs.get(key)
            if graph is None:
                try:
                    graph = self._capture(key)
                except RuntimeError as exc:  # keep serving: eager steps are slower, never wrong
                    log.warning("capturing a decode step failed (%s); decoding without CUDA graphs from now on",
                                str(exc).splitlines()[0][:200])
                    self.graphs = False
                    self._graphs.clear()
                    self._pool = None
            if graph is None:
                self._step_body(P, R, attend)
            else:
                graph.replay()
        return self.out_token[:P, :R].cpu(), self.out_prob[:P, :R].cpu()

    def _capture(self, key: tuple) -> torch.cuda.CUDAGraph:
        # Warm-up and capture run the real step on the real inputs: they write the K/V the replay writes.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step_body(*key)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step_body(*key)
        self._graphs[key] = graph
        log.debug("captured a decode step for %d slots x %d lanes over %d keys", *key)
        return graph


__all__ = ["BatchDecoder", "bucket"]
