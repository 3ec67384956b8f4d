"""Decode benchmark: our sampled decoders against qwen-vl-utils 0.0.14's decord path.

Makes synthetic H.264 videos (25 fps, 2 s GOP, ultrafast preset, scrolling texture plus a frame
index block), cached under ``--dir``, plans them with the default ``SamplingOptions`` and decodes
the plan with each backend in its own subprocess (so peak RSS is per backend):

* ``pyav`` / ``decord`` / ``auto``: ``moments.media.decode.decode_all`` (frames by timestamp, resized in
  FFmpeg), one decoder.
* ``pyav-parallel``: the same frames, 32-frame chunks decoded by one PyAV decoder per core (at most
  8), as the worker does with ``decode_threads`` 0.
* ``qwen-vl-utils``: a replica of ``fetch_video``'s decord path: ``VideoReader`` at full
  resolution, ``linspace(0, total - 1, nframes).round()`` indices, one ``get_batch`` at full
  resolution, then a bicubic antialiased resize with torch. (qwen-vl-utils itself cannot be
  imported here.) It decodes the same number of frames as the plan, at the same output size.

Usage::

    python benchmarks/decode.py --dir /tmp/moments-bench --minutes 10 --heights 720 1080
    python benchmarks/decode.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FPS = 25
GOP_FRAMES = 50
BACKENDS = ("pyav", "pyav-parallel", "decord", "auto", "qwen-vl-utils")
PARALLEL_CHUNK_FRAMES = 32
"""``pyav-parallel``: the worker's setting (``decode_threads`` 0: one decoder per core, at most 8,
each on its own 32-frame chunk)."""


def video_path(directory: Path, minutes: float, height: int, source: str = "index") -> Path:
    suffix = "_lavfi" if source == "lavfi" else ""
    return directory / f"synth_{minutes:g}min_{height}p_{FPS}fps{suffix}.mp4"


def ensure_video(directory: Path, minutes: float, height: int, source: str = "index") -> tuple[Path, float]:
    """The cached synthetic video (written if missing) and the seconds spent writing it.

    ``source="index"`` draws frames with numpy (each carries its index: exact frames are checked);
    ``"lavfi"`` takes FFmpeg's ``testsrc2`` (many times faster to make: for hour-long 1080p files,
    no exact-frame check).
    """
    path = video_path(directory, minutes, height, source)
    if path.exists():
        return path, 0.0
    directory.mkdir(parents=True, exist_ok=True)
    width = (height * 16 // 9 + 3) // 4 * 4
    tmp = path.with_suffix(".partial.mp4")
    started = time.monotonic()
    if source == "lavfi":
        _write_testsrc(tmp, minutes * 60, width, height)
    else:
        from tests.media import make_video

        make_video(tmp, seconds=minutes * 60, fps=FPS, width=width, height=height,
                   gop=GOP_FRAMES, pattern="moving", preset="ultrafast")
    tmp.rename(path)
    return path, time.monotonic() - started


def _write_testsrc(path: Path, seconds: float, width: int, height: int) -> None:
    import av

    source = av.open(f"testsrc2=s={width}x{height}:r={FPS}:d={seconds:g}", format="lavfi")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(GOP_FRAMES)}
        for frame in source.decode(video=0):
            frame = frame.reformat(format="yuv420p")
            frame.pts = None
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    source.close()


def _qwen_replica(path: str, nframes: int, out_h: int, out_w: int):
    """Replica of qwen-vl-utils 0.0.14 ``_read_video_decord`` + ``fetch_video``'s resize."""
    import decord
    import torch
    import torch.nn.functional as F

    vr = decord.VideoReader(path)
    total_frames = len(vr)
    idx = torch.linspace(0, total_frames - 1, nframes).round().long().tolist()
    video = vr.get_batch(idx).asnumpy()
    video = torch.tensor(video).permute(0, 3, 1, 2)  # TCHW, full resolution (a copy, as upstream)
    # transforms.functional.resize(..., BICUBIC, antialias=True). torchvision resizes uint8
    # directly; F.interpolate needs float, so go 16 frames at a time to not inflate peak RSS.
    parts = []
    for at in range(0, len(video), 16):
        part = F.interpolate(video[at:at + 16].float(), size=(out_h, out_w), mode="bicubic",
                             antialias=True, align_corners=False)
        parts.append(part.clamp(0, 255).to(torch.uint8))
    return torch.cat(parts).permute(0, 2, 3, 1).numpy()


