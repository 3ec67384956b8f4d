"""``moments eval ANNOTATIONS``: temporal-grounding accuracy, absent events and cost, on annotations.

Annotations are Charades-STA lines ``<video> <start> <end>##<query>`` (video id without extension,
times in seconds; ``<video> - -##<query>`` for a query whose event is NOT in the video), or a JSON
list ``[{"video", "query", "start", "end", "tags"}]`` (``start``/``end`` null for an absent query;
``tags`` optional, e.g. ``{"wording": "bare"}``). Rows with the same video and query are the
occurrences of one event. Every query is answered through the gRPC API (``--target``: upload, then
Localize) or in this process with the worker's own steps (default: probe, plan, search, decode,
encode, answer, parse).

The report: over present queries, mIoU of every occurrence (its best-overlapping segment), R@0.3 /
0.5 / 0.7 per occurrence and R@1 of the top segment; over all queries, the false-positive rate of
absent ones and the recall of present ones (at the request's min_confidence), the AUROC of the
score, the false positives at 95% recall, a reliability table; buckets by video length, event
length and wording; and the cost per query (passes, visual tokens, seconds). With
``--write-calibration`` (engine runner) it fits the score calibration on these annotations and
writes it into the model directory (``moments_calibration.json``).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moments.tools.scoring import auroc, best_iou, fit_platt, reliability, temporal_iou

log = logging.getLogger(__name__)

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".ts")
DURATION_BUCKETS_S = (60.0, 300.0, 1200.0, 3600.0)
EVENT_BUCKETS_S = (10.0, 60.0)


@dataclass(frozen=True)
class Annotation:
    """One row: an occurrence of the query's event, or (``start_s`` None) the statement that it is absent."""

    video: str
    query: str
    start_s: float | None
    end_s: float | None
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def absent(self) -> bool:
        return self.start_s is None


@dataclass
class Prediction:
    """A runner's answer to one query of one video."""

    segments: tuple[tuple[float, float, float], ...]
    """(start_s, end_s, confidence), highest confidence first."""
    raw_answer: str = ""
    found: bool = False
    score: float = 0.0
    raw_presence: float | None = None
    """The uncalibrated presence probability (engine runner only: what calibration is fitted on)."""
    cost: dict[str, float] = field(default_factory=dict)
    """passes, visual_tokens, seconds: this query's share of its call."""


@dataclass(frozen=True)
class Question:
    """A (video, query) pair with all its annotated occurrences (none: absent)."""

    video: str
    query: str
    occurrences: tuple[tuple[float, float], ...]
    tags: dict = field(default_factory=dict)


def _time(value: str) -> float | None:
    return None if value in ("-", "null", "none", "") else float(value)


def load_annotations(path: str | Path) -> list[Annotation]:
    """Parse a Charades-STA text file or the JSON list form; raises ValueError on a bad line."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
        return [Annotation(str(r["video"]), str(r["query"]),
                           None if r.get("start") is None else float(r["start"]),
                           None if r.get("end") is None else float(r["end"]),
                           tuple(sorted((str(k), str(v)) for k, v in (r.get("tags") or {}).items())))
                for r in rows]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        head, sep, query = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3:
            raise ValueError(f"{path}:{n}: expected '<video> <start> <end>##<query>', got {line!r}")
        try:
            start, end = _time(parts[1]), _time(parts[2])
        except ValueError:
            raise ValueError(f"{path}:{n}: start and end must be seconds or '-', got {line!r}") from None
        if (start is None) != (end is None):
            raise ValueError(f"{path}:{n}: give both times or neither ('-'), got {line!r}")
        out.append(Annotation(parts[0], query.strip(), start, end))
    return out


def questions(annotations: Sequence[Annotation]) -> list[Question]:
    """Rows grouped by (video, query), in first-seen order."""
    grouped: dict[tuple[str, str], list[Annotation]] = {}
    for a in annotations:
        grouped.setdefault((a.video, a.query), []).append(a)
    out = []
    for (video, query), rows in grouped.items():
        occ = tuple(sorted((r.start_s, r.end_s) for r in rows if not r.absent))
        tags: dict = {}
        for r in rows:
            tags.update(dict(r.tags))
        out.append(Question(video, query, occ, tags))
    return out


def _bucket(value: float, edges: Sequence[float], unit: str) -> str:
    lo = 0.0
    for edge in edges:
        if value < edge:
            return f"{lo:g}-{edge:g} {unit}"
        lo = edge
    return f">={lo:g} {unit}"


def fp_at_recall(pos: Sequence[float], neg: Sequence[float], recall: float = 0.95) -> float:
    """The fraction of absent queries scoring at least the threshold that keeps ``recall`` of present ones."""
    if not pos or not neg:
        return float("nan")
    ranked = sorted(pos, reverse=True)
    threshold = ranked[max(0, math.ceil(recall * len(ranked)) - 1)]
    return sum(s >= threshold for s in neg) / len(neg)


def metrics(preds: Sequence[Prediction], qs: Sequence[Question]) -> dict[str, float]:
    """The report's numbers for one set of questions (see the module docstring)."""
    present = [(p, q) for p, q in zip(preds, qs) if q.occurrences]
    absent = [(p, q) for p, q in zip(preds, qs) if not q.occurrences]
    occ_ious = [best_iou(o, [(a, b) for a, b, _ in p.segments]) for p, q in present for o in q.occurrences]
    out: dict[str, float] = {"questions": float(len(qs)), "present": float(len(present)), "absent": float(len(absent))}
    out["mIoU"] = sum(occ_ious) / len(occ_ious) if occ_ious else float("nan")
    for t in IOU_THRESHOLDS:
        out[f"R@{t},occurrence"] = sum(i >= t for i in occ_ious) / len(occ_ious) if occ_ious else float("nan")
    top = [max((temporal_iou((p.segments[0][0], p.segments[0][1]), o) for o in q.occurrences), default=0.0)
           if p.segments else 0.0 for p, q in present]
    out["R@1,IoU=0.5"] = sum(i >= 0.5 for i in top) / len(top) if top else float("nan")
    out["recall_present"] = sum(p.found for p, _ in present) / len(present) if present else float("nan")
    out["false_positive_rate"] = sum(p.found for p, _ in absent) / len(absent) if absent else float("nan")
    pos, neg = [p.score for p, _ in present], [p.score for p, _ in absent]
    out["AUROC"] = auroc(pos, neg)
    out["FP@95%recall"] = fp_at_recall(pos, neg)
    costs = [p.cost for p in preds if p.cost]
    for k in ("passes", "visual_tokens", "seconds"):
        out[f"{k}/query"] = sum(c.get(k, 0.0) for c in costs) / len(costs) if costs else float("nan")
    return out


