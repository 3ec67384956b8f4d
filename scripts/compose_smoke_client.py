"""The client half of scripts/compose_smoke.sh: with the project's client (from the host's venv),
upload the demo's video to a running stack and ask the demo's question; the answer must overlap the
truth. Prints one line ``SMOKE_CLIENT {json}`` with the timings (upload, first and repeat answer).

    python scripts/compose_smoke_client.py --target 127.0.0.1:56051 --work-dir /tmp/x"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moments.app.client import MomentsClient
from moments.app.render import segments_table, stats_line
from moments.tools.scoring import temporal_iou
from moments.tools.synthetic import Event, write_event_video

DEMO_SECONDS = 24.0
MIN_IOU = 0.3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args()

    # The demo's video and question (moments.app.demo), so the answer time compares with the demo's.
    event = Event("red", "circle", start_s=round(DEMO_SECONDS * 0.4), end_s=round(DEMO_SECONDS * 0.65))
    video = write_event_video(args.work_dir / "smoke.mp4", [event], seconds=DEMO_SECONDS)
    with MomentsClient(args.target, state_path=args.work_dir / "uploads.json") as client:
        started = time.perf_counter()
        video_id = client.upload(video).video.video_id
        upload_s = time.perf_counter() - started
        started = time.perf_counter()
        first = client.localize(video_id, [event.query], timeout_s=args.timeout_s)
        first_answer_s = time.perf_counter() - started
        started = time.perf_counter()
        again = client.localize(video_id, [event.query], timeout_s=args.timeout_s)
        repeat_answer_s = time.perf_counter() - started
    print(segments_table(first.results))
    print(stats_line(first.stats))
    print("again: " + stats_line(again.stats))
    segments = [(s.start_offset.ToNanoseconds() / 1e9, s.end_offset.ToNanoseconds() / 1e9)
                for s in first.results[0].segments]
    iou = max((temporal_iou(s, (event.start_s, event.end_s)) for s in segments), default=0.0)
    print("SMOKE_CLIENT " + json.dumps({
        "video_id": video_id, "segments_s": segments, "truth_s": [event.start_s, event.end_s], "iou": round(iou, 3),
        "upload_s": round(upload_s, 2), "first_answer_s": round(first_answer_s, 2),
        "repeat_answer_s": round(repeat_answer_s, 2)}), flush=True)
    if iou < MIN_IOU:
        print(f"error: the answer {segments} misses the truth {event.start_s}-{event.end_s} s (IoU {iou:.2f})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
