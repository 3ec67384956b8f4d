"""Probing: good files read right; hostile files rejected with a reason, within the time limit."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import av
import numpy as np
import pytest

from moments.core.errors import InvalidVideo
from moments.media.probe import probe_file, probe_file_async, sniff_format
from tests.media import (
    frame_times_s,
    make_mjpeg_claiming,
    make_noise_bytes,
    make_video,
    patch_mp4_dimensions,
    truncate_copy,
)

pytestmark = pytest.mark.timeout(60)

LIMIT_S = 10.0


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("probe") / "good.mp4", seconds=4, fps=25)


def rejected(path: Path, match: str, **kwargs) -> InvalidVideo:
    """Probe ``path``; assert InvalidVideo whose message matches, within the time limit."""
    kwargs.setdefault("timeout_s", LIMIT_S)
    started = time.monotonic()
    with pytest.raises(InvalidVideo, match=match) as caught:
        probe_file(path, **kwargs)
    assert time.monotonic() - started < kwargs["timeout_s"] + 2.0
    assert caught.value.field == "data"
    return caught.value


# ------------------------------------------------------------------------------ good files


def test_good_file_facts(good):
    info = probe_file(good, video_id="abc", filename="good.mp4")
    assert (info.video_id, info.filename, info.size_bytes) == ("abc", "good.mp4", good.stat().st_size)
    assert info.duration_s == pytest.approx(4.0, abs=0.05)
    assert info.native_fps == pytest.approx(25.0)
    assert (info.width, info.height) == (320, 240)
    assert (info.codec, info.container) == ("h264", "mov")
    assert info.frame_count == 100
    assert info.rotation_degrees == 0
    assert info.start_time_s == 0.0
    assert not info.variable_frame_rate
    assert info.bit_rate > 0


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_read_from_display_matrix(tmp_path, rotation):
    path = make_video(tmp_path / "rot.mp4", seconds=1, fps=10, width=320, height=240,
                      rotation=rotation)
    info = probe_file(path)
    assert info.rotation_degrees == rotation
    # width/height are what a player shows.
    assert (info.width, info.height) == ((240, 320) if rotation % 180 else (320, 240))


@pytest.mark.parametrize("name", ["start.mkv", "start.mp4"])
def test_start_time(tmp_path, name):
    info = probe_file(make_video(tmp_path / name, seconds=3, fps=30, start_time_s=2.5))
    assert info.start_time_s == pytest.approx(2.5, abs=1e-3)
    assert info.duration_s == pytest.approx(3.0, abs=0.05)  # not the end time


def test_variable_frame_rate_detected(tmp_path):
    info = probe_file(make_video(tmp_path / "vfr.mp4", seconds=4, fps=25, vfr=True))
    assert info.variable_frame_rate


def test_a_file_that_turns_variable_after_its_first_packets_reads_as_variable(tmp_path):
    steady = [i / 25 for i in range(750)]  # 30 s at a constant 25 fps: far more than 100 packets
    later = [30 + t for t in frame_times_s(10, 25, vfr=True, seed=1)]
    info = probe_file(make_video(tmp_path / "later.mp4", seconds=40, fps=25, width=64, height=48,
                                 times_s=steady + later))
    assert info.variable_frame_rate
    assert not probe_file(make_video(tmp_path / "steady.mp4", seconds=30, fps=25, width=64, height=48,
                                     times_s=steady)).variable_frame_rate


def test_reordered_b_frames_of_a_constant_rate_file_are_not_variable(tmp_path):
    """Packets come in decode order: a window that ends before its last B-frames has gaps."""
    path = make_video(tmp_path / "bframes.mp4", seconds=40, fps=25, width=64, height=48, bframes=3, preset="medium")
    with av.open(str(path)) as container:
        pts = [p.pts for p in container.demux(video=0) if p.pts is not None]
    assert pts != sorted(pts), "no reordered packets in the file"
    assert not probe_file(path).variable_frame_rate


@pytest.mark.parametrize("name,codec", [("a.webm", "libvpx-vp9"), ("b.mkv", "libx265"),
                                        ("c.ts", "libx264"), ("d.avi", "mpeg4")])
def test_other_containers_and_codecs(tmp_path, name, codec):
    info = probe_file(make_video(tmp_path / name, seconds=2, fps=25, codec=codec))
    assert (info.width, info.height) == (320, 240)
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
    assert info.native_fps == pytest.approx(25.0)


def test_async_variant(good, tmp_path):
    info = asyncio.run(probe_file_async(good, timeout_s=LIMIT_S))
    assert (info.width, info.height, info.frame_count) == (320, 240, 100)
    bad = make_noise_bytes(tmp_path / "noise.mp4", 10_000)
    with pytest.raises(InvalidVideo, match="unrecognised container"):
        asyncio.run(probe_file_async(bad, timeout_s=LIMIT_S))


# ---------------------------------------------------------------------------- hostile files


def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    rejected(path, "empty file")


def test_random_bytes(tmp_path):
    rejected(make_noise_bytes(tmp_path / "noise.mp4", 200_000), "unrecognised container")


@pytest.mark.parametrize("prefix", [
    b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2",  # MP4 signature, garbage after
    b"\x1a\x45\xdf\xa3",  # Matroska EBML magic, garbage after
    b"RIFF\x00\x10\x00\x00AVI LIST",
])
def test_valid_magic_then_garbage(tmp_path, prefix):
    path = make_noise_bytes(tmp_path / "fake", 100_000, prefix=prefix)
    rejected(path, "cannot read|no video stream|does not decode|unknown")


def test_truncated_mp4_without_its_index_is_called_incomplete(good, tmp_path):
    # PyAV writes the index (moov) at the end: the first half has frames but no index, which
    # FFmpeg itself reports only as "Invalid data found when processing input".
    path = truncate_copy(good, tmp_path / "cut.mp4", good.stat().st_size // 2)
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(path), format="mov")
    err = rejected(path, r"^the file is incomplete \(truncated\)")
    assert "'mdat' box ends at byte" in err.message and "moov" in err.message


def remux_fast_start(src: Path, dst: Path) -> Path:
    """The same stream in an MP4 whose index (moov) comes before the media data."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return dst


