"""The dynamic-FPS sampling plan: fps = 2/k, frame and token caps, sizes, times."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moments.media.sampling import (
    SamplingOptions,
    _covering,
    _frame_count,
    _frame_size,
    plan_sampling,
    smart_resize,
)

DEFAULT = SamplingOptions()

# duration_s, width, height -> k (fps = 2/k), frames, width, height, grid (t, h, w), tokens.
# Default options: 768 frames, 24576 tokens, 128..768 tokens per frame pair.
TABLE = [
    (3, 1920, 1080, 1, 6, 1008, 560, (3, 40, 72), 2160),
    (59, 1920, 1080, 1, 118, 756, 420, (59, 30, 54), 23895),
    (59, 640, 480, 1, 118, 644, 476, (59, 34, 46), 23069),
    (600, 1280, 720, 3, 400, 420, 224, (200, 16, 30), 24000),
    (600, 1920, 1080, 3, 400, 420, 224, (200, 16, 30), 24000),
    (600, 1080, 1920, 3, 400, 224, 420, (200, 30, 16), 24000),
    (37 * 60, 1920, 1080, 11, 404, 420, 224, (202, 16, 30), 24240),
    (3600, 1920, 1080, 18, 400, 420, 224, (200, 16, 30), 24000),
    (3600, 1280, 720, 18, 400, 420, 224, (200, 16, 30), 24000),
    (3 * 3600, 1920, 1080, 53, 408, 420, 224, (204, 16, 30), 24480),
    (3 * 3600, 640, 480, 52, 416, 364, 252, (208, 18, 26), 24336),
]


@pytest.mark.parametrize("duration_s,width,height,k,frames,out_w,out_h,grid,tokens", TABLE)
def test_plan_table(duration_s, width, height, k, frames, out_w, out_h, grid, tokens):
    plan = plan_sampling(duration_s, 30.0, width, height, DEFAULT)
    assert plan.fps == pytest.approx(2.0 / k)
    assert plan.second_per_grid_ts == float(k)
    assert plan.frames == frames
    assert (plan.width, plan.height) == (out_w, out_h)
    assert (plan.grid_t, plan.grid_h, plan.grid_w) == grid
    assert plan.visual_tokens == tokens <= DEFAULT.budget_tokens
    assert plan.frame_times_s[:3] == (0.0, k / 2, float(k))
    assert plan.frame_times_s[-1] < duration_s


def test_short_video_gets_min_frames_at_true_spacing():
    # 1 s at 25 fps: 2 frames cover it; the other two repeat the last frame (0.96 s), the
    # spacing of the first two stays 0.5 s so the model's clock is right.
    plan = plan_sampling(1.0, 25.0, 320, 240, DEFAULT)
    assert plan.fps == 2.0
    assert plan.frame_times_s == (0.0, 0.5, 0.96, 0.96)


def test_odd_count_padded_with_last_time():
    plan = plan_sampling(2.6, 25.0, 320, 240, DEFAULT)  # 6 frames cover [0, 2.6)
    assert plan.frame_times_s == (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
    plan = plan_sampling(3.4, 25.0, 320, 240, DEFAULT)  # 7 frames cover it, padded to 8
    assert plan.frame_times_s == (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0)


def test_range_selection_starts_at_range_start():
    plan = plan_sampling(100.0, 25.0, 640, 360, SamplingOptions(start_s=10.0, end_s=13.2))
    assert plan.frame_times_s == (10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0, 13.0)


def test_end_past_duration_is_clamped():
    plan = plan_sampling(5.0, 10.0, 640, 360, SamplingOptions(start_s=3.0, end_s=99.0))
    assert plan.frame_times_s == (3.0, 3.5, 4.0, 4.5)


def test_max_fps_and_native_fps_lower_the_rate():
    assert plan_sampling(20.0, 30.0, 640, 360, SamplingOptions(max_fps=1.0)).fps == 1.0
    assert plan_sampling(20.0, 30.0, 640, 360, SamplingOptions(max_fps=0.7)).fps == pytest.approx(2 / 3)
    # A 0.5 fps slideshow: sampling at 2 fps would only repeat frames.
    assert plan_sampling(60.0, 0.5, 640, 360, DEFAULT).fps == 0.5


def test_frame_cap_binds_when_budget_is_large():
    plan = plan_sampling(600.0, 30.0, 1920, 1080, SamplingOptions(budget_tokens=200_000))
    assert (plan.fps, plan.frames) == (1.0, 600)  # 2 fps would be 1200 > 768 frames
    assert (plan.width, plan.height, plan.visual_tokens) == (952, 532, 193_800)


def test_smart_resize_matches_reference_values():
    # Values from the qwen-vl-utils arithmetic.
    assert smart_resize(1080, 1920, min_pixels=100352, max_pixels=602112) == (560, 1008)
    assert smart_resize(240, 320, min_pixels=100352, max_pixels=602112) == (280, 392)
    assert smart_resize(28, 28, min_pixels=784, max_pixels=784) == (28, 28)
    with pytest.raises(ValueError):
        smart_resize(10, 2100, min_pixels=784, max_pixels=10**6)


@pytest.mark.parametrize("args,options", [
    ((0.0, 30.0, 640, 360), DEFAULT),
    ((-1.0, 30.0, 640, 360), DEFAULT),
    ((float("nan"), 30.0, 640, 360), DEFAULT),
    ((10.0, -1.0, 640, 360), DEFAULT),
    ((10.0, 30.0, 0, 360), DEFAULT),
    ((10.0, 30.0, 640, 360), SamplingOptions(max_fps=0.0)),
    ((10.0, 30.0, 640, 360), SamplingOptions(min_frames=1)),
    ((10.0, 30.0, 640, 360), SamplingOptions(max_frames=2)),
    ((10.0, 30.0, 640, 360), SamplingOptions(budget_tokens=0)),
    ((10.0, 30.0, 640, 360), SamplingOptions(min_pixels=10**6, max_pixels=10)),
    ((10.0, 30.0, 640, 360), SamplingOptions(start_s=5.0, end_s=5.0)),
    ((10.0, 30.0, 640, 360), SamplingOptions(start_s=10.0)),
    ((10.0, 30.0, 640, 360), SamplingOptions(start_s=-1.0)),
    ((10.0, 30.0, 640, 360), SamplingOptions(budget_tokens=100)),  # < 2 pairs at min_pixels
])
def test_invalid_arguments_raise(args, options):
    with pytest.raises(ValueError):
        plan_sampling(*args, options)


@st.composite
def cases(draw):
    duration_s = draw(st.floats(0.05, 5 * 3600.0))
    native_fps = draw(st.sampled_from([0.0, 0.5, 1.0, 12.0, 23.976, 25.0, 30.0, 60.0, 120.0]))
    width = draw(st.integers(16, 4096))
    height = draw(st.integers(16, 4096))
    assume(max(width, height) / min(width, height) <= 50)
    min_frames = draw(st.sampled_from([2, 4, 6]))
    min_tokens = draw(st.sampled_from([4, 64, 128]))
    options = SamplingOptions(
        max_fps=draw(st.sampled_from([0.1, 0.5, 1.0, 2.0, 3.0])),
        max_frames=draw(st.integers(min_frames, 1024)),
        min_frames=min_frames,
        budget_tokens=draw(st.integers(500, 200_000)),
        min_pixels=min_tokens * 784,
        max_pixels=draw(st.sampled_from([256, 768, 1280])) * 784,
    )
    return duration_s, native_fps, width, height, options


@settings(max_examples=300, deadline=None)
@given(cases())
def test_plan_properties(case):
    duration_s, native_fps, width, height, options = case
    try:
        plan = plan_sampling(duration_s, native_fps, width, height, options)
    except ValueError as exc:
        assert "budget" in str(exc)
        return
    k = round(2.0 / plan.fps)
    assert k >= 1 and plan.fps == 2.0 / k
    assert plan.second_per_grid_ts == k
    assert plan.fps <= options.max_fps + 1e-9
    assert options.min_frames <= plan.frames <= options.max_frames
    assert plan.frames % 2 == 0
    assert plan.width % 28 == 0 and plan.height % 28 == 0
    assert plan.grid_t * 2 == plan.frames
    assert (plan.grid_h, plan.grid_w) == (plan.height // 14, plan.width // 14)
    assert plan.visual_tokens == plan.grid_t * plan.grid_h * plan.grid_w // 4
    assert plan.visual_tokens <= options.budget_tokens
    times = plan.frame_times_s
    assert all(0.0 <= t < duration_s for t in times)
    assert all(b >= a for a, b in zip(times, times[1:]))
    steps = {round(b - a, 6) for a, b in zip(times, times[1:]) if b > a + 1e-6}
    assert all(step <= k / 2 + 1e-6 for step in steps)  # never sparser than 1/fps
    covering = math.ceil(duration_s * plan.fps - 1e-9)
    if covering >= options.min_frames and times[-1] <= duration_s - k / 2:
        assert len(steps) <= 1  # a long-enough video: exactly 1/fps apart
    # k is the smallest that works: k - 1 breaks a bound.
    if k > 1:
        faster = 2.0 / (k - 1)
        fps_cap = min(options.max_fps, native_fps) if native_fps > 0 else options.max_fps
        last_s = duration_s - (1.0 / native_fps if native_fps > 0 else 1e-3)
        frames = _frame_count(_covering(duration_s, last_s, k - 1), options.min_frames)
        if faster <= fps_cap + 1e-9 and frames <= options.max_frames:
            h, w = _frame_size(height, width, frames, options)
            assert (frames // 2) * (h // 28) * (w // 28) > options.budget_tokens
