"""The sampling plan: which frames of a video the model sees, at what size (a pure function)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moments.core.config import Settings
    from moments.core.records import SamplingRequest

PATCH_PX = 14
"""Side of a vision patch (Qwen2.5-VL)."""
FACTOR_PX = 28
"""Frame sides are multiples of this: a 2x2 patch merge of 14 px patches."""
TEMPORAL_PATCH = 2
"""Frames per temporal grid step; frame counts are even."""
BASE_FPS = 2.0
"""Highest sampled rate; every plan uses BASE_FPS / k for a whole k."""
MAX_ASPECT_RATIO = 200


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


def resolve_options(request: "SamplingRequest", settings: "Settings",
                    bounds: Mapping[str, int] | None = None) -> SamplingOptions:
    """The one place a request's sampling becomes plan options: its own values, else the server's
    defaults, always within the loaded model's bounds (``moments_sampling.json``: a checkpoint trained
    with at most N frames or tokens, or at a frame size, never gets more or other)."""
    filled = request.with_defaults(settings)
    bounds = bounds or {}
    max_frames = min(filled.max_frames, bounds.get("max_frames", filled.max_frames))
    budget = min(filled.budget_tokens, bounds.get("budget_tokens", filled.budget_tokens))
    base = SamplingOptions()
    return SamplingOptions(max_fps=min(filled.max_fps, settings.max_fps), max_frames=max_frames,
                           budget_tokens=budget, min_pixels=bounds.get("min_pixels", base.min_pixels),
                           max_pixels=bounds.get("max_pixels", base.max_pixels),
                           start_s=filled.start_s, end_s=filled.end_s)


def smart_resize(height: int, width: int, *, factor: int = FACTOR_PX, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule: sides multiples of ``factor``, area in [min_pixels, max_pixels].

    Same arithmetic as qwen-vl-utils / transformers ``smart_resize``, with every side at least
    ``factor`` (the area can then end slightly off the bounds for extreme aspect ratios).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of {width}x{height} is over {MAX_ASPECT_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def plan_sampling(duration_s: float, native_fps: float, width: int, height: int,
                  options: SamplingOptions) -> SamplingPlan:
    """Choose the frames the model sees (dynamic FPS) and their size, within the option bounds.

    * fps = 2/k for the smallest whole k >= 1 such that fps <= ``max_fps``, fps <= the native
      rate (when known: sampling faster only repeats frames), frames <= ``max_frames`` and
      visual tokens <= ``budget_tokens``. So ``second_per_grid_ts`` = k, a whole number of seconds.
    * Frames sit every 1/fps s from the range start over [start, end) of the selected range
      (default the whole video); no time is later than the last frame of the range
      (end - 1/native_fps).
    * At least ``min_frames``. A range shorter than ``min_frames`` / fps keeps the 1/fps spacing
      (so the model's time axis stays true) and clamps the extra times to the last frame: the
      tail repeats the last frame rather than squeezing frames closer than 1/fps.
    * The frame count is even; an odd count repeats the last time.
    * Frame size: ``smart_resize`` with the per-frame pixel cap
      max(min(max_pixels, pixels the budget leaves per frame), min_pixels), where tokens =
      (frames / 2) * (h / 28) * (w / 28). When rounding still exceeds the budget, k grows.

    ``width``/``height`` are the displayed size (after rotation). ``frame_times_s`` count from
    the first frame of the video; the decoder adds the container start time. Raises ValueError
    for invalid arguments or a budget too small for ``min_frames`` at ``min_pixels``.
    """
    _validate(duration_s, native_fps, width, height, options)
    start_s = 0.0 if options.start_s is None else float(options.start_s)
    end_s = duration_s if options.end_s is None else min(float(options.end_s), duration_s)
    if not 0.0 <= start_s < end_s:
        raise ValueError(f"empty or invalid range [{start_s}, {end_s}) of a {duration_s} s video")
    span_s = end_s - start_s
    # Time of the range's last frame; unknown rate: just before the end.
    last_frame_s = max(start_s, end_s - (1.0 / native_fps if native_fps > 0 else 1e-3))

    fps_cap = min(options.max_fps, native_fps) if native_fps > 0 else options.max_fps
    k = max(1, math.ceil(BASE_FPS / fps_cap - 1e-9))
    # Skip ks that cannot satisfy the frame cap (keeps the loop short for very long videos).
    k = max(k, math.floor((last_frame_s - start_s) * BASE_FPS / options.max_frames))
    while True:
        covering = _covering(span_s, last_frame_s - start_s, k)
        frames = _frame_count(covering, options.min_frames)
        if frames <= options.max_frames:
            h, w = _frame_size(height, width, frames, options)
            tokens = (frames // TEMPORAL_PATCH) * (h // FACTOR_PX) * (w // FACTOR_PX)
            if tokens <= options.budget_tokens:
                break
        if covering <= options.min_frames:  # larger k cannot lower the count any more
            raise ValueError(
                f"budget of {options.budget_tokens} tokens cannot hold {frames} frames of "
                f"{width}x{height} at min_pixels={options.min_pixels}"
            )
        k += 1

    step_s = k / BASE_FPS
    times = [min(start_s + i * step_s, last_frame_s) for i in range(max(covering, options.min_frames))]
    times += [times[-1]] * (frames - len(times))
    return SamplingPlan(
        fps=BASE_FPS / k,
        frame_times_s=tuple(round(t, 6) for t in times),
        height=h,
        width=w,
        grid_t=frames // TEMPORAL_PATCH,
        grid_h=h // PATCH_PX,
        grid_w=w // PATCH_PX,
        visual_tokens=tokens,
        second_per_grid_ts=float(TEMPORAL_PATCH * k / BASE_FPS),
    )


def _covering(span_s: float, last_offset_s: float, k: int) -> int:
    """Frames 1/fps apart from the range start, up to its last frame (none past it: a time after the
    last frame would show that frame again)."""
    return max(1, min(math.ceil(span_s * BASE_FPS / k - 1e-9), math.floor(last_offset_s * BASE_FPS / k + 1e-9) + 1))


def _frame_count(covering: int, min_frames: int) -> int:
    frames = max(covering, min_frames)
    return frames + frames % TEMPORAL_PATCH


def _frame_size(height: int, width: int, frames: int, options: SamplingOptions) -> tuple[int, int]:
    budget_pixels = options.budget_tokens * FACTOR_PX * FACTOR_PX * TEMPORAL_PATCH // frames
    cap = max(min(options.max_pixels, budget_pixels), options.min_pixels)
    return smart_resize(height, width, min_pixels=options.min_pixels, max_pixels=cap)


def _validate(duration_s: float, native_fps: float, width: int, height: int,
              options: SamplingOptions) -> None:
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    if not (math.isfinite(native_fps) and native_fps >= 0):
        raise ValueError(f"native_fps must be >= 0 (0 = unknown), got {native_fps}")
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    if not (math.isfinite(options.max_fps) and options.max_fps > 0):
        raise ValueError(f"max_fps must be positive, got {options.max_fps}")
    if options.min_frames < TEMPORAL_PATCH:
        raise ValueError(f"min_frames must be >= {TEMPORAL_PATCH}, got {options.min_frames}")
    if options.max_frames < options.min_frames + options.min_frames % TEMPORAL_PATCH:
        raise ValueError(f"max_frames {options.max_frames} is below min_frames {options.min_frames}")
    if options.budget_tokens <= 0:
        raise ValueError(f"budget_tokens must be positive, got {options.budget_tokens}")
    if not 0 < options.min_pixels <= options.max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {options.min_pixels}, {options.max_pixels}")
    for name in ("start_s", "end_s"):
        value = getattr(options, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
