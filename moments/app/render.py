"""Terminal output for the CLI: a progress bar per job stage and a table of segments."""

from __future__ import annotations

import json
import sys
from typing import Iterable, Sequence

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from moments.v1 import moments_pb2 as pb


def fmt_time(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours:d}:{minutes:02d}:{secs:05.2f}" if hours else f"{minutes:d}:{secs:05.2f}"


def segments_table(results: Sequence[pb.QueryResult]) -> str:
    rows = [("query", "start", "end", "confidence")]
    for r in results:
        if not r.segments:
            rows.append((r.query, "-", "-", f"(no time in answer: {r.raw_answer[:40]!r})"))
        for s in r.segments:
            rows.append((r.query, fmt_time(s.start_offset.ToNanoseconds() / 1e9),
                         fmt_time(s.end_offset.ToNanoseconds() / 1e9), f"{s.confidence:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
        if n == 0:
            lines.append("-" * (sum(widths) + 6 + len(row[3])))
    return "\n".join(lines)


def stats_line(stats: pb.JobStats) -> str:
    cache = pb.CacheOutcome.Name(stats.cache).removeprefix("CACHE_").lower()
    stages = ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(stats.stage_ms.items()))
    return (f"{stats.frames} frames at {stats.sampled_fps:.3g} fps, {stats.visual_tokens} visual tokens, "
            f"{stats.frame_width}x{stats.frame_height}, cache {cache}; {stages}")


def print_events(events: Iterable[pb.JobEvent], queries: Sequence[str], *, as_json: bool = False) -> int:
    results: list[pb.QueryResult] = []
    stats = None
    bar = None
    stage = None
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "progress" and not as_json:
            p = event.progress
            if p.stage != stage:
                if bar is not None:
                    bar.close()
                stage = p.stage
                bar = tqdm(total=p.total or None, desc=pb.Stage.Name(p.stage).lower(), file=sys.stderr,
                           leave=False)
            if bar is not None and p.total:
                bar.total = p.total
                bar.update(p.done - bar.n)
        elif kind == "result":
            results.append(event.result)
        elif kind == "done":
            stats = event.done
    if bar is not None:
        bar.close()
    results.sort(key=lambda r: r.query_index)
    if as_json:
        print(json.dumps({"results": [MessageToDict(r) for r in results],
                          "stats": MessageToDict(stats) if stats else None}, indent=2))
    else:
        print(segments_table(results))
        if stats is not None:
            print(stats_line(stats))
    return 0


def print_search(events: Iterable[pb.SearchVideosEvent], *, as_json: bool = False) -> int:
    """A progress bar over the videos, failures on stderr, then the ranked segments; 1 if any video failed."""
    failures: list[pb.VideoError] = []
    outcome = None
    bar = None
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "progress":
            if bar is None:
                bar = tqdm(total=event.progress.videos_total, desc="videos", file=sys.stderr, leave=False,
                           disable=as_json)
            bar.update(event.progress.videos_done - bar.n)
        elif kind == "video_error":
            failures.append(event.video_error)
        elif kind == "results":
            outcome = event.results
    if bar is not None:
        bar.close()
    hits = list(outcome.hits) if outcome is not None else []
    if as_json:
        print(json.dumps({"hits": [MessageToDict(h) for h in hits],
                          "video_errors": [MessageToDict(f) for f in failures]}, indent=2))
        return 1 if failures else 0
    rows = [("video", "query", "start", "end", "confidence")]
    rows += [(h.video_id[:12], h.query, fmt_time(h.segment.start_offset.ToNanoseconds() / 1e9),
              fmt_time(h.segment.end_offset.ToNanoseconds() / 1e9), f"{h.segment.confidence:.2f}") for h in hits]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    for failure in failures:
        print(f"{failure.video_id}: {failure.code}: {failure.message}", file=sys.stderr)
    if outcome is not None:
        print(f"{len(hits)} segments from {outcome.videos_answered} videos answered", file=sys.stderr)
    return 1 if failures else 0
