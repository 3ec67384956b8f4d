"""Burst benchmark (issue 20): 500 waiting Localize calls, 200 of them cancelled, 50 uploads cut.

A real stack (front end in this process, one worker process with the tiny model, a private
redis-server) with each answer slowed by a fault (``answer_sleep_s``), so every call stays waiting.
The baseline, measured in the same run on the same stack, is a burst of 2 calls (1 cancelled, 1
upload cut): the ratio shows what 250 times the waiting calls cost in Redis connections and in
the time a cancellation takes to land. Targets: 0 UNAVAILABLE, every cancelled job marked within
2 s, 0 writer locks left held.

Usage::

    python benchmarks/bursts.py                      # 500 calls, 200 cancelled, pool of 64
    python benchmarks/bursts.py --calls 150 --cancel 50 --pool 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def row(name: str, r, elapsed_s: float) -> str:
    marks = sorted(r.marked_s) or [float("nan")]
    other = sum(n for code, n in r.codes.items() if code not in ("OK", "CANCELLED", "DEADLINE_EXCEEDED",
                                                                  "UNAVAILABLE"))
    return (f"| {name} | {r.calls} | {r.cancelled} | {r.peak_open_jobs} | {r.codes['UNAVAILABLE']} | {other} | "
            f"{statistics.median(marks):.3f} | {marks[-1]:.3f} | {r.unmarked} | "
            f"{r.upload_codes['CANCELLED']} | {r.writer_locks_left} | {r.redis_clients_peak} | {elapsed_s:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--cancel", type=int, default=200)
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--pool", type=int, default=64, help="redis_max_connections")
    parser.add_argument("--wait-s", type=float, default=15.0, help="deadline of the calls not cancelled")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import json
    import logging

    from moments.app.client import MomentsClient
    from moments.tools.synthetic import Event, write_event_video
    from moments.tools.tiny_model import build_tiny_model
    from tests.bursts import burst
    from tests.stack import ThreadedStack, stack_settings

    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="moments-bursts-"))
    model = work / "model"
    build_tiny_model(model, awq=False, seed=0)
    video = write_event_video(work / "v.mp4", [Event("red", "square", 1, 2)], seconds=4, fps=4)
    settings = stack_settings("", work / "data", model, redis_max_connections=args.pool,
                              max_queue_jobs=4 * args.calls, max_open_uploads=args.uploads, faults=json.dumps({"answer_sleep_s": 2.0}),
                              log_level="WARNING")
    lines = []
    with ThreadedStack(settings) as s:
        with MomentsClient(s.target, state_path=work / "c.json") as client:
            video_id = client.upload(video).video.video_id
        redis_url = s.stack.settings.redis_url
        runs = {}
        for name, calls, cancel, uploads in (("baseline", 2, 1, 1), ("burst", args.calls, args.cancel, args.uploads)):
            started = time.monotonic()
            runs[name] = asyncio.run(burst(s.target, redis_url, video_id, calls=calls, cancel=cancel, uploads=uploads,
                                           wait_s=args.wait_s))
            lines.append(row(name, runs[name], time.monotonic() - started))
            time.sleep(3)  # the worker drains the abandoned jobs (each is dropped at once)
    base, big = runs["baseline"], runs["burst"]
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"tiny model on CPU, 1 worker, answers slowed 2 s; redis_max_connections={args.pool}")
    print("| run | calls | cancelled | waiting at once | UNAVAILABLE | other errors | cancel marked p50 s | "
          "max s | unmarked | uploads cut | writer locks left | Redis connections | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"ratio burst/baseline: calls x{big.calls / base.calls:.0f}, Redis connections "
          f"x{big.redis_clients_peak / base.redis_clients_peak:.2f}, slowest cancel mark "
          f"x{max(big.marked_s) / max(base.marked_s):.2f}")
    ok = (big.codes["UNAVAILABLE"] == 0 and big.unmarked == 0 and max(big.marked_s) < 2.0
          and big.writer_locks_left == 0)
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
