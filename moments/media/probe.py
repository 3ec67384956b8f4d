"""Safe probing of untrusted video files.

The front end probes every upload and workers probe before decoding. FFmpeg demuxers have had
local-file-read bugs through playlists (HLS, concat: CVE-2016-1898, CVE-2017-9993) and decoders
can be made to allocate huge frames, so:

* the real work runs in a child process (``python -m moments.media.probe --child PATH``) that sets its
  own ``RLIMIT_AS``/``RLIMIT_CPU`` first (no ``preexec_fn``: unsafe in threaded servers) and is
  killed at a wall-clock timeout;
* the container format is sniffed from the first bytes and *forced* from an allowlist
  (:func:`open_container`), with only the ``file`` protocol allowed; text and playlists are refused;
* decoders get ``max_pixels`` so a lying header cannot make them allocate a giant frame.

This module never imports torch; PyAV is imported lazily so the front end only pays for it in the
child.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import statistics
import struct
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from moments.core.config import Settings
from moments.core.errors import InvalidVideo
from moments.core.records import VideoInfo
from moments.media.remote import RangeReader, is_url

if TYPE_CHECKING:  # pragma: no cover
    import av.container

log = logging.getLogger(__name__)

DEFAULT_MAX_DURATION_S: float = Settings.max_duration_s
DEFAULT_MAX_PIXELS: int = Settings.max_pixels_per_frame
SNIFF_BYTES = 4096
VFR_PACKETS = 100
"""Packets at the start whose timestamps say whether the frame rate varies..."""
VFR_WINDOWS = 8
VFR_WINDOW_PACKETS = 48
"""...and at VFR_WINDOWS more points spread over the file, this many packets each (a file that
turns variable later reads as variable; the cost stays a few hundred packets, no decoding)..."""
VFR_WINDOW_BYTES = 4 * 1024 * 1024
"""...and at most this many bytes of packets per window (high bit rates: a probe reading an
object store through range requests stays at a few requests per window)."""
REORDER_PACKETS = 16
"""Most packets a frame can come after its successors in decode order (H.264's 16-frame DPB): the
timestamps of a window's last packets may still have holes, so they are left out."""
VFR_TOLERANCE = 0.15
"""A pts step this far (relative) from the median step means variable frame rate."""
MAX_PACKETS_TO_FIRST_FRAME = 600

ALLOWED_CODECS = frozenset({
    "h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mpeg2video", "mpeg1video", "mjpeg",
    "theora", "h263", "prores", "dnxhd", "ffv1", "vc1", "wmv3", "msmpeg4v3",
})

# FFmpeg demuxer forced for each sniffed family; no other demuxer is ever used.
ALLOWED_FORMATS = ("mov", "matroska", "avi", "mpegts", "flv", "ogg", "mpeg")

_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid"}


def sniff_format(head: bytes) -> str:
    """The allowlisted FFmpeg demuxer for a file starting with ``head``, or :class:`InvalidVideo`."""
    if not head:
        raise InvalidVideo("empty file")
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"#EXTM3U") or b"#EXT-X-" in head:
        raise InvalidVideo("HLS playlists are not accepted; upload the video file itself")
    if stripped.startswith(b"ffconcat") or stripped.startswith(b"file '") or b"\nfile " in head:
        raise InvalidVideo("concat lists are not accepted; upload the video file itself")
    if stripped.startswith(b"v=0") or b"\nm=video" in head:
        raise InvalidVideo("SDP descriptions are not accepted; upload the video file itself")
    if head[4:8] in _MP4_BOXES:
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return "avi"
    if head.startswith(b"FLV\x01"):
        return "flv"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"\x00\x00\x01\xba"):
        return "mpeg"
    if _looks_like_ts(head):
        return "mpegts"
    if _looks_like_text(head):
        raise InvalidVideo("text file, not a video")
    raise InvalidVideo("unrecognised container (accepted: MP4/MOV, MKV/WebM, AVI, MPEG-TS, FLV, Ogg, MPEG-PS)")


def _looks_like_ts(head: bytes) -> bool:
    for packet_bytes, offset in ((188, 0), (192, 4), (204, 0)):
        positions = [offset + i * packet_bytes for i in range(3)]
        if positions[-1] < len(head) and all(head[p] == 0x47 for p in positions):
            return True
    return False