def child(backend: str, path: str) -> dict:
    """Run one backend in this (fresh) process; report wall time, peak RSS and frame accuracy."""
    import numpy as np

    from moments.media.probe import probe_file
    from tests.media import frame_times_s, index_at, read_index
    from moments.media.decode import decode_all, default_threads
    from moments.media.sampling import SamplingOptions, plan_sampling

    info = probe_file(path)
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height,
                         SamplingOptions())
    started = time.monotonic()
    if backend == "qwen-vl-utils":
        frames = _qwen_replica(path, plan.frames, plan.height, plan.width)
    elif backend == "pyav-parallel":
        frames = decode_all(path, plan, info, backend="pyav", chunk_frames=PARALLEL_CHUNK_FRAMES,
                            threads=default_threads())
    else:
        frames = decode_all(path, plan, info, backend=backend)
    wall_s = time.monotonic() - started
    exact = None
    if backend != "qwen-vl-utils" and "_lavfi" not in Path(path).name:
        times = frame_times_s(info.duration_s, FPS)
        want = [index_at(times, t) % 65536 for t in plan.frame_times_s]
        got = [read_index(f, pattern="moving") for f in frames]
        exact = sum(int(a == b) for a, b in zip(got, want))
    return {
        "backend": backend, "wall_s": wall_s, "frames": int(frames.shape[0]),
        "size": f"{plan.width}x{plan.height}", "fps": plan.fps, "exact": exact,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "shape_ok": bool(frames.shape[1:] == (plan.height, plan.width, 3)
                         and frames.dtype == np.uint8),
    }


def run_child(backend: str, path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", backend, str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"backend": backend, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/moments-bench", help="cache of synthetic videos")
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0])
    parser.add_argument("--heights", type=int, nargs="+", default=[720, 1080])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--quick", action="store_true", help="one 1-minute 720p video (smoke run)")
    parser.add_argument("--source", choices=("index", "lavfi"), default="index",
                        help="index: frames carry their index (exact-frame check); lavfi: FFmpeg testsrc2")
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    if args.quick:
        args.minutes, args.heights = [1.0], [720]
    machine = f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"machine: {machine}; load average at the start: {os.getloadavg()[0]:.1f}")
    header = ("| video | backend | frames (fps) | size | wall s | peak RSS MB | frames/s "
              "| exact frames | vs qwen-vl-utils |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    print(header)
    for minutes in args.minutes:
        for height in args.heights:
            path, gen_s = ensure_video(Path(args.dir), minutes, height, args.source)
            if gen_s:
                print(f"(wrote {path.name} in {gen_s:.0f} s)")
            results = [run_child(b, path) for b in args.backends]
            qwen = next((r for r in results if r["backend"] == "qwen-vl-utils" and "wall_s" in r), None)
            for r in results:
                label = f"{minutes:g} min {height}p"
                if "error" in r:
                    row = f"| {label} | {r['backend']} | error: {r['error']} | | | | | | |"
                else:
                    ratio = f"{qwen['wall_s'] / r['wall_s']:.2f}x faster" if qwen else "n/a"
                    exact = "n/a" if r["exact"] is None else f"{r['exact']}/{r['frames']}"
                    row = (f"| {label} | {r['backend']} | {r['frames']} ({r['fps']:.3f}) | {r['size']} "
                           f"| {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} "
                           f"| {r['frames'] / r['wall_s']:.1f} | {exact} | {ratio} |")
                rows.append(row)
                print(row, flush=True)
    print()
    print(f"machine: {machine}; load average at the end: {os.getloadavg()[0]:.1f} "
          "(other processes on the machine skew wall times)")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
