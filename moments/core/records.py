"""Domain records shared by the front end and the workers.

Each record owns its conversions: ``to_pb``/``from_pb`` for the public API and
``to_json``/``from_json`` for Redis. Nothing else reads ``*_pb2`` fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from moments.core import errors
from moments.v1 import moments_pb2 as pb

if TYPE_CHECKING:
    from moments.core.config import Settings


def duration_pb(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def duration_s(d: Duration) -> float:
    return d.ToNanoseconds() / 1e9


MAX_DURATION_SECONDS = 315_576_000_000
"""The largest ``google.protobuf.Duration`` (10,000 years), as its spec defines it."""


def checked_duration_s(d: Duration, field: str) -> float:
    """Seconds of a request's Duration; InvalidArgument for one the spec calls invalid (nanos out of
    range or of the other sign than seconds, seconds beyond 10,000 years)."""
    if abs(d.seconds) > MAX_DURATION_SECONDS or abs(d.nanos) >= 1_000_000_000 or d.seconds * d.nanos < 0:
        raise errors.InvalidArgument("not a valid google.protobuf.Duration", field=field)
    return duration_s(d)


def timestamp_pb(unix_s: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(unix_s * 1e9))
    return t


@dataclass(frozen=True)
class SamplingRequest:
    """What a caller asked for; zero means the server default. Resolved into a plan by workers."""

    max_fps: float = 0.0
    max_frames: int = 0
    budget_tokens: int = 0
    start_s: float | None = None
    end_s: float | None = None

    @classmethod
    def from_pb(cls, m: pb.SamplingOptions) -> "SamplingRequest":
        return cls(
            max_fps=m.max_fps,
            max_frames=m.max_frames,
            budget_tokens=m.budget_tokens,
            start_s=checked_duration_s(m.start_offset, "sampling.start_offset") if m.HasField("start_offset") else None,
            end_s=checked_duration_s(m.end_offset, "sampling.end_offset") if m.HasField("end_offset") else None,
        )

    def with_defaults(self, settings: "Settings") -> "SamplingRequest":
        """This request with the server's defaults in its zero fields (what a job carries and is keyed by)."""
        return replace(self, max_fps=self.max_fps or settings.max_fps,
                       max_frames=self.max_frames or settings.max_frames,
                       budget_tokens=self.budget_tokens or settings.budget_tokens)

    def to_pb(self) -> pb.SamplingOptions:
        m = pb.SamplingOptions(
            max_fps=self.max_fps, max_frames=self.max_frames, budget_tokens=self.budget_tokens
        )
        if self.start_s is not None:
            m.start_offset.CopyFrom(duration_pb(self.start_s))
        if self.end_s is not None:
            m.end_offset.CopyFrom(duration_pb(self.end_s))
        return m


SEARCH_MODES = {pb.SearchOptions.MODE_UNSPECIFIED: "", pb.SearchOptions.OFF: "off", pb.SearchOptions.AUTO: "auto"}


@dataclass(frozen=True)
class SearchRequest:
    """How a caller asked to search a long video; zeros and "" mean the server's defaults."""

    mode: str = ""
    """"off" or "auto"."""
    min_event_s: float = 0.0
    max_rounds: int = 0
    max_passes: int = 0
    max_visual_tokens: int = 0

    @classmethod
    def from_pb(cls, m: pb.SearchOptions) -> "SearchRequest":
        if m.mode not in SEARCH_MODES:
            raise errors.InvalidArgument(f"unknown search mode {m.mode}", field="search.mode")
        min_event_s = checked_duration_s(m.min_event, "search.min_event") if m.HasField("min_event") else 0.0
        if not (math.isfinite(min_event_s) and min_event_s >= 0):
            raise errors.InvalidArgument("search.min_event must be a non-negative duration", field="search.min_event")
        for name in ("max_rounds", "max_passes", "max_visual_tokens"):
            if getattr(m, name) < 0:
                raise errors.InvalidArgument(f"search.{name} must not be negative", field=f"search.{name}")
        return cls(SEARCH_MODES[m.mode], min_event_s, m.max_rounds, m.max_passes, m.max_visual_tokens)

    def with_defaults(self, settings: "Settings") -> "SearchRequest":
        """Zero fields take the server's defaults; limits never exceed the server's caps."""
        def cap(asked: int, most: int) -> int:
            return min(asked, most) if asked else most

        return SearchRequest(
            mode=self.mode or settings.search_mode,
            min_event_s=self.min_event_s or settings.search_min_event_s,
            max_rounds=cap(self.max_rounds, settings.search_max_rounds),
            max_passes=cap(self.max_passes, settings.search_max_passes),
            max_visual_tokens=cap(self.max_visual_tokens, settings.search_max_visual_tokens),
        )


