"""Library search (SearchVideos): one Localize job per video, a bounded fan-out, a ranking at the end.

Each video's job is an ordinary Localize job submitted through :class:`JobClient`, so an identical
open job is joined, and the token cache and hot KV prefixes serve repeat searches. At most
``Settings.search_fanout_jobs`` jobs of one search are queued or running at a time. When the call
ends early (the caller cancels, the deadline passes, an error) no further job is submitted and the
jobs in flight are abandoned, which cancels each one nobody else waits for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Union

from moments.core import errors, jobs
from moments.core.config import Settings
from moments.core.library import LibrarySearch, SearchHit, SearchOutcome, SearchProgress, VideoFailure, rank
from moments.core.records import EVENT_RESULT, QueryResult
from moments.service.catalog import VideoCatalog
from moments.service.status import to_status
from moments.service.submission import JobClient

log = logging.getLogger(__name__)
CANCEL_RETRY_S = 0.2
"""How long a stopping search waits for its cancelled jobs' tasks before cancelling them again."""
SearchEvent = Union[SearchProgress, VideoFailure, SearchOutcome]
PER_VIDEO_ERRORS = (errors.NotFound, errors.InvalidArgument, errors.ResourceExhausted, errors.JobFailed,
                    errors.JobLost)
"""What leaves one video unanswered but the search going; anything else (no worker left, the
deadline, Redis down) ends the whole call."""


class LibrarySearcher:
    """Runs SearchVideos for the servicer: the caller's videos, one job each, ranked hits at the end."""

    def __init__(self, settings: Settings, catalog: VideoCatalog, job_client: JobClient) -> None:
        self.settings = settings
        self.catalog = catalog
        self.jobs = job_client

    async def search(self, tenant: str, request: LibrarySearch, deadline_s: float) -> AsyncIterator[SearchEvent]:
        """Progress after each video, a failure per video left unanswered, and last the ranked hits."""
        video_ids = request.video_ids or await self._all_of(tenant)
        if not await self.jobs.live_workers():
            raise errors.Unavailable("no worker is running; try again when one is up")
        started_s = time.time()
        total, done, answered = len(video_ids), 0, 0
        hits: list[SearchHit] = []
        waiting = iter(video_ids)
        running: set[asyncio.Task] = set()
        yield SearchProgress(0, total)
        try:
            while True:
                while len(running) < max(1, self.settings.search_fanout_jobs) and (
                        video_id := next(waiting, None)) is not None:
                    running.add(asyncio.create_task(self._answer(tenant, request, video_id, deadline_s)))
                if not running:
                    break
                finished, running = await asyncio.wait(running, timeout=max(0.0, deadline_s - time.time()),
                                                       return_when=asyncio.FIRST_COMPLETED)
                if not finished:
                    raise errors.DeadlineExceeded(f"the search did not finish within the deadline "
                                                  f"({done} of {total} videos done)")
                for task in finished:
                    outcome = task.result()
                    done += 1
                    if isinstance(outcome, VideoFailure):
                        yield outcome
                    else:
                        hits += outcome
                        answered += 1
                yield SearchProgress(done, total)
            log.info("library search of %d videos done in %.1f s: %d answered, %d segments", total,
                     time.time() - started_s, answered, len(hits))
            yield SearchOutcome(tuple(rank(hits, request.limit)), answered)
        finally:
            if running:
                log.info("library search stopped with %d of %d videos done; abandoning %d jobs", done, total,
                         len(running))
            while running:  # again until each has stopped: a cancel can be lost in a race (seen on 3.11)
                for task in running:
                    task.cancel()
                _, running = await asyncio.wait(running, timeout=CANCEL_RETRY_S)

    async def _all_of(self, tenant: str) -> tuple[str, ...]:
        ids = await self.catalog.owned_ids(tenant, self.settings.search_max_videos + 1)
        if len(ids) > self.settings.search_max_videos:
            raise errors.InvalidArgument(f"more than {self.settings.search_max_videos} videos; list the ones "
                                         "to search", field="all_of_mine")
        return tuple(ids)

    async def _answer(self, tenant: str, request: LibrarySearch, video_id: str,
                      deadline_s: float) -> list[SearchHit] | VideoFailure:
        """One video's hits, or why it has none (see PER_VIDEO_ERRORS)."""
        try:
            job = request.job_for(video_id, deadline_s)
            job.check_video(await self.catalog.get_owned(tenant, video_id))
            job_id = await self.jobs.submit(job)
            results = []
            async for event in self.jobs.events(job_id, deadline_s):
                if event.kind == jobs.FAILED:
                    raise errors.JobFailed(f"job {job_id} failed: {event.data.get('reason', 'unknown error')}",
                                           job_id=job_id)
                if event.kind == EVENT_RESULT:
                    results.append(QueryResult.from_dict(event.data))
            return request.hits(video_id, results)
        except PER_VIDEO_ERRORS as exc:
            return VideoFailure(video_id, to_status(exc).code.name, exc.message)
