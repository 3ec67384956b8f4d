"""Hand-made sampling plans and frames for engine tests (no decoding involved)."""

from __future__ import annotations

import numpy as np

from moments.media.sampling import SamplingPlan

QUERIES = ["a man opens the door", "the dog jumps", "seasoning the steak", "someone waves"]


def make_plan(frames: int, fps: float, height: int = 56, width: int = 84) -> SamplingPlan:
    return SamplingPlan(
        fps=fps, frame_times_s=tuple(k / fps for k in range(frames)), height=height, width=width,
        grid_t=frames // 2, grid_h=height // 14, grid_w=width // 14,
        visual_tokens=frames // 2 * (height // 14) * (width // 14) // 4, second_per_grid_ts=2 / fps,
    )


def make_frames(plan: SamplingPlan, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (plan.frames, plan.height, plan.width, 3), dtype=np.uint8)
