"""Records of a library search (SearchVideos): the validated request, and what its stream carries.

A library search asks one set of queries of many videos; each video is an ordinary Localize job
built from :meth:`LibrarySearch.job_for`, and the segments found are ranked across the library by
their calibrated confidence (:func:`rank`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from moments.core import errors
from moments.core.blobs import SHA256_RE
from moments.core.records import KIND_LOCALIZE, Job, QueryResult, Segment
from moments.v1 import moments_pb2 as pb

if TYPE_CHECKING:
    from moments.core.config import Settings


@dataclass(frozen=True)
class LibrarySearch:
    """A validated SearchVideos request: a Localize job without its video, and which videos."""

    template: Job
    """Queries, sampling, min_confidence (the server's default filled in) and search options."""
    video_ids: tuple[str, ...]
    """The listed videos; empty with ``all_of_mine``."""
    all_of_mine: bool
    limit: int

    @classmethod
    def from_pb(cls, m: pb.SearchVideosRequest, *, tenant: str, settings: "Settings") -> "LibrarySearch":
        """Raises InvalidArgument for a bad field (the queries and options by Localize's rules)."""
        if not 1 <= m.limit <= settings.search_max_results:
            raise errors.InvalidArgument(f"limit must be in [1, {settings.search_max_results}]", field="limit")
        ids = tuple(m.video_ids)
        if m.all_of_mine == bool(ids):
            raise errors.InvalidArgument("list video_ids or set all_of_mine (exactly one of them)",
                                         field="video_ids")
        if len(ids) > settings.search_max_videos:
            raise errors.InvalidArgument(f"{len(ids)} videos; at most {settings.search_max_videos} per search",
                                         field="video_ids")
        seen: set[str] = set()
        for i, video_id in enumerate(ids):
            if not SHA256_RE.match(video_id):
                raise errors.InvalidArgument("a video id must be a lower-case hex sha256", field=f"video_ids[{i}]")
            if video_id in seen:
                raise errors.InvalidArgument("a video is listed twice", field=f"video_ids[{i}]")
            seen.add(video_id)
        localize = pb.LocalizeRequest(queries=m.queries, sampling=m.sampling, max_new_tokens=m.max_new_tokens,
                                      min_confidence=m.min_confidence, search=m.search)
        template = Job.from_request(KIND_LOCALIZE, localize, tenant=tenant, settings=settings)
        return cls(template, ids, m.all_of_mine, m.limit)

    def job_for(self, video_id: str, deadline_s: float) -> Job:
        """A fresh Localize job of this search for one video; nobody waits for it after ``deadline_s``."""
        return replace(self.template, video_id=video_id, job_id=uuid.uuid4().hex, created_s=time.time(),
                       deadline_s=deadline_s)

    def hits(self, video_id: str, results: list[QueryResult]) -> list["SearchHit"]:
        """Every segment of one video's answers at or above the search's min_confidence."""
        return [SearchHit(video_id, r.query_index, r.query, s, r.score) for r in results for s in r.segments
                if s.confidence >= self.template.min_confidence]


@dataclass(frozen=True)
class SearchHit:
    """One found segment of a library search."""

    video_id: str
    query_index: int
    query: str
    segment: Segment
    score: float
    """The query's calibrated score for the whole video."""

    def to_pb(self) -> pb.SearchHit:
        return pb.SearchHit(video_id=self.video_id, query_index=self.query_index, query=self.query,
                            segment=self.segment.to_pb(), score=self.score)


def rank(hits: list[SearchHit], limit: int) -> list[SearchHit]:
    """The top ``limit`` hits: by confidence, then the video's score, then video id and start time."""
    return sorted(hits, key=lambda h: (-h.segment.confidence, -h.score, h.video_id, h.segment.start_s))[:limit]


@dataclass(frozen=True)
class SearchProgress:
    videos_done: int
    videos_total: int

    def to_pb(self) -> pb.SearchVideosEvent:
        return pb.SearchVideosEvent(progress=pb.SearchProgress(videos_done=self.videos_done,
                                                               videos_total=self.videos_total))


@dataclass(frozen=True)
class VideoFailure:
    """A video of the search without an answer: ``code`` is the status its own Localize would get."""

    video_id: str
    code: str
    message: str

    def to_pb(self) -> pb.SearchVideosEvent:
        return pb.SearchVideosEvent(video_error=pb.VideoError(video_id=self.video_id, code=self.code,
                                                              message=self.message))


@dataclass(frozen=True)
class SearchOutcome:
    """The last message: the ranked hits and how many videos were answered."""

    hits: tuple[SearchHit, ...]
    videos_answered: int

    def to_pb(self) -> pb.SearchVideosEvent:
        return pb.SearchVideosEvent(results=pb.SearchResults(hits=[h.to_pb() for h in self.hits],
                                                             videos_answered=self.videos_answered))
