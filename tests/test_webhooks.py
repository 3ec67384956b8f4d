"""Webhooks end to end: a real HTTP receiver (http.server) on loopback, the real stack (front end,
worker, Redis, tiny model), real videos. Signed events, retries, dead letters, refused URLs, failed
jobs, and the fenced write that keeps a stale worker from scheduling an event."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from moments.app.client import NO_RETRY, MomentsClient, localize_request
from moments.core import errors, jobs, keys, webhooks
from moments.core.config import Settings
from moments.core.records import KIND_LOCALIZE, Job
from moments.service.submission import JobClient
from moments.service.webhooks import Webhooks
from moments.tools.synthetic import Event, write_event_video
from moments.v1 import moments_pb2 as pb
from moments.workers.fencing import Fence
from tests.conftest import RedisServer, free_port

SECRET = "test-webhook-secret"
HOOK_SETTINGS = dict(webhook_secret=SECRET, allow_networks="127.0.0.0/8", webhook_backoff_s=0.1,
                     webhook_max_attempts=3, webhook_timeout_s=2.0)


class Receiver:
    """An HTTP server on loopback that records every POST and answers with the planned statuses
    (then 200)."""

    def __init__(self, statuses: tuple[int, ...] = ()) -> None:
        self.statuses = list(statuses)
        self.posts: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.posts.append((dict(self.headers.items()), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/moments"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.posts) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.posts) >= count, f"{len(self.posts)} POSTs within {timeout_s} s, expected {count}"
        return self.posts


def bad_field(exc: grpc.RpcError) -> str:
    """The field a BadRequest detail names."""
    for detail in rpc_status.from_call(exc).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0].field
    raise AssertionError(f"no BadRequest in {exc}")


def deliveries(outcome: str) -> float:
    return REGISTRY.get_sample_value("moments_webhook_deliveries_total", {"outcome": outcome}) or 0.0


def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def localize_with_callback(client: MomentsClient, video_id: str, url: str) -> pb.LocalizeResponse:
    request = localize_request(video_id, ["a green square"], None, 0)
    request.callback_url = url
    return client.stub.Localize(request, timeout=90)


# ------------------------------------------------------------------ receivers and Redis only


def test_verify_accepts_the_signature_and_refuses_tampering_and_old_timestamps():
    body = b'{"id":"j1","state":"done"}'
    headers = webhooks.signed_headers(SECRET, body, "j1", 1, now_s=1_000_000)
    lowered = {k.lower(): v for k, v in headers.items()}  # header names arrive in any case
    assert webhooks.verify(SECRET, lowered, body, now_s=1_000_100) == {"id": "j1", "state": "done"}
    for secret, sent, now_s in ((SECRET, body.replace(b"done", b"fail"), 1_000_100),  # tampered body
                                ("another-secret", body, 1_000_100),                  # wrong key
                                (SECRET, body, 1_000_000 + webhooks.DEFAULT_TOLERANCE_S + 1)):  # replay
        with pytest.raises(webhooks.SignatureError):
            webhooks.verify(secret, headers, sent, now_s=now_s)


async def test_a_stale_worker_schedules_no_event_and_the_winner_schedules_one(redis_url):
    r = aioredis.Redis.from_url(redis_url)
    fence = Fence(r)
    job = Job(kind=KIND_LOCALIZE, video_id="v" * 64, queries=("q",), callback_url="https://example.com/h")
    await r.xgroup_create(keys.JOBS_STREAM, keys.JOBS_GROUP, id="0", mkstream=True)
    await r.hset(keys.job(job.job_id), mapping={"payload": job.to_json(), "state": jobs.QUEUED})
    entry = await r.xadd(keys.JOBS_STREAM, {"job_id": job.job_id})
    stale = await fence.take(job.job_id, "w1", 1)
    fresh = await fence.take(job.job_id, "w2", 2)  # w1 was stopped past its lease; w2 reran the job
    hook = webhooks.delivery_fields(job, webhooks.event_body(job, webhooks.DONE))
    assert not await fence.finish(job.job_id, stale, entry, jobs.DONE, "{}", webhook=hook)
    assert await r.zcard(keys.WEBHOOKS_DUE) == 0, "a fenced-out write schedules nothing"
    assert await fence.finish(job.job_id, fresh, entry, jobs.DONE, "{}", webhook=hook)
    assert not await fence.finish(job.job_id, "", entry, jobs.FAILED, "{}", webhook=hook)
    assert await r.zrange(keys.WEBHOOKS_DUE, 0, -1) == [job.job_id.encode()]
    assert (await r.hgetall(keys.webhook(job.job_id)))[b"url"] == b"https://example.com/h"
    await r.aclose()


async def test_two_front_ends_never_send_one_event_twice(redis_url):
    settings = Settings.from_env(environ={}, redis_url=redis_url, **HOOK_SETTINGS)
    with Receiver() as receiver:
        r = aioredis.Redis.from_url(redis_url)
        fronts = [Webhooks(settings, r), Webhooks(settings, r)]
        events = [Job(kind=KIND_LOCALIZE, video_id="v" * 64, callback_url=receiver.url) for _ in range(40)]
        for job in events:
            await fronts[0].job_lost(job)
            await fronts[1].job_lost(job)  # a second caller saw the same loss: still one event
        loops = [asyncio.create_task(f.run()) for f in fronts]
        try:
            await asyncio.to_thread(receiver.wait_for, len(events))
            await asyncio.sleep(0.5)  # room for a duplicate to arrive
        finally:
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
        ids = [headers["Moments-Delivery"] for headers, _ in receiver.posts]
        assert sorted(ids) == sorted(job.job_id for job in events)
        assert all(json.loads(body)["state"] == "lost" for _, body in receiver.posts)
        assert await r.zcard(keys.WEBHOOKS_DUE) == 0
        await r.aclose()


async def test_a_lost_job_gets_a_lost_event(redis_url):
    settings = Settings.from_env(environ={}, redis_url=redis_url, worker_stale_s=600.0, **HOOK_SETTINGS)
    with Receiver() as receiver:
        r = aioredis.Redis.from_url(redis_url)
        hooks, waiting = Webhooks(settings, r), JobClient(settings, r)
        job = Job(kind=KIND_LOCALIZE, video_id="v" * 64, queries=("q",), callback_url=receiver.url)
        await r.hset(keys.WORKERS_HASH, "w", time.time())
        await r.hset(keys.job(job.job_id), mapping={"payload": job.to_json(), "state": jobs.RUNNING})
        await r.xadd(keys.job_events(job.job_id), {"kind": "progress", "data": "{}"})
        with pytest.raises(errors.JobLost):
            async for _ in waiting.events(job.job_id, time.time() + 60, on_lost=lambda: hooks.job_lost(job)):
                await r.delete(keys.job(job.job_id))  # what a failover to a lagging replica does
        assert await hooks.deliver_due() == 1
        headers, body = receiver.wait_for(1)[0]
        event = webhooks.verify(SECRET, headers, body)
        assert (event["state"], event["job_id"], event["video_id"]) == ("lost", job.job_id, job.video_id)
        await hooks.client.aclose()
        await r.aclose()


def test_refused_callback_urls_are_invalid_argument(stack_factory, tmp_path):
    server = RedisServer(tmp_path / "redis")  # its own Redis: the module's stack below keeps the shared one
    server.start()
    try:
        with stack_factory(workers=0, redis_url=server.url, webhook_secret=SECRET) as s, \
                MomentsClient(s.target, retry=NO_RETRY) as client:
            for url in ("file:///etc/passwd", "http://10.0.0.1/hook", f"http://127.0.0.1:{free_port()}/hook",
                        f"https://127.0.0.1:{free_port()}/hook", "https://user:pw@example.com/hook",
                        "ftp://example.com/hook", "https:///no-host"):
                with pytest.raises(grpc.RpcError) as err:
                    localize_with_callback(client, "a" * 64, url)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
                assert bad_field(err.value) == "callback_url", url
    finally:
        server.stop()


# ------------------------------------------------------------------------ the whole stack


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return write_event_video(tmp_path_factory.mktemp("v") / "w.mp4", [Event("green", "square", 2, 4)],
                             seconds=6, fps=6)


@pytest.fixture(scope="module")
def stack(redis_server, stack_factory):
    redis_server.client().flushall()
    with stack_factory(**HOOK_SETTINGS) as s:
        yield s


@pytest.fixture(scope="module")
def video_id(stack, video_file, tmp_path_factory):
    with MomentsClient(stack.target, state_path=tmp_path_factory.mktemp("c") / "u.json") as client:
        return client.upload(video_file).video.video_id


@pytest.mark.slow
def test_localize_with_callback_gets_one_signed_event_naming_job_video_and_segments(stack, video_id):
    with Receiver() as receiver, MomentsClient(stack.target) as client:
        response = localize_with_callback(client, video_id, receiver.url)
        headers, body = receiver.wait_for(1)[0]
        time.sleep(0.5)
        assert len(receiver.posts) == 1, "exactly one POST for one job"
    event = webhooks.verify(SECRET, headers, body)
    assert headers["Moments-Signature"].startswith("v1=") and headers["Moments-Attempt"] == "1"
    assert (event["type"], event["job_id"], event["video_id"]) == ("job.done", response.job_id, video_id)
    assert headers["Moments-Delivery"] == event["id"] == response.job_id
    assert [r["query"] for r in event["results"]] == [r.query for r in response.results]
    for sent, answered in zip(event["results"], response.results):
        assert sent["found"] == answered.found
        assert [(round(s["start_s"], 3), round(s["end_s"], 3)) for s in sent["segments"]] == \
            [(round(s.start_offset.ToTimedelta().total_seconds(), 3),
              round(s.end_offset.ToTimedelta().total_seconds(), 3)) for s in answered.segments]
    assert event["stats"]["attempt"] == 1 and "worker" not in event["stats"]
    with pytest.raises(webhooks.SignatureError):
        webhooks.verify(SECRET, headers, body.replace(video_id.encode(), b"f" * 64))
    with pytest.raises(webhooks.SignatureError):
        webhooks.verify(SECRET, headers, body, now_s=int(headers["Moments-Timestamp"]) + 301)


@pytest.mark.slow
def test_a_receiver_failing_twice_gets_three_attempts(stack, video_id):
    retried, delivered = deliveries("retried"), deliveries("delivered")
    with Receiver(statuses=(500, 503)) as receiver, MomentsClient(stack.target) as client:
        request = pb.IndexVideoRequest(video_id=video_id, callback_url=receiver.url)
        job_ids = {event.job_id for event in client.stub.IndexVideo(request, timeout=90)}
        posts = receiver.wait_for(3)
        time.sleep(0.5)
    assert len(posts) == 3
    assert [h["Moments-Attempt"] for h, _ in posts] == ["1", "2", "3"]
    assert {h["Moments-Delivery"] for h, _ in posts} == job_ids
    events = [webhooks.verify(SECRET, h, b) for h, b in posts]
    assert all(e["state"] == "done" and e["kind"] == "index" for e in events)
    assert deliveries("retried") - retried == 2 and deliveries("delivered") - delivered == 1


@pytest.mark.slow
def test_a_receiver_that_is_down_ends_in_the_dead_letter_stream(stack, video_id):
    dead = deliveries("dead")
    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    r = redis.Redis.from_url(stack.settings.redis_url)
    before = r.xlen(keys.WEBHOOKS_DEAD)
    with MomentsClient(stack.target) as client:
        request = localize_request(video_id, ["a green square"], None, 0)
        request.callback_url = url
        response = client.stub.StreamLocalize(request, timeout=90)
        job_id = [event.job_id for event in response][-1]
    wait_until(lambda: r.xlen(keys.WEBHOOKS_DEAD) > before)
    _, entry = r.xrange(keys.WEBHOOKS_DEAD)[-1]
    assert entry[b"job_id"].decode() == job_id and entry[b"attempts"] == b"3"
    assert entry[b"url"].decode() == url and b"ConnectError" in entry[b"last_error"]
    assert json.loads(entry[b"body"])["state"] == "done"
    assert deliveries("dead") - dead == 1
    assert not r.exists(keys.webhook(job_id)) and r.zscore(keys.WEBHOOKS_DUE, job_id) is None


def running_job(r: redis.Redis, timeout_s: float = 60.0) -> bytes:
    """The key of the first job seen running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job_key in r.scan_iter(match="moments:job:*", count=1000):
            if job_key.count(b":") == 2 and r.hget(job_key, "state") == b"running":
                return job_key
        time.sleep(0.02)
    raise AssertionError(f"no job was seen running within {timeout_s} s")