def buckets(preds: Sequence[Prediction], qs: Sequence[Question], durations: dict[str, float]) -> dict[str, dict]:
    """The same metrics by video length, by event length (present queries) and by wording tag."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(qs):
        keys = [f"video {_bucket(durations.get(q.video, 0.0), DURATION_BUCKETS_S, 's')}"]
        if q.occurrences:
            shortest = min(b - a for a, b in q.occurrences)
            keys.append(f"event {_bucket(shortest, EVENT_BUCKETS_S, 's')}")
            keys.append("occurrences 1" if len(q.occurrences) == 1 else "occurrences 2+")
        keys.append(f"wording {q.tags.get('wording', 'canonical')}")
        for k in keys:
            groups.setdefault(k, []).append(i)
    return {k: metrics([preds[i] for i in idx], [qs[i] for i in idx]) for k, idx in sorted(groups.items())}


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


def _share(stats: dict, n: int, seconds: float) -> dict[str, float]:
    return {"passes": stats.get("passes", 0) / n, "visual_tokens": stats.get("total_visual_tokens", 0) / n,
            "seconds": seconds / n}


class EngineRunner:
    """Answers in this process with the worker's steps: probe, plan, search, decode, encode, answer, parse."""

    name = "engine"

    def __init__(self, settings) -> None:
        from moments.workers.main import load_engine

        self.settings = settings
        self.engine = load_engine(settings)

    def close(self) -> None:
        pass

    def duration_s(self, path: Path) -> float:
        from moments.media.probe import probe_file

        return probe_file(path, timeout_s=self.settings.probe_timeout_s).duration_s

    def answer(self, path: Path, queries: Sequence[str]) -> list[Prediction]:
        from moments.core.records import JobStats
        from moments.workers.pipeline import answer_file

        stats = JobStats()
        started = time.perf_counter()
        results = answer_file(self.engine, self.settings, path, queries, stats=stats)
        cost = _share(asdict(stats), len(queries), time.perf_counter() - started)
        return [Prediction(tuple(sorted(((s.start_s, s.end_s, s.confidence) for s in r.segments), key=lambda s: -s[2])),
                           r.raw_answer, r.found, r.score, r.raw_presence, cost) for r in results]


class GrpcRunner:
    """Answers through a running front end: UploadVideo (deduplicated by content), then Localize."""

    name = "grpc"

    def __init__(self, target: str, api_key: str | None, max_queries: int, timeout_s: float) -> None:
        from moments.app.client import MomentsClient

        self.client = MomentsClient(target, api_key=api_key)
        self.max_queries = max(1, max_queries)
        self.timeout_s = timeout_s
        self._durations: dict[str, float] = {}

    def close(self) -> None:
        self.client.close()

    def duration_s(self, path: Path) -> float:
        return self._durations.get(str(path), 0.0)

    def answer(self, path: Path, queries: Sequence[str]) -> list[Prediction]:
        from google.protobuf.json_format import MessageToDict

        from moments.core.records import QueryResult

        video = self.client.upload(path).video
        self._durations[str(path)] = video.duration.ToNanoseconds() / 1e9
        out: list[Prediction] = []
        for i in range(0, len(queries), self.max_queries):
            batch = list(queries[i:i + self.max_queries])
            started = time.perf_counter()
            response = self.client.localize(video.video_id, batch, timeout_s=self.timeout_s)
            stats = MessageToDict(response.stats, preserving_proto_field_name=True)
            stats = {k: float(v) for k, v in stats.items() if k in ("passes", "total_visual_tokens")}
            cost = _share(stats, len(batch), time.perf_counter() - started)
            for m in response.results:
                r = QueryResult.from_pb(m)
                segs = tuple(sorted(((s.start_s, s.end_s, s.confidence) for s in r.segments), key=lambda s: -s[2]))
                out.append(Prediction(segs, r.raw_answer, r.found, r.score, None, cost))
        return out