@dataclass(frozen=True)
class VideoInfo:
    """Probed facts of a stored video file."""

    video_id: str
    size_bytes: int
    duration_s: float
    native_fps: float
    width: int
    height: int
    codec: str
    container: str
    variable_frame_rate: bool = False
    rotation_degrees: int = 0
    frame_count: int = 0
    start_time_s: float = 0.0
    bit_rate: int = 0
    filename: str = ""
    create_time_s: float = 0.0
    content_type: str = ""

    OWNER_FIELDS = ("filename", "content_type", "create_time_s")
    """Facts of one owner's upload, not of the bytes: kept per owner (``keys.owned_video``), never in
    the shared record, so no tenant sees another's."""

    def to_pb(self) -> pb.Video:
        return pb.Video(
            video_id=self.video_id,
            filename=self.filename,
            size_bytes=self.size_bytes,
            duration=duration_pb(self.duration_s),
            native_fps=self.native_fps,
            variable_frame_rate=self.variable_frame_rate,
            width=self.width,
            height=self.height,
            codec=self.codec,
            container=self.container,
            rotation_degrees=self.rotation_degrees,
            frame_count=self.frame_count,
            create_time=timestamp_pb(self.create_time_s),
            content_type=self.content_type,
        )

    def to_redis(self) -> dict[str, str]:
        """The shared record: the probed facts of the bytes, without any owner's fields."""
        return {k: json.dumps(v) for k, v in asdict(self).items() if k not in self.OWNER_FIELDS}

    def owner_redis(self) -> dict[str, str]:
        """One owner's fields (filename, content type; the upload time is the score of its index)."""
        return {"filename": self.filename, "content_type": self.content_type}

    @classmethod
    def from_redis(cls, h: dict[Any, Any], owner: dict[Any, Any] | None = None,
                   create_time_s: float = 0.0) -> "VideoInfo":
        """The shared record with one owner's fields (``owner``: its hash); owner fields a shared
        record of an older version holds are ignored."""
        decoded = {_s(k): json.loads(_s(v)) for k, v in h.items()}
        known = {k: v for k, v in decoded.items() if k in cls.__dataclass_fields__ and k not in cls.OWNER_FIELDS}
        mine = {_s(k): _s(v) for k, v in (owner or {}).items()}
        return cls(**known, filename=mine.get("filename", ""), content_type=mine.get("content_type", ""),
                   create_time_s=create_time_s)


@dataclass(frozen=True)
class Segment:
    """A span where a query's event happens, in seconds from the start of the video."""

    start_s: float
    end_s: float
    confidence: float = 0.0

    @classmethod
    def from_pb(cls, m: pb.Segment) -> "Segment":
        return cls(duration_s(m.start_offset), duration_s(m.end_offset), m.confidence)

    def to_pb(self) -> pb.Segment:
        return pb.Segment(
            start_offset=duration_pb(self.start_s),
            end_offset=duration_pb(self.end_s),
            confidence=self.confidence,
        )