@pytest.mark.slow
def test_a_failed_job_gets_a_failed_event_and_a_cancelled_one_a_cancelled_event(stack_factory, video_file,
                                                                                 tmp_path):
    """One worker (one job at a time on CPU): the first job fails (an injected model error after a
    slow encode); the second, queued behind it, is left by its caller before it starts."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        with stack_factory(redis_url=server.url, faults={"answer_error_after": 0, "encode_sleep_s": 2.0},
                           job_max_attempts=1, **HOOK_SETTINGS) as s, Receiver() as receiver, \
                MomentsClient(s.target, state_path=tmp_path / "u.json", retry=NO_RETRY) as client:
            video_id = client.upload(video_file).video.video_id
            failing = {}
            thread = threading.Thread(target=lambda: failing.update(
                error=pytest.raises(grpc.RpcError, localize_with_callback, client, video_id, receiver.url)))
            thread.start()
            running_job(redis.Redis.from_url(server.url))
            request = localize_request(video_id, ["a red circle"], None, 0)
            request.callback_url = receiver.url
            with pytest.raises(grpc.RpcError) as left:
                client.stub.Localize(request, timeout=0.3)
            thread.join(60)
            assert left.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert failing["error"].value.code() == grpc.StatusCode.ABORTED
            posts = receiver.wait_for(2)
        events = {e["state"]: e for e in (webhooks.verify(SECRET, h, b) for h, b in posts)}
        assert sorted(events) == ["cancelled", "failed"]
        assert events["failed"]["video_id"] == events["cancelled"]["video_id"] == video_id
        assert "injected model error" in events["failed"]["reason"] and events["failed"]["stats"] == {}
        assert "cancelled" in events["cancelled"]["reason"] and events["cancelled"]["type"] == "job.cancelled"
    finally:
        server.stop()
