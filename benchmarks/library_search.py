"""Library search benchmark (issue 18): SearchVideos over libraries of 50 synthetic videos, half of
them showing the asked event ("the red triangle appears").

A real stack (``Stack``: front end, one worker with the shipped grounder, a private redis-server)
holds two libraries of 50 videos of 20-40 s each (``moments.tools.synthetic``), sharing no video.
In both, 25 videos show the red triangle (with at most one event of another colour). The other 25
show one or two other events: in the "easy" library neither red things nor triangles; in the "hard"
one red circles or squares and triangles of other colours (the grounder's known weakness: a present
colour with another shape). One SearchVideos call per library ranks the segments found; the ranking
of videos is the order of their best segment.

Reported per library: precision@10 of the videos ranked (target >= 0.9) and of the segments,
recall of the videos with the event, and a baseline measured in the same run: a random ranking of
the library (mean over 1000 seeded shuffles), with the ratio. Also the wall time of the search cold
and repeated, with where each job's visual tokens came from (miss, Redis token cache, hot KV prefix).

    python benchmarks/library_search.py                  # CPU, shipped grounder (about 2 minutes)
    python benchmarks/library_search.py --videos 20 --json /tmp/library.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moments.app.client import MomentsClient  # noqa: E402
from moments.core import keys  # noqa: E402
from moments.core.jobs import Event as JobEvent  # noqa: E402
from moments.core.records import EVENT_DONE  # noqa: E402
from moments.core.config import Settings  # noqa: E402
from moments.tools import GROUNDER_DIR  # noqa: E402
from moments.tools.synthetic import COLORS, SHAPES, Event, write_event_video  # noqa: E402

ASKED = Event("red", "triangle", 0, 0).query
K = 10


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} | {cpu} x{torch.get_num_threads()} threads | {gpu}"


def library(rng: random.Random, count: int) -> dict[str, list[tuple[float, list[Event]]]]:
    """(seconds, events) of ``count // 2`` videos of each kind: "with" the red triangle (and at most one
    event of another colour), "easy" negatives (neither red nor a triangle anywhere) and "hard"
    negatives (red shapes that are not triangles, or triangles of other colours)."""
    others = [c for c in sorted(COLORS) if c != "red"]
    kinds: dict[str, list[tuple[float, list[Event]]]] = {"with": [], "easy": [], "hard": []}
    for _ in range(count // 2):
        seconds = float(rng.randint(20, 40))
        events = [_random_event(rng, seconds, "red", "triangle", lane=1)]
        if rng.random() < 0.5:
            events.append(_random_event(rng, seconds, rng.choice(others), rng.choice(SHAPES), lane=0))
        kinds["with"].append((seconds, events))
        seconds = float(rng.randint(20, 40))
        lanes = rng.sample((0, 1, 2), rng.randint(1, 2))
        kinds["easy"].append((seconds, [_random_event(rng, seconds, rng.choice(others), rng.choice(("circle", "square")),
                                                      lane) for lane in lanes]))
        seconds = float(rng.randint(20, 40))
        hard = [("red", rng.choice(("circle", "square"))), (rng.choice(others), "triangle")]
        lanes = rng.sample((0, 1, 2), rng.randint(1, 2))
        rng.shuffle(hard)
        kinds["hard"].append((seconds, [_random_event(rng, seconds, c, sh, lane) for (c, sh), lane in zip(hard, lanes)]))
    return kinds


def _random_event(rng: random.Random, seconds: float, color: str, shape: str, lane: int) -> Event:
    length = rng.randint(4, 12)
    start = float(rng.randint(0, int(seconds) - length - 1))
    return Event(color, shape, start, start + length, lane=lane)


def precision_at(ranked: list[bool], k: int) -> float:
    """Relevant among the first ``k`` (missing ranks count as not relevant)."""
    return sum(ranked[:k]) / k


def search(client: MomentsClient, video_ids: list[str], limit: int) -> tuple[float, object, list]:
    started = time.perf_counter()
    results, failures = None, []
    for event in client.search_videos([ASKED], video_ids=video_ids, limit=limit, timeout_s=3600):
        if event.WhichOneof("event") == "results":
            results = event.results
        elif event.WhichOneof("event") == "video_error":
            failures.append(event.video_error)
    return time.perf_counter() - started, results, failures


def ranking_of(results, truth: dict[str, bool]) -> dict:
    """Precision@10 of the videos (in the order of their best segment) and of the segments, and recall."""
    order = []
    for hit in results.hits:
        if hit.video_id not in order:
            order.append(hit.video_id)
    ranked = [truth[v] for v in order]
    return {"videos_answered": results.videos_answered, "segments": len(results.hits), "videos_ranked": len(order),
            "precision_at_10_videos": precision_at(ranked, K),
            "precision_at_10_segments": precision_at([truth[h.video_id] for h in results.hits], K),
            "recall_videos": sum(ranked) / sum(truth.values()), "false_videos_ranked": len(ranked) - sum(ranked),
            "ranking": [(v[:12], truth[v], round(h.segment.confidence, 3)) for v, h in
                        zip(order, [next(h for h in results.hits if h.video_id == v) for v in order])]}


async def _cache_outcomes(redis) -> Counter:
    found: Counter = Counter()
    async for key in redis.scan_iter(match=keys.job_events("*")):
        for _, fields in await redis.xrevrange(key, count=1):
            event = JobEvent.from_fields(fields)
            if event.kind == EVENT_DONE:
                found[event.data.get("cache", "")] += 1
    return found


def random_baseline(truth: dict[str, bool], seed: int) -> float:
    """Mean precision@10 of 1000 seeded random rankings of the videos."""
    rng, ids, total = random.Random(seed), sorted(truth), 0.0
    for _ in range(1000):
        rng.shuffle(ids)
        total += precision_at([truth[v] for v in ids], K)
    return total / 1000


def measure(args) -> dict:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="moments-library-"))
    kinds = library(rng, args.videos)
    kinds["with hard"] = library(rng, args.videos)["with"]  # the hard library's own videos with the event
    paths = {kind: [write_event_video(workdir / f"{kind.replace(' ', '-')}-{i:02d}.mp4", events, seconds=seconds,
                                      fps=8.0, seed=i) for i, (seconds, events) in enumerate(videos)]
             for kind, videos in kinds.items()}
    settings = Settings.from_env(
        environ={}, redis_url="", data_dir=str(workdir / "data"), listen="127.0.0.1:0", model=args.model,
        device="cpu", budget_tokens=512, max_frames=64, max_new_tokens=24, job_timeout_s=3600.0,
        job_lease_s=60.0, kv_cache_bytes=512 * 1024**2, log_level="WARNING")
    from tests.stack import ThreadedStack

    threaded = ThreadedStack(settings, workers=1)
    out = {"machine": machine(), "model": args.model, "videos": args.videos, "query": ASKED, "libraries": {}}
    with threaded as stack, MomentsClient(stack.target, state_path=workdir / "state.json") as client:
        ids = {kind: [client.upload(p).video.video_id for p in kind_paths] for kind, kind_paths in paths.items()}

        def cache_outcomes() -> Counter:
            """Where the visual tokens of every finished job so far came from (its ``done`` event)."""
            return threaded.run(_cache_outcomes(stack.stack.front.redis))

        for negatives in ("easy", "hard"):
            positives = ids["with"] if negatives == "easy" else ids["with hard"]
            truth = {**{v: True for v in positives}, **{v: False for v in ids[negatives]}}
            listed = sorted(truth)  # no order to learn from
            outcomes = cache_outcomes()
            cold_s, results, failures = search(client, listed, settings.search_max_results)
            outcomes_cold = cache_outcomes()
            repeat_s, again, _ = search(client, listed, settings.search_max_results)
            outcomes_repeat = cache_outcomes() - outcomes_cold
            out["libraries"][negatives] = {
                **ranking_of(results, truth), "baseline_precision_at_10": random_baseline(truth, args.seed),
                "video_errors": [f"{f.video_id}: {f.code}" for f in failures], "cold_s": cold_s,
                "repeat_s": repeat_s,
                "cache_cold": dict(outcomes_cold - outcomes), "cache_repeat": dict(outcomes_repeat),
                "repeat_same_ranking": [h.SerializeToString() for h in again.hits] == [
                    h.SerializeToString() for h in results.hits]}
    return out


def print_table(r: dict) -> None:
    print(f"machine: {r['machine']}")
    print(f"model: {r['model']}")
    print(f"query {r['query']!r}; each library: {r['videos']} videos of 20-40 s, half of them showing it")
    print(f"{'library (the other half)':<44}{'ranking':<26}{'precision@10':>13}{'ratio':>7}{'recall':>8}"
          f"{'wrong ranked':>13}")
    for negatives, lib in r["libraries"].items():
        name = {"easy": "easy: neither red nor triangles", "hard": "hard: red circles/squares, other triangles"}[negatives]
        base = lib["baseline_precision_at_10"]
        print(f"{name:<44}{'random (1000 shuffles)':<26}{base:>13.3f}{1.0:>7.2f}")
        print(f"{'':<44}{'SearchVideos (videos)':<26}{lib['precision_at_10_videos']:>13.3f}"
              f"{lib['precision_at_10_videos'] / base:>7.2f}{lib['recall_videos']:>8.2f}{lib['false_videos_ranked']:>13}")
        print(f"{'':<44}{'SearchVideos (segments)':<26}{lib['precision_at_10_segments']:>13.3f}"
              f"{lib['precision_at_10_segments'] / base:>7.2f}")
    print(f"\n{'library':<10}{'cold search s':>15}{'repeat s':>10}{'repeat/cold':>13}{'errors':>8}  same ranking"
          "  job caches cold -> repeat")
    for negatives, lib in r["libraries"].items():
        print(f"{negatives:<10}{lib['cold_s']:>15.1f}{lib['repeat_s']:>10.1f}{lib['repeat_s'] / lib['cold_s']:>13.2f}"
              f"{len(lib['video_errors']):>8}  {str(lib['repeat_same_ranking']):<14}{lib['cache_cold']} -> "
              f"{lib['cache_repeat']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=50)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--model", default=str(GROUNDER_DIR), help="checkpoint directory (default: the shipped grounder)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    result = measure(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
