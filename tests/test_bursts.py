"""Bursts of waiting calls (issue 20): waiting calls hold no pooled Redis connection each, so a
burst far beyond the pool gets no UNAVAILABLE, every cancellation lands at once, and cut upload
streams leave no writer lock behind."""

from __future__ import annotations

import asyncio

import pytest

from moments.app.client import MomentsClient
from moments.tools.synthetic import Event, write_event_video
from tests.bursts import burst

POOL = 20
CALLS = 150
CANCELLED = 50
UPLOADS = 30


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_burst_beyond_the_pool_waits_and_cancels_cleanly(stack_factory, redis_server, tmp_path, monkeypatch):
    monkeypatch.setattr("moments.app.client.DEFAULT_STATE", tmp_path / "state.json")
    redis_server.client().flushall()
    video = write_event_video(tmp_path / "v.mp4", [Event("red", "square", 1, 2)], seconds=4, fps=4)
    with stack_factory(workers=1, faults={"answer_sleep_s": 2.0}, redis_max_connections=POOL,
                       max_open_uploads=UPLOADS) as s:
        with MomentsClient(s.target) as client:
            video_id = client.upload(video).video.video_id
        report = asyncio.run(burst(s.target, s.settings.redis_url, video_id, calls=CALLS, cancel=CANCELLED,
                                   uploads=UPLOADS, wait_s=10.0))
    assert report.peak_open_jobs >= CALLS - 2, report  # (the worker may have finished one or two)
    assert report.codes["UNAVAILABLE"] == 0, report.details[:5]
    assert set(report.codes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, (report.codes, report.details[:5])
    assert report.codes["CANCELLED"] == CANCELLED
    assert report.unmarked == 0 and len(report.marked_s) == CANCELLED
    assert max(report.marked_s) < 2.0, sorted(report.marked_s)[-5:]
    assert report.upload_codes == {"CANCELLED": UPLOADS}
    assert report.writer_locks_left == 0
    # Connections do not grow with the waiters: the pool's bound (front end and worker) and a few more.
    assert report.redis_clients_peak <= report.redis_clients_idle + POOL + 8, report
