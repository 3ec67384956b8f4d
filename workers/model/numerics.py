"""Logits of one prompt through two engines' language models: how far a kernel path (4-bit, fused,
compiled) drifts from a reference path on the same checkpoint. Used by the CUDA numerics test and
the GPU benchmark."""

from __future__ import annotations

import torch

from moments.workers.model import prompt
from moments.workers.model.positions import mrope_positions


def prompt_logits(engine, tokens, question: str) -> torch.Tensor:
    """fp32 logits [positions, vocab] of ``[system][video][question]`` (every position), no cache."""
    ids = engine.tokenizer(prompt.video_prefix_text(tokens.n_tokens) + prompt.question_suffix_text(question),
                           add_special_tokens=False).input_ids
    pos, _ = mrope_positions(ids, engine.video_token_id, tokens.grid_thw, tokens.second_per_grid_ts,
                             engine.tokens_per_second, engine.merge_size)
    with torch.inference_mode(), engine._lock:
        x = torch.tensor([ids], device=engine.device)
        emb = engine.model.get_input_embeddings()(x)
        mask = (x == engine.video_token_id).unsqueeze(-1).expand_as(emb)
        emb = emb.masked_scatter(mask, tokens.embeds.to(engine.device, emb.dtype))
        h = engine.model.model.language_model(inputs_embeds=emb, position_ids=pos[:, None].to(engine.device),
                                              use_cache=False).last_hidden_state
        return engine.model.lm_head(h[0]).float().cpu()


def compare_logits(engine, reference, tokens, question: str) -> dict:
    """max / mean abs difference of every position's logits, the reference's mean magnitude, and the
    fraction of positions whose argmax agrees."""
    a, b = prompt_logits(engine, tokens, question), prompt_logits(reference, tokens, question)
    diff = (a - b).abs()
    return {"positions": a.shape[0], "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "logit_scale": float(b.abs().mean()), "argmax_same": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


__all__ = ["compare_logits", "prompt_logits"]