@dataclass(frozen=True)
class QueryResult:
    """One query's answer: its segments (every occurrence found), or "not found" (no segments)."""

    query_index: int
    query: str
    segments: tuple[Segment, ...]
    raw_answer: str
    score: float = 0.0
    """Calibrated probability that the event happens in the looked-at video (max over passes)."""
    raw_presence: float | None = None
    """The uncalibrated presence of the best pass (for fitting the calibration; not in the API)."""

    @property
    def found(self) -> bool:
        return bool(self.segments)

    def to_pb(self) -> pb.QueryResult:
        return pb.QueryResult(
            query_index=self.query_index,
            query=self.query,
            segments=[s.to_pb() for s in self.segments],
            raw_answer=self.raw_answer,
            found=self.found,
            score=self.score,
        )

    @classmethod
    def from_pb(cls, m: pb.QueryResult) -> "QueryResult":
        return cls(m.query_index, m.query, tuple(Segment.from_pb(s) for s in m.segments), m.raw_answer, m.score)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query_index": self.query_index,
            "query": self.query,
            "segments": [asdict(s) for s in self.segments],
            "raw_answer": self.raw_answer,
            "score": self.score,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QueryResult":
        return cls(
            query_index=d["query_index"],
            query=d["query"],
            segments=tuple(Segment(**s) for s in d["segments"]),
            raw_answer=d["raw_answer"],
            score=float(d.get("score", 0.0)),
        )


CACHE_OUTCOMES = {
    "miss": pb.CACHE_MISS,
    "tokens": pb.CACHE_HIT_TOKENS,
    "kv": pb.CACHE_HIT_KV,
    "bypassed": pb.CACHE_BYPASSED,
}


