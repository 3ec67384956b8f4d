"""Qwen2.5-VL's 3D rotary position ids (M-RoPE), computed as the reference does.

A video token's temporal id is ``tokens_per_second * second_per_grid_ts * t`` after the text before
it (so ids follow absolute time: 2 ids per second for the 7B); text after the video continues at
``max(all ids) + 1``. Qwen's release, transformers 4.x and vLLM agree on this; transformers 5.24's
``get_rope_index`` starts text after a video at ``start + max(h, w) / merge`` instead, which the model
was not trained with, so the engine passes these ids explicitly and never reads
``model.model.rope_deltas``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moments.core.errors import Internal


def mrope_positions(input_ids: Sequence[int], video_token_id: int, grid_thw: tuple[int, int, int],
                    second_per_grid_ts: float, tokens_per_second: float, merge_size: int) -> tuple[torch.Tensor, int]:
    """Reference 3D rope ids [3, L] for ``text, one video, text`` and the id the next token takes."""
    ids = torch.as_tensor(list(input_ids))
    where = torch.nonzero(ids == video_token_id).flatten()
    gt, gh, gw = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
    n_video = gt * gh * gw
    if len(where) != n_video or (n_video and int(where[-1] - where[0]) + 1 != n_video):
        raise Internal(f"expected one run of {n_video} video tokens, found {len(where)}")
    start = int(where[0]) if n_video else len(ids)
    before = torch.arange(start).expand(3, -1)
    interval = tokens_per_second * second_per_grid_ts
    t_idx = (torch.arange(gt) * interval).long()  # truncation as in the reference (``.long()``)
    grid = torch.meshgrid(t_idx, torch.arange(gh), torch.arange(gw), indexing="ij")
    video = torch.stack([g.reshape(-1) for g in grid]) + start
    after_start = int(video.max()) + 1 if n_video else start
    n_after = len(ids) - start - n_video
    after = torch.arange(n_after).expand(3, -1) + after_start
    positions = torch.cat([before, video, after], dim=1)
    return positions, int(positions.max()) + 1 if positions.numel() else 0
