"""The sampling plan: which frames of a video the model sees, at what size (a pure function)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingOptions:
    """Bounds for a plan; defaults fit a 7B on one GPU without YaRN."""

    max_fps: float = 2.0
    max_frames: int = 768
    min_frames: int = 4
    budget_tokens: int = 24576
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    start_s: float | None = None
    end_s: float | None = None


@dataclass(frozen=True)
class SamplingPlan:
    """The frames to decode and how the model sees them."""

    fps: float
    """Sampled frame rate, 2/k for a whole k."""
    frame_times_s: tuple[float, ...]
    """Timestamp of every sampled frame, seconds from the first frame of the video (even count)."""
    height: int
    width: int
    """Resized frame size, multiples of 28."""
    grid_t: int
    grid_h: int
    grid_w: int
    """Patch grid (t = frames / 2; h, w = size / 14)."""
    visual_tokens: int
    """Tokens the language model sees: grid_t * grid_h * grid_w / 4."""
    second_per_grid_ts: float
    """Seconds per temporal grid step: temporal_patch_size / fps (a whole number)."""

    @property
    def frames(self) -> int:
        return len(self.frame_times_s)
