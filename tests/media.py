"""Real video files for tests and benchmarks, written with PyAV.

Every frame carries its own index as a 4x4 grid of black/white cells (16 bits, most significant
bit top left), big enough to survive lossy compression and resizing, so a test can read back
*which* source frame a decoder returned (:func:`read_index`).

``width``/``height`` are the coded (stored) size. With ``rotation`` (clockwise degrees a player
turns the picture, like the old ``rotate`` tag) the pattern is drawn upright at the display size
and stored turned the other way, so only a decoder that applies the rotation reads it back right.
"""

from __future__ import annotations

import os
import random
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from moments.tools.synthetic import TIME_BASE, frame_times_s  # noqa: F401 - one VFR schedule for both

GRID = 4  # cells per side; 16 bits

_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".ts": "mpegts",
               ".avi": "avi", ".flv": "flv"}


def index_at(times_s: list[float], t_s: float) -> int:
    """Index of the frame shown at ``t_s``: the last frame with time <= t (the first if none)."""
    lo, hi = 0, len(times_s)
    while lo < hi:
        mid = (lo + hi) // 2
        if times_s[mid] <= t_s + 1e-6:
            lo = mid + 1
        else:
            hi = mid
    return max(0, lo - 1)


def index_pattern(index: int, width: int, height: int, *, pattern: str = "index",
                  offset_px: int = 0) -> np.ndarray:
    """RGB frame [height, width, 3] showing ``index`` (and, for ``moving``, a scrolling texture)."""
    bits = np.array([(index >> (GRID * GRID - 1 - b)) & 1 for b in range(GRID * GRID)], np.uint8)
    cells = (bits.reshape(GRID, GRID) * 255).astype(np.uint8)
    grid_w = width if pattern == "index" else width // 2
    row_counts = np.diff((np.arange(GRID + 1) * height) // GRID)
    col_counts = np.diff((np.arange(GRID + 1) * grid_w) // GRID)
    grid = np.repeat(np.repeat(cells, row_counts, axis=0), col_counts, axis=1)
    if pattern == "index":
        return np.repeat(grid[:, :, None], 3, axis=2)
    if pattern != "moving":
        raise ValueError(f"unknown pattern {pattern!r}")
    out = np.empty((height, width, 3), np.uint8)
    out[:, :grid_w] = grid[:, :, None]
    out[:, grid_w:] = _texture(height, width - grid_w, offset_px)
    return out


_TEXTURES: dict[tuple[int, int], np.ndarray] = {}


def _texture(height: int, width: int, offset_px: int) -> np.ndarray:
    """A fixed textured image (cached) scrolled sideways: cheap, but real motion for the encoder."""
    key = (height, width)
    if key not in _TEXTURES:
        rng = np.random.default_rng(1)
        yy, xx = np.mgrid[0:height, 0:2 * width]
        base = (np.sin(xx / 17.0) * 60 + np.cos(yy / 23.0) * 60 + 128).astype(np.int16)
        blobs = rng.integers(-40, 40, size=(height // 8 + 1, (2 * width) // 8 + 1), dtype=np.int16)
        base += np.kron(blobs, np.ones((8, 8), np.int16))[:height, : 2 * width]
        tex = np.clip(base, 0, 255).astype(np.uint8)
        _TEXTURES[key] = np.stack([tex, np.roll(tex, 5, axis=1), np.roll(tex, 9, axis=0)], axis=2)
    tex = _TEXTURES[key]
    x0 = offset_px % width
    return tex[:, x0:x0 + width]


_YUV_TEXTURES: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _moving_yuv420(index: int, width: int, height: int, offset_px: int) -> np.ndarray:
    """The ``moving`` pattern built directly as yuv420p planes [height * 3 / 2, width].

    Skips an RGB->YUV conversion per frame, which dominates writing long 1080p files.
    """
    grid_w = width // 2
    tex_w = width - grid_w
    key = (height, tex_w)
    if key not in _YUV_TEXTURES:
        _texture(height, tex_w, 0)
        wide = av.VideoFrame.from_ndarray(np.ascontiguousarray(_TEXTURES[key]), format="rgb24")
        wide = wide.reformat(format="yuv420p")
        ys = wide.planes[0]
        y = np.frombuffer(ys, np.uint8).reshape(height, ys.line_size)[:, : 2 * tex_w]
        u = np.frombuffer(wide.planes[1], np.uint8).reshape(height // 2, wide.planes[1].line_size)
        v = np.frombuffer(wide.planes[2], np.uint8).reshape(height // 2, wide.planes[2].line_size)
        _YUV_TEXTURES[key] = (y.copy(), u[:, :tex_w].copy(), v[:, :tex_w].copy())
    tex_y, tex_u, tex_v = _YUV_TEXTURES[key]
    x0 = (offset_px % tex_w) & ~1
    gray = index_pattern(index, grid_w, height, pattern="index")[:, :, 0]
    out = np.empty((height * 3 // 2, width), np.uint8)
    out[:height, :grid_w] = gray
    out[:height, grid_w:] = tex_y[:, x0:x0 + tex_w]
    chroma = out[height:].reshape(-1)
    cw, ch = width // 2, height // 2
    for plane, tex in ((0, tex_u), (1, tex_v)):
        c = chroma[plane * cw * ch:(plane + 1) * cw * ch].reshape(ch, cw)
        c[:, : grid_w // 2] = 128
        c[:, grid_w // 2:] = tex[:, x0 // 2:x0 // 2 + cw - grid_w // 2]
    return out


def read_index(frame_rgb: np.ndarray, *, pattern: str = "index") -> int:
    """Read back the index drawn by :func:`index_pattern` from a (possibly resized) RGB frame."""
    height, width = frame_rgb.shape[:2]
    grid_w = width if pattern == "index" else width // 2
    gray = frame_rgb[:, :grid_w].astype(np.float32).mean(axis=2)
    value = 0
    for row in range(GRID):
        for col in range(GRID):
            y0, y1 = (row * height) // GRID, ((row + 1) * height) // GRID
            x0, x1 = (col * grid_w) // GRID, ((col + 1) * grid_w) // GRID
            my, mx = (y1 - y0) // 4, (x1 - x0) // 4  # the cell's centre, away from blurred edges
            bit = gray[y0 + my:y1 - my, x0 + mx:x1 - mx].mean() > 127
            value = (value << 1) | int(bit)
    return value


def make_video(path: str | os.PathLike, *, seconds: float, fps: float, width: int = 320,
               height: int = 240, codec: str = "libx264", gop: int | None = None,
               start_time_s: float = 0.0, rotation: int = 0, vfr: bool = False,
               pattern: str = "index", container: str | None = None, preset: str = "ultrafast",
               seed: int = 0, times_s: list[float] | None = None, bframes: int | None = None) -> Path:
    """Write a real video whose frame *i* shows *i* (see :func:`frame_times_s` for its times).

    ``times_s`` gives every frame's time instead (``seconds``/``fps``/``vfr`` then only set the
    nominal rate); ``bframes`` sets libx264's B-frames (reordered packets). ``gop`` is the keyframe
    interval in frames (default 2 s). ``start_time_s`` shifts every
    timestamp (non-zero container start). ``rotation`` (0/90/180/270, clockwise) is stored as a
    display matrix. ``container`` is an FFmpeg muxer name; default from the file suffix.
    """
    path = Path(path)
    fmt = container or _CONTAINERS.get(path.suffix.lower())
    if rotation % 90:
        raise ValueError("rotation must be a multiple of 90")
    rotation %= 360
    times = times_s if times_s is not None else frame_times_s(seconds, fps, vfr=vfr, seed=seed)
    display_w, display_h = (height, width) if rotation in (90, 270) else (width, height)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        # MPEG-4 part 2 / MJPEG cannot take a 1/90000 codec clock; they get 1/fps (CFR only).
        clock = TIME_BASE if codec not in ("mpeg4", "mjpeg") else 1 / rate
        stream.time_base = clock
        stream.codec_context.time_base = clock
        stream.codec_context.gop_size = gop or max(1, int(round(2 * fps)))
        opts = {}
        if codec == "libx264":
            opts = {"preset": preset, "tune": "zerolatency" if pattern == "index" else "fastdecode"}
            if vfr or times_s is not None:
                opts["x264-params"] = "force-cfr=0"
            if bframes is not None:
                opts["bf"] = str(bframes)
        elif codec == "libx265":
            opts = {"preset": preset, "x265-params": "log-level=error"}
        elif codec == "libsvtav1":
            opts = {"preset": "12"}
        elif codec == "libvpx-vp9":
            opts = {"deadline": "realtime", "cpu-used": "8"}
        stream.codec_context.options = opts
        if rotation:
            # set_display_rotation takes counter-clockwise degrees.
            stream.set_display_rotation((360 - rotation) % 360)
        start_ticks = int(round(start_time_s / TIME_BASE))
        fast_yuv = (pattern == "moving" and not rotation and codec != "mjpeg"
                    and width % 4 == 0 and height % 4 == 0)
        for i, t in enumerate(times):
            if fast_yuv:
                frame = av.VideoFrame.from_ndarray(
                    _moving_yuv420(i, width, height, 4 * i), format="yuv420p")
            else:
                img = index_pattern(i, display_w, display_h, pattern=pattern, offset_px=4 * i)
                if rotation:
                    img = np.ascontiguousarray(np.rot90(img, k=rotation // 90))  # store turned back
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = start_ticks + int(round(t / TIME_BASE))
            frame.time_base = TIME_BASE
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_noise_bytes(path: str | os.PathLike, size_bytes: int, *, seed: int = 0,
                     prefix: bytes = b"") -> Path:
    """A file of ``prefix`` followed by random bytes (not a video)."""
    path = Path(path)
    rng = random.Random(seed)
    path.write_bytes(prefix + rng.randbytes(max(0, size_bytes - len(prefix))))
    return path


def truncate_copy(src: str | os.PathLike, dst: str | os.PathLike, keep_bytes: int) -> Path:
    """Copy the first ``keep_bytes`` of ``src`` (a download cut short)."""
    dst = Path(dst)
    with open(src, "rb") as f:
        dst.write_bytes(f.read(keep_bytes))
    return dst


def patch_mp4_dimensions(src: str | os.PathLike, dst: str | os.PathLike, width: int,
                         height: int) -> Path:
    """Copy an H.264 MP4, claiming ``width`` x ``height`` in the track header and sample entry.

    The coded stream (SPS) is untouched: a probe that trusts the container header sees absurd
    dimensions, one that decodes sees the real ones. Either way it must not allocate the claim.
    """
    data = bytearray(Path(src).read_bytes())
    tkhd = data.find(b"tkhd")
    if tkhd < 0:
        raise ValueError("no tkhd box")
    version = data[tkhd + 4]
    # tkhd: version/flags(4) + times/ids (v0: 20, v1: 32) + reserved 8 + layer..volume 8
    # + matrix 36, then width and height as 16.16 fixed point.
    dims = tkhd + 4 + 4 + (20 if version == 0 else 32) + 8 + 8 + 36
    struct.pack_into(">II", data, dims, width << 16, height << 16)
    avc1 = data.find(b"avc1")
    if avc1 >= 0:
        # VisualSampleEntry: reserved 6 + data_ref 2 + pre_defined/reserved 16, then w, h (16 bit).
        struct.pack_into(">HH", data, avc1 + 4 + 24, min(width, 0xFFFF), min(height, 0xFFFF))
    dst = Path(dst)
    dst.write_bytes(bytes(data))
    return dst


def write_y4m_header_only(path: str | os.PathLike, width: int, height: int,
                          frames: int = 1) -> Path:
    """A YUV4MPEG2 file claiming huge frames (raw video: no codec to catch it)."""
    path = Path(path)
    header = f"YUV4MPEG2 W{width} H{height} F25:1 Ip A1:1 C420jpeg\n".encode()
    with open(path, "wb") as f:
        f.write(header)
        for _ in range(frames):
            f.write(b"FRAME\n" + bytes(1024))
    return path


def make_mjpeg_claiming(path: str | os.PathLike, width: int, height: int) -> Path:
    """A small Matroska MJPEG file patched to claim ``width`` x ``height`` (max 65535) everywhere.

    Both the container (PixelWidth/PixelHeight) and every JPEG frame header (SOF0) lie, so a
    decoder that believes them allocates ``width * height`` pixels per frame: a memory bomb.
    """
    path = Path(path)
    tmp = path.with_suffix(".src.mkv")
    make_video(tmp, seconds=0.3, fps=10, width=256, height=256, codec="mjpeg")
    data = bytearray(tmp.read_bytes())
    tmp.unlink()
    w16, h16 = struct.pack(">H", width), struct.pack(">H", height)
    for element_id, value in ((b"\xb0", w16), (b"\xba", h16)):  # PixelWidth / PixelHeight
        at = data.find(element_id + b"\x82\x01\x00")
        if at < 0:
            raise ValueError("no Matroska pixel size element")
        data[at + 2:at + 4] = value
    sof = b"\xff\xc0\x00\x11\x08"
    at = data.find(sof)
    while at >= 0:
        data[at + 5:at + 9] = h16 + w16
        at = data.find(sof, at + 1)
    path.write_bytes(bytes(data))
    return path


def make_large_video(path: str | os.PathLike, min_bytes: int, *, width: int = 320, height: int = 240,
                     fps: int = 10, seed: int = 0) -> Path:
    """A real H.264 MP4 of at least ``min_bytes``, written fast: lossless noise frames (~180 KB each
    at 320x240), for uploads that span several S3 parts."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    frame_bytes = width * height * 3 // 2
    frames = max(4, int(min_bytes / (frame_bytes * 1.5)) + 2)  # lossless noise: ~1.6 bytes per raw byte
    with av.open(str(path), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {"preset": "ultrafast", "qp": "0"}
        for i in range(frames):
            planes = rng.integers(0, 256, size=(height * 3 // 2, width), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    if path.stat().st_size < min_bytes:
        raise AssertionError(f"{path} came out {path.stat().st_size} bytes, under {min_bytes}")
    return path
