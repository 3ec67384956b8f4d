"""Coarse-to-fine search through long videos: which windows to look at (pure functions).

One pass over a long video at a model's frame cap sees one frame every ``duration / max_frames``
seconds: a 64-frame model sees one frame a minute of an hour, so a 3-second event is usually not in
any frame. A search therefore looks in rounds:

1. **Coarse**: the whole range, sampled at least once every ``min_event_s`` seconds. When one pass
   already samples that densely it is the only pass; otherwise the range is tiled into windows of
   the model's frame cap at that rate (consecutive windows share one frame step, so an event on a
   border is seen whole in one of them).
   With windows, one more pass looks at the whole range at the model's frame cap (the overview): an
   event far longer than a window moves or shows too slowly to be seen inside any one window, and
   the overview's long answers (at least ``OVERVIEW_MIN_FRAMES`` of its frame steps) join the
   windows' candidates.
2. **Zoom**: every candidate a coarse pass found (score at least ``ZOOM_MIN_SCORE``) is looked at again
   in a window around it, at the highest frame rate the model allows; its answer replaces the
   candidate's (a denser look that does not find it drops it).

Each window's answer counts from its own first frame (window-relative time, as the model's position
ids do) and is mapped back to video time by the caller. The windows' plans are ordinary sampling
plans, so each window's visual tokens are cached (the plan is in the cache key) and its prefix KV kept
hot like a whole video's. Bounds: ``SearchRequest.max_passes`` windows, ``max_visual_tokens`` over
all passes, ``max_rounds`` rounds.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from moments.core.records import JobStats, QueryResult, SearchRequest, Segment, VideoInfo
from moments.media.sampling import BASE_FPS, SamplingOptions, SamplingPlan, plan_sampling
from moments.workers.answers import query_result
from moments.workers.model.engine import Engine, Prefix, VisualTokens
from moments.workers.model.scheduler import Cancelled

ZOOM_MIN_SCORE = 0.3
"""Coarse candidates scoring at least this are looked at again (below the default min_confidence, so a
borderline coarse answer can be confirmed by the denser look)."""
OVERVIEW_MIN_FRAMES = 6
"""An overview answer is kept when it spans at least this many of its frame steps (shorter ones are
the windows' to find, at their denser rate)."""
PIECE_GAP_FRACTION = 0.1
"""Pieces of one event seen by neighbouring windows join across a gap of up to this share of their
summed lengths (separate occurrences of a short event stay apart)."""
ZOOM_PAD_STEPS = 2
"""A zoom window reaches this many coarse frame steps beyond its candidate on each side."""


@dataclass(frozen=True)
class Window:
    """One pass: the sampling options of a window (its range in ``start_s``/``end_s``) and its plan."""

    options: SamplingOptions
    plan: SamplingPlan
    round: int
    """1 = coarse, 2 = zoom."""

    @property
    def start_s(self) -> float:
        return self.plan.frame_times_s[0]

    @property
    def step_s(self) -> float:
        return 1.0 / self.plan.fps


def _plan(info: VideoInfo, options: SamplingOptions) -> SamplingPlan:
    return plan_sampling(info.duration_s, info.native_fps, info.width, info.height, options)


def _range(info: VideoInfo, options: SamplingOptions) -> tuple[float, float]:
    start = options.start_s or 0.0
    end = info.duration_s if options.end_s is None else min(options.end_s, info.duration_s)
    return start, end


def coarse_windows(info: VideoInfo, options: SamplingOptions, search: SearchRequest) -> list[Window]:
    """The coarse round: one pass if it samples at least once every ``min_event_s`` (or search is off),
    else windows tiling the range at that rate (fewer, coarser ones when ``max_passes`` or
    ``max_visual_tokens`` would be exceeded)."""
    one = Window(options, _plan(info, options), 1)
    if search.mode == "off" or one.step_s <= search.min_event_s + 1e-9:
        return [one]
    start, end = _range(info, options)
    k = max(1, math.floor(BASE_FPS * search.min_event_s + 1e-9))  # step k/2 s <= min_event_s
    while True:
        windows = _tile(info, options, start, end, k)
        tokens = sum(w.plan.visual_tokens for w in windows)
        if (len(windows) <= max(1, search.max_passes) and tokens <= search.max_visual_tokens) or len(windows) == 1:
            return windows
        k += 1


def overview_window(info: VideoInfo, options: SamplingOptions, coarse: list[Window]) -> Window | None:
    """The whole-range pass that goes with tiled coarse windows (None when there is only one pass)."""
    if len(coarse) <= 1:
        return None
    return Window(options, _plan(info, options), 1)


def _tile(info: VideoInfo, options: SamplingOptions, start: float, end: float, k: int) -> list[Window]:
    """Windows over [start, end) sampled every k/2 s, as long as the model's frame cap and token budget
    allow at that rate, one frame step of overlap between neighbours."""
    step = k / BASE_FPS
    fps = min(options.max_fps, BASE_FPS / k)
    span = options.max_frames * step
    # The budget can hold fewer frames than the cap (frames at min_pixels): shrink until the plan keeps
    # the rate.
    while True:
        probe = _plan(info, replace(options, max_fps=fps, start_s=start, end_s=min(end, start + span)))
        if probe.fps >= fps - 1e-9 or span <= 4 * step:
            break
        span = max(4 * step, span * 0.8)
    windows, w0 = [], start
    while w0 < end - 1e-9:
        w1 = min(end, w0 + span)
        opts = replace(options, max_fps=fps, start_s=w0, end_s=w1 if w1 < info.duration_s else None)
        windows.append(Window(opts, _plan(info, opts), 1))
        if w1 >= end - 1e-9:
            break
        w0 = w1 - step  # one step of overlap: a border event is whole in one window
    return windows


def zoom_window(info: VideoInfo, options: SamplingOptions, candidate: tuple[float, float],
                coarse_step_s: float) -> Window | None:
    """A window around ``candidate`` (video seconds) at the highest rate the model allows; None when
    the candidate is too long for one zoom pass to see more densely than the coarse pass did."""
    pad = ZOOM_PAD_STEPS * coarse_step_s
    lo, hi = max(0.0, candidate[0] - pad), min(info.duration_s, candidate[1] + pad)
    start, end = _range(info, options)
    lo, hi = max(lo, start), min(hi, end)
    if hi - lo <= 0:
        return None
    opts = replace(options, start_s=lo, end_s=hi if hi < info.duration_s else None)
    plan = _plan(info, opts)
    if 1.0 / plan.fps >= coarse_step_s - 1e-9:
        return None
    return Window(opts, plan, 2)


def merge_segments(segments: list[tuple[float, float, float]], gap_s: float = 0.0,
                   gap_fraction: float = 0.0) -> list[tuple[float, float, float]]:
    """(start, end, confidence) from several windows: overlapping ones become one, with the higher
    confidence, and so do neighbours whose gap is at most ``gap_s`` or ``gap_fraction`` of their
    summed lengths (one long event answered in pieces by consecutive windows)."""
    merged: list[tuple[float, float, float]] = []
    for a, b, c in sorted(segments):
        if merged:
            pa, pb, pc = merged[-1]
            if a <= pb + max(gap_s, gap_fraction * ((pb - pa) + (b - a))):
                merged[-1] = (pa, max(pb, b), max(pc, c))
                continue
        merged.append((a, b, c))
    return merged


View = Callable[[Window], Awaitable[tuple[VisualTokens, Prefix]]]
"""A window's visual tokens and prefilled prefix (from caches, or made now)."""
Progress = Callable[..., Awaitable[None]]


class Searcher:
    """Answers a job's queries over the windows a search looks at: every query over the coarse
    windows (all queries share each window's pass), then zoom passes around the candidates; segments
    mapped to video time and merged. ``view`` supplies each window's tokens and prefix (the pipeline's
    cached one, or an in-process one); ``stats`` collects passes, tokens and stage times."""

    def __init__(self, engine: Engine, view: View, stats: JobStats, *, max_new_tokens: int,
                 progress: Progress | None = None, check: Callable[[], Awaitable[None]] | None = None) -> None:
        self.engine = engine
        self.view = view
        self.stats = stats
        self.max_new_tokens = max_new_tokens
        self.progress = progress or _nothing
        self.check = check or _nothing

    async def answer(self, info: VideoInfo, options: SamplingOptions, queries: list[str], search: SearchRequest,
                     min_confidence: float, coarse: list[Window] | None = None) -> list[QueryResult]:
        coarse = coarse or coarse_windows(info, options, search)
        found: list[list[tuple[float, float, float]]] = [[] for _ in queries]
        scores = [0.0] * len(queries)
        texts = [""] * len(queries)
        raws: list[float | None] = [None] * len(queries)
        zooming = len(coarse) > 1 and search.max_rounds >= 2
        overview = overview_window(info, options, coarse)
        passes = coarse + ([overview] if overview is not None else [])
        for i, window in enumerate(passes):
            if len(passes) > 1:
                what = "overview of the whole range" if window is overview else f"coarse window {i + 1} of {len(coarse)}"
                await self.progress("searching", i, len(passes), what, round=1)
            results = await self.one_pass(info, window, queries, ZOOM_MIN_SCORE if zooming else min_confidence)
            shortest = OVERVIEW_MIN_FRAMES * window.step_s if window is overview else 0.0
            for q, r in enumerate(results):
                found[q] += [(seg.start_s, seg.end_s, seg.confidence) for seg in r.segments
                             if seg.end_s - seg.start_s >= shortest - 1e-9]
                if r.score >= scores[q] or not texts[q]:
                    scores[q], texts[q], raws[q] = r.score, r.raw_answer, r.raw_presence
        if zooming:
            self.stats.rounds = 2
            step = 1.0 / coarse[0].plan.fps
            found = [await self._zoom(info, options, q, query, merge_segments(found[q], step), step, search,
                                      min_confidence) for q, query in enumerate(queries)]
        out = []
        for q, query in enumerate(queries):
            kept = [(a, b, c) for a, b, c in merge_segments(found[q], gap_fraction=PIECE_GAP_FRACTION) if c >= min_confidence]
            out.append(QueryResult(q, query, tuple(Segment(a, b, c) for a, b, c in kept), texts[q],
                                   max([scores[q]] + [c for _, _, c in kept]), raws[q]))
        return out

    async def _zoom(self, info: VideoInfo, options: SamplingOptions, q: int, query: str,
                    candidates: list[tuple[float, float, float]], coarse_step_s: float, search: SearchRequest,
                    min_confidence: float) -> list[tuple[float, float, float]]:
        """Each candidate looked at again, densely; its answer replaces the candidate's. Candidates that
        no zoom pass can see more densely, or past the search's bounds, stay as they are."""
        kept: list[tuple[float, float, float]] = []
        for k, (a, b, c) in enumerate(candidates):
            window = zoom_window(info, options, (a, b), coarse_step_s)
            if window is None or self.stats.passes >= search.max_passes or \
                    self.stats.total_visual_tokens + window.plan.visual_tokens > search.max_visual_tokens:
                kept.append((a, b, c))
                continue
            await self.progress("searching", k, len(candidates), f"zoom on {a:.1f}-{b:.1f} s for query {q + 1}",
                                round=2)
            [r] = await self.one_pass(info, window, [query], min_confidence)
            kept += [(s.start_s, s.end_s, s.confidence) for s in r.segments]
        return kept

    async def one_pass(self, info: VideoInfo, window: Window, queries: list[str],
                       threshold: float) -> list[QueryResult]:
        """One model pass over ``window``: an answer per query, segments at or above ``threshold``."""
        self.stats.passes += 1
        self.stats.total_visual_tokens += window.plan.visual_tokens
        tokens, prefix = await self.view(window)
        await self.check()
        await self.progress("generating", 0, len(queries), queries[0] if len(queries) == 1 else "")
        started = time.perf_counter()
        cancel = threading.Event()
        watcher = asyncio.create_task(self._watch(cancel))  # a cancelled job leaves the decoder at once
        try:
            generations = await asyncio.to_thread(self.engine.generate, tokens, queries,
                                                  max_new_tokens=self.max_new_tokens, prefix=prefix, cancel=cancel)
        except Cancelled:
            await self.check()  # raises the job's own cancellation
            raise
        finally:
            watcher.cancel()
        add_ms(self.stats, "generate", started)
        return [query_result(self.engine, q, query, g, tokens, info.duration_s, threshold)
                for q, (query, g) in enumerate(zip(queries, generations))]


    async def _watch(self, cancel: threading.Event, interval_s: float = 0.25) -> None:
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self.check()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the job is cancelled (or its deadline passed): stop decoding
            cancel.set()


async def _nothing(*args, **kwargs) -> None:
    return None


def add_ms(stats: JobStats, stage: str, started: float) -> None:
    stats.stage_ms[stage] = stats.stage_ms.get(stage, 0.0) + (time.perf_counter() - started) * 1000
