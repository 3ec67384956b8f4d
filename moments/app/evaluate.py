"""``moments eval ANNOTATIONS``: temporal-grounding accuracy on Charades-STA-style annotations.

Annotations are either Charades-STA lines ``<video> <start> <end>##<query>`` (video id without
extension, times in seconds) or a JSON list ``[{"video", "query", "start", "end"}]``. Every query
is answered through the gRPC API (``--target``: upload, then Localize) or by the engine in this
process (default: probe -> sampling plan -> decode -> encode -> answer, the worker's steps), and
scored with the usual metrics: R@1 at IoU 0.3 / 0.5 / 0.7 and mean IoU of the top segment.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".ts")


@dataclass(frozen=True)
class Annotation:
    video: str
    query: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Prediction:
    """A model's segments for one annotation, best first, and its raw answer."""

    segments: tuple[tuple[float, float, float], ...]
    """(start_s, end_s, confidence), highest confidence first (ties keep the model's order)."""
    raw_answer: str = ""


def load_annotations(path: str | Path) -> list[Annotation]:
    """Parse a Charades-STA text file or the JSON list form; raises ValueError on a bad line."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
        return [Annotation(str(r["video"]), str(r["query"]), float(r["start"]), float(r["end"])) for r in rows]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        head, sep, query = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3:
            raise ValueError(f"{path}:{n}: expected '<video> <start> <end>##<query>', got {line!r}")
        out.append(Annotation(parts[0], query.strip(), float(parts[1]), float(parts[2])))
    return out


def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two [start, end] spans in seconds (0 when either is empty)."""
    if a[1] <= a[0] or b[1] <= b[0]:
        return 0.0
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union


def recall_at_k(predictions: Sequence[Prediction], truths: Sequence[Annotation], k: int, threshold: float) -> float:
    """Fraction of queries whose top ``k`` segments include one with IoU >= ``threshold``."""
    if not truths:
        return 0.0
    hits = sum(
        any(temporal_iou((s, e), (t.start_s, t.end_s)) >= threshold for s, e, _ in p.segments[:k])
        for p, t in zip(predictions, truths)
    )
    return hits / len(truths)


def top_iou(prediction: Prediction, truth: Annotation) -> float:
    if not prediction.segments:
        return 0.0
    s, e, _ = prediction.segments[0]
    return temporal_iou((s, e), (truth.start_s, truth.end_s))


def metrics(predictions: Sequence[Prediction], truths: Sequence[Annotation]) -> dict[str, float]:
    """R@1 at each of :data:`IOU_THRESHOLDS` and mIoU (top segment; no segment scores 0)."""
    out = {f"R@1,IoU={t}": recall_at_k(predictions, truths, 1, t) for t in IOU_THRESHOLDS}
    out["mIoU"] = sum(top_iou(p, t) for p, t in zip(predictions, truths)) / len(truths) if truths else 0.0
    out["answered"] = sum(bool(p.segments) for p in predictions) / len(truths) if truths else 0.0
    return out


def ranked(segments: Sequence[tuple[float, float, float]]) -> tuple[tuple[float, float, float], ...]:
    return tuple(sorted(segments, key=lambda s: -s[2]))


def find_video(videos_dir: str | Path, name: str) -> Path | None:
    """The file for an annotation's video: the name as given, or with a common video suffix."""
    base = Path(videos_dir) / name
    for candidate in (Path(name), base, *(base.with_name(base.name + s) for s in VIDEO_SUFFIXES)):
        if candidate.is_file():
            return candidate
    return None


def resolve_video(videos_dir: str | Path, name: str) -> Path:
    path = find_video(videos_dir, name)
    if path is None:
        raise FileNotFoundError(f"no video file for {name!r} in {videos_dir}")
    return path


class EngineRunner:
    """Answers in this process with the worker's steps: probe, plan, decode, encode, answer, parse."""

    name = "engine"

    def __init__(self, settings) -> None:
        from moments.workers.main import load_engine

        self.settings = settings
        self.engine = load_engine(settings)

    def close(self) -> None:
        pass

    def answer(self, path: Path, queries: Sequence[str]) -> list[Prediction]:
        from moments.workers.pipeline import answer_file

        results = answer_file(self.engine, self.settings, path, queries)
        return [Prediction(ranked([(g.start_s, g.end_s, g.confidence) for g in r.segments]), r.raw_answer)
                for r in results]