@dataclass
class JobStats:
    sampled_fps: float = 0.0
    frames: int = 0
    visual_tokens: int = 0
    frame_width: int = 0
    frame_height: int = 0
    cache: str = ""
    stage_ms: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    model: str = ""
    attempt: int = 0
    effective_sampling: dict[str, Any] = field(default_factory=dict)
    """``SamplingRequest`` fields of the first pass's effective options."""
    rounds: int = 0
    passes: int = 0
    total_visual_tokens: int = 0
    weights: str = ""
    """How the worker runs the weights (the engine's ``quantization``: awq-int4, awq-gptqmodel, ...)."""

    def to_pb(self) -> pb.JobStats:
        effective = SamplingRequest(**self.effective_sampling).to_pb() if self.effective_sampling else None
        return pb.JobStats(
            effective_sampling=effective,
            rounds=self.rounds,
            passes=self.passes,
            total_visual_tokens=self.total_visual_tokens,
            sampled_fps=self.sampled_fps,
            frames=self.frames,
            visual_tokens=self.visual_tokens,
            frame_width=self.frame_width,
            frame_height=self.frame_height,
            cache=CACHE_OUTCOMES.get(self.cache, pb.CACHE_OUTCOME_UNSPECIFIED),
            stage_ms=self.stage_ms,
            # A tenant sees neither the worker's name nor a path on it: the model by its name only.
            model=public_model_name(self.model),
            attempt=self.attempt,
            weights=self.weights,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobStats":
        """Fields this version does not know (a newer worker's) are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def public_model_name(model: str) -> str:
    """A hub id as it is; a local checkpoint directory by its last component (never the path)."""
    if model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1:
        return model.rstrip("/").rsplit("/", 1)[-1]
    return model


KIND_LOCALIZE = "localize"
KIND_INDEX = "index"
JOB_KINDS = (KIND_LOCALIZE, KIND_INDEX)


@dataclass(frozen=True)
class Job:
    """A unit of work for a worker. Its payload lives in a Redis hash keyed by ``job_id``.

    ``sampling`` holds the caller's options with the server's defaults filled in (the worker still
    bounds them by its model's own limits). Workers read the video's bytes from the blob store by
    ``video_id``.
    """

    kind: str
    video_id: str
    queries: tuple[str, ...] = ()
    sampling: SamplingRequest = SamplingRequest()
    max_new_tokens: int = 0
    min_confidence: float = 0.0
    """Segments scoring below it are dropped (a query left without any is not found); filled by the front end."""
    search: "SearchRequest" = field(default_factory=lambda: SearchRequest())
    tenant: str = ""
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_s: float = field(default_factory=time.time)
    deadline_s: float = 0.0
    """Unix time after which nobody waits for the result (0 = none)."""
    callback_url: str = ""
    """Webhook POSTed when the job ends (checked by the front end; empty = none)."""

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d)

    @property
    def view(self) -> str:
        """What of the video the job looks at (its sampling and search), whoever asks the questions."""
        return json.dumps([asdict(self.sampling), asdict(self.search)], sort_keys=True, default=str)

    @classmethod
    def from_request(cls, kind: str, request: Any, *, tenant: str, settings: "Settings") -> "Job":
        """A job for a ``LocalizeRequest`` (kind localize) or ``IndexVideoRequest`` (kind index);
        raises InvalidArgument for a bad field. The server's defaults fill the sampling options."""
        queries = tuple(request.queries) if kind == KIND_LOCALIZE else ()
        max_new_tokens = request.max_new_tokens if kind == KIND_LOCALIZE else 0
        _validate_queries(kind, queries, settings)
        if max_new_tokens < 0 or max_new_tokens > settings.max_new_tokens:
            raise errors.InvalidArgument(f"max_new_tokens must be in [0, {settings.max_new_tokens}]",
                                         field="max_new_tokens")
        sampling = _validate_sampling(SamplingRequest.from_pb(request.sampling), settings)
        min_confidence = float(request.min_confidence) if kind == KIND_LOCALIZE else 0.0
        if not (math.isfinite(min_confidence) and 0.0 <= min_confidence <= 1.0):
            raise errors.InvalidArgument("min_confidence must be in [0, 1]", field="min_confidence")
        search = SearchRequest.from_pb(request.search) if kind == KIND_LOCALIZE else SearchRequest()
        return cls(kind=kind, video_id=request.video_id, queries=queries,
                   sampling=sampling.with_defaults(settings), max_new_tokens=max_new_tokens,
                   min_confidence=min_confidence or settings.min_confidence,
                   search=search.with_defaults(settings), tenant=tenant,
                   callback_url=request.callback_url.strip())

    def check_video(self, video: "VideoInfo") -> None:
        """Raise InvalidArgument when the request does not fit the video (e.g. a range past its end)."""
        if self.sampling.start_s is not None and self.sampling.start_s >= video.duration_s:
            raise errors.InvalidArgument("sampling.start_offset is past the end of the video",
                                         field="sampling.start_offset")

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Job":
        d = json.loads(raw)
        d.pop("blob_path", None)  # written by versions that handed workers a path
        d["queries"] = tuple(d["queries"])
        d["sampling"] = SamplingRequest(**d["sampling"])
        d["search"] = SearchRequest(**d.get("search", {}))
        return cls(**d)


MIN_BUDGET_TOKENS = 512
"""Four frames at Qwen's minimum frame size fit in this many tokens at any aspect ratio."""


def _validate_queries(kind: str, queries: tuple[str, ...], settings: "Settings") -> None:
    if kind == KIND_INDEX:
        return
    if not queries:
        raise errors.InvalidArgument("at least one query is required", field="queries")
    if len(queries) > settings.max_queries:
        raise errors.InvalidArgument(
            f"{len(queries)} queries; at most {settings.max_queries} per request", field="queries")
    for i, query in enumerate(queries):
        if not query.strip():
            raise errors.InvalidArgument("a query is empty", field=f"queries[{i}]")
        if len(query) > settings.max_query_chars:
            raise errors.InvalidArgument(
                f"query of {len(query)} characters; at most {settings.max_query_chars}", field=f"queries[{i}]")
        if any(ord(c) < 32 and c not in "\t\n" for c in query):
            raise errors.InvalidArgument("a query contains control characters", field=f"queries[{i}]")
        if not any(c.isalnum() for c in query):
            raise errors.InvalidArgument("a query needs at least one letter or digit (it is only punctuation, "
                                         "symbols or emoji)", field=f"queries[{i}]")


def _validate_sampling(s: SamplingRequest, settings: "Settings") -> SamplingRequest:
    """Every numeric field within its range and the server's caps (0 = the server's default)."""
    if not (math.isfinite(s.max_fps) and 0 <= s.max_fps <= settings.max_fps):
        raise errors.InvalidArgument(f"sampling.max_fps must be 0 (default) or in (0, {settings.max_fps:g}]",
                                     field="sampling.max_fps")
    if s.max_frames < 0 or s.max_frames == 1 or s.max_frames > settings.max_frames:
        raise errors.InvalidArgument(f"sampling.max_frames must be 0 (default) or in [2, {settings.max_frames}]",
                                     field="sampling.max_frames")
    most = max(settings.max_budget_tokens, settings.budget_tokens)
    if s.budget_tokens and not MIN_BUDGET_TOKENS <= s.budget_tokens <= most:
        raise errors.InvalidArgument(
            f"sampling.budget_tokens must be 0 (default) or in [{MIN_BUDGET_TOKENS}, {most}]",
            field="sampling.budget_tokens")
    if s.start_s is not None and s.start_s < 0:
        raise errors.InvalidArgument("sampling.start_offset is negative", field="sampling.start_offset")
    if s.end_s is not None and s.end_s <= (s.start_s or 0.0):
        raise errors.InvalidArgument("sampling.end_offset must be after start_offset (and after 0)",
                                     field="sampling.end_offset")
    return s


# Event kinds on a job's event stream (``keys.job_events``).
EVENT_PROGRESS = "progress"
EVENT_RESULT = "result"
EVENT_DONE = "done"
EVENT_FAILED = "failed"

STAGES = {
    "queued": pb.QUEUED,
    "decoding": pb.DECODING,
    "encoding": pb.ENCODING,
    "prefilling": pb.PREFILLING,
    "generating": pb.GENERATING,
    "done": pb.DONE,
    "searching": pb.SEARCHING,
}


def progress_data(stage: str, done: int = 0, total: int = 0, message: str = "", round: int = 0) -> dict[str, Any]:
    """The data of a progress event (what a worker writes; :func:`event_pb` reads it)."""
    return {"stage": stage, "done": done, "total": total, "message": message, "round": round}


def event_pb(job_id: str, kind: str, data: dict[str, Any]) -> "pb.JobEvent | None":
    """A job event as the API's ``JobEvent``; None for a failure (the caller raises it)."""
    if kind == EVENT_PROGRESS:
        return pb.JobEvent(job_id=job_id, progress=pb.Progress(
            stage=STAGES.get(data.get("stage", ""), pb.STAGE_UNSPECIFIED), done=int(data.get("done", 0)),
            total=int(data.get("total", 0)), message=str(data.get("message", "")), round=int(data.get("round", 0))))
    if kind == EVENT_RESULT:
        return pb.JobEvent(job_id=job_id, result=QueryResult.from_dict(data).to_pb())
    if kind == EVENT_DONE:
        return pb.JobEvent(job_id=job_id, done=JobStats.from_dict(data).to_pb())
    return None


@dataclass(frozen=True)
class UploadHeader:
    """First message of an upload stream."""

    size_bytes: int
    sha256: str
    filename: str
    content_type: str
    upload_id: str

    @classmethod
    def from_pb(cls, m: pb.UploadHeader) -> "UploadHeader":
        return cls(m.size_bytes, m.sha256.lower(), m.filename, m.content_type, m.upload_id)


@dataclass(frozen=True)
class IngestRequest:
    """A video to fetch from a source URI (the rules are in the proto and ``service/ingest.py``)."""

    source_uri: str
    sha256: str
    size_bytes: int
    filename: str

    @classmethod
    def from_pb(cls, m: pb.IngestVideoRequest) -> "IngestRequest":
        return cls(m.source_uri.strip(), m.sha256.lower(), m.size_bytes, m.filename)


@dataclass(frozen=True)
class UploadChunk:
    offset: int
    data: bytes

    @classmethod
    def from_pb(cls, m: pb.UploadChunk) -> "UploadChunk":
        return cls(m.offset, m.data)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else v