def _looks_like_text(head: bytes) -> bool:
    text = head.decode("utf-8", errors="replace")  # a multi-byte char cut at the end costs one
    bad = sum(ch == "\ufffd" or not (ch.isprintable() or ch in "\r\n\t") for ch in text)
    return bad <= max(1, len(text) // 100)


def open_container(source: str | os.PathLike | BinaryIO, *,
                   max_pixels: int | None = None) -> "av.container.InputContainer":
    """Open ``source`` (a path, or a seekable binary file such as a
    :class:`~moments.media.remote.RangeReader`) with PyAV, forcing the sniffed allowlisted demuxer
    and the file protocol only.

    ``max_pixels`` is set on every video decoder, so a frame header that lies about its size
    makes decoding fail instead of allocating it. (FFmpeg's own stream analysis at open is
    bounded by its built-in frame size check and, in the probe child, by RLIMIT_AS.)
    """
    import av

    fmt = sniff_format(_head(source))
    opened = source if hasattr(source, "read") else os.fspath(source)
    options = {"protocol_whitelist": "file"}
    try:
        container = av.open(opened, format=fmt, options=options)
    except (av.error.FFmpegError, ValueError) as exc:
        raise InvalidVideo(f"cannot read the {fmt} container: {_open_failure(exc, fmt, source)}") from exc
    if max_pixels:
        for stream in container.streams.video:
            stream.codec_context.options = {"max_pixels": str(int(max_pixels))}
    return container


_MP4_TOP_BOXES = _MP4_BOXES | {b"moof", b"mfra", b"sidx", b"styp", b"meta", b"prft", b"emsg", b"ssix"}


def mp4_truncation(f: BinaryIO) -> str | None:
    """Why an MP4/MOV file is incomplete, from its top-level boxes: one that runs past the end of
    the file, or no ``moov`` (the index) at all. None when the boxes add up (or stop being boxes:
    trailing bytes that are not a known box are not evidence of a cut)."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    offset, seen = 0, set()
    while offset < size:
        f.seek(offset)
        header = f.read(16)
        if len(header) < 8:
            return f"the file is incomplete (truncated at {size} bytes, inside a box header)"
        box_bytes, kind = struct.unpack(">I4s", header[:8])
        if kind not in _MP4_TOP_BOXES:
            return None
        if box_bytes == 1:
            if len(header) < 16:
                return f"the file is incomplete (truncated at {size} bytes, inside a box header)"
            box_bytes = struct.unpack(">Q", header[8:16])[0]
        elif box_bytes == 0:  # runs to the end of the file
            box_bytes = size - offset
        if box_bytes < 8:
            return None
        if offset + box_bytes > size:
            name = kind.decode("latin-1")
            missing = " (the index, moov, never arrived)" if b"moov" not in seen else ""
            return (f"the file is incomplete (truncated): its {name!r} box ends at byte {offset + box_bytes} "
                    f"but the file has {size} bytes{missing}; send the whole file")
        seen.add(kind)
        offset += box_bytes
    if b"moov" not in seen and b"moof" not in seen:
        return "the file is incomplete: it has no moov box (the MP4 index); send the whole, finished file"
    return None


def _head(source: str | os.PathLike | BinaryIO) -> bytes:
    if hasattr(source, "read"):
        source.seek(0)
        head = source.read(SNIFF_BYTES)
        source.seek(0)
        return head
    with open(source, "rb") as f:
        return f.read(SNIFF_BYTES)


def _mp4_truncation_of(source: str | os.PathLike | BinaryIO) -> str | None:
    try:
        if hasattr(source, "read"):
            return mp4_truncation(source)
        with open(source, "rb") as f:
            return mp4_truncation(f)
    except OSError:
        return None


def _open_failure(exc: BaseException, fmt: str, source: str | os.PathLike | BinaryIO) -> str:
    """FFmpeg's reason, unless the container is an MP4 cut short (then say so)."""
    return (fmt == "mov" and _mp4_truncation_of(source)) or _ffmpeg_reason(exc)


def _ffmpeg_reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def rotation_from(frame_rotation_ccw: int | float | None, rotate_tag: str | None) -> int:
    """Clockwise degrees (0/90/180/270) a player turns the picture.

    From the display matrix (``VideoFrame.rotation``, counter-clockwise) or, failing that, the
    legacy ``rotate`` stream tag (clockwise).
    """
    if frame_rotation_ccw:
        degrees = -float(frame_rotation_ccw)
    elif rotate_tag:
        try:
            degrees = float(rotate_tag)
        except ValueError:
            degrees = 0.0
    else:
        degrees = 0.0
    return int(round(degrees / 90.0)) * 90 % 360


def probe_facts(target: str | os.PathLike, *, max_duration_s: float = DEFAULT_MAX_DURATION_S,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Probe in *this* process (the child calls it). ``target`` is a path or an http(s) URL read
    with range requests. Returns VideoInfo fields; raises InvalidVideo."""
    import av

    with contextlib.ExitStack() as stack:
        source: Any = target
        if is_url(os.fspath(target)):
            source = stack.enter_context(RangeReader(os.fspath(target)))
        if sniff_format(_head(source)) == "mov":
            # A cut MP4 either has no index (FFmpeg then only says "Invalid data found") or, with
            # the index first ("fast start"), lists samples past the cut: either way, say so.
            reason = _mp4_truncation_of(source)
            if reason:
                raise InvalidVideo(reason)
        container = open_container(source, max_pixels=max_pixels)
        stack.callback(container.close)
        try:
            return _probe_open(container, max_duration_s=max_duration_s, max_pixels=max_pixels)
        except av.error.FFmpegError as exc:
            raise InvalidVideo(f"cannot read the video: {_ffmpeg_reason(exc)}") from exc


def _probe_open(container: Any, *, max_duration_s: float, max_pixels: int) -> dict[str, Any]:
    import av

    if not container.streams.video:
        raise InvalidVideo("no video stream")
    stream = container.streams.video[0]
    for other in container.streams:
        if other.index != stream.index:
            other.discard = av.stream.Discard.all
    codec = stream.codec_context.name
    if codec not in ALLOWED_CODECS:
        raise InvalidVideo(f"unsupported video codec {codec!r}")
    coded_w, coded_h = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if coded_w * coded_h > max_pixels:
        raise InvalidVideo(f"frame size {coded_w}x{coded_h} is over the limit of {max_pixels} pixels")
    time_base = stream.time_base

    first_frame, pts_s = _first_frame_and_pts(container, stream)
    if first_frame is None:
        raise InvalidVideo("the first video frame does not decode")
    width, height = first_frame.width, first_frame.height
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise InvalidVideo(f"frame size {width}x{height} is over the limit of {max_pixels} pixels")

    if first_frame.time is not None:
        start_time_s = float(first_frame.time)
    elif stream.start_time is not None:
        start_time_s = float(stream.start_time * time_base)
    else:
        start_time_s = (container.start_time or 0) / 1e6

    duration_s = _duration_s(container, stream, start_time_s)
    if not duration_s or not math.isfinite(duration_s) or duration_s <= 0:
        raise InvalidVideo("unknown or zero duration")
    if duration_s > max_duration_s:
        raise InvalidVideo(f"duration {duration_s:.0f} s is over the limit of {max_duration_s:.0f} s")

    frame_count = int(stream.frames or 0)
    fps = float(stream.average_rate or 0) or float(stream.guessed_rate or 0)
    if not fps and frame_count:
        fps = frame_count / duration_s
    if not fps or not math.isfinite(fps) or fps > 1000:
        raise InvalidVideo("unknown frame rate")

    rotation = rotation_from(first_frame.rotation, stream.metadata.get("rotate"))
    if rotation in (90, 270):
        width, height = height, width
    return {
        "duration_s": duration_s,
        "native_fps": fps,
        "width": width,
        "height": height,
        "codec": codec,
        "container": container.format.name,
        "variable_frame_rate": _is_vfr([pts_s, *_pts_windows(container, stream, start_time_s, duration_s)]),
        "rotation_degrees": rotation,
        "frame_count": frame_count,
        "start_time_s": start_time_s,
        "bit_rate": int(container.bit_rate or stream.codec_context.bit_rate or 0),
    }


def _first_frame_and_pts(container: Any, stream: Any) -> tuple[Any, list[float]]:
    """Decode until the first frame while collecting the first packets' pts (seconds).

    A few undecodable packets before the first frame are tolerated (streams cut mid-GOP start
    that way); if none decodes, the last error is the reason.
    """
    import av

    stream.codec_context.thread_count = 1
    first = None
    error: Exception | None = None
    pts_s: list[float] = []
    read_bytes = 0
    for count, packet in enumerate(container.demux(stream)):
        read_bytes += packet.size
        if packet.pts is not None and packet.size:
            pts_s.append(float(packet.pts * stream.time_base))
        if first is None:
            try:
                for frame in packet.decode():  # the empty packet at the end flushes
                    first = frame
                    break
            except av.error.FFmpegError as exc:
                error = exc
        enough = len(pts_s) >= VFR_PACKETS or read_bytes >= VFR_WINDOW_BYTES
        if (first is not None and enough) or count >= MAX_PACKETS_TO_FIRST_FRAME:
            break
    if first is None and error is not None:
        raise InvalidVideo(f"the first video frame does not decode: {_ffmpeg_reason(error)}")
    return first, pts_s


def _pts_windows(container: Any, stream: Any, start_time_s: float, duration_s: float) -> list[list[float]]:
    """Packet times (seconds, decode order) from VFR_WINDOWS points spread over the file."""
    windows = []
    for k in range(1, VFR_WINDOWS + 1):
        at_s = start_time_s + duration_s * k / (VFR_WINDOWS + 1)
        try:
            container.seek(int(at_s / stream.time_base), stream=stream, backward=True)
        except Exception:  # noqa: BLE001 - a file that cannot seek keeps the first window only
            break
        window: list[float] = []
        read_bytes = 0
        for packet in container.demux(stream):
            read_bytes += packet.size
            if packet.pts is not None and packet.size:
                window.append(float(packet.pts * stream.time_base))
            if len(window) >= VFR_WINDOW_PACKETS or read_bytes >= VFR_WINDOW_BYTES:
                break
        windows.append(window)
    return windows


def _steps(pts_s: list[float]) -> list[float]:
    """Frame durations seen in one window of packets (decode order): sorted times from the first
    packet's on, up to the earliest of the last REORDER_PACKETS (later ones may have gaps)."""
    if len(pts_s) > 2 * REORDER_PACKETS:
        complete_below = min(pts_s[-REORDER_PACKETS:])
        pts_s = [t for t in pts_s if pts_s[0] <= t <= complete_below]
    times = sorted(set(pts_s))
    return [b - a for a, b in zip(times, times[1:])]


def _is_vfr(windows: list[list[float]]) -> bool:
    per_window = [_steps(w) for w in windows]
    steps = [step for window in per_window for step in window]
    if len(steps) < 3:
        return False
    median = statistics.median(steps)
    return any(abs(step - median) > VFR_TOLERANCE * median for step in steps)


def _duration_s(container: Any, stream: Any, start_time_s: float) -> float:
    """Stream duration if the header has it, else end of the last packet minus the start."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    end_s = _last_packet_end_s(container, stream)
    if end_s is not None and end_s > start_time_s:
        return end_s - start_time_s
    if container.duration:
        return container.duration / 1e6
    return 0.0


def _last_packet_end_s(container: Any, stream: Any) -> float | None:
    hint_s = (container.duration or 0) / 1e6 + (container.start_time or 0) / 1e6
    try:
        container.seek(int(max(0.0, hint_s + 60) / stream.time_base), stream=stream, backward=True)
    except Exception:  # noqa: BLE001 - some files cannot seek; fall back to the header
        return None
    end: float | None = None
    for count, packet in enumerate(container.demux(stream)):
        if packet.pts is not None:
            t = float((packet.pts + (packet.duration or 0)) * stream.time_base)
            end = t if end is None else max(end, t)
        if count > 5000:
            break
    return end


# ---------------------------------------------------------------------------- parent side


def _child_command(path: str | os.PathLike, *, timeout_s: float, memory_bytes: int,
                   max_duration_s: float, max_pixels: int) -> list[str]:
    return [
        sys.executable, "-m", "moments.media.probe", "--child", os.fspath(path),
        "--memory-bytes", str(int(memory_bytes)), "--cpu-s", str(max(1, math.ceil(timeout_s))),
        "--max-duration-s", repr(float(max_duration_s)), "--max-pixels", str(int(max_pixels)),
    ]


_SECRET_ENV = ("MOMENTS_S3_ACCESS_KEY_ID", "MOMENTS_S3_SECRET_ACCESS_KEY", "MOMENTS_API_KEYS", "MOMENTS_API_KEY")


def _child_env() -> dict[str, str]:
    """The server's environment less its secrets: the child parses hostile files."""
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV and not k.startswith("AWS_")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _to_info(returncode: int, stdout: bytes, stderr: bytes, *, path: str | os.PathLike,
             video_id: str, size_bytes: int, filename: str) -> VideoInfo:
    reply: dict[str, Any] | None = None
    try:
        reply = json.loads(stdout.decode("utf-8", errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        reply = None
    if returncode != 0 or not isinstance(reply, dict):
        if returncode < 0:
            reason = f"the probe crashed (signal {-returncode}); the file is likely malformed"
        elif b"MemoryError" in stderr:
            reason = "the probe ran out of memory; the file is likely malformed or too large"
        else:
            reason = f"the probe failed (exit {returncode})"
        log.warning("probe of %s failed: %s; stderr tail: %s", path, reason,
                    stderr[-500:].decode("utf-8", errors="replace"))
        raise InvalidVideo(reason)
    if not reply.get("ok"):
        raise InvalidVideo(str(reply.get("reason") or "invalid video"))
    facts = reply["facts"]
    return VideoInfo(video_id=video_id, size_bytes=size_bytes or _size_of(path),
                     filename=filename, **facts)


def _size_of(target: str | os.PathLike) -> int:
    return 0 if is_url(os.fspath(target)) else os.path.getsize(target)


def probe_file(path: str | os.PathLike, *, video_id: str = "", size_bytes: int = 0,
               filename: str = "", timeout_s: float = Settings.probe_timeout_s,
               memory_bytes: int = Settings.probe_memory_bytes,
               max_duration_s: float = DEFAULT_MAX_DURATION_S,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Probe ``path`` in a resource-limited child process; raise :class:`InvalidVideo` with a reason."""
    cmd = _child_command(path, timeout_s=timeout_s, memory_bytes=memory_bytes,
                         max_duration_s=max_duration_s, max_pixels=max_pixels)
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout_s, env=_child_env(),
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:  # run() kills the child before raising
        raise InvalidVideo(f"probing took longer than {timeout_s:g} s") from exc
    return _to_info(done.returncode, done.stdout, done.stderr, path=path, video_id=video_id,
                    size_bytes=size_bytes, filename=filename)


async def probe_file_async(path: str | os.PathLike, *, video_id: str = "", size_bytes: int = 0,
                           filename: str = "", timeout_s: float = Settings.probe_timeout_s,
                           memory_bytes: int = Settings.probe_memory_bytes,
                           max_duration_s: float = DEFAULT_MAX_DURATION_S,
                           max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """:func:`probe_file` for asyncio callers; the child is killed on timeout or cancellation."""
    cmd = _child_command(path, timeout_s=timeout_s, memory_bytes=memory_bytes,
                         max_duration_s=max_duration_s, max_pixels=max_pixels)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=_child_env(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    except asyncio.TimeoutError as exc:
        raise InvalidVideo(f"probing took longer than {timeout_s:g} s") from exc
    finally:
        if proc.returncode is None:  # timeout or cancellation: never leave the child running
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return _to_info(proc.returncode, stdout, stderr, path=path, video_id=video_id,
                    size_bytes=size_bytes, filename=filename)


# ----------------------------------------------------------------------------- child side


def _limit_self(memory_bytes: int, cpu_s: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m moments.media.probe")
    parser.add_argument("--child", required=True, metavar="PATH")
    parser.add_argument("--memory-bytes", type=int, default=Settings.probe_memory_bytes)
    parser.add_argument("--cpu-s", type=int, default=int(Settings.probe_timeout_s))
    parser.add_argument("--max-duration-s", type=float, default=DEFAULT_MAX_DURATION_S)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    args = parser.parse_args(argv)
    _limit_self(args.memory_bytes, args.cpu_s)
    try:
        facts = probe_facts(args.child, max_duration_s=args.max_duration_s,
                            max_pixels=args.max_pixels)
        reply: dict[str, Any] = {"ok": True, "facts": facts}
    except InvalidVideo as exc:
        reply = {"ok": False, "reason": exc.message}
    except MemoryError:
        reply = {"ok": False, "reason": "the probe ran out of memory; the file is likely malformed"}
    except OSError as exc:
        reply = {"ok": False, "reason": f"cannot read the file: {exc.strerror or exc}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
