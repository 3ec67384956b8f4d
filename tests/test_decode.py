"""Frame-accurate sampled decoding: every decoded frame is the one shown at its planned time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import moments.media.decode as decode_mod
from moments.media.probe import probe_file
from tests.media import frame_times_s, index_at, make_video, read_index
from moments.media.decode import decode_all, decode_frames
from moments.media.sampling import SamplingOptions, SamplingPlan, plan_sampling

pytestmark = pytest.mark.timeout(60)

# Small frames keep the tests fast: 16..64 tokens per frame pair.
SMALL = dict(min_pixels=16 * 784, max_pixels=64 * 784)

# name -> make_video arguments
FILES = {
    "cfr.mp4": dict(seconds=12, fps=25),
    "vfr.mp4": dict(seconds=12, fps=25, vfr=True),
    "start.mkv": dict(seconds=12, fps=30, start_time_s=3.5),
    "start_vfr.mp4": dict(seconds=12, fps=30, start_time_s=1.25, vfr=True, seed=3),
    "rot90.mp4": dict(seconds=6, fps=25, rotation=90),
    "rot270_vfr.mp4": dict(seconds=6, fps=25, rotation=270, vfr=True),
    "rot180.mp4": dict(seconds=4, fps=25, rotation=180),
    "ts.ts": dict(seconds=8, fps=25),
    "long_gop.mp4": dict(seconds=40, fps=10, gop=100),  # 10 s GOP: seeks must land before targets
    "hevc.mkv": dict(seconds=6, fps=24, codec="libx265"),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, tuple[Path, object, list[float]]]:
    root = tmp_path_factory.mktemp("decode")
    out = {}
    for name, kwargs in FILES.items():
        path = make_video(root / name, **kwargs)
        times = frame_times_s(kwargs["seconds"], kwargs["fps"], vfr=kwargs.get("vfr", False),
                              seed=kwargs.get("seed", 0))
        out[name] = (path, probe_file(path), times)
    return out


def _check(frames: np.ndarray, plan, times: list[float]) -> None:
    assert frames.dtype == np.uint8
    assert frames.shape == (plan.frames, plan.height, plan.width, 3)
    got = [read_index(f) for f in frames]
    want = [index_at(times, t) for t in plan.frame_times_s]
    assert got == want


@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
@pytest.mark.parametrize("name", list(FILES))
def test_frames_match_planned_times(videos, name, backend):
    path, info, times = videos[name]
    if backend == "decord" and info.codec not in decode_mod.DECORD_CODECS:
        pytest.skip("decord refuses this codec (see test_decord_refuses_hevc)")
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height,
                         SamplingOptions(**SMALL))
    assert plan.fps == 2.0
    _check(decode_all(path, plan, info, backend=backend, chunk_frames=16), plan, times)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
@pytest.mark.parametrize("name", ["long_gop.mp4", "start_vfr.mp4", "vfr.mp4"])
def test_sparse_plan_seeks_and_stays_exact(videos, name, backend):
    """Few frames far apart (fps 2/k, k > 4): the PyAV backend seeks between targets."""
    path, info, times = videos[name]
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height,
                         SamplingOptions(max_frames=8, **SMALL))
    assert plan.second_per_grid_ts >= 3
    _check(decode_all(path, plan, info, backend=backend), plan, times)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_range_selection(videos, backend):
    path, info, times = videos["start.mkv"]
    assert info.start_time_s == pytest.approx(3.5)
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height,
                         SamplingOptions(start_s=7.3, end_s=9.0, **SMALL))
    assert plan.frame_times_s[0] == 7.3
    _check(decode_all(path, plan, info, backend=backend), plan, times)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_short_clip_repeats_last_frame(tmp_path, backend):
    path = make_video(tmp_path / "short.mp4", seconds=1.0, fps=10)
    info = probe_file(path)
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height,
                         SamplingOptions(**SMALL))
    frames = decode_all(path, plan, info, backend=backend)
    assert [read_index(f) for f in frames] == [0, 5, 9, 9]


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_chunks_are_even_bounded_and_progress_reported(videos, backend):
    path, info, times = videos["cfr.mp4"]
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height,
                         SamplingOptions(**SMALL))
    seen: list[tuple[int, int]] = []
    chunks = list(decode_frames(path, plan, info, backend=backend, chunk_frames=7,
                                progress=lambda done, total: seen.append((done, total))))
    assert [len(c) for c in chunks] == [6, 6, 6, 6]  # 24 frames, chunk 7 rounds down to 6
    assert seen == [(6, 24), (12, 24), (18, 24), (24, 24)]
    _check(np.concatenate(chunks), plan, times)


def test_backends_agree_on_pixels(videos):
    path, info, _ = videos["cfr.mp4"]
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height,
                         SamplingOptions(**SMALL))
    a = decode_all(path, plan, info, backend="pyav").astype(np.int16)
    b = decode_all(path, plan, info, backend="decord").astype(np.int16)
    assert np.abs(a - b).mean() < 8  # same frames, scalers differ a little at edges


def test_auto_falls_back_after_a_backend_fails(videos, monkeypatch):
    path, info, times = videos["vfr.mp4"]
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height,
                         SamplingOptions(**SMALL))
    first = decode_mod.AUTO_ORDER[0]
    real = decode_mod._BACKEND_FNS[first]

    def breaks_after_five(path, targets_s, plan, info, chunk):
        for i, frame in enumerate(real(path, targets_s, plan, info, chunk)):
            if i == 5:
                raise RuntimeError("decoder died")
            yield frame

    monkeypatch.setitem(decode_mod._BACKEND_FNS, first, breaks_after_five)
    _check(decode_all(path, plan, info, backend="auto", chunk_frames=4), plan, times)
    with pytest.raises(RuntimeError, match="decoder died"):
        decode_all(path, plan, info, backend=first)


def test_unknown_backend_rejected(videos):
    path, info, _ = videos["cfr.mp4"]
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height,
                         SamplingOptions(**SMALL))
    with pytest.raises(ValueError):
        list(decode_frames(path, plan, info, backend="opencv"))


def test_decord_refuses_hevc_and_auto_uses_pyav(videos):
    """decord 0.6 seeks HEVC (open GOP) to the wrong frames; it must not be used for it."""
    path, info, times = videos["hevc.mkv"]
    assert info.codec == "hevc"
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height,
                         SamplingOptions(**SMALL))
    with pytest.raises(decode_mod.UnsupportedByBackend):
        decode_all(path, plan, info, backend="decord")
    _check(decode_all(path, plan, info, backend="auto"), plan, times)


@pytest.mark.parametrize("name", ["vfr.mp4", "start_vfr.mp4", "long_gop.mp4", "rot270_vfr.mp4", "hevc.mkv"])
def test_parallel_chunks_give_the_same_frames(videos, name):
    """Chunks decoded by several threads, each from its own container and its own first seek, are
    exactly the frames one decoder gives, in order, with progress after each chunk."""
    path, info, times = videos[name]
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height, SamplingOptions(**SMALL))
    seen: list[int] = []
    chunks = list(decode_frames(path, plan, info, backend="auto", chunk_frames=4, threads=3,
                                progress=lambda done, total: seen.append(done)))
    assert all(len(c) == 4 for c in chunks[:-1]) and len(chunks) == -(-plan.frames // 4)
    assert seen == [min(4 * (i + 1), plan.frames) for i in range(len(chunks))]
    frames = np.concatenate(chunks)
    _check(frames, plan, times)
    assert np.array_equal(frames, decode_all(path, plan, info, backend="pyav", chunk_frames=4))


def test_parallel_decode_falls_back_per_chunk_and_stops_early(videos, monkeypatch):
    """A chunk the first backend fails on is decoded by the next; a consumer that stops early
    leaves no decoder thread behind."""
    import threading

    path, info, times = videos["vfr.mp4"]
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height, SamplingOptions(**SMALL))
    first = decode_mod.AUTO_ORDER[0]
    real = decode_mod._BACKEND_FNS[first]

    def fails_on_the_third_chunk(path, targets_s, plan_, info_, chunk):
        if abs(targets_s[0] - plan.frame_times_s[8]) < 1e-9:
            raise RuntimeError("decoder died")
        yield from real(path, targets_s, plan_, info_, chunk)

    monkeypatch.setitem(decode_mod._BACKEND_FNS, first, fails_on_the_third_chunk)
    _check(decode_all(path, plan, info, backend="auto", chunk_frames=4, threads=2), plan, times)
    with pytest.raises(RuntimeError, match="decoder died"):
        decode_all(path, plan, info, backend=first, chunk_frames=4, threads=2)
    stream = decode_frames(path, plan, info, backend="auto", chunk_frames=4, threads=2)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("frame-decode")]


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_a_frame_starting_exactly_at_a_planned_time_late_in_a_long_file_is_chosen(tmp_path, backend):
    """NTSC frame 45000 starts at exactly 1501.5 s (45000 x 1001/30000); decord's float32 time for
    it is 1501.50012, which chose frame 44999. The file holds the frames around it only."""
    ks = [*range(5), *range(44_995, 45_006)]
    path = make_video(tmp_path / "ntsc.mp4", seconds=1, fps=30000 / 1001, width=64, height=48, gop=4,
                      times_s=[k * 1001 / 30000 for k in ks])
    info = probe_file(path)
    plan = SamplingPlan(fps=2.0, frame_times_s=(0.0, 1501.0, 1501.5, 1501.6), height=56, width=56,
                        grid_t=2, grid_h=4, grid_w=4, visual_tokens=8, second_per_grid_ts=1.0)
    frames = decode_all(path, plan, info, backend=backend)
    assert [ks[read_index(f)] for f in frames] == [0, 4, 45_000, 45_002]
