"""What coarse-to-fine search costs on an hour-long video against one pass, in one run (issue 14).

One process, the worker's own steps (``moments.workers.pipeline.answer_file``: probe, plan, search,
decode, encode, prefill, generate, parse; no Redis, so every pass decodes and encodes):

* **single pass**: ``SearchOptions.mode = off``, the service's default sampling (768 frames, 24k
  visual tokens for the 7B): one frame every ~5 s of an hour;
* **search**: the default ``auto`` (coarse windows sampled every ``search_min_event_s``, then zoom
  passes around the candidates), same query, same engine.

Each mode runs once to warm up (kernels, graphs), then ``--repeat`` times timed; the table gives the
median seconds, passes and visual tokens per question, and the ratio search / single pass (target
<= 3x). On GPU the model is a random-weight Qwen2.5-VL-7B-shaped AWQ checkpoint (``gpu_bench``'s
builder): its answers are noise, so how many zoom passes follow depends on what it happens to say;
the coarse round's cost does not. ``--tiny`` runs the same on the shipped grounder (CPU, a minute),
whose zooms are real.

    python benchmarks/search_cost.py [--tiny] [--minutes 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_video(path: Path, minutes: float, width: int, height: int, fps: float) -> Path:
    from moments.tools.synthetic import Event, write_event_video

    seconds = minutes * 60
    start = round(seconds * 0.61)
    events = [Event("red", "triangle", start, start + 3)]  # a 3 s event: what search is for
    return write_event_video(path, events, seconds=seconds, fps=fps, width=width, height=height)


def run(engine, settings, video: Path, mode: str, repeat: int) -> dict:
    from moments.core.records import JobStats, SearchRequest
    from moments.workers.pipeline import answer_file

    query = "the red triangle appears"
    rows = []
    for i in range(repeat + 1):
        stats = JobStats()
        started = time.perf_counter()
        [result] = answer_file(engine, settings, video, [query], search_request=SearchRequest(mode=mode), stats=stats)
        seconds = time.perf_counter() - started
        if i:  # the first run warms up
            rows.append({"seconds": seconds, "passes": stats.passes, "visual_tokens": stats.total_visual_tokens,
                         "stage_ms": dict(stats.stage_ms), "segments": [(s.start_s, s.end_s) for s in result.segments],
                         "answer": result.raw_answer})
    middle = rows[len(rows) // 2]  # the median run's passes, tokens and stages
    return {"mode": mode, "seconds_median": statistics.median(r["seconds"] for r in rows), "runs": rows,
            "passes": middle["passes"], "visual_tokens": middle["visual_tokens"], "stage_ms": middle["stage_ms"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the shipped grounder on the CPU")
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/search-cost-out"))
    ap.add_argument("--work", default="/tmp/search-cost-work")
    args = ap.parse_args(argv)
    import torch

    from moments.core.config import Settings
    from moments.workers.main import load_engine

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    started = time.perf_counter()
    if args.tiny:
        video = make_video(work / f"event_{args.minutes:g}min.mp4", args.minutes, 224, 168, 4.0)
        model = str(ROOT / "tools" / "grounder")
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from gpu_bench import build_7b_awq

        video = make_video(work / f"event_{args.minutes:g}min.mp4", args.minutes, 640, 360, 4.0)
        model = str(work / "qwen2_5_vl_7b_awq_random")
        if not (Path(model) / "config.json").exists():
            meta["checkpoint"] = build_7b_awq(Path(model), torch.device("cuda"))
    meta["setup_s"] = round(time.perf_counter() - started, 1)
    settings = Settings.from_env(model=model, device="cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    engine = load_engine(settings)
    results = {mode: run(engine, settings, video, mode, args.repeat) for mode in ("off", "auto")}
    one, search = results["off"], results["auto"]
    ratio = search["seconds_median"] / one["seconds_median"]
    report = {"meta": meta, "model": "tiny grounder" if args.tiny else "random 7B-shaped AWQ", "minutes": args.minutes,
              "settings": {k: v for k, v in asdict(settings).items() if k.startswith(("search_", "budget", "max_frames"))},
              "results": results, "ratio": ratio}
    (out / "search_cost.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"machine: {meta['device']}, {meta['cpus']} CPUs, torch {meta['torch']}; model: {report['model']}; "
          f"{args.minutes:g}-min video, one 3 s event")
    print("| mode | passes | visual tokens | seconds (median of %d) | decode / encode / prefill / generate ms |" % args.repeat)
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        ms = r["stage_ms"]
        parts = " / ".join(f"{ms.get(k, 0):.0f}" for k in ("decode", "encode", "prefill", "generate"))
        label = "single pass (search off, baseline)" if mode == "off" else "search (auto)"
        print(f"| {label} | {r['passes']} | {r['visual_tokens']} | {r['seconds_median']:.2f} | {parts} |")
    print(f"ratio search / single pass: {ratio:.2f}x (target <= 3x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
