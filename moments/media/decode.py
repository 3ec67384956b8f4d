"""Decode the frames of a sampling plan: chosen by timestamp, resized in FFmpeg, in bounded chunks.

For each planned time t the frame shown at ``info.start_time_s + t`` is returned: the last frame
whose pts is <= that time (the first frame if none), so variable-frame-rate files come out
right. Frames are scaled to the plan size by FFmpeg (swscale) straight from the decoded picture,
and the display rotation is applied, so nothing is held at full resolution and memory stays at
one chunk of small frames whatever the length of the video.

Two backends:

* ``pyav``: seek to the keyframe before the first needed time, decode forward with frame
  threading, and seek again when the next target is further than max(2 s, the observed GOP).
* ``decord``: ``VideoReader`` at the target size, ``get_frame_timestamp`` to map times to indices,
  ``get_batch`` per chunk.

``auto`` uses the faster one on our benchmark (``benchmarks/decode.py``) and falls back to the
other for the remaining frames if it raises.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from moments.media.probe import SNIFF_BYTES, open_container, sniff_format
from moments.core.records import VideoInfo
from moments.media.sampling import SamplingPlan

log = logging.getLogger(__name__)

BACKENDS = ("pyav", "decord")
AUTO_ORDER = ("pyav", "decord")
"""Order ``auto`` tries. PyAV first: on benchmarks/RESULTS.md it is faster on long (sparsely
sampled) videos and uses less memory; decord only wins on short clips sampled at 2 fps. PyAV
also handles every codec the probe allows (decord is limited to ``DECORD_CODECS``)."""
MIN_SEEK_GAP_S = 2.0
"""Seek instead of decoding forward when the next target is further than this (or a GOP)."""
INTERPOLATION = "BILINEAR"
"""swscale filter for the downscale (swscale's bilinear widens its kernel when shrinking)."""
DECORD_CODECS = frozenset({"h264"})
"""Codecs where decord's seeking is frame-accurate in our tests. With HEVC (open GOP) its
``get_batch`` returns frames a few indices off after a seek, so those files go to PyAV."""
_EPS_S = 1e-6
FLOAT32_SLACK = 4 * 2.0**-24
"""Relative error of decord's float32 times (a float32 pts times a float32 time base)."""

ProgressFn = Callable[[int, int], None]


_PARALLEL = threading.local()
"""``codec_threads`` of the calling parallel-decode thread: FFmpeg's own threads per decoder, so
that parallel decoders share the cores instead of each starting one thread per core (and each
holding that many frames in flight)."""


def default_threads() -> int:
    """Parallel chunk decoders when the settings say 0: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


class UnsupportedByBackend(RuntimeError):
    """This backend cannot decode this file correctly; ``auto`` moves on quietly."""


def decode_frames(path: str | os.PathLike, plan: SamplingPlan, info: VideoInfo, *,
                  backend: str = "auto", chunk_frames: int = 64,
                  progress: ProgressFn | None = None, threads: int = 1) -> Iterator[np.ndarray]:
    """Yield uint8 RGB chunks [n, plan.height, plan.width, 3] of the plan's frames, in order.

    ``n`` is even (whole 2-frame groups) and at most ``chunk_frames`` (rounded down to even).
    ``progress(done_frames, total_frames)`` is called after each chunk. With ``threads`` > 1,
    chunks are decoded in parallel, each from its own container, at most ``threads`` ahead of the
    consumer (FFmpeg decodes without the GIL); the frames are the same.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown decode backend {backend!r}; use auto, {', '.join(BACKENDS)}")
    chunk = max(2, chunk_frames - chunk_frames % 2)
    targets_s = [float(t) for t in plan.frame_times_s]
    total = len(targets_s)
    order = AUTO_ORDER if backend == "auto" else (backend,)
    started = time.monotonic()
    if threads > 1 and total > chunk:
        yield from _decode_parallel(path, targets_s, plan, info, order, chunk, threads, progress)
        log.debug("decoded %d frames of %s in %.2f s (%d threads)", total, path, time.monotonic() - started,
                  threads)
        return
    buf = np.empty((chunk, plan.height, plan.width, 3), np.uint8)
    filled = done = 0
    for attempt, name in enumerate(order):
        try:
            for frame in _BACKEND_FNS[name](path, targets_s[done + filled:], plan, info, chunk):
                buf[filled] = frame
                filled += 1
                if filled == chunk:
                    done += filled
                    filled = 0
                    yield buf.copy()
                    if progress is not None:
                        progress(done, total)
            break
        except Exception as exc:  # noqa: BLE001 - any backend failure falls through to the next
            if attempt + 1 >= len(order):
                raise
            (log.debug if isinstance(exc, UnsupportedByBackend) else log.warning)("decode backend %s failed on %s after %d frames (%s); trying %s",
                        name, path, done + filled, exc, order[attempt + 1])
    if done + filled != total:
        raise RuntimeError(f"decoded {done + filled} of {total} frames of {path}")
    if filled:
        done += filled
        yield buf[:filled].copy()
        if progress is not None:
            progress(done, total)
    log.debug("decoded %d frames of %s in %.2f s", total, path, time.monotonic() - started)


def _decode_parallel(path: str | os.PathLike, targets_s: Sequence[float], plan: SamplingPlan, info: VideoInfo,
                     order: Sequence[str], chunk: int, threads: int,
                     progress: ProgressFn | None) -> Iterator[np.ndarray]:
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    starts = iter(range(0, len(targets_s), chunk))
    codec_threads = max(1, (os.cpu_count() or 1) // threads)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="frame-decode")
    pending: deque = deque()
    done = 0

    def submit_next() -> None:
        start = next(starts, None)
        if start is not None:
            pending.append(pool.submit(_decode_chunk, path, targets_s[start:start + chunk], plan, info, order,
                                       codec_threads))

    try:
        for _ in range(threads):
            submit_next()
        while pending:
            frames = pending.popleft().result()
            submit_next()
            done += len(frames)
            yield frames
            if progress is not None:
                progress(done, len(targets_s))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_chunk(path: str | os.PathLike, targets_s: Sequence[float], plan: SamplingPlan, info: VideoInfo,
                  order: Sequence[str], codec_threads: int) -> np.ndarray:
    """One chunk's frames from its own container, by the first backend of ``order`` that decodes them."""
    _PARALLEL.codec_threads = codec_threads
    for attempt, name in enumerate(order):
        try:
            frames = list(_BACKEND_FNS[name](path, targets_s, plan, info, len(targets_s)))
            if len(frames) != len(targets_s):
                raise RuntimeError(f"decoded {len(frames)} of {len(targets_s)} frames of {path}")
            return np.stack(frames)
        except Exception as exc:  # noqa: BLE001 - any backend failure falls through to the next
            if attempt + 1 >= len(order):
                raise
            (log.debug if isinstance(exc, UnsupportedByBackend) else log.warning)(
                "decode backend %s failed on %s (%s); trying %s", name, path, exc, order[attempt + 1])
    raise AssertionError("unreachable")


def decode_all(path: str | os.PathLike, plan: SamplingPlan, info: VideoInfo, *,
               backend: str = "auto", chunk_frames: int = 64,
               progress: ProgressFn | None = None, threads: int = 1) -> np.ndarray:
    """All of the plan's frames as one array [plan.frames, plan.height, plan.width, 3]."""
    out = np.empty((plan.frames, plan.height, plan.width, 3), np.uint8)
    at = 0
    for part in decode_frames(path, plan, info, backend=backend, chunk_frames=chunk_frames,
                              progress=progress, threads=threads):
        out[at:at + len(part)] = part
        at += len(part)
    return out


def _coded_size(plan: SamplingPlan, rotation_degrees: int) -> tuple[int, int]:
    """(width, height) to scale the stored picture to, so that after rotation it is the plan size."""
    if rotation_degrees % 180 == 90:
        return plan.height, plan.width
    return plan.width, plan.height


def _rotate(img: np.ndarray, rotation_degrees: int) -> np.ndarray:
    """Turn a stored picture clockwise by ``rotation_degrees`` (what a player shows)."""
    turns = (rotation_degrees // 90) % 4
    return np.rot90(img, k=-turns) if turns else img


# ------------------------------------------------------------------------------ PyAV backend


def _pyav_frames(path: str | os.PathLike, targets_s: Sequence[float], plan: SamplingPlan,
                 info: VideoInfo, chunk: int) -> Iterator[np.ndarray]:
    import av

    out_w, out_h = _coded_size(plan, info.rotation_degrees)
    container = open_container(path, max_pixels=max(1, info.width * info.height) * 2)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = getattr(_PARALLEL, "codec_threads", 0)  # 0: FFmpeg's choice
        for other in container.streams:
            if other.index != stream.index:
                other.discard = av.stream.Discard.all
        last_rgb: np.ndarray | None = None
        last_frame: Any = None
        for frame in _frames_at(container, stream, [info.start_time_s + t for t in targets_s]):
            if frame is not last_frame:  # repeated times reuse the converted picture
                rgb = frame.reformat(width=out_w, height=out_h, format="rgb24",
                                     interpolation=INTERPOLATION).to_ndarray()
                last_rgb, last_frame = _rotate(rgb, info.rotation_degrees), frame
            yield last_rgb
    finally:
        container.close()


def _frames_at(container: Any, stream: Any, targets_s: Sequence[float]) -> Iterator[Any]:
    """For each (non-decreasing) absolute target time, the av.VideoFrame shown at that time."""
    time_base = float(stream.time_base)
    stream_start_s = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    gop_s = MIN_SEEK_GAP_S
    i, n = 0, len(targets_s)
    while i < n:
        # Seek to the keyframe before targets[i]; then decode forward, seeking again only for a
        # later target that is further ahead than a GOP (a seek could not land any closer).
        sought = i
        frames = _seek_decode(container, stream, targets_s[i], stream_start_s, time_base)
        prev = None
        last_key_s: float | None = None
        needs_seek = False
        for frame in frames:
            t = _frame_time_s(frame, time_base)
            if t is None:
                continue
            if frame.key_frame:
                if last_key_s is not None and t > last_key_s:
                    gop_s = max(gop_s, t - last_key_s)
                last_key_s = t
            if prev is None:  # where the seek landed: the GOP is at least this long
                gop_s = max(gop_s, targets_s[sought] - t)
            while i < n and t > targets_s[i] + _EPS_S:
                yield prev if prev is not None else frame
                i += 1
            prev = frame
            if i >= n:
                return
            if i > sought and targets_s[i] - t > max(MIN_SEEK_GAP_S, gop_s):
                needs_seek = True
                break
        if needs_seek:
            continue
        # End of stream: the remaining targets are at or after the last frame.
        if prev is None:
            raise RuntimeError("no frame decodes at or after the seek point")
        while i < n:
            yield prev
            i += 1


def _seek_decode(container: Any, stream: Any, target_s: float, stream_start_s: float,
                 time_base: float) -> Iterator[Any]:
    """Frames from the keyframe before ``target_s``, backing off if the demuxer overshoots."""
    back_s = 0.0
    while True:
        seek_s = target_s - back_s
        if seek_s <= stream_start_s + _EPS_S:
            container.seek(int(stream_start_s / time_base), stream=stream, backward=True)
            return _decode_iter(container, stream, None)
        container.seek(int(seek_s / time_base), stream=stream, backward=True)
        frames = _decode_iter(container, stream, None)
        first = next(frames, None)
        if first is None:
            back_s = back_s * 2 + 1.0
            continue
        t = _frame_time_s(first, time_base)
        if t is None or t <= target_s + _EPS_S:
            return _decode_iter(container, stream, first, frames)
        back_s = back_s * 2 + 1.0  # landed after the target (imprecise index): seek earlier


def _decode_iter(container: Any, stream: Any, first: Any, rest: Iterator[Any] | None = None) -> Iterator[Any]:
    if first is not None:
        yield first
        yield from rest  # type: ignore[misc]
    else:
        yield from container.decode(stream)


def _frame_time_s(frame: Any, time_base: float) -> float | None:
    pts = frame.pts
    if pts is None:
        return None
    return pts * time_base


# ---------------------------------------------------------------------------- decord backend


def _decord_frames(path: str | os.PathLike, targets_s: Sequence[float], plan: SamplingPlan,
                   info: VideoInfo, chunk: int) -> Iterator[np.ndarray]:
    import decord

    if info.codec not in DECORD_CODECS:
        raise UnsupportedByBackend(f"decord is not frame-accurate for {info.codec}")
    with open(path, "rb") as f:  # decord lets FFmpeg guess the demuxer: refuse what we never allow
        sniff_format(f.read(SNIFF_BYTES))
    # This decord build (FFmpeg autorotate) returns frames turned for display, scaled to the
    # width/height asked: ask for the plan size and rotate nothing (tests/test_decode.py checks).
    reader = decord.VideoReader(os.fspath(path), ctx=decord.cpu(0), width=plan.width,
                                height=plan.height)
    count = len(reader)
    if count == 0:
        raise RuntimeError("decord found no frames")
    exact_s = _frame_times_s(path, count)
    if exact_s is not None:  # the same times and rule as the PyAV backend
        wanted = np.asarray(targets_s, np.float64) + info.start_time_s
        indices = np.searchsorted(exact_s, wanted + _EPS_S, side="right") - 1
    else:
        # decord's own times count from the stream start (the plan's from the first frame) and
        # are float32, off by a few units in the last place: allow that much.
        starts_s = reader.get_frame_timestamp(range(count))[:, 0].astype(np.float64)
        wanted = np.asarray(targets_s, np.float64) + starts_s[0]
        slack_s = np.maximum(_EPS_S, FLOAT32_SLACK * np.abs(wanted))
        indices = np.searchsorted(starts_s, wanted + slack_s, side="right") - 1
    indices = np.clip(indices, 0, count - 1)
    for at in range(0, len(indices), chunk):
        part = indices[at:at + chunk]
        unique, inverse = np.unique(part, return_inverse=True)
        batch = reader.get_batch(unique.tolist()).asnumpy()
        for j in inverse:
            yield batch[j]
    del reader


def _frame_times_s(path: str | os.PathLike, count: int) -> np.ndarray | None:
    """Every frame's presentation time (pts x time base, float64, sorted) from the packets, or
    None when their number is not decord's frame count (the indices would not line up).

    decord reports times as float32 computed from a float32 pts, so late in a long file a frame
    that starts exactly at a planned time reads a little after it (1501.5 s in an NTSC file comes
    back as 1501.50012) and the frame before would be chosen. Demuxing costs a pass over the
    packets without decoding, as decord's own indexing does when it opens the file.
    """
    import av

    container = open_container(path)
    try:
        stream = container.streams.video[0]
        for other in container.streams:
            if other.index != stream.index:
                other.discard = av.stream.Discard.all
        pts = [p.pts for p in container.demux(stream) if p.pts is not None and p.size]
        time_base = float(stream.time_base)
    finally:
        container.close()
    if len(pts) != count:
        log.debug("%s: %d packets with a pts, decord counts %d frames; using decord's times", path, len(pts), count)
        return None
    return np.sort(np.asarray(pts, np.int64)) * time_base


_BACKEND_FNS = {"pyav": _pyav_frames, "decord": _decord_frames}
