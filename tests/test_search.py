"""The search's windows (pure): when one pass is enough, how long videos are tiled, the bounds, zoom."""

from __future__ import annotations

import math

import pytest

from moments.core.records import SearchRequest, VideoInfo
from moments.media.sampling import SamplingOptions
from moments.workers.search import (PIECE_GAP_FRACTION, Window, coarse_windows, merge_segments, overview_window,
                                    zoom_window)

GROUNDER = SamplingOptions(max_frames=64, budget_tokens=512, min_pixels=56 * 56, max_pixels=2 * 56 * 56)
"""The tiny grounder's bounds (moments_sampling.json)."""
AUTO = SearchRequest(mode="auto", min_event_s=2.0, max_rounds=2, max_passes=64, max_visual_tokens=4_000_000)


def video(duration_s: float, fps: float = 25.0) -> VideoInfo:
    return VideoInfo("a" * 64, 1, duration_s, fps, 224, 168, "h264", "mov")


def covered(windows: list[Window], t: float) -> bool:
    return any(w.plan.frame_times_s[0] <= t <= w.plan.frame_times_s[-1] + 1 / w.plan.fps for w in windows)


@pytest.mark.parametrize("duration_s", [20.5, 64.0, 127.0])
def test_one_pass_when_it_already_sees_every_two_seconds(duration_s):
    [w] = coarse_windows(video(duration_s), GROUNDER, AUTO)
    assert w.step_s <= 2.0 and w.plan.frame_times_s[0] == 0.0


@pytest.mark.parametrize("duration_s", [600.0, 1433.5, 3600.0])
def test_long_videos_are_tiled_at_the_event_rate_with_one_step_of_overlap(duration_s):
    info = video(duration_s)
    windows = coarse_windows(info, GROUNDER, AUTO)
    assert len(windows) > 1
    for w in windows:
        assert w.step_s <= 2.0 + 1e-9 and w.plan.frames <= 64 and w.plan.visual_tokens <= 512
        assert all(w.options.start_s - 1e-9 <= t < duration_s for t in w.plan.frame_times_s)
    for a, b in zip(windows, windows[1:]):
        assert b.options.start_s == pytest.approx(a.options.end_s - a.step_s)  # one frame step shared
    # Every moment of the video is within some window, so a 2 s event has a sampled frame.
    assert all(covered(windows, t) for t in range(0, int(duration_s), 1))
    assert len(windows) == math.ceil((duration_s - 2.0) / (128.0 - 2.0))


def test_bounds_on_passes_and_tokens_make_fewer_coarser_windows():
    info = video(3600.0)
    few = coarse_windows(info, GROUNDER, SearchRequest("auto", 2.0, 2, 8, 4_000_000))
    assert len(few) <= 8 and few[0].step_s > 2.0
    assert all(covered(few, t) for t in range(0, 3600, 5))
    cheap = coarse_windows(info, GROUNDER, SearchRequest("auto", 2.0, 2, 64, 2000))
    assert sum(w.plan.visual_tokens for w in cheap) <= 2000


def test_search_off_is_one_pass():
    [w] = coarse_windows(video(3600.0), GROUNDER, SearchRequest("off", 2.0, 2, 64, 4_000_000))
    assert w.plan.frames == 64 and w.step_s > 50


def test_a_small_budget_shrinks_windows_to_keep_the_rate():
    # A 7B-like frame size: the budget holds fewer frames than the cap at 2 s steps.
    options = SamplingOptions(max_frames=768, budget_tokens=24576)
    info = VideoInfo("b" * 64, 1, 3600.0, 30.0, 1280, 720, "h264", "mov")
    windows = coarse_windows(info, options, AUTO)
    assert all(w.step_s <= 2.0 + 1e-9 and w.plan.visual_tokens <= 24576 for w in windows)
    assert all(covered(windows, t) for t in range(0, 3600, 2))


def test_zoom_windows_look_densely_around_short_candidates_only():
    info = video(3600.0)
    z = zoom_window(info, GROUNDER, (1000.0, 1003.0), coarse_step_s=2.0)
    assert z is not None and z.round == 2 and z.step_s == 0.5
    assert z.plan.frame_times_s[0] == 996.0 and z.plan.frame_times_s[-1] < 1007.0
    assert zoom_window(info, GROUNDER, (1000.0, 1100.0), coarse_step_s=2.0) is None  # no denser look fits
    edge = zoom_window(info, GROUNDER, (0.0, 2.0), coarse_step_s=2.0)
    assert edge is not None and edge.plan.frame_times_s[0] == 0.0


def test_merging_joins_overlapping_and_touching_segments_keeping_the_best_confidence():
    merged = merge_segments([(10.0, 14.0, 0.6), (13.0, 20.0, 0.9), (21.5, 25.0, 0.7), (40.0, 41.0, 0.8)], 2.0)
    assert merged == [(10.0, 25.0, 0.9), (40.0, 41.0, 0.8)]
    assert merge_segments([(0.0, 1.0, 0.5), (1.5, 2.0, 0.4)], 0.0) == [(0.0, 1.0, 0.5), (1.5, 2.0, 0.4)]


def join_pieces(segments):
    return merge_segments(segments, gap_fraction=PIECE_GAP_FRACTION)


def test_pieces_of_a_long_event_join_but_close_short_occurrences_stay_apart():
    # One 600 s event answered by consecutive windows with small gaps between the pieces.
    pieces = [(307.0, 375.0, 0.9), (381.0, 387.0, 0.8), (391.0, 394.0, 0.9), (409.0, 517.0, 0.7),
              (523.0, 555.0, 0.9), (574.0, 894.0, 0.6)]
    assert join_pieces(pieces) == [(307.0, 894.0, 0.9)]
    # Two 2 s occurrences 2 s apart, and two 5 s ones 30 s apart, are separate occurrences.
    assert join_pieces([(10.0, 12.0, 0.9), (14.0, 16.0, 0.8)]) == [(10.0, 12.0, 0.9), (14.0, 16.0, 0.8)]
    assert len(join_pieces([(100.0, 105.0, 0.9), (135.0, 140.0, 0.9)])) == 2
    assert join_pieces([(0.0, 5.0, 0.5), (4.0, 6.0, 0.7)]) == [(0.0, 6.0, 0.7)]


def test_an_overview_pass_goes_with_tiled_windows_only():
    info = video(1250.5)
    coarse = coarse_windows(info, GROUNDER, AUTO)
    overview = overview_window(info, GROUNDER, coarse)
    assert len(coarse) > 1 and overview is not None
    assert overview.plan.frame_times_s[0] == 0.0 and overview.plan.frame_times_s[-1] > 1200.0
    assert overview.plan.frames <= GROUNDER.max_frames and overview.step_s > coarse[0].step_s
    short = video(60.0)
    assert overview_window(short, GROUNDER, coarse_windows(short, GROUNDER, AUTO)) is None