class GrpcRunner:
    """Answers through a running front end: UploadVideo (deduplicated by content), then Localize."""

    name = "grpc"

    def __init__(self, target: str, api_key: str | None, max_queries: int, timeout_s: float) -> None:
        from moments.app.client import MomentsClient

        self.client = MomentsClient(target, api_key=api_key)
        self.max_queries = max(1, max_queries)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.client.close()

    def answer(self, path: Path, queries: Sequence[str]) -> list[Prediction]:
        from moments.core.records import Segment

        video_id = self.client.upload(path).video.video_id
        out: list[Prediction] = []
        for i in range(0, len(queries), self.max_queries):
            response = self.client.localize(video_id, list(queries[i:i + self.max_queries]), timeout_s=self.timeout_s)
            for result in response.results:
                segs = [(s.start_s, s.end_s, s.confidence) for s in map(Segment.from_pb, result.segments)]
                out.append(Prediction(ranked(segs), result.raw_answer))
        return out


def evaluate(annotations: Sequence[Annotation], runner, videos_dir: str | Path, *,
             progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Answer every annotation (one call per video, all its queries at once); metrics and rows."""
    from tqdm import tqdm

    by_video: dict[str, list[int]] = {}
    for i, a in enumerate(annotations):
        by_video.setdefault(a.video, []).append(i)
    predictions: list[Prediction | None] = [None] * len(annotations)
    with tqdm(total=len(annotations), unit="query", desc=f"eval ({runner.name})", disable=not progress,
              file=sys.stderr) as bar:
        for video, indices in by_video.items():
            path = resolve_video(videos_dir, video)
            answers = runner.answer(path, [annotations[i].query for i in indices])
            for i, p in zip(indices, answers):
                predictions[i] = p
            bar.update(len(indices))
            done = [(p, annotations[j]) for j, p in enumerate(predictions) if p is not None]
            bar.set_postfix(mIoU=f"{metrics([p for p, _ in done], [t for _, t in done])['mIoU']:.3f}")
    preds = [p or Prediction(()) for p in predictions]
    rows = [{**asdict(a), "segments": [list(s) for s in p.segments], "raw_answer": p.raw_answer,
             "iou": round(top_iou(p, a), 4)} for a, p in zip(annotations, preds)]
    return metrics(preds, annotations), rows


def run_eval(args, settings) -> int:
    """The ``moments eval`` command (``settings`` from its flags): print the metrics, write a JSON report."""
    annotations = load_annotations(args.annotations)
    if args.limit:
        annotations = annotations[: args.limit]
    # Videos are looked up beside the annotation file unless --videos-dir says otherwise; all of them
    # before any work, so a wrong folder fails at once with the names, not after an hour of answers.
    videos_dir = Path(args.videos_dir) if args.videos_dir else Path(args.annotations).resolve().parent
    missing = sorted({a.video for a in annotations if find_video(videos_dir, a.video) is None})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        print(f"moments eval: {len(missing)} of {len({a.video for a in annotations})} videos not found in "
              f"{videos_dir} (with or without {'/'.join(VIDEO_SUFFIXES)}): {shown}; pass --videos-dir",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.target:
        runner = GrpcRunner(args.target, args.api_key, settings.max_queries, settings.job_timeout_s)
        model = "(server)"
    else:
        from moments.app.serve import demo_model_dir, weights_available

        if not weights_available(settings.model):
            model_dir = demo_model_dir(settings)
            print(f"weights of {settings.model} are not on this machine: evaluating the project's tiny "
                  f"model at {model_dir}", file=sys.stderr)
            settings = settings.replace(model=str(model_dir))
        runner = EngineRunner(settings)
        model = settings.model
    try:
        scores, rows = evaluate(annotations, runner, videos_dir)
    finally:
        runner.close()
    report = {"annotations": str(args.annotations), "backend": runner.name, "target": args.target, "model": model,
              "queries": len(annotations), "metrics": {k: round(v, 4) for k, v in scores.items()},
              "elapsed_s": round(time.perf_counter() - started, 2), "results": rows}
    Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    width = max(len(k) for k in scores)
    print(f"{len(annotations)} queries, {runner.name}, {report['elapsed_s']:.1f} s")
    for k, v in scores.items():
        print(f"  {k:<{width}}  {100 * v:6.2f}" if not math.isnan(v) else f"  {k:<{width}}  n/a")
    print(f"report: {args.report}")
    return 0
