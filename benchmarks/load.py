"""Load benchmark: N concurrent clients uploading and asking against a real ``moments serve`` stack.

For each client count a fresh stack starts in a child process (``Stack``: front end, worker
processes with the tiny model, a private redis-server, all on 127.0.0.1), so each process's peak
RSS (``VmHWM``) belongs to that run alone. The clients (``AsyncMomentsClient``, one channel each)
run in this process for ``--duration-s``; each loop either uploads new bytes (a base video plus a
random tail, so every upload is written, hashed, probed and committed) or asks ``Localize`` on one
of a few pre-uploaded videos (warmed once, so mostly token/KV cache hits, as in steady use).

Reported per kind: completed requests/s, p50/p99 latency, errors (anything but OK; target 0) and
RESOURCE_EXHAUSTED separately as backpressure. Probe children are short-lived and not counted.

Usage::

    python benchmarks/load.py --clients 16 64 --duration-s 30
    python benchmarks/load.py --clients 8 --duration-s 5 --json /tmp/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUERIES = ("the red circle appears", "the blue square moves", "a yellow triangle shows up",
           "the screen goes dark", "something green crosses", "the circle leaves")
COLORS = ("red", "green", "blue", "yellow")


# --------------------------------------------------------------------------------- the stack


def stack_settings(data_dir: Path, model_dir: Path, max_queue_jobs: int):
    from moments.core.config import Settings

    return Settings.from_env(
        environ={}, redis_url="", data_dir=str(data_dir), listen="127.0.0.1:0", model=str(model_dir),
        device="cpu", budget_tokens=512, max_frames=64, max_new_tokens=12, job_timeout_s=120.0,
        job_lease_s=30.0, probe_timeout_s=30.0, kv_cache_bytes=256 * 1024**2,
        max_queue_jobs=max_queue_jobs, log_level="WARNING",
    )


async def serve_child(args: argparse.Namespace) -> None:
    """Run a Stack; print its target and process ids as one JSON line; stop on SIGTERM."""
    import logging

    from moments.app.serve import Stack

    logging.basicConfig(level=logging.WARNING)
    settings = stack_settings(Path(args.data), Path(args.model), args.max_queue_jobs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Stack(settings, workers=args.workers) as stack:
        await asyncio.to_thread(stack.wait_for_workers, timeout_s=300)
        pids = {"front end": os.getpid(), "redis": stack.redis.proc.pid}
        pids.update({f"worker {i}": p.pid for i, p in enumerate(stack.workers)})
        print(json.dumps({"target": stack.target, "pids": pids}), flush=True)
        await stop.wait()


def start_stack(data_dir: Path, model_dir: Path, workers: int, max_queue_jobs: int):
    cmd = [sys.executable, __file__, "--serve-child", "--data", str(data_dir), "--model", str(model_dir),
           "--workers", str(workers), "--max-queue-jobs", str(max_queue_jobs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"the stack did not start (exit {proc.returncode})")
    return proc, json.loads(line)


def stop_stack(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------- the clients


class Tally:
    def __init__(self) -> None:
        self.latency_s: dict[str, list[float]] = defaultdict(list)
        self.codes: dict[str, Counter] = defaultdict(Counter)

    def add(self, kind: str, code: str, latency_s: float) -> None:
        self.codes[kind][code] += 1
        if code == "OK":
            self.latency_s[kind].append(latency_s)


async def one_client(target: str, base: bytes, video_ids: list[str], deadline: float,
                     upload_share: float, timeout_s: float, tally: Tally, rng: random.Random) -> None:
    import grpc

    from moments.app.client import AsyncMomentsClient

    async with AsyncMomentsClient(target) as client:
        while time.monotonic() < deadline:
            kind = "upload" if rng.random() < upload_share else "localize"
            started = time.monotonic()
            try:
                if kind == "upload":
                    await client.upload_bytes(base + rng.randbytes(32), timeout_s=timeout_s)
                else:
                    await client.localize(rng.choice(video_ids), [rng.choice(QUERIES)], timeout_s=timeout_s)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                if code == "RESOURCE_EXHAUSTED":
                    await asyncio.sleep(0.2)  # what a client honouring RetryInfo does, roughly
            tally.add(kind, code, time.monotonic() - started)


async def warm_up(target: str, videos: list[bytes]) -> list[str]:
    from moments.app.client import AsyncMomentsClient

    async with AsyncMomentsClient(target) as client:
        ids = [(await client.upload_bytes(v, timeout_s=120)).video.video_id for v in videos]
        for video_id in ids:
            for query in QUERIES:
                await client.localize(video_id, [query], timeout_s=300)
    return ids


async def drive(target: str, clients: int, duration_s: float, base: bytes, videos: list[bytes],
                upload_share: float, timeout_s: float, seed: int) -> tuple[Tally, float]:
    video_ids = await warm_up(target, videos)
    tally = Tally()
    started = time.monotonic()
    deadline = started + duration_s
    await asyncio.gather(*(
        one_client(target, base, video_ids, deadline, upload_share, timeout_s, tally,
                   random.Random(seed * 1000 + i))
        for i in range(clients)
    ))
    return tally, time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ----------------------------------------------------------------------------------- report


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def summarize(clients: int, tally: Tally, wall_s: float, rss: dict[str, float | None],
              load: tuple[float, float]) -> dict:
    kinds = {}
    for kind in sorted(tally.codes):
        codes = tally.codes[kind]
        lat = tally.latency_s[kind]
        kinds[kind] = {
            "ok": codes["OK"], "per_s": codes["OK"] / wall_s,
            "p50_ms": percentile(lat, 0.5) * 1000, "p99_ms": percentile(lat, 0.99) * 1000,
            "backpressure": codes["RESOURCE_EXHAUSTED"],
            "errors": {c: n for c, n in codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")},
        }
    return {"clients": clients, "wall_s": wall_s, "kinds": kinds, "peak_rss_mb": rss,
            "loadavg_1m_before_after": load}


def table(results: list[dict]) -> str:
    rows = ["| clients | kind | ok | req/s | p50 ms | p99 ms | errors | RESOURCE_EXHAUSTED |",
            "|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in results:
        for kind, k in r["kinds"].items():
            errors = ", ".join(f"{c} {n}" for c, n in k["errors"].items()) or "0"
            rows.append(f"| {r['clients']} | {kind} | {k['ok']} | {k['per_s']:.1f} | {k['p50_ms']:.0f} | "
                        f"{k['p99_ms']:.0f} | {errors} | {k['backpressure']} |")
    rows += ["", "| clients | " + " | ".join(f"peak RSS {name} (MiB)" for name in results[0]["peak_rss_mb"])
             + " | load avg 1 min before/after |",
             "|---:|" + "---:|" * (len(results[0]["peak_rss_mb"]) + 1)]
    for r in results:
        cells = " | ".join("?" if v is None else f"{v:.0f}" for v in r["peak_rss_mb"].values())
        before, after = r["loadavg_1m_before_after"]
        rows.append(f"| {r['clients']} | {cells} | {before:.1f} / {after:.1f} |")
    return "\n".join(rows)


def make_videos(directory: Path) -> tuple[bytes, list[bytes]]:
    from moments.tools.synthetic import Event, write_event_video

    directory.mkdir(parents=True, exist_ok=True)
    asked = [write_event_video(directory / f"{c}.mp4", [Event(c, "circle", 2.0, 5.0)], seconds=8, fps=8)
             .read_bytes() for c in COLORS]
    base = write_event_video(directory / "upload.mp4", [Event("blue", "square", 1.0, 3.0)], seconds=6,
                             fps=8).read_bytes()
    return base, asked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--upload-share", type=float, default=0.25, help="share of requests that upload")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per-request deadline")
    parser.add_argument("--max-queue-jobs", type=int, default=256)
    parser.add_argument("--model", default="", help="tiny model dir (default: built into --dir)")
    parser.add_argument("--dir", default="", help="work directory (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_child:
        asyncio.run(serve_child(args))
        return 0

    work = Path(args.dir or tempfile.mkdtemp(prefix="moments-load-"))
    model = Path(args.model) if args.model else work / "tiny-model"
    if not (model / "config.json").exists():
        from moments.tools.tiny_model import build_tiny_model

        build_tiny_model(model, awq=False, seed=0)
    base, videos = make_videos(work / "videos")
    print(f"machine: {machine()}", flush=True)
    results = []
    for clients in args.clients:
        data_dir = work / f"data-{clients}-{int(time.time())}"
        proc, info = start_stack(data_dir, model, args.workers, args.max_queue_jobs)
        try:
            before = os.getloadavg()[0]
            tally, wall_s = asyncio.run(drive(info["target"], clients, args.duration_s, base, videos,
                                              args.upload_share, args.timeout_s, args.seed))
            rss = {name: peak_rss_mb(pid) for name, pid in info["pids"].items()}
            results.append(summarize(clients, tally, wall_s, rss, (before, os.getloadavg()[0])))
        finally:
            stop_stack(proc)
        print(table(results[-1:]), flush=True)
    print(f"\nmachine: {machine()}; {args.workers} worker(s), tiny model on CPU, "
          f"{args.duration_s:g} s per run, upload share {args.upload_share:g}\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "args": vars(args), "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