def evaluate(annotations: Sequence[Annotation], runner, videos_dir: str | Path, *,
             progress: bool = True) -> tuple[dict, list[dict], list[Prediction], list[Question]]:
    """Answer every question (one call per video, all its queries at once): metrics, buckets, rows."""
    from tqdm import tqdm

    qs = questions(annotations)
    by_video: dict[str, list[int]] = {}
    for i, q in enumerate(qs):
        by_video.setdefault(q.video, []).append(i)
    preds: list[Prediction | None] = [None] * len(qs)
    durations: dict[str, float] = {}
    with tqdm(total=len(qs), unit="query", desc=f"eval ({runner.name})", disable=not progress,
              file=sys.stderr) as bar:
        for video, indices in by_video.items():
            path = resolve_video(videos_dir, video)
            answers = runner.answer(path, [qs[i].query for i in indices])
            durations[video] = runner.duration_s(path)
            for i, p in zip(indices, answers):
                preds[i] = p
            bar.update(len(indices))
            done = [(p, qs[j]) for j, p in enumerate(preds) if p is not None]
            m = metrics([p for p, _ in done], [q for _, q in done])
            bar.set_postfix(mIoU=f"{m['mIoU']:.3f}", FPR=f"{m['false_positive_rate']:.2f}")
    final = [p or Prediction(()) for p in preds]
    rows = [{"video": q.video, "query": q.query, "occurrences": [list(o) for o in q.occurrences], "tags": q.tags,
             "found": p.found, "score": round(p.score, 4), "raw_presence": p.raw_presence,
             "segments": [list(s) for s in p.segments], "raw_answer": p.raw_answer, "cost": p.cost,
             "ious": [round(best_iou(o, [(a, b) for a, b, _ in p.segments]), 4) for o in q.occurrences]}
            for q, p in zip(qs, final)]
    report = {"metrics": metrics(final, qs), "buckets": buckets(final, qs, durations),
              "reliability": reliability([p.score for p in final], [int(bool(q.occurrences)) for q in qs])}
    return report, rows, final, qs


def write_calibration(model_dir: Path, preds: Sequence[Prediction], qs: Sequence[Question]) -> dict:
    """Fit Platt scaling of the raw presence on these questions (present = 1, both classes weighted
    equally) and write it beside the checkpoint, where the engine reads it."""
    from moments.workers.model.loading import CALIBRATION_FILE

    pairs = [(p.raw_presence, int(bool(q.occurrences))) for p, q in zip(preds, qs) if p.raw_presence is not None]
    labels = [y for _, y in pairs]
    if not pairs or sum(labels) in (0, len(labels)):
        raise ValueError("calibration needs present and absent questions answered in one pass each")
    params = fit_platt([r for r, _ in pairs], labels, balanced=True)
    params.update(method="platt", balanced=True, fitted_on=len(pairs), present=sum(labels))
    (Path(model_dir) / CALIBRATION_FILE).write_text(json.dumps(params, indent=1) + "\n")
    return params


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
    if getattr(args, "write_calibration", False) and args.target:
        print("moments eval: --write-calibration needs the engine runner (no --target)", file=sys.stderr)
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
        if getattr(args, "write_calibration", False):
            settings = settings.replace(search_mode="off")  # one pass per question: one raw score each
        runner = EngineRunner(settings)
        model = settings.model
    try:
        report, rows, preds, qs = evaluate(annotations, runner, videos_dir)
    finally:
        runner.close()
    if getattr(args, "write_calibration", False):
        report["calibration"] = write_calibration(Path(settings.model), preds, qs)
    report.update({"annotations": str(args.annotations), "backend": runner.name, "target": args.target,
                   "model": model, "elapsed_s": round(time.perf_counter() - started, 2), "results": rows})
    Path(args.report).write_text(json.dumps(report, indent=1, default=str) + "\n")
    scores = report["metrics"]
    width = max(len(k) for k in scores)
    print(f"{len(qs)} questions ({int(scores['present'])} present, {int(scores['absent'])} absent), "
          f"{runner.name}, {report['elapsed_s']:.1f} s")
    for k, v in scores.items():
        if k in ("questions", "present", "absent"):
            continue
        print(f"  {k:<{width}}  " + ("n/a" if math.isnan(v) else f"{v:.3f}" if "/query" in k else f"{100 * v:6.2f}"))
    if "calibration" in report:
        print(f"calibration written to {Path(settings.model) / 'moments_calibration.json'}: {report['calibration']}")
    print(f"report: {args.report}")
    return 0