def test_truncated_fast_start_mp4_is_called_incomplete(good, tmp_path):
    fast = remux_fast_start(good, tmp_path / "fast.mp4")
    with open(fast, "rb") as f:
        assert b"moov" in f.read(4096), "the index is not first"
    assert probe_file(fast).frame_count == 100  # the whole file is fine
    # Cut in the media data: FFmpeg opens it (the index is there) but the samples past the cut are gone.
    cut = truncate_copy(fast, tmp_path / "fast-cut.mp4", fast.stat().st_size * 2 // 3)
    av.open(str(cut), format="mov").close()
    err = rejected(cut, r"^the file is incomplete \(truncated\)")
    assert "'mdat' box" in err.message and "never arrived" not in err.message


def test_mp4_with_trailing_bytes_that_are_no_box_still_probes(good, tmp_path):
    padded = tmp_path / "padded.mp4"
    padded.write_bytes(good.read_bytes() + b"\0\0\0\0garbage-not-a-box" * 10)
    assert probe_file(padded).frame_count == 100


def test_truncated_to_header_only(tmp_path):
    path = make_video(tmp_path / "src.mkv", seconds=2, fps=25)
    rejected(truncate_copy(path, tmp_path / "cut.mkv", 400), "cannot read|does not decode|no video")


def test_text_file(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("hello, this is not a video\n" * 20)
    rejected(path, "text file")


def test_hls_playlist_pointing_at_a_local_file(good, tmp_path):
    path = tmp_path / "evil.mp4"
    path.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4.0,\n{good}\n"
                    "#EXTINF:4.0,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")
    rejected(path, "HLS")


@pytest.mark.parametrize("text", ["ffconcat version 1.0\nfile '{good}'\n", "file '{good}'\nfile '{good}'\n"])
def test_concat_list_pointing_at_a_local_file(good, tmp_path, text):
    path = tmp_path / "evil.mkv"
    path.write_text(text.format(good=good))
    rejected(path, "concat")


def test_sdp(tmp_path):
    path = tmp_path / "evil.mp4"
    path.write_text("v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nm=video 5004 RTP/AVP 96\n")
    rejected(path, "SDP")


def test_absurd_dimensions_in_the_header(tmp_path):
    # Matroska + JPEG headers both claim 9000x9000 (81 Mpx > the 67 Mpx default limit).
    rejected(make_mjpeg_claiming(tmp_path / "bomb.mkv", 9000, 9000), "over the limit")


def test_lying_jpeg_headers_do_not_decode(tmp_path):
    # Under the pixel limit, but the JPEG data cannot fill the claimed frame.
    rejected(make_mjpeg_claiming(tmp_path / "bomb.mkv", 4000, 4000), "does not decode")


def test_track_header_dimensions_are_not_trusted(good, tmp_path):
    # tkhd/avc1 claim 60000x50000; the H.264 SPS says 320x240, which is what decodes.
    info = probe_file(patch_mp4_dimensions(good, tmp_path / "lie.mp4", 60000, 50000))
    assert (info.width, info.height) == (320, 240)


def test_pixel_limit(good):
    rejected(good, "over the limit of 10000 pixels", max_pixels=10_000)


def test_duration_limit(good):
    rejected(good, "over the limit of 2 s", max_duration_s=2.0)


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    rejected(path, "no video stream")


def test_unsupported_codec(tmp_path):
    path = make_video(tmp_path / "raw.mkv", seconds=0.2, fps=10, width=64, height=64, codec="rawvideo")
    rejected(path, "unsupported video codec 'rawvideo'")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_file_that_hangs_is_killed(tmp_path):
    # A named pipe with no writer: open() in the child blocks forever.
    path = tmp_path / "hang.mp4"
    os.mkfifo(path)
    rejected(path, "longer than 1.5 s", timeout_s=1.5)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_async_timeout_kills_the_child(tmp_path):
    path = tmp_path / "hang.mp4"
    os.mkfifo(path)
    started = time.monotonic()
    with pytest.raises(InvalidVideo, match="longer than"):
        asyncio.run(probe_file_async(path, timeout_s=1.0))
    assert time.monotonic() - started < 3.0


def test_memory_limit_is_enforced(good):
    # 64 MiB of address space cannot even hold FFmpeg: the child dies and the file is refused.
    rejected(good, "memory|failed", memory_bytes=64 << 20)


def test_sniff_allowlist():
    assert sniff_format(b"\x00\x00\x00\x20ftypmp42") == "mov"
    assert sniff_format(b"\x1a\x45\xdf\xa3\x9f") == "matroska"
    assert sniff_format(b"FLV\x01\x05") == "flv"
    assert sniff_format(b"OggS\x00\x02") == "ogg"
    assert sniff_format(bytes([0x47] + [0] * 187) * 3) == "mpegts"
    for head in (b"#EXTM3U\n", b"\xef\xbb\xbf#EXTM3U\n", b"ffconcat version 1.0\n",
                 b"<?xml version='1.0'?><MPD>", b"GIF89a\x01\x00", b"\x89PNG\r\n\x1a\n"):
        with pytest.raises(InvalidVideo):
            sniff_format(head)
