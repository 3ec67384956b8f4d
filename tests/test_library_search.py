"""SearchVideos across a library (issue 18), on the real stack with the shipped grounder: videos showing
the asked event rank above those without it, another tenant's video is a NOT_FOUND entry while the
rest are answered, limit and min_confidence hold, a cancelled search submits no further job and
cancels those in flight, and bad requests are INVALID_ARGUMENT."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from moments.app import cli
from moments.app.client import MomentsClient
from moments.core import keys
from moments.core.records import duration_s
from moments.service.auth import hash_key
from moments.tools import GROUNDER_DIR as GROUNDER
from moments.tools.synthetic import Event, write_event_video
from tests.conftest import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (GROUNDER / "config.json").exists(), reason=f"the shipped grounder is absent ({GROUNDER})")]

KEYS = {"alice": "alice-secret", "bob": "bob-secret"}
ASKED = Event("red", "triangle", 0, 0).query  # "the red triangle appears"
FANOUT_JOBS = 2
ENCODE_SLEEP_S = 2.0
WITH_EVENT = [  # (seconds, the red triangle's span, another event)
    (24.0, (5.0, 13.0), Event("blue", "square", 14.0, 21.0, lane=0)),
    (30.0, (17.0, 26.0), Event("green", "circle", 2.0, 9.0, lane=0)),
    (21.0, (3.0, 10.0), None),
    (27.0, (11.0, 19.0), Event("yellow", "circle", 1.0, 8.0, lane=2)),
]
WITHOUT_EVENT = [  # (seconds, its events: other colours only)
    (25.0, (Event("blue", "triangle", 4.0, 12.0, lane=1),)),
    (22.0, (Event("green", "square", 8.0, 16.0, lane=1), Event("yellow", "triangle", 2.0, 7.0, lane=0))),
    (29.0, (Event("yellow", "square", 12.0, 22.0, lane=1),)),
]


@pytest.fixture(scope="module")
def library(redis_server, stack_factory, tmp_path_factory):
    """Alice's seven videos (four show the red triangle) and one of Bob's, on a stack with the grounder."""
    folder = tmp_path_factory.mktemp("library")
    paths = []
    for i, (seconds, (start, end), other) in enumerate(WITH_EVENT):
        events = [Event("red", "triangle", start, end, lane=1), *([other] if other else [])]
        paths.append(write_event_video(folder / f"with-{i}.mp4", events, seconds=seconds, fps=8.0, seed=i))
    for i, (seconds, events) in enumerate(WITHOUT_EVENT):
        paths.append(write_event_video(folder / f"without-{i}.mp4", events, seconds=seconds, fps=8.0, seed=50 + i))
    bobs = write_event_video(folder / "bob.mp4", [Event("red", "triangle", 2.0, 9.0, lane=1)], seconds=20.0,
                             fps=8.0, seed=99)
    redis_server.client().flushall()
    spec = ",".join(f"{tenant}:{hash_key(key)}" for tenant, key in KEYS.items())
    with stack_factory(model=GROUNDER, api_keys=spec, max_new_tokens=24, search_fanout_jobs=FANOUT_JOBS,
                       job_timeout_s=300.0) as stack, \
            MomentsClient(stack.target, api_key=KEYS["alice"], state_path=folder / "a.json") as alice, \
            MomentsClient(stack.target, api_key=KEYS["bob"], state_path=folder / "b.json") as bob:
        ids = [alice.upload(p).video.video_id for p in paths]
        yield {"stack": stack, "alice": alice, "paths": paths, "with": ids[:len(WITH_EVENT)], "without": ids[len(WITH_EVENT):],
               "bob": bob.upload(bobs).video.video_id}


def run(events) -> tuple[list, list, object]:
    """(progress, video errors, results) of a finished SearchVideos stream."""
    progress, failures, results = [], [], []
    for event in events:
        kind = event.WhichOneof("event")
        {"progress": progress, "video_error": failures, "results": results}[kind].append(getattr(event, kind))
    assert len(results) == 1, "the stream ends with one results message"
    return progress, failures, results[0]


def job_payloads(redis, query: str) -> list[dict]:
    """Payloads of every job in Redis that asks ``query`` (what the search submitted)."""
    out = []
    for key in redis.scan_iter(match=keys.job("*")):
        if key.count(b":") == 2:  # the job's hash, not its events or cancel flag
            payload = redis.hget(key, "payload")
            if payload and query in json.loads(payload)["queries"]:
                out.append(json.loads(payload))
    return out


def test_videos_with_the_event_rank_above_those_without(library):
    progress, failures, results = run(library["alice"].search_videos([ASKED], all_of_mine=True, limit=50,
                                                                     timeout_s=300))
    total = len(library["with"]) + len(library["without"])
    assert not failures
    assert (progress[0].videos_done, progress[-1].videos_done, progress[-1].videos_total) == (0, total, total)
    assert results.videos_answered == total
    order = [h.video_id for h in results.hits]
    found = [v for v in library["with"] if v in order]
    assert len(found) >= len(library["with"]) - 1, (order, [h.segment.confidence for h in results.hits])
    wrong = [i for i, v in enumerate(order) if v in library["without"]]
    if wrong:  # a video without the event may show up, but only below every video with it
        assert max(order.index(v) for v in found) < min(wrong), order
    confidences = [h.segment.confidence for h in results.hits]
    assert confidences == sorted(confidences, reverse=True)
    assert {h.query for h in results.hits} == {ASKED} and all(
        duration_s(h.segment.end_offset) > duration_s(h.segment.start_offset) for h in results.hits)


def test_another_tenants_video_is_not_found_and_the_rest_are_answered(library):
    mine = [library["with"][0], library["without"][0]]
    _, failures, results = run(library["alice"].search_videos(
        [ASKED], video_ids=[mine[0], library["bob"], mine[1]], limit=10, timeout_s=300))
    assert [(f.video_id, f.code) for f in failures] == [(library["bob"], "NOT_FOUND")]
    assert results.videos_answered == 2
    assert library["bob"] not in {h.video_id for h in results.hits}
    assert {h.video_id for h in results.hits} <= set(mine) and mine[0] in {h.video_id for h in results.hits}


def test_limit_and_min_confidence_are_honoured(library):
    every = run(library["alice"].search_videos([ASKED], all_of_mine=True, limit=50, min_confidence=0.05,
                                               timeout_s=300))[2].hits
    assert len(every) >= 2, "needs two hits to check the limit"
    top = run(library["alice"].search_videos([ASKED], all_of_mine=True, limit=2, min_confidence=0.05,
                                             timeout_s=300))[2].hits
    assert list(top) == list(every[:2])
    confidences = sorted({round(h.segment.confidence, 4) for h in every})
    threshold = confidences[len(confidences) // 2]  # the median confidence: some above, some below
    high = run(library["alice"].search_videos([ASKED], all_of_mine=True, limit=50, min_confidence=threshold,
                                              timeout_s=300))[2].hits
    assert high and all(h.segment.confidence >= threshold for h in high)
    assert [(h.video_id, h.segment.start_offset.ToNanoseconds()) for h in high] == [
        (h.video_id, h.segment.start_offset.ToNanoseconds()) for h in every if h.segment.confidence >= threshold]


def test_a_cancelled_search_submits_no_more_jobs_and_cancels_those_in_flight(library, stack_factory, tmp_path):
    """On a stack of its own whose encoder is slow, so jobs are in flight when the caller cancels or
    the deadline passes."""
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    redis = redis_server.client()
    query = "the green triangle appears"
    spec = f"alice:{hash_key(KEYS['alice'])}"
    try:
        with stack_factory(model=GROUNDER, redis_url=redis_server.url, api_keys=spec, max_new_tokens=24,
                           search_fanout_jobs=FANOUT_JOBS, faults={"encode_sleep_s": ENCODE_SLEEP_S}) as stack, \
                MomentsClient(stack.target, api_key=KEYS["alice"], state_path=tmp_path / "a.json") as alice:
            videos = [alice.upload(p).video.video_id for p in library["paths"]]
            events = alice.search_videos([query], all_of_mine=True, limit=10, timeout_s=300)
            done = 0
            for event in events:
                if event.WhichOneof("event") == "progress" and event.progress.videos_done >= 1:
                    done = event.progress.videos_done
                    break
            events.cancel()
            time.sleep(1.0)  # the front end sees the cancel and abandons its jobs
            submitted = job_payloads(redis, query)
            assert done <= len(submitted) <= done + FANOUT_JOBS < len(videos), (done, len(submitted))
            time.sleep(2 * ENCODE_SLEEP_S)  # the worker reaches each abandoned job's next check
            assert len(job_payloads(redis, query)) == len(submitted), "a job was submitted after the cancel"
            states = {j["job_id"]: redis.hget(keys.job(j["job_id"]), "state") for j in submitted}
            cancelled = [job_id for job_id in states if redis.exists(keys.job_cancel(job_id))]
            assert cancelled, f"no job in flight was cancelled: {states}"
            assert all(states[job_id] == b"failed" for job_id in cancelled), states  # stopped, not finished
            assert set(states.values()) <= {b"done", b"failed"}, states

            # A deadline that passes mid-search stops it the same way.
            late = "the blue triangle appears"
            with pytest.raises(grpc.RpcError) as err:
                run(alice.search_videos([late], all_of_mine=True, limit=10, timeout_s=1.5 * ENCODE_SLEEP_S))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(1.0)
            submitted = len(job_payloads(redis, late))
            assert 1 <= submitted <= 2 * FANOUT_JOBS < len(videos), submitted
            time.sleep(2 * ENCODE_SLEEP_S)
            assert len(job_payloads(redis, late)) == submitted, "a job was submitted after the deadline"
    finally:
        redis_server.stop()


@pytest.mark.parametrize(("field", "request_kw"), [
    ("queries", dict(queries=[], all_of_mine=True)),
    ("queries[0]", dict(queries=["  "], all_of_mine=True)),
    ("limit", dict(all_of_mine=True, limit=0)),
    ("limit", dict(all_of_mine=True, limit=1001)),
    ("video_ids", dict(video_ids=[])),
    ("video_ids", dict(video_ids=["a" * 64], all_of_mine=True)),
    ("video_ids[1]", dict(video_ids=["a" * 64, "A" * 64])),
    ("video_ids[1]", dict(video_ids=["a" * 64, "a" * 64])),
    ("min_confidence", dict(all_of_mine=True, min_confidence=1.5)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_requests_are_invalid_argument(library, field, request_kw):
    request_kw = {"queries": [ASKED], "limit": 10, **request_kw}
    with pytest.raises(grpc.RpcError) as err:
        run(library["alice"].search_videos(timeout_s=30, **request_kw))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violation = error_details_pb2.BadRequest()
    assert rpc_status.from_call(err.value).details[0].Unpack(violation)
    assert violation.field_violations[0].field == field


def test_the_cli_prints_the_ranking_as_json(library, capsys):
    stack = library["stack"]
    code = cli.main(["search", ASKED, "--all", "--limit", "3", "--json", "--target", stack.target,
                     "--api-key", KEYS["alice"], "--timeout", "300"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["video_errors"] == []
    assert 1 <= len(printed["hits"]) <= 3 and printed["hits"][0]["videoId"] in library["with"]
