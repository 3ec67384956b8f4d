"""Scale-out benchmark: questions/s on cached videos with 1, 2 and 4 worker processes on one host.

Each configuration starts a fresh ``moments serve`` stack in a child process (front end, N CPU
workers with the tiny model, a private redis-server). The videos are uploaded and each asked once
(their visual tokens are then in the Redis token cache), then 16 and 64 clients ask questions about
random videos for ``--duration-s`` each. Each worker's KV budget holds only ``--kv-prefixes`` of the
``--videos`` prefixes, so affinity matters: with it, the workers' budgets add up (each video's
prefix lives on one worker and its questions go there); without it (the control), every worker
sees every video and keeps re-prefilling.

Reported per configuration and client count: questions/s, the ratio to 1 worker (the baseline, same
run), p50 latency and the share of questions served from a hot KV prefix (on the worker that holds
the video's prefix). On a 2-core machine the ratio is bounded at 2x whatever the worker count.

Usage::

    python benchmarks/scaleout.py --workers 1 2 4 --clients 16 64 --duration-s 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.load import machine, percentile  # noqa: E402

QUERIES = ("the red circle appears", "the blue square moves", "a yellow triangle shows up",
           "something green crosses", "the circle leaves", "the square stops")
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def stack_settings(data_dir: Path, model_dir: Path, kv_cache_bytes: int, affinity: bool):
    from moments.core.config import Settings

    return Settings.from_env(
        environ={}, redis_url="", data_dir=str(data_dir), listen="127.0.0.1:0", model=str(model_dir),
        device="cpu", budget_tokens=512, max_frames=64, max_new_tokens=12, job_timeout_s=300.0,
        job_lease_s=30.0, probe_timeout_s=30.0, kv_cache_bytes=kv_cache_bytes, kv_affinity=affinity,
        max_queue_jobs=1024, log_level="WARNING",
    )


async def serve_child(args: argparse.Namespace) -> None:
    """Run a Stack; print its target as one JSON line; stop on SIGTERM."""
    import logging

    from moments.app.serve import Stack

    logging.basicConfig(level=logging.WARNING)
    settings = stack_settings(Path(args.data), Path(args.model), args.kv_cache_bytes, args.affinity == "on")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Stack(settings, workers=args.child_workers) as stack:
        await asyncio.to_thread(stack.wait_for_workers, timeout_s=300)
        print(json.dumps({"target": stack.target}), flush=True)
        await stop.wait()


def start_stack(data_dir: Path, model_dir: Path, workers: int, kv_cache_bytes: int, affinity: bool):
    cmd = [sys.executable, __file__, "--serve-child", "--data", str(data_dir), "--model", str(model_dir),
           "--child-workers", str(workers), "--kv-cache-bytes", str(kv_cache_bytes),
           "--affinity", "on" if affinity else "off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"the stack did not start (exit {proc.returncode})")
    return proc, json.loads(line)["target"]


def stop_stack(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def prefix_bytes(model_dir: Path, video: Path) -> int:
    """Bytes one video's hot prefix takes in a worker's KV cache (what ``kv_cache_bytes`` counts)."""
    from moments.core.config import Settings
    from moments.media.decode import decode_all
    from moments.media.probe import probe_file
    from moments.media.sampling import plan_sampling, resolve_options
    from moments.core.records import SamplingRequest
    from moments.workers.kv_cache import tensor_bytes
    from moments.workers.model.engine import Engine

    settings = Settings.from_env(environ={}, budget_tokens=512, max_frames=64, device="cpu")
    engine = Engine.load(str(model_dir), device="cpu")
    info = probe_file(video, timeout_s=30, memory_bytes=2 * 1024**3)
    options = resolve_options(SamplingRequest(), settings, engine.sampling_bounds)
    plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height, options)
    tokens = engine.encode(decode_all(video, plan, info), plan)
    return tensor_bytes((tokens, engine.prefill(tokens)))


async def warm_up(target: str, paths: list[Path]) -> list[str]:
    from moments.app.client import AsyncMomentsClient

    async with AsyncMomentsClient(target) as client:
        ids = [(await client.upload_bytes(p.read_bytes(), timeout_s=120)).video.video_id for p in paths]
        for video_id in ids:
            await client.localize(video_id, [QUERIES[0]], timeout_s=300)
    return ids


async def drive(target: str, video_ids: list[str], clients: int, duration_s: float, seed: int) -> dict:
    import grpc

    from moments.app.client import AsyncMomentsClient
    from moments.v1 import moments_pb2 as pb

    latencies: list[float] = []
    kv_hits = errors = 0
    deadline = time.monotonic() + duration_s

    async def one(rng: random.Random) -> None:
        nonlocal kv_hits, errors
        async with AsyncMomentsClient(target) as client:
            while time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    answer = await client.localize(rng.choice(video_ids), [rng.choice(QUERIES)], timeout_s=300)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.monotonic() - started)
                kv_hits += answer.stats.cache == pb.CACHE_HIT_KV

    started = time.monotonic()
    await asyncio.gather(*(one(random.Random(seed * 1000 + i)) for i in range(clients)))
    wall_s = time.monotonic() - started
    return {"questions": len(latencies), "per_s": len(latencies) / wall_s, "errors": errors,
            "p50_ms": percentile(latencies, 0.5) * 1000,
            "kv_share": kv_hits / len(latencies) if latencies else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--kv-prefixes", type=int, default=3, help="prefixes one worker's KV budget holds")
    parser.add_argument("--control", type=int, default=2, help="worker count of the affinity-off run (0: none)")
    parser.add_argument("--json", default="")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kv-cache-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--affinity", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        asyncio.run(serve_child(args))
        return 0

    from moments.tools import GROUNDER_DIR
    from moments.tools.synthetic import Event, write_event_video

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="moments-scaleout-"))
    paths = [write_event_video(work / f"v{i}.mp4", [Event(COLORS[i % 4], SHAPES[i % 3], 1 + i % 3, 5)],
                               seconds=8 + i, fps=6) for i in range(args.videos)]
    one_prefix = max(prefix_bytes(GROUNDER_DIR, p) for p in paths)
    budget = int(one_prefix * (args.kv_prefixes + 0.5))
    runs = [(n, True) for n in args.workers] + ([(args.control, False)] if args.control else [])
    rows = []
    for i, (workers, affinity) in enumerate(runs):
        proc, target = start_stack(work / f"stack{i}", GROUNDER_DIR, workers, budget, affinity)
        try:
            video_ids = asyncio.run(warm_up(target, paths))
            for clients in args.clients:
                result = asyncio.run(drive(target, video_ids, clients, args.duration_s, seed=clients))
                rows.append({"workers": workers, "affinity": affinity, "clients": clients, **result})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            stop_stack(proc)
    baseline = {r["clients"]: r["per_s"] for r in rows if r["workers"] == 1 and r["affinity"]}
    print(f"machine: {machine()}")
    print(f"{args.videos} cached videos; each worker's KV budget holds {args.kv_prefixes} prefixes "
          f"({budget / 2**20:.1f} MiB); {args.duration_s:.0f} s per row; baseline = 1 worker, same run")
    print("| workers | affinity | clients | questions/s | ratio | p50 ms | from the prefix's worker (KV hit) | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = baseline.get(r["clients"])
        ratio = f"{r['per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['workers']} | {'on' if r['affinity'] else 'off'} | {r['clients']} | {r['per_s']:.2f} | {ratio} "
              f"| {r['p50_ms']:.0f} | {100 * r['kv_share']:.0f}% | {r['errors']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
